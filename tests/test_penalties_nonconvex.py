"""GroupMCP, GroupSCAD and GroupLogSum: their closed-form proxes against a brute-force 1-D
minimisation per group and against NumPy closed forms (tests/reference.py), edge values,
equivalences with the group lasso, ProxSGD (eager and compiled) and ProxAdam on small
hierarchies, and the penalties' state, copies and validation."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import group_prox as gp

from . import reference as ref
from .strategies import random_trees, to_hierarchy

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

CLASSES = {"mcp": gp.GroupMCP, "scad": gp.GroupSCAD, "logsum": gp.GroupLogSum}
SHAPE_NAME = {"mcp": "gamma", "scad": "a", "logsum": "eps"}


def make(kind: str, lam: float, shape: float, **kw) -> gp.Penalty:
    return CLASSES[kind](lam, shape, **kw)


def closed_form(pen, norms, eta, lam_w_over_lam):
    """ρ = scale·r from ``group_scale`` on float64 tensors, one entry per norm."""
    r = torch.as_tensor(np.asarray(norms, dtype=np.float64))
    w = torch.full_like(r, lam_w_over_lam)
    scale = pen.group_scale(r.square(), torch.full_like(r, eta), w)
    assert scale.dtype == torch.float64
    assert torch.isfinite(scale).all() and (scale >= 0).all() and (scale <= 1).all()
    return (scale * r).numpy(), scale.numpy()


def is_unique(kind: str, eta: float, lam_w: float, shape: float) -> bool:
    """Whether the 1-D prox problem is convex with a margin (then its minimiser is unique and
    the brute force finds it to about 1e-7 relative)."""
    if kind == "mcp":
        return eta < 0.9 * shape
    if kind == "scad":
        return eta < 0.9 * (shape - 1)
    return eta * lam_w <= 0.9 * shape**2


SHAPES = {
    "mcp": st.floats(0.05, 10.0),
    "scad": st.floats(1.05, 8.0),
    "logsum": st.floats(0.01, 3.0),
}


@st.composite
def problems(draw):
    kind = draw(st.sampled_from(sorted(CLASSES)))
    norms = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 20.0)), min_size=1, max_size=12))
    return (
        kind,
        norms,
        draw(st.floats(0.0, 5.0)),  # eta
        draw(st.floats(0.0, 3.0)),  # lam
        draw(st.sampled_from([1.0, 0.5, math.sqrt(7.0)])),  # w_g
        draw(SHAPES[kind]),
    )


# ---------------------------------------------------------------- the 1-D problem per group
@SETTINGS
@given(problem=problems())
def test_closed_form_is_the_brute_force_minimiser(problem):
    kind, norms, eta, lam, w, shape = problem
    pen = make(kind, lam, shape, weight=w)
    rho, _ = closed_form(pen, norms, eta, w)
    P = ref.NORM_PENALTIES[kind]
    penalty = lambda t: P(t, lam * w, shape)  # noqa: E731
    unique = is_unique(kind, eta, lam * w, shape)
    for r, got in zip(norms, rho):
        assert 0.0 <= got <= r
        want = ref.prox_norm_brute(r, eta, penalty)
        f_got = float(ref.prox_objective_1d(got, r, eta, penalty))
        f_want = float(ref.prox_objective_1d(want, r, eta, penalty))
        # Optimal: no point of the refined grid does better (so neither does the plain grid).
        assert f_got <= f_want + 1e-12 * (1.0 + r * r), (r, got, want)
        plain = ref.prox_objective_1d(np.linspace(0.0, r, 20001), r, eta, penalty)
        assert f_got <= float(plain.min()) + 1e-12 * (1.0 + r * r)
        if unique:
            assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_piecewise_formulas_at_unit_weight(kind):
    """The documented pieces, on norms picked inside each piece (λ = 1, w = 1, eta = 0.5)."""
    eta = 0.5
    if kind == "mcp":
        pen, r = gp.GroupMCP(1.0, 3.0, weight=1.0), [0.3, 0.5, 1.0, 2.5, 3.0, 3.5]
        want = [0, 0, 0.5 / (1 - eta / 3), 2.0 / (1 - eta / 3), 3.0, 3.5]
    elif kind == "scad":
        pen, r = gp.GroupSCAD(1.0, 3.7, weight=1.0), [0.4, 1.0, 1.5, 2.0, 3.7, 5.0]
        mid = lambda t: (2.7 * t - 3.7 * eta) / (2.7 - eta)  # noqa: E731
        want = [0, 0.5, 1.0, mid(2.0), 3.7, 5.0]
    else:
        pen, r = gp.GroupLogSum(1.0, 1.0, weight=1.0), [0.4, 0.5, 1.0, 4.0]
        root = lambda t: 0.5 * ((t - 1) + math.sqrt((t + 1) ** 2 - 2))  # noqa: E731
        want = [0, 0, root(1.0), root(4.0)]
    got, _ = closed_form(pen, r, eta, 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)


def test_unshrunk_above_the_knee_is_exactly_the_identity():
    r = np.array([3.0 + 1e-9, 4.0, 1e3, 1e30])
    for pen in (gp.GroupMCP(1.0, 3.0, weight=1.0), gp.GroupSCAD(1.0, 3.0, weight=1.0)):
        for eta in (1e-3, 0.5, 1.9):
            _, scale = closed_form(pen, r, eta, 1.0)
            assert (scale == 1.0).all(), (pen, eta)


def test_large_steps_are_hard_thresholds():
    """MCP at eta ≥ γ keeps a group iff r > sqrt(eta·γ)·λw; SCAD at eta ≥ a − 1 keeps it
    unchanged iff it beats ρ₁, else returns ρ₁ = min(max(r − τ, 0), λw)."""
    eta, gamma = 4.0, 1.0
    r = np.array([1.9, 1.99, 2.01, 3.0])  # sqrt(4·1)·1 = 2
    _, scale = closed_form(gp.GroupMCP(1.0, gamma, weight=1.0), r, eta, 1.0)
    np.testing.assert_array_equal(scale, [0, 0, 1, 1])
    # SCAD a = 2, eta = 3 (τ = 3): ρ₁ = clip(r − 3, 0, 1) costs at least 4.5 = f(r) for r > 3;
    # for r ≤ 3, ρ₁ = 0 costs r²/2 ≤ 4.5.
    rho, _ = closed_form(gp.GroupSCAD(1.0, 2.0, weight=1.0), [2.5, 2.99, 3.01, 4.0], 3.0, 1.0)
    np.testing.assert_array_equal(rho, [0.0, 0.0, 3.01, 4.0])
    # a = 2, eta = 1 = a − 1 (linear middle): Fan and Li's soft threshold up to 2λ, then r.
    rho, _ = closed_form(gp.GroupSCAD(1.0, 2.0, weight=1.0), [0.8, 1.5, 1.99, 2.01], 1.0, 1.0)
    np.testing.assert_allclose(rho, [0.0, 0.5, 0.99, 2.01], rtol=1e-14)


# ---------------------------------------------------------------------------- edge values
EXTREMES = [0.0, 1e-300, 1e-20, 1.0, 1e20, 1e300]


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_no_extreme_value_gives_a_non_finite_scale(kind):
    sq = torch.tensor([0.0, 1e-300, 1e-8, 1.0, 1e8, 1e300], dtype=torch.float64)
    for eta in EXTREMES:
        for lam in EXTREMES:
            for w in (0.0, 1.0, 1e10):
                pen = make(kind, lam, {"mcp": 3.0, "scad": 3.7, "logsum": 0.1}[kind])
                scale = pen.group_scale(sq, torch.full_like(sq, eta), torch.full_like(sq, w))
                assert torch.isfinite(scale).all() and (scale >= 0).all() and (scale <= 1).all()
                if eta == 0 or lam == 0 or w == 0:
                    assert (scale[1:] == 1).all(), (eta, lam, w, scale)
                if eta * lam * w >= 1e200:
                    assert (scale[:-1] == 0).all(), (eta, lam, w, scale)


def _layer(dtype, device="cpu"):
    torch.manual_seed(0)
    m = nn.Linear(5, 8).to(device=device, dtype=dtype)
    h = gp.Hierarchy(
        {
            "unit": {f"u{i}": [(m.weight, 0, i), (m.bias, 0, i)] for i in range(8)},
            "layer": {"all": [m.weight, m.bias]},
        },
        names=m,
    )
    return m, h


@pytest.mark.parametrize("kind", sorted(CLASSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_step_zero_and_lambda_zero_are_the_identity(kind, dtype):
    shape = {"mcp": 0.5, "scad": 1.5, "logsum": 0.5}[kind]
    for lr, lam in ((0.0, 1e300), (0.0, 0.5), (0.5, 0.0)):
        m, h = _layer(dtype)
        pens = {"unit": make(kind, lam, shape), "layer": make(kind, lam, shape)}
        before = [p.detach().clone() for p in m.parameters()]
        gp.ProxSGD(m.parameters(), lr=lr, hierarchy=h, penalties=pens).step()
        for p, b in zip(m.parameters(), before):
            assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("kind", sorted(CLASSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_huge_lambda_zeroes_everything_and_empty_groups_stay_empty(kind, dtype):
    m, h = _layer(dtype)
    with torch.no_grad():
        m.weight[2] = 0
        m.bias[2] = 0
    shape = {"mcp": 0.5, "scad": 1.5, "logsum": 0.5}[kind]
    pens = {"unit": make(kind, 1e300, shape)}
    gp.ProxSGD(m.parameters(), lr=1e-3, hierarchy=h, penalties=pens).step()
    assert not m.weight.detach().any() and not m.bias.detach().any()
    m, h = _layer(dtype)
    with torch.no_grad():
        m.weight[2] = 0
        m.bias[2] = 0
    gp.ProxSGD(
        m.parameters(), lr=0.1, hierarchy=h, penalties={"unit": make(kind, 1e-3, shape)}
    ).step()
    assert torch.isfinite(m.weight).all() and torch.isfinite(m.bias).all()
    assert not m.weight[2].any() and not m.bias[2].any()


@pytest.mark.parametrize("kind", sorted(CLASSES))
@pytest.mark.parametrize(
    "dtype,rtol", [(torch.float64, 1e-13), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)]
)
@pytest.mark.parametrize("device", DEVICES)
def test_precisions_match_the_float64_closed_form(kind, dtype, rtol, device):
    """Rows of known norms (one per piece of each prox); the result in each precision equals
    the float64 prox of the rounded input, to the precision's rounding, zeros exactly."""
    # τ = 0.05; MCP knee 0.15; SCAD knees 0.15 and 0.3; log-sum zero below τ/ε = 1/6.
    norms = [0.03, 0.08, 0.12, 0.2, 0.25, 0.5, 1.4, 6.0]
    g = torch.Generator().manual_seed(1)
    direction = torch.nn.functional.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64))
    w = nn.Parameter((direction * torch.tensor(norms, dtype=torch.float64)[:, None]).to(dtype))
    w = nn.Parameter(w.detach().to(device))
    v = w.detach().double().cpu().clone()
    h = gp.Hierarchy({"rows": [[(w, 0, i)] for i in range(8)]})
    pen = make(kind, 0.1, {"mcp": 1.5, "scad": 3.0, "logsum": 0.3}[kind], weight=1.0)
    gp.ProxSGD([w], lr=0.5, hierarchy=h, penalties={"rows": pen}).step()
    _, scale = closed_form(pen, v.norm(dim=1).numpy(), 0.5, 1.0)
    want = v * torch.from_numpy(scale)[:, None]
    got = w.detach().double().cpu()
    torch.testing.assert_close(got, want, rtol=rtol, atol=0.0)
    assert torch.equal(got == 0, want == 0)
    assert (scale == 0).any() and ((scale == 1).any() or kind == "logsum")


