"""Edge values: a step of size 0 is the identity, no λ writes a non-finite value, SparsityTarget
holds λ while lr is 0, meta-device parameters are refused before any step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import group_prox as gp

from . import reference as ref
from .strategies import random_trees, to_hierarchy, to_penalty

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("lasso", "l1", "sgl", "decay", "l0")


def _params(tree, seed: int, dtype: torch.dtype) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype))
        for s in tree.shapes
    ]


@SETTINGS
@given(
    tree=random_trees(),
    kinds=st.lists(st.sampled_from(KINDS), min_size=3, max_size=3),
    log_lam=st.floats(-30, 300),
    l1_ratio=st.floats(0.0, 1.0),
    eta=st.sampled_from([0.0, 1e-45, 1e-3, 0.5, 1e30]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_no_lambda_or_step_size_writes_a_non_finite_value(
    tree, kinds, log_lam, l1_ratio, eta, dtype, seed
):
    params = _params(tree, seed, dtype)
    before = [p.detach().clone() for p in params]
    pens = [ref.RefPenalty(k, 10.0**log_lam, l1_ratio) for k in kinds[: len(tree.levels)]]
    penalties = {f"level{i}": to_penalty(p) for i, p in enumerate(pens)}
    if dtype == torch.bfloat16 and eta == 1e-45:
        eta = 1e-38  # the smallest step a float32 lr tensor holds is beside the point here
    opt = gp.ProxSGD(params, lr=eta, hierarchy=to_hierarchy(tree, params), penalties=penalties)
    opt.step()  # no gradients: the step is the prox alone
    for p, b in zip(params, before):
        assert torch.isfinite(p).all()
        if eta == 0:
            assert torch.equal(p, b), "a step of size 0 must be the identity"
    if dtype == torch.float64:
        v = np.concatenate([b.double().numpy().ravel() for b in before])
        sets, _ = ref.group_index_sets(
            tree.shapes, [[list(grp) for grp in lv] for lv in tree.levels]
        )
        with np.errstate(all="ignore"):
            want = ref.prox(v, sets, pens, eta)
        if np.all(np.isfinite(want)):
            got = np.concatenate([p.detach().numpy().ravel() for p in params])
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize(
    "penalty",
    [
        gp.GroupLasso(1e300),
        gp.L1(1e300),
        gp.SparseGroupLasso(1e300, 0.5),
        gp.GroupDecay(1e300),
        gp.GroupL0(1e300),
    ],
    ids=repr,
)
@pytest.mark.parametrize("cls", [gp.ProxSGD, gp.ProxAdam])
def test_lr_zero_with_a_lambda_beyond_float32_is_the_identity(cls, penalty):
    torch.manual_seed(0)
    m = nn.Linear(4, 6)
    h = gp.Hierarchy(
        {"unit": {f"u{i}": [(m.weight, 0, i), (m.bias, 0, i)] for i in range(6)}}, names=m
    )
    kw = {"weight_decay": 0.0} if cls is gp.ProxAdam else {}
    opt = cls(m.parameters(), lr=0.0, hierarchy=h, penalties={"unit": penalty}, **kw)
    before = [p.detach().clone() for p in m.parameters()]
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p.detach(), b)
    # With a step, the same λ zeroes every group, and writes no NaN.
    opt.param_groups[0]["lr"] = 1e-3
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert torch.isfinite(m.weight).all() and torch.isfinite(m.bias).all()
    if not isinstance(penalty, gp.GroupDecay):
        assert not m.weight.detach().any()


def test_preconditioner_metric_at_lr_zero_is_the_identity():
    torch.manual_seed(0)
    m = nn.Linear(4, 6)
    h = gp.Hierarchy({"unit": {f"u{i}": [(m.weight, 0, i)] for i in range(6)}}, names=m)
    opt = gp.ProxAdam(
        m.parameters(), lr=0.0, weight_decay=0.0, prox_metric="preconditioner", hierarchy=h,
        penalties={"unit": gp.SparseGroupLasso(1e300, 0.3)},
    )  # fmt: skip
    before = m.weight.detach().clone()
    for _ in range(2):
        m(torch.randn(3, 4)).sum().backward()
        opt.step()
    assert torch.equal(m.weight.detach(), before)


# ------------------------------------------------------------------ SparsityTarget at lr = 0
def _setup(seed: int = 0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 3))
    units = {f"u{i}": [(m[0].weight, 0, i), (m[0].bias, 0, i)] for i in range(24)}
    h = gp.Hierarchy({"unit": units}, names=m)
    opt = gp.ProxSGD(
        m.parameters(), lr=0.05, momentum=0.9, hierarchy=h, penalties={"unit": gp.GroupLasso(0.0)}
    )
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, :3] * 2).argmax(1)
    return m, opt, x, y


def _train(m, opt, target, x, y, lrs):
    lams, zeros = [], []
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        target.step()
        lams.append(target.multiplier["unit"])  # None until calibrated
        zeros.append(int((m[0].weight.detach() == 0).all(1).sum()))
    return lams, zeros


def test_target_calibrates_after_a_warmup_from_lr_zero():
    m, opt, x, y = _setup()
    target = gp.SparsityTarget(opt, {"unit": 0.5}, warmup_steps=2, reach_step=40)
    lams, zeros = _train(m, opt, target, x, y, [0.0] * 10 + [0.05] * 50)
    assert all(lam is None for lam in lams[:10]), "no λ is calibrated while lr is 0"
    assert lams[10] is not None and lams[10] > 0
    assert zeros[-1] == 12, "the target is reached once lr is positive"


def test_target_holds_lambda_while_lr_is_paused():
    m, opt, x, y = _setup()
    target = gp.SparsityTarget(opt, {"unit": 0.5}, warmup_steps=2, reach_step=40)
    lams, zeros = _train(m, opt, target, x, y, [0.05] * 10 + [0.0] * 15 + [0.05] * 35)
    assert lams[9] is not None
    assert all(lam == lams[9] for lam in lams[10:25]), "λ is held while lr is 0"
    assert zeros[10:25] == [zeros[9]] * 15, "nothing is zeroed while lr is 0"
    assert math.isfinite(max(lams[25:])) and zeros[-1] == 12


# ------------------------------------------------------------------------------ meta device
@pytest.mark.parametrize("cls", [gp.ProxSGD, gp.ProxAdam])
def test_meta_parameters_in_the_hierarchy_are_refused_at_construction(cls):
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    h = gp.Hierarchy({"unit": {f"u{i}": [(m[0].weight, 0, i)] for i in range(6)}}, names=m)
    with pytest.raises(ValueError, match=r"'0\.weight' is on the meta device.*to_empty"):
        cls(m.parameters(), lr=0.1, hierarchy=h, penalties={"unit": gp.GroupLasso(0.1)})
    cls(m.parameters(), lr=0.1)  # without a hierarchy, as torch's optimizers
