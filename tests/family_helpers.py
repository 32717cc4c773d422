"""Helpers shared by the model-family tests (``tests/test_family_*.py``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def randomise_(model: nn.Module) -> nn.Module:
    """Trained-looking weights: norms' scales near 1, every other parameter ~ N(0, 0.3²), so no
    test leans on an initialisation's zeros or ones (the global seed decides the values)."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.1 * torch.randn_like(p))
        else:
            p.normal_(0, 0.3)
    return model


def train_steps(opt: torch.optim.Optimizer, loss: Callable[[], torch.Tensor], steps: int) -> None:
    """``steps`` optimizer steps on ``loss()``."""
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
