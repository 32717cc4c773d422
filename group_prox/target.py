"""SparsityTarget: drive each level's λ to a requested fraction of exactly-zero groups.

A user knows the sparsity they want, not the λ that gives it; and the zero fraction of group lasso
is a steep function of λ (a few percent more λ can take a level from no zero group to most of
them). :class:`SparsityTarget` measures the fraction of zero groups of each targeted level and
adjusts that level's λ by small multiplicative steps so that the fraction follows a smooth
schedule: no shrinkage during a warm-up, a ramp to the target, a hold, and optionally a final
phase with the zero pattern frozen while the surviving weights recover.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from .checksums import checksums_of, first_mismatch
from .optim import ProxAdam, ProxSGD
from .penalties import GroupLasso, Penalty, SparseGroupLasso, check_lam
from .selection import families, family_medians, smallest_first

__all__ = ["SparsityTarget"]

_RAMPS = ("cubic", "linear", "cosine")
#: The version of :meth:`SparsityTarget.state_dict`; a state without ``"format"`` was saved before
#: versions and checksums were recorded and is read with the other checks alone.
TARGET_FORMAT = "group_prox.sparsity_target/2"


class SparsityTarget:
    r"""Adjust the λ of each targeted level so that its fraction of exactly-zero groups reaches a
    requested value by a given step, then hold it; optionally freeze the zero pattern at the end.

    Use it like a learning-rate scheduler: call :meth:`step` once after every
    ``optimizer.step()``::

        opt = gp.ProxSGD(model.parameters(), lr=0.1, momentum=0.9, hierarchy=h,
                         penalties={"base_level": gp.GroupLasso(0.0), "layer": gp.GroupLasso(0.0)})
        target = gp.SparsityTarget(opt, {"base_level": 0.6, "layer": 0.25},
                                   warmup_steps=200, reach_step=2000, freeze_step=3000)
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward()
            opt.step(); scheduler.step(); target.step()

    **Phases**, counted in calls of :meth:`step` (``t`` = steps taken so far):

    * *warm-up*, ``t < warmup_steps``: every targeted λ is 0 (no shrinkage; the optimizer is its
      torch counterpart on those levels).
    * *ramp*, ``warmup_steps ≤ t < reach_step``: the wanted fraction of level ``L`` rises from 0
      to its target ``T_L`` along ``s(u)``, ``u = (t − warmup_steps)/(reach_step −
      warmup_steps)``: ``"cubic"`` ``T(1 − (1 − u)³)`` (fast while the network is redundant,
      gentle at the end), ``"linear"`` ``T·u`` or ``"cosine"`` ``T(1 − cos πu)/2``.
    * *hold*, ``reach_step ≤ t < freeze_step``: the wanted fraction stays ``T_L``.
    * *frozen*, ``t ≥ freeze_step`` (if given): the zero pattern is frozen with
      :meth:`ProxSGD.freeze_zero_groups <group_prox.ProxSGD.freeze_zero_groups>`: zero groups stay
      exactly zero and nothing else is shrunk while the surviving weights recover. With
      ``snap=True`` a level still short of its target at that moment first has its least
      salient groups (as in Selection below) set to zero, so that it freezes at the target.

    **Control.** At each update, for each level:

    1. *Selection.* The penalty acts only on the groups that the schedule wants zero
       ``lookahead`` steps from now: the exactly-zero groups first, then those of smallest
       saliency ``‖x_g‖ / (w_g·m_f)``, where ``m_f`` is the median of that ratio over the group's
       *family* (the groups whose first scalar lies in the same tensor, e.g. the filters of one
       conv) when the ramp began, so that layers initialised at different scales compete fairly.
       No family gives more than its share allowed by ``spread`` (below) and none is emptied.
       The other groups get weight 0 (the prox stays exact for this reweighted group lasso). Only
       selected groups can be zeroed, so the zero count cannot overshoot the schedule, and each
       selected group fades over those steps instead of vanishing at once; its shrinkage keeps it
       selected.
    2. *λ.* ``λ ← λ·exp(clip(gain·e, −max_change/4, max_change))`` per step, with ``e`` the
       wanted minus the actual fraction of zero groups (in whole groups: a level of 4 branches
       wants its first zero branch once ``4s`` rounds to 1). λ never jumps; it rises while the
       selected groups lag behind the schedule, and slowly falls back when a coarser level zeroed
       more than asked. The first λ is set from the group norms, so that the shrinkage alone
       would zero the target quantile over the ramp,
       ``λ₀ = quantile_T(‖x_g‖/(η w_g)) / (reach_step − warmup_steps)``; the controller is thus
       indifferent to the scale of λ (ProxSGD and ProxAdam need λs orders of magnitude apart).
       ``η`` is the prox step size of the step (the current lr), so LR schedulers are followed.

    Args:
        optimizer: a :class:`~group_prox.ProxSGD` or :class:`~group_prox.ProxAdam` with a hierarchy
            and a ``GroupLasso`` or ``SparseGroupLasso`` penalty on every targeted level; their
            ``lam`` is overwritten (start them at 0).
        targets: ``{level: fraction}``, the fraction of the level's groups (those its penalty
            covers) that should be exactly zero, in ``[0, 1)``.
        reach_step: the step by which the targets are reached (end of the ramp).
        warmup_steps: steps without shrinkage on the targeted levels.
        freeze_step: the step at which the zero pattern is frozen (``None``: never).
        ramp: shape of the ramp, ``"cubic"`` (default), ``"linear"`` or ``"cosine"``.
        update_every: measure and adjust every this many steps (the measurement reads every
            tensor once, like one prox step).
        gain: log-λ change per step per unit of fraction error.
        max_change: the largest log-λ rise per step (λ grows at most by ``e^max_change``);
            default ``max(0.02, 4 / (reach_step − warmup_steps))``.
        lookahead: how many steps ahead of the schedule groups are selected (default: a tenth
            of the ramp).
        spread: how unevenly a level's zeros may fall on its families (the convs): at a wanted
            fraction ``s`` no family has more than ``s + spread·(1 − s)`` of its groups
            selected, and none is emptied. 0 (default) prunes every layer by the same fraction,
            like per-layer magnitude pruning, which proved the most robust (with ProxAdam above
            all); larger values let the saliency move zeros to the redundant layers, 1 lets it
            alone decide.
        snap: at ``freeze_step``, top a level up to its target by zeroing its smallest groups.

    **Copies.** ``copy.deepcopy`` and ``pickle`` carry the whole controller, with its optimizer:
    copied together (``copy.deepcopy((model, opt, target))``), the copy drives the copied
    optimizer and continues bit for bit as the original would (see
    :meth:`ProxSGD.__getstate__ <group_prox.ProxSGD.__getstate__>` for what is refused).

    Raises:
        TypeError: if ``optimizer`` is not a group_prox optimizer, or a target is not a number.
        ValueError: for a level without a suitable penalty, a fraction outside ``[0, 1)``, or
            steps out of order; each message names what to change.
    """

    def __init__(
        self,
        optimizer: ProxSGD | ProxAdam,
        targets: Mapping[str, float],
        *,
        reach_step: int,
        warmup_steps: int = 0,
        freeze_step: int | None = None,
        ramp: Literal["cubic", "linear", "cosine"] = "cubic",
        update_every: int = 1,
        gain: float = 2.0,
        max_change: float | None = None,
        lookahead: int | None = None,
        spread: float = 0.0,
        snap: bool = True,
    ) -> None:
        self.optimizer = optimizer
        self.targets = _check_targets(optimizer, targets)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        self.reach_step = _check_int("reach_step", reach_step, self.warmup_steps + 1)
        if freeze_step is not None:
            freeze_step = _check_int("freeze_step", freeze_step, self.reach_step)
        self.freeze_step = freeze_step
        if not isinstance(ramp, str):
            raise TypeError(
                f"SparsityTarget: ramp must be one of {_RAMPS}, got {type(ramp).__name__}."
            )
        if ramp not in _RAMPS:
            raise ValueError(f"SparsityTarget: ramp must be one of {_RAMPS}, got {ramp!r}.")
        self.ramp = ramp
        self.update_every = _check_int("update_every", update_every, 1)
        self.gain = _check_positive("gain", gain)
        # Short ramps need λ to move faster: e^4 ≈ 55× over the ramp at least.
        self.max_change = (
            max(0.02, 4.0 / (self.reach_step - self.warmup_steps))
            if max_change is None
            else _check_positive("max_change", max_change)
        )
        ramp_steps = self.reach_step - self.warmup_steps
        self.lookahead = (
            max(1, ramp_steps // 10) if lookahead is None else _check_int("lookahead", lookahead, 0)
        )
        if isinstance(spread, bool) or not isinstance(spread, numbers.Real):
            raise TypeError(
                f"SparsityTarget: spread must be a number, got {type(spread).__name__}."
            )
        if not 0.0 <= spread <= 1.0:
            raise ValueError(f"SparsityTarget: spread must be in [0, 1], got {spread}.")
        self.spread = float(spread)
        if not isinstance(snap, bool):
            raise TypeError(f"SparsityTarget: snap must be True or False, got {snap!r}.")
        self.snap = snap
        prox = optimizer.prox
        assert prox is not None  # checked in _check_targets
        self._prox = prox
        plan = self._plan = prox.plan
        self._level_index = {lp.name: i for i, lp in enumerate(plan.levels)}
        # The share of λ that thresholds group norms (1 − l1_ratio for a sparse group lasso).
        self._group_share = {
            lv: 1.0 - getattr(optimizer.penalties[lv], "l1_ratio", 0.0) for lv in self.targets
        }
        self.step_count = 0
        #: λ of each level once the ramp has begun (``None`` before its first update).
        self.lam: dict[str, float | None] = {lv: None for lv in self.targets}
        #: the last measured fraction of exactly-zero groups of each level.
        self.zero_fraction: dict[str, float] = {lv: 0.0 for lv in self.targets}
        self._families = {lv: families(plan, self._level_index[lv]) for lv in self.targets}
        self._family_ref: dict[str, Tensor] = {}
        #: the groups of each level the penalty currently acts on (in covered-group order).
        self.selected: dict[str, Tensor] = {}
        self._set_lams(0.0)

    # ------------------------------------------------------------------------------ schedule
    @property
    def phase(self) -> str:
        """``"warmup"``, ``"ramp"``, ``"hold"`` or ``"frozen"`` for the next step."""
        t = self.step_count
        if self.freeze_step is not None and t >= self.freeze_step:
            return "frozen"
        if t < self.warmup_steps:
            return "warmup"
        return "ramp" if t < self.reach_step else "hold"

    def wanted(self, level: str, step: int | None = None) -> float:
        """The scheduled fraction of zero groups of ``level`` at ``step`` (default: now)."""
        t = self.step_count if step is None else step
        target = self.targets[level]
        if t < self.warmup_steps:
            return 0.0
        u = min(1.0, (t - self.warmup_steps) / (self.reach_step - self.warmup_steps))
        if self.ramp == "cubic":
            return target * (1.0 - (1.0 - u) ** 3)
        if self.ramp == "cosine":
            return target * (1.0 - math.cos(math.pi * u)) / 2.0
        return target * u

    # ---------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> None:
        """Account for one optimizer step and set the λs for the next one."""
        self.step_count += 1
        t = self.step_count
        if self.optimizer.frozen:
            return
        if self.freeze_step is not None and t >= self.freeze_step:
            self._freeze()
            return
        if t < self.warmup_steps:
            return
        due = (t - self.warmup_steps) % self.update_every == 0
        if not due and all(lam is not None for lam in self.lam.values()):
            return
        self._update(self.update_every)

    def _measure(self, levels: list[str] | None = None) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Per targeted level (or per level of ``levels``): norms ÷ weights of its covered groups,
        their prox step sizes, and whether each is exactly zero."""
        levels = list(self.targets) if levels is None else levels
        plan = self._plan
        _, level_sq = self._prox.group_sq_norms()
        eta = self.optimizer.prox_step_sizes().cpu()
        out = {}
        for level in levels:
            i = self._level_index[level]
            lp = plan.levels[i]
            covered = lp.covered.to(level_sq[i].device)
            norm = level_sq[i][covered].sqrt().cpu()
            weights = plan.base_weights(i)[lp.covered].to(norm.dtype)
            eta_g = eta.to(norm.dtype)[lp.group_component[lp.covered]]
            out[level] = (norm / (weights * self._group_share[level]), eta_g, norm == 0)
        return out

    def _update(self, steps: int) -> None:
        lead = self.step_count + self.lookahead
        for level, (rel_norm, eta, zero) in self._measure().items():
            n = zero.numel()
            self.zero_fraction[level] = float(zero.double().mean()) if n else 0.0
            # In counts: a level of 4 branches wants its first zero branch once s·4 rounds to 1.
            wanted = round(self.wanted(level) * n)
            ahead = self.wanted(level, lead)
            k = round(ahead * n)
            selected = torch.zeros(n, dtype=torch.bool)
            selected[self._smallest_first(level, rel_norm, zero, ahead)[:k]] = True
            lam = self.lam[level]
            if not bool((eta > 0).any()):
                # lr = 0 (a warm-up from 0, a paused schedule): the prox cannot act, so neither
                # the zeros nor the lag say anything about λ. Hold it (calibrate later).
                self._select(level, selected)
                continue
            if lam is None:
                lam = self._initial_lam(level, rel_norm, eta)
            else:
                error = (wanted - int(zero.sum())) / max(n, 1)
                # Falling behind raises λ at up to max_change per step; being ahead (zeros
                # from a coarser level) lowers it four times slower, keeping the pressure.
                change = max(-self.max_change / 4, min(self.max_change, self.gain * error))
                lam *= math.exp(change * steps)
            self.lam[level] = lam
            self.optimizer.penalties[level].lam = lam
            self._select(level, selected)

    def _smallest_first(
        self, level: str, rel_norm: Tensor, zero: Tensor, fraction: float
    ) -> Tensor:
        """Covered groups of ``level`` that may be zeroed at ``fraction`` of the level, least
        salient first (see :func:`group_prox.selection.smallest_first`), each family's groups
        measured against its median ‖x_g‖/w_g when the ramp began (fixed then: a median of the
        live groups would keep declaring half of a family's survivors small, and empty it)."""
        family = self._families[level]
        if family is not None and level not in self._family_ref:
            self._family_ref[level] = family_medians(rel_norm, family)
        return smallest_first(
            rel_norm, zero, fraction, family, self._family_ref.get(level), self.spread
        )

    def _select(self, level: str, selected: Tensor) -> None:
        i = self._level_index[level]
        lp = self._plan.levels[i]
        mult = torch.zeros(lp.num_groups, dtype=torch.float64)
        mult[torch.nonzero(lp.covered).flatten()[selected]] = 1.0
        self._plan.set_group_multipliers(i, mult)
        self.selected[level] = selected

    def _initial_lam(self, level: str, rel_norm: Tensor, eta: Tensor) -> float:
        """A first λ from the group norms and step sizes (some ``eta > 0``): the level's
        target quantile of ‖x_g‖/(w_g·η_g), spread over the ramp."""
        alive = eta > 0
        ratio = (rel_norm / eta.clamp_min(torch.finfo(eta.dtype).tiny))[alive]
        q = float(torch.quantile(ratio, min(max(self.targets[level], 0.05), 0.95)))
        return q / max(1, self.reach_step - self.warmup_steps)

    def _freeze(self) -> None:
        if self.snap:
            self._snap_to_targets()
        for level in self.targets:
            self.optimizer.penalties[level].lam = 0.0
            self._plan.set_group_multipliers(self._level_index[level], None)
        self.optimizer.freeze_zero_groups()

    def _snap_to_targets(self) -> None:
        """Zero the least salient groups of each level still short of its target, coarsest
        first (a zero branch zeroes its filters too)."""
        plan = self._plan
        for level in sorted(self.targets, key=self._level_index.__getitem__, reverse=True):
            # Measured again per level: a zero branch has zeroed filters of the finer level.
            rel_norm, _, zero = self._measure([level])[level]
            have = int(zero.sum())
            short = round(self.targets[level] * zero.numel()) - have
            if short <= 0:
                continue
            doomed = self._smallest_first(level, rel_norm, zero, self.targets[level])[
                have : have + short
            ]
            i = self._level_index[level]
            dead = torch.zeros(plan.levels[i].num_groups, dtype=torch.bool)
            dead[torch.nonzero(plan.levels[i].covered).flatten()[doomed]] = True
            self._prox.zero_groups_(level, dead)

    def _set_lams(self, value: float) -> None:
        for level in self.targets:
            self.optimizer.penalties[level].lam = value

    # ---------------------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """The controller's state (step count; per level λ, last measured fraction, selected
        groups and family scales), its settings, its format version and a checksum of each of
        its tensors, which :meth:`load_state_dict` checks."""
        selected = {lv: sel.clone() for lv, sel in self.selected.items()}
        family_ref = {lv: ref.clone() for lv, ref in self._family_ref.items()}
        return {
            "format": TARGET_FORMAT,
            "step_count": self.step_count,
            "lam": dict(self.lam),
            "zero_fraction": dict(self.zero_fraction),
            "selected": selected,
            "family_ref": family_ref,
            "settings": self._settings(),
            "checksums": checksums_of(_target_tensors(selected, family_ref)),
        }

    def _settings(self) -> dict[str, Any]:
        return {
            "targets": dict(self.targets),
            "warmup_steps": self.warmup_steps,
            "reach_step": self.reach_step,
            "freeze_step": self.freeze_step,
            "ramp": self.ramp,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`. One saved with other targets or steps, or a damaged one, is
        refused before anything changes. Load the optimizer's state dict as well: it holds the
        frozen pattern."""
        owner = "SparsityTarget.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(
                f"{owner}: expected the dict returned by SparsityTarget.state_dict(), "
                f"got {type(state).__name__}."
            )
        keys = ("step_count", "lam", "zero_fraction", "selected", "family_ref", "settings")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(
                f"{owner}: the state has no {', '.join(map(repr, missing))}; pass the dict "
                "returned by SparsityTarget.state_dict()."
            )
        version = state.get("format")
        if version is not None and version != TARGET_FORMAT:
            raise ValueError(
                f"{owner}: the state has format {version!r}; this version of group_prox reads "
                f"{TARGET_FORMAT!r} and states saved before formats were recorded."
            )
        saved, mine = state["settings"], self._settings()
        if saved != mine:
            raise ValueError(
                f"{owner}: the checkpoint was saved with {saved!r}, this controller has {mine!r}; "
                "build it with the same settings."
            )
        step_count = state["step_count"]
        if isinstance(step_count, bool) or not isinstance(step_count, numbers.Integral):
            raise TypeError(f"{owner}: step_count must be an int, got {step_count!r}.")
        if step_count < 0:
            raise ValueError(f"{owner}: step_count must be an int >= 0, got {step_count!r}.")
        lam = _check_per_level(owner, "lam", state["lam"], self.targets, exact=True)
        for level, value in lam.items():
            if value is not None:
                # The penalty's own check, so that loading cannot fail half-way.
                lam[level] = check_lam(value, f"{owner}: lam of level {level!r}")
        fractions = _check_per_level(
            owner, "zero_fraction", state["zero_fraction"], self.targets, exact=True
        )
        for level, frac in fractions.items():
            if isinstance(frac, bool) or not isinstance(frac, numbers.Real):
                raise TypeError(
                    f"{owner}: zero_fraction of level {level!r} must be a number, got {frac!r}."
                )
            if not 0 <= frac <= 1:
                raise ValueError(
                    f"{owner}: zero_fraction of level {level!r} must be a number in [0, 1], "
                    f"got {frac!r}."
                )
        selected = _check_per_level(owner, "selected", state["selected"], self.targets)
        for level, sel in selected.items():
            n = int(self._plan.levels[self._level_index[level]].covered.sum())
            if not isinstance(sel, Tensor) or sel.dtype != torch.bool or sel.shape != (n,):
                raise (ValueError if isinstance(sel, Tensor) else TypeError)(
                    f"{owner}: the selected groups of level {level!r} must be a bool tensor of "
                    f"{n} entries (one per group its penalty covers), got {_describe(sel)}."
                )
        family_ref = _check_per_level(owner, "family_ref", state["family_ref"], self.targets)
        for level, ref in family_ref.items():
            family = self._families[level]
            n = 0 if family is None else int(family.max()) + 1
            if not isinstance(ref, Tensor) or not ref.is_floating_point() or ref.shape != (n,):
                raise (ValueError if isinstance(ref, Tensor) else TypeError)(
                    f"{owner}: the family scales of level {level!r} must be a float tensor of "
                    f"{n} entries (one per tensor its groups start in), got {_describe(ref)}."
                )
        if version is not None:
            sums = state.get("checksums")
            if not isinstance(sums, Mapping):
                raise TypeError(
                    f"{owner}: the state's checksums must be a dict, got {_describe(sums)}; "
                    "the checkpoint is damaged."
                )
            bad = first_mismatch(_target_tensors(selected, family_ref), sums)
            if bad is not None:
                what, level = bad.split("/", 1)
                what = "selected groups" if what == "selected" else "family scales"
                raise ValueError(
                    f"{owner}: the state's {what} of level {level!r} do not match the "
                    "checksum recorded when it was saved: the checkpoint is damaged."
                )

        self.step_count = int(step_count)
        self.lam = lam
        self.zero_fraction = {lv: float(f) for lv, f in fractions.items()}
        self._family_ref = {lv: ref.clone() for lv, ref in family_ref.items()}
        self.selected = {}
        for level, sel in selected.items():
            self._select(level, sel.clone())
        for level, value in self.lam.items():
            self.optimizer.penalties[level].lam = (
                0.0 if value is None or self.optimizer.frozen else value
            )

    def __repr__(self) -> str:
        parts = ", ".join(f"{lv}={frac:g}" for lv, frac in self.targets.items())
        return (
            f"SparsityTarget({parts}; warmup_steps={self.warmup_steps}, "
            f"reach_step={self.reach_step}, freeze_step={self.freeze_step}, step={self.step_count})"
        )