# --------------------------------------------------------------- equivalences, composition
def _random_params(tree, seed):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in tree.shapes]


def _prox(params, hierarchy, penalties, eta):
    gp.ProxSGD(params, lr=eta, hierarchy=hierarchy, penalties=penalties).step()
    return np.concatenate([p.detach().numpy().ravel() for p in params])


@SETTINGS
@given(
    tree=random_trees(),
    lams=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
    eta=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_limits_are_the_group_lasso(tree, lams, eta, seed):
    """MCP with γ → ∞, SCAD with a → ∞ and log-sum with λε·log(1 + r/ε), ε → ∞, are the group
    lasso, level by level on a tree."""
    levels = [f"level{k}" for k in range(len(tree.levels))]
    lasso_params = _random_params(tree, seed)
    want = _prox(
        lasso_params,
        to_hierarchy(tree, lasso_params),
        {lv: gp.GroupLasso(lam) for lv, lam in zip(levels, lams)},
        eta,
    )
    for make_one in (
        lambda lam: gp.GroupMCP(lam, 1e12),
        lambda lam: gp.GroupSCAD(lam, 1e12),
        lambda lam: gp.GroupLogSum(lam * 1e8, 1e8),
    ):
        params = _random_params(tree, seed)
        pens = {lv: make_one(lam) for lv, lam in zip(levels, lams)}
        got = _prox(params, to_hierarchy(tree, params), pens, eta)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@SETTINGS
@given(
    tree=random_trees(),
    kinds=st.lists(st.sampled_from(sorted(CLASSES)), min_size=3, max_size=3),
    lams=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
    eta=st.floats(0.01, 0.5),
    seed=st.integers(0, 2**16),
)
def test_hierarchy_matches_the_brute_force_composition(tree, kinds, lams, eta, seed):
    """ProxSGD's step on a random tree of levels, each with one of the penalties, against the
    reference composition (finest first, brute-force 1-D prox per group). Shapes are drawn where
    each level's prox is unique, so that it is continuous and the comparison well posed."""
    n_levels = len(tree.levels)
    params = _random_params(tree, seed)
    v = np.concatenate([p.detach().numpy().ravel() for p in params])
    sets, _ = ref.group_index_sets(tree.shapes, [list(lv) for lv in tree.levels])
    refs, pens = [], {}
    for k in range(n_levels):
        kind, lam = kinds[k], lams[k]
        if kind == "mcp":
            shape = 1.0 + 2 * lam
        elif kind == "scad":
            shape = 2.5 + lam
        else:  # τ ≤ ε² for every group of the level: ε = sqrt(eta·λ·max w_g) + 0.05
            w_max = max((math.sqrt(s.size) for s in sets[k]), default=1.0)
            shape = math.sqrt(eta * lam * w_max) + 0.05
        refs.append(ref.RefNormPenalty(kind, lam, shape))
        pens[f"level{k}"] = make(kind, lam, shape)
    got = _prox(params, to_hierarchy(tree, params), pens, eta)
    want = ref.norm_prox(v, sets, refs, eta)
    assume(np.all(np.isfinite(want)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- ProxSGD, end to end
def _fit(penalty, steps=300, lr=0.5):
    """ProxSGD on ½‖W − T‖² over the rows of W (and a coarse level over all of W with the same
    kind of penalty): rows of T with small norms, and large ones."""
    target_norms = torch.tensor([0.02, 0.05, 0.1, 3.0, 4.0, 6.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    direction = torch.nn.functional.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64))
    target = direction * target_norms[:, None]
    w = nn.Parameter(torch.randn(6, 4, generator=g, dtype=torch.float64))
    h = gp.Hierarchy({"rows": [[(w, 0, i)] for i in range(6)], "all": [[w]]})
    coarse = copy.deepcopy(penalty)
    coarse.lam = penalty.lam / 10
    opt = gp.ProxSGD([w], lr=lr, hierarchy=h, penalties={"rows": penalty, "all": coarse})
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (w - target).square().sum()).backward()
        opt.step()
    return w.detach(), target, opt


@pytest.mark.parametrize(
    "penalty",
    [gp.GroupMCP(0.1, 3.0), gp.GroupSCAD(0.1, 3.7), gp.GroupLogSum(0.1, 0.1)],
    ids=repr,
)
def test_prox_sgd_zeroes_small_groups_and_leaves_big_ones_unshrunk(penalty):
    w, target, opt = _fit(penalty)
    lasso, _, _ = _fit(gp.GroupLasso(0.1))
    assert not w[:3].any(), "the small rows must be exactly zero"
    report = opt.get_sparsity_report()
    assert report.levels["rows"].zero_groups == 3
    big_gap = (w[3:] - target[3:]).norm(dim=1)
    lasso_gap = (lasso[3:] - target[3:]).norm(dim=1)
    assert (lasso_gap > 0.2).all()  # at least λ·√4 at the rows, more from the coarse level
    if isinstance(penalty, gp.GroupLogSum):
        # at the fixed point the rows are shrunk by about λw/(r + ε) ≈ 0.2/3.1, the group
        # lasso's by λw = 0.2 (and the log-sum zeroes like a group lasso of λ/ε, 10 times more)
        assert (big_gap < 0.35 * lasso_gap).all(), (big_gap, lasso_gap)
    else:
        # above the knee (0.1·2·γ ≤ 1.5 < 3): the fixed point is the target itself
        assert (big_gap < 1e-12).all(), big_gap


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_prox_adam_with_a_varying_step_runs_exactly(kind):
    """The preconditioner metric gives each tree its own step; any step has an exact prox."""
    m, h = _layer(torch.float32)
    pen = make(kind, 0.5, {"mcp": 0.01, "scad": 1.01, "logsum": 0.01}[kind])
    opt = gp.ProxAdam(
        m.parameters(), lr=0.05, prox_metric="preconditioner", hierarchy=h, penalties={"unit": pen}
    )
    x = torch.randn(16, 5)
    for _ in range(5):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
    assert torch.isfinite(m.weight).all() and torch.isfinite(m.bias).all()
    assert math.isfinite(opt.penalty_value())


# ----------------------------------------------------------------- values, state, validation
@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_value_matches_the_reference(kind):
    g = torch.Generator().manual_seed(0)
    groups = [[torch.randn(3, generator=g), torch.randn(2, 2, generator=g)] for _ in range(4)]
    groups.append([torch.zeros(5)])
    groups.append([torch.full((4,), 10.0)])
    for lam, shape in ((0.3, 2.0), (2.0, 1.5), (0.0, 4.0)):
        pen = make(kind, lam, shape)
        want = 0.0
        for grp in groups:
            x = np.concatenate([t.double().numpy().ravel() for t in grp])
            p = ref.RefNormPenalty(kind, lam, shape).of_norm(x.size)
            want += float(p(np.linalg.norm(x)))
        assert pen.value(groups).item() == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert pen.value([]).item() == 0.0
    assert make(kind, 1e300, 2.0, weight=1e10).value([[torch.zeros(3)]]).item() == 0.0


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_attributes_and_repr(kind):
    name = SHAPE_NAME[kind]
    pen = make(kind, 0.25, 2.5)
    assert pen.order == "tree" and not pen.convex and pen.has_group_part and pen.l1_part == 0
    assert getattr(pen, name) == 2.5
    cls = CLASSES[kind].__name__
    assert repr(pen) == f"{cls}(lam=0.25, {name}=2.5)"
    pen = make(kind, 0.25, 2.5, weight="size", groups=["a", "b"])
    assert repr(pen) == f"{cls}(lam=0.25, {name}=2.5, weight='size', groups=<2 names>)"
    assert cls in gp.__all__ and cls in gp.penalties.__all__
    assert gp.GroupMCP(0.1).gamma == 3.0 and gp.GroupSCAD(0.1).a == 3.7
    with pytest.raises(TypeError):
        gp.GroupLogSum(0.1)  # eps has no default


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_invalid_shape_is_refused_naming_it(kind):
    name = SHAPE_NAME[kind]
    low = 1.0 if kind == "scad" else 0.0
    cls = CLASSES[kind].__name__
    for bad in (low, low - 0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"{cls}: {name} must be finite and > {low:g} \("):
            make(kind, 0.1, bad)
    with pytest.raises(TypeError, match=rf"{cls}: {name} must be a real number"):
        make(kind, 0.1, "2.0")
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        make(kind, -1.0, 2.0)
    pen = make(kind, 0.1, 2.0)
    with pytest.raises(ValueError):
        setattr(pen, name, low)
    assert getattr(pen, name) == 2.0
    setattr(pen, name, torch.tensor(3.0))  # a 0-dim tensor is read as its value
    assert getattr(pen, name) == 3.0 and type(getattr(pen, name)) is float


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_state_dict_round_trip_and_refusals(kind):
    name = SHAPE_NAME[kind]
    cls = CLASSES[kind].__name__
    pen = make(kind, 0.2, 2.0, weight="size")
    state = pen.state_dict()
    assert state == {"kind": cls, "weight": "size", "groups": None, "lam": 0.2, name: 2.0}
    other = make(kind, 0.7, 5.0, weight="size")
    other.load_state_dict(state)
    assert other.lam == 0.2 and getattr(other, name) == 2.0
    before = other.state_dict()
    for bad, match in (
        ({**state, name: 0.5 if kind == "scad" else -1.0}, f"{name} must be finite"),
        ({k: v for k, v in state.items() if k != name}, f"the state has no '{name}'"),
        ({**state, "weight": "sqrt_size"}, "saved with weight='sqrt_size'"),
        ({**state, "kind": "GroupLasso"}, "'GroupLasso' penalty"),
        ({**state, "lam": -1.0}, "lam must be finite"),
    ):
        with pytest.raises(ValueError, match=match):
            other.load_state_dict(bad)
        assert other.state_dict() == before
    # A bad value set behind the property is caught by the optimizer before a step.
    m, h = _layer(torch.float64)
    opt = gp.ProxSGD(m.parameters(), lr=0.1, hierarchy=h, penalties={"unit": make(kind, 0.1, 2.0)})
    setattr(opt.penalties["unit"], "_" + name, float("nan"))
    weight = m.weight.detach().clone()
    with pytest.raises(ValueError, match=f"penalty of level 'unit' holds an invalid value.*{name}"):
        opt.step()
    assert torch.equal(m.weight.detach(), weight)


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_optimizer_checkpoint_copy_and_pickle(kind):
    def run():
        m, h = _layer(torch.float64)
        pens = {"unit": make(kind, 0.3, 1.5), "layer": make(kind, 0.01, 2.0)}
        return m, gp.ProxSGD(m.parameters(), lr=0.2, momentum=0.9, hierarchy=h, penalties=pens)

    def train(m, opt, n, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            opt.zero_grad()
            m(torch.randn(8, 5, generator=g, dtype=torch.float64)).square().mean().backward()
            opt.step()

    m, opt = run()
    train(m, opt, 3, 0)
    setattr(opt.penalties["unit"], SHAPE_NAME[kind], 1.25)
    twins = [copy.deepcopy((m, opt)), pickle.loads(pickle.dumps((m, opt)))]
    m2, opt2 = run()
    m2.load_state_dict(m.state_dict())
    opt2.load_state_dict(opt.state_dict())
    assert getattr(opt2.penalties["unit"], SHAPE_NAME[kind]) == 1.25
    twins.append((m2, opt2))
    train(m, opt, 3, 1)
    for mc, oc in twins:
        assert getattr(oc.penalties["unit"], SHAPE_NAME[kind]) == 1.25
        train(mc, oc, 3, 1)
        for p, q in zip(m.parameters(), mc.parameters()):
            assert torch.equal(p, q)
    pen = make(kind, 0.3, 1.5)
    assert pickle.loads(pickle.dumps(pen)).state_dict() == pen.state_dict()


# ------------------------------------------------- closed forms against their NumPy reference
def _shape_and_margin(kind: str, eta: float, shape: float) -> float:
    """How far the 1-D problem is from losing its uniqueness (the denominator of the middle
    piece, relative), 1 in the hard-threshold regime: the closed form's rounding grows as 1/it."""
    if kind == "mcp":
        return 1.0 - eta / shape if eta < shape else 1.0
    return (shape - 1.0 - eta) / (shape - 1.0) if eta < shape - 1.0 else 1.0


@SETTINGS
@given(data=st.data())
def test_group_scale_matches_the_numpy_closed_form(data):
    """``group_scale`` against the firm threshold and the SCAD prox written out in NumPy
    (tests/reference.py), in both regimes of the step, exact zeros included. Norms at a jump of
    a hard threshold (where rounding decides) are left out."""
    kind = data.draw(st.sampled_from(["mcp", "scad"]))
    shape = data.draw(SHAPES[kind])
    norms = data.draw(
        st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 50.0)), min_size=1, max_size=16)
    )
    eta = data.draw(st.one_of(st.floats(0.0, 5.0), st.just(shape), st.just(shape - 1.0)))
    eta = max(eta, 0.0)
    lam = data.draw(st.floats(0.0, 3.0))
    w = data.draw(st.sampled_from([1.0, 0.25, math.sqrt(12.0)]))
    pen = make(kind, lam, shape, weight=w)
    got, _ = closed_form(pen, norms, eta, w)
    reference = ref.NORM_PROXES[kind]
    r = np.asarray(norms, dtype=np.float64)
    want = reference(r, eta, lam * w, shape)
    jump = np.abs(
        reference(r * (1 + 1e-9), eta, lam * w, shape)
        - reference(r * (1 - 1e-9), eta, lam * w, shape)
    ) > 1e-6 * (1.0 + r)
    tol = 1e-12 * (1.0 + r) / max(_shape_and_margin(kind, eta, shape), 1e-300)
    ok = ~jump
    np.testing.assert_array_less(np.abs(got - want)[ok], tol[ok] + 1e-300)
    np.testing.assert_array_equal((got == 0)[ok & (want == 0)], True)
    if _shape_and_margin(kind, eta, shape) < 1.0 or eta == 0:  # the unique regime
        above = r > shape * lam * w  # above the knee (MCP) or a·λw (SCAD): not shrunk at all
        np.testing.assert_array_equal(got[above], r[above])


