"""Group penalties and their proximal operators, written on group norms.

Every penalty here is attached to one *level* of a :class:`~group_prox.Hierarchy` and acts on the
groups of that level. With step size ``eta`` (the learning rate of the optimizer), the proximal
operator of a penalty ``Ω`` maps a point ``v`` to::

    prox_{eta Ω}(v) = argmin_x  ½‖x − v‖² + eta·Ω(x)

All penalties below have proxes that are either *elementwise soft-thresholding* or a *scaling of
each group*, so the optimizer only needs, per group, one scale factor computed from the group's
Euclidean norm. The scale functions below take squared group norms and return scales; they never
touch the parameters themselves. Every threshold ``τ = eta·λ·w_g`` is formed by :func:`threshold`:
``τ = 0`` where ``eta = 0``, so a step of size 0 is the identity at any λ, and a λ beyond the
parameters' range gives ``τ = +inf`` (the group goes to zero), never a NaN.

Group weights ``w_g`` (``weight=``) follow the usual convention of the group lasso literature:

* ``"sqrt_size"`` (default for :class:`GroupLasso`, :class:`SparseGroupLasso`, :class:`GroupMCP`,
  :class:`GroupSCAD` and :class:`GroupLogSum`):
  ``w_g = sqrt(n_g)`` with ``n_g`` the number of scalars in the group, so that a group of random
  weights is penalised independently of its size;
* ``"size"`` (default for :class:`GroupL0`): ``w_g = n_g``;
* a number: the same weight for every group;
* a callable ``f(n_g) -> float``.
"""

from __future__ import annotations

import copy
import math
import numbers
import pickle
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "L1",
    "GroupDecay",
    "GroupL0",
    "GroupLasso",
    "GroupLogSum",
    "GroupMCP",
    "GroupSCAD",
    "Penalty",
    "SparseGroupLasso",
    "WeightSpec",
    "check_lam",
    "threshold",
]

WeightSpec = Literal["sqrt_size", "size"] | float | Callable[[int], float]

_ACC_DTYPE = torch.float64


