"""Does a long run stay flat in memory, and does resuming from checkpoints ever drift?

A narrow ResNet-10 (BatchNorm, residual branches) trains on scikit-learn's digits with ProxSGD,
nonfinite="skip", a cosine schedule with restarts and a random change of every λ each 50 steps; a
NaN is injected into one gradient every 500 steps. A twin run checkpoints every 100 steps (model,
optimizer, scheduler; ``torch.save`` then ``torch.load(weights_only=True)``) and continues from
fresh objects built from the checkpoint. At every checkpoint it records the process's resident
memory, the number of Python objects the collector tracks, the optimizer state's bytes, and
whether the twin equals the uninterrupted run bit for bit. Writes ``benchmarks/results/soak.md``
and ``soak.png``.

    python benchmarks/soak.py [--steps 5000]
"""

from __future__ import annotations

import argparse
import gc
import io
import random
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import RESULTS, machine
from tqdm.auto import tqdm

import group_prox as gp
from group_prox.demo import load_digits_tensors, resnet10

EVERY = 100


def _rss_mib() -> float:
    """Resident memory now (Linux), else the peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:  # pragma: no cover - not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def _build() -> dict[str, Any]:
    torch.manual_seed(0)
    model = resnet10(8, in_channels=3, num_classes=10)
    opt = gp.ProxSGD(
        model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nonfinite="skip",
        hierarchy=gp.hierarchy.resnet(model),
        penalties={"base_level": gp.GroupLasso(0.0), "layer": gp.GroupLasso(0.0)},
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=500)
    return {"model": model, "opt": opt, "sched": sched}


def _step(run: dict[str, Any], step: int, x: torch.Tensor, y: torch.Tensor) -> None:
    model, opt, sched = run["model"], run["opt"], run["sched"]
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(step))[:64]
    if step % 50 == 0:
        rng = random.Random(step)
        opt.penalties["base_level"].lam = rng.uniform(0.0, 1e-2)
        opt.penalties["layer"].lam = rng.choice([0.0, rng.uniform(0.0, 5e-3)])
    model.train()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x[idx]), y[idx]).backward()
    if step % 500 == 250:
        model.fc.weight.grad[0, 0] = float("nan")
    opt.step()
    sched.step()


def _resume(run: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save({k: v.state_dict() for k, v in run.items()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = _build()
    for k, v in fresh.items():
        v.load_state_dict(saved[k])
    return fresh


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )


def _slope(rows: list[tuple], column: int) -> float:
    """Least-squares slope of ``column`` against the step, per 1,000 steps."""
    steps = np.array([r[0] for r in rows], dtype=float)
    values = np.array([r[column] for r in rows], dtype=float)
    return float(np.polyfit(steps, values, 1)[0] * 1000) if len(rows) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    x, y, *_ = load_digits_tensors(0)
    whole, twin = _build(), _build()
    rows = []
    start = time.perf_counter()
    for step in tqdm(range(args.steps), desc="soak", unit="step"):
        _step(whole, step, x, y)
        _step(twin, step, x, y)
        if (step + 1) % EVERY:
            continue
        twin = _resume(twin)
        same = all(
            torch.equal(p, q)
            for p, q in zip(
                whole["model"].state_dict().values(), twin["model"].state_dict().values()
            )
        )
        gc.collect()
        rows.append((step + 1, _rss_mib(), len(gc.get_objects()), _state_bytes(whole["opt"]), same))
    seconds = time.perf_counter() - start
    report = whole["opt"].get_sparsity_report()

    settled = rows[len(rows) // 10 :]  # after the allocator and caches have warmed up
    rss = [r[1] for r in settled]
    objects = [r[2] for r in settled]
    state = {r[3] for r in rows}
    drift = [r[0] for r in rows if not r[4]]
    lines = [
        "# Soak: memory and resume drift over a long run",
        "",
        f"Machine: {machine()}.",
        f"{args.steps} steps of ProxSGD on a width-8 ResNet-10 (digits, batch 64) and of a twin "
        f"resumed from a checkpoint every {EVERY} steps; λ changed at random every 50 steps, a NaN "
        f"gradient every 500 (skipped: {whole['opt'].skipped_steps} steps). {seconds:.0f} s.",
        "",
        "| measure (from checkpoint 10% on) | first | last | max − min | trend per 1,000 steps |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| resident memory (MiB) | {rss[0]:.1f} | {rss[-1]:.1f} | {max(rss) - min(rss):.1f} | "
        f"{_slope(settled, 1):+.2f} |",
        f"| Python objects tracked by gc | {objects[0]} | {objects[-1]} | "
        f"{max(objects) - min(objects)} | {_slope(settled, 2):+.1f} |",
        f"| optimizer state (bytes) | {rows[0][3]} | {rows[-1][3]} | {max(state) - min(state)} | "
        f"{_slope(rows, 3):+.1f} |",
        "",
        "The trend is the slope of a least-squares line through the checkpoints. Resident memory "
        "moves up and down by tens of MiB as the allocator takes and returns pages, without a "
        "trend.",
        "",
        f"Checkpoints where the resumed twin differs from the uninterrupted run: "
        f"{len(drift)} of {len(rows)}{' (' + ', '.join(map(str, drift[:5])) + ')' if drift else ''}.",
        f"Final zero groups: {report.levels['base_level'].zero_groups} of "
        f"{report.levels['base_level'].groups} filters, {report.levels['layer'].zero_groups} of "
        f"{report.levels['layer'].groups} branches.",
        "",
        "![soak](soak.png)",
        "",
        "Produced by `python benchmarks/soak.py`.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.no_write:
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a bench extra
        return 0
    steps = [r[0] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(steps, [r[1] for r in rows])
    ax1.set(xlabel="step", ylabel="resident memory (MiB)", title="memory")
    ax2.plot(steps, [r[2] for r in rows])
    ax2.set(xlabel="step", ylabel="objects tracked by gc", title="Python objects")
    fig.tight_layout()
    fig.savefig(RESULTS / "soak.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
