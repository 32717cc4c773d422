"""ProxSGD: torch.optim.SGD followed by the exact prox of a hierarchical group penalty."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..hierarchy.core import Hierarchy
from ..penalties import Penalty
from ._checkpoint import OptimizerKind
from ._defaults import default_fused, has_sparse_grad
from ._nonfinite import NonFinite
from ._prox import ProxMixin, unhooked_step
from .compiled_sgd import CompiledSGDUpdate

__all__ = ["ProxSGD"]

_sgd_step = unhooked_step(torch.optim.SGD.step)


class ProxSGD(ProxMixin, torch.optim.SGD):
    r"""Stochastic gradient descent with an exact proximal step for structured sparsity.

    Every step is the ordinary :class:`torch.optim.SGD` update (all its options: momentum,
    dampening, Nesterov, coupled weight decay, ``maximize``, ``foreach``, ``fused``), followed by

    .. math:: x \leftarrow \operatorname{prox}_{\eta\,\Omega}(x), \qquad
              \Omega = \sum_{\text{level}} \Omega_{\text{level}},

    where :math:`\eta` is the current ``lr`` of the parameter group and each level's penalty acts on
    that level's groups (see :mod:`group_prox.penalties`). The penalty is never added to the loss;
    the prox is what makes whole groups exactly zero.

    Args:
        params: as for :class:`torch.optim.SGD` (tensors, named tensors or param-group dicts).
        lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, differentiable, fused:
            as for :class:`torch.optim.SGD`, except the default implementation: when neither
            ``foreach`` nor ``fused`` is given (and ``differentiable=False``), torch's fused
            kernel is used wherever it applies (every parameter a floating-point tensor on a
            CPU, CUDA or XPU device), as ``fused=True``; it makes one pass over each tensor
            where foreach makes several, and pays for most of the prox. Steps with a sparse
            gradient take torch's foreach path. Pass ``foreach=True`` for torch's default.
        hierarchy: the :class:`~group_prox.Hierarchy` of parameter groups, e.g.
            ``group_prox.hierarchy.resnet(model)``. Every tensor in it must be among ``params``
            (the builders leave frozen parameters out, so the trainable ones are enough).
        penalties: mapping ``level name -> penalty`` (levels without a penalty are not penalised).
            The key ``"global"``, when the hierarchy has no level of that name, stands for one
            group holding every parameter of the hierarchy.
        compiled: fuse the SGD update and the prox into two ``torch.compile``-d passes (see
            :mod:`group_prox.optim.compiled_sgd`): one read of every parameter, gradient and
            momentum buffer computes the new values' atom norms, and looks for NaN and infinite
            values, before anything is written; one more read writes the new values already
            scaled by the prox. The default step instead makes torch's fused pass, a look at the
            gradients, a read for the norms and a read-write to scale. Where the prox is not a
            scaling from atom norms alone (an active elementwise L1 part, a frozen pattern,
            sharded parameters) only the update is compiled. The first compiled step pays the
            compilation (tens of seconds on a CPU for a ResNet-50). Steps where it does not apply
            take the default path: the first step (no momentum buffer yet), a parameter without
            ``grad``, sparse gradients, ``differentiable=True`` or a ``GradScaler``'s fused
            step. Results equal the default path's to float rounding, with the same zeros.
        nonfinite: what a step does when a gradient or a parameter holds a NaN or an infinity,
            found by one read of each before anything is changed. ``"raise"`` (default): a
            ``FloatingPointError`` naming the tensor; parameters and state are untouched.
            ``"skip"``: the whole step is skipped for every parameter, as
            :class:`torch.amp.GradScaler` does, and counted in :attr:`skipped_steps`.
            ``"ignore"``: no look (saves the read, and on an accelerator one synchronisation per
            step; for CUDA-graph capture). A :class:`torch.amp.GradScaler` works in every mode: it
            skips the step when it finds an overflow (with ``fused=True`` the optimizer skips it
            and counts it).

    Notes:
        * With every λ equal to 0 the optimizer is exactly :class:`torch.optim.SGD` with the same
          ``foreach``/``fused`` choice (by default ``torch.optim.SGD(..., fused=True)`` where that
          applies, see ``fused``).
        * All parameters of a group tree must share one ``lr`` (checked at construction and at
          every step, so that schedulers cannot split them).
        * A parameter whose ``grad`` is ``None`` is skipped by the gradient update, as in torch, but
          its groups are still shrunk: the penalty is part of the objective whether or not the loss
          reached the tensor, and a group that spans several tensors (a filter and its BatchNorm
          channel) must be shrunk as one.
        * ``maximize`` flips the gradient only; penalties always pull towards zero.
    """

    checkpoint_kind = OptimizerKind(
        "ProxSGD",
        group_keys=frozenset({"lr", "momentum", "dampening", "weight_decay", "nesterov"}),
        state_required=frozenset(),
        state_allowed=frozenset({"momentum_buffer"}),
    )

    _copied_attributes = (*ProxMixin._copied_attributes, "_compiled_update")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        hierarchy: Hierarchy | None = None,
        penalties: Mapping[str, Penalty] | None = None,
        compiled: bool = False,
        nonfinite: NonFinite = "raise",
    ) -> None:
        params, fused = default_fused(
            params, foreach=foreach, fused=fused, differentiable=differentiable
        )
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self._init_prox(hierarchy, penalties)
        self._init_nonfinite(nonfinite)
        self._compiled_update = CompiledSGDUpdate() if compiled else None

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One SGD update, then the prox of the penalty with step size ``lr``; or, when a gradient
        or parameter is not finite, an error or a skipped step (see ``nonfinite``).

        Args:
            closure: re-evaluates the model and returns the loss (optional, as in torch).
        """
        return self._guarded_step(self._sgd_update, closure, self._fused_update)

    def _fused_update(self) -> bool:
        """With ``compiled=True``, where the prox is a scaling from atom norms alone: the update
        and the prox in two compiled passes (see :mod:`group_prox.optim.compiled_sgd`), the
        first of which also looks for NaN and infinite values before anything is written. False,
        with nothing changed, where this does not apply or a value is not finite."""
        compiled, prox = self._compiled_update, self._prox
        if (
            compiled is None
            or prox is None
            or not prox.scales_from_norms
            or getattr(self, "found_inf", None) is not None
            or not CompiledSGDUpdate.applicable(self.param_groups, self.state)
        ):
            return False
        found = compiled.norms(self.param_groups, self.state, prox)
        # With nonfinite="ignore" nothing waits for the device (CUDA graphs, asynchronous steps).
        checked = self.nonfinite != "ignore"
        if checked and not found.finite():
            return False
        scales = prox.scales(found.atom_sq, self.prox_step_sizes())
        compiled.step(self.param_groups, self.state, prox, scales)
        prox.record(found.atom_sq, finite=checked)
        return True

    def _sgd_update(self) -> None:
        if self._compiled_update is not None and CompiledSGDUpdate.applicable(
            self.param_groups, self.state
        ):
            self._compiled_update.step(self.param_groups, self.state)
        elif self.defaults["fused"] and has_sparse_grad(self.param_groups):
            # torch's fused kernel refuses sparse gradients; foreach computes the same update.
            fused = [g["fused"] for g in self.param_groups]
            try:
                for g in self.param_groups:
                    g["fused"] = False
                _sgd_step(self, None)
            finally:
                for g, f in zip(self.param_groups, fused):
                    g["fused"] = f
        else:
            _sgd_step(self, None)