def _check_real(value: object, owner: str, name: str) -> float:
    """``value`` as a float: a real number (numpy's included) or a 0-dim real tensor, so that a
    scheduler's tensor can be assigned directly."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(
                f"{owner}: {name} must be a real number or a 0-dim real tensor, got a tensor of "
                f"shape {tuple(value.shape)} and dtype {value.dtype}."
            )
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{owner}: {name} must be a real number, got {type(value).__name__} {value!r}."
        )
    return float(value)


def check_lam(lam: object, owner: str) -> float:
    """``lam`` as a ``float``, refused (naming ``owner``) unless it is a finite real ``>= 0``."""
    value = _check_real(lam, owner, "lam")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: lam must be finite and >= 0, got {value!r}.")
    return value


def _check_l1_ratio(l1_ratio: object, owner: str) -> float:
    value = _check_real(l1_ratio, owner, "l1_ratio")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}: l1_ratio must be in [0, 1], got {value!r}.")
    return value


def _check_weight(weight: object, owner: str) -> WeightSpec:
    if isinstance(weight, str):
        if weight in ("sqrt_size", "size"):
            return weight  # type: ignore[return-value]
    elif callable(weight):
        return weight  # type: ignore[return-value]
    elif not isinstance(weight, bool) and isinstance(weight, numbers.Real):
        value = float(weight)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{owner}: a numeric weight must be finite and >= 0, got {value!r}.")
        return value
    raise TypeError(
        f"{owner}: weight must be 'sqrt_size', 'size', a non-negative number or a callable "
        f"taking the group size, got {weight!r}."
    )


def _check_groups(groups: object, owner: str) -> frozenset[str] | None:
    if groups is None:
        return None
    if isinstance(groups, str) or not isinstance(groups, Collection):
        raise TypeError(
            f"{owner}: groups must be a collection of group names or None, got {groups!r}; "
            "for one group write groups=[name]."
        )
    names = frozenset(groups)
    odd = [n for n in names if not isinstance(n, str)]
    if odd:
        raise TypeError(
            f"{owner}: groups must hold group names (strings), got {odd[0]!r} "
            f"({type(odd[0]).__name__})."
        )
    return names


def group_weight(weight: WeightSpec, size: int) -> float:
    """The weight ``w_g`` of a group of ``size`` scalars under the weight convention ``weight``."""
    if weight == "sqrt_size":
        return math.sqrt(size)
    if weight == "size":
        return float(size)
    if callable(weight):
        w = float(weight(size))
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"the weight callable returned {w!r} for a group of {size} scalars.")
        return w
    return float(weight)  # type: ignore[arg-type]


def _describe_weight(weight: WeightSpec) -> str | float:
    """A weight convention as plain data: its name or number, a callable by qualified name."""
    if isinstance(weight, (str, float)):
        return weight
    module = getattr(weight, "__module__", None) or "?"
    return f"callable {module}.{getattr(weight, '__qualname__', type(weight).__name__)}"


class _WeightInTransit:
    """A callable weight on its way through ``copy.deepcopy`` or ``pickle`` (see
    :meth:`Penalty.__getstate__`). ``copy.deepcopy`` copies the callable as it copies any (a
    function stays itself); ``pickle`` refuses one that cannot be pickled, a lambda or a local
    function, with a ``TypeError`` that says what to do instead."""

    __slots__ = ("fn", "owner")

    def __init__(self, fn: Callable[[int], float], owner: str) -> None:
        self.fn = fn
        self.owner = owner

    def __deepcopy__(self, memo: dict[int, Any]) -> _WeightInTransit:
        return _WeightInTransit(copy.deepcopy(self.fn, memo), self.owner)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        try:
            pickle.dumps(self.fn, protocol)
        except Exception as e:
            raise TypeError(
                f"{self.owner}: its weight, the {_describe_weight(self.fn)}, cannot be pickled "
                f"({type(e).__name__}: {e}), so neither can the penalty nor an optimizer that holds "
                "it. Give a weight defined at module level (not a lambda or a local function), or "
                "save optimizer.state_dict() instead (it records the weight by name) and build the "
                "penalty again with its weight before loading it. copy.deepcopy works with any "
                "weight."
            ) from None
        return (_WeightInTransit, (self.fn, self.owner))


def _describe_groups(groups: frozenset[str] | None) -> list[str] | None:
    return None if groups is None else sorted(groups)


def _flat_group(group: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(_ACC_DTYPE) for t in group])


class Penalty:
    """Base class: a penalty ``Ω`` on the groups of one level, scaled by ``lam`` (λ).

    ``lam`` is a finite real number >= 0; a 0-dim real tensor is read as its value. It may be
    changed between steps; an invalid value is refused with a ``TypeError`` or ``ValueError`` and
    the old one kept.

    Subclasses define

    * :attr:`l1_part`: the coefficient of the elementwise ``‖x‖₁`` part (soft-threshold ``eta·l1_part``),
      applied to every scalar of the level before any group shrink;
    * :meth:`group_scale`: the factor each group is multiplied by, from its squared norm;
    * :meth:`value`: the penalty's value, for logging and optimality certificates.

    ``groups`` (keyword, every penalty): the names of the groups of its level it applies to; the
    other groups of that level are not penalised by it. ``None`` (default): all of them.

    ``order`` says when the group scale is applied inside one proximal step: ``"tree"`` penalties
    are applied level by level from the finest level to the coarsest (the exact prox of a
    tree-structured sum of norms); ``"last"`` penalties (uniform decay) after all of them.
    """

    order: Literal["tree", "last"] = "tree"
    #: ``True`` if the penalty is convex (the optimality certificate applies).
    convex: bool = True

    def __init__(
        self,
        lam: float,
        weight: WeightSpec = "sqrt_size",
        *,
        groups: Collection[str] | None = None,
    ) -> None:
        self._name = type(self).__name__
        self.lam = lam
        self.weight = _check_weight(weight, self._name)
        self.groups = _check_groups(groups, self._name)

    # λ is read at every step, so a controller may change it during training.
    @property
    def lam(self) -> float:
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = check_lam(value, self._name)

    @property
    def l1_part(self) -> float:
        """Coefficient of the elementwise L1 part of the penalty."""
        return 0.0

    @property
    def has_group_part(self) -> bool:
        """Whether :meth:`group_scale` can differ from 1."""
        return True

    def weights(self, sizes: Sequence[int]) -> list[float]:
        return [group_weight(self.weight, n) for n in sizes]

    def group_scale(self, sq_norms: Tensor, eta: Tensor, weights: Tensor) -> Tensor:
        """Scale factor of each group, given its squared norm after the elementwise part."""
        raise NotImplementedError

    def value(self, groups: Sequence[Sequence[Tensor]]) -> Tensor:
        """``Ω(x)`` for the given groups (each a sequence of member tensors), as a float64 scalar."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The penalty's kind and options (checked on load) and its tunable values (loaded):
        ``{"kind", "weight", "groups", "lam"}``, plus ``"l1_ratio"`` for
        :class:`SparseGroupLasso` and the shape parameter (``"gamma"``, ``"a"``, ``"eps"``) for
        :class:`GroupMCP`, :class:`GroupSCAD`, :class:`GroupLogSum`. Plain data only (a callable weight is recorded by its
        qualified name), so ``torch.load(weights_only=True)`` reads it."""
        return {"kind": self._name, **self._options(), **self._tunables()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`; one of another kind, with other options or with invalid
        values is refused before anything changes."""
        for key, value in self._parse_state(state).items():
            setattr(self, key, value)

    def _options(self) -> dict[str, Any]:
        """What defines the penalty's objective besides its tunable values: fixed at
        construction, so a checkpoint must agree with them."""
        return {"weight": _describe_weight(self.weight), "groups": _describe_groups(self.groups)}

    def _tunables(self) -> dict[str, float]:
        """The values a checkpoint restores (a controller or the user may change them)."""
        return {"lam": self.lam}

    def _parse_state(self, state: object) -> dict[str, float]:
        """The checked tunable values of a :meth:`state_dict`, so that a caller can refuse it
        before loading anything. A state without ``"kind"`` (saved before kinds and options were
        recorded) is read for its values alone."""
        owner = f"{self._name}.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(
                f"{owner}: expected a mapping such as {self.state_dict()!r}, "
                f"got {type(state).__name__}."
            )
        if "lam" not in state:
            raise ValueError(f"{owner}: the state has no 'lam' (keys: {sorted(map(str, state))}).")
        if "kind" in state:
            if state["kind"] != self._name:
                raise ValueError(
                    f"{owner}: the state is of a {state['kind']!r} penalty, this one is a "
                    f"{self._name}; build the optimizer with the penalties it was saved with."
                )
            for key, mine in self._options().items():
                theirs = state.get(key, "<missing>")
                if theirs != mine:
                    raise ValueError(
                        f"{owner}: the state was saved with {key}={theirs!r}, this penalty has "
                        f"{key}={mine!r}; build the penalty with the options it was saved with."
                    )
        return {"lam": check_lam(state["lam"], self._name)}

    def __getstate__(self) -> dict[str, Any]:
        """The penalty's fields, for ``copy.deepcopy`` and ``pickle``. A callable weight that
        ``pickle`` cannot pickle (a lambda, a local function) is refused by ``pickle`` with a
        ``TypeError``; ``copy.deepcopy`` keeps any callable."""
        state = self.__dict__.copy()
        if callable(self.weight):
            state["weight"] = _WeightInTransit(self.weight, self._name)
        return state

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        weight = state.get("weight")
        if isinstance(weight, _WeightInTransit):
            state["weight"] = weight.fn
        self.__dict__.update(state)

    def _validate(self) -> None:
        """Check the fields again: they may have been set without the setters (``_lam``)."""
        check_lam(self._lam, self._name)

    def _extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = [e for e in (self._extra_repr(),) if e]
        if self.groups is not None:
            extra.append(f"groups=<{len(self.groups)} names>")
        return f"{self._name}(lam={self.lam:g}{''.join(', ' + e for e in extra)})"


