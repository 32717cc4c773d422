"""Compression of ``torch.nn`` transformers: dead heads, MLP neurons and sublayers go."""

from __future__ import annotations

from torch import nn

from .plan import Op

__all__ = ["applies", "plan"]


def applies(model: nn.Module) -> bool:
    return False


def plan(model: nn.Module, *, multiple: int = 1) -> list[Op]:
    return []
