"""In-loss λ under SGD momentum vs the prox's λ: ``gp.prox_lambda`` and ``from_config(momentum=)``.

One group lasso group ``x ∈ R⁴`` under ``f(x) = ½‖x - c‖²``. SGD with momentum on
``f + λ‖x‖`` has the fixed point of ``f + λ‖x‖``: ``x* = c (1 - λ/‖c‖)₊``, zero iff
``‖c‖ ≤ λ``, whatever the momentum. ``ProxSGD`` at ``λ_prox`` has the fixed point of
``f + λ_prox (1-β)/(1-d) ‖x‖``; so at ``λ_prox = prox_lambda(λ)`` the two agree exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

import group_prox as gp

from .seed_like import SeedLikeResNet

F64 = torch.float64
C = torch.tensor([3.0, -4.0, 1.0, 2.0], dtype=F64)  # ‖C‖ = √30
X0 = torch.tensor([1.0, 1.0, -1.0, 0.5], dtype=F64)
LR = 0.1
# (momentum, dampening, nesterov)
SETTINGS = [(0.9, 0.0, False), (0.9, 0.0, True), (0.9, 0.5, False), (0.5, 0.0, False)]


def minimiser(c: torch.Tensor, lam: float) -> torch.Tensor:
    return c * max(0.0, 1.0 - lam / float(c.norm()))


def prox_sgd(lam, momentum, dampening=0.0, nesterov=False, *, c=C, x0=X0, buffer=None):
    x = x0.clone().requires_grad_(True)
    h = gp.Hierarchy({"g": {"x": [x]}})
    opt = gp.ProxSGD(
        [x],
        lr=LR,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        hierarchy=h,
        penalties={"g": gp.GroupLasso(lam, weight=1.0)},
        nonfinite="ignore",
    )
    if buffer is not None:
        opt.state[x]["momentum_buffer"] = buffer.clone()

    def run(steps: int) -> torch.Tensor:
        for _ in range(steps):
            x.grad = x.detach() - c  # ∇f
            opt.step()
        return x.detach().clone()

    return run, opt, x


def in_loss_sgd(lam, momentum, dampening=0.0, nesterov=False, *, c=C, steps=400):
    x = X0.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=LR, momentum=momentum, dampening=dampening, nesterov=nesterov)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (x - c).square().sum() + lam * torch.linalg.vector_norm(x)).backward()
        opt.step()
    return x.detach()


def test_factor_table():
    assert gp.prox_lambda(1.0, momentum=0.9) == pytest.approx(10.0)
    assert gp.prox_lambda(1.0, momentum=0.9, nesterov=True) == pytest.approx(10.0)
    assert gp.prox_lambda(2e-3, momentum=0.99) == pytest.approx(0.2)
    assert gp.prox_lambda(1.0, momentum=0.5) == pytest.approx(2.0)
    assert gp.prox_lambda(1.0, momentum=0.9, dampening=0.5) == pytest.approx(5.0)
    assert gp.prox_lambda(1.0, momentum=0.9, dampening=0.9) == pytest.approx(1.0)
    # Without momentum torch keeps no buffer and ignores dampening.
    assert gp.prox_lambda(3.0, momentum=0, dampening=0.5) == 3.0
    assert gp.prox_lambda(0.0, momentum=0.9) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"momentum": 1.0}, ValueError, "momentum must be a fraction in"),
        ({"momentum": -0.1}, ValueError, "momentum must be a fraction in"),
        ({"momentum": math.nan}, ValueError, "momentum"),
        ({"momentum": True}, TypeError, "momentum must be a real number"),
        ({"momentum": "0.9"}, TypeError, "momentum must be a real number"),
        ({"momentum": 0.9, "dampening": 1.0}, ValueError, "dampening must be a fraction"),
        ({"momentum": 0.9, "dampening": -0.5}, ValueError, "dampening must be a fraction"),
        ({"momentum": 0.9, "nesterov": 1}, TypeError, "nesterov must be True or False"),
        ({"momentum": 0.9, "dampening": 0.1, "nesterov": True}, ValueError, "nesterov=True"),
        ({"momentum": 0.0, "nesterov": True}, ValueError, "nesterov=True needs momentum > 0"),
    ],
)
def test_prox_lambda_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        gp.prox_lambda(1.0, **kwargs)


@pytest.mark.parametrize("lam", [-1.0, math.inf, math.nan])
def test_prox_lambda_rejects_lambda(lam):
    with pytest.raises(ValueError, match="in_loss_lambda must be finite and >= 0"):
        gp.prox_lambda(lam, momentum=0.9)


@pytest.mark.parametrize(("momentum", "dampening", "nesterov"), SETTINGS)
def test_in_loss_minimiser_is_the_prox_fixed_point(momentum, dampening, nesterov):
    """Exactly: x* with the steady buffer (1-d)∇f(x*)/(1-β) is left unchanged by ProxSGD at
    prox_lambda(λ), and moved by ProxSGD at λ itself."""
    lam = 2.0
    star = minimiser(C, lam)
    buffer = (1 - dampening) * (star - C) / (1 - momentum)
    scaled = gp.prox_lambda(lam, momentum=momentum, dampening=dampening, nesterov=nesterov)
    run, opt, x = prox_sgd(scaled, momentum, dampening, nesterov, x0=star, buffer=buffer)
    after = run(3)
    torch.testing.assert_close(after, star, rtol=0, atol=1e-13)
    torch.testing.assert_close(opt.state[x]["momentum_buffer"], buffer, rtol=0, atol=1e-13)
    run, _, _ = prox_sgd(lam, momentum, dampening, nesterov, x0=star, buffer=buffer)
    assert (run(1) - star).norm() > 1e-3


@pytest.mark.parametrize(("momentum", "dampening", "nesterov"), SETTINGS[:3])
def test_both_trainings_converge_to_the_same_point(momentum, dampening, nesterov):
    lam = 2.0
    star = minimiser(C, lam)
    in_loss = in_loss_sgd(lam, momentum, dampening, nesterov)
    torch.testing.assert_close(in_loss, star, rtol=0, atol=1e-8)
    scaled = gp.prox_lambda(lam, momentum=momentum, dampening=dampening, nesterov=nesterov)
    run, _, _ = prox_sgd(scaled, momentum, dampening, nesterov)
    torch.testing.assert_close(run(400), star, rtol=0, atol=1e-8)


@pytest.mark.parametrize("ratio", [0.95, 1.05])
def test_zero_decision_and_survivor_norm(ratio):
    """The group ends exactly zero iff ‖c‖ ≤ λ_loss at λ_prox = 10 λ_loss (β = 0.9), as the
    in-loss training decides, with the in-loss survivor; at λ_prox = λ_loss (no translation) it
    survives whenever ‖c‖ > λ_loss (1 - β), with norm ‖c‖ - λ_loss (1 - β)."""
    momentum, lam = 0.9, 2.0
    c = C / C.norm() * lam * ratio
    run, _, _ = prox_sgd(gp.prox_lambda(lam, momentum=momentum), momentum, c=c)
    x = run(400)
    if ratio < 1:
        # Exact zeros; in the loss the subgradient makes x chatter around 0 with steps of about
        # lr λ / (1 - β), never exactly 0, so the in-loss side is checked where it survives.
        assert torch.equal(x, torch.zeros_like(x))
        # Untranslated, the prox keeps the group the in-loss training removed.
        run, _, _ = prox_sgd(lam, momentum, c=c)
        untranslated = run(400)
        assert float(untranslated.norm()) == pytest.approx(lam * ratio - lam * (1 - momentum))
    else:
        torch.testing.assert_close(x, minimiser(c, lam), rtol=0, atol=1e-8)
        torch.testing.assert_close(
            in_loss_sgd(lam, momentum, c=c, steps=400), minimiser(c, lam), rtol=0, atol=1e-8
        )


def test_prox_adam_threshold_ignores_the_gradient_scale():
    """ProxAdam(prox_metric="lr"): a group of 4 at zero under a steady gradient -c stays there iff
    λ ≥ ‖sign(c)‖ = 2, whatever ‖c‖; in the loss it would stay iff ‖c‖ ≤ λ. So no factor maps
    an in-loss λ to ProxAdam's."""

    def adam(lam: float, c: torch.Tensor, steps: int) -> torch.Tensor:
        x = torch.zeros(4, dtype=F64, requires_grad=True)
        h = gp.Hierarchy({"g": {"x": [x]}})
        penalties = {"g": gp.GroupLasso(lam, weight=1.0)}
        opt = gp.ProxAdam([x], lr=0.05, weight_decay=0, hierarchy=h, penalties=penalties)
        for _ in range(steps):
            x.grad = x.detach() - c
            opt.step()
        return x.detach()

    for scale in (1e-2, 1.0, 1e2):
        assert torch.equal(adam(2.5, scale * C, 50), torch.zeros(4, dtype=F64))
        assert adam(1.5, scale * C, 1).norm() > 0


