"""Does ``SparsityTarget(params=p)`` end where it was asked to, on models nobody tuned it for?

Trains torchvision's zoo models from their constructors (``resnet18``, ``resnet50``: the plain
ImageNet architectures, a 7×7 stride-2 stem and max-pooling, 10 classes) on scikit-learn's digits
upsampled to 16×16, with ProxSGD or ProxAdam, group lasso on filters (λ) and, with ProxSGD,
residual branches (0.2 λ; ProxAdam penalises the filters only, as its docstring advises) steered
by ``gp.SparsityTarget(opt, params=p, model=model)``, then compresses with
``gp.compress`` and counts the parameters actually removed. The run is short (the point is the
controller, not accuracy): a warm-up, a ramp to ``reach_step``, a hold, the freeze.

Writes ``benchmarks/results/target_reach.md``.

    python benchmarks/target_reach.py [--models resnet18] [--shares 0.5 0.7 0.9 0.95]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from _common import RESULTS, machine, publish

import group_prox as gp
from group_prox.demo import load_digits_tensors

STEPS, WARMUP, REACH, FREEZE, BATCH = 240, 20, 160, 200, 64


def digits16(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _, _ = load_digits_tensors(seed)
    return F.interpolate(x, size=16, mode="bilinear", align_corners=False), y


def run(name: str, kind: str, share: float, x: torch.Tensor, y: torch.Tensor) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    h = gp.hierarchy.resnet(model)
    penalties = {"base_level": gp.GroupLasso(1.0)}
    if kind == "sgd":
        penalties["layer"] = gp.GroupLasso(0.2)
        opt = gp.ProxSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                         hierarchy=h, penalties=penalties)  # fmt: skip
    else:
        opt = gp.ProxAdam(model.parameters(), lr=1e-3, weight_decay=5e-4, hierarchy=h,
                          penalties=penalties)  # fmt: skip
    lr = opt.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=STEPS)
    target = gp.SparsityTarget(opt, params=share, model=model, warmup_steps=WARMUP,
                               reach_step=REACH, freeze_step=FREEZE)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(STEPS):
        idx = torch.randint(0, len(y), (BATCH,), generator=gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        sched.step()
        target.step()
    seconds = time.perf_counter() - start
    model.eval()
    small = gp.compress(copy.deepcopy(model).eval(), None)
    removed = 1 - sum(p.numel() for p in small.parameters()) / sum(
        p.numel() for p in model.parameters()
    )
    return {"removed": removed, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18"])
    parser.add_argument("--kinds", nargs="+", default=["sgd", "adam"], choices=["sgd", "adam"])
    parser.add_argument("--shares", nargs="+", type=float, default=[0.5, 0.7, 0.9, 0.95])
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    x, y = digits16()
    lines = [
        "# `SparsityTarget(params=p)`: parameters removed after `gp.compress`",
        "",
        f"Machine: {machine()}.",
        "",
        f"torchvision models built from their constructors (10 classes), digits at 16×16, "
        f"{STEPS} steps of batch {BATCH}: warm-up {WARMUP}, target reached at step {REACH}, "
        f"frozen at {FREEZE}. ProxSGD lr 0.05 (momentum 0.9), ProxAdam lr 1e-3, OneCycle; group "
        "lasso on filters (λ) and, with ProxSGD, branches (0.2 λ). Removed: 1 − parameters of "
        "the compressed model ÷ parameters of the trained one.",
        "",
        "| model | optimizer | target | removed | error (points) | training (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    worst = 0.0
    for name in args.models:
        for kind in args.kinds:
            for share in args.shares:
                r = run(name, kind, share, x, y)
                err = 100 * (r["removed"] - share)
                worst = max(worst, abs(err))
                lines.append(
                    f"| {name} | Prox{kind.upper() if kind == 'sgd' else 'Adam'} | "
                    f"{100 * share:.0f}% | {100 * r['removed']:.1f}% | {err:+.1f} | "
                    f"{r['seconds']:.0f} |"
                )
                print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"Largest error: {worst:.1f} points."]
    publish(RESULTS / "target_reach.md", lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
