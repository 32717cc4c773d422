"""Hierarchy from the tags of the earlier project: ``param_groups=['base_level', ...]`` on modules."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from .core import (
    Hierarchy,
    Member,
    check_include_frozen,
    common_module_prefix,
    gc_paused,
    without_frozen,
)

__all__ = ["from_module_tags"]

BASE = "base_level"
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _tags(module: nn.Module) -> list[str] | None:
    """The module's tags: ``param_groups`` (or the earlier wrappers' ``_param_groups``)."""
    for attr in ("param_groups", "_param_groups"):
        tags = getattr(module, attr, None)
        if tags is None:
            continue
        if isinstance(tags, str):
            return [tags]
        if isinstance(tags, Sequence) and all(isinstance(t, str) for t in tags):
            return list(tags)
    return None


def _weighted(module: nn.Module) -> nn.Module | None:
    """The conv/linear layer a tagged module is (or wraps, as the earlier project's wrappers did)."""
    if isinstance(module, _WEIGHTED):
        return module
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, _WEIGHTED) else None


def _norm_after(model: nn.Module) -> dict[int, nn.Module]:
    """For each tagged layer, the BatchNorm registered right after it (its normalisation)."""
    modules = list(model.modules())
    after: dict[int, nn.Module] = {}
    for i, m in enumerate(modules):
        layer = _weighted(m) if _tags(m) is not None else None
        if layer is None:
            continue
        # The wrapper's own inner layer comes first in modules(); the norm follows them both.
        rest = [n for n in modules[i + 1 :] if n is not layer]
        nxt = rest[0] if rest else None
        out = layer.weight.shape[0]
        if isinstance(nxt, _NORMS) and nxt.affine and nxt.num_features == out:
            after[id(m)] = nxt
    return after


class _Builder:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {id(m): n for n, m in model.named_modules()}
        self.norm_after = _norm_after(model)
        self.levels: dict[str, dict[str, list[Member]]] = {BASE: {}}

    def params_of(self, module: nn.Module) -> list[Tensor]:
        """A leaf's parameters and its norm's, or all parameters of a container."""
        params = list(module.parameters())
        norm = self.norm_after.get(id(module))
        return params + (list(norm.parameters()) if norm is not None else [])

    def add(self, level: str, name: str, members: list[Member]) -> None:
        groups = self.levels.setdefault(level, {})
        unique, k = name, 1
        while unique in groups:
            k += 1
            unique = f"{name}#{k}"
        groups[unique] = members

    def leaf(self, module: nn.Module, tags: Iterable[str]) -> None:
        name = self.names.get(id(module), type(module).__name__)
        layer = _weighted(module)
        for tag in tags:
            if tag == BASE and layer is not None:
                norm = self.norm_after.get(id(module))
                for i in range(layer.weight.shape[0]):
                    members: list[Member] = [(layer.weight, 0, i)]
                    if layer.bias is not None:
                        members.append((layer.bias, 0, i))
                    if norm is not None:
                        members += [(norm.weight, 0, i), (norm.bias, 0, i)]
                    self.add(BASE, f"{name}[{i}]", members)
            else:
                self.add(tag, name, self.params_of(module))

    def group(self, modules: list[nn.Module], tags: Iterable[str]) -> None:
        params = {id(p): p for m in modules for p in self.params_of(m)}
        names = [self.names.get(id(m), "") for m in modules]
        name = common_module_prefix(names) or "+".join(names)
        for tag in tags:
            self.add(tag, name, list(params.values()))

    def hierarchy(self, include_frozen: bool) -> Hierarchy:
        # Finest first: filters, then the other tags in the order met, whole-module tags before
        # the groups built from structure ("layer" inside "block").
        structural = (BASE, "layer", "block")
        order = [BASE] if self.levels.get(BASE) else []
        order += [t for t in self.levels if t not in structural]
        order += [t for t in ("layer", "block") if t in self.levels]
        levels = without_frozen(
            {t: self.levels[t] for t in order},
            self.model,
            include_frozen=include_frozen,
            caller="from_module_tags()",
        )
        return Hierarchy(levels, names=self.model)


