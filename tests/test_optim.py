"""ProxSGD / ProxAdam as torch optimizers: equivalence, state, schedulers, param groups, errors."""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from torch import nn

import group_prox as gp


def _model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def _hierarchy(model: nn.Module) -> gp.Hierarchy:
    lin, bn = model[0], model[1]
    neurons = {
        f"neuron{i}": [(lin.weight, 0, i), (lin.bias, 0, i), (bn.weight, 0, i), (bn.bias, 0, i)]
        for i in range(8)
    }
    return gp.Hierarchy(
        {"base_level": neurons, "layer": {"hidden": [lin.weight, lin.bias, bn.weight, bn.bias]}},
        names=model,
    )


def _batches(n: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(123)
    return [
        (torch.randn(16, 6, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g))
        for _ in range(n)
    ]


def _train(model, opt, batches, sched=None):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _assert_same_steps(ref_model, ref_opt, model, opt, steps: int = 5):
    """Both optimizers give bit-identical parameters after every step."""
    for x, y in _batches(steps):
        for m, o in ((ref_model, ref_opt), (model, opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        for p, q in zip(ref_model.parameters(), model.parameters()):
            assert torch.equal(p, q)


SGD_OPTIONS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx, foreach=fe)
    for m, d, n, wd, mx, fe in itertools.product(
        (0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 1e-2), (False, True), (False, True)
    )
    if not (n and (m == 0 or d != 0))
]


@pytest.mark.parametrize(
    "options", SGD_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_zero_lambda_equals_torch_sgd(options):
    ref_model, model = _model(), _model()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, **options)
    opt = gp.ProxSGD(
        model.parameters(),
        lr=0.05,
        **options,
        hierarchy=_hierarchy(model),
        penalties={"base_level": gp.GroupLasso(0.0), "layer": gp.GroupLasso(0.0)},
    )
    _assert_same_steps(ref_model, ref_opt, model, opt)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("metric", ["lr", "preconditioner"])
def test_zero_lambda_equals_torch_adamw(amsgrad, foreach, metric):
    ref_model, model = _model(), _model()
    kw = dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05, amsgrad=amsgrad, foreach=foreach)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), **kw)
    opt = gp.ProxAdam(
        model.parameters(),
        **kw,
        hierarchy=_hierarchy(model),
        prox_metric=metric,
        penalties={"base_level": gp.GroupLasso(0.0)},
    )
    _assert_same_steps(ref_model, ref_opt, model, opt)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_default_is_torch_fused_kernel_and_zero_lambda_equals_it(kind):
    """Without foreach= or fused=, the optimizers take torch's fused kernel where it applies."""
    ref_model, model = _model(), _model()
    h = _hierarchy(model)
    if kind == "sgd":
        ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9, fused=True)
        opt = gp.ProxSGD(
            model.parameters(),
            lr=0.05,
            momentum=0.9,
            hierarchy=h,
            penalties={"base_level": gp.GroupLasso(0.0)},
        )
    else:
        ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, fused=True)
        opt = gp.ProxAdam(
            model.parameters(), lr=1e-2, hierarchy=h, penalties={"base_level": gp.GroupLasso(0.0)}
        )
    assert opt.defaults["fused"] is True and opt._step_supports_amp_scaling
    _assert_same_steps(ref_model, ref_opt, model, opt)


@pytest.mark.parametrize(
    "kw, fused",
    [
        (dict(foreach=True), None),
        (dict(foreach=False), None),
        (dict(fused=False), False),
        (dict(differentiable=True), None),
    ],
)
def test_a_chosen_implementation_is_kept(kw, fused):
    model = _model()
    assert gp.ProxSGD(model.parameters(), lr=0.1, **kw).defaults["fused"] is fused


def test_the_default_reads_a_generator_of_params_and_param_groups_once():
    model = _model()
    opt = gp.ProxSGD((p for p in model.parameters()), lr=0.1, hierarchy=_hierarchy(model))
    assert opt.defaults["fused"] is True
    groups = [{"params": (p for p in model[0].parameters())}, {"params": model[3].weight}]
    opt = gp.ProxSGD(groups, lr=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1]
    named = gp.ProxAdam(model.named_parameters(), lr=0.1)
    assert named.defaults["fused"] is True and named.param_groups[0]["param_names"]


def test_integer_or_complex_parameters_keep_torch_default():
    w = nn.Parameter(torch.ones(2, dtype=torch.complex64))
    assert gp.ProxSGD([w], lr=0.1).defaults["fused"] is None


