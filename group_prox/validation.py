"""Argument checks shared by every entry point.

Each function returns the value in its canonical type (``int``, ``float``, ``str``) or raises a
``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong value) whose message
starts with ``owner`` (the class or function the user called) and names the argument, so that the
user knows what to change. ``bool`` is refused wherever a number is expected: ``True`` is an
``int`` to Python, but never what a user meant by a step count or a fraction.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor

__all__ = [
    "check_bool",
    "check_choice",
    "check_fraction",
    "check_int",
    "check_positive",
    "check_real",
]

_S = TypeVar("_S", bound=str)


def check_real(value: object, owner: str, name: str) -> float:
    """``value`` as a float: a real number (numpy's included) or a 0-dim real tensor, so that a
    scheduler's tensor can be passed directly."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(
                f"{owner}: {name} must be a real number or a 0-dim real tensor, got a tensor of "
                f"shape {tuple(value.shape)} and dtype {value.dtype}."
            )
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{owner}: {name} must be a real number, got {type(value).__name__} {value!r}."
        )
    return float(value)


def check_int(value: object, owner: str, name: str, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (not a ``bool``), at least ``minimum`` if given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: {name} must be at least {minimum}, got {value}.")
    return int(value)


def check_positive(value: object, owner: str, name: str) -> float:
    """``value`` as a finite ``float > 0``."""
    number = check_real(value, owner, name)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{owner}: {name} must be positive and finite, got {number}.")
    return number


def check_fraction(
    value: object, owner: str, name: str, *, closed_low: bool = True, closed_high: bool = False
) -> float:
    """``value`` as a ``float`` in ``[0, 1)`` (``closed_low``/``closed_high`` choose the ends)."""
    number = check_real(value, owner, name)
    low_ok = number >= 0 if closed_low else number > 0
    high_ok = number <= 1 if closed_high else number < 1
    if not (math.isfinite(number) and low_ok and high_ok):
        interval = f"{'[' if closed_low else '('}0, 1{']' if closed_high else ')'}"
        raise ValueError(f"{owner}: {name} must be a fraction in {interval}, got {number!r}.")
    return number


def check_choice(value: object, owner: str, name: str, choices: Sequence[_S]) -> _S:
    """``value`` if it is one of the strings ``choices``."""
    if not isinstance(value, str):
        raise TypeError(
            f"{owner}: {name} must be one of {tuple(choices)}, got {type(value).__name__} "
            f"{value!r}."
        )
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {tuple(choices)}, got {value!r}.")
    return value  # type: ignore[return-value]


def check_bool(value: object, owner: str, name: str) -> bool:
    """``value`` if it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r}.")
    return value