def threshold(eta: Tensor, coef: float | Tensor) -> Tensor:
    """``τ = η·coef`` in float64, exactly 0 wherever ``η = 0``.

    ``coef`` (λ, or λ times the group weights) may be beyond the range of the parameters' dtype;
    formed in float64 with the weights before η, a product can overflow only to ``+inf`` (a
    threshold no group reaches, which is what such a λ means) and never gives ``0·inf = NaN``,
    so that a step of size 0 is the identity whatever λ is."""
    eta64 = eta.to(torch.float64)
    coef64 = coef.to(torch.float64) if isinstance(coef, Tensor) else coef
    return torch.where(eta64 > 0, eta64 * coef64, 0.0)


def _lasso_scale(sq_norms: Tensor, thresholds: Tensor) -> Tensor:
    # where() rather than clamp(1 - t/‖x‖): a zero group stays zero instead of producing NaN.
    norms = sq_norms.sqrt()
    return torch.where(norms > thresholds, 1.0 - thresholds / norms, torch.zeros_like(norms))


class GroupLasso(Penalty):
    r"""Group lasso: ``Ω(x) = λ Σ_g w_g ‖x_g‖₂``.

    Prox (block soft-thresholding), with threshold ``τ_g = eta·λ·w_g``::

        x_g ← max(0, 1 − τ_g / ‖x_g‖₂) · x_g

    A group whose norm is at most ``τ_g`` becomes exactly zero. In the earlier project's
    configuration language this is ``norm="L1", inner_norm="L2"``.
    """

    def group_scale(self, sq_norms: Tensor, eta: Tensor, weights: Tensor) -> Tensor:
        return _lasso_scale(sq_norms, threshold(eta, self.lam * weights.to(torch.float64)))

    def value(self, groups: Sequence[Sequence[Tensor]]) -> Tensor:
        total = torch.zeros((), dtype=_ACC_DTYPE)
        for g in groups:
            x = _flat_group(g)
            total = total + group_weight(self.weight, x.numel()) * torch.linalg.vector_norm(x).cpu()
        return self.lam * total

    def _extra_repr(self) -> str:
        return "" if self.weight == "sqrt_size" else f"weight={self.weight!r}"


