"""The feedback law of :class:`~group_prox.SparsityTarget`: a first λ, and how λ follows the error.

Pure arithmetic on a few numbers, testable without training.

* :func:`initial_lam` sets the first λ from the group norms, so that the shrinkage alone would zero
  the target quantile of the groups over the ramp: the controller is thus indifferent to the
  scale of λ (ProxSGD and ProxAdam need λs orders of magnitude apart).
* :class:`LamController` moves λ multiplicatively, ``λ ← λ·exp(r·clip(gain·e, −fall, rise))`` per
  step, with ``e`` the wanted minus the measured share and ``r`` the step-size rate (below).
  λ never jumps; it rises while the zeros lag behind the schedule and falls back, more slowly,
  when they run ahead.
* The *step-size rate* ``r = η/η_ref ∈ [0, 1]`` (``η_ref`` the largest prox step size seen since
  calibration) scales each change: the prox shrinks by ``η·λ``, so while the learning rate is 0 (a
  warm-up from 0, a paused schedule) nothing can happen, and λ must neither rise for it nor stall
  afterwards; while it is small, λ moves slowly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .validation import check_positive

__all__ = ["LamController", "initial_lam", "step_size_rate"]


def initial_lam(rel_norm: Tensor, eta: Tensor, quantile: float, steps: int) -> float | None:
    r"""``λ₀ = quantile_q(‖x_g‖ / (w_g·η_g)) / steps`` over the groups with ``η_g > 0``: the λ
    whose shrinkage alone, ``η·λ·w_g`` per step, would zero the ``q``-quantile of the groups in
    ``steps`` steps. ``rel_norm`` is ``‖x_g‖/w_g``; ``q`` is clipped to ``[0.05, 0.95]``.
    ``None`` when no group has a positive step size."""
    alive = eta > 0
    if not bool(alive.any()):
        return None
    ratio = (rel_norm / eta.clamp_min(torch.finfo(eta.dtype).tiny))[alive]
    q = float(torch.quantile(ratio.double(), min(max(quantile, 0.05), 0.95)))
    return q / max(1, steps)


def step_size_rate(eta: float, eta_ref: float) -> float:
    """``η / η_ref`` in ``[0, 1]`` (0 when ``η_ref`` is 0)."""
    if eta_ref <= 0:
        return 0.0
    return min(1.0, max(0.0, eta / eta_ref))


@dataclass(frozen=True)
class LamController:
    """``λ ← λ·exp(rate·clip(gain·error, −max_fall, max_rise)·steps)``.

    Args:
        gain: log-λ change per step per unit of error (the wanted minus the measured share).
        max_rise: the largest log-λ rise per step.
        max_fall: the largest log-λ fall per step.
    """

    gain: float
    max_rise: float
    max_fall: float
    owner: str = "LamController"

    def __post_init__(self) -> None:
        for name in ("gain", "max_rise", "max_fall"):
            object.__setattr__(self, name, check_positive(getattr(self, name), self.owner, name))

    def update(self, lam: float, error: float, *, steps: int = 1, rate: float = 1.0) -> float:
        """The next λ after ``steps`` steps with this ``error`` and step-size ``rate``."""
        change = max(-self.max_fall, min(self.max_rise, self.gain * error))
        return lam * math.exp(change * rate * steps)