def test_sparse_gradients_take_the_foreach_path_under_the_default():
    torch.manual_seed(0)
    emb, ref = nn.Embedding(10, 4, sparse=True), nn.Embedding(10, 4, sparse=True)
    ref.load_state_dict(emb.state_dict())
    opt = gp.ProxSGD(emb.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, foreach=True)
    for m, o in ((emb, opt), (ref, ref_opt)):
        m(torch.tensor([1, 2, 2])).sum().backward()
        o.step()
    assert torch.equal(emb.weight, ref.weight)
    assert opt.param_groups[0]["fused"] is True


def test_step_is_torch_update_then_prox():
    """One ProxSGD step = one torch SGD step followed by the prox of the penalty."""
    ref_model, model = _model(), _model()
    pens = {"base_level": gp.GroupLasso(0.3), "layer": gp.GroupLasso(0.05)}
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    prox_only = gp.ProxSGD(
        ref_model.parameters(), lr=0.1, hierarchy=_hierarchy(ref_model), penalties=pens
    )
    opt = gp.ProxSGD(
        model.parameters(), lr=0.1, momentum=0.9, hierarchy=_hierarchy(model), penalties=pens
    )
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(ref_model(x), y).backward()
    ref_opt.step()
    ref_opt.zero_grad(set_to_none=True)
    prox_only.step()  # no gradients: the prox alone
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for p, q in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [gp.ProxSGD, gp.ProxAdam])
def test_state_dict_round_trip_resumes_bit_identically(cls):
    batches = _batches(8)
    kw = dict(lr=0.05) if cls is gp.ProxSGD else dict(lr=1e-2)
    if cls is gp.ProxSGD:
        kw["momentum"] = 0.9

    def make(model):
        return cls(
            model.parameters(),
            **kw,
            hierarchy=_hierarchy(model),
            penalties={"base_level": gp.GroupLasso(0.05), "layer": gp.GroupLasso(0.01)},
        )

    model = _model()
    opt = make(model)
    _train(model, opt, batches)

    resumed_model = _model()
    resumed_opt = make(resumed_model)
    _train(resumed_model, resumed_opt, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": resumed_model.state_dict(), "opt": resumed_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh_model = _model(seed=7)
    fresh_model.load_state_dict(ckpt["model"])
    fresh_opt = make(fresh_model)
    fresh_opt.penalties["base_level"].lam = 123.0  # restored from the checkpoint
    fresh_opt.load_state_dict(ckpt["opt"])
    assert fresh_opt.penalties["base_level"].lam == 0.05
    _train(fresh_model, fresh_opt, batches[4:])
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_other_hierarchy_before_loading():
    model = _model()
    opt = gp.ProxSGD(
        model.parameters(),
        lr=0.1,
        momentum=0.9,
        hierarchy=_hierarchy(model),
        penalties={"base_level": gp.GroupLasso(0.1)},
    )
    _train(model, opt, _batches(2))
    state = opt.state_dict()
    other = _model()
    lin = other[0]
    h = gp.Hierarchy({"base_level": [[(lin.weight, 0, i)] for i in range(4)], "layer": []})
    other_opt = gp.ProxSGD(
        other.parameters(),
        lr=0.1,
        momentum=0.9,
        hierarchy=h,
        penalties={"base_level": gp.GroupLasso(0.1)},
    )
    with pytest.raises(ValueError, match="another hierarchy"):
        other_opt.load_state_dict(state)
    assert len(other_opt.state) == 0


def test_param_groups_with_their_own_lr_and_scheduler():
    model = _model()
    lin, bn, head = model[0], model[1], model[3]
    h = _hierarchy(model)
    opt = gp.ProxSGD(
        [
            {"params": [lin.weight, lin.bias, bn.weight, bn.bias], "lr": 0.1},
            {"params": head.parameters(), "lr": 0.01},
        ],
        lr=0.5,
        momentum=0.9,
        hierarchy=h,
        penalties={"base_level": gp.GroupLasso(3.0)},
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    _train(model, opt, _batches(6), sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert opt.get_sparsity_report().levels["base_level"].zero_groups > 0


def test_tree_spanning_param_groups_needs_one_lr():
    model = _model()
    lin, bn = model[0], model[1]
    h = _hierarchy(model)
    groups = [
        {"params": [lin.weight, lin.bias], "lr": 0.1},
        {"params": [bn.weight, bn.bias], "lr": 0.2},
        {"params": model[3].parameters()},
    ]
    with pytest.raises(ValueError, match="learning rates differ"):
        gp.ProxSGD(groups, lr=0.1, hierarchy=h, penalties={"base_level": gp.GroupLasso(0.1)})

    # equal lrs are fine, until a scheduler makes them differ: then step() refuses before any change
    groups[1]["lr"] = 0.1
    opt = gp.ProxSGD(
        groups, lr=0.1, momentum=0.9, hierarchy=h, penalties={"base_level": gp.GroupLasso(0.1)}
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda e: 1.0, lambda e: 0.5**e, lambda e: 1.0])
    _train(model, opt, _batches(1), sched)
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(ValueError, match="learning rates differ"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = opt.state_dict()["state"]
    assert all(
        torch.equal(state_before[k]["momentum_buffer"], after[k]["momentum_buffer"]) for k in after
    )


def test_unpenalised_level_does_not_link_param_groups():
    model = _model()
    lin, bn = model[0], model[1]
    h = gp.Hierarchy(
        {"w": [[(lin.weight, 0, i)] for i in range(8)], "layer": [[lin.weight, bn.weight]]}
    )
    groups = [{"params": [lin.weight], "lr": 0.1}, {"params": [bn.weight], "lr": 0.2}]
    gp.ProxSGD(groups, hierarchy=h, penalties={"w": gp.GroupLasso(0.1)})  # no error


def test_grad_none_parameter_is_still_shrunk():
    model = _model()
    h = _hierarchy(model)
    opt = gp.ProxSGD(
        model.parameters(), lr=1.0, hierarchy=h, penalties={"layer": gp.GroupLasso(100.0)}
    )
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    model[1].bias.grad = None
    opt.step()
    assert (model[1].bias == 0).all() and (model[0].weight == 0).all()


def test_closure_and_hooks_run_once():
    model = _model()
    opt = gp.ProxSGD(
        model.parameters(),
        lr=0.1,
        hierarchy=_hierarchy(model),
        penalties={"base_level": gp.GroupLasso(0.1)},
    )
    torch.optim.SGD([nn.Parameter(torch.zeros(1))])  # torch now hooks SGD.step too
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    x, y = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == [1]


def test_preconditioner_metric_scales_threshold():
    """With one tree and a known v̂, the threshold is lr·λ·w / mean(√v̂ + ε)."""
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    h = gp.Hierarchy({"rows": [[(w, 0, 0)]]})
    opt = gp.ProxAdam(
        [w],
        lr=1.0,
        betas=(0.0, 0.0),
        eps=0.0,
        weight_decay=0.0,
        hierarchy=h,
        penalties={"rows": gp.GroupLasso(0.0, weight=1.0)},
        prox_metric="preconditioner",
    )
    w.grad = torch.tensor([[2.0, 2.0]], dtype=torch.float64)  # v̂ = 4: metric 2, Adam step = sign
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[2.0, 3.0]], dtype=torch.float64))
    opt.penalties["rows"].lam = 2.0  # eta = 1/2, threshold 1 on norm sqrt(1.5² + 2.5²)
    w.grad = torch.tensor([[2.0, 2.0]], dtype=torch.float64)
    opt.step()
    u = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(w.detach(), u * (1 - 1.0 / u.norm()))


