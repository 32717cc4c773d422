"""Accuracy, size and speed of compressed models: a ResNet on digits, a transformer on mnist1d.

For each model family, one dense run (every λ = 0) and three sparsity levels are trained; each
sparse model is compressed with ``gp.compress`` and compared with its uncompressed self:

* test accuracy dense / sparse / compressed (the last two must be identical),
* parameters and FLOPs removed, and the FLOPs ratio (the ideal speedup),
* CPU latency at batch 1 and batch 64, median of ``--runs`` calls, the two models alternating,
* realised = speedup ÷ FLOPs ratio: the share of the ideal speedup that the CPU delivers.

A second table asks where the unrealised part of a ResNet's speedup goes (memory format, odd
channel counts), for the middle sparsity level. Writes ``benchmarks/results/compression.md`` and
``compression.png``. Everything is offline: scikit-learn's digits, and mnist1d's own generator.

    python benchmarks/compression.py [--quick] [--runs 30]
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _common import RESULTS, machine
from torch import Tensor, nn
from tqdm.auto import tqdm

import group_prox as gp
from group_prox.demo import evaluate, run_demo

RESNET_LEVELS = {"low": (1.5e-3, 3e-4), "mid": (3e-3, 6e-4), "high": (6e-3, 1.5e-3)}
TRANSFORMER_LEVELS = {"low": (0.04, 0.015), "mid": (0.08, 0.03), "high": (0.14, 0.05)}


# ---------------------------------------------------------------- mnist1d transformer


def load_mnist1d(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mnist1d from its offline generator (never the downloader): 4000 + 1000 signals of 40."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    as_t = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
    return (
        as_t(d["x"], torch.float32),
        as_t(d["y"], torch.long),
        as_t(d["x_test"], torch.float32),
        as_t(d["y_test"], torch.long),
    )


class SignalTransformer(nn.Module):
    """Patches of 4 samples → tokens, a pre-norm ``nn.TransformerEncoder``, mean pooling, linear."""

    def __init__(
        self, length: int = 40, patch: int = 4, d_model: int = 96, heads: int = 6, layers: int = 3
    ) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch, d_model)
        self.pos = nn.Parameter(torch.randn(length // patch, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x.unflatten(-1, (-1, self.patch))) + self.pos
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))


def train_transformer(
    lam_unit: float, lam_layer: float, epochs: int, seed: int = 0
) -> tuple[nn.Module, gp.Hierarchy, Tensor, Tensor, float]:
    torch.manual_seed(seed)
    x, y, x_test, y_test = load_mnist1d(seed)
    model = SignalTransformer()
    hierarchy = gp.hierarchy.transformer(model)
    opt = gp.ProxAdam(
        model.parameters(),
        lr=2e-3,
        weight_decay=0.0,
        hierarchy=hierarchy,
        penalties={"base_level": gp.GroupLasso(lam_unit), "layer": gp.GroupLasso(lam_layer)},
    )
    batch = 100
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=2e-3, total_steps=epochs * math.ceil(len(y) / batch), pct_start=0.1
    )
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return model, hierarchy, x_test, y_test, evaluate(model, x_test, y_test)


# ---------------------------------------------------------------- measurements


@dataclass
class Row:
    family: str
    level: str
    lams: str
    acc_dense: float
    acc_sparse: float
    acc_small: float
    params_removed: float
    flops_removed: float
    flops_ratio: float
    speedup_1: float
    speedup_64: float
    realised_1: float
    realised_64: float
    ms_64: tuple[float, float]


def measure(family, level, lams, acc_dense, model, hierarchy, x_test, y_test, acc_sparse, runs):
    small = gp.compress(model, hierarchy, example_inputs=x_test[:64])
    acc_small = evaluate(small, x_test, y_test)
    r1 = gp.compression_report(model, small, x_test[:1], runs=runs)
    r64 = gp.compression_report(model, small, x_test[:64], runs=runs)
    return Row(
        family, level, lams, acc_dense, acc_sparse, acc_small, r64.params_removed,
        r64.flops_removed, r64.flops_ratio, r1.speedup, r64.speedup, r1.realised, r64.realised,
        (r64.latency_before_ms, r64.latency_after_ms),
    )  # fmt: skip


@torch.inference_mode()
def where_speed_goes(model: nn.Module, runs: int) -> list[tuple[str, float, float, float]]:
    """Realised share of the ideal speedup at batch 64 under layouts that leave outputs equal."""
    x = torch.randn(64, 3, 8, 8)
    variants = []
    for multiple in (1, 8, 16):
        for channels_last in (False, True):
            small = gp.compress(model, multiple=multiple).eval()
            dense = copy.deepcopy(model).eval()
            xi = x
            if channels_last:
                dense = dense.to(memory_format=torch.channels_last)
                small = small.to(memory_format=torch.channels_last)
                xi = x.contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(small(xi), dense(xi), rtol=1e-5, atol=1e-5)
            rep = gp.compression_report(dense, small, xi, runs=runs)
            name = f"multiple={multiple}" + (", channels_last" if channels_last else "")
            variants.append((name, rep.flops_ratio, rep.speedup, rep.realised))
    return variants


def profile_share(model: nn.Module, x: Tensor) -> dict[str, float]:
    """Share of CPU time by operator kind in one eval forward (after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    model.eval()
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                model(x)
    kinds = {"conv": 0.0, "batch_norm": 0.0, "relu/add": 0.0, "linear/pool/other": 0.0}
    total = 0.0
    for ev in prof.key_averages():
        if ev.key in ("aten::conv2d", "aten::batch_norm", "aten::relu", "aten::relu_",
                      "aten::add", "aten::add_", "aten::linear", "aten::adaptive_avg_pool2d",
                      "aten::flatten"):  # fmt: skip
            t = ev.cpu_time_total
            total += t
            if "conv" in ev.key:
                kinds["conv"] += t
            elif "batch_norm" in ev.key:
                kinds["batch_norm"] += t
            elif "relu" in ev.key or "add" in ev.key:
                kinds["relu/add"] += t
            else:
                kinds["linear/pool/other"] += t
    return {k: v / total for k, v in kinds.items()}


# ---------------------------------------------------------------- report


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def write(rows: list[Row], speed: list, shares: dict, args, seconds: float) -> str:
    lines = [
        "# Compression: accuracy, size and speed",
        "",
        f"Machine: {machine()}. Latency: median of {args.runs} calls per model, original and "
        "compressed alternating, `eval()` under `torch.inference_mode()`."
        + (" **Quick mode** (fewer epochs)." if args.quick else ""),
        "",
        "| model | level (λ) | acc dense | acc sparse | acc compressed | params removed | FLOPs "
        "removed | ideal × | speedup b1 | speedup b64 | realised b1 | realised b64 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.family} | {r.level} ({r.lams}) | {r.acc_dense:.4f} | {r.acc_sparse:.4f} | "
            f"{r.acc_small:.4f} | {_pct(r.params_removed)} | {_pct(r.flops_removed)} | "
            f"{r.flops_ratio:.2f} | {r.speedup_1:.2f} | {r.speedup_64:.2f} | "
            f"{r.realised_1:.2f} | {r.realised_64:.2f} |"
        )
    lines += [
        "",
        "realised = speedup ÷ FLOPs ratio. Accuracy of the sparse and compressed models is the "
        "same because compression is exact (outputs equal to rtol 1e-5).",
        "",
        "## Where the rest of the ResNet speedup goes (middle level, batch 64)",
        "",
        "Share of forward time by operator (profiler, original → compressed): "
        + ", ".join(f"{k} {100 * a:.0f}% → {100 * b:.0f}%" for k, (a, b) in shares.items())
        + ".",
        "",
        "| layout (both models) | ideal × | speedup | realised |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {n} | {f:.2f} | {s:.2f} | {r:.2f} |" for n, f, s, r in speed]
    lines += ["", f"Produced by `python benchmarks/compression.py{' --quick' if args.quick else ''}`"
              f" in {seconds / 60:.1f} min."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for family, marker in (("resnet18 / digits", "o"), ("transformer / mnist1d", "s")):
        rs = [r for r in rows if r.family == family]
        if not rs:
            continue
        axes[0].plot([100 * r.params_removed for r in rs], [100 * r.acc_small for r in rs],
                     marker=marker, label=family)  # fmt: skip
        axes[0].axhline(100 * rs[0].acc_dense, ls=":", color=axes[0].lines[-1].get_color())
        axes[1].plot([r.flops_ratio for r in rs], [r.speedup_64 for r in rs], marker=marker,
                     label=f"{family}, batch 64")  # fmt: skip
        axes[1].plot([r.flops_ratio for r in rs], [r.speedup_1 for r in rs], marker=marker,
                     ls="--", label=f"{family}, batch 1")  # fmt: skip
    top = max([r.flops_ratio for r in rows] + [r.speedup_1 for r in rows] + [2.0])
    axes[1].plot([1, top], [1, top], color="grey", lw=0.8, label="ideal (FLOPs ratio)")
    axes[0].set(xlabel="parameters removed (%)", ylabel="test accuracy (%)",
                title="accuracy vs compression (dotted: dense)")  # fmt: skip
    axes[1].set(xlabel="FLOPs ratio (ideal speedup)", ylabel="measured CPU speedup",
                title="speedup")  # fmt: skip
    axes[0].legend(fontsize=8), axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and runs")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = min(args.runs, 10)
    start = time.perf_counter()
    rows: list[Row] = []
    resnet_epochs = 4 if args.quick else 12
    dense = run_demo(epochs=resnet_epochs, lam_filter=0.0, lam_layer=0.0, progress=False)
    mid_model = None
    for level, (lf, ll) in tqdm(RESNET_LEVELS.items(), desc="resnet18 / digits"):
        res = run_demo(epochs=resnet_epochs, lam_filter=lf, lam_layer=ll, progress=False)
        rows.append(measure("resnet18 / digits", level, f"{lf:g}, {ll:g}", dense.accuracy,
                            res.model, res.hierarchy, res.x_test, res.y_test, res.accuracy,
                            args.runs))  # fmt: skip
        if level == "mid":
            mid_model = res.model
    tr_epochs = 8 if args.quick else 40
    *_, acc_dense = train_transformer(0.0, 0.0, tr_epochs)
    for level, (lu, ll) in tqdm(TRANSFORMER_LEVELS.items(), desc="transformer / mnist1d"):
        model, h, x_test, y_test, acc = train_transformer(lu, ll, tr_epochs)
        rows.append(measure("transformer / mnist1d", level, f"{lu:g}, {ll:g}", acc_dense,
                            model, h, x_test, y_test, acc, args.runs))  # fmt: skip
    speed = where_speed_goes(mid_model, args.runs)
    x = torch.randn(64, 3, 8, 8)
    small = gp.compress(mid_model)
    a, b = profile_share(mid_model, x), profile_share(small, x)
    shares = {k: (a[k], b[k]) for k in a}
    text = write(rows, speed, shares, args, time.perf_counter() - start)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "compression.md").write_text(text)
        plot(rows, RESULTS / "compression.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
