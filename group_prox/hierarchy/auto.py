"""Hierarchy of any traceable model, from Torch-Pruning's dependency graph."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..families.registry import applicable
from ..inputs import ExampleInputs, check, run_model, tensors_of
from .core import (
    Hierarchy,
    Member,
    check_include_frozen,
    common_module_prefix,
    gc_paused,
    without_frozen,
)

__all__ = ["auto"]

_INSTALL = 'pip install "group_prox[auto]"'

# Roles of one channel index on one node of the dependency graph.
_OUT, _IN, _CH = "out", "in", "channel"  # output channel, input channel, both at once

_ParamDims = list[tuple[Tensor, int]]
Unit = tuple[Any, str, int]  # (Torch-Pruning node, role, channel index in that node)


@dataclass(frozen=True, eq=False)
class AutoTrace:
    """How :func:`auto` traced a model, kept on its hierarchy (``hierarchy._auto_trace``) so that
    :func:`group_prox.compress` can trace the same graph again. Layers are kept by name, not by
    object, so that the record also describes a copy of the model."""

    example_inputs: Any
    ignored_layers: tuple[str, ...]  # every ignored module, containers expanded
    root_module_types: tuple[type[nn.Module], ...]
    prune_outputs: bool
    dependency_kwargs: Mapping[str, Any]


def _import_torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as e:
        raise ImportError(
            "group_prox.hierarchy.auto() traces channel dependencies with Torch-Pruning, which is "
            f"not installed. Install the optional extra with:  {_INSTALL}  "
            "(or: pip install torch-pruning)."
        ) from e
    return torch_pruning


def _weight_and_bias(module: nn.Module, dim: int) -> _ParamDims:
    out: _ParamDims = [(module.weight, dim)]
    if getattr(module, "bias", None) is not None:
        out.append((module.bias, 0))
    return out


def _producer_params(module: object, role: str, pruning_dim: int) -> _ParamDims | None:
    """The tensors whose slice ``i`` along ``dim`` must be zero for output channel ``i`` of
    ``module`` to be exactly zero whenever its input channel ``i`` is (``role`` is ``_OUT`` or
    ``_CH``). ``[]``: nothing to zero (a parameter-free op); ``None``: not expressible, so a group
    through this module could not promise an exactly zero channel."""
    if isinstance(module, nn.Parameter):
        return [(module, pruning_dim % module.dim())] if module.dim() else None
    if not isinstance(module, nn.Module):
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        if role == _CH:  # depthwise: channel i is weight[i] whether transposed or not
            return _weight_and_bias(module, 0)
        if not module.transposed:
            return _weight_and_bias(module, 0)
        # ConvTranspose weight is [in, out / groups, ...]: a filter is one slice only if groups=1
        return _weight_and_bias(module, 1) if module.groups == 1 else None
    if isinstance(module, nn.Linear):
        return _weight_and_bias(module, 0)
    if isinstance(module, nn.Embedding):
        return [(module.weight, 1)]
    if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.GroupNorm):
        # Without affine parameters, eval-mode BN maps 0 to -mean/std, GroupNorm to a value set by
        # the other channels of its group: not zero, so nothing can be promised.
        return _weight_and_bias(module, 0) if module.affine else None
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        if module.affine:
            return _weight_and_bias(module, 0)
        return None if module.track_running_stats else []  # per-sample stats: 0 stays 0
    if isinstance(module, nn.LayerNorm):
        if module.weight is not None and module.weight.dim() == 1:
            return _weight_and_bias(module, 0)
        return None
    if isinstance(module, nn.PReLU):
        return [(module.weight, 0)] if module.num_parameters > 1 else []  # PReLU(0) = 0
    if isinstance(module, nn.Module) and next(module.parameters(), None) is None:
        return []  # Torch-Pruning's parameter-free ops: add, mul, concat, reshape, activations
    return None  # MultiheadAttention, LSTM, customized layers: not mapped


def _consumer_params(module: object) -> _ParamDims:
    """The tensor whose slice ``i`` reads input channel ``i`` (empty if it is not one slice)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1:
            return []
        return [(module.weight, 0 if module.transposed else 1)]
    if isinstance(module, nn.Linear):
        return [(module.weight, 1)]
    return []


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.ids: dict[object, int] = {}

    def id(self, key: object) -> int:
        i = self.ids.get(key)
        if i is None:
            i = self.ids[key] = len(self.parent)
            self.parent.append(i)
        return i

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def coupled_channels(
    graph: Any, groups: list[Any]
) -> tuple[dict[int, list[Unit]], list[list[int]]]:
    """Coupled channels: the union of Torch-Pruning's groups, one channel index at a time. A unit is
    (node, role, index); all units of one channel end up in one component (keyed by its root).
    Also, per group, the component of each of its root indices."""

    def role_of(handler: Callable) -> str:
        out, inp = graph.is_out_channel_pruning_fn(handler), graph.is_in_channel_pruning_fn(handler)
        return _CH if out and inp else _OUT if out else _IN

    uf = _UnionFind()
    roots_of: list[list[int]] = []
    for group in groups:
        root_dep = group[0].dep
        root_node, root_role = root_dep.target, role_of(root_dep.handler)
        roots = {r: uf.id((root_node, root_role, r)) for r in group[0].root_idxs}
        roots_of.append(list(roots.values()))
        for item in group:
            node, role = item.dep.target, role_of(item.dep.handler)
            for i, r in zip(item.idxs, item.root_idxs):
                u = uf.id((node, role, int(i)))
                if r is None:  # an index mapping lost its root: couple it to all of them
                    for v in roots.values():
                        uf.union(u, v)
                else:
                    uf.union(u, roots[r])
    components: dict[int, list[Unit]] = {}
    for key, i in uf.ids.items():
        components.setdefault(uf.find(i), []).append(key)
    return components, [[uf.find(u) for u in roots] for roots in roots_of]