def test_adam_default_threshold_is_lr():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    h = gp.Hierarchy({"rows": [[(w, 0, 0)]]})
    opt = gp.ProxAdam(
        [w],
        lr=0.5,
        weight_decay=0.0,
        hierarchy=h,
        penalties={"rows": gp.GroupLasso(2.0, weight=1.0)},
    )
    opt.step()  # no gradient: the prox alone, threshold 0.5 * 2 = 1 on a norm of 5
    torch.testing.assert_close(w.detach(), torch.tensor([[2.4, 3.2]], dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(penalties={"nope": gp.GroupLasso(0.1)}), ValueError, "names level 'nope'"),
        (dict(penalties={"layer": 0.1}), TypeError, "must be a group_prox penalty"),
        (dict(penalties=[("layer", gp.GroupLasso(0.1))]), TypeError, "mapping"),
        (dict(hierarchy="resnet"), TypeError, "must be a group_prox.Hierarchy"),
        (
            dict(penalties={"base_level": gp.GroupLasso(0.1, groups=["neuron1", "neuron9"])}),
            ValueError,
            "the penalty for level 'base_level' names groups it does not have: 'neuron9'",
        ),
    ],
)
def test_constructor_errors(kwargs, error, match):
    model = _model()
    kw = dict(hierarchy=_hierarchy(model), penalties={"layer": gp.GroupLasso(0.1)})
    kw.update(kwargs)
    with pytest.raises(error, match=match):
        gp.ProxSGD(model.parameters(), lr=0.1, **kw)


def test_hierarchy_parameter_not_in_optimizer():
    model = _model()
    with pytest.raises(ValueError, match=r"not among the optimizer's parameters: 0.weight"):
        gp.ProxSGD(model[3].parameters(), lr=0.1, hierarchy=_hierarchy(model))


def test_penalties_without_hierarchy():
    with pytest.raises(ValueError, match="without a hierarchy"):
        gp.ProxSGD(_model().parameters(), penalties={"x": gp.GroupLasso(1.0)})


