"""One exact comparison of nested state (dicts, lists, tensors, plain values) for the tests."""

from __future__ import annotations

from typing import Any

import torch


def assert_identical(a: Any, b: Any, where: str = "", *, equal_nan: bool = False) -> None:
    """``a`` and ``b`` are equal bit for bit: same keys, lengths, dtypes and shapes, equal values.
    With ``equal_nan``, NaNs in the same places count as equal (state that held NaN before a
    refused step must hold it after)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: a tensor became {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if equal_nan and a.is_floating_point():
            assert torch.equal(a.isnan(), b.isnan()), f"{where}: NaNs moved"
            a, b = (
                a.nan_to_num(0.0, torch.inf, -torch.inf),
                b.nan_to_num(0.0, torch.inf, -torch.inf),
            )
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}", equal_nan=equal_nan)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]", equal_nan=equal_nan)
    else:
        assert a == b, where