def trace_graph(
    tp: Any,
    model: nn.Module,
    example_inputs: object,
    kwargs: dict[str, Any],
    caller: str,
    hint: str,
) -> Any:
    """Torch-Pruning's dependency graph of ``model``, its train/eval flags and ``requires_grad``
    left as they were."""
    training = {m: m.training for m in model.modules()}
    # Torch-Pruning traces through autograd: a layer whose parameters and input need no gradient
    # (frozen, or fed only by frozen layers) leaves no autograd node, and would be missing from
    # the graph. Every parameter takes part in the trace; the frozen ones are frozen again after.
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, **kwargs
            )
    except Exception as e:
        raise RuntimeError(
            f"{caller}: Torch-Pruning could not trace {type(model).__name__} "
            f"({type(e).__name__}: {e}). {hint}"
        ) from e
    finally:
        for p in frozen:
            p.requires_grad_(False)
        for m, mode in training.items():  # the trace leaves the model in eval mode
            m.training = mode


def _runs(indices: Sequence[int]) -> list[int | slice]:
    """Indices as few members as possible: ints, or slices for consecutive runs."""
    if len(indices) == 1:
        return [indices[0]]
    out: list[int | slice] = []
    idx = sorted(set(indices))
    start = 0
    for k in range(1, len(idx) + 1):
        if k == len(idx) or idx[k] != idx[k - 1] + 1:
            a, b = idx[start], idx[k - 1]
            out.append(a if a == b else slice(a, b + 1))
            start = k
    return out


