"""The parts of SparsityTarget that need no training: the schedule, the feedback law and the
measurement of what compress removes."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import group_prox as gp
from group_prox.controller import LamController, initial_lam, step_size_rate
from group_prox.demo import resnet10
from group_prox.schedule import SparsitySchedule


@pytest.mark.parametrize("ramp", ["cubic", "linear", "cosine"])
def test_schedule_phases_and_share(ramp):
    s = SparsitySchedule(reach_step=12, warmup_steps=2, freeze_step=20, ramp=ramp)
    assert [s.phase(t) for t in (0, 1, 2, 11, 12, 19, 20, 99)] == [
        "warmup", "warmup", "ramp", "ramp", "hold", "hold", "frozen", "frozen",
    ]  # fmt: skip
    shares = [s.share(t) for t in range(0, 30)]
    assert shares[:3] == [0.0, 0.0, 0.0] and shares[12:] == [1.0] * 18
    assert all(a <= b for a, b in itertools.pairwise(shares))  # never falls


@given(
    warmup=st.integers(0, 50),
    ramp=st.integers(1, 500),
    kind=st.sampled_from(["cubic", "linear", "cosine"]),
)
@settings(max_examples=50, deadline=None)
def test_schedule_share_is_monotone_from_zero_to_one(warmup, ramp, kind):
    s = SparsitySchedule(reach_step=warmup + ramp, warmup_steps=warmup, ramp=kind)
    shares = [s.share(t) for t in range(warmup + ramp + 2)]
    assert shares[warmup] == 0.0 and shares[-1] == 1.0
    assert all(0.0 <= a <= b <= 1.0 for a, b in itertools.pairwise(shares))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reach_step": 5, "warmup_steps": 5}, "reach_step must be at least 6"),
        ({"reach_step": 5, "freeze_step": 4}, "freeze_step must be at least 5"),
        ({"reach_step": 5, "ramp": "exp"}, "ramp"),
    ],
)
def test_schedule_refuses_steps_out_of_order(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsitySchedule(**kwargs)


def test_controller_rises_on_lag_falls_on_lead_and_is_clipped():
    c = LamController(gain=2.0, max_rise=0.1, max_fall=0.05)
    assert c.update(1.0, 0.01) == pytest.approx(math.exp(0.02))
    assert c.update(1.0, -0.01) == pytest.approx(math.exp(-0.02))
    assert c.update(1.0, 10.0) == pytest.approx(math.exp(0.1))  # clipped rise
    assert c.update(1.0, -10.0) == pytest.approx(math.exp(-0.05))  # clipped fall
    assert c.update(1.0, 0.01, steps=3) == pytest.approx(math.exp(0.06))


def test_controller_does_nothing_while_the_learning_rate_is_zero():
    # A warm-up from lr = 0 or a paused schedule: the prox cannot act, λ must not move.
    c = LamController(gain=2.0, max_rise=0.1, max_fall=0.1)
    assert c.update(0.3, 1.0, rate=step_size_rate(0.0, 0.1)) == 0.3
    assert step_size_rate(0.05, 0.1) == 0.5
    assert step_size_rate(0.2, 0.1) == 1.0
    assert step_size_rate(0.1, 0.0) == 0.0


def test_controller_refuses_non_positive_settings():
    with pytest.raises(ValueError, match="gain"):
        LamController(gain=0.0, max_rise=0.1, max_fall=0.1)


def test_initial_lam_zeroes_the_target_quantile_over_the_ramp():
    rel = torch.arange(1.0, 101.0, dtype=torch.float64)
    eta = torch.full_like(rel, 0.1)
    lam = initial_lam(rel, eta, 0.5, steps=10)
    # η·λ·steps equals the median norm: shrinkage alone would zero half the groups.
    assert 0.1 * lam * 10 == pytest.approx(float(torch.quantile(rel, 0.5)))
    assert initial_lam(rel, torch.zeros_like(rel), 0.5, steps=10) is None


def _sparse_resnet():
    torch.manual_seed(0)
    model = resnet10(8)
    h = gp.hierarchy.resnet(model)
    opt = gp.ProxSGD(model.parameters(), lr=0.1, hierarchy=h,
                     penalties={"base_level": gp.GroupLasso(0.0), "layer": gp.GroupLasso(0.0)})  # fmt: skip
    every_third = torch.arange(h.num_groups("base_level")) % 3 == 0
    opt.prox.zero_groups_("base_level", every_third)
    opt.prox.zero_groups_("layer", torch.tensor([False, True, False, False]))
    return model.eval(), h


def test_removable_counts_what_compress_removes():
    model, h = _sparse_resnet()
    x = torch.randn(2, 3, 8, 8)
    before = copy.deepcopy(model.state_dict())
    found = gp.removable(model, h, example_inputs=x[:1], flops=True)
    for k, v in model.state_dict().items():  # the model is not touched
        assert torch.equal(v, before[k]), k
    twin = copy.deepcopy(model)
    small = gp.compress(twin, gp.hierarchy.resnet(twin))
    left = sum(p.numel() for p in small.parameters())
    assert found.params == sum(p.numel() for p in model.parameters())
    assert found.params_left == left
    assert found.params_removed == pytest.approx(1 - left / found.params)
    assert 0 < found.params_removed < 1
    assert found.flops is not None and found.flops_left is not None
    assert 0 < found.flops_removed < 1
    torch.testing.assert_close(small(x), model(x))


def test_removable_of_a_dense_model_is_zero():
    torch.manual_seed(0)
    model = resnet10(8)
    found = gp.removable(model, gp.hierarchy.resnet(model))
    assert found.params_removed == 0 and found.flops_removed is None


def test_removable_refuses_bad_input():
    model, h = _sparse_resnet()
    with pytest.raises(TypeError, match=r"nn\.Module"):
        gp.removable(object(), h)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="example_inputs"):
        gp.removable(model, h, flops=True)


def test_the_report_says_what_compress_removes():
    import json

    model, h = _sparse_resnet()
    opt = gp.ProxSGD(model.parameters(), lr=0.1, hierarchy=h,
                     penalties={"base_level": gp.GroupLasso(0.0)})  # fmt: skip
    assert opt.get_sparsity_report().removable is None
    x = torch.randn(1, 3, 8, 8)
    report = opt.get_sparsity_report(model, example_inputs=x)
    found = gp.removable(model, h, example_inputs=x, flops=True)
    assert report.removable is not None
    assert report.removable.params_left == found.params_left
    assert report.removable.flops_left == found.flops_left
    assert f"({100 * found.params_removed:.1f}%)" in str(report)
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["removable"]["params_removed"] == pytest.approx(found.params_removed)
    same = gp.get_sparsity_report(model, h, removable=True)
    assert same.removable is not None and same.removable.params_left == found.params_left
    with pytest.raises(TypeError, match=r"model must be the nn\.Module"):
        opt.get_sparsity_report("model")  # type: ignore[arg-type]
