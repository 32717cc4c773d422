"""A small training run that can stop at a checkpoint and resume from it in another process.

Run as ``python -m tests.resume_run SPEC.json``: ``SPEC`` lists runs, each
``{"optimizer", "dtype", "start", "stop", "load", "save", "out"}``; a run starts from the
checkpoint ``load`` (or from scratch), trains steps ``start..stop-1``, writes the checkpoint
``save`` and the final parameters and optimizer state to ``out``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.nn.functional as F

import group_prox as gp
from group_prox.demo import resnet10

TOTAL_STEPS = 30
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7919 * step + 1)
    return torch.randn(16, 1, 16, 16, generator=g, dtype=dtype), torch.randint(
        0, 10, (16,), generator=g
    )


def build(optimizer: str, dtype: str) -> dict[str, Any]:
    """Fresh model, hierarchy, optimizer, scheduler and sparsity controller."""
    torch.manual_seed(0)
    model = resnet10(4, in_channels=1, num_classes=10).to(DTYPES[dtype])
    hierarchy = gp.hierarchy.resnet(model)
    penalties = {"base_level": gp.GroupLasso(0.0), "layer": gp.GroupLasso(0.0)}
    if optimizer == "sgd":
        opt = gp.ProxSGD(
            model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
            hierarchy=hierarchy, penalties=penalties,
        )  # fmt: skip
    else:
        opt = gp.ProxAdam(
            model.parameters(), lr=3e-3, hierarchy=hierarchy, penalties=penalties,
            prox_metric="preconditioner",
        )  # fmt: skip
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=opt.param_groups[0]["lr"], total_steps=TOTAL_STEPS
    )
    target = gp.SparsityTarget(
        opt, {"base_level": 0.5, "layer": 0.25}, warmup_steps=4, reach_step=18, freeze_step=24
    )
    return {"model": model, "opt": opt, "sched": sched, "target": target}


def checkpoint(run: dict[str, Any]) -> dict[str, Any]:
    return {name: obj.state_dict() for name, obj in run.items()}


def train(run: dict[str, Any], start: int, stop: int, dtype: str) -> None:
    model, opt, sched, target = run["model"], run["opt"], run["sched"], run["target"]
    model.train()
    for step in range(start, stop):
        x, y = _batch(step, DTYPES[dtype])
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        target.step()
        sched.step()


def resume(optimizer: str, dtype: str, path: str) -> dict[str, Any]:
    """Fresh objects (the hierarchy rebuilt from the model), then the checkpoint loaded safely."""
    run = build(optimizer, dtype)
    saved = torch.load(path, weights_only=True)
    for name, obj in run.items():
        obj.load_state_dict(saved[name])
    return run


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    with open(spec_path) as f:
        specs = json.load(f)
    for spec in specs:
        opt_name, dtype = spec["optimizer"], spec["dtype"]
        load = spec.get("load")
        run = resume(opt_name, dtype, load) if load else build(opt_name, dtype)
        train(run, spec["start"], spec["stop"], dtype)
        torch.save(checkpoint(run), spec["save"])


if __name__ == "__main__":
    main(sys.argv[1])