def auto(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    ignored_layers: Iterable[nn.Module | str] | None = None,
    root_module_types: Sequence[type[nn.Module]] = (nn.modules.conv._ConvNd, nn.Linear),
    prune_outputs: bool = False,
    branches: bool = True,
    dependency_kwargs: Mapping[str, Any] | None = None,
    include_frozen: bool = False,
) -> Hierarchy:
    """Two-level hierarchy of coupled channels and residual branches, found by tracing the model.

    The model is traced once on ``example_inputs`` by Torch-Pruning's ``DependencyGraph`` (an
    optional dependency: ``pip install "group_prox[auto]"``), which tells which channels must be
    removed together: a conv/linear layer's output channel, the norm channel on it, the input
    channel of every layer that reads it, and, through residual additions, channel-wise products
    (squeeze-excitation), depthwise convolutions and concatenations, the channels of every other
    layer that writes into the same feature map.

    * ``base_level``: one group per set of coupled channels, holding every *producer-side* slice
      of the channel: the filter ``weight[i]`` and ``bias[i]`` of each conv/linear layer that writes
      it (every conv feeding one residual stream, for example), the depthwise filter, channel ``i``
      of each BatchNorm/GroupNorm/InstanceNorm/LayerNorm (``γ_i``, ``β_i``), of a per-channel PReLU
      and of an embedding, and slice ``i`` of a bare ``nn.Parameter`` that Torch-Pruning couples to
      it (ConvNeXt's layer scale). When the group is zero the channel is exactly zero, in train and
      eval mode, wherever the activations on it map 0 to 0 (ReLU, GELU, SiLU, Hardswish, ...) or
      gate it by multiplication (the sigmoid of squeeze-excitation).
      The *consumer-side* inputs of a zero channel receive exactly zero, so compression can drop
      them; they are members only where no other group cuts the same tensor. A scalar can be in
      one group per level and a consumer's input column ``w[:, i]`` crosses its own output filters
      ``w[j]``, so this is the case only for a consumer whose outputs are not grouped: the
      classifier, whose column ``fc.weight[:, i]`` joins the group of feature ``i`` (or the
      columns ``c·HW ... (c+1)·HW - 1``, one slice, when an ``H×W`` map is flattened into it).
      Group name: the first conv/linear producer in module order with its channel index, e.g.
      ``"layer1.0.conv1[5]"``; in a ResNet the stem and every ``conv2`` of stage 1 are one stream
      group per channel, named ``"conv1[i]"``.
    * ``layer``: one group per residual branch ``f`` of ``x + f(x)``. At each addition of two
      traced tensors, if the module ancestors of one side contain those of the other, the branch is
      what only the larger side depends on; if neither does (a projection shortcut such as ResNet's
      ``downsample``) but they share an input, the branch is the side with more parameterised
      modules (ties are skipped). Of overlapping branches the innermost are kept, so ``layer``
      groups are disjoint. The branch's last layer writes into the residual stream, whose groups
      span several blocks, so a ``layer`` group holds the ``base_level`` groups lying entirely
      inside the branch, plus the parameters of branch modules that no ``base_level`` group
      touches (``MultiheadAttention``, the attention branch's LayerNorm); branches with neither get
      no group. For a ResNet ``BasicBlock`` this is ``conv1`` and ``bn1``: when it is zero,
      ``conv2`` reads zeros and the branch outputs the constant ``bn2(0)`` (``β2`` in train mode),
      not zero as with :func:`group_prox.hierarchy.resnet`, the better choice for torchvision
      ResNets. (A transformer's attention and MLP branches, whose stream is not grouped, are zeroed
      completely.) Group name: the module holding the branch, ``"layer1.0"``, or, where one module
      holds several branches, ``"encoder.layers.encoder_layer_0.{ln_1,self_attention}"``.

    Parameters with ``requires_grad=False`` (frozen) are left out: a group all of whose members
    lie in frozen tensors is in no level (a coarser group too, once everything in it is frozen),
    so the hierarchy suits an optimizer over the trainable parameters only. A group with both
    frozen and trainable members is refused. A channel group may span many layers (a ResNet's
    stem and the last conv of every block of its first stage write one residual stream): freeze
    them together, or list the frozen layers in ``ignored_layers``.

    The hierarchy keeps ``example_inputs`` and the options below (layers by name), so that
    :func:`group_prox.compress` traces the same graph again without being given inputs.

    Args:
        model: the model; it is run once, in eval mode (its train/eval flags are restored).
        example_inputs: a tensor (``model(x)``), a tuple or list (``model(*inputs)``) or a dict
            (``model(**inputs)``), small but of the right shape.
        ignored_layers: modules (or their names) whose output channels must stay as they are; every
            channel coupled to them is left out of ``base_level``. Their input columns may still be
            members. A container stands for all its submodules; one module or name may be
            given alone.
        root_module_types: the layer types whose output channels start a group (by default every
            convolution, transposed too, and ``nn.Linear``).
        prune_outputs: also group the channels that reach the model's outputs. By default they are
            left out, so the classifier's logits are never penalised.
        branches: look for residual branches (otherwise ``layer`` is empty).
        dependency_kwargs: passed on to ``torch_pruning.DependencyGraph.build_dependency`` (for
            example ``output_transform`` for a model that returns a dict, or
            ``unwrapped_parameters``).
        include_frozen: keep frozen parameters in their groups instead; then give them to the
            optimizer too, whose prox shrinks them although no gradient step changes them.

    What it cannot find (those parameters are in no group, so not penalised, unless a ``layer``
    group takes them whole):

    * channels coupled to a layer it cannot slice or zero: ``MultiheadAttention`` (so a
      transformer's embedding dimension), ``LSTM``, customized Torch-Pruning layers, a grouped
      ``ConvTranspose``, a multi-dimensional LayerNorm, or a norm without affine parameters
      (BatchNorm in eval mode, GroupNorm and LayerNorm map a zero channel to a non-zero value);
    * layers written as functional calls (``F.conv2d(x, self.w)``) or unknown to Torch-Pruning,
      which it traces as element-wise ops, so their channels are wrongly coupled;
    * anything Torch-Pruning cannot trace (data-dependent control flow, ShuffleNetV2's channel
      shuffle in torch-pruning 1.6);
    * residual branches whose shortcut is the raw model input (it is not in the traced graph),
      partly overlapping branches, and sums not written as one ``+`` of two tensors.

    Other caveats: an activation with ``f(0) ≠ 0`` applied directly to a channel (sigmoid,
    softplus) makes a zero group a constant channel, not a zero one; and LayerNorm and GroupNorm
    normalise over several channels, so a zero channel is exactly zero but still changes the
    others' statistics (not equivalent to removing it).

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``ignored_layers`` holds something
            that is neither a module nor a name, or ``include_frozen`` is not a ``bool``.
        ImportError: if Torch-Pruning is not installed.
        ValueError: if a name in ``ignored_layers`` is not a submodule of ``model``, or a group
            is partly frozen: the message names the level, the group and the frozen tensors.
        RuntimeError: if Torch-Pruning fails to trace the model (for instance the channel shuffle
            of ShuffleNetV2 in torch-pruning 1.6).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"auto(): expected an nn.Module, got {type(model).__name__}.")
    check(example_inputs, "auto()")
    check_include_frozen(include_frozen, "auto()")
    tp = _import_torch_pruning()

    if isinstance(ignored_layers, (str, nn.Module)):
        # One name is not a list of one-letter names, nor a Sequential a list of its children.
        ignored_layers = [ignored_layers]
    elif ignored_layers is not None and not isinstance(ignored_layers, Iterable):
        raise TypeError(
            "auto(): ignored_layers must be a list of modules or module names, "
            f"got {type(ignored_layers).__name__}."
        )
    ignored: set[nn.Module] = set()
    for layer in ignored_layers or ():
        if isinstance(layer, str):
            try:
                layer = model.get_submodule(layer)
            except AttributeError:
                raise ValueError(
                    f"auto(): ignored_layers names {layer!r}, which is not a submodule of model."
                ) from None
        if not isinstance(layer, nn.Module):
            raise TypeError(
                f"auto(): ignored_layers holds modules or module names, got {type(layer).__name__}."
            )
        ignored.update(layer.modules())

    # The output's tensors only: a Hugging Face output also holds a KV cache object, and the
    # loss is computed from the logits, which are among them.
    kwargs: dict[str, Any] = {
        "verbose": False,
        "forward_fn": run_model,
        "output_transform": tensors_of,
    }
    kwargs.update(dependency_kwargs or {})
    known = [f for f in applicable(model) if f.levels is not None]
    hint = (
        " ".join(
            f"The model holds {f.description}: group_prox.hierarchy.{f.builder}(model) builds "
            "its hierarchy without tracing."
            for f in known
        )
        or "Check that model(example_inputs) runs; otherwise build the hierarchy with "
        "group_prox.Hierarchy(...)."
    )
    graph = trace_graph(tp, model, example_inputs, kwargs, "auto()", hint)

    with gc_paused():
        hierarchy = _from_graph(
            model, graph, tp, ignored, root_module_types, prune_outputs, branches, include_frozen
        )
    hierarchy._auto_trace = AutoTrace(  # type: ignore[attr-defined]
        example_inputs=example_inputs,
        ignored_layers=tuple(n for n, m in model.named_modules() if m in ignored),
        root_module_types=tuple(root_module_types),
        prune_outputs=prune_outputs,
        dependency_kwargs=dict(dependency_kwargs or {}),
    )
    return hierarchy


def _from_graph(
    model: nn.Module,
    graph: Any,
    tp: Any,
    ignored: set[nn.Module],
    root_module_types: Sequence[type[nn.Module]],
    prune_outputs: bool,
    branches: bool,
    include_frozen: bool,
) -> Hierarchy:
    """The two levels from Torch-Pruning's dependency graph (see :func:`auto`)."""
    module_names = {m: n for n, m in model.named_modules(remove_duplicate=True)}
    module_order = {m: k for k, m in enumerate(module_names)}

    groups = graph.get_all_groups(
        ignored_layers=list(ignored), root_module_types=tuple(root_module_types)
    )
    # 1. Coupled channels.
    components, _ = coupled_channels(graph, groups)

    # 2. Producer-side slices. A channel that reaches the outputs or an ignored layer, or passes a
    # module that cannot be zeroed slice by slice, gets no group.
    producer_cache: dict[tuple[Any, str], _ParamDims | None] = {}

    def producer_params(node: Any, role: str) -> _ParamDims | None:
        key = (node, role)
        if key not in producer_cache:
            blocked = node.module in ignored or (not node.outputs and not prune_outputs)
            producer_cache[key] = (
                None if blocked else _producer_params(node.module, role, node.pruning_dim)
            )
        return producer_cache[key]

    producers: dict[int, list[tuple[Tensor, int, int]]] = {}
    for c, keys in components.items():
        slices: list[tuple[Tensor, int, int]] = []
        for node, role, i in keys:
            if role == _IN:
                continue
            params = producer_params(node, role)
            if params is None:
                break
            slices += [(p, d, i) for p, d in params]
        else:
            producers[c] = slices

    # A tensor cut along two dimensions (tied weights) cannot be grouped both ways: drop it.
    cut_dims: dict[int, set[int]] = {}
    for slices in producers.values():
        for p, d, _ in slices:
            cut_dims.setdefault(id(p), set()).add(d)
    conflicted = {t for t, dims in cut_dims.items() if len(dims) > 1}
    if conflicted:
        producers = {
            c: sl for c, sl in producers.items() if not any(id(p) in conflicted for p, _, _ in sl)
        }
        cut_dims = {}
        for slices in producers.values():
            for p, d, _ in slices:
                cut_dims.setdefault(id(p), set()).add(d)

    # The same slice reached from two components (a tensor shared by two layers) couples them.
    merge = _UnionFind()
    slice_owner: dict[tuple[int, int, int], int] = {}
    for c, slices in producers.items():
        merge.id(c)
        for p, d, i in slices:
            other = slice_owner.setdefault((id(p), d, i), c)
            if other != c:
                merge.union(merge.id(c), merge.id(other))
    merged: dict[int, list[int]] = {}
    for c in producers:
        merged.setdefault(merge.find(merge.id(c)), []).append(c)

    # 3. Consumer-side slices, only in tensors that no producer slice cuts, read by one group, and
    # cut along one dimension.
    readers: dict[tuple[int, int, int], set[int]] = {}
    consumer_dims: dict[int, set[int]] = {}
    consumers: dict[int, list[tuple[Tensor, int, int]]] = {}
    for g, comps in merged.items():
        for c in comps:
            for node, role, i in components[c]:
                if role != _IN:
                    continue
                for p, d in _consumer_params(node.module):
                    if id(p) not in cut_dims:
                        consumers.setdefault(g, []).append((p, d, i))
                        readers.setdefault((id(p), d, i), set()).add(g)
                        consumer_dims.setdefault(id(p), set()).add(d)

    # 4. Groups: indices per (tensor, dim) as ints or slices, named after a producer.
    param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    param_order = {t: k for k, t in enumerate(param_names)}
    base: list[_Group] = []
    for g, comps in merged.items():
        by_tensor: dict[tuple[int, int], tuple[Tensor, list[int]]] = {}
        for c in comps:
            for p, d, i in producers[c]:
                by_tensor.setdefault((id(p), d), (p, []))[1].append(i)
        for p, d, i in consumers.get(g, ()):
            if len(readers[(id(p), d, i)]) == 1 and len(consumer_dims[id(p)]) == 1:
                by_tensor.setdefault((id(p), d), (p, []))[1].append(i)
        if not by_tensor:
            continue
        keys = [k for c in comps for k in components[c]]
        order, name = _group_name(keys, module_names, module_order, param_names)
        by_tensor = dict(sorted(by_tensor.items(), key=lambda kv: param_order.get(kv[0][0], -1)))
        base.append(_Group(order, name, by_tensor))
    base.sort(key=lambda grp: grp.order)

    base_level: dict[str, list[Member]] = {}
    for grp in base:
        base_level[_unique(grp.name, base_level)] = grp.members()

    layer: dict[str, list[Member]] = {}
    if branches:
        layer = _branch_groups(graph, tp, module_names, module_order, param_names, base)
    levels = without_frozen(
        {"base_level": base_level, "layer": layer},
        model,
        include_frozen=include_frozen,
        caller="auto()",
        hint="list the frozen layers in ignored_layers= (no channel coupled to them is grouped "
        "then), ",
    )
    return Hierarchy(levels, names=model)


