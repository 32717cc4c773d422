"""What both callbacks share: building the target once its optimizer exists."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..optim import ProxAdam, ProxSGD
from ..target import SparsityTarget

TargetSpec = SparsityTarget | Callable[[torch.optim.Optimizer], SparsityTarget]


def check_spec(target: object, owner: str) -> None:
    if not isinstance(target, SparsityTarget) and not callable(target):
        raise TypeError(
            f"{owner}: expected a group_prox.SparsityTarget, or a function building one from the "
            f"optimizer (lambda opt: group_prox.SparsityTarget(opt, ...)); got "
            f"{type(target).__name__}."
        )


def unwrap(optimizer: Any) -> Any:
    """The optimizer under a framework's wrapper (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``)."""
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def build(target: TargetSpec, optimizers: Iterable[Any], owner: str) -> SparsityTarget:
    """``target`` itself, or what it builds from the one group_prox optimizer among
    ``optimizers``; refused if that optimizer is not the one the framework steps."""
    found = [unwrap(o) for o in optimizers]
    prox = [o for o in found if isinstance(o, ProxSGD | ProxAdam)]
    if isinstance(target, SparsityTarget):
        if prox and not any(o is target.optimizer for o in prox):
            raise ValueError(
                f"{owner}: the SparsityTarget drives another optimizer than the one the trainer "
                "steps; build the target on the optimizer you give the trainer."
            )
        return target
    if len(prox) != 1:
        raise ValueError(
            f"{owner}: to build the SparsityTarget the trainer must step exactly one group_prox "
            f"optimizer (ProxSGD or ProxAdam), found {len(prox)} among "
            f"{[type(o).__name__ for o in found]}."
        )
    built = target(prox[0])
    if not isinstance(built, SparsityTarget):
        raise TypeError(
            f"{owner}: the function given must return a group_prox.SparsityTarget, got "
            f"{type(built).__name__}."
        )
    return built