def test_prox_adam_metric_validation():
    with pytest.raises(ValueError, match="prox_metric"):
        gp.ProxAdam(_model().parameters(), prox_metric="newton")


def test_penalty_value_and_named_params():
    model = _model()
    opt = gp.ProxSGD(
        model.named_parameters(),
        lr=0.1,
        hierarchy=_hierarchy(model),
        penalties={"layer": gp.GroupLasso(0.5)},
    )
    lin, bn = model[0], model[1]
    flat = torch.cat(
        [t.detach().reshape(-1).double() for t in (lin.weight, lin.bias, bn.weight, bn.bias)]
    )
    assert opt.penalty_value() == pytest.approx(0.5 * flat.numel() ** 0.5 * flat.norm().item())


def test_compiled_prox_sgd_follows_momentum_schedule():
    """OneCycleLR cycles lr and momentum every step: the compiled update must follow both."""
    batches = _batches(6)
    pens = {"base_level": gp.GroupLasso(0.2)}
    models = [_model(), _model()]
    opts, scheds = [], []
    for model, compiled in zip(models, (False, True)):
        opt = gp.ProxSGD(
            model.parameters(),
            lr=0.1,
            momentum=0.9,
            hierarchy=_hierarchy(model),
            penalties=pens,
            compiled=compiled,
        )
        opts.append(opt)
        scheds.append(torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10))
    for model, opt, sched in zip(models, opts, scheds):
        _train(model, opt, batches, sched)
    assert opts[1].param_groups[0]["momentum"] != 0.9
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_compiled_prox_sgd_matches_eager():
    batches = _batches(4)
    pens = {"base_level": gp.GroupLasso(0.2), "layer": gp.GroupLasso(0.02)}
    eager_model, compiled_model = _model(), _model()
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    eager = gp.ProxSGD(
        eager_model.parameters(), **kw, hierarchy=_hierarchy(eager_model), penalties=pens
    )
    compiled = gp.ProxSGD(
        compiled_model.parameters(),
        **kw,
        hierarchy=_hierarchy(compiled_model),
        penalties=pens,
        compiled=True,
    )
    _train(eager_model, eager, batches)
    _train(compiled_model, compiled, batches)
    # the fused path ran: the first pass (norms and the look) and the update with the scales
    assert sorted(key[0] for key in compiled._compiled_update._compiled) == ["norms", "update"]
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert torch.equal(p == 0, q == 0)


@pytest.mark.parametrize("cls", [gp.ProxSGD, gp.ProxAdam])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_training_in_other_precisions(cls, dtype):
    model = _model(dtype=dtype)
    opt = cls(
        model.parameters(),
        lr=0.1,
        hierarchy=_hierarchy(model),
        penalties={"base_level": gp.GroupLasso(2.0)},
    )
    _train(model, opt, _batches(5, dtype))
    assert all(p.dtype == dtype for p in model.parameters())
    report = opt.get_sparsity_report()
    assert report.levels["base_level"].zero_groups > 0
    lin = model[0]
    zero_rows = (lin.weight == 0).all(dim=1)
    assert zero_rows.sum() == report.levels["base_level"].zero_groups


def test_penalty_restricted_to_some_groups():
    model = _model()
    h = _hierarchy(model)
    pen = gp.GroupLasso(1e9, groups={"neuron2", "neuron5"})
    opt = gp.ProxSGD(model.parameters(), lr=1.0, hierarchy=h, penalties={"base_level": pen})
    views = h.groups("base_level")
    expected = sum(
        pen.lam
        * sum(v.numel() for v in views[i]) ** 0.5
        * torch.cat([v.reshape(-1) for v in views[i]]).double().norm().item()
        for i in (2, 5)
    )
    assert opt.penalty_value() == pytest.approx(expected)
    opt.step()
    report = opt.get_sparsity_report()
    assert report.levels["base_level"].zero_group_names == ["neuron2", "neuron5"]
    assert "groups=<2 names>" in repr(pen)
    with pytest.raises(TypeError, match="groups must be a collection of group names"):
        gp.L1(0.1, groups="neuron2")


def test_global_key_is_one_group_over_the_hierarchy():
    model = _model()
    h = _hierarchy(model)
    opt = gp.ProxSGD(
        model.parameters(), lr=1.0, hierarchy=h, penalties={"global": gp.GroupLasso(0.0)}
    )
    assert opt.hierarchy.level_names == ("base_level", "layer", "global")
    assert opt.hierarchy.group_sizes("global") == [sum(p.numel() for p in h.params)]
    with pytest.raises(ValueError, match="already has a level 'layer'"):
        h.with_level("layer", [])