class _Group:
    """One ``base_level`` group: indices along one dimension of each of its tensors."""

    def __init__(
        self,
        order: tuple[int, int],
        name: str,
        by_tensor: dict[tuple[int, int], tuple[Tensor, list[int]]],
    ) -> None:
        self.order, self.name, self.by_tensor = order, name, by_tensor
        self.tensors = {t for t, _ in by_tensor}

    def members(self) -> list[Member]:
        return [(p, d, i) for (_, d), (p, idx) in self.by_tensor.items() for i in _runs(idx)]


def _group_name(
    keys: list[tuple[Any, str, int]],
    module_names: dict[nn.Module, str],
    module_order: dict[nn.Module, int],
    param_names: dict[int, str],
) -> tuple[tuple[int, int], str]:
    """``"<module>[i]"`` for the first conv/linear producer in module order (else the first
    other producer), and a key that sorts the groups in module order."""
    best: tuple[tuple[int, int, int], str] | None = None
    for node, role, i in keys:
        module = node.module
        if role == _IN:
            continue
        if isinstance(module, nn.Parameter):  # a bare parameter: after every module
            key, name = (1, len(module_order), i), param_names.get(id(module), "parameter")
        elif module in module_order:
            rank = 0 if isinstance(module, nn.modules.conv._ConvNd | nn.Linear) else 1
            key, name = (rank, module_order[module], i), module_names[module]
        else:
            continue
        if best is None or key < best[0]:
            best = key, f"{name}[{i}]"
    if best is None:  # only consumer slices: name it after one of them
        node, _, i = keys[0]
        best = (2, len(module_order), i), f"{module_names.get(node.module, 'input')}[{i}]"
    (_, order, i), name = best
    return (order, i), name


