"""The earlier project's configuration language, turned into penalties for the optimizers.

A configuration is a tree of nodes (or a list of nodes, read as one container)::

    {"type": "hierarchical", "groups": None, "children": [
        {"type": "global", "norm": "L2", "lambda": 0.01},
        {"type": "layerwise", "groups": "base_level", "norm": "L1", "inner_norm": "L2",
         "lambda": 0.002},
    ]}

Each penalising node computes ``λ · norm_g(inner_norm(x_g))`` over the groups it selects. Every
supported ``(norm, inner_norm)`` pair is mapped to the penalty whose exact proximal operator the
optimizers apply, with the same objective (the earlier project added it to the loss):

=============  ==============  ===========================================================
``norm``       ``inner_norm``  penalty
=============  ==============  ===========================================================
L1 or sum      L2              ``GroupLasso(λ, weight=1)``: ``λ Σ_g ‖x_g‖₂``
sum or L1      L1              ``L1(λ)``: ``λ Σ |x_i|``
L2             L2              ``GroupDecay(2λ)``: ``λ Σ_g ‖x_g‖₂²``
L1 or sum      L0, L0approx    ``GroupL0(λ, weight="size")``: ``λ Σ_g n_g [x_g ≠ 0]``
=============  ==============  ===========================================================

``L0``/``L0approx`` were the smooth surrogate ``Σ|x_i|^0.1`` of a count of non-zeros; here they
are the count itself, per group (the number of scalars in non-zero groups), whose exact prox is a
hard threshold. ``(L2, L1)``, ``(L2, L0)`` (no closed-form prox) and ``inner_norm="none"`` (it
contributed nothing) are rejected.

The earlier project's λ were *in-loss* λ: the penalty's gradient went through SGD's momentum
buffer, which multiplies a steady push by ``1/(1 - momentum)``, while the optimizers here apply
the prox once per step with step size ``lr``, outside the buffer. The same objective therefore
needs a larger λ here: ``from_config(..., momentum=0.9)`` multiplies every λ by
:func:`prox_lambda`'s factor ``(1 - dampening) / (1 - momentum)`` (10 for 0.9); its docstring
derives it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .hierarchy.core import Hierarchy
from .penalties import L1, GroupDecay, GroupL0, GroupLasso, Penalty, SparseGroupLasso
from .prox import GLOBAL
from .validation import check_bool, check_fraction, check_real

__all__ = ["from_config", "prox_lambda"]

_KEYS = ("type", "groups", "norm", "inner_norm", "lambda", "children")
_TYPES = ("global", "layerwise", "hierarchical")
_NORMS = {"SUM": "sum", "L1": "L1", "L2": "L2"}
_INNER = {"L1": "L1", "L2": "L2", "L0": "L0", "L0APPROX": "L0", "NONE": "none"}
_KIND_OF = {
    ("L1", "L2"): "lasso",
    ("sum", "L2"): "lasso",
    ("sum", "L1"): "l1",
    ("L1", "L1"): "l1",
    ("L2", "L2"): "decay",
    ("L1", "L0"): "l0",
    ("sum", "L0"): "l0",
}
_ALLOWED_PAIRS = "(L1|sum, L2), (sum|L1, L1), (L2, L2), (L1|sum, L0|L0approx)"
# Penalties whose value over a union of groups is the sum over the groups.
_SEPARABLE = ("l1", "decay")
_ALIASES = {"blocks": "block", "block": "blocks"}


@dataclass
class _Slot:
    """What the nodes ask of one level: λ per penalty kind, the groups covered, who asked."""

    groups: frozenset[str] | None
    lam: dict[str, float] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)


def _quote(node: Any) -> str:
    text = repr(node)
    return text if len(text) <= 160 else text[:157] + "..."


def from_config(
    config: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    hierarchy: Hierarchy,
    *,
    momentum: float | None = None,
    dampening: float = 0.0,
) -> dict[str, Penalty]:
    """The ``penalties`` mapping for :class:`~group_prox.ProxSGD`/:class:`~group_prox.ProxAdam`
    that a configuration of the earlier project describes, on the levels of ``hierarchy``.

    Args:
        config: a node (a dict with ``type``, ``groups``, ``norm``, ``inner_norm``, ``lambda``,
            ``children``), or a list of nodes read as one ``hierarchical`` container.
        hierarchy: the hierarchy whose levels the nodes' ``groups`` name (``"blocks"`` also
            names a level ``"block"`` and vice versa).
        momentum, dampening: the ``torch.optim.SGD`` momentum and dampening that the config's
            λ were tuned with, the penalty being in the loss. Given, every λ becomes
            ``prox_lambda(λ, momentum=momentum, dampening=dampening)``, i.e. is multiplied by
            ``(1 - dampening) / (1 - momentum)`` (10 for ``momentum=0.9``), so that
            :class:`~group_prox.ProxSGD` has the fixed points the in-loss training had (see
            :func:`prox_lambda`; Nesterov momentum has the same factor). ``None`` (default): the
            λ are used as they are, which is right for plain SGD (``momentum=0``), and a
            starting point for :class:`~group_prox.ProxAdam`, for which no factor exists.

    Node semantics:

    * ``type`` ``"hierarchical"``: a container; it penalises nothing, and its ``groups`` (if
      any) restricts its children to the groups lying inside that level's groups. It may not
      carry a ``lambda``, ``norm`` or ``inner_norm``. ``children`` are allowed only here.
    * ``type`` ``"layerwise"`` (the default when ``type`` is missing): one term per group of the
      selected level(s); ``groups=None`` selects the container's level, or the finest level.
    * ``type`` ``"global"``: one term over all the selected parameters at once. With
      ``groups=None`` (outside any container) that is every parameter of the hierarchy, under the
      key ``"global"`` that the optimizers understand. Over a level with several groups, only the
      separable penalties (``L1``, ``GroupDecay``) can be written per group; others are rejected.
    * ``lambda`` (default 0): a node with ``lambda == 0`` adds nothing.
    * Defaults: ``norm="L2"``, ``inner_norm="L2"``; names are case-insensitive.

    Several nodes on one level add up: equal kinds add their λ, and ``L1`` with ``GroupLasso``
    becomes :class:`~group_prox.SparseGroupLasso` (the exact prox of their sum); any other mix on
    one level is rejected.

    Raises:
        ValueError: a node with an unknown key, type, norm, level or a meaningless combination;
            the message quotes the node and lists what is allowed.
        TypeError: a node that is not a mapping, or a ``lambda`` that is not a number.
        ValueError, TypeError: ``momentum`` outside ``[0, 1)``, ``dampening`` outside ``[0, 1)``,
            or a non-zero ``dampening`` without ``momentum``.
    """
    if not isinstance(hierarchy, Hierarchy):
        raise TypeError(
            f"from_config(): hierarchy must be a group_prox.Hierarchy, got {type(hierarchy).__name__}."
        )
    if momentum is None:
        if check_fraction(dampening, "from_config()", "dampening") != 0:
            raise ValueError(
                f"from_config(): dampening={dampening!r} was given without momentum; give the "
                "momentum the config's λ were tuned with (dampening only acts with momentum)."
            )
        factor = 1.0
    else:
        factor = _momentum_factor(momentum, dampening, False, "from_config()")
    slots: dict[str, _Slot] = {}
    if isinstance(config, Sequence) and not isinstance(config, (str, bytes)):
        for i, node in enumerate(config):
            _visit(node, f"config[{i}]", None, hierarchy, slots)
    else:
        _visit(config, "config", None, hierarchy, slots)
    order = [*hierarchy.level_names, GLOBAL]
    return {level: _penalty(slots[level], factor) for level in order if level in slots}


def prox_lambda(
    in_loss_lambda: float, *, momentum: float, dampening: float = 0.0, nesterov: bool = False
) -> float:
    r"""The λ for :class:`~group_prox.ProxSGD` that does what ``in_loss_lambda`` did when the
    penalty was added to the loss and trained with ``torch.optim.SGD(momentum=momentum,
    dampening=dampening, nesterov=nesterov)`` at the same ``lr``:

    .. math:: \lambda_{\text{prox}} = \frac{1 - d}{1 - \beta}\,\lambda_{\text{loss}}
              \qquad (\beta = \text{momentum},\ d = \text{dampening};\ \text{factor 1 when }
              \beta = 0).

    ========================  ======  ====  ====  =====  ====  =====
    momentum β                0       0.5   0.8   0.9    0.95  0.99
    factor (d = 0, Nesterov)  1       2     5     10     20    100
    ========================  ======  ====  ====  =====  ====  =====

    With ``dampening=momentum`` (the buffer is then an average) the factor is 1.

    **Derivation.** ``torch.optim.SGD`` keeps ``b ← β b + (1-d) g`` and steps
    ``x ← x - lr·b`` (Nesterov, which torch allows only with ``d = 0``: ``x ← x - lr (g + β b)``;
    with ``β = 0`` there is no buffer and ``d`` is ignored). Under a steady gradient ``g`` and a
    constant ``lr``, ``b → (1-d) g / (1-β)``, so both variants move ``x`` by ``α g`` per step
    with ``α = lr (1-d) / (1-β)`` (Nesterov: ``lr (1 + β/(1-β)) = lr / (1-β)``). In the loss,
    the penalty's (sub)gradient ``λ ∂Ω`` rides in the buffer and moves a group by ``α λ ∂Ω``
    per step (``α λ w`` for a group lasso group). ``ProxSGD`` runs the same update on the
    loss's gradient ``∇f`` alone and then applies ``prox_{η λ Ω}`` with ``η = lr``, whatever
    the momentum, dampening or Nesterov: the buffer never sees the penalty, so the prox
    shrinks by ``lr λ w`` per step. Exactly, at a fixed point ``(x*, b*)`` of ``ProxSGD``,
    ``b* = (1-d) ∇f(x*) / (1-β)`` and

    .. math:: x^* = \operatorname{prox}_{\text{lr}\,\lambda\Omega}\bigl(x^* - \alpha\nabla
              f(x^*)\bigr) \iff 0 \in \nabla f(x^*) + \tfrac{1-\beta}{1-d}\,\lambda\,
              \partial\Omega(x^*)

    (convex Ω), while the fixed points of SGD with momentum on ``f + λ Ω`` are the stationary
    points of ``f + λ Ω`` whatever β and d. So ``ProxSGD`` at ``λ`` has the fixed points of the
    in-loss training at ``λ (1-β)/(1-d)``; for one group lasso group under ``f = ½‖x - c‖²``
    the group ends exactly zero iff ``‖c‖ ≤ λ (1-β)/(1-d)`` (``tests/test_lambda_scale.py``
    checks these). The prox's threshold ``lr λ_prox`` equals ``α λ_loss``: for any penalty
    linear in λ (``GroupL0`` included, whose fixed points depend on the step) the translated
    ``ProxSGD`` has the fixed points of momentum-free proximal gradient with step ``α`` on
    ``f + λ_loss Ω``. Away from a steady state (a changing ``lr``, the first steps: torch's
    first step sets ``b = g`` undampened) the correspondence holds on average over the
    buffer's memory of about ``1/(1-β)`` steps.

    **ProxAdam has no such factor.** Adam's first moment is an average (``m̂ → g``, no
    ``1/(1-β₁)`` gain), and its update ``lr·m̂/(√v̂+ε)`` does not scale with the gradient, while
    an in-loss λ is compared with the gradient's scale (a group lasso group stays at zero iff
    ``‖∇f_g‖ ≤ λ``). With ``prox_metric="lr"`` it stays at zero iff ``‖m̂/(√v̂+ε)‖ ≤ λ``, under
    a steady gradient about ``√(scalars in the group) ≤ λ`` whatever the gradient's scale. With
    ``prox_metric="preconditioner"`` (step ``lr / mean(√v̂+ε)``) the fixed point solves
    ``D⁻¹∇f + λ ∂Ω / mean(D) ∋ 0``, ``D = √v̂+ε``: the in-loss condition with the same λ
    where ``D`` is even over the prox's tree (for a lone group, the group), not otherwise. Tune ProxAdam's λ afresh (e.g. with
    :class:`~group_prox.SparsityTarget`).

    Args:
        in_loss_lambda: the λ that was added to the loss (finite, ``>= 0``).
        momentum: SGD's momentum β, in ``[0, 1)``.
        dampening: SGD's dampening d, in ``[0, 1)``.
        nesterov: whether SGD used Nesterov momentum (same factor; needs ``momentum > 0`` and
            ``dampening == 0``, as torch does).

    Raises:
        TypeError: an argument that is not a real number (``nesterov``: not a bool).
        ValueError: an argument out of its range, or Nesterov with ``momentum == 0`` or a
            non-zero ``dampening``.
    """
    lam = check_real(in_loss_lambda, "prox_lambda()", "in_loss_lambda")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"prox_lambda(): in_loss_lambda must be finite and >= 0, got {lam!r}.")
    return lam * _momentum_factor(momentum, dampening, nesterov, "prox_lambda()")


def _momentum_factor(momentum: object, dampening: object, nesterov: object, owner: str) -> float:
    """``(1 - dampening) / (1 - momentum)``, 1 without momentum; arguments checked."""
    beta = check_fraction(momentum, owner, "momentum")
    damp = check_fraction(dampening, owner, "dampening")
    if check_bool(nesterov, owner, "nesterov") and (beta == 0 or damp != 0):
        raise ValueError(
            f"{owner}: nesterov=True needs momentum > 0 and dampening == 0 (as in "
            f"torch.optim.SGD), got momentum={beta!r}, dampening={damp!r}."
        )
    if beta == 0:
        return 1.0  # torch.optim.SGD keeps no buffer and ignores dampening
    return (1.0 - damp) / (1.0 - beta)


def _visit(
    node: Any, path: str, within: str | None, hierarchy: Hierarchy, slots: dict[str, _Slot]
) -> None:
    if not isinstance(node, Mapping):
        raise TypeError(f"{path}: a config node must be a dict, got {_quote(node)}.")
    unknown = [k for k in node if k not in _KEYS]
    if unknown:
        raise ValueError(
            f"{path} = {_quote(node)}: unknown key(s) {unknown}; a node has the keys {list(_KEYS)}."
        )
    where = f"{path} = {_quote(node)}"
    kind = str(node.get("type", "layerwise")).lower()
    if kind not in _TYPES:
        raise ValueError(f"{where}: type {node.get('type')!r} is not one of {list(_TYPES)}.")
    levels = _levels(node.get("groups"), where, hierarchy)
    lam = node.get("lambda", 0.0)
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"{where}: lambda must be a number, got {lam!r}.")
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{where}: lambda must be finite and >= 0, got {lam!r}.")
    children = node.get("children", [])

    if kind == "hierarchical":
        extra = [k for k in ("norm", "inner_norm") if k in node] + (["lambda"] if lam else [])
        if extra:
            raise ValueError(
                f"{where}: a hierarchical node only groups its children and penalises nothing; "
                f"move {extra} to a child node."
            )
        if len(levels) > 1:
            raise ValueError(f"{where}: a hierarchical node restricts to one level, not {levels}.")
        inner = levels[0] if levels else within
        if within is not None and inner is not None:
            _check_finer(inner, within, where, hierarchy)
        if not isinstance(children, Sequence) or isinstance(children, (str, bytes)):
            raise TypeError(f"{where}: children must be a list of nodes.")
        for i, child in enumerate(children):
            _visit(child, f"{path}.children[{i}]", inner, hierarchy, slots)
        return

    if children:
        raise ValueError(
            f"{where}: children are allowed only in hierarchical nodes; wrap this node and its "
            "children in {'type': 'hierarchical', 'children': [...]}."
        )
    norm = _NORMS.get(str(node.get("norm", "L2")).upper())
    inner_norm = _INNER.get(str(node.get("inner_norm", "L2")).upper())
    if norm is None:
        raise ValueError(f"{where}: norm {node['norm']!r} is not one of ['sum', 'L1', 'L2'].")
    if inner_norm is None:
        raise ValueError(
            f"{where}: inner_norm {node['inner_norm']!r} is not one of "
            "['L1', 'L2', 'L0', 'L0approx', 'none']."
        )
    if inner_norm == "none":
        raise ValueError(
            f"{where}: inner_norm 'none' makes the node contribute nothing; drop the node."
        )
    penalty_kind = _KIND_OF.get((norm, inner_norm))
    if penalty_kind is None:
        raise ValueError(
            f"{where}: norm={norm!r} with inner_norm={inner_norm!r} has no exact proximal "
            f"operator here; the supported (norm, inner_norm) pairs are {_ALLOWED_PAIRS}."
        )
    if lam == 0:
        return

    if kind == "global" and not levels and within is None:
        _add(slots, GLOBAL, None, penalty_kind, float(lam), where)
        return
    if not levels:
        if within is None and not hierarchy.level_names:
            raise ValueError(
                f"{where}: the hierarchy has no levels, so there is no finest level to penalise; "
                "build the hierarchy with levels, or use type 'global' with groups=None."
            )
        levels = [within if within is not None else hierarchy.level_names[0]]
    for level in levels:
        if within is not None:
            _check_finer(level, within, where, hierarchy)
        covered = _covered(level, within, hierarchy)
        if kind == "global" and penalty_kind not in _SEPARABLE:
            count = hierarchy.num_groups(level) if covered is None else len(covered)
            if count != 1:
                raise ValueError(
                    f"{where}: a global {penalty_kind} term over the {count} groups of level "
                    f"{level!r} is one norm of all of them, which is not a level of the "
                    "hierarchy; use type 'layerwise' (one term per group) or groups=None (the "
                    "whole hierarchy)."
                )
        _add(slots, level, covered, penalty_kind, float(lam), where)


def _levels(groups: Any, where: str, hierarchy: Hierarchy) -> list[str]:
    if groups is None:
        return []
    names = [groups] if isinstance(groups, str) else groups
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"{where}: groups must be None, a level name or a list of level names, "
            f"got {_quote(groups)}."
        )
    if not names:
        raise ValueError(
            f"{where}: groups is an empty list; give a level name, a list of level names, or "
            "None (the container's level, else the finest level)."
        )
    out = []
    for name in names:
        if name in hierarchy.level_names:
            out.append(name)
        elif _ALIASES.get(name) in hierarchy.level_names:
            out.append(_ALIASES[name])
        else:
            raise ValueError(
                f"{where}: groups {name!r} is not a level of the hierarchy; its levels are "
                f"{list(hierarchy.level_names)}."
            )
    return out


def _check_finer(level: str, within: str, where: str, hierarchy: Hierarchy) -> None:
    order = hierarchy.level_names
    if order.index(level) > order.index(within):
        raise ValueError(
            f"{where}: level {level!r} is coarser than the container's level {within!r}; inside a "
            f"container only {within!r} and finer levels can be selected."
        )


def _covered(level: str, within: str | None, hierarchy: Hierarchy) -> frozenset[str] | None:
    """Names of the groups of ``level`` inside some group of ``within`` (None: all of them)."""
    if within is None or within == level:
        return None
    own, outer = hierarchy.atom_group(level), hierarchy.atom_group(within)
    parent = np.full(hierarchy.num_groups(level), -1, dtype=np.int64)
    held = own >= 0
    parent[own[held]] = outer[held]  # groups nest, so every atom of a group has the same parent
    if (parent >= 0).all():
        return None
    names = hierarchy.group_names(level)
    return frozenset(names[g] for g in np.flatnonzero(parent >= 0))


def _add(
    slots: dict[str, _Slot],
    level: str,
    covered: frozenset[str] | None,
    kind: str,
    lam: float,
    where: str,
) -> None:
    slot = slots.setdefault(level, _Slot(covered))
    if slot.groups != covered:
        raise ValueError(
            f"{where}: level {level!r} is already penalised on other groups by {slot.nodes[0]}; "
            "one level takes one penalty over one set of groups."
        )
    mix = set(slot.lam) | {kind}
    if len(mix) > 1 and mix != {"l1", "lasso"}:
        raise ValueError(
            f"{where}: level {level!r} is already penalised by {slot.nodes[0]}, and a {kind} term "
            "added to it has no exact prox here; only equal kinds, or L1 with group lasso, "
            "combine on one level."
        )
    slot.lam[kind] = slot.lam.get(kind, 0.0) + lam
    slot.nodes.append(where)


def _penalty(slot: _Slot, factor: float) -> Penalty:
    lam, groups = {kind: value * factor for kind, value in slot.lam.items()}, slot.groups
    if set(lam) == {"l1", "lasso"}:
        total = lam["l1"] + lam["lasso"]
        return SparseGroupLasso(total, lam["l1"] / total, weight=1.0, groups=groups)
    ((kind, value),) = lam.items()
    if kind == "lasso":
        return GroupLasso(value, weight=1.0, groups=groups)
    if kind == "l1":
        return L1(value, groups=groups)
    if kind == "decay":
        return GroupDecay(2 * value, groups=groups)
    return GroupL0(value, weight="size", groups=groups)
