"""SparsitySchedule: how much of a sparsity target is wanted at each step.

Pure arithmetic on step counts, used by :class:`~group_prox.SparsityTarget` and testable without
a model. Phases, for ``t`` steps taken so far:

* *warm-up*, ``t < warmup_steps``: nothing is wanted (no shrinkage);
* *ramp*, ``warmup_steps ≤ t < reach_step``: the wanted share of the target rises from 0 to 1
  along ``s(u)``, ``u = (t − warmup_steps)/(reach_step − warmup_steps)``: ``"cubic"``
  ``1 − (1 − u)³`` (fast while the network is redundant, gentle at the end), ``"linear"`` ``u``
  or ``"cosine"`` ``(1 − cos πu)/2``;
* *hold*, ``reach_step ≤ t < freeze_step``: the whole target is wanted;
* *frozen*, ``t ≥ freeze_step`` (if given): the zero pattern is frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .validation import check_choice, check_int

__all__ = ["RAMPS", "Phase", "Ramp", "SparsitySchedule"]

Ramp = Literal["cubic", "linear", "cosine"]
Phase = Literal["warmup", "ramp", "hold", "frozen"]
RAMPS: tuple[Ramp, ...] = ("cubic", "linear", "cosine")


@dataclass(frozen=True)
class SparsitySchedule:
    """Warm-up, ramp, hold and freeze, counted in steps (see the module docstring).

    Raises:
        TypeError, ValueError: for steps that are not ints, out of order (``warmup_steps <
        reach_step ≤ freeze_step``), or an unknown ramp.
    """

    reach_step: int
    warmup_steps: int = 0
    freeze_step: int | None = None
    ramp: Ramp = "cubic"
    owner: str = "SparsitySchedule"

    def __post_init__(self) -> None:
        warmup = check_int(self.warmup_steps, self.owner, "warmup_steps", 0)
        reach = check_int(self.reach_step, self.owner, "reach_step", warmup + 1)
        freeze = (
            None
            if self.freeze_step is None
            else check_int(self.freeze_step, self.owner, "freeze_step", reach)
        )
        check_choice(self.ramp, self.owner, "ramp", RAMPS)
        object.__setattr__(self, "warmup_steps", warmup)
        object.__setattr__(self, "reach_step", reach)
        object.__setattr__(self, "freeze_step", freeze)

    @property
    def ramp_steps(self) -> int:
        """``reach_step − warmup_steps``, the length of the ramp."""
        return self.reach_step - self.warmup_steps

    def phase(self, step: int) -> Phase:
        """The phase of the step after ``step`` steps were taken."""
        if self.freeze_step is not None and step >= self.freeze_step:
            return "frozen"
        if step < self.warmup_steps:
            return "warmup"
        return "ramp" if step < self.reach_step else "hold"

    def share(self, step: int) -> float:
        """The share ``s(u) ∈ [0, 1]`` of the target wanted after ``step`` steps."""
        if step < self.warmup_steps:
            return 0.0
        u = min(1.0, (step - self.warmup_steps) / self.ramp_steps)
        if self.ramp == "cubic":
            return 1.0 - (1.0 - u) ** 3
        if self.ramp == "cosine":
            return (1.0 - math.cos(math.pi * u)) / 2.0
        return u
