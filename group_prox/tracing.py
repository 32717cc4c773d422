"""Tracing with Torch-Pruning, shared by :func:`group_prox.hierarchy.auto` (the hierarchy of coupled
channels) and :mod:`group_prox.compression.auto` (the compression of the same channels).

Torch-Pruning is an optional dependency (``pip install "group_prox[auto]"``), imported by
:func:`import_torch_pruning` when a model is traced, never when this module is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CHANNEL",
    "IN",
    "OUT",
    "AutoTrace",
    "ParamDims",
    "UnionFind",
    "Unit",
    "consumer_params",
    "coupled_channels",
    "import_torch_pruning",
    "producer_params",
    "trace_graph",
]

_INSTALL = 'pip install "group_prox[auto]"'

# Roles of one channel index on one node of the dependency graph.
OUT, IN, CHANNEL = "out", "in", "channel"  # output channel, input channel, both at once

#: ``[(tensor, dim)]``: the slices ``i`` along ``dim`` of these tensors that make up channel ``i``.
ParamDims = list[tuple[Tensor, int]]
Unit = tuple[Any, str, int]  # (Torch-Pruning node, role, channel index in that node)


@dataclass(frozen=True, eq=False)
class AutoTrace:
    """How :func:`group_prox.hierarchy.auto` traced a model, kept on its hierarchy
    (:attr:`group_prox.Hierarchy.trace`) so that :func:`group_prox.compress` can trace the same
    graph again. Layers are kept by name, not by object, so that the record also describes a copy
    of the model."""

    example_inputs: Any
    ignored_layers: tuple[str, ...]  # every ignored module, containers expanded
    root_module_types: tuple[type[nn.Module], ...]
    prune_outputs: bool
    dependency_kwargs: Mapping[str, Any]
    #: Wall-clock seconds Torch-Pruning took to trace the model (0 where nothing was traced).
    seconds: float = 0.0


def import_torch_pruning() -> Any:
    """The ``torch_pruning`` module; an ``ImportError`` saying how to install it if it is not."""
    try:
        import torch_pruning
    except ImportError as e:
        raise ImportError(
            "group_prox.hierarchy.auto() traces channel dependencies with Torch-Pruning, which is "
            f"not installed. Install the optional extra with:  {_INSTALL}  "
            "(or: pip install torch-pruning)."
        ) from e
    return torch_pruning


def _weight_and_bias(module: nn.Module, dim: int) -> ParamDims:
    out: ParamDims = [(module.weight, dim)]
    if getattr(module, "bias", None) is not None:
        out.append((module.bias, 0))
    return out


def producer_params(module: object, role: str, pruning_dim: int) -> ParamDims | None:
    """The tensors whose slice ``i`` along ``dim`` must be zero for output channel ``i`` of
    ``module`` to be exactly zero whenever its input channel ``i`` is (``role`` is ``OUT`` or
    ``CHANNEL``). ``[]``: nothing to zero (a parameter-free op); ``None``: not expressible, so a group
    through this module could not promise an exactly zero channel."""
    if isinstance(module, nn.Parameter):
        return [(module, pruning_dim % module.dim())] if module.dim() else None
    if not isinstance(module, nn.Module):
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        if role == CHANNEL:  # depthwise: channel i is weight[i] whether transposed or not
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


def consumer_params(module: object) -> ParamDims:
    """The tensor whose slice ``i`` reads input channel ``i`` (empty if it is not one slice)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1:
            return []
        return [(module.weight, 0 if module.transposed else 1)]
    if isinstance(module, nn.Linear):
        return [(module.weight, 1)]
    return []


class UnionFind:
    """Disjoint sets of hashable keys, each key numbered on first use by :meth:`id`."""

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
        return CHANNEL if out and inp else OUT if out else IN

    uf = UnionFind()
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
