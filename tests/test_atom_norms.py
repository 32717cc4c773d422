"""The atom norm reads against a float64 reference, for every way a tensor can be cut into atoms
(whole, elementwise, leading dims, later dims read block by block), every precision."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from group_prox.hierarchy.core import TensorLayout
from group_prox.kernels import AtomNormReader, atom_sq_norms


def _layouts(shapes_dims, dtype):
    layouts, offset = [], 0
    for i, (shape, dims) in enumerate(shapes_dims):
        p = torch.randn(shape, dtype=torch.float64).to(dtype)
        n = int(np.prod([shape[d] for d in dims])) if dims else 1
        layouts.append(TensorLayout(p, f"t{i}", dims, n, offset))
        offset += n
    return layouts, offset


def _reference(lay: TensorLayout) -> np.ndarray:
    x = lay.param.detach().double().numpy()
    if not lay.dims:
        return np.array([np.sum(x * x)])
    rest = tuple(d for d in range(x.ndim) if d not in lay.dims)
    return np.sum(x * x, axis=rest).reshape(-1) if rest else (x * x).reshape(-1)


@st.composite
def cut_tensors(draw):
    out = []
    for _ in range(draw(st.integers(1, 5))):
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
        dims = draw(st.sets(st.integers(0, len(shape) - 1), max_size=2))
        out.append((shape, tuple(sorted(dims))))
    return out


# The fixture only sets a class attribute, which every example sets again.
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut_tensors(), st.sampled_from([1, 2, 7, 1 << 16]))
def test_reads_match_float64_reference(monkeypatch_block, tensors, block):
    monkeypatch_block(block)  # small blocks: the later-dim read runs over many blocks
    for dtype, acc, tol in (
        (torch.float32, torch.float32, 1e-5),
        (torch.float64, torch.float64, 1e-12),
        (torch.bfloat16, torch.float32, 1e-5),
    ):
        layouts, _ = _layouts(tensors, dtype)
        got = atom_sq_norms(layouts, acc).double().numpy()
        want = np.concatenate([_reference(lay) for lay in layouts])
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.fixture
def monkeypatch_block():
    saved = AtomNormReader._BLOCK_NUMEL

    def set_block(n: int) -> None:
        AtomNormReader._BLOCK_NUMEL = n

    yield set_block
    AtomNormReader._BLOCK_NUMEL = saved


def test_reader_reads_current_values_and_never_writes_the_tensors(monkeypatch_block):
    monkeypatch_block(8)
    shapes = [((5, 3, 2), (1,)), ((4, 6), (1,)), ((4, 6), (0,)), ((3,), (0,)), ((2, 2), ())]
    layouts, n = _layouts(shapes, torch.float32)
    before = [lay.param.clone() for lay in layouts]
    reader = AtomNormReader(layouts, torch.empty(n))
    first = reader.read().clone()
    for lay, b in zip(layouts, before):
        assert torch.equal(lay.param, b)
    for lay in layouts:
        lay.param.mul_(2.0)
    torch.testing.assert_close(reader.read(), first * 4)


def test_reader_works_on_parameters_that_require_grad():
    p = torch.nn.Parameter(torch.randn(6, 4))
    lay = TensorLayout(p, "w", (1,), 4, 0)
    got = atom_sq_norms([lay], torch.float32)
    assert not got.requires_grad
    torch.testing.assert_close(got, p.detach().square().sum(0))


@pytest.mark.parametrize("dims", [(0,), (1,), (2,), (0, 2), (1, 2)])
def test_every_single_and_double_cut_of_a_3d_tensor(monkeypatch_block, dims):
    monkeypatch_block(5)
    (lay,), _ = _layouts([((4, 5, 3), dims)], torch.float64)
    want = _reference(lay)
    np.testing.assert_allclose(atom_sq_norms([lay], torch.float64).numpy(), want, rtol=1e-12)
    assert len(list(itertools.product(*(range(lay.param.shape[d]) for d in dims)))) == want.size
