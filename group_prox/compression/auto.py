"""Compression of any traceable model through Torch-Pruning's dependency graph."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..hierarchy import Hierarchy
from .plan import Op

__all__ = ["built_by_auto", "example_inputs_of", "plan"]


def built_by_auto(hierarchy: Hierarchy | None) -> bool:
    return False


def example_inputs_of(hierarchy: Hierarchy | None) -> Any:
    return None


def plan(
    model: nn.Module, example_inputs: Any, hierarchy: Hierarchy | None, *, multiple: int = 1
) -> list[Op]:
    raise NotImplementedError