@pytest.mark.parametrize("kind,shape", [("mcp", 2.0), ("scad", 3.0)])
def test_numpy_closed_forms_are_the_brute_force_minimisers(kind, shape):
    """The references themselves, on norms through every piece of both regimes of the step."""
    P = ref.NORM_PENALTIES[kind]
    penalty = lambda t: P(t, 1.0, shape)  # noqa: E731
    for eta in (0.5, 1.9, 2.0, 4.0):
        for r in np.linspace(0.0, 8.0, 81):
            rho = float(ref.NORM_PROXES[kind](r, eta, 1.0, shape))
            best = ref.prox_norm_brute(r, eta, penalty)
            f = float(ref.prox_objective_1d(rho, r, eta, penalty))
            assert 0.0 <= rho <= r * (1 + 1e-12)
            assert f <= float(ref.prox_objective_1d(best, r, eta, penalty)) + 1e-12, (eta, r, rho)


# ---------------------------------------------------- ProxAdam, the compiled ProxSGD path
@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_prox_adam_zeroes_exactly_and_resumes_from_its_state_dict(kind, tmp_path):
    """Regression onto a linear map with small and large rows: the small units end exactly zero
    (weight row and bias together), and a saved state dict resumes bit-identically."""
    shape = {"mcp": 3.0, "scad": 3.7, "logsum": 0.1}[kind]
    lam = {"mcp": 0.3, "scad": 0.3, "logsum": 0.03}[kind]
    g = torch.Generator().manual_seed(5)
    row_norms = torch.tensor([0.01, 0.02, 0.03, 0.05, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    direction = torch.nn.functional.normalize(torch.randn(8, 5, generator=g, dtype=torch.float64))
    target = direction * row_norms[:, None]

    def run():
        m, h = _layer(torch.float64)
        pens = {"unit": make(kind, lam, shape), "layer": make(kind, 1e-4, shape)}
        return m, gp.ProxAdam(m.parameters(), lr=0.05, hierarchy=h, penalties=pens)

    def train(m, opt, n, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            opt.zero_grad()
            x = torch.randn(16, 5, generator=g, dtype=torch.float64)
            (m(x) - x @ target.T).square().sum(dim=1).mean().backward()
            opt.step()

    m, opt = run()
    train(m, opt, 150, 0)
    zero_rows = (m.weight.detach() == 0).all(dim=1)
    assert zero_rows[:2].all() and not zero_rows[4:].any(), zero_rows
    # a unit group (a weight row and its bias) is zero as a whole, exactly
    assert torch.equal(zero_rows, m.bias.detach() == 0)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)
    m2, opt2 = run()
    m2.load_state_dict(m.state_dict())
    opt2.load_state_dict(saved)
    train(m, opt, 5, 1)
    train(m2, opt2, 5, 1)
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    # a checkpoint of another penalty kind is refused, naming both kinds
    m3, h3 = _layer(torch.float64)
    other = gp.ProxAdam(
        m3.parameters(),
        lr=0.05,
        hierarchy=h3,
        penalties={"unit": gp.GroupLasso(0.3), "layer": make(kind, 1e-3, shape)},
    )
    with pytest.raises(ValueError, match=f"{CLASSES[kind].__name__}.*GroupLasso"):
        other.load_state_dict(saved)


def test_compiled_prox_sgd_equals_eager_with_every_non_convex_penalty():
    """The compiled path computes the scales from its fused norms with ``group_scale``: the
    same steps as the eager one, zeros included."""

    def run(compiled):
        m, h = _layer(torch.float64)
        pens = {"unit": gp.GroupSCAD(0.3, 3.7), "layer": gp.GroupLogSum(1e-3, 0.5)}
        opt = gp.ProxSGD(
            m.parameters(), lr=0.1, momentum=0.9, hierarchy=h, penalties=pens, compiled=compiled
        )
        g = torch.Generator().manual_seed(0)
        for _ in range(12):
            opt.zero_grad()
            x = torch.randn(8, 5, generator=g, dtype=torch.float64)
            (m(x) - 0.3).square().mean().backward()
            opt.step()
        return m, opt

    eager, _ = run(False)
    fused, opt = run(True)
    assert any(key[0] == "norms" for key in opt._compiled_update._compiled)
    for p, q in zip(eager.parameters(), fused.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        assert torch.equal(p == 0, q == 0)
    assert (fused.weight == 0).all(dim=1).any()
