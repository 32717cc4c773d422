"""Hierarchy of any traceable model, from Torch-Pruning's dependency graph."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ..families.registry import applicable
from ..inputs import ExampleInputs, check, run_model, tensors_of
from ..tracing import (
    IN,
    AutoTrace,
    ParamDims,
    UnionFind,
    consumer_params,
    coupled_channels,
    import_torch_pruning,
    producer_params,
    trace_graph,
)
from .core import (
    Hierarchy,
    Member,
    check_include_frozen,
    common_module_prefix,
    gc_paused,
    without_frozen,
)

__all__ = ["auto"]


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

    The hierarchy keeps ``example_inputs`` and the options below (layers by name) as its
    :attr:`~group_prox.Hierarchy.trace` (a :class:`group_prox.tracing.AutoTrace`), so that
    :func:`group_prox.compress` traces the same graph again without being given inputs;
    ``hierarchy.trace.seconds`` is how long the trace took (minutes on a large model: where a
    family of :mod:`group_prox.families` applies, its builder needs no trace).

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
    tp = import_torch_pruning()

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
    start = time.perf_counter()
    graph = trace_graph(tp, model, example_inputs, kwargs, "auto()", hint)
    seconds = time.perf_counter() - start

    trace = AutoTrace(
        example_inputs=example_inputs,
        ignored_layers=tuple(n for n, m in model.named_modules() if m in ignored),
        root_module_types=tuple(root_module_types),
        prune_outputs=prune_outputs,
        dependency_kwargs=dict(dependency_kwargs or {}),
        seconds=seconds,
    )
    with gc_paused():
        return _from_graph(
            model,
            graph,
            tp,
            ignored,
            root_module_types,
            prune_outputs,
            branches,
            include_frozen,
            trace,
        )


def _from_graph(
    model: nn.Module,
    graph: Any,
    tp: Any,
    ignored: set[nn.Module],
    root_module_types: Sequence[type[nn.Module]],
    prune_outputs: bool,
    branches: bool,
    include_frozen: bool,
    trace: AutoTrace,
) -> Hierarchy:
    """The two levels from Torch-Pruning's dependency graph (see :func:`auto`), in a hierarchy
    carrying ``trace``."""
    module_names = {m: n for n, m in model.named_modules(remove_duplicate=True)}
    module_order = {m: k for k, m in enumerate(module_names)}

    groups = graph.get_all_groups(
        ignored_layers=list(ignored), root_module_types=tuple(root_module_types)
    )
    # 1. Coupled channels.
    components, _ = coupled_channels(graph, groups)

    # 2. Producer-side slices. A channel that reaches the outputs or an ignored layer, or passes a
    # module that cannot be zeroed slice by slice, gets no group.
    producer_cache: dict[tuple[Any, str], ParamDims | None] = {}

    def producers_of(node: Any, role: str) -> ParamDims | None:
        key = (node, role)
        if key not in producer_cache:
            blocked = node.module in ignored or (not node.outputs and not prune_outputs)
            producer_cache[key] = (
                None if blocked else producer_params(node.module, role, node.pruning_dim)
            )
        return producer_cache[key]

    producers: dict[int, list[tuple[Tensor, int, int]]] = {}
    for c, keys in components.items():
        slices: list[tuple[Tensor, int, int]] = []
        for node, role, i in keys:
            if role == IN:
                continue
            params = producers_of(node, role)
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
    merge = UnionFind()
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
                if role != IN:
                    continue
                for p, d in consumer_params(node.module):
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
    return Hierarchy(levels, names=model, trace=trace)


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
        if role == IN:
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
