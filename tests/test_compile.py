"""torch.compile of a whole training step that calls ``opt.step()``: same parameters as eager,
and no graph break inside the prox kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import group_prox as gp

pytestmark = pytest.mark.skipif(
    not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported(),
    reason="torch.compile is not supported here",
)


def _make(kind: str, nonfinite: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    a, b = model[0], model[2]
    units = [[(a.weight, 0, i), (a.bias, 0, i), (b.weight, 1, i)] for i in range(16)]
    h = gp.Hierarchy({"unit": units, "layer": [[a.weight, a.bias, b.weight]]}, names=model)
    pens = {"unit": gp.GroupLasso(0.25), "layer": gp.SparseGroupLasso(0.01, l1_ratio=0.3)}
    if kind == "sgd":
        opt = gp.ProxSGD(
            model.parameters(), lr=0.1, momentum=0.9, hierarchy=h, penalties=pens,
            nonfinite=nonfinite,
        )  # fmt: skip
    else:
        pens["unit"].lam = 3.0
        opt = gp.ProxAdam(
            model.parameters(), lr=1e-2, hierarchy=h, penalties=pens, nonfinite=nonfinite
        )
    return model, opt


def _step_fn(model, opt):
    def train_step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return train_step


def _batches():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g))
        for _ in range(6)
    ]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("nonfinite", ["raise", "ignore"])
def test_compiled_training_step_matches_eager(kind, nonfinite):
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        model, opt = _make(kind, nonfinite)
        step = _step_fn(model, opt)
        if compiled:
            step = torch.compile(step)
        for x, y in _batches():
            step(x, y)
        runs[compiled] = model
    for p, q in zip(runs[False].parameters(), runs[True].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert torch.equal(p == 0, q == 0)
    assert (runs[True][0].weight == 0).all(dim=1).any()


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_the_prox_kernels_do_not_break_the_graph(kind):
    """The only graph breaks are ``loss.backward()`` (torch's) and, unless ``nonfinite="ignore"``,
    the look for non-finite values, which must decide on the host whether to step at all."""
    torch._dynamo.reset()
    model, opt = _make(kind, "ignore")
    explained = torch._dynamo.explain(_step_fn(model, opt))(*_batches()[0])
    where = [str(r.user_stack[-1].filename) for r in explained.break_reasons if r.user_stack]
    assert not [f for f in where if "group_prox" in f], [
        (r.reason.splitlines()[0], r.user_stack[-1]) for r in explained.break_reasons
    ]
