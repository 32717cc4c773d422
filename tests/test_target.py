"""SparsityTarget: reaching and holding requested fractions, warm-up, freezing, state, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import group_prox as gp
from group_prox.demo import load_digits_tensors, resnet10


def _narrow_resnet(width: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return resnet10(width)


def _penalties() -> dict[str, gp.Penalty]:
    return {"base_level": gp.GroupLasso(0.0), "layer": gp.GroupLasso(0.0)}


def _optimizer(kind: str, model: nn.Module, hierarchy: gp.Hierarchy):
    if kind == "sgd":
        return gp.ProxSGD(
            model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
            hierarchy=hierarchy, penalties=_penalties(),
        )  # fmt: skip
    return gp.ProxAdam(
        model.parameters(), lr=2e-3, weight_decay=5e-4, hierarchy=hierarchy, penalties=_penalties()
    )


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors(0)


def _fractions(opt) -> dict[str, float]:
    rep = opt.get_sparsity_report()
    return {lv: rep.levels[lv].group_fraction for lv in ("base_level", "layer")}


@pytest.mark.parametrize(
    ("kind", "targets"),
    [
        ("sgd", {"base_level": 0.6, "layer": 0.25}),
        ("adam", {"base_level": 0.5, "layer": 0.25}),
        ("sgd", {"base_level": 0.3}),
    ],
)
def test_reaches_and_holds_the_targets(digits, kind, targets):
    x, y, *_ = digits
    model = _narrow_resnet()
    h = gp.hierarchy.resnet(model)
    opt = _optimizer(kind, model, h)
    batch, epochs = 128, 9
    steps_per_epoch = math.ceil(len(y) / batch)
    total = epochs * steps_per_epoch
    lr = opt.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    warmup, reach, freeze = steps_per_epoch, 5 * steps_per_epoch, 7 * steps_per_epoch
    target = gp.SparsityTarget(
        opt, targets, warmup_steps=warmup, reach_step=reach, freeze_step=freeze
    )
    gen = torch.Generator().manual_seed(0)
    frozen_zero = None
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
            target.step()
            t = target.step_count
            if t <= warmup:  # the first k steps shrink nothing
                assert all(opt.penalties[lv].lam == 0 for lv in targets) or t == warmup
                assert _fractions(opt)["base_level"] == 0
            if reach <= t < freeze and t % 4 == 0:
                got = _fractions(opt)
                for lv, want in targets.items():
                    assert abs(got[lv] - want) <= 0.05, (t, lv, got[lv], want)
            if t == freeze:
                assert opt.frozen and target.phase == "frozen"
                frozen_zero = [p.detach() == 0 for p in h.params]
                got = _fractions(opt)
                for lv, want in targets.items():  # snapped exactly
                    assert got[lv] == pytest.approx(want, abs=1.0 / h.num_groups(lv))
            if t > freeze:
                # Frozen zeros stay exactly zero while the survivors keep training.
                for p, was_zero in zip(h.params, frozen_zero):
                    assert torch.all(p.detach()[was_zero] == 0)
    assert frozen_zero is not None
    assert all(opt.penalties[lv].lam == 0 for lv in targets)


def test_frozen_zeros_stay_zero_and_survivors_are_not_shrunk():
    torch.manual_seed(0)
    lin = nn.Linear(5, 6)
    h = gp.Hierarchy({"base_level": [[(lin.weight, 0, i), (lin.bias, 0, i)] for i in range(6)]})
    opt = gp.ProxSGD(lin.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1, hierarchy=h,
                     penalties={"base_level": gp.GroupLasso(0.5)})  # fmt: skip
    with torch.no_grad():
        lin.weight[:3] = 0
        lin.bias[:3] = 0
    assert opt.freeze_zero_groups() == 3 * 6
    ref = torch.optim.SGD(
        [copy.deepcopy(lin.weight), copy.deepcopy(lin.bias)], lr=0.1, momentum=0.9,
        weight_decay=0.1,
    )  # fmt: skip
    for _ in range(5):
        x = torch.randn(8, 5)
        for params in (list(lin.parameters()), ref.param_groups[0]["params"]):
            out = F.linear(x, params[0], params[1]).square().sum()
            for p in params:
                p.grad = None
            out.backward()
        opt.step()
        ref.step()
        with torch.no_grad():
            ref.param_groups[0]["params"][0][:3] = 0
            ref.param_groups[0]["params"][1][:3] = 0
    assert torch.all(lin.weight[:3] == 0) and torch.all(lin.bias[:3] == 0)
    # The survivors follow plain SGD: no shrinkage while frozen.
    torch.testing.assert_close(lin.weight[3:], ref.param_groups[0]["params"][0][3:])
    state = opt.state_dict()
    opt2 = gp.ProxSGD(lin.parameters(), lr=0.1, momentum=0.9, hierarchy=h,
                      penalties={"base_level": gp.GroupLasso(0.5)})  # fmt: skip
    opt2.load_state_dict(state)
    assert opt2.frozen
    opt2.unfreeze()
    assert not opt2.frozen


def test_freeze_needs_a_hierarchy():
    with pytest.raises(ValueError, match="no hierarchy"):
        gp.ProxSGD(nn.Linear(2, 2).parameters(), lr=0.1).freeze_zero_groups()


def test_group_multipliers_reweight_the_prox_exactly():
    torch.manual_seed(0)
    w = torch.randn(4, 3)
    h = gp.Hierarchy({"base_level": [[(w, 0, i)] for i in range(4)]})
    opt = gp.ProxSGD([w], lr=1.0, hierarchy=h, penalties={"base_level": gp.GroupLasso(0.3)})
    before = w.detach().clone()
    opt.prox.plan.set_group_multipliers(0, torch.tensor([0.0, 1.0, 2.0, 0.0], dtype=torch.float64))
    w.grad = torch.zeros_like(w)
    opt.step()
    tau = 0.3 * math.sqrt(3) * torch.tensor([0.0, 1.0, 2.0, 0.0])
    norms = before.norm(dim=1)
    want = before * (1 - tau / norms).clamp(min=0).unsqueeze(1)
    torch.testing.assert_close(w.detach(), want)


def _run(model, opt, target, batches):
    for xb, yb in batches:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        target.step()


def test_state_dict_round_trip_resumes_exactly(digits):
    x, y, *_ = digits
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 64 * 24, 64)]
    model = _narrow_resnet(4)
    opt = _optimizer("sgd", model, gp.hierarchy.resnet(model))
    kw = dict(warmup_steps=2, reach_step=12, freeze_step=20)
    target = gp.SparsityTarget(opt, {"base_level": 0.5, "layer": 0.25}, **kw)
    _run(model, opt, target, batches[:10])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), target.state_dict()))

    twin = _narrow_resnet(4, seed=1)
    twin.load_state_dict(saved[0])
    opt2 = _optimizer("sgd", twin, gp.hierarchy.resnet(twin))
    target2 = gp.SparsityTarget(opt2, {"base_level": 0.5, "layer": 0.25}, **kw)
    opt2.load_state_dict(saved[1])
    target2.load_state_dict(saved[2])
    assert target2.lam == target.lam and target2.step_count == 10

    _run(model, opt, target, batches[10:])
    _run(twin, opt2, target2, batches[10:])
    assert opt.frozen and opt2.frozen
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_state_dict_refuses_other_settings_without_changing_anything():
    model = _narrow_resnet(4)
    opt = _optimizer("sgd", model, gp.hierarchy.resnet(model))
    target = gp.SparsityTarget(opt, {"base_level": 0.5}, reach_step=10)
    other = gp.SparsityTarget(opt, {"base_level": 0.4}, reach_step=10)
    other.step_count = 7
    with pytest.raises(ValueError, match="same settings"):
        target.load_state_dict(other.state_dict())
    assert target.step_count == 0


def test_warmup_is_plain_sgd():
    model = _narrow_resnet(4)
    twin = copy.deepcopy(model)
    opt = _optimizer("sgd", model, gp.hierarchy.resnet(model))
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True)
    target = gp.SparsityTarget(opt, {"base_level": 0.5}, warmup_steps=5, reach_step=10)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        xb, yb = torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            o.step()
        target.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert target.phase == "ramp"


def test_schedule_shapes():
    model = _narrow_resnet(4)
    opt = _optimizer("sgd", model, gp.hierarchy.resnet(model))
    for ramp, mid in (("linear", 0.3), ("cubic", 0.6 * 7 / 8), ("cosine", 0.3)):
        t = gp.SparsityTarget(opt, {"base_level": 0.6}, warmup_steps=10, reach_step=30, ramp=ramp)
        assert t.wanted("base_level", 5) == 0
        assert t.wanted("base_level", 20) == pytest.approx(mid)
        assert t.wanted("base_level", 30) == t.wanted("base_level", 99) == pytest.approx(0.6)


_HALF = {"base_level": 0.5}


@pytest.mark.parametrize(
    ("targets", "kwargs", "exc", "match"),
    [
        ({"blocks": 0.5}, {"reach_step": 5}, ValueError, "'blocks'"),
        ({}, {"reach_step": 5}, TypeError, "non-empty mapping"),
        ({"base_level": 1.0}, {"reach_step": 5}, ValueError, r"\[0, 1\)"),
        ({"base_level": "60%"}, {"reach_step": 5}, TypeError, "number"),
        (_HALF, {"warmup_steps": 5, "reach_step": 5}, ValueError, "reach_step must be at least 6"),
        (_HALF, {"reach_step": 5, "freeze_step": 3}, ValueError, "freeze_step must be at least 5"),
        (_HALF, {"reach_step": 5.0}, TypeError, "reach_step must be an int"),
        (_HALF, {"reach_step": 5, "ramp": "exp"}, ValueError, "ramp"),
        (_HALF, {"reach_step": 5, "gain": -1}, ValueError, "gain"),
        (_HALF, {"reach_step": 5, "spread": 2}, ValueError, "spread"),
    ],
)
def test_bad_arguments(targets, kwargs, exc, match):
    model = _narrow_resnet(4)
    opt = _optimizer("sgd", model, gp.hierarchy.resnet(model))
    lams = {lv: pen.lam for lv, pen in opt.penalties.items()}
    with pytest.raises(exc, match=match):
        gp.SparsityTarget(opt, targets, **kwargs)
    assert {lv: pen.lam for lv, pen in opt.penalties.items()} == lams


def test_a_torch_optimizer_is_refused():
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0)
    with pytest.raises(TypeError, match="ProxSGD or ProxAdam"):
        gp.SparsityTarget(opt, _HALF, reach_step=5)


def test_a_level_without_a_group_penalty_is_named():
    model = _narrow_resnet(4)
    h = gp.hierarchy.resnet(model)
    opt = gp.ProxSGD(model.parameters(), lr=0.1, hierarchy=h,
                     penalties={"base_level": gp.L1(0.0)})  # fmt: skip
    with pytest.raises(ValueError, match="level 'base_level' needs a GroupLasso"):
        gp.SparsityTarget(opt, {"base_level": 0.5}, reach_step=5)
    with pytest.raises(ValueError, match=r"level 'layer' needs a GroupLasso.*got none"):
        gp.SparsityTarget(opt, {"layer": 0.5}, reach_step=5)


def test_spread_zero_prunes_every_conv_alike_and_none_is_emptied(digits):
    x, y, *_ = digits
    model = _narrow_resnet(4)
    h = gp.hierarchy.resnet(model)
    opt = _optimizer("sgd", model, h)
    target = gp.SparsityTarget(
        opt, {"base_level": 0.5}, warmup_steps=2, reach_step=20, freeze_step=24,
        selection="uniform", spread=0.0,
    )  # fmt: skip
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 64 * 24, 64)]
    _run(model, opt, target, batches)
    assert opt.frozen
    convs = [t for t in opt.get_sparsity_report().tensors if t.name.endswith("conv1.weight")
             or t.name.endswith("conv2.weight") or t.name.endswith("downsample.0.weight")]  # fmt: skip
    assert convs
    for t in convs:
        assert t.zero_units == t.units // 2, t.name


def test_no_conv_is_emptied_at_high_targets(digits):
    x, y, *_ = digits
    model = _narrow_resnet(4)
    h = gp.hierarchy.resnet(model)
    opt = _optimizer("sgd", model, h)
    target = gp.SparsityTarget(opt, {"base_level": 0.9}, warmup_steps=2, reach_step=20,
                               freeze_step=24, selection="uniform", spread=0.9)  # fmt: skip
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 64 * 24, 64)]
    _run(model, opt, target, batches)
    report = opt.get_sparsity_report()
    assert report.levels["base_level"].group_fraction >= 0.85
    for t in report.tensors:
        if t.name.endswith(".weight") and len(t.shape) == 4:
            assert t.zero_units < t.units, t.name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda(dtype):
    gen = torch.Generator().manual_seed(0)
    model = _narrow_resnet(4).cuda().to(dtype)
    h = gp.hierarchy.resnet(model)
    opt = _optimizer("sgd", model, h)
    target = gp.SparsityTarget(opt, {"base_level": 0.5, "layer": 0.25}, warmup_steps=2,
                               reach_step=20, freeze_step=24)  # fmt: skip
    for _ in range(30):
        xb = torch.randn(32, 3, 8, 8, generator=gen).cuda().to(dtype)
        yb = torch.randint(0, 10, (32,), generator=gen).cuda()
        opt.zero_grad()
        F.cross_entropy(model(xb).float(), yb).backward()
        opt.step()
        target.step()
    assert opt.frozen
    rep = opt.get_sparsity_report()
    assert rep.levels["base_level"].group_fraction == pytest.approx(0.5, abs=0.01)
    assert rep.levels["layer"].zero_groups == 1
    state = opt.state_dict()
    assert state["group_prox"]["frozen"].device.type == "cpu"


def test_group_multipliers_never_overwrite_the_penalty_weights():
    w = torch.randn(4, 3, dtype=torch.float64)
    h = gp.Hierarchy({"base_level": [[(w, 0, i)] for i in range(4)]})
    opt = gp.ProxSGD([w], lr=0.1, hierarchy=h, penalties={"base_level": gp.GroupLasso(0.1)})
    plan = opt.prox.plan
    base = plan.base_weights(0).clone()
    plan.set_group_multipliers(0, None)
    w.grad = torch.zeros_like(w)
    opt.step()  # builds the float64 CPU buffers, which may alias the level's weights
    plan.set_group_multipliers(0, torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(plan.base_weights(0), base, rtol=0, atol=0)
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close(w.detach(), before, rtol=0, atol=0)  # every group exempt


def _train_with(model, opt, target, x, y, steps, sched=None, batch=64):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if sched is not None:
            sched.step()
        target.step()


def _loss_aware(kind: str, model: nn.Module):
    h = gp.hierarchy.resnet(model)
    penalties = {"base_level": gp.GroupLasso(1.0), "layer": gp.GroupLasso(0.2)}
    if kind == "sgd":
        return gp.ProxSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                          hierarchy=h, penalties=penalties)  # fmt: skip
    return gp.ProxAdam(model.parameters(), lr=2e-3, weight_decay=5e-4, hierarchy=h,
                       penalties=penalties)  # fmt: skip


@pytest.mark.parametrize(("kind", "share"), [("sgd", 0.5), ("adam", 0.8)])
def test_a_params_target_is_what_compress_removes(digits, kind, share):
    x, y, xt, _ = digits
    model = _narrow_resnet(8)
    opt = _loss_aware(kind, model)
    steps = 160
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, opt.param_groups[0]["lr"], total_steps=steps)
    target = gp.SparsityTarget(opt, params=share, model=model, warmup_steps=10, reach_step=100,
                               freeze_step=130)  # fmt: skip
    assert target.lam == {"base_level": 0.0, "layer": 0.0}  # nothing before the ramp
    _train_with(model, opt, target, x, y, steps, sched)
    assert opt.frozen and target.phase == "frozen"
    found = gp.removable(model, opt.hierarchy)
    assert abs(found.params_removed - share) <= 0.02, found.params_removed
    assert target.measure()["model"] == pytest.approx(found.params_removed)
    twin = copy.deepcopy(model)
    small = gp.compress(twin, gp.hierarchy.resnet(twin))
    assert sum(p.numel() for p in small.parameters()) == found.params_left
    model.eval(), small.eval()
    torch.testing.assert_close(small(xt[:32]), model(xt[:32]))


def test_a_flops_target(digits):
    x, y, *_ = digits
    model = _narrow_resnet(8)
    opt = _loss_aware("sgd", model)
    target = gp.SparsityTarget(opt, flops=0.4, model=model, example_inputs=x[:1],
                               warmup_steps=10, reach_step=100, freeze_step=130,
                               update_every=4)  # fmt: skip
    _train_with(model, opt, target, x, y, 140)
    found = gp.removable(model, opt.hierarchy, example_inputs=x[:1], flops=True)
    assert found.flops_removed is not None and abs(found.flops_removed - 0.4) <= 0.05


def test_a_zero_learning_rate_neither_stalls_nor_inflates_lambda(digits):
    # Warm-up from lr = 0 and a paused schedule: the prox cannot act, so λ must not move, and
    # the target is still reached once the rate returns.
    x, y, *_ = digits
    model = _narrow_resnet(8)
    opt = _loss_aware("sgd", model)
    target = gp.SparsityTarget(opt, params=0.5, model=model, warmup_steps=5, reach_step=100,
                               freeze_step=130)  # fmt: skip
    for group in opt.param_groups:
        group["lr"] = 0.0
    _train_with(model, opt, target, x, y, 30)
    assert target.multiplier["model"] is None and target.lam["base_level"] == 0.0
    for group in opt.param_groups:
        group["lr"] = 0.1
    _train_with(model, opt, target, x, y, 30)
    paused = target.multiplier["model"]
    assert paused is not None
    for group in opt.param_groups:
        group["lr"] = 0.0
    _train_with(model, opt, target, x, y, 20)
    assert target.multiplier["model"] == paused  # no rise while nothing can happen
    for group in opt.param_groups:
        group["lr"] = 0.1
    _train_with(model, opt, target, x, y, 60)
    assert abs(gp.removable(model, opt.hierarchy).params_removed - 0.5) <= 0.02


def test_params_target_needs_the_model_and_refuses_uniform_selection():
    model = _narrow_resnet(4)
    opt = _loss_aware("sgd", model)
    with pytest.raises(TypeError, match=r"pass model=<the nn\.Module"):
        gp.SparsityTarget(opt, params=0.5, reach_step=10)
    with pytest.raises(ValueError, match="pass example_inputs"):
        gp.SparsityTarget(opt, flops=0.5, model=model, reach_step=10)
    with pytest.raises(ValueError, match="selection='uniform' picks a fraction"):
        gp.SparsityTarget(opt, params=0.5, model=model, reach_step=10, selection="uniform")
    with pytest.raises(ValueError, match="params must be"):
        gp.SparsityTarget(opt, params=1.5, model=model, reach_step=10)
    other = _narrow_resnet(4, seed=3)
    with pytest.raises(ValueError, match="not parameters of model"):
        gp.SparsityTarget(opt, params=0.5, model=other, reach_step=10)


def test_params_target_round_trip_resumes_exactly(digits):
    x, y, *_ = digits
    model = _narrow_resnet(8)
    opt = _loss_aware("sgd", model)
    kw = dict(params=0.6, warmup_steps=5, reach_step=60, freeze_step=80)
    target = gp.SparsityTarget(opt, model=model, **kw)
    _train_with(model, opt, target, x, y, 50)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), target.state_dict()))
    twin = _narrow_resnet(8, seed=1)
    twin.load_state_dict(saved[0])
    opt2 = _loss_aware("sgd", twin)
    target2 = gp.SparsityTarget(opt2, model=twin, **kw)
    opt2.load_state_dict(saved[1])
    target2.load_state_dict(saved[2])
    assert target2.lam == target.lam
    for a, b in zip(target.penalised.values(), target2.penalised.values()):
        assert torch.equal(a, b)
    gen_state = torch.get_rng_state()
    _train_with(model, opt, target, x, y, 40)
    torch.set_rng_state(gen_state)
    _train_with(twin, opt2, target2, x, y, 40)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_snap_that_makes_up_much_of_the_target_warns():
    """A penalty that could not act (the schedule paused the learning rate): the snap reaches the
    target and says what that cost, pointing at the caller."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    first, second = model[0], model[2]
    units = {f"u{i}": [(first.weight, 0, i), (first.bias, 0, i), (second.weight, 1, i)]
             for i in range(16)}  # fmt: skip
    h = gp.Hierarchy({"unit": units}, names=model)
    opt = gp.ProxSGD(
        model.parameters(), lr=1e-3, hierarchy=h, penalties={"unit": gp.GroupLasso(1.0)}
    )
    target = gp.SparsityTarget(opt, {"unit": 0.5}, reach_step=4, freeze_step=5)
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    for step in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.param_groups[0]["lr"] = 0.0  # paused after the first step
        if step < 4:
            target.step()
    assert opt.get_sparsity_report().levels["unit"].group_fraction == 0
    with pytest.warns(RuntimeWarning, match=r"the unit target 50.0% stood at 0.0%") as caught:
        target.step()
    assert caught[0].filename == __file__
    assert opt.frozen and opt.get_sparsity_report().levels["unit"].group_fraction == 0.5