class L1(Penalty):
    r"""Elementwise lasso: ``Ω(x) = λ ‖x‖₁`` over every scalar of the level.

    Prox (soft-thresholding), with threshold ``τ = eta·λ``::

        x ← sign(x) · max(0, |x| − τ)

    The grouping of the level does not matter. Seed configuration: ``norm="sum", inner_norm="L1"``.
    """

    def __init__(self, lam: float, *, groups: Collection[str] | None = None) -> None:
        super().__init__(lam, weight=1.0, groups=groups)

    @property
    def l1_part(self) -> float:
        return self.lam

    @property
    def has_group_part(self) -> bool:
        return False

    def group_scale(self, sq_norms: Tensor, eta: Tensor, weights: Tensor) -> Tensor:
        return torch.ones_like(sq_norms)

    def value(self, groups: Sequence[Sequence[Tensor]]) -> Tensor:
        total = torch.zeros((), dtype=_ACC_DTYPE)
        for g in groups:
            total = total + _flat_group(g).abs().sum().cpu()
        return self.lam * total


class SparseGroupLasso(Penalty):
    r"""Sparse group lasso: ``Ω(x) = λ (α ‖x‖₁ + (1 − α) Σ_g w_g ‖x_g‖₂)`` with ``α = l1_ratio``.

    Its exact prox is elementwise soft-thresholding at ``eta·λ·α`` followed by block
    soft-thresholding of the result at ``τ_g = eta·λ·(1 − α)·w_g``.
    """

    def __init__(
        self,
        lam: float,
        l1_ratio: float = 0.5,
        weight: WeightSpec = "sqrt_size",
        *,
        groups: Collection[str] | None = None,
    ) -> None:
        self.l1_ratio = l1_ratio
        super().__init__(lam, weight, groups=groups)

    @property
    def l1_ratio(self) -> float:
        return self._l1_ratio

    @l1_ratio.setter
    def l1_ratio(self, value: float) -> None:
        self._l1_ratio = _check_l1_ratio(value, "SparseGroupLasso")

    @property
    def l1_part(self) -> float:
        return self.lam * self.l1_ratio

    @property
    def has_group_part(self) -> bool:
        return self.l1_ratio < 1.0

    def group_scale(self, sq_norms: Tensor, eta: Tensor, weights: Tensor) -> Tensor:
        coef = self.lam * (1.0 - self.l1_ratio) * weights.to(torch.float64)
        return _lasso_scale(sq_norms, threshold(eta, coef))

    def value(self, groups: Sequence[Sequence[Tensor]]) -> Tensor:
        l1 = torch.zeros((), dtype=_ACC_DTYPE)
        gl = torch.zeros((), dtype=_ACC_DTYPE)
        for g in groups:
            x = _flat_group(g)
            l1 = l1 + x.abs().sum().cpu()
            gl = gl + group_weight(self.weight, x.numel()) * torch.linalg.vector_norm(x).cpu()
        return self.lam * (self.l1_ratio * l1 + (1.0 - self.l1_ratio) * gl)

    def _tunables(self) -> dict[str, float]:
        return {"lam": self.lam, "l1_ratio": self.l1_ratio}

    def _parse_state(self, state: object) -> dict[str, float]:
        parsed = super()._parse_state(state)
        assert isinstance(state, Mapping)  # checked by the base class
        if "l1_ratio" in state:
            parsed["l1_ratio"] = _check_l1_ratio(state["l1_ratio"], self._name)
        return parsed

    def _validate(self) -> None:
        super()._validate()
        _check_l1_ratio(self._l1_ratio, self._name)

    def _extra_repr(self) -> str:
        return f"l1_ratio={self.l1_ratio:g}"


class GroupDecay(Penalty):
    r"""Group weight decay: ``Ω(x) = ½ λ Σ_g ‖x_g‖₂²``.

    Prox: ``x ← x / (1 + eta·λ)``. It never produces zeros. Seed configuration:
    ``norm="L2", inner_norm="L2"``.

    Within one proximal step the decay is applied after all tree penalties. This is the exact
    prox of the sum whenever the decay covers each tree of the hierarchy uniformly (the usual case:
    decay on every filter, or on every parameter), because the prox of a positively homogeneous
    penalty commutes with uniform scaling; otherwise it is the standard composition.
    """

    order = "last"

    def __init__(self, lam: float, *, groups: Collection[str] | None = None) -> None:
        super().__init__(lam, weight=1.0, groups=groups)

    def group_scale(self, sq_norms: Tensor, eta: Tensor, weights: Tensor) -> Tensor:
        return (1.0 / (1.0 + threshold(eta, self.lam))).expand_as(sq_norms)

    def value(self, groups: Sequence[Sequence[Tensor]]) -> Tensor:
        total = torch.zeros((), dtype=_ACC_DTYPE)
        for g in groups:
            total = total + _flat_group(g).square().sum().cpu()
        return 0.5 * self.lam * total


