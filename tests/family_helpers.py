"""Helpers shared by the model-family tests (``tests/test_family_*.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

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


@torch.no_grad()
def zero_members(members: Iterable[Any]) -> None:
    """Zero a group's members as a builder lists them (a tensor, or ``(tensor, dim, index)`` with
    an int or a slice), as its penalty does when the group reaches zero."""
    for m in members:
        if isinstance(m, torch.Tensor):
            m.zero_()
            continue
        t, dim, idx = m
        if isinstance(idx, slice):
            t.narrow(dim, idx.start, idx.stop - idx.start).zero_()
        else:
            t.select(dim, idx).zero_()


def train_steps(opt: torch.optim.Optimizer, loss: Callable[[], torch.Tensor], steps: int) -> None:
    """``steps`` optimizer steps on ``loss()``."""
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()


@torch.no_grad()
def randomise_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Trained-looking BatchNorms: equivalence must not rely on the default μ = 0, σ = 1. Returns
    the model in eval mode."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()
