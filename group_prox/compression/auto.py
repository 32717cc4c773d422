"""Compression of any traceable model through Torch-Pruning's dependency graph.

The model is traced as :func:`group_prox.hierarchy.auto` traces it, and Torch-Pruning's pruning
groups are cut into *coupled channels*: one channel index of every tensor that must lose it
together (a conv's output channel, its norm's channel, the input column of every layer reading it,
every other layer writing into the same residual stream or concatenation, the positions of a
flattened map in the linear layer that reads it). A coupled channel is removed, from every one of
those tensors at once, when that is exact in ``eval()`` mode:

* every layer that *reads* it (a conv's input channel, a linear's input feature) reads exactly 0
  whatever the input, so its input column adds nothing. Zeros are followed forward from the
  layers that write the channel: a conv/linear/embedding slice that is 0 (whatever it reads), a
  depthwise filter that is 0 or reads 0, a BatchNorm/InstanceNorm with ``γ = β = 0`` or reading 0
  and mapping 0 to 0 (``β − γ·μ/σ = 0``, see :func:`~group_prox.compression.surgery.dead_channels`),
  activations and pooling with ``f(0) = 0``, sums of zeros, products with a zero factor (the
  squeeze-excitation gate ``sigmoid(·) · x``), concatenation and flattening;
* everything else that touches it works channel by channel (so no other channel sees it go) and
  can be sliced or follows its input's size: conv (``groups=1`` or depthwise), linear, BatchNorm,
  InstanceNorm, PReLU, embedding, or a parameter-free op such as an activation, a concatenation or
  a flatten;
* it does not reach the model's outputs or the output channels of an ignored layer.

A coupled channel that meets anything else stays: LayerNorm and GroupNorm (it takes part in their
statistics), MultiheadAttention, LSTM, a bare ``nn.Parameter``, grouped or transposed convs,
split/chunk/slicing (whose sizes may be written in the forward code), operations Torch-Pruning
traces as element-wise but this module does not know (softmax over channels, a full reduction …).

Two checks on the example inputs guard against a wrong index mapping in the trace: every removed
input column must read exactly 0, and the plan, applied to a copy, must give the same outputs.
Where the plan as a whole fails the second check, it is rebuilt from the clusters of coupled
groups that pass it one by one (with a warning naming the others).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..hierarchy import Hierarchy
from ..inputs import like_model, run_model, tensors_of
from ..tracing import (
    CHANNEL,
    IN,
    OUT,
    AutoTrace,
    UnionFind,
    Unit,
    coupled_channels,
    import_torch_pruning,
    producer_params,
    trace_graph,
)
from .plan import CompressionPlan, Op, Side, SliceOp
from .surgery import is_depthwise, kept_indices

__all__ = ["built_by_auto", "example_inputs_of", "plan"]

_Conv = nn.modules.conv._ConvNd
_Norm = nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm

# Element-wise ops (autograd names) that work position by position with f(0) = 0: a zero channel
# stays zero, and no other channel reads it.
_ZERO_TO_ZERO = frozenset(
    {
        "ReluBackward0", "LeakyReluBackward0", "GeluBackward0", "SiluBackward0",
        "HardswishBackward0", "MishBackward0", "EluBackward0", "CeluBackward0", "SeluBackward0",
        "TanhBackward0", "AbsBackward0", "NegBackward0", "CloneBackward0", "AliasBackward0",
        "ToCopyBackward0", "PermuteBackward0", "TransposeBackward0", "TransposeBackward1",
        "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "UnsqueezeBackward0",
        "MaxPool1DWithIndicesBackward0", "MaxPool2DWithIndicesBackward0",
        "MaxPool3DWithIndicesBackward0", "AvgPool2DBackward0", "AvgPool3DBackward0",
        "AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0", "AdaptiveMaxPool2DBackward0",
        "AdaptiveMaxPool3DBackward0", "UpsampleNearest1DBackward0", "UpsampleNearest2DBackward0",
        "UpsampleNearest3DBackward0", "UpsampleNearestExact2DBackward0",
        "UpsampleLinear1DBackward0", "UpsampleBilinear2DBackward0", "UpsampleBicubic2DBackward0",
        "UpsampleTrilinear3DBackward0", "ReflectionPad1DBackward0", "ReflectionPad2DBackward0",
        "ReplicationPad1DBackward0", "ReplicationPad2DBackward0", "ReplicationPad3DBackward0",
        "HardtanhBackward0",  # f(0) = 0 checked: min_val <= 0 <= max_val
        "MeanBackward1", "SumBackward1",  # partial reductions, checked not over channels
    }
)  # fmt: skip
# Channel by channel too, but f(0) may be non-zero: the channel is not zero after them (a
# squeeze-excitation gate is zero only through the product with a zero channel).
_CHANNELWISE = frozenset(
    {
        "SigmoidBackward0", "HardsigmoidBackward0", "ExpBackward0", "SoftplusBackward0",
        "RsubBackward1", "CosBackward0", "PowBackward0", "SqrtBackward0", "RsqrtBackward0",
        "ReciprocalBackward0", "ConstantPadNdBackward0",
    }
)  # fmt: skip
# What F.linear is traced as, between a layer's input and its output (weight.t(), a flattening
# view for 3-d inputs, the matrix product).
_LAYER_INTERNALS = frozenset(
    {
        "TBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
        "AddmmBackward0", "MmBackward0", "BmmBackward0", "ExpandBackward0",
        "TransposeBackward0", "PermuteBackward0",
    }
)  # fmt: skip
_SUM = frozenset({"AddBackward0", "SubBackward0"})  # zero if every operand is
_PRODUCT = "MulBackward0"  # zero if one operand is
_QUOTIENT = "DivBackward0"  # zero if the numerator is and the denominator a non-zero constant

_Slice = tuple[str, Side, int]  # (module name, side, channel index)


def _trace_of(hierarchy: Hierarchy | None) -> AutoTrace | None:
    """The trace :func:`group_prox.hierarchy.auto` kept on ``hierarchy`` (its ``trace``), or
    ``None``."""
    trace = getattr(hierarchy, "trace", None)
    return trace if isinstance(trace, AutoTrace) else None


def built_by_auto(hierarchy: Hierarchy | None) -> bool:
    """Whether ``hierarchy`` was built by :func:`group_prox.hierarchy.auto`."""
    return _trace_of(hierarchy) is not None


def example_inputs_of(hierarchy: Hierarchy | None) -> Any:
    """The example inputs that :func:`group_prox.hierarchy.auto` traced, or ``None``."""
    trace = _trace_of(hierarchy)
    return None if trace is None else trace.example_inputs


def plan(
    model: nn.Module, example_inputs: Any, hierarchy: Hierarchy | None, *, multiple: int = 1
) -> list[Op]:
    """Slice operations removing every coupled channel whose removal is exact (module docstring).

    ``model`` is traced (not changed: its train/eval flags are restored) on ``example_inputs``
    with the options ``hierarchy`` was built with, if :func:`~group_prox.hierarchy.auto` built it
    (ignored layers, root module types, ``dependency_kwargs``), otherwise with its defaults.
    Within one Torch-Pruning group (one channel dimension) the kept count is rounded up to a
    multiple of ``multiple`` by keeping some removable channels.

    Raises:
        ValueError: if ``example_inputs`` is ``None``.
        ImportError: if Torch-Pruning is not installed.
        RuntimeError: if Torch-Pruning cannot trace the model.
    """
    if example_inputs is None:
        raise ValueError("auto.plan(): example_inputs are needed to trace the model.")
    tp = import_torch_pruning()
    trace = _trace_of(hierarchy) or AutoTrace(example_inputs, (), (_Conv, nn.Linear), False, {})
    if example_inputs is trace.example_inputs:  # recorded: the model may have moved since
        example_inputs = like_model(example_inputs, model)
    ignored: set[nn.Module] = set()
    for name in trace.ignored_layers:
        ignored.update(model.get_submodule(name).modules())

    traced = _trace(model, example_inputs, trace.dependency_kwargs, tp)
    groups = list(
        traced.graph.get_all_groups(
            ignored_layers=list(ignored), root_module_types=tuple(trace.root_module_types)
        )
    )
    components, group_roots = coupled_channels(traced.graph, groups)

    names = {m: n for n, m in model.named_modules()}
    ctx = _Context(traced, tp, names, ignored)
    removable: dict[int, list[_Slice]] = {}
    reads: dict[int, list[tuple[nn.Module, int]]] = {}
    for c, units in components.items():
        found = _removal(units, ctx)
        if found is not None and found[0]:
            removable[c], reads[c] = found

    forward = trace.dependency_kwargs.get("forward_fn") or run_model
    nonzero, want = _observe(model, example_inputs, forward, reads, removable)
    for c in nonzero:  # the trace's index mapping and the model disagree: leave the channel
        del removable[c]

    removed = _round(group_roots, removable, multiple)
    sizes = _Sizes(model)
    removed = _keep_one(removed, removable, sizes)
    ops = _ops(removed, removable, sizes, names)
    if not ops or _same_outputs(model, ops, example_inputs, forward, want):
        return ops
    return _verified_clusters(
        model, group_roots, removed, removable, sizes, names, example_inputs, forward, want
    )


# ----------------------------------------------------------------------------- tracing
@dataclass
class _Traced:
    graph: Any
    output_fns: set[Any]  # autograd nodes of the tensors the model returned
    input_fns: dict[nn.Module, set[Any]]  # of each conv / linear: autograd nodes of its inputs


def _trace(
    model: nn.Module, example_inputs: Any, dependency_kwargs: Mapping[str, Any], tp: Any
) -> _Traced:
    """Torch-Pruning's graph, with what it does not keep: the model's outputs (whose channels must
    stay, whatever ``output_transform`` keeps of them) and where each layer's input comes from
    (``F.linear`` on a 3-d input is traced as view, ``weight.t()``, addmm and view, which
    Torch-Pruning couples as element-wise ops)."""
    forward = dependency_kwargs.get("forward_fn") or run_model
    returned: list[Any] = []
    layers = [m for m in model.modules() if isinstance(m, _Conv | nn.Linear)]
    input_fns: dict[nn.Module, set[Any]] = {m: set() for m in layers}

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        input_fns[module].update(t.grad_fn for t in tensors_of(list(args)) if t.grad_fn is not None)

    def forward_fn(m: nn.Module, inputs: Any) -> Any:
        handles = [layer.register_forward_pre_hook(record) for layer in layers]
        try:
            out = forward(m, inputs)
        finally:
            for h in handles:
                h.remove()
        returned.append(out)
        return out

    kwargs = {"verbose": False, **dependency_kwargs, "forward_fn": forward_fn}
    graph = trace_graph(
        tp,
        model,
        example_inputs,
        kwargs,
        "compress()",
        "Check that the model runs on example_inputs.",
    )
    outputs = {t.grad_fn for t in tensors_of(returned) if t.grad_fn is not None}
    return _Traced(graph, outputs, input_fns)


# ----------------------------------------------------------------------------- one coupled channel
class _Context:
    """What the analysis of a coupled channel needs from the traced graph."""

    def __init__(
        self, traced: _Traced, tp: Any, names: Mapping[nn.Module, str], ignored: set[nn.Module]
    ) -> None:
        self.optype = tp.ops.OPTYPE
        self.names, self.ignored, self.output_fns = names, ignored, traced.output_fns
        nodes = traced.graph.module2node
        self.node_of = {n.grad_fn: n for n in nodes.values() if n.grad_fn is not None}
        # A layer's internal ops (between its inputs and its output) and the nodes it reads.
        self.owner: dict[Any, nn.Module] = {}
        self.data_inputs: dict[nn.Module, list[Any]] = {}
        for layer, boundary in traced.input_fns.items():
            if layer in nodes:
                self._split_layer(layer, nodes[layer], boundary)

    def _split_layer(self, layer: nn.Module, node: Any, boundary: set[Any]) -> None:
        inside: set[Any] = set()
        outside: list[Any] = []
        stack = list(node.inputs)
        while stack:
            n = stack.pop()
            if n in inside or n in outside:
                continue
            fn = n.grad_fn
            if fn in boundary or fn is None or fn.name() not in _LAYER_INTERNALS:
                outside.append(n)
            else:
                inside.add(n)
                stack.extend(n.inputs)
        private = all(o in inside or o is node for n in inside for o in n.outputs)
        if not private or any(n in self.owner for n in inside):  # read elsewhere too: not its own
            outside, inside = list(node.inputs), set()
        self.data_inputs[layer] = outside
        self.owner.update(dict.fromkeys(inside, layer))

    def operands(self, node: Any) -> list[Any]:
        """The nodes an op reads, in order; ``None`` for a constant or an untraced tensor."""
        fns = getattr(node.grad_fn, "next_functions", ())
        return [None if f is None else self.node_of.get(f) for f, _ in fns]

    def writer_side(self, node: Any, role: str) -> Side | str | None:
        """How a node that writes the channel loses it: ``"out"`` (a slice), ``""`` (nothing to
        do: a parameter-free op following its input's size), ``None`` (it cannot)."""
        if not node.outputs or node.grad_fn in self.output_fns:
            return None  # a model output
        if node in self.owner:
            return ""  # inside a layer that reads the channel (checked by _removal)
        module = node.module
        if isinstance(module, nn.Module) and module in self.ignored:
            return None
        if isinstance(module, _Conv):
            if module.transposed or self.names.get(module) is None:
                return None
            if role == OUT and module.groups == 1:
                return "out"
            return "out" if role == CHANNEL and is_depthwise(module) else None
        if isinstance(module, nn.PReLU) and module.num_parameters == 1:
            return ""  # one slope shared by all channels: nothing to slice
        if isinstance(module, nn.Linear | nn.Embedding | nn.PReLU | _Norm):
            return "out" if self.names.get(module) is not None else None
        if isinstance(module, nn.Module) and next(module.parameters(), None) is None:
            return "" if self._known_op(node) else None
        return None  # LayerNorm, GroupNorm, MultiheadAttention, LSTM, nn.Parameter, customized

    def _known_op(self, node: Any) -> bool:
        if node.type in (self.optype.CONCAT, self.optype.RESHAPE):
            return True
        if node.type != self.optype.ELEMENTWISE or node.grad_fn is None:
            return False  # split, slice, unbind, expand: sizes may be literals of the forward
        name = node.grad_fn.name()
        if name in ("MeanBackward1", "SumBackward1"):
            return not _reduces_channels(node.grad_fn)
        return name in _ZERO_TO_ZERO | _CHANNELWISE | _SUM | {_PRODUCT, _QUOTIENT}


def _reduces_channels(grad_fn: Any) -> bool:
    """A mean/sum over dimension 1 of a feature map (``N, C, …`` with at least two spatial dims)
    mixes channels. Lower-dimensional tensors are ambiguous (``N, C, L`` or ``N, L, C``); the
    output check on the example inputs catches a mix there."""
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    dims = getattr(grad_fn, "_saved_dim", None)
    if sizes is None or dims is None:
        return True
    ndim = len(sizes)
    dims = [d % ndim for d in (dims if isinstance(dims, Iterable) else [dims])]
    return not dims or (ndim >= 4 and 1 in dims)


def _removal(
    units: list[Unit], ctx: _Context
) -> tuple[list[_Slice], list[tuple[nn.Module, int]]] | None:
    """The slices that remove this coupled channel, and the (reader, input index) pairs that must
    read 0, if removing it is exact; otherwise ``None``."""
    writers: dict[Any, list[int]] = {}
    readers: dict[Any, list[int]] = {}
    roles: dict[Any, str] = {}
    for node, role, i in units:
        (readers if role == IN else writers).setdefault(node, []).append(i)
        if role != IN:
            roles[node] = role
    slices: list[_Slice] = []
    reading = {node.module for node in readers}
    for node, idx in writers.items():
        side = ctx.writer_side(node, roles[node])
        if side is None or (node in ctx.owner and ctx.owner[node] not in reading):
            return None
        if side:
            slices += [(ctx.names[node.module], side, i) for i in idx]
    zero = _Zeros(writers, roles, ctx)
    reads: list[tuple[nn.Module, int]] = []
    for node, idx in readers.items():
        module = node.module
        readable = (isinstance(module, _Conv) and module.groups == 1 and not module.transposed) or (
            isinstance(module, nn.Linear)
        )
        if not readable or ctx.names.get(module) is None:
            return None
        # Exact only if every tensor it reads is 0 on this channel: its column then adds 0.
        data = ctx.data_inputs.get(module, node.inputs)
        if not data or not all(zero(n) for n in data):
            return None
        slices += [(ctx.names[module], "in", i) for i in idx]
        reads += [(module, i) for i in idx]
    return slices, reads


class _Zeros:
    """Whether a node's output is exactly 0 on the coupled channel whatever the model's input, in
    eval mode (followed forward from the layers that write it; finite values assumed)."""

    def __init__(self, writers: dict[Any, list[int]], roles: dict[Any, str], ctx: _Context) -> None:
        self.writers, self.roles, self.ctx = writers, roles, ctx
        self.memo: dict[Any, bool] = {}

    def __call__(self, node: Any) -> bool:
        if node is None or node not in self.writers:
            return False  # a constant, the model's input, or a tensor on another channel
        if node not in self.memo:
            self.memo[node] = False  # a cycle (a module called twice) promises nothing
            self.memo[node] = self._zero(node)
        return self.memo[node]

    def _inputs_zero(self, node: Any) -> bool:
        return bool(node.inputs) and all(self(n) for n in node.inputs)

    def _zero(self, node: Any) -> bool:
        module, idx = node.module, self.writers[node]
        if isinstance(module, _Conv) and is_depthwise(module):
            bias_zero = module.bias is None or bool((module.bias[idx] == 0).all())
            return bias_zero and (_slices_zero(module.weight, 0, idx) or self._inputs_zero(node))
        if isinstance(module, _Conv | nn.Linear | nn.Embedding):
            params = producer_params(module, self.roles[node], node.pruning_dim) or []
            return bool(params) and all(_slices_zero(p, d, idx) for p, d in params)
        if isinstance(module, _Norm):
            kills, maps_zero = _norm_zero(module, idx)
            return kills or (maps_zero and self._inputs_zero(node))
        if isinstance(module, nn.PReLU):  # PReLU(0) = 0
            return self._inputs_zero(node)
        optype = self.ctx.optype
        if node.type == optype.CONCAT:  # its other inputs hold other channels
            parts = [n for n in node.inputs if n in self.writers]
            return bool(parts) and all(self(n) for n in parts)
        if node.type == optype.RESHAPE:
            return self._inputs_zero(node)
        name = node.grad_fn.name()
        operands = self.ctx.operands(node)
        if name == "HardtanhBackward0":
            fn = node.grad_fn
            if not fn._saved_min_val <= 0 <= fn._saved_max_val:
                return False
        if name in _ZERO_TO_ZERO or name in _SUM:
            return bool(operands) and all(self(n) for n in operands)
        if name == _PRODUCT:
            return any(self(n) for n in operands)
        if name == _QUOTIENT:
            other = getattr(node.grad_fn, "_saved_other", None)
            return (
                len(operands) == 2
                and self(operands[0])
                and operands[1] is None
                and isinstance(other, Tensor)
                and bool((other != 0).all())
            )
        return False  # _CHANNELWISE: f(0) may be non-zero


def _slices_zero(t: Tensor, dim: int, idx: list[int]) -> bool:
    sel = t.detach().index_select(dim, torch.as_tensor(idx, device=t.device))
    return bool((sel == 0).all())


def _norm_zero(norm: nn.Module, idx: list[int]) -> tuple[bool, bool]:
    """(output 0 whatever the input, output 0 for a zero input) on channels ``idx`` in eval mode:
    ``γ = β = 0``; and ``β − γ·μ/√(σ²+ε) = 0``, asked as ``β = 0`` and ``γ·μ = 0`` so that no
    rounding enters (batch or instance statistics give ``μ = 0`` for a zero channel)."""
    i = torch.as_tensor(idx)
    mean = norm.running_mean
    mean_zero = True if mean is None else bool((mean.detach()[i] == 0).all())
    if not norm.affine:
        return False, mean_zero
    gamma_zero = bool((norm.weight.detach()[i] == 0).all())
    beta_zero = bool((norm.bias.detach()[i] == 0).all())
    return gamma_zero and beta_zero, beta_zero and (gamma_zero or mean_zero)


# ----------------------------------------------------------------------------- checks on the inputs
@torch.no_grad()
def _observe(
    model: nn.Module,
    example_inputs: Any,
    forward: Callable[[nn.Module, Any], Any],
    reads: Mapping[int, list[tuple[nn.Module, int]]],
    removable: Mapping[int, list[_Slice]],
) -> tuple[set[int], Any]:
    """The removable channels some reader's input is not 0 on (on the example inputs), and the
    model's eval-mode outputs."""
    readers = {m for pairs in reads.values() for m, _ in pairs}
    live: dict[nn.Module, Tensor] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if not isinstance(x, Tensor):
            return
        # conv: channels after the batch dim (if any), before the spatial dims; linear: last
        cdim = x.dim() - len(module.kernel_size) - 1 if isinstance(module, _Conv) else x.dim() - 1
        nz = (x != 0).movedim(cdim, 0).reshape(x.shape[cdim], -1).any(1).cpu()
        live[module] = nz | live[module] if module in live else nz

    handles = [m.register_forward_pre_hook(hook) for m in readers]
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        want = forward(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in training.items():
            m.training = mode
    bad = set()
    for c in removable:
        for module, i in reads[c]:
            seen = live.get(module)
            if seen is None or i >= seen.numel() or bool(seen[i]):
                bad.add(c)
                break
    return bad, want


def _same_outputs(
    model: nn.Module,
    ops: list[Op],
    example_inputs: Any,
    forward: Callable[[nn.Module, Any], Any],
    want: Any,
) -> bool:
    """Whether the plan applied to a copy runs and gives ``want`` on the example inputs (the
    tolerances of :func:`group_prox.compress`)."""
    small = copy.deepcopy(model)
    try:
        CompressionPlan.of(ops).apply(small)
        small.eval()
        with torch.no_grad():
            got = forward(small, example_inputs)
    except (RuntimeError, TypeError, ValueError, IndexError):
        return False
    want_t, got_t = tensors_of(want), tensors_of(got)
    if len(want_t) != len(got_t):
        return False
    for w, g in zip(want_t, got_t):
        rtol, atol = (1e-9, 1e-12) if w.dtype == torch.float64 else (1e-5, 1e-6)
        if w.dtype in (torch.float16, torch.bfloat16):
            rtol, atol = 1e-2, 1e-3
        if w.shape != g.shape or not torch.allclose(w, g, rtol=rtol, atol=atol):
            return False
    return True


# ----------------------------------------------------------------------------- channels to slices
class _Sizes:
    """Channel count of each side of each module, by name."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, name: str, side: Side) -> int:
        m = self.model.get_submodule(name)
        if isinstance(m, _Conv):
            return m.out_channels if side == "out" else m.in_channels
        if isinstance(m, nn.Linear):
            return m.out_features if side == "out" else m.in_features
        if isinstance(m, nn.Embedding):
            return m.embedding_dim
        if isinstance(m, nn.PReLU):
            return m.num_parameters
        return m.num_features  # BatchNorm, InstanceNorm


def _round(
    group_roots: list[list[int]], removable: Mapping[int, list[_Slice]], multiple: int
) -> set[int]:
    """The coupled channels to remove: per group (one channel dimension), the removable ones less
    the fewest needed to keep a multiple of ``multiple`` (and at least one). A channel met by
    several groups goes only if every one of them lets it go, so it goes from every tensor."""
    kept: set[int] = set()
    for comps in group_roots:
        dead = torch.tensor([c in removable for c in comps], dtype=torch.bool)
        kept.update(comps[k] for k in kept_indices(dead, multiple))
    return set(removable) - kept


def _keep_one(removed: set[int], removable: Mapping[int, list[_Slice]], sizes: _Sizes) -> set[int]:
    """Keep a channel on any module side that would lose all of them (a side fed by several
    groups, or by part of one, as after a split)."""
    removed = set(removed)
    while True:
        per_side: dict[tuple[str, Side], dict[int, int]] = {}
        for c in removed:
            for name, side, i in removable[c]:
                per_side.setdefault((name, side), {})[i] = c
        empty = [(k, v) for k, v in per_side.items() if len(v) >= sizes(*k)]
        if not empty:
            return removed
        for _, owners in empty:
            removed.discard(owners[min(owners)])


def _ops(
    removed: Iterable[int],
    removable: Mapping[int, list[_Slice]],
    sizes: _Sizes,
    names: Mapping[nn.Module, str],
) -> list[Op]:
    """One slice per module side; each keeps indices of that side as it is in the original model,
    and no operation changes another side's indexing, so any order is valid. Module order, outputs
    before inputs, makes the plan readable."""
    gone: dict[tuple[str, Side], set[int]] = {}
    for c in removed:
        for name, side, i in removable[c]:
            gone.setdefault((name, side), set()).add(i)
    order = {n: k for k, n in enumerate(names.values())}
    ops: list[Op] = []
    for (name, side), idx in sorted(
        gone.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] != "out")
    ):
        keep = tuple(i for i in range(sizes(name, side)) if i not in idx)
        ops.append(SliceOp(name, side, keep))
    return ops


def _verified_clusters(
    model: nn.Module,
    group_roots: list[list[int]],
    removed: set[int],
    removable: Mapping[int, list[_Slice]],
    sizes: _Sizes,
    names: Mapping[nn.Module, str],
    example_inputs: Any,
    forward: Callable[[nn.Module, Any], Any],
    want: Any,
) -> list[Op]:
    """The plan failed the output check: add the clusters of groups that share coupled channels
    one at a time, keeping each that passes together with those kept before."""
    uf = UnionFind()
    for k, comps in enumerate(group_roots):
        for c in comps:
            uf.union(uf.id(("group", k)), uf.id(("channel", c)))
    clusters: dict[int, set[int]] = {}
    for c in removed:
        clusters.setdefault(uf.find(uf.id(("channel", c))), set()).add(c)
    accepted: set[int] = set()
    refused: list[str] = []
    for cluster in clusters.values():
        trial = accepted | cluster
        if _same_outputs(
            model, _ops(trial, removable, sizes, names), example_inputs, forward, want
        ):
            accepted = trial
        else:
            refused.append(removable[min(cluster)][0][0])
    warnings.warn(
        "compress(): removing the dead channels coupled to "
        f"{', '.join(sorted(set(refused)))} changed the outputs on the example inputs, so they "
        "were kept (Torch-Pruning's trace and the model's forward disagree there).",
        RuntimeWarning,
        stacklevel=3,
    )
    return _ops(accepted, removable, sizes, names)