# ------------------------------------------------------------------------- from_config


@pytest.fixture(scope="module")
def hierarchy():
    torch.manual_seed(0)
    return gp.hierarchy.from_module_tags(SeedLikeResNet())


CONFIG = {
    "type": "hierarchical",
    "children": [
        {"type": "global", "norm": "L2", "lambda": 0.01},
        {"groups": "base_level", "norm": "L1", "inner_norm": "L2", "lambda": 0.002},
        {"groups": "base_level", "norm": "sum", "inner_norm": "L1", "lambda": 0.001},
        {"groups": "layer", "norm": "L1", "inner_norm": "L0", "lambda": 0.03},
    ],
}


def _lams(penalties):
    return {
        level: (type(p).__name__, p.lam, getattr(p, "l1_ratio", None))
        for level, p in penalties.items()
    }


def test_from_config_default_keeps_the_lambdas(hierarchy):
    plain = _lams(gp.from_config(CONFIG, hierarchy))
    assert plain["global"] == ("GroupDecay", pytest.approx(0.02), None)
    assert plain["base_level"][:2] == ("SparseGroupLasso", pytest.approx(0.003))
    assert plain["layer"] == ("GroupL0", pytest.approx(0.03), None)
    assert _lams(gp.from_config(CONFIG, hierarchy, momentum=0.0)) == plain
    assert _lams(gp.from_config(CONFIG, hierarchy, momentum=0, dampening=0.3)) == plain


