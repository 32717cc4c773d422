"""The selection helpers against their definitions."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from group_prox.selection import group_by_family


@settings(max_examples=80, deadline=None)
@given(
    st.integers(0, 300),
    st.sampled_from([1, 3, 50, 40_000]),  # 40,000 families: past 16-bit keys
    st.integers(0, 2**31 - 1),
)
def test_group_by_family_is_a_stable_sort_by_family_then_order(n, num_families, seed):
    g = torch.Generator().manual_seed(seed)
    family = torch.randint(0, num_families, (n,), generator=g)
    order = torch.randperm(n, generator=g)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n)
    want = torch.argsort(family * max(n, 1) + rank, stable=True)
    assert torch.equal(group_by_family(order, family), want)
