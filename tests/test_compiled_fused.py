"""ProxSGD(compiled=True): the update and the prox fused into two compiled passes.

Against the eager ProxSGD: the same parameters (to float rounding) and the same zeros, for every
SGD option, several param groups, tensors outside the hierarchy, atoms along any dimension and
other precisions; the look for NaN and infinite values happens before anything is written; what
the prox records after a fused step is what a fresh read gives; and where the prox is not a
scaling from norms alone (an L1 part, a frozen pattern) the step falls back to update + prox."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import group_prox as gp

pytestmark = pytest.mark.skipif(
    not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported(),
    reason="torch.compile is not supported here",
)


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)
    )
    with torch.no_grad():  # neurons of unequal size, so that a penalty zeroes some of them
        model[1].weight.copy_(torch.linspace(0.05, 2.0, 8))
    return model.to(dtype)


def _hierarchy(model: nn.Module) -> gp.Hierarchy:
    lin, bn, out = model[0], model[1], model[3]
    neurons = {
        f"neuron{i}": [
            (lin.weight, 0, i),
            (lin.bias, 0, i),
            (bn.weight, 0, i),
            (bn.bias, 0, i),
            (out.weight, 1, i),  # a column: atoms along a later dimension
        ]
        for i in range(8)
    }
    layer = [lin.weight, lin.bias, bn.weight, bn.bias, out.weight]
    return gp.Hierarchy(
        {
            "base_level": neurons,
            "layer": {"hidden": layer},
            "head": {"out": [model[5].weight]},  # a whole-tensor atom
        },
        names=model,
    )


def _batches(n: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(123)
    return [
        (torch.randn(16, 6, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g))
        for _ in range(n)
    ]


def _run(
    compiled: bool,
    *,
    dtype=torch.float32,
    groups: bool = False,
    pens=None,
    steps=6,
    device="cpu",
    **kw,
):
    model = _model(dtype).to(device)
    h = _hierarchy(model)
    if groups:  # two param groups; model[3].bias and model[5].bias are outside the hierarchy
        params = [
            {"params": [model[0].weight, model[0].bias, model[1].weight, model[1].bias]},
            {"params": [model[3].weight, model[3].bias, model[5].weight, model[5].bias]},
        ]
    else:
        params = model.parameters()
    pens = pens or {
        "base_level": gp.GroupLasso(0.5),
        "layer": gp.GroupLasso(0.02),
        "head": gp.GroupMCP(0.05, gamma=3.0),
    }
    opt = gp.ProxSGD(params, hierarchy=h, penalties=pens, compiled=compiled, **kw)
    for x, y in _batches(steps, dtype):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
    return model, opt


def _fused_ran(opt) -> bool:
    return any(key[0] == "norms" for key in opt._compiled_update._compiled)


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.1, momentum=0.9),
        dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, groups=True),
        dict(lr=0.1, momentum=0.5, dampening=0.3, maximize=True),
        dict(lr=0.1, momentum=0.9, dtype=torch.float64),
    ],
    ids=["momentum", "nesterov-wd-groups", "dampening-maximize", "float64"],
)
def test_fused_step_equals_eager(kw):
    eager, _ = _run(False, **kw)
    fused, opt = _run(True, **kw)
    assert _fused_ran(opt)
    tol = 1e-12 if kw.get("dtype") == torch.float64 else 1e-5
    zeros = 0
    for p, q in zip(eager.parameters(), fused.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)
        assert torch.equal(p == 0, q == 0)
        zeros += int((q == 0).sum())
    assert zeros > 0  # the penalties zeroed something


def test_bfloat16_fused_step_keeps_the_zeros_of_eager():
    eager, _ = _run(False, dtype=torch.bfloat16, lr=0.1, momentum=0.9)
    fused, opt = _run(True, dtype=torch.bfloat16, lr=0.1, momentum=0.9)
    assert _fused_ran(opt)
    for p, q in zip(eager.parameters(), fused.parameters()):
        torch.testing.assert_close(p.float(), q.float(), rtol=3e-2, atol=3e-2)


def test_after_a_fused_step_the_prox_knows_the_norms_and_the_finite_parameters():
    model, opt = _run(True, lr=0.1, momentum=0.9)
    prox = opt.prox
    atom_sq, level_sq = prox.group_sq_norms()  # from the fused step's record
    fresh_atoms, fresh_levels = gp.kernels.group_sq_norms(prox.plan)
    torch.testing.assert_close(atom_sq, fresh_atoms, rtol=1e-5, atol=1e-9)
    for a, b in zip(level_sq, fresh_levels):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    hierarchy_params = {id(p) for p in prox.hierarchy.params}
    assert not any(id(p) in hierarchy_params for p in prox.unread(list(model.parameters())))


@pytest.mark.parametrize("mode", ["raise", "skip"])
@pytest.mark.parametrize("where", ["hierarchy", "outside"])
def test_a_nan_gradient_changes_nothing(mode, where):
    model, opt = _run(True, lr=0.1, momentum=0.9, groups=True, nonfinite=mode, steps=2)
    assert _fused_ran(opt)
    x, y = _batches(1)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    bad = model[3].weight if where == "hierarchy" else model[3].bias
    bad.grad[0] = float("nan")
    before = copy.deepcopy((list(model.parameters()), opt.state_dict()))
    if mode == "raise":
        with pytest.raises(
            FloatingPointError,
            match=r"gradient of ('3\.weight'|param_groups\[1\]\['params'\]\[1\])",
        ):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
    for p, q in zip(before[0], model.parameters()):
        assert torch.equal(p, q)
    after = opt.state_dict()["state"]
    for key, entry in before[1]["state"].items():
        assert torch.equal(entry["momentum_buffer"], after[key]["momentum_buffer"])


@pytest.mark.parametrize("case", ["l1", "frozen"])
def test_falls_back_to_update_then_prox(case):
    pens = {
        "base_level": gp.SparseGroupLasso(0.3, l1_ratio=0.5 if case == "l1" else 0.0),
        "layer": gp.GroupLasso(0.02),
    }
    eager, e_opt = _run(False, lr=0.1, momentum=0.9, pens=copy.deepcopy(pens), steps=3)
    fused, f_opt = _run(True, lr=0.1, momentum=0.9, pens=copy.deepcopy(pens), steps=3)
    if case == "frozen":
        e_opt.freeze_zero_groups()
        f_opt.freeze_zero_groups()
        f_opt._compiled_update._compiled.clear()
        for model, opt in ((eager, e_opt), (fused, f_opt)):
            for x, y in _batches(2):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        assert not _fused_ran(f_opt)
    else:
        assert not _fused_ran(f_opt)
    for p, q in zip(eager.parameters(), fused.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert torch.equal(p == 0, q == 0)


def test_ignore_steps_without_looking_and_forgets_that_parameters_were_finite():
    model, opt = _run(True, lr=0.1, momentum=0.9, nonfinite="ignore", steps=2)
    x, y = _batches(1)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[3].weight.grad[0] = float("nan")
    opt.step()  # no look: the NaN goes in, as with nonfinite="ignore" on the default path
    assert _fused_ran(opt)
    assert torch.isnan(model[3].weight).any()
    params = list(model.parameters())
    assert len(opt.prox.unread(params)) == len(params)  # nothing is known to be finite


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("nonfinite", ["raise", "ignore"])
def test_fused_step_equals_eager_on_cuda(nonfinite):
    eager, _ = _run(False, device="cuda", lr=0.1, momentum=0.9, nonfinite=nonfinite)
    fused, opt = _run(True, device="cuda", lr=0.1, momentum=0.9, nonfinite=nonfinite)
    assert _fused_ran(opt)
    for p, q in zip(eager.parameters(), fused.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert torch.equal(p == 0, q == 0)