class GroupL0(Penalty):
    r"""Group count: ``Ω(x) = λ Σ_g w_g · [x_g ≠ 0]`` (non-convex).

    Its exact prox is a hard threshold::

        x_g ← 0   if ½‖x_g‖₂² ≤ eta·λ·w_g,   else x_g unchanged

    With the default ``weight="size"`` (``w_g = n_g``), a group is removed when its mean square
    ``‖x_g‖²/n_g`` is at most ``2·eta·λ``, whatever its size. Combined with other levels, the hard
    threshold is applied at this level's place in the finest-to-coarsest order, to the values left by
    the finer levels; that composition is exact for an L0 level alone, not in general.
    """

    convex = False

    def __init__(
        self, lam: float, weight: WeightSpec = "size", *, groups: Collection[str] | None = None
    ) -> None:
        super().__init__(lam, weight, groups=groups)

    def group_scale(self, sq_norms: Tensor, eta: Tensor, weights: Tensor) -> Tensor:
        keep = 0.5 * sq_norms > threshold(eta, self.lam * weights.to(torch.float64))
        return keep.to(sq_norms.dtype)

    def value(self, groups: Sequence[Sequence[Tensor]]) -> Tensor:
        total = torch.zeros((), dtype=_ACC_DTYPE)
        for g in groups:
            x = _flat_group(g)
            if bool((x != 0).any()):
                total = total + group_weight(self.weight, x.numel())
        return self.lam * total

    def _extra_repr(self) -> str:
        return "" if self.weight == "size" else f"weight={self.weight!r}"


# --------------------------------------------------------------------------------------------
# Penalties that shrink large groups less than the group lasso (non-convex). Each is a function
# P(r) of the group norm r = ‖x_g‖₂, nondecreasing, so its prox is a scaling of the group by
# ρ/r with ρ the minimiser of the 1-D problem ½(ρ − r)² + eta·P(ρ) over ρ ∈ [0, r].


def _check_shape(value: object, owner: str, name: str, low: float, meaning: str) -> float:
    """A shape parameter as a float, refused unless it is finite and ``> low``."""
    number = _check_real(value, owner, name)
    if not (math.isfinite(number) and number > low):
        raise ValueError(
            f"{owner}: {name} must be finite and > {low:g} ({meaning}), got {number!r}."
        )
    return number


def _norms64(sq_norms: Tensor) -> Tensor:
    return sq_norms.to(torch.float64).sqrt()


def _ratio(rho: Tensor, norms: Tensor) -> Tensor:
    """``ρ/r`` in [0, 1], 0 for an empty group (no 0/0) and never above 1: the prox of a
    nondecreasing penalty of the norm never lengthens a group, rounding included."""
    safe = torch.where(norms > 0, norms, 1.0)
    return torch.where(norms > 0, rho / safe, 0.0).clamp(0.0, 1.0)


def _mcp(norms: Tensor, lam_w: Tensor, gamma: float) -> Tensor:
    inner = lam_w * norms - norms.square() / (2.0 * gamma)
    return torch.where(norms <= gamma * lam_w, inner, 0.5 * gamma * lam_w.square())


def _scad(norms: Tensor, lam_w: Tensor, a: float) -> Tensor:
    middle = (2.0 * a * lam_w * norms - norms.square() - lam_w.square()) / (2.0 * (a - 1.0))
    outer = 0.5 * (a + 1.0) * lam_w.square()
    return torch.where(
        norms <= lam_w, lam_w * norms, torch.where(norms <= a * lam_w, middle, outer)
    )


def _log_sum(norms: Tensor, lam_w: Tensor, eps: float) -> Tensor:
    return lam_w * torch.log1p(norms / eps)


