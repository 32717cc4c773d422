"""SparsityTarget: steer the penalty so that the loss chooses what goes, and the schedule how much.

A user knows the sparsity they want, not the λ that gives it; and the zeros of a group penalty are
a steep function of λ. :class:`SparsityTarget` puts one multiplier on the λs of the penalties the
user passed (their ratios kept), penalising *every* group of those levels from the first step of the
ramp, so that the loss itself decides which groups die: groups the loss needs resist the
shrinkage, the others fade. The multiplier follows a feedback law (:mod:`group_prox.controller`)
so that the measured sparsity follows a schedule (:mod:`group_prox.schedule`). The sparsity is
measured as what :func:`group_prox.compress` will actually remove (:func:`group_prox.removable`)
when the target is a share of the model's parameters or FLOPs, or as a fraction of zero groups per
level.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .checksums import checksums_of, first_mismatch
from .compression.removable import removable
from .controller import LamController, initial_lam, step_size_rate
from .hierarchy import Hierarchy
from .inputs import ExampleInputs
from .optim import ProxAdam, ProxSGD
from .penalties import (
    GroupLasso,
    GroupLogSum,
    GroupMCP,
    GroupSCAD,
    Penalty,
    SparseGroupLasso,
    check_lam,
)
from .schedule import Phase, Ramp, SparsitySchedule
from .selection import families, family_medians, smallest_first
from .validation import check_bool, check_choice, check_fraction, check_int, check_positive

__all__ = ["SparsityTarget"]

#: The version of :meth:`SparsityTarget.state_dict`.
TARGET_FORMAT = "group_prox.sparsity_target/3"
#: Penalties whose λ a target can steer: λ scales a shrinkage that zeroes groups.
STEERABLE = (GroupLasso, SparseGroupLasso, GroupMCP, GroupSCAD, GroupLogSum)
_MODEL = "model"  # the key of the one multiplier of a params= or flops= target
#: How far past a params=/flops= target the groups finishing their fall may take it.
_SNAP_TOLERANCE = 0.02
#: A shortfall at the freeze beyond which the snap warns: it then zeroes groups the loss still
#: uses, not only the ones finishing their fall.
_SNAP_WARN = 0.05
Selection = Literal["loss", "uniform"]
_OWNER = "SparsityTarget"
_CPU = torch.device("cpu")


class SparsityTarget:
    r"""Steer the λs of an optimizer's penalties so that its sparsity follows a schedule to a
    target; optionally freeze the zero pattern at the end.

    Use it like a learning-rate scheduler: call :meth:`step` once after every
    ``optimizer.step()``::

        opt = gp.ProxSGD(model.parameters(), lr=0.1, momentum=0.9, hierarchy=h,
                         penalties={"base_level": gp.GroupLasso(1.0), "layer": gp.GroupLasso(0.2)})
        target = gp.SparsityTarget(opt, params=0.7, model=model,
                                   warmup_steps=200, reach_step=2000, freeze_step=3000)
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward()
            opt.step(); scheduler.step(); target.step()
        small = gp.compress(model, h)   # about 70% fewer parameters

    **What is targeted** (exactly one of):

    * ``params=p``: the share of the model's parameters that :func:`~group_prox.compress` removes
      (measured by :func:`~group_prox.removable`, the same planner). One multiplier ``m`` scales
      every steerable penalty of the optimizer: level ``L`` gets ``λ_L = m·r_L`` with ``r_L`` the
      λ the user passed (``GroupLasso(1.0)`` on filters and ``GroupLasso(0.2)`` on branches keep
      branches five times cheaper to keep than filters); levels passed with λ = 0 get ``r_L = 1``
      when every steerable λ is 0, and stay unpenalised otherwise.
    * ``flops=f``: the same for the FLOPs of one forward pass on ``example_inputs``.
    * ``targets={level: fraction}``: per level, the fraction of its groups that should be exactly
      zero, each level with its own multiplier.

    **How.** With ``selection="loss"`` (default) the penalty acts on *every* group of the steered
    levels from the first step of the ramp, its λ rising smoothly, so the gradient of the loss
    decides which groups die: a group the loss needs resists the shrinkage, the others fade, and
    the loss moves their work onto the survivors before they vanish. Selecting groups by magnitude
    instead cuts about the same fraction of every layer (per-layer magnitude pruning), which costs
    accuracy; ``selection="uniform"`` keeps that behaviour as an explicit opt-in (level targets
    only): at each update the penalty acts only on the groups the schedule wants zero
    ``lookahead`` steps ahead, smallest ``‖x_g‖/(w_g·m_f)`` first (``m_f`` the median of the
    group's layer when the ramp began), at most ``s + spread·(1 − s)`` of any layer and none
    emptied (see :mod:`group_prox.selection`).

    **Phases**, counted in calls of :meth:`step` (see :class:`~group_prox.schedule.SparsitySchedule`):
    *warm-up* (no shrinkage on the steered levels), *ramp* (the wanted sparsity rises to the
    target along ``ramp``), *hold*, and *frozen* from ``freeze_step`` on: the zero pattern is
    frozen with :meth:`ProxSGD.freeze_zero_groups <group_prox.ProxSGD.freeze_zero_groups>`, so
    zero groups stay zero and the survivors recover without shrinkage. With ``snap=True`` a target
    still short at that moment is first topped up by zeroing the groups nearest to zero (smallest
    ``‖x_g‖/(w_g·r_L)``), so that it freezes at the target.

    **Control** (:mod:`group_prox.controller`). Every ``update_every`` steps the sparsity is
    measured and each multiplier moves multiplicatively,
    ``m ← m·exp(r·clip(gain·e, −max_change, max_change)·update_every)``, ``e`` the wanted sparsity
    ``lookahead`` steps ahead minus the forecast one (the zeros plus the groups whose norm, at its
    recent pace, reaches 0 by then: the zeros alone lag λ by many steps) and ``r = η/η_ref`` the
    step size of the prox relative to the largest seen: the prox shrinks by ``η·λ``, so while the
    learning rate is 0 (a warm-up from 0, a paused schedule) nothing moves, λ neither rises for
    it nor stalls afterwards, and an LR scheduler is followed. The first multiplier comes from the
    group norms, so that the shrinkage alone would zero the target quantile of the finest level
    over the ramp: the controller is indifferent to the scale of λ (ProxSGD and ProxAdam need λs
    orders of magnitude apart).

    Args:
        optimizer: a :class:`~group_prox.ProxSGD` or :class:`~group_prox.ProxAdam` with a
            hierarchy and a steerable penalty (``GroupLasso``, ``SparseGroupLasso``,
            ``GroupMCP``, ``GroupSCAD``, ``GroupLogSum``) on every steered level; the λs are
            overwritten (their ratios kept for ``params``/``flops``).
        targets: ``{level: fraction}`` of zero groups, each in ``[0, 1)``.
        params: the share of parameters :func:`~group_prox.compress` should remove, in
            ``[0, 1)``; needs ``model``.
        flops: the share of FLOPs it should remove; needs ``model`` and ``example_inputs``.
        model: the model the optimizer trains (for ``params``/``flops``).
        example_inputs: inputs for counting FLOPs, and for models of no known family (see
            :func:`~group_prox.compress`).
        reach_step: the step by which the target is reached (end of the ramp).
        warmup_steps: steps without shrinkage on the steered levels.
        freeze_step: the step at which the zero pattern is frozen (``None``: never).
        ramp: shape of the ramp, ``"cubic"`` (default), ``"linear"`` or ``"cosine"``.
        update_every: measure and adjust every this many steps; default 1 for level targets (one
            read of every tensor), and a hundredth of the ramp for ``params``/``flops`` (a
            compression plan each).
        gain: log-λ change per step per unit of sparsity error.
        max_change: the largest log-λ change per step; default ``2 / ramp steps`` (λ can grow
            by e² over the ramp beyond what the error asks).
        selection: ``"loss"`` (default) or ``"uniform"`` (see How).
        lookahead: how many steps ahead the forecast looks (and, with ``"uniform"``, the
            schedule that selects groups); default a tenth of the ramp.
        spread: ``"uniform"`` only: how unevenly zeros may fall on a level's layers (0: the same
            fraction of each).
        snap: at ``freeze_step``, top the target up by zeroing the groups nearest to zero (a
            ``RuntimeWarning`` when that must make up more than 5 points: it then zeroes groups
            the loss still uses).

    **Copies.** ``copy.deepcopy`` and ``pickle`` carry the whole controller with its optimizer
    (and model): copied together (``copy.deepcopy((model, opt, target))``), the copy continues bit
    for bit as the original would.

    Raises:
        TypeError: for an optimizer that is not a group_prox optimizer, or arguments of the wrong
            type.
        ValueError: for a level without a steerable penalty, a fraction outside ``[0, 1)``, no or
            several kinds of target, steps out of order; each message names what to change.
    """

    def __init__(
        self,
        optimizer: ProxSGD | ProxAdam,
        targets: Mapping[str, float] | None = None,
        *,
        params: float | None = None,
        flops: float | None = None,
        model: nn.Module | None = None,
        example_inputs: ExampleInputs | None = None,
        reach_step: int,
        warmup_steps: int = 0,
        freeze_step: int | None = None,
        ramp: Ramp = "cubic",
        update_every: int | None = None,
        gain: float = 2.0,
        max_change: float | None = None,
        selection: Selection = "loss",
        lookahead: int | None = None,
        spread: float = 0.0,
        snap: bool = True,
    ) -> None:
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        self.schedule = SparsitySchedule(
            reach_step=reach_step,
            warmup_steps=warmup_steps,
            freeze_step=freeze_step,
            ramp=ramp,
            owner=_OWNER,
        )
        ramp_steps = self.schedule.ramp_steps
        kinds = [
            k
            for k, v in (("targets", targets), ("params", params), ("flops", flops))
            if v is not None
        ]
        if len(kinds) != 1:
            raise ValueError(
                f"{_OWNER}: give exactly one target: params=p (share of the parameters compress "
                "removes), flops=f, or a dict {level: fraction of zero groups}; got "
                f"{kinds or 'none'}."
            )
        self.kind: Literal["levels", "params", "flops"] = (
            "levels" if targets is not None else "params" if params is not None else "flops"
        )
        self.selection: Selection = check_choice(
            selection, _OWNER, "selection", ("loss", "uniform")
        )
        if self.kind == "levels":
            self.targets = _check_level_targets(optimizer, targets)
            self.ratios = {level: 1.0 for level in self.targets}
        else:
            if self.selection == "uniform":
                raise ValueError(
                    f"{_OWNER}: selection='uniform' picks a fraction of each level's groups; give "
                    "level targets {level: fraction} with it, or use the default "
                    "selection='loss' with params=/flops=."
                )
            share = params if params is not None else flops
            self.targets = {_MODEL: check_fraction(share, _OWNER, self.kind)}
            self.ratios = _steerable_ratios(optimizer)
            if not isinstance(model, nn.Module):
                raise TypeError(
                    f"{_OWNER}: {self.kind}= measures what compress removes from the model; pass "
                    f"model=<the nn.Module the optimizer trains>, got {type(model).__name__}."
                )
            if self.kind == "flops" and example_inputs is None:
                raise ValueError(
                    f"{_OWNER}: flops= counts a forward pass; pass example_inputs=... (a batch "
                    "of one is enough)."
                )
            foreign = optimizer.hierarchy.names_outside(list(model.parameters()))
            if foreign:
                raise ValueError(
                    f"{_OWNER}: the optimizer's hierarchy holds parameters that are not "
                    f"parameters of model: {foreign}. Pass the model the optimizer trains."
                )
            # Refuses a model compress cannot plan, now.
            removable(model, optimizer.hierarchy, example_inputs=example_inputs)
        self.model = model
        self.example_inputs = example_inputs
        self.update_every = (
            (1 if self.kind == "levels" else max(1, ramp_steps // 100))
            if update_every is None
            else check_int(update_every, _OWNER, "update_every", 1)
        )
        max_rise = (
            2.0 / ramp_steps
            if max_change is None
            else check_positive(max_change, _OWNER, "max_change")
        )
        self.controller = LamController(
            gain=check_positive(gain, _OWNER, "gain"),
            max_rise=max_rise,
            max_fall=max_rise,
            owner=_OWNER,
        )
        self.snap = check_bool(snap, _OWNER, "snap")
        prox = optimizer.prox
        assert prox is not None  # checked in _check_optimizer
        self._prox = prox
        self._plan = prox.plan
        self._level_index = {lp.name: i for i, lp in enumerate(self._plan.levels)}
        # The share of λ that thresholds group norms (1 − l1_ratio for a sparse group lasso).
        self._group_share = {
            lv: 1.0 - getattr(optimizer.penalties[lv], "l1_ratio", 0.0) for lv in self.ratios
        }
        self._covered_indices: dict[tuple[str, torch.device], Tensor] = {}
        self._norm_units: dict[str, Tensor] = {}
        self.lookahead = (
            max(1, ramp_steps // 10)
            if lookahead is None
            else check_int(lookahead, _OWNER, "lookahead", 0)
        )
        #: per steered level, which of its covered groups the penalty acts on (all by default).
        self.penalised: dict[str, Tensor] = {}
        #: per steered level, the covered groups kept alive because their zero alone would take
        #: the model past its target (``params``/``flops``).
        self.protected: dict[str, Tensor] = {}
        spread = check_fraction(spread, _OWNER, "spread", closed_high=True)
        if self.selection == "loss" and spread != 0.0:
            raise ValueError(
                f"{_OWNER}: spread shares zeros between layers for selection='uniform'; with "
                "the default selection='loss' every group is penalised and the loss decides. "
                "Drop it, or pass selection='uniform'."
            )
        self._uniform = _UniformSelection(self, spread) if self.selection == "uniform" else None
        self.step_count = 0
        #: each target's multiplier of λ (``None`` until the ramp calibrates it).
        self.multiplier: dict[str, float | None] = {key: None for key in self.targets}
        #: the last measured sparsity of each target (fraction of zero groups, or of the
        #: parameters/FLOPs compress removes).
        self.measured: dict[str, float] = {key: 0.0 for key in self.targets}
        #: the sparsity expected ``lookahead`` steps ahead, counting the dying groups as zero.
        self.forecast: dict[str, float] = {key: 0.0 for key in self.targets}
        #: the largest prox step size seen since calibration (see Control).
        self.eta_ref = 0.0
        self._previous: dict[str, Tensor] = {}
        self._covered_shares: dict[str, Tensor] = {}
        self._set_lams()

    # ------------------------------------------------------------------------------ schedule
    @property
    def warmup_steps(self) -> int:
        return self.schedule.warmup_steps

    @property
    def reach_step(self) -> int:
        return self.schedule.reach_step

    @property
    def freeze_step(self) -> int | None:
        return self.schedule.freeze_step

    @property
    def phase(self) -> Phase:
        """``"warmup"``, ``"ramp"``, ``"hold"`` or ``"frozen"`` for the next step."""
        return self.schedule.phase(self.step_count)

    def wanted(self, key: str | None = None, step: int | None = None) -> float:
        """The scheduled sparsity of target ``key`` (a level, or ``None`` for the one target of
        ``params``/``flops``) after ``step`` steps (default: now)."""
        key = _MODEL if key is None else key
        t = self.step_count if step is None else step
        return self.targets[key] * self.schedule.share(t)

    @property
    def lam(self) -> dict[str, float]:
        """The λ now set on each steered level."""
        return {level: self.optimizer.penalties[level].lam for level in self.ratios}

    # ---------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> None:
        """Account for one optimizer step and set the λs for the next one."""
        self.step_count += 1
        t = self.step_count
        if self.optimizer.frozen:
            return
        phase = self.schedule.phase(t)
        if phase == "frozen":
            self._freeze()
            return
        if phase == "warmup":
            return
        due = (t - self.warmup_steps) % self.update_every == 0
        if due or any(m is None for m in self.multiplier.values()):
            self._update(self.update_every)

    def measure(self) -> dict[str, float]:
        """The sparsity of each target now: per level the fraction of its (covered) groups that
        are exactly zero, or the share of the parameters or FLOPs :func:`~group_prox.compress`
        would remove."""
        return self._measure(self._norms())

    def _measure(self, norms: dict[str, tuple[Tensor, Tensor]]) -> dict[str, float]:
        """:meth:`measure`, with the levels' norms already at hand."""
        if self.kind == "levels":
            return {lv: float(zero.double().mean()) for lv, (_, zero) in norms.items()}
        return {_MODEL: self._removed()}

    def _removed(self) -> float:
        found = removable(
            self.model,
            self.optimizer.hierarchy,
            example_inputs=self.example_inputs,
            flops=self.kind == "flops",
        )
        share = found.params_removed if self.kind == "params" else found.flops_removed
        assert share is not None
        return share

    def _norms(self, levels: list[str] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Per steered level (or level of ``levels``): ``‖x_g‖/(w_g·share)`` of its covered
        groups, and whether each is exactly zero."""
        _, level_sq = self._prox.group_sq_norms()
        out = {}
        for level in self.ratios if levels is None else levels:
            i = self._level_index[level]
            covered = self._covered_index(level, level_sq[i].device)
            norm = level_sq[i].index_select(0, covered).sqrt_().cpu()
            out[level] = (norm / self._norm_unit(level).to(norm.dtype), norm == 0)
        return out

    def _covered_index(self, level: str, device: torch.device = _CPU) -> Tensor:
        """The indices, among all groups of ``level``, of its covered groups (on ``device``);
        fixed by the plan, kept per level."""
        key = (level, device)
        index = self._covered_indices.get(key)
        if index is None:
            covered = self._plan.levels[self._level_index[level]].covered
            index = self._covered_indices[key] = torch.nonzero(covered).flatten().to(device)
        return index

    def _norm_unit(self, level: str) -> Tensor:
        """The unit ``w_g·share`` that :meth:`_norms` divides each covered group's norm by; fixed
        by the plan, kept per level."""
        unit = self._norm_units.get(level)
        if unit is None:
            i = self._level_index[level]
            weights = self._plan.base_weights(i)[self._plan.levels[i].covered]
            unit = self._norm_units[level] = weights * self._group_share[level]
        return unit

    def _group_marks(self, level: str, covered_groups: Tensor) -> Tensor:
        """A bool per group of ``level``, set at the given covered groups (positions among its
        covered groups, or a mask over them)."""
        marks = torch.zeros(
            self._plan.levels[self._level_index[level]].num_groups, dtype=torch.bool
        )
        marks[self._covered_index(level)[covered_groups]] = True
        return marks

    def _group_etas(self, level: str) -> Tensor:
        """The prox step size of each covered group of ``level``."""
        lp = self._plan.levels[self._level_index[level]]
        eta = self.optimizer.prox_step_sizes().cpu()
        return eta[lp.group_component[lp.covered]]

    def _update(self, steps: int) -> None:
        eta = float(self.optimizer.prox_step_sizes().max())
        if self._uniform is not None:
            self._uniform.select(self.step_count)
        norms = self._norms()
        ttz = self._steps_to_zero(norms, steps)
        self.measured = self._measure(norms)
        exempt = {lv: o | self._protected(lv) for lv, o in self._oversized(norms).items()}
        # An exempt group dies only through its finer groups, which the forecast counts.
        dying = {lv: d & ~exempt[lv] for lv, d in self._dying(ttz).items()}
        self.forecast = self._forecast(norms, dying)
        lead = self.step_count + self.lookahead
        capped = set()
        for key, ahead in self.forecast.items():
            if (
                self._uniform is None
                and self.multiplier[key] is not None
                and ahead >= self.targets[key]
            ):
                capped.add(key)
            if eta <= 0:
                # lr = 0: the prox cannot act, so neither the zeros nor the lag say anything.
                continue
            self.eta_ref = max(self.eta_ref, eta, self._scheduled_peak())
            m = self.multiplier[key]
            if m is None:
                m = self._initial_multiplier(key)
            elif key not in capped:
                m = self.controller.update(
                    m,
                    self._error(key, self.wanted(key, lead), ahead),
                    steps=steps,
                    rate=step_size_rate(eta, self.eta_ref),
                )
            self.multiplier[key] = m
        if self._uniform is None:
            self._choose_penalised(norms, self._finishers(ttz, dying, capped), exempt)
        self._set_lams()

    def _steps_to_zero(
        self, norms: dict[str, tuple[Tensor, Tensor]], steps: int
    ) -> dict[str, Tensor]:
        """Per steered level, in how many steps each covered group reaches 0 at the pace its
        norm fell since the last update (0 for a zero group, ``inf`` for one not falling)."""
        out = {}
        for level, (rel_norm, zero) in norms.items():
            previous = self._previous.get(level)
            if previous is not None and previous.shape == rel_norm.shape:
                pace = (previous - rel_norm) / steps
                ttz = torch.where(pace > 0, rel_norm / pace, float("inf"))
            else:
                ttz = torch.full_like(rel_norm, float("inf"))
            out[level] = ttz.masked_fill_(zero, 0.0)
            self._previous[level] = rel_norm
        return out

    def _dying(self, ttz: dict[str, Tensor]) -> dict[str, Tensor]:
        """The non-zero groups that reach 0 within ``lookahead`` steps: the zeros already
        decided. The shrinkage zeroes a group only after many steps, so the zeros alone lag λ
        by about that much, and a controller reading them alone would keep raising λ long
        after it sufficed."""
        return {lv: (t > 0) & (t <= self.lookahead) for lv, t in ttz.items()}

    def _forecast(
        self, norms: dict[str, tuple[Tensor, Tensor]], dying: dict[str, Tensor]
    ) -> dict[str, float]:
        """The sparsity expected ``lookahead`` steps ahead: as :meth:`measure`, with the dying
        groups counted as zero (for ``params``/``flops`` they are zeroed for the measurement
        and restored after it)."""
        if self.kind == "levels":
            return {
                lv: float((zero | dying[lv]).double().mean()) for lv, (_, zero) in norms.items()
            }
        if not any(bool(d.any()) for d in dying.values()):
            return dict(self.measured)
        saved = self._save_tensors_of(dying)
        try:
            for level, d in dying.items():
                if bool(d.any()):
                    self._zero(level, torch.nonzero(d).flatten())
            return {_MODEL: self._removed()}
        finally:
            for param, data in saved:
                param.copy_(data)  # a new version: the prox's cached norms are not reused

    def _save_tensors_of(self, groups: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Copies of the tensors that hold any of the given covered groups."""
        plan = self._plan
        hit = torch.zeros(plan.hierarchy.num_atoms, dtype=torch.bool)
        for level, covered_groups in groups.items():
            marks = self._group_marks(level, covered_groups)
            hit |= plan.atoms_in(self._level_index[level], marks).cpu()
        return [
            (lay.param, lay.param.detach().clone())
            for lay in plan.tensors
            if bool(hit[lay.offset : lay.offset + lay.num_atoms].any())
        ]

    def _oversized(self, norms: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """Per steered level, the covered groups exempt from the penalty: for ``params``, those
        whose removal alone would take the model past its target (one residual branch of a
        ResNet's last stage can hold most of its parameters); they are penalised again once the
        target leaves room for them."""
        if self.kind != "params":
            return {lv: torch.zeros(_covered(self, lv), dtype=torch.bool) for lv in self.ratios}
        room = self.targets[_MODEL] - self.measured[_MODEL] + 0.02
        return {lv: (self._group_shares(lv) > room) & ~norms[lv][1] for lv in self.ratios}

    def _group_shares(self, level: str) -> Tensor:
        """The share of the model's parameters in each covered group of ``level``; fixed by the
        plan, kept per level."""
        shares = self._covered_shares.get(level)
        if shares is None:
            assert self.model is not None  # params= needs the model
            total = max(1, sum(p.numel() for p in self.model.parameters()))
            sizes = torch.as_tensor(self._plan.hierarchy.group_sizes(level), dtype=torch.float64)
            covered = self._plan.levels[self._level_index[level]].covered
            shares = self._covered_shares[level] = sizes[covered] / total
        return shares

    def _choose_penalised(
        self,
        norms: dict[str, tuple[Tensor, Tensor]],
        finishers: dict[str, Tensor],
        exempt: dict[str, Tensor],
    ) -> None:
        """Which covered groups of each steered level the penalty acts on
        (``selection="loss"``): all but the ``exempt`` ones, until the forecast reaches the
        final target; from then on only the ``finishers``, the zero groups and the dying ones
        the target needs: they finish, and the survivors train free of shrinkage. Group lasso
        shrinks every survivor by ``η·λ`` per step, which costs accuracy and, past the target,
        only kills more groups than asked for."""
        for level, (_, zero) in norms.items():
            self._penalise(level, finishers.get(level, torch.ones_like(zero)) & ~exempt[level])

    def _finishers(
        self, ttz: dict[str, Tensor], dying: dict[str, Tensor], capped: set[str]
    ) -> dict[str, Tensor]:
        """Per level of a capped target: the zero groups and as many dying ones as the final
        target needs, those nearest to zero (in steps) first."""
        out: dict[str, Tensor] = {}
        if not capped:
            return out
        if self.kind == "levels":
            for level in capped:
                t = ttz[level]
                need = round(self.targets[level] * t.numel()) - int((t == 0).sum())
                out[level] = _soonest(t, dying[level], max(need, 0))
            return out
        # params/flops: the fewest dying groups (all levels together, soonest first) whose
        # zeros make compress remove the target; found by bisection on the planner.
        levels = list(ttz)
        cat = torch.cat([torch.where(dying[lv], ttz[lv], float("inf")) for lv in levels])
        order = torch.argsort(cat, stable=True)[: int(torch.isfinite(cat).sum())]
        sizes = [ttz[lv].numel() for lv in levels]
        starts = [sum(sizes[:j]) for j in range(len(levels))]

        def split(k: int) -> dict[str, Tensor]:
            picked = torch.zeros(cat.numel(), dtype=torch.bool)
            picked[order[:k]] = True
            return {lv: picked[s0 : s0 + n] for lv, s0, n in zip(levels, starts, sizes)}

        saved = self._save_tensors_of(dying)
        try:

            def removed_with(k: int) -> float:
                for param, data in saved:
                    param.copy_(data)
                for level, picked in split(k).items():
                    if bool(picked.any()):
                        self._zero(level, torch.nonzero(picked).flatten())
                return self._removed()

            lo, hi = 0, order.numel()
            found = self.forecast[_MODEL]
            while lo < hi:
                mid = (lo + hi) // 2
                share = removed_with(mid)
                if share >= self.targets[_MODEL]:
                    hi, found = mid, share
                else:
                    lo = mid + 1
        finally:
            for param, data in saved:
                param.copy_(data)
        # Dying groups can fall together (the last filter of a residual branch takes the whole
        # branch with them): when the fewest that reach the target overshoot it, the group whose
        # zero makes the jump is exempt from the penalty for the rest of the run, and one fewer
        # finishes.
        if found > self.targets[_MODEL] + _SNAP_TOLERANCE and lo > 0:
            jump = int(order[lo - 1])
            j = max(j for j, s0 in enumerate(starts) if s0 <= jump)
            self._protected(levels[j])[jump - starts[j]] = True
            lo -= 1
        return {lv: (ttz[lv] == 0) | picked for lv, picked in split(lo).items()}

    def _protected(self, level: str) -> Tensor:
        """The covered groups of ``level`` whose zero would overshoot the target (see
        :meth:`_finishers`): never penalised, never snapped to zero."""
        if level not in self.protected:
            self.protected[level] = torch.zeros(_covered(self, level), dtype=torch.bool)
        return self.protected[level]

    def _penalise(self, level: str, chosen: Tensor) -> None:
        """Penalise only the ``chosen`` covered groups of ``level``."""
        i = self._level_index[level]
        self.penalised[level] = chosen
        if bool(chosen.all()):
            self._plan.set_group_multipliers(i, None)
            return
        self._plan.set_group_multipliers(i, self._group_marks(level, chosen).double())

    def _error(self, key: str, wanted: float, have: float) -> float:
        """Wanted minus measured sparsity; for a level in whole groups (a level of 4 branches
        wants its first zero branch once 4·s rounds to 1)."""
        if self.kind != "levels":
            return wanted - have
        n = int(self._plan.levels[self._level_index[key]].covered.sum())
        return (round(wanted * n) - round(have * n)) / max(n, 1)

    def _scheduled_peak(self) -> float:
        """The largest learning rate an LR scheduler announced in the param groups (OneCycleLR's
        ``max_lr``, the ``initial_lr`` of the others), 0 if none did."""
        peak = 0.0
        for group in self.optimizer.param_groups:
            for key in ("max_lr", "initial_lr"):
                value = group.get(key)
                if isinstance(value, numbers.Real) and not isinstance(value, bool):
                    peak = max(peak, float(value))
        return peak

    def _initial_multiplier(self, key: str) -> float:
        """``initial_lam`` of the finest steered level (or of the level ``key``) at the target
        quantile, over the ramp, in units of that level's ratio, with the step size at its
        reference ``η_ref``: calibrated while a scheduler warms the learning rate up, λ would
        otherwise be as many times too large as the rate will grow."""
        level = key if key in self.ratios else min(self.ratios, key=self._level_index.__getitem__)
        rel_norm, _ = self._norms([level])[level]
        eta = self._group_etas(level)
        eta = torch.where(eta > 0, torch.full_like(eta, self.eta_ref), eta)
        lam = initial_lam(rel_norm, eta, self.targets[key], self.schedule.ramp_steps)
        return (lam or 0.0) / self.ratios[level]

    def _set_lams(self) -> None:
        frozen = self.optimizer.frozen
        for level, ratio in self.ratios.items():
            m = self.multiplier[level if self.kind == "levels" else _MODEL]
            lam = 0.0 if m is None or frozen else m * ratio
            self.optimizer.penalties[level].lam = lam

    # -------------------------------------------------------------------------------- freeze
    def _freeze(self) -> None:
        if self.snap:
            self._snap_to_target()
        for level in self.ratios:
            self.optimizer.penalties[level].lam = 0.0
            self._penalise(level, torch.ones(_covered(self, level), dtype=torch.bool))
        self.optimizer.freeze_zero_groups()

    def _snap_to_target(self) -> None:
        if self.kind == "levels":
            # Coarsest first: a zero branch has zeroed filters of the finer level.
            for level in sorted(self.targets, key=self._level_index.__getitem__, reverse=True):
                rel_norm, zero = self._norms([level])[level]
                short = round(self.targets[level] * zero.numel()) - int(zero.sum())
                self._warn_if_short(level, self.targets[level], float(zero.double().mean()))
                if short > 0:
                    order = (
                        self._uniform.order(level, rel_norm, zero, self.targets[level])
                        if self._uniform is not None
                        else _nearest_to_zero(rel_norm / self.ratios[level], zero)
                    )
                    self._zero(level, order[int(zero.sum()) : int(zero.sum()) + short])
            return
        # params/flops: zero the finest level's groups nearest to zero, a fiftieth of the level
        # at a time, until compress removes the target (the planner decides what counts).
        level = min(self.ratios, key=self._level_index.__getitem__)
        goal = self.targets[_MODEL]
        have = self._removed()
        if have >= goal:
            return
        self._warn_if_short(self.kind, goal, have)
        rel_norm, zero = self._norms([level])[level]
        order = _nearest_to_zero(rel_norm, zero)[int(zero.sum()) :]
        order = order[~self._protected(level)[order]]
        chunk = max(1, order.numel() // 50)
        for start in range(0, order.numel(), chunk):
            self._zero(level, order[start : start + chunk])
            if self._removed() >= goal:
                return

    def _warn_if_short(self, what: str, goal: float, have: float) -> None:
        """Warn when the snap must make up more than ``_SNAP_WARN`` of a target."""
        if goal - have > _SNAP_WARN:
            warnings.warn(
                f"{_OWNER}: at freeze_step {self.step_count} the {what} target {goal:.1%} stood at "
                f"{have:.1%}; snap=True zeroes the groups nearest to zero to make up the rest, "
                "groups the loss still uses, which costs accuracy. The penalty did not keep up "
                "with the schedule: give the ramp more steps (reach_step), a larger max_change "
                "or a later freeze_step.",
                RuntimeWarning,
                stacklevel=6,  # the caller of step(), past the no_grad wrapper
            )

    def _zero(self, level: str, covered_groups: Tensor) -> None:
        """Set the given covered groups of ``level`` (positions among its covered groups) to 0."""
        self._prox.zero_groups_(level, self._group_marks(level, covered_groups))

    # ---------------------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """The controller's state (step count, multipliers, last measurements and forecasts, the
        reference step size, the group norms of the last update (their pace gives the forecast);
        for ``selection="uniform"`` the selected groups and layer scales), its settings, its
        format version and a checksum of each of its tensors, which :meth:`load_state_dict`
        checks."""
        tensors = self._uniform.tensors() if self._uniform is not None else {}
        previous = {lv: t.clone() for lv, t in self._previous.items()}
        penalised = {lv: t.clone() for lv, t in self.penalised.items()}
        protected = {lv: t.clone() for lv, t in self.protected.items()}
        return {
            "format": TARGET_FORMAT,
            "step_count": self.step_count,
            "multiplier": dict(self.multiplier),
            "measured": dict(self.measured),
            "forecast": dict(self.forecast),
            "eta_ref": self.eta_ref,
            "previous": previous,
            "penalised": penalised,
            "protected": protected,
            "uniform": {k: t.clone() for k, t in tensors.items()},
            "settings": self._settings(),
            "checksums": checksums_of(
                {
                    **tensors,
                    **_prefixed("previous", previous),
                    **_prefixed("penalised", penalised),
                    **_prefixed("protected", protected),
                }
            ),
        }

    def _settings(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "targets": dict(self.targets),
            "ratios": dict(self.ratios),
            "selection": self.selection,
            "warmup_steps": self.warmup_steps,
            "reach_step": self.reach_step,
            "freeze_step": self.freeze_step,
            "ramp": self.schedule.ramp,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`. One saved with other targets or steps, by another version,
        or damaged, is refused before anything changes. Load the optimizer's state dict as well:
        it holds the frozen pattern."""
        owner = "SparsityTarget.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(
                f"{owner}: expected the dict returned by SparsityTarget.state_dict(), "
                f"got {type(state).__name__}."
            )
        version = state.get("format")
        if version is None:
            raise ValueError(
                f"{owner}: the state has no 'format': it is not a SparsityTarget state (an "
                "optimizer's?); pass the dict returned by SparsityTarget.state_dict()."
            )
        if version != TARGET_FORMAT:
            raise ValueError(
                f"{owner}: the state has format {version!r}; this version of group_prox reads "
                f"{TARGET_FORMAT!r}. A state of an earlier SparsityTarget (which steered other "
                "quantities) cannot continue under this one: restart the target's schedule from "
                "the optimizer's checkpoint."
            )
        keys = (
            "step_count",
            "multiplier",
            "measured",
            "forecast",
            "eta_ref",
            "previous",
            "penalised",
            "protected",
            "uniform",
            "settings",
            "checksums",
        )
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(
                f"{owner}: the state has no {', '.join(map(repr, missing))}; pass the dict "
                "returned by SparsityTarget.state_dict()."
            )
        saved, mine = state["settings"], self._settings()
        if saved != mine:
            raise ValueError(
                f"{owner}: the checkpoint was saved with {saved!r}, this controller has {mine!r}; "
                "build it with the same settings."
            )
        step_count = check_int(state["step_count"], owner, "step_count", 0)
        multiplier = _check_per_key(owner, "multiplier", state["multiplier"], self.targets)
        for key, value in multiplier.items():
            if value is not None:
                multiplier[key] = check_lam(value, f"{owner}: multiplier of {key!r}")
        measured = _check_per_key(owner, "measured", state["measured"], self.targets)
        for key, value in measured.items():
            measured[key] = check_fraction(value, owner, f"measured of {key!r}", closed_high=True)
        forecast = _check_per_key(owner, "forecast", state["forecast"], self.targets)
        for key, value in forecast.items():
            forecast[key] = check_fraction(value, owner, f"forecast of {key!r}", closed_high=True)
        previous = self._check_per_group(owner, "previous", "norms", state["previous"])
        penalised = self._check_per_group(owner, "penalised", "groups", state["penalised"])
        protected = self._check_per_group(owner, "protected", "groups", state["protected"])
        eta_ref = state["eta_ref"]
        if isinstance(eta_ref, bool) or not isinstance(eta_ref, numbers.Real) or eta_ref < 0:
            raise ValueError(f"{owner}: eta_ref must be a number >= 0, got {eta_ref!r}.")
        uniform = state["uniform"]
        if not isinstance(uniform, Mapping):
            raise TypeError(f"{owner}: uniform must be a dict, got {type(uniform).__name__}.")
        if self._uniform is not None:
            self._uniform.check(owner, uniform)
        elif uniform:
            raise ValueError(f"{owner}: the state holds a uniform selection this target lacks.")
        sums = state["checksums"]
        if not isinstance(sums, Mapping):
            raise TypeError(
                f"{owner}: the state's checksums must be a dict, got {type(sums).__name__}; "
                "the checkpoint is damaged."
            )
        bad = first_mismatch(
            {
                **uniform,
                **_prefixed("previous", previous),
                **_prefixed("penalised", penalised),
                **_prefixed("protected", protected),
            },
            sums,
        )
        if bad is not None:
            raise ValueError(
                f"{owner}: the state's {bad!r} does not match the checksum recorded when it was "
                "saved: the checkpoint is damaged."
            )

        self.step_count = step_count
        self.multiplier = multiplier
        self.measured = {k: float(v) for k, v in measured.items()}
        self.forecast = {k: float(v) for k, v in forecast.items()}
        self._previous = {lv: t.clone() for lv, t in previous.items()}
        self.eta_ref = float(eta_ref)
        self.protected = {lv: t.clone() for lv, t in protected.items()}
        self.penalised = {}
        for level in self.ratios:
            n = _covered(self, level)
            self._penalise(level, penalised.get(level, torch.ones(n, dtype=torch.bool)).clone())
        if self._uniform is not None:
            self._uniform.load(uniform)
        self._set_lams()

    def _check_per_group(
        self, owner: str, name: str, what: Literal["groups", "norms"], entries: object
    ) -> Mapping[str, Tensor]:
        """``entries`` as saved by :meth:`state_dict`: per steered level, one value per covered
        group, a bool (``what="groups"``, a mask) or a float (``what="norms"``)."""
        if not isinstance(entries, Mapping):
            raise TypeError(f"{owner}: {name} must be a dict, got {type(entries).__name__}.")
        kind = "bool" if what == "groups" else "float"
        for level, value in entries.items():
            if level not in self.ratios:
                raise ValueError(f"{owner}: {name} names {level!r}, not steered here.")
            n = _covered(self, level)
            right_kind = isinstance(value, Tensor) and (
                value.dtype == torch.bool if what == "groups" else value.is_floating_point()
            )
            if not (right_kind and value.shape == (n,)):
                raise ValueError(
                    f"{owner}: the {name} {what} of level {level!r} must be a {kind} tensor of "
                    f"{n} entries, got {_describe(value)}."
                )
        return entries

    def __repr__(self) -> str:
        what = ", ".join(f"{k}={v:g}" for k, v in self.targets.items())
        if self.kind != "levels":
            what = f"{self.kind}={self.targets[_MODEL]:g}"
        return (
            f"SparsityTarget({what}; warmup_steps={self.warmup_steps}, "
            f"reach_step={self.reach_step}, freeze_step={self.freeze_step}, "
            f"step={self.step_count})"
        )


class _UniformSelection:
    """``selection="uniform"``: the penalty acts only on the groups the schedule wants zero a
    little ahead, a similar fraction of every layer, least salient first (the per-layer magnitude
    selection of :mod:`group_prox.selection`)."""

    def __init__(self, target: SparsityTarget, spread: float) -> None:
        self.target = target
        self.spread = check_fraction(spread, _OWNER, "spread", closed_high=True)
        plan = target._plan
        self.families = {lv: families(plan, target._level_index[lv]) for lv in target.targets}
        self.family_ref: dict[str, Tensor] = {}
        self.selected: dict[str, Tensor] = {}
        for level in target.targets:
            self._apply(level, torch.zeros(_covered(target, level), dtype=torch.bool))

    def order(self, level: str, rel_norm: Tensor, zero: Tensor, fraction: float) -> Tensor:
        family = self.families[level]
        if family is not None and level not in self.family_ref:
            self.family_ref[level] = family_medians(rel_norm, family)
        return smallest_first(
            rel_norm, zero, fraction, family, self.family_ref.get(level), self.spread
        )

    def select(self, step: int) -> None:
        target = self.target
        for level, (rel_norm, zero) in target._norms(list(target.targets)).items():
            ahead = target.wanted(level, step + target.lookahead)
            k = round(ahead * zero.numel())
            chosen = torch.zeros(zero.numel(), dtype=torch.bool)
            chosen[self.order(level, rel_norm, zero, ahead)[:k]] = True
            self._apply(level, chosen)

    def _apply(self, level: str, chosen: Tensor) -> None:
        self.target._penalise(level, chosen)
        self.selected[level] = chosen

    def tensors(self) -> dict[str, Tensor]:
        out = {f"selected/{lv}": t for lv, t in self.selected.items()}
        out.update({f"family_ref/{lv}": t for lv, t in self.family_ref.items()})
        return out

    def check(self, owner: str, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            what, _, level = str(key).partition("/")
            if level not in self.target.targets or what not in ("selected", "family_ref"):
                raise ValueError(f"{owner}: unknown entry {key!r} of the uniform selection.")
            if what == "selected":
                n = _covered(self.target, level)
                ok = isinstance(value, Tensor) and value.dtype == torch.bool and value.shape == (n,)
                expected = f"a bool tensor of {n} entries"
            else:
                family = self.families[level]
                n = 0 if family is None else int(family.max()) + 1
                ok = isinstance(value, Tensor) and value.is_floating_point() and value.shape == (n,)
                expected = f"a float tensor of {n} entries"
            if not ok:
                raise ValueError(
                    f"{owner}: the {what} of level {level!r} must be {expected}, got "
                    f"{_describe(value)}."
                )

    def load(self, state: Mapping[str, Tensor]) -> None:
        self.family_ref = {}
        for key, value in state.items():
            what, _, level = key.partition("/")
            if what == "selected":
                self._apply(level, value.clone())
            else:
                self.family_ref[level] = value.clone()


def _prefixed(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}/{key}": t for key, t in tensors.items()}


def _covered(target: SparsityTarget, level: str) -> int:
    return int(target._plan.levels[target._level_index[level]].covered.sum())


def _soonest(ttz: Tensor, dying: Tensor, k: int) -> Tensor:
    """The zero groups and the ``k`` dying ones with the fewest steps to zero."""
    chosen = ttz == 0
    order = torch.argsort(torch.where(dying, ttz, float("inf")), stable=True)
    chosen[order[: min(k, int(dying.sum()))]] = True
    return chosen


def _nearest_to_zero(rel_norm: Tensor, zero: Tensor) -> Tensor:
    """Covered groups in the order the prox would zero them: the zero ones first, then by
    ``‖x_g‖/(w_g·r_L)`` (the fewest steps of shrinkage from zero)."""
    return torch.argsort(torch.where(zero, -1.0, rel_norm), stable=True)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_per_key(
    owner: str, name: str, value: object, targets: Mapping[str, float]
) -> dict[str, Any]:
    """``value`` as a dict over exactly the keys of ``targets``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{owner}: {name} must be a dict, got {_describe(value)}.")
    if set(value) != set(targets):
        raise ValueError(
            f"{owner}: {name} is given for {list(value)}, this controller targets {list(targets)}."
        )
    return dict(value)


def _check_optimizer(optimizer: object) -> None:
    if not isinstance(optimizer, (ProxSGD, ProxAdam)):
        raise TypeError(
            f"{_OWNER}: optimizer must be a group_prox.ProxSGD or ProxAdam, "
            f"got {type(optimizer).__name__}."
        )
    hierarchy: Hierarchy | None = optimizer.hierarchy
    if hierarchy is None:
        raise ValueError(f"{_OWNER}: the optimizer has no hierarchy= to target.")
    if not hierarchy.tensors:
        raise ValueError(
            f"{_OWNER}: the optimizer's hierarchy holds no parameter, so no group can be made "
            "zero. Check how it was built (a builder finds no group in a model it does not "
            "recognise)."
        )


def _steerable(pen: Penalty | None) -> bool:
    return isinstance(pen, STEERABLE) and pen.has_group_part


def _penalty_hint(level: str, pen: Penalty | None) -> str:
    return (
        f"level {level!r} needs a GroupLasso, SparseGroupLasso, GroupMCP, GroupSCAD or "
        f"GroupLogSum penalty in the optimizer to steer, got "
        f"{type(pen).__name__ if pen is not None else 'none'}: pass "
        f"penalties={{{level!r}: group_prox.GroupLasso(0.0), ...}}."
    )


def _steerable_ratios(optimizer: ProxSGD | ProxAdam) -> dict[str, float]:
    """``{level: r_L}`` for a params/flops target: the λs the user passed (their ratios are
    kept), or 1 on every steerable level when all are 0."""
    pens = {lv: p for lv, p in optimizer.penalties.items() if _steerable(p)}
    if not pens:
        raise ValueError(
            f"{_OWNER}: the optimizer has no penalty to steer; pass e.g. "
            "penalties={'base_level': group_prox.GroupLasso(1.0), 'layer': "
            "group_prox.GroupLasso(0.2)} (their λs set the ratio between the levels)."
        )
    lams = {lv: p.lam for lv, p in pens.items()}
    if all(lam == 0 for lam in lams.values()):
        return {lv: 1.0 for lv in lams}
    return {lv: lam for lv, lam in lams.items() if lam > 0}


def _check_level_targets(optimizer: ProxSGD | ProxAdam, targets: object) -> dict[str, float]:
    if not isinstance(targets, Mapping) or not targets:
        raise TypeError(
            f"{_OWNER}: targets must be a non-empty mapping {{level: fraction of zero groups}}, "
            f"e.g. {{'base_level': 0.6}}; got {targets!r}."
        )
    hierarchy = optimizer.hierarchy
    assert hierarchy is not None
    out = {}
    for level, frac in targets.items():
        if level not in hierarchy.level_names:
            raise ValueError(
                f"{_OWNER}: target level {level!r} is not a level of the hierarchy; its "
                f"levels are {list(hierarchy.level_names)}."
            )
        pen = optimizer.penalties.get(level)
        if not _steerable(pen):
            raise ValueError(f"{_OWNER}: {_penalty_hint(level, pen)}")
        if isinstance(frac, bool) or not isinstance(frac, numbers.Real):
            raise TypeError(
                f"{_OWNER}: the target of level {level!r} must be a number, "
                f"got {type(frac).__name__}."
            )
        out[level] = check_fraction(frac, _OWNER, f"the target of level {level!r}")
    return out
