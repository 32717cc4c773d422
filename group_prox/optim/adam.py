"""ProxAdam: torch.optim.AdamW followed by the exact prox of a hierarchical group penalty."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from ..hierarchy.core import Hierarchy
from ..kernels import ProxPlan, atom_sum
from ..penalties import Penalty
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
      count as a metric of 1.

    In both cases the metric is a scalar on each tree, so the level-by-level composition remains the
    exact prox in that metric.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable,
            differentiable, fused: as for :class:`torch.optim.AdamW`.
        hierarchy, penalties: as for :class:`~group_prox.ProxSGD`.
        prox_metric: ``"lr"`` or ``"preconditioner"`` (see above).

    With every λ equal to 0 the optimizer is exactly :class:`torch.optim.AdamW`. Parameters whose
    ``grad`` is ``None`` are skipped by the Adam update but their groups are still shrunk (see
    :class:`~group_prox.ProxSGD`).
    """

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
    ) -> None:
        if prox_metric not in _METRICS:
            raise ValueError(
                f"ProxAdam: prox_metric must be one of {_METRICS}, got {prox_metric!r}."
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
        self.prox_metric = prox_metric
        self._init_prox(hierarchy, penalties)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW update, then the prox of the penalty (step size per ``prox_metric``)."""
        self._check_step_sizes()
        loss = _adamw_step(self, closure)
        self._prox_step()
        return loss

    def _component_eta(self, plan: ProxPlan) -> Tensor:
        eta = super()._component_eta(plan)
        if self.prox_metric == "lr":
            return eta
        acc = plan.acc_dtype
        device = plan.tensors[0].param.device
        pg_of = {id(p): g for g in self.param_groups for p in g["params"]}
        sums, counts = [], []
        for lay in plan.tensors:
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
                root = v.detach().to(acc).sqrt().div_(bc2.sqrt())
                sums.append(atom_sum(lay, root) + group["eps"] * numel)
            counts.append(numel)
        dev = plan.on(device)
        comp_sum = torch.zeros(plan.num_components + 1, dtype=acc, device=device)
        comp_cnt = torch.zeros_like(comp_sum)
        comp_sum.index_add_(0, dev.atom_component, torch.cat(sums))
        comp_cnt.index_add_(0, dev.atom_component, torch.cat(counts))
        mean = torch.where(comp_cnt > 0, comp_sum / comp_cnt, torch.ones_like(comp_sum))
        return eta.to(device, acc) / mean

    def _prox_state(self) -> dict[str, Any]:
        return {**super()._prox_state(), "prox_metric": self.prox_metric}

    def _apply_prox_state(self, state: dict[str, Any] | None) -> None:
        super()._apply_prox_state(state)
        if state is not None:
            self.prox_metric = state.get("prox_metric", self.prox_metric)