class _ShapedPenalty(Penalty):
    """A non-convex penalty ``λ Σ_g P(‖x_g‖₂)`` with one shape parameter besides λ (MCP's
    ``gamma``, SCAD's ``a``, log-sum's ``eps``). The shape parameter is tunable like λ: set
    through its property (an invalid value is refused and the old one kept), saved by
    :meth:`state_dict` and restored by :meth:`load_state_dict`."""

    convex = False
    #: name of the shape parameter (its property; the value lives in ``_<name>``).
    _shape: str = ""

    def __init__(
        self,
        lam: float,
        shape: float,
        weight: WeightSpec = "sqrt_size",
        *,
        groups: Collection[str] | None = None,
    ) -> None:
        super().__init__(lam, weight, groups=groups)
        setattr(self, self._shape, shape)

    def _check(self, value: object) -> float:
        raise NotImplementedError

    def _norm_penalty(self, norms: Tensor, lam_w: Tensor) -> Tensor:
        """``λ·P(r)`` elementwise, for float64 norms ``r`` and ``λ·w_g``."""
        raise NotImplementedError

    def value(self, groups: Sequence[Sequence[Tensor]]) -> Tensor:
        if not groups:
            return torch.zeros((), dtype=_ACC_DTYPE)
        norms = torch.stack([torch.linalg.vector_norm(_flat_group(g)).cpu() for g in groups])
        sizes = [sum(t.numel() for t in g) for g in groups]
        lam_w = self.lam * torch.tensor(self.weights(sizes), dtype=_ACC_DTYPE)
        # An empty group costs 0, also where λ·w_g overflows (no inf·0).
        return torch.where(norms > 0, self._norm_penalty(norms, lam_w), 0.0).sum()

    def _tunables(self) -> dict[str, float]:
        return {"lam": self.lam, self._shape: getattr(self, self._shape)}

    def _parse_state(self, state: object) -> dict[str, float]:
        parsed = super()._parse_state(state)
        assert isinstance(state, Mapping)  # checked by the base class
        if self._shape not in state:
            raise ValueError(
                f"{self._name}.load_state_dict: the state has no {self._shape!r} "
                f"(keys: {sorted(map(str, state))}); pass a state saved by a {self._name}."
            )
        parsed[self._shape] = self._check(state[self._shape])
        return parsed

    def _validate(self) -> None:
        super()._validate()
        self._check(getattr(self, "_" + self._shape))

    def _extra_repr(self) -> str:
        extra = f"{self._shape}={getattr(self, self._shape):g}"
        if self.weight != "sqrt_size":
            extra += f", weight={self.weight!r}"
        return extra


class GroupMCP(_ShapedPenalty):
    r"""Group minimax concave penalty (Zhang 2010; Breheny and Huang 2015), non-convex:
    ``Ω(x) = Σ_g P(‖x_g‖₂)`` with, for ``r ≥ 0``,

    .. code-block:: text

        P(r) = λw_g·r − r²/(2γ)    if r ≤ γλw_g
             = γλ²w_g²/2           otherwise

    The group lasso's slope ``λw_g`` at 0, decreasing linearly to 0 at the knee ``r = γλw_g``: a
    group with norm above the knee is not shrunk at all. ``γ → ∞`` is :class:`GroupLasso`.

    ``gamma`` (γ > 0) is in the units of the step size ``eta`` (it is the inverse of the
    penalty's negative curvature). Breheny and Huang's ``γ > 1`` is the case ``eta = 1`` of the
    condition ``eta < γ`` for the prox to be unique; their default 3 is the default here. The
    penalty itself does not depend on ``eta``, so the objective stays the same under a
    learning-rate schedule, and the prox below is exact at every step size. With
    ``τ = eta·λ·w_g`` and ``r = ‖x_g‖₂``:

    * ``eta < γ`` (the firm threshold, unique)::

          x_g ← 0                                 if r ≤ τ
          x_g ← (1 − τ/r)/(1 − eta/γ) · x_g       if τ < r ≤ γλw_g
          x_g ← x_g                               if r > γλw_g

    * ``eta ≥ γ`` (the 1-D problem is concave on [0, γλw_g], so its minimiser is 0 or r): a hard
      threshold, ``x_g ← 0`` if ``r ≤ sqrt(eta·γ)·λw_g``, else ``x_g`` unchanged (at equality both
      are minimisers; 0 is taken).

    Combined with other levels, the prox is applied at this level's place in the
    finest-to-coarsest order to the values left by the finer levels; for a non-convex penalty
    that composition is the exact prox of one level alone, not of the sum of the levels.
    """

    _shape = "gamma"

    def __init__(
        self,
        lam: float,
        gamma: float = 3.0,
        weight: WeightSpec = "sqrt_size",
        *,
        groups: Collection[str] | None = None,
    ) -> None:
        super().__init__(lam, gamma, weight, groups=groups)

    @property
    def gamma(self) -> float:
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        self._gamma = self._check(value)

    def _check(self, value: object) -> float:
        return _check_shape(
            value,
            self._name,
            "gamma",
            0.0,
            "the knee is at gamma·lam·w_g, and the prox is unique for steps eta < gamma; 3.0 is "
            "the usual choice, and GroupLasso is the limit of a large gamma",
        )

    def _norm_penalty(self, norms: Tensor, lam_w: Tensor) -> Tensor:
        return _mcp(norms, lam_w, self.gamma)

    def group_scale(self, sq_norms: Tensor, eta: Tensor, weights: Tensor) -> Tensor:
        gamma = self.gamma
        r = _norms64(sq_norms)
        eta64 = eta.to(torch.float64)
        lam_w = self.lam * weights.to(torch.float64)
        tau = threshold(eta, lam_w)
        knee = gamma * lam_w
        ramp = (1.0 - tau / torch.where(r > 0, r, 1.0)) / (1.0 - eta64 / gamma)
        firm = torch.where(r <= tau, 0.0, torch.where(r > knee, 1.0, ramp))
        # eta ≥ γ > 0, so τ > 0 unless λw_g = 0, and then the knee is 0 too: no 0·inf here.
        hard = (r > tau.sqrt() * knee.sqrt()).to(torch.float64)
        return torch.where(eta64 < gamma, firm, hard).clamp(0.0, 1.0)