def _target_tensors(
    selected: Mapping[str, Tensor], family_ref: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The tensors of a target's state, by the keys its checksums are recorded under."""
    tensors = {f"selected/{lv}": t for lv, t in selected.items()}
    tensors.update({f"family_ref/{lv}": t for lv, t in family_ref.items()})
    return tensors


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_per_level(
    owner: str, key: str, value: object, targets: Mapping[str, float], exact: bool = False
) -> dict[str, Any]:
    """``value`` as a dict over the targeted levels: all of them if ``exact``, else some."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{owner}: {key} must be a dict {{level: ...}}, got {_describe(value)}.")
    unknown = [lv for lv in value if lv not in targets]
    absent = [lv for lv in targets if lv not in value] if exact else []
    if unknown or absent:
        raise ValueError(
            f"{owner}: {key} is given for the levels {list(value)}, this controller targets "
            f"{list(targets)}."
        )
    return dict(value)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"SparsityTarget: {name} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"SparsityTarget: {name} must be at least {minimum}, got {value}.")
    return int(value)


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"SparsityTarget: {name} must be a number, got {type(value).__name__}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"SparsityTarget: {name} must be positive and finite, got {value}.")
    return float(value)


def _check_targets(optimizer: object, targets: object) -> dict[str, float]:
    if not isinstance(optimizer, (ProxSGD, ProxAdam)):
        raise TypeError(
            "SparsityTarget: optimizer must be a group_prox.ProxSGD or ProxAdam, "
            f"got {type(optimizer).__name__}."
        )
    if optimizer.hierarchy is None:
        raise ValueError("SparsityTarget: the optimizer has no hierarchy= to target.")
    if not optimizer.hierarchy.tensors:
        raise ValueError(
            "SparsityTarget: the optimizer's hierarchy holds no parameter, so no group can be "
            "made zero. Check how it was built (a builder finds no group in a model it does not "
            "recognise)."
        )
    if not isinstance(targets, Mapping) or not targets:
        raise TypeError(
            "SparsityTarget: targets must be a non-empty mapping {level: fraction of zero groups}, "
            f"e.g. {{'base_level': 0.6}}; got {targets!r}."
        )
    out = {}
    for level, frac in targets.items():
        if level not in optimizer.hierarchy.level_names:
            raise ValueError(
                f"SparsityTarget: target level {level!r} is not a level of the hierarchy; its "
                f"levels are {list(optimizer.hierarchy.level_names)}."
            )
        pen: Penalty | None = optimizer.penalties.get(level)
        if not isinstance(pen, (GroupLasso, SparseGroupLasso)) or not pen.has_group_part:
            raise ValueError(
                f"SparsityTarget: level {level!r} needs a GroupLasso or SparseGroupLasso penalty "
                f"in the optimizer to control, got "
                f"{type(pen).__name__ if pen is not None else 'none'}: pass "
                f"penalties={{{level!r}: group_prox.GroupLasso(0.0), ...}}."
            )
        if isinstance(frac, bool) or not isinstance(frac, numbers.Real):
            raise TypeError(
                f"SparsityTarget: the target of level {level!r} must be a number, "
                f"got {type(frac).__name__}."
            )
        if not 0.0 <= frac < 1.0:
            raise ValueError(
                f"SparsityTarget: the target of level {level!r} must be a fraction in [0, 1), "
                f"got {frac}."
            )
        out[level] = float(frac)
    return out
