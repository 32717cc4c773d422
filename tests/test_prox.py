"""The hierarchical prox against the NumPy reference and optimality certificates."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import group_prox as gp

from . import reference as ref
from .strategies import random_trees, ref_penalties, to_hierarchy, to_penalty

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _prox_via_optimizer(params, hierarchy, penalties, eta):
    """A step with no gradients is exactly the prox (torch skips params whose grad is None)."""
    opt = gp.ProxSGD(params, lr=eta, hierarchy=hierarchy, penalties=penalties)
    opt.step()
    return np.concatenate([p.detach().double().numpy().ravel() for p in params])


def _setup(tree, seed, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter((torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype))
        for s in tree.shapes
    ]
    v = np.concatenate([p.detach().double().numpy().ravel() for p in params])
    sets, _ = ref.group_index_sets(
        tree.shapes, [[[(t, d, i) for t, d, i in grp] for grp in lv] for lv in tree.levels]
    )
    return params, v, sets


@SETTINGS
@given(
    tree=random_trees(),
    pens=st.lists(st.one_of(st.none(), ref_penalties()), min_size=3, max_size=3),
    eta=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_prox_matches_numpy_reference(tree, pens, eta, seed):
    pens = pens[: len(tree.levels)]
    params, v, sets = _setup(tree, seed)
    h = to_hierarchy(tree, params)
    penalties = {f"level{k}": to_penalty(p) for k, p in enumerate(pens) if p is not None}
    got = _prox_via_optimizer(params, h, penalties, eta)
    want = ref.prox(v, sets, pens, eta)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert np.all((want == 0) <= (got == 0)), "the reference's exact zeros must be exact zeros"


@SETTINGS
@given(
    tree=random_trees(),
    pens=st.lists(
        st.one_of(st.none(), ref_penalties(("lasso", "l1", "sgl"))), min_size=3, max_size=3
    ),
    eta=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_optimality_certificate(tree, pens, eta, seed):
    """For p = prox(v) and a convex Ω: F(u) ≥ F(p) + ½‖u − p‖² for every u."""
    pens = pens[: len(tree.levels)]
    params, v, sets = _setup(tree, seed)
    h = to_hierarchy(tree, params)
    penalties = {f"level{k}": to_penalty(p) for k, p in enumerate(pens) if p is not None}
    p = _prox_via_optimizer(params, h, penalties, eta)
    fp = ref.prox_objective(p, v, sets, pens, eta)
    rng = np.random.default_rng(seed)
    candidates = [v, np.zeros_like(v)]
    for r in (1e-3, 1e-1, 1.0):
        candidates += [p + r * rng.standard_normal(p.size) for _ in range(5)]
    for idx in (s for lv in sets for s in lv):  # u = p with one group zeroed, or restored to v
        u = p.copy()
        u[idx] = 0.0
        candidates.append(u)
        u = p.copy()
        u[idx] = v[idx]
        candidates.append(u)
    for u in candidates:
        fu = ref.prox_objective(u, v, sets, pens, eta)
        assert fu >= fp + 0.5 * np.sum((u - p) ** 2) - 1e-9 * (1 + abs(fu))


def test_uniform_decay_with_lasso_is_exact():
    """Decay covering a whole tree uniformly composes exactly with the tree prox."""
    w = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    h = gp.Hierarchy({"rows": [[(w, 0, i)] for i in range(6)], "all": [[w]]})
    v = w.detach().numpy().ravel().copy()
    sets, _ = ref.group_index_sets([(6, 4)], [[[(0, 0, i)] for i in range(6)], [[(0, None, None)]]])
    pens = [ref.RefPenalty("lasso", 0.3), ref.RefPenalty("decay", 0.7)]
    p = _prox_via_optimizer([w], h, {"rows": gp.GroupLasso(0.3), "all": gp.GroupDecay(0.7)}, 0.5)
    fp = ref.prox_objective(p, v, sets, pens, 0.5)
    rng = np.random.default_rng(0)
    for r in (1e-3, 1e-1, 1.0):
        for _ in range(20):
            u = p + r * rng.standard_normal(p.size)
            assert (
                ref.prox_objective(u, v, sets, pens, 0.5) >= fp + 0.5 * np.sum((u - p) ** 2) - 1e-12
            )


def test_group_lasso_zeroes_exactly_and_keeps_direction():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.float64))
    h = gp.Hierarchy({"rows": [[(w, 0, 0)], [(w, 0, 1)]]})
    gp.ProxSGD([w], lr=1.0, hierarchy=h, penalties={"rows": gp.GroupLasso(1.0, weight=1.0)}).step()
    # row 0: norm 5, threshold 1 -> scale 0.8; row 1: norm 0.5 <= 1 -> exactly zero
    assert torch.equal(w.detach()[1], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(w.detach()[0], torch.tensor([2.4, 3.2], dtype=torch.float64))


def test_nested_levels_zero_whole_tree():
    """A coarse group whose shrunk norm falls under its threshold vanishes with all children."""
    a = torch.nn.Parameter(torch.full((4, 3), 0.1))
    b = torch.nn.Parameter(torch.full((4,), 0.1))
    h = gp.Hierarchy(
        {
            "filters": [[(a, 0, i), (b, 0, i)] for i in range(4)],
            "block": [[a, b]],
        }
    )
    opt = gp.ProxSGD([a, b], lr=0.1, hierarchy=h, penalties={"block": gp.GroupLasso(1.0)})
    opt.step()
    assert (a == 0).all() and (b == 0).all()
    report = opt.get_sparsity_report()
    assert report.levels["block"].zero_groups == 1
    assert report.levels["filters"].zero_groups == 4


def test_mixed_precision_hierarchy_uses_float64_accumulation():
    a = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(3))
    h = gp.Hierarchy({"rows": [[(a, 0, i), (b, 0, i)] for i in range(3)]})
    gp.ProxSGD([a, b], lr=1.0, hierarchy=h, penalties={"rows": gp.GroupLasso(0.2)}).step()
    assert a.dtype == torch.float64 and b.dtype == torch.float32


def test_l0_hard_threshold_uses_size_weight():
    w = torch.nn.Parameter(torch.tensor([[1.0, 1.0], [0.1, 0.1]], dtype=torch.float64))
    h = gp.Hierarchy({"rows": [[(w, 0, 0)], [(w, 0, 1)]]})
    # mean square of row 1 is 0.01 <= 2*eta*lam = 0.02 -> zero; row 0 (1.0) stays untouched
    gp.ProxSGD([w], lr=0.1, hierarchy=h, penalties={"rows": gp.GroupL0(0.1)}).step()
    assert w[1].abs().sum() == 0 and torch.equal(w.detach()[0], torch.ones(2, dtype=torch.float64))


def test_zero_lambda_touches_nothing():
    w = torch.nn.Parameter(torch.randn(4, 4))
    before = w.detach().clone()
    h = gp.Hierarchy({"rows": [[(w, 0, i)] for i in range(4)]})
    gp.ProxSGD([w], lr=1.0, hierarchy=h, penalties={"rows": gp.GroupLasso(0.0)}).step()
    assert torch.equal(w.detach(), before)


def test_lambda_can_change_between_steps():
    w = torch.nn.Parameter(torch.ones(2, 2))
    h = gp.Hierarchy({"rows": [[(w, 0, i)] for i in range(2)]})
    opt = gp.ProxSGD([w], lr=1.0, hierarchy=h, penalties={"rows": gp.GroupLasso(0.0)})
    opt.step()
    assert (w == 1).all()
    opt.penalties["rows"].lam = 10.0
    opt.step()
    assert (w == 0).all()


def test_elementwise_part_only_touches_its_level():
    """L1 on the rows of one tensor must not threshold the other tensor of the same tree."""
    a = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    v = np.concatenate([a.detach().numpy().ravel(), b.detach().numpy().ravel()])
    h = gp.Hierarchy({"rows": [[(a, 0, i)] for i in range(3)], "tree": [[a, b]]})
    pens = {"rows": gp.L1(0.3), "tree": gp.GroupLasso(0.05)}
    got = _prox_via_optimizer([a, b], h, pens, 0.5)
    sets, _ = ref.group_index_sets(
        [(3, 2), (5,)], [[[(0, 0, i)] for i in range(3)], [[(0, None, None), (1, None, None)]]]
    )
    want = ref.prox(v, sets, [ref.RefPenalty("l1", 0.3), ref.RefPenalty("lasso", 0.05)], 0.5)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
