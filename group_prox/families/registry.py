"""The registry of model families.

A *family* is what the package knows of one kind of model: how to recognise it among a model's
modules, the hierarchy levels of the structures it can remove, and the compression operations that
remove the dead ones. Each family is registered once with :func:`register_family`; the builders of
:mod:`group_prox.hierarchy` and :func:`group_prox.compress` find families here, so adding one is
one module and one registration, and nothing else changes.

Level names are shared by every family, so that the levels of several families found in one model
(the attention of a Hugging Face decoder and its experts) merge into one hierarchy, finest first:

* ``base_level``: the smallest removable structures: conv filters, attention heads, MLP neurons,
  expert hidden units;
* ``kv_head``: under grouped-query attention, a key/value head with the query heads that read it;
* ``expert``: a whole expert of a mixture-of-experts layer;
* ``layer``: a residual branch (a ResNet block's branch, an attention or MLP sublayer);
* ``stream``: a channel of a residual stream, in every layer writing it (``resnet(model,
  stream=True)``; disjoint from ``layer``);
* ``whole_layer``: a whole transformer layer (all of its sublayers).

A family need not have every level; the merged hierarchy keeps this order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "LEVEL_ORDER",
    "Family",
    "applicable",
    "families",
    "levels_for",
    "merged_levels",
    "no_family_message",
    "register_family",
]

#: The shared level names, finest first (see the module docstring).
LEVEL_ORDER: tuple[str, ...] = (
    "base_level",
    "kv_head",
    "expert",
    "layer",
    "stream",
    "whole_layer",
)

Levels = Mapping[str, Mapping[str, Sequence[Any]]]


@dataclass(frozen=True)
class Family:
    """One kind of model, as the package knows it.

    Attributes:
        name: a short unique name, e.g. ``"torchvision-resnet"``.
        builder: the public builder of :mod:`group_prox.hierarchy` whose hierarchy holds this
            family's levels (``"resnet"``, ``"transformer"`` or ``"moe"``).
        description: what is recognised, for messages: ``"torchvision ResNet blocks (BasicBlock,
            Bottleneck)"``.
        applies: whether a model holds this family's modules.
        levels: the family's levels in a model it applies to, ``{level: {group name: members}}``
            with the level names of :data:`LEVEL_ORDER` (frozen parameters included: the builder
            filters them); ``None`` if the family only compresses.
        plan: the compression operations removing the dead structures of the family in a model it
            applies to, ``plan(model, multiple)``; ``None`` if it has none.
    """

    name: str
    builder: str
    description: str
    applies: Callable[[nn.Module], bool]
    levels: Callable[[nn.Module], Levels] | None = None
    plan: Callable[[nn.Module, int], list[Any]] | None = None


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Register ``family`` (once per name) and return it. Families are consulted in the order
    they were registered."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family(): expected a Family, got {type(family).__name__}.")
    known = _FAMILIES.get(family.name)
    if known is not None and known != family:
        raise ValueError(f"a model family named {family.name!r} is already registered.")
    _FAMILIES[family.name] = family
    return family


def families() -> tuple[Family, ...]:
    """Every registered family, in registration order."""
    return tuple(_FAMILIES.values())


def applicable(model: nn.Module, builder: str | None = None) -> list[Family]:
    """The registered families found in ``model`` (those of ``builder`` only, if given)."""
    return [
        f
        for f in _FAMILIES.values()
        if (builder is None or f.builder == builder) and f.applies(model)
    ]


def merged_levels(
    model: nn.Module, found: Sequence[Family], caller: str
) -> dict[str, Mapping[str, Any]]:
    """The levels of every family in ``found`` merged by level name, in :data:`LEVEL_ORDER`
    (names outside it after, in the order met). Two families naming the same group is refused.
    A level for which some family gives a :class:`~group_prox.hierarchy.GroupTable` is one table
    (its pieces in family order), so that it still builds in array operations."""
    from ..hierarchy.core import GroupTable  # the hierarchy package imports the families

    pieces: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for family in found:
        if family.levels is None:
            continue
        for level, groups in family.levels(model).items():
            pieces.setdefault(level, []).append((family.name, groups))
    merged: dict[str, Mapping[str, Any]] = {}
    for level, parts in pieces.items():
        # Group names are checked as one set, never group by group (tables hold ~10⁵ groups).
        seen: dict[str, str] = {}
        for family_name, groups in parts:
            names = list(groups)
            known = seen.keys() & set(names)
            if known or len(set(names)) != len(names):
                name = min(known) if known else next(n for n in names if names.count(n) > 1)
                raise ValueError(
                    f"{caller}: two model families ({family_name!r} and another) both name a "
                    f"group {name!r} of level {level!r}; please report this model."
                )
            seen.update(dict.fromkeys(names, family_name))
        tables = any(isinstance(g, GroupTable) for _, g in parts)
        if tables:
            merged[level] = GroupTable.concat(g for _, g in parts)
        else:
            merged[level] = {n: m for _, g in parts for n, m in g.items()}
    rank = {name: i for i, name in enumerate(LEVEL_ORDER)}
    order = sorted(merged, key=lambda lv: rank.get(lv, len(rank)))
    return {level: merged[level] for level in order if len(merged[level])}


def levels_for(model: nn.Module, builder: str, caller: str) -> dict[str, Mapping[str, Any]]:
    """The merged levels of the families of ``builder`` found in ``model``; a ``ValueError``
    naming the builder that applies instead when there are none."""
    levels = merged_levels(model, applicable(model, builder), caller)
    if not levels:
        raise ValueError(no_family_message(caller, model, builder))
    return levels


def no_family_message(caller: str, model: nn.Module, builder: str) -> str:
    """Why ``caller`` found nothing in ``model``, and which builder would."""
    own = [f.description for f in _FAMILIES.values() if f.builder == builder]
    others = [f for f in applicable(model) if f.builder != builder]
    text = f"{caller}: the model holds none of {'; '.join(own) or 'the families it knows'}."
    if others:
        text += " It holds " + "; ".join(
            f"{f.description}: use group_prox.hierarchy.{f.builder}(model)" for f in others
        )
        text += "."
    else:
        text += (
            " For any other CNN, group_prox.hierarchy.auto(model, example_inputs) traces the "
            "coupled channels; otherwise build the hierarchy with group_prox.Hierarchy(...)."
        )
    return text
