"""ProxAdam: torch.optim.AdamW followed by the exact prox of a hierarchical group penalty."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from ..hierarchy.core import Hierarchy
from ..kernels import atom_sum
from ..penalties import Penalty
from ..validation import check_choice
from ._checkpoint import OptimizerKind
from ._defaults import default_fused
from ._nonfinite import NonFinite
from ._prox import ProxMixin, unhooked_step

__all__ = ["ProxAdam"]

_adamw_step = unhooked_step(torch.optim.AdamW.step)
_METRICS = ("lr", "preconditioner")


class ProxAdam(ProxMixin, torch.optim.AdamW):
    r"""AdamW with an exact proximal step for structured sparsity.

    Every step is the ordinary :class:`torch.optim.AdamW` update (decoupled weight decay, AMSGrad,
    ``maximize``, ``foreach``, ``fused``, ``capturable``), followed by the prox of the penalty.

    **Threshold.** Adam's update lives in the metric of its preconditioner
    :math:`D = \operatorname{diag}(\sqrt{\hat v} + \epsilon)`; a group prox in that metric has no
    closed form. ``prox_metric`` chooses the step size :math:`\eta` of the prox:

    * ``"lr"`` (default, *decoupled*): :math:`\eta = \text{lr}`, as AdamW does for weight decay.
      The group lasso threshold is ``lr·λ·w_g`` whatever the gradient scale, so λ means the same on
      every model and a group is zeroed once its norm falls below that threshold.
    * ``"preconditioner"``: one scalar metric per group tree, the mean of :math:`\sqrt{\hat v}+\epsilon`
      over the tree's scalars, :math:`\eta_{tree} = \text{lr} / \operatorname{mean}_{tree}(\sqrt{\hat v}+\epsilon)`.
      The shrink then follows Adam's scale of each tree. Parameters without Adam state yet
      count as a metric of 1. λ is then in the gradient's units, as with ProxSGD: a group stays
      at zero about when its gradient's norm is below ``λ·w_g``, so a group is kept for the
      *size* of its gradient, where with ``"lr"`` it is kept for its *consistency* (Adam moves
      every scalar by about ``lr``). A tree whose gradients are all but zero (an expert that no
      token reaches) gets a step of about ``lr/eps`` and is zeroed at once.

    In both cases the metric is a scalar on each tree, so the level-by-level composition remains the
    exact prox in that metric.

    **Which levels to penalise.** Where the finest level holds only groups inside branches
    (the filters of ``gp.hierarchy.resnet``, the heads and neurons of ``gp.hierarchy.transformer``),
    penalise it only: a coarser group (a residual branch, an expert) still goes, exactly, once its
    last member does. A coarser level's penalty shrinks every member of a group at once, by
    ``lr·λ·w_g`` whatever their gradients, and under a :class:`~group_prox.SparsityTarget` it cost
    accuracy at high sparsity (a ResNet on mnist1d, 90% of the parameters removed, 5 seeds: 95.9%
    with the branches penalised at 0.2 λ, 97.3% with the filters only; ProxSGD was indifferent).
    Where the finest level also holds residual-stream channels (``gp.hierarchy.auto``, or a stream
    level), keep the branches penalised: without them a target can zero every channel of a stream,
    which cuts the model off its input (timm's resnet18 with ``auto``, 70% of the parameters:
    all 512 channels of the last stage's stream, chance accuracy, with ProxSGD as with ProxAdam).

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable,
            differentiable, fused: as for :class:`torch.optim.AdamW`, except the default
            implementation: when neither ``foreach`` nor ``fused`` is given (and
            ``differentiable=False``), torch's fused kernel is used wherever it applies, as
            ``fused=True`` (see :class:`~group_prox.ProxSGD`).
        hierarchy, penalties: as for :class:`~group_prox.ProxSGD`.
        prox_metric: ``"lr"`` or ``"preconditioner"`` (see above).
        nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"``: what a step does when a
            gradient or parameter holds a NaN or an infinity (see :class:`~group_prox.ProxSGD`).

    With every λ equal to 0 the optimizer is exactly :class:`torch.optim.AdamW` with the same
    ``foreach``/``fused`` choice (by default ``fused=True`` where it applies). Parameters whose
    ``grad`` is ``None`` are skipped by the Adam update but their groups are still shrunk (see
    :class:`~group_prox.ProxSGD`).
    """

    checkpoint_kind = OptimizerKind(
        "ProxAdam",
        group_keys=frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad"}),
        state_required=frozenset({"step", "exp_avg", "exp_avg_sq"}),
        state_allowed=frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    )

    _copied_attributes = (*ProxMixin._copied_attributes, "prox_metric")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        hierarchy: Hierarchy | None = None,
        penalties: Mapping[str, Penalty] | None = None,
        prox_metric: Literal["lr", "preconditioner"] = "lr",
        nonfinite: NonFinite = "raise",
    ) -> None:
        check_choice(prox_metric, "ProxAdam", "prox_metric", _METRICS)
        params, fused = default_fused(
            params, foreach=foreach, fused=fused, differentiable=differentiable
        )
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        self._check_half_precision_eps()
        self.prox_metric = prox_metric
        self._init_prox(hierarchy, penalties)
        self._init_nonfinite(nonfinite)

    def _check_half_precision_eps(self) -> None:
        """A zero group has zero gradients, so Adam divides 0 by ``sqrt(v) + eps`` with ``v = 0``:
        an ``eps`` that rounds to 0 in float16 turns every zero group into NaN."""
        for i, group in enumerate(self.param_groups):
            halves = [p for p in group["params"] if p.dtype == torch.float16]
            if halves and float(torch.tensor(group["eps"], dtype=torch.float16)) == 0:
                raise ValueError(
                    f"ProxAdam: param group {i} holds float16 parameters (for example one of shape "
                    f"{tuple(halves[0].shape)}) and eps={group['eps']:g} is 0 in float16, so the "
                    "update of a zero group would be 0/0. Give eps >= 1e-7 (1e-4 is common for "
                    "float16), or keep float32 master weights and train under torch.autocast."
                )

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW update, then the prox of the penalty (step size per ``prox_metric``); or, when
        a gradient or parameter is not finite, an error or a skipped step (see ``nonfinite``)."""
        return self._guarded_step(lambda: _adamw_step(self, None), closure)

    def prox_step_sizes(self) -> Tensor:
        """The step size of the prox at the next step for every group tree (with a trailing 0):
        ``lr``, or with ``prox_metric="preconditioner"`` ``lr`` over the mean of
        ``sqrt(v̂) + eps`` over the tree."""
        eta = super().prox_step_sizes()
        if self.prox_metric == "lr":
            return eta
        plan = self._require_prox("prox_step_sizes").plan
        if not plan.tensors:  # an empty hierarchy: no tree to measure
            return eta
        acc = plan.acc_dtype
        device = plan.tensors[0].param.device
        pg_of = {id(p): g for g in self.param_groups for p in g["params"]}
        # Sharded (FSDP2), each rank sums √v̂ over its part of every atom into a global atom vector,
        # and one all-reduce adds the parts up.
        sharding = plan.sharding
        shard_sums = (
            None
            if sharding is None
            else torch.zeros(plan.hierarchy.num_atoms, dtype=acc, device=device)
        )
        sums, counts = [], []
        for i, lay in enumerate(plan.tensors):
            state = self.state.get(lay.param, {})
            group = pg_of[id(lay.param)]
            v = state.get("max_exp_avg_sq") if group["amsgrad"] else state.get("exp_avg_sq")
            numel = torch.full((lay.num_atoms,), float(lay.atom_numel), dtype=acc, device=device)
            if v is None:
                sums.append(numel)  # no state yet: a metric of 1
            else:
                beta2 = group["betas"][1]
                step = state["step"]
                bc2 = 1 - torch.as_tensor(beta2, dtype=acc, device=device) ** step.to(device, acc)
                if sharding is None:
                    root = v.detach().to(acc).sqrt().div_(bc2.sqrt())
                    sums.append(atom_sum(lay, root) + group["eps"] * numel)
                else:
                    root = sharding.local(i, v).to(acc).sqrt().div_(bc2.sqrt())
                    sharding.add_atom_sums_(shard_sums, i, root)  # type: ignore[arg-type]
                    sums.append(group["eps"] * numel)
            counts.append(numel)
        atom_sums = torch.cat(sums)
        if sharding is not None:
            atom_sums += sharding.all_reduce_(shard_sums)  # type: ignore[arg-type]
        dev = plan.on(device)
        comp_sum = torch.zeros(plan.num_components + 1, dtype=acc, device=device)
        comp_cnt = torch.zeros_like(comp_sum)
        comp_sum.index_add_(0, dev.atom_component, atom_sums)
        comp_cnt.index_add_(0, dev.atom_component, torch.cat(counts))
        mean = torch.where(comp_cnt > 0, comp_sum / comp_cnt, torch.ones_like(comp_sum))
        return eta.to(device, acc) / mean

    def _prox_state(self) -> dict[str, Any]:
        return {**super()._prox_state(), "prox_metric": self.prox_metric}

    def _check_prox_state(self, state: Any) -> None:
        super()._check_prox_state(state)
        if isinstance(state, Mapping) and state.get("prox_metric", "lr") not in _METRICS:
            raise ValueError(
                f"ProxAdam.load_state_dict: the checkpoint's prox_metric must be one of "
                f"{_METRICS}, got {state['prox_metric']!r}."
            )

    def _apply_prox_state(self, state: dict[str, Any] | None) -> None:
        super()._apply_prox_state(state)
        if state is not None:
            self.prox_metric = state.get("prox_metric", self.prox_metric)