class GroupSCAD(_ShapedPenalty):
    r"""Group smoothly clipped absolute deviation (Fan and Li 2001, on group norms), non-convex:
    ``Ω(x) = Σ_g P(‖x_g‖₂)`` with, writing ``c = λw_g`` and ``r ≥ 0``,

    .. code-block:: text

        P(r) = c·r                              if r ≤ c
             = (2a·c·r − r² − c²)/(2(a − 1))    if c < r ≤ a·c
             = (a + 1)·c²/2                     otherwise

    The group lasso's slope ``c`` up to ``r = c``, decreasing linearly to 0 at ``r = a·c``: a group
    with norm above ``a·λw_g`` is not shrunk at all.

    ``a > 1`` (Fan and Li's 3.7 by default) is Fan and Li's, whose form assumes a loss of unit
    curvature: the knees ``λw_g`` and ``a·λw_g`` are in the units of the norms. The penalty does not
    depend on the step, and the prox below is exact at every step size ``eta``. With
    ``τ = eta·λ·w_g`` and ``r = ‖x_g‖₂``:

    * ``eta < a − 1`` (unique; Fan and Li's ``a > 2`` is the case ``eta = 1``)::

          x_g ← max(0, 1 − τ/r) · x_g                       if r ≤ c + τ   (soft threshold)
          x_g ← ((a − 1) − a·τ/r)/(a − 1 − eta) · x_g       if c + τ < r ≤ a·c
          x_g ← x_g                                         if r > a·c

    * ``eta ≥ a − 1`` (the middle piece of the 1-D problem is concave): the minimiser is the
      better of ``ρ₁ = min(max(r − τ, 0), c)`` (the minimiser over ``[0, c]``) and ``r`` (possible
      only if ``r > a·c``), compared by ``½(ρ − r)² + eta·P(ρ)``; a tie takes ``ρ₁``.

    Combined with other levels, the prox is applied at this level's place in the
    finest-to-coarsest order to the values left by the finer levels; for a non-convex penalty
    that composition is the exact prox of one level alone, not of the sum of the levels.
    """

    _shape = "a"

    def __init__(
        self,
        lam: float,
        a: float = 3.7,
        weight: WeightSpec = "sqrt_size",
        *,
        groups: Collection[str] | None = None,
    ) -> None:
        super().__init__(lam, a, weight, groups=groups)

    @property
    def a(self) -> float:
        return self._a

    @a.setter
    def a(self, value: float) -> None:
        self._a = self._check(value)

    def _check(self, value: object) -> float:
        return _check_shape(
            value,
            self._name,
            "a",
            1.0,
            "the penalty's slope falls from lam·w_g to 0 between the norms lam·w_g and a·lam·w_g, "
            "and the prox is unique for steps eta < a - 1; 3.7 is the usual choice",
        )

    def _norm_penalty(self, norms: Tensor, lam_w: Tensor) -> Tensor:
        return _scad(norms, lam_w, self.a)

    def group_scale(self, sq_norms: Tensor, eta: Tensor, weights: Tensor) -> Tensor:
        a = self.a
        r = _norms64(sq_norms)
        eta64 = eta.to(torch.float64)
        c = self.lam * weights.to(torch.float64)
        tau = threshold(eta, c)
        inv_r = 1.0 / torch.where(r > 0, r, 1.0)
        soft = torch.where(r > tau, 1.0 - tau * inv_r, 0.0)
        middle = ((a - 1.0) - a * tau * inv_r) / (a - 1.0 - eta64)
        unique = torch.where(r <= c + tau, soft, torch.where(r <= a * c, middle, 1.0))
        # Non-convex middle: the better of ρ₁ (the prox over [0, c]) and r (over [a·c, ∞)).
        rho1 = torch.minimum((r - tau).clamp(min=0.0), c)
        f1 = 0.5 * (rho1 - r).square() + torch.where(rho1 > 0, tau * rho1, 0.0)
        f3 = 0.5 * (a + 1.0) * tau * c
        keep = (r > a * c) & (f3 < f1)
        compared = torch.where(keep, 1.0, _ratio(rho1, r))
        return torch.where(eta64 < a - 1.0, unique, compared).clamp(0.0, 1.0)


