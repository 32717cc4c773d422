"""A 2,000-step soak: random λ changes, skipped non-finite steps, a checkpoint every 100 steps.
Memory stays flat and a run resumed from every checkpoint never drifts from the uninterrupted one."""

from __future__ import annotations

import gc
import io
import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import group_prox as gp

STEPS, EVERY = 2000, 100
LAM_SCALE = {"ProxSGD": 1.0, "ProxAdam": 30.0}  # Adam's prox threshold is lr·λ·w with a small lr


def _build(optimizer: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4)
    )
    # Hidden units of the second layer (its row and bias, the next layer's column), in one layer.
    mid, out = model[2], model[4]
    units = {
        f"unit{j}": [(mid.weight, 0, j), (mid.bias, 0, j), (out.weight, 1, j)] for j in range(24)
    }
    layer = {"layer": [mid.weight, mid.bias, out.weight]}
    h = gp.Hierarchy({"unit": units, "layer": layer}, names=model)
    penalties = {"unit": gp.GroupLasso(0.01), "layer": gp.SparseGroupLasso(0.001, l1_ratio=0.2)}
    if optimizer == "sgd":
        opt = gp.ProxSGD(
            model.parameters(), lr=0.05, momentum=0.9, hierarchy=h, penalties=penalties,
            nonfinite="skip",
        )  # fmt: skip
    else:
        opt = gp.ProxAdam(
            model.parameters(), lr=3e-3, hierarchy=h, penalties=penalties, nonfinite="skip"
        )
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=150)
    return {"model": model, "opt": opt, "sched": sched}


def _step(run: dict[str, Any], step: int) -> None:
    model, opt, sched = run["model"], run["opt"], run["sched"]
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 12, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
    if step % 10 == 0:  # random λ changes, the same in both runs
        rng = random.Random(step)
        scale = LAM_SCALE[type(opt).__name__]
        opt.penalties["unit"].lam = scale * rng.uniform(0.0, 0.03)
        opt.penalties["layer"].lam = scale * rng.choice([0.0, rng.uniform(0.0, 0.003)])
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    if step % 333 == 0:
        model[2].weight.grad[0, 0] = float("nan")
    opt.step()
    sched.step()


def _resume(optimizer: str, run: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save({name: obj.state_dict() for name, obj in run.items()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = _build(optimizer)
    for name, obj in fresh.items():
        obj.load_state_dict(saved[name])
    return fresh


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_soak(optimizer):
    whole, resumed = _build(optimizer), _build(optimizer)
    state_bytes, objects = [], []
    for step in range(STEPS):
        _step(whole, step)
        _step(resumed, step)
        if (step + 1) % EVERY:
            continue
        resumed = _resume(optimizer, resumed)
        for p, q in zip(whole["model"].parameters(), resumed["model"].parameters()):
            assert torch.equal(p, q), f"drift at step {step + 1}"
        state_bytes.append(_state_bytes(whole["opt"]))
        gc.collect()
        objects.append(len(gc.get_objects()))
    assert whole["opt"].skipped_steps == resumed["opt"].skipped_steps == len(range(0, STEPS, 333))
    assert len(set(state_bytes)) == 1, state_bytes
    # Python objects: flat after the first checkpoints (caches filled), not growing with steps.
    settled = objects[2:]
    assert max(settled) - min(settled) < 200, objects
    report = whole["opt"].get_sparsity_report()
    assert 0 < report.levels["unit"].group_fraction < 1