def _unique(name: str, taken: Mapping[str, object]) -> str:
    if name not in taken:
        return name
    k = 2
    while f"{name}#{k}" in taken:
        k += 1
    return f"{name}#{k}"


def _params_of(module: object) -> list[Tensor]:
    if isinstance(module, nn.Parameter):
        return [module]
    if isinstance(module, nn.Module):
        return list(module.parameters())
    return []


def _branch_groups(
    graph: Any,
    tp: Any,
    module_names: dict[nn.Module, str],
    module_order: dict[nn.Module, int],
    param_names: dict[int, str],
    base: list[_Group],
) -> dict[str, list[Member]]:
    """The ``layer`` level: one group per innermost residual branch ``f`` of ``x + f(x)``."""

    def ancestors(node: Any) -> set[Any]:
        seen, stack = {node}, [node]
        while stack:
            for parent in stack.pop().inputs:
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        return seen

    def with_params(nodes: set[Any]) -> set[Any]:
        return {n for n in nodes if _params_of(n.module)}

    candidates = []
    for node in graph.module2node.values():
        grad_fn = node.grad_fn
        if node.type != tp.ops.OPTYPE.ELEMENTWISE or grad_fn is None:
            continue
        if grad_fn.name() != "AddBackward0":
            continue
        inputs = list(dict.fromkeys(node.inputs))
        if len(inputs) != 2:  # x + x, or a summand that is no traced tensor (the raw input)
            continue
        a, b = ancestors(inputs[0]), ancestors(inputs[1])
        if a < b:
            branch = with_params(b - a)
        elif b < a:
            branch = with_params(a - b)
        else:  # a projection shortcut: the branch is the side with more layers
            if not a & b:  # no common input: x + bias, x + positional embedding
                continue
            only_a, only_b = with_params(a - b), with_params(b - a)
            if len(only_a) == len(only_b):
                continue
            branch = only_a if len(only_a) > len(only_b) else only_b
        if branch:
            candidates.append(branch)

    def position(node: Any) -> int:
        return module_order.get(node.module, len(module_order))

    def name_of(node: Any) -> str:
        if isinstance(node.module, nn.Parameter):
            return param_names.get(id(node.module), "").rpartition(".")[0]
        return module_names.get(node.module, "")

    # Innermost first; a branch overlapping a kept one (an enclosing branch) is dropped.
    candidates.sort(key=lambda br: (len(br), min(position(n) for n in br)))
    in_base = set().union(*(grp.tensors for grp in base))
    kept: list[tuple[int, list[str], list[Member]]] = []
    used: set[int] = set()
    for branch in candidates:
        params = {id(p): p for n in branch for p in _params_of(n.module)}
        if used & params.keys():
            continue
        # Whole base groups only, merged per tensor so that a layer is a few slices, not one
        # member per channel.
        by_tensor: dict[tuple[int, int], tuple[Tensor, list[int]]] = {}
        for grp in base:
            if grp.tensors <= params.keys():
                for key, (p, idx) in grp.by_tensor.items():
                    by_tensor.setdefault(key, (p, []))[1].extend(idx)
        members: list[Member] = []
        for (_, d), (p, idx) in by_tensor.items():
            runs = _runs(idx)
            whole = runs == [slice(0, p.shape[d])] or (p.shape[d] == 1 and runs == [0])
            members += [p] if whole else [(p, d, i) for i in runs]
        members += [p for t, p in params.items() if t not in in_base]
        if not members:
            continue
        used |= params.keys()
        names = [name_of(n) for n in sorted(branch, key=position)]
        kept.append((position(min(branch, key=position)), names, members))

    # Named after the module that holds the branch ("layer1.0"); where that module holds two
    # branches (attention and MLP of a transformer layer) or there is none, list the parts.
    kept.sort(key=lambda k: k[0])
    prefixes = [common_module_prefix(names) for _, names, _ in kept]
    layer: dict[str, list[Member]] = {}
    for prefix, (_, names, members) in zip(prefixes, kept):
        name = prefix
        if not prefix or prefixes.count(prefix) > 1:
            cut = len(prefix) + 1 if prefix else 0
            parts = dict.fromkeys(n[cut:].split(".")[0] for n in names)
            name = f"{prefix}{'.' if prefix else ''}{{{','.join(parts)}}}"
        layer[_unique(name, layer)] = members
    return layer
