"""``removable``: what :func:`~group_prox.compress` would remove from a model now, without doing it.

Exact zeros are not all removable: a zero filter that writes into a residual stream stays unless
the stream channel is dead in every layer that writes it, a zero head's projection stays unless the
whole head is dead. "Parameters removed" must mean the same thing in the sparsity report, in
:class:`~group_prox.SparsityTarget` and after :func:`~group_prox.compress`, so all three ask the
same planner: the plan :func:`~group_prox.compression.compression_plan` reads from the zeros is
applied to a copy of the model on the ``meta`` device (no weight is copied or allocated) and the
copy is counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..hierarchy import Hierarchy
from ..inputs import ExampleInputs, check, like_model
from .api import compression_plan
from .plan import CompressionPlan, meta_copy
from .report import count_flops, count_params

__all__ = ["Removable", "removable"]


@dataclass(frozen=True)
class Removable:
    """The sizes of a model and of the model :func:`~group_prox.compress` would return now.

    Attributes:
        params: parameter scalars of the model.
        params_left: parameter scalars left after compression.
        flops: FLOPs of one forward pass on the example inputs (``None`` if not counted).
        flops_left: the same after compression.
        plan: the edits compression would make.
    """

    params: int
    params_left: int
    flops: int | None
    flops_left: int | None
    plan: CompressionPlan

    @property
    def params_removed(self) -> float:
        """The fraction of the parameters that compression removes, in ``[0, 1]``."""
        return 1.0 - self.params_left / self.params if self.params else 0.0

    @property
    def flops_removed(self) -> float | None:
        """The fraction of the FLOPs that compression removes (``None`` if not counted)."""
        if self.flops is None or self.flops_left is None:
            return None
        return 1.0 - self.flops_left / self.flops if self.flops else 0.0


@torch.no_grad()
def removable(
    model: nn.Module,
    hierarchy: Hierarchy | None = None,
    *,
    example_inputs: ExampleInputs | None = None,
    flops: bool = False,
    multiple: int = 1,
) -> Removable:
    """What :func:`~group_prox.compress` would remove from ``model`` now.

    Args:
        model: the sparse model (it is not changed).
        hierarchy: the hierarchy it is trained with (as for :func:`~group_prox.compress`).
        example_inputs: inputs for models of no known family (their dependencies are traced), and
            for counting FLOPs.
        flops: also count FLOPs (needs ``example_inputs``); the forward passes run on ``meta``
            copies, so they cost no arithmetic.
        multiple: as for :func:`~group_prox.compress`.

    Returns:
        A :class:`Removable`; ``removable(...).params_removed`` equals
        ``1 − count_params(compress(...)) / count_params(model)``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if FLOPs are asked for without ``example_inputs``, or the model has no known
            family and no ``example_inputs`` to trace.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"removable(): expected an nn.Module, got {type(model).__name__}.")
    check(example_inputs, "removable()")
    if flops and example_inputs is None:
        raise ValueError(
            "removable(): counting FLOPs runs the model; pass example_inputs=... (a batch of "
            "one is enough)."
        )
    plan = compression_plan(model, hierarchy, example_inputs=example_inputs, multiple=multiple)
    # Copies counted in eval mode: a batch of one is enough for BatchNorm, and the user's model
    # keeps its mode.
    after = plan.apply(meta_copy(model)).eval()
    flops_before = flops_after = None
    if flops:
        before = meta_copy(model).eval()
        inputs = like_model(example_inputs, before)  # onto the meta device
        flops_before, flops_after = count_flops(before, inputs), count_flops(after, inputs)
    return Removable(
        params=count_params(model),
        params_left=count_params(after),
        flops=flops_before,
        flops_left=flops_after,
        plan=plan,
    )