@pytest.mark.parametrize(("momentum", "dampening", "factor"), [(0.9, 0.0, 10.0), (0.9, 0.5, 5.0)])
def test_from_config_momentum_scales_every_lambda(hierarchy, momentum, dampening, factor):
    plain = _lams(gp.from_config(CONFIG, hierarchy))
    got = _lams(gp.from_config(CONFIG, hierarchy, momentum=momentum, dampening=dampening))
    assert got.keys() == plain.keys()
    for level, (kind, lam, alpha) in plain.items():
        assert got[level][0] == kind
        assert got[level][1] == pytest.approx(factor * lam, rel=1e-12)
        assert got[level][2] == (None if alpha is None else pytest.approx(alpha))
        assert got[level][1] == pytest.approx(
            gp.prox_lambda(lam, momentum=momentum, dampening=dampening), rel=1e-12
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"momentum": 1.0}, ValueError, r"from_config\(\): momentum must be a fraction"),
        ({"momentum": -0.1}, ValueError, r"from_config\(\): momentum must be a fraction"),
        ({"momentum": "0.9"}, TypeError, r"from_config\(\): momentum must be a real number"),
        ({"momentum": 0.9, "dampening": 1.5}, ValueError, r"from_config\(\): dampening must be"),
        ({"dampening": 0.5}, ValueError, r"dampening=0.5 was given without momentum"),
        ({"dampening": -1}, ValueError, r"from_config\(\): dampening must be a fraction"),
    ],
)
def test_from_config_rejects(hierarchy, kwargs, error, match):
    with pytest.raises(error, match=match):
        gp.from_config(CONFIG, hierarchy, **kwargs)