def _walk_seed_groups(node: Any, builder: _Builder) -> list[nn.Module]:
    """Visit the earlier project's ``get_param_groups()`` tree; return the leaves below ``node``."""
    inner = node.module
    if isinstance(inner, nn.Module):
        builder.leaf(inner, node.groups)
        return [inner]
    leaves: list[nn.Module] = []
    for item in inner:
        if isinstance(item, nn.Module):
            if _weighted(item) is not None:
                leaves.append(item)
                builder.leaf(item, _tags(item) or [])
        else:
            leaves += _walk_seed_groups(item, builder)
    builder.group(leaves, node.groups)
    return leaves


@gc_paused()
def from_module_tags(model: nn.Module, *, include_frozen: bool = False) -> Hierarchy:
    """Hierarchy of a model tagged the way the earlier project tagged its modules.

    Tags are read from a module's ``param_groups`` attribute (a list of level names; the earlier
    project's wrappers stored it as ``_param_groups``):

    * ``"base_level"`` on a ``Conv*d``/``Linear`` layer (or a wrapper holding one as ``.module``):
      one group per output unit, its weight row, its bias entry, and the unit's channel of the
      ``BatchNorm`` registered right after the layer, so a zero group is an exactly zero channel.
      Group name ``"<module>[i]"``.
    * any other tag (``"layer"``, ``"block"``, ``"shortcut"``, ``"head"`` …) on a module: one group
      at the level of that name, holding all the module's parameters (and the norm after a tagged
      layer). Tagging a residual branch ``param_groups=["layer"]`` makes it one ``layer`` group.

    If the model has the earlier project's ``get_param_groups()`` (a tree of groups with
    ``.module`` and ``.groups``), its structure is used too: a group listing modules, e.g.
    ``make_hierarchy([conv1, conv2], "layer")``, becomes one group of its level holding those
    modules' parameters and their norms. Group names are the modules' common name prefix.

    Levels come finest first: ``base_level``, the other tags in the order met, then ``layer`` and
    ``block``. Untagged parameters are in no group and are not penalised.

    Parameters with ``requires_grad=False`` (frozen) are left out: a group all of whose members
    lie in frozen tensors is in no level (a coarser group too, once everything in it is frozen),
    so the hierarchy suits an optimizer over the trainable parameters only. A group with both
    frozen and trainable members is refused.

    Args:
        model: the tagged model.
        include_frozen: keep frozen parameters in their groups instead; then give them to the
            optimizer too, whose prox shrinks them although no gradient step changes them.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``include_frozen`` is not a ``bool``.
        ValueError: if nothing in the model is tagged, the tags do not nest (the message of
            :class:`~group_prox.Hierarchy` names the groups), or a group is partly frozen (a
            filter with a frozen BatchNorm, a tagged block with some layers frozen): the message
            names the level, the group and the frozen tensors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_module_tags(): expected an nn.Module, got {type(model).__name__}.")
    check_include_frozen(include_frozen, "from_module_tags()")
    builder = _Builder(model)
    seen_leaves: set[int] = set()
    get_groups = getattr(model, "get_param_groups", None)
    if callable(get_groups):
        for node in get_groups():
            seen_leaves.update(id(m) for m in _walk_seed_groups(node, builder))
    for module in model.modules():
        tags = _tags(module)
        if tags is None or id(module) in seen_leaves:
            continue
        if _weighted(module) is not None:
            builder.leaf(module, tags)
        else:
            builder.group([module], tags)
    if not any(builder.levels.values()):
        raise ValueError(
            "from_module_tags(): no module of the model has a `param_groups` tag such as "
            "['base_level']; tag modules, or build the hierarchy with group_prox.Hierarchy(...)."
        )
    return builder.hierarchy(include_frozen)