class GroupLogSum(_ShapedPenalty):
    r"""Group log-sum penalty, non-convex: ``Ω(x) = λ Σ_g w_g log(1 + ‖x_g‖₂/ε)``, ``ε > 0``.

    Its slope ``λw_g/(‖x_g‖₂ + ε)`` is the weight of the adaptive (iteratively reweighted) group
    lasso with reference norms ``‖x_g‖₂`` (Candès, Wakin and Boyd 2008). Near 0 it is the slope of
    ``GroupLasso(λ/ε)``, so small groups are zeroed as by that group lasso, but a group of norm
    ``r`` is shrunk by about ``eta·λw_g/(r + ε)``, ``ε/(r + ε)`` times the group lasso's
    ``eta·λw_g/ε``. (λ here has the units of the loss, not of loss per norm.) Here the weights are not
    frozen at a reference point: the prox below is the exact prox of the log-sum penalty itself,
    the reweighting done in closed form at every step, from the very norms being thresholded.
    (For frozen reference norms the prox would be group soft-thresholding with the weights
    ``w_g/(‖x_g‖_ref + ε)``.)

    Prox, with ``τ = eta·λ·w_g`` and ``r = ‖x_g‖₂``: the stationary points ``ρ > 0`` of
    ``½(ρ − r)² + τ·log(1 + ρ/ε)`` solve ``ρ² − (r − ε)ρ + τ − rε = 0``; the larger root

    .. code-block:: text

        ρ₊ = ((r − ε) + sqrt((r + ε)² − 4τ)) / 2

    is the local minimum. ``x_g ← (ρ₊/r)·x_g`` if the root is real, ``ρ₊ > 0`` and
    ``½(ρ₊ − r)² + τ·log(1 + ρ₊/ε) < ½r²`` (the value at 0), else ``x_g ← 0`` (a tie takes 0).
    For ``τ ≤ ε²`` the problem is convex and this is ``ρ₊`` exactly when ``r > τ/ε``; for larger
    ``τ`` the prox jumps from 0 to ``ρ₊``.

    ``eps`` (in the units of the norms) is required: it sets where the shrinkage starts to fade.

    Combined with other levels, the prox is applied at this level's place in the
    finest-to-coarsest order to the values left by the finer levels; for a non-convex penalty
    that composition is the exact prox of one level alone, not of the sum of the levels.
    """

    _shape = "eps"

    def __init__(
        self,
        lam: float,
        eps: float,
        weight: WeightSpec = "sqrt_size",
        *,
        groups: Collection[str] | None = None,
    ) -> None:
        super().__init__(lam, eps, weight, groups=groups)

    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self._eps = self._check(value)

    def _check(self, value: object) -> float:
        return _check_shape(
            value,
            self._name,
            "eps",
            0.0,
            "a group norm: the shrinkage of a group fades once its norm is well above eps; "
            "give about a tenth of a typical group norm",
        )

    def _norm_penalty(self, norms: Tensor, lam_w: Tensor) -> Tensor:
        return _log_sum(norms, lam_w, self.eps)

    def group_scale(self, sq_norms: Tensor, eta: Tensor, weights: Tensor) -> Tensor:
        eps = self.eps
        r = _norms64(sq_norms)
        tau = threshold(eta, self.lam * weights.to(torch.float64))
        disc = (r + eps).square() - 4.0 * tau
        root = disc.clamp(min=0.0).sqrt()
        # The larger root without cancellation: (r − ε + √D)/2 for r ≥ ε, else
        # 2(rε − τ)/(ε − r + √D) (the product of the roots is τ − rε).
        rho = torch.where(
            r >= eps, 0.5 * ((r - eps) + root), 2.0 * (r * eps - tau) / ((eps - r) + root)
        )
        # f(ρ) − f(0) = ρ(ρ/2 − r) + τ·log(1 + ρ/ε), written without the r² that cancels.
        gain = rho * (0.5 * rho - r) + torch.where(tau > 0, tau * torch.log1p(rho / eps), 0.0)
        keep = (disc >= 0) & (rho > 0) & (gain < 0)
        return torch.where(tau == 0, 1.0, torch.where(keep, _ratio(rho, r), 0.0))
