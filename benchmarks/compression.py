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
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _common import RESULTS, load_mnist1d, machine
from torch import Tensor, nn
from tqdm.auto import tqdm

import group_prox as gp
from group_prox.demo import evaluate, run_demo

RESNET_LEVELS = {"low": (2.2e-3, 4.5e-4), "mid": (3e-3, 6e-4), "high": (6e-3, 1.5e-3)}
TRANSFORMER_LEVELS = {"low": (0.04, 0.015), "mid": (0.08, 0.03), "high": (0.14, 0.05)}
# Fractions of heads and MLP neurons (base_level) a SparsityTarget removes from the HF decoder.
DECODER_LEVELS = {"low": 0.3, "mid": 0.5, "high": 0.7}


# ---------------------------------------------------------------- Hugging Face decoder


def train_decoder(fraction: float, steps: int):
    """A Llama-style decoder (group_prox.demo_hf) on the offline copy task, ProxAdam and a
    SparsityTarget removing ``fraction`` of its heads and neurons; accuracy = copied tokens."""
    from group_prox.demo_hf import build_llama, copy_accuracy, copy_task

    model = build_llama()
    h = gp.hierarchy.transformer(model)
    opt = gp.ProxAdam(
        model.parameters(), lr=3e-3, hierarchy=h, penalties={"base_level": gp.GroupLasso(0.0)}
    )
    target = None
    if fraction > 0:
        target = gp.SparsityTarget(
            opt, {"base_level": fraction}, warmup_steps=steps // 10, reach_step=steps // 2,
            freeze_step=3 * steps // 4,
        )  # fmt: skip
    data = copy_task(steps * 32, seed=0)
    model.train()
    for i in range(steps):
        batch = data[32 * i : 32 * (i + 1)]
        ids = torch.stack([d["input_ids"] for d in batch])
        labels = torch.stack([d["labels"] for d in batch])
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        if target is not None:
            target.step()
    test = copy_task(512, seed=1)
    x_test = torch.stack([d["input_ids"] for d in test])
    return model.eval(), h, test, x_test, copy_accuracy(model, test)


def measure_decoder(level, fraction, acc_dense, model, h, test, x_test, acc_sparse, runs):
    from group_prox.demo_hf import copy_accuracy

    small = gp.compress(model, h, example_inputs={"input_ids": x_test[:64]})
    r1 = gp.compression_report(model, small, {"input_ids": x_test[:1]}, runs=runs)
    r64 = gp.compression_report(model, small, {"input_ids": x_test[:64]}, runs=runs)
    return Row(
        "Llama-style decoder / copy task", level, f"{fraction:g} of heads+neurons", acc_dense,
        acc_sparse, copy_accuracy(small, test), r64.params_removed, r64.flops_removed,
        r64.flops_ratio, r1.speedup, r64.speedup, float("nan"),
    )  # fmt: skip


# ---------------------------------------------------------------- mnist1d transformer


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
    speedup_64_cl: float

    @property
    def realised_64(self) -> float:
        return self.speedup_64 / self.flops_ratio

    @property
    def realised_64_cl(self) -> float:
        return self.speedup_64_cl / self.flops_ratio


def channels_last(model: nn.Module, small: nn.Module, x: Tensor):
    cl = torch.channels_last
    return (
        copy.deepcopy(model).to(memory_format=cl),
        copy.deepcopy(small).to(memory_format=cl),
        x.contiguous(memory_format=cl),
    )


def measure(family, level, lams, acc_dense, model, hierarchy, x_test, y_test, acc_sparse, runs):
    small = gp.compress(model, hierarchy, example_inputs=x_test[:64])
    acc_small = evaluate(small, x_test, y_test)
    r1 = gp.compression_report(model, small, x_test[:1], runs=runs)
    r64 = gp.compression_report(model, small, x_test[:64], runs=runs)
    # Convnets: both models in channels_last, the layout that suits oneDNN's narrow convolutions.
    if x_test.dim() == 4:
        dense_t, small_t, x_t = channels_last(model, small, x_test[:64])
        speedup_cl = gp.compression_report(dense_t, small_t, x_t, runs=runs).speedup
    else:
        speedup_cl = float("nan")
    return Row(
        family, level, lams, acc_dense, acc_sparse, acc_small, r64.params_removed,
        r64.flops_removed, r64.flops_ratio, r1.speedup, r64.speedup, speedup_cl,
    )  # fmt: skip


def where_speed_goes(model: nn.Module, runs: int) -> list[tuple[str, float, float, float]]:
    """Realised share of the ideal speedup at batch 64 under layouts that leave outputs equal."""
    x = torch.randn(64, 3, 8, 8)
    ideal = gp.compression_report(model, gp.compress(model), x, runs=1, warmup=0).flops_ratio
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
            with torch.no_grad():
                torch.testing.assert_close(small(xi), dense(xi), rtol=1e-5, atol=1e-5)
            rep = gp.compression_report(dense, small, xi, runs=runs)
            name = f"multiple={multiple}" + (", channels_last" if channels_last else "")
            variants.append((name, ideal, rep.speedup, rep.speedup / ideal))
    return variants


def _conv_inputs(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    seen: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0]))
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@torch.inference_mode()
def _conv_ms(conv: nn.Module, x: Tensor, runs: int) -> float:
    for _ in range(3):
        conv(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        conv(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@torch.inference_mode()
def per_stage(model: nn.Module, small: nn.Module, runs: int) -> list[tuple[str, float, float]]:
    """Per stage (stem, layer1..4) and in all: convolution FLOPs and time, original vs compressed
    (each conv timed alone on the input it gets in the forward pass, batch 64; a removed conv
    costs 0), then the whole forward pass, whose remainder is every other op."""
    x = torch.randn(64, 3, 8, 8)
    ins_a, ins_b = _conv_inputs(model, x), _conv_inputs(small, x)
    mods_a, mods_b = dict(model.named_modules()), dict(small.named_modules())
    stages: dict[str, list[float]] = {}
    for name, xa in ins_a.items():
        stage = name.split(".")[0] if name.startswith("layer") else "stem"
        acc = stages.setdefault(stage, [0.0, 0.0, 0.0, 0.0])
        pairs = [(mods_a[name], xa)]
        if name in ins_b:
            pairs.append((mods_b[name], ins_b[name]))
        for k, (mod, xi) in enumerate(pairs):
            out = mod(xi)
            acc[k] += mod.weight.numel() * out.shape[0] * out.shape[2] * out.shape[3]
            acc[2 + k] += _conv_ms(mod, xi, runs)
    stages["all convolutions"] = [sum(v[i] for v in stages.values()) for i in range(4)]
    whole = [_conv_ms(m.eval(), x, runs) for m in (model, small)]
    rows = [(s, a[0], a[1], a[2], a[3]) for s, a in stages.items()]
    rows.append(("whole forward pass", float("nan"), float("nan"), *whole))
    conv = stages["all convolutions"]
    rows.append(("everything else (BN, ReLU, add, pool, fc)", float("nan"), float("nan"),
                 whole[0] - conv[2], whole[1] - conv[3]))  # fmt: skip
    return rows


# ---------------------------------------------------------------- report


def _num(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.1f}"


def _ratio(a: float, b: float) -> str:
    if math.isnan(a):
        return ""
    return "removed" if b <= 0 else f"{a / b:.2f}"


def _opt(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:.2f}"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _flags(args) -> str:
    return (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")


def write(rows: list[Row], speed: list, stages: list, args, seconds: float) -> str:
    lines = [
        "# Compression: accuracy, size and speed",
        "",
        f"Machine: {machine()}. Latency: median of {args.runs} calls per model, original and "
        "compressed alternating, `eval()` under `torch.inference_mode()`."
        + (" **Quick mode** (fewer epochs)." if args.quick else ""),
        "",
        "| model | level (λ) | acc dense | acc sparse | acc compressed | params removed | FLOPs "
        "removed | ideal × | speedup b1 | speedup b64 | realised b64 | speedup b64, "
        "channels_last | realised b64, channels_last |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.family} | {r.level} ({r.lams}) | {r.acc_dense:.4f} | {r.acc_sparse:.4f} | "
            f"{r.acc_small:.4f} | {_pct(r.params_removed)} | {_pct(r.flops_removed)} | "
            f"{r.flops_ratio:.2f} | {r.speedup_1:.2f} | {r.speedup_64:.2f} | "
            f"{r.realised_64:.2f} | {_opt(r.speedup_64_cl)} | {_opt(r.realised_64_cl)} |"
        )
    lines += [
        "",
        "ideal × = FLOPs of the sparse model ÷ FLOPs of the compressed one; realised = speedup ÷ "
        "ideal. *channels_last*: both models (sparse and compressed) in that memory format, which "
        "changes no output. Accuracy of the sparse and compressed "
        "models is the same because compression is exact (outputs equal to rtol 1e-5). The "
        "decoder's accuracy is the share of copied tokens predicted right.",
    ]
    if not stages:
        lines += ["", f"Produced by `python benchmarks/compression.py{_flags(args)}` in "
                  f"{seconds / 60:.1f} min."]  # fmt: skip
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "## Where the rest of the ResNet speedup goes (highest level, batch 64)",
        "",
        "Convolutions per stage (each conv timed alone on its forward-pass input; a removed conv "
        "costs 0), then the whole forward pass; plain layout:",
        "",
        "| part | MFLOPs before | MFLOPs after | ms before | ms after | FLOPs ratio | time ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {st} | {_num(fa / 1e6)} | {_num(fb / 1e6)} | {ta:.3f} | {tb:.3f} | "
            f"{_ratio(fa, fb)} | {_ratio(ta, tb)} |"
            for st, fa, fb, ta, tb in stages
        ],
        "",
        "The same whole model under layouts that leave outputs equal (widths rounded up with exact "
        "zero channels; both models in `channels_last`):",
        "",
        "| layout (both models) | ideal × (unrounded) | speedup | realised |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {n} | {f:.2f} | {s:.2f} | {r:.2f} |" for n, f, s, r in speed]
    flags = (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
    lines += [
        "",
        f"Produced by `python benchmarks/compression.py{flags}` in {seconds / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    families = (
        ("resnet18 / digits", "o"),
        ("transformer / mnist1d", "s"),
        ("Llama-style decoder / copy task", "^"),
    )
    for family, marker in families:
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
    parser.add_argument(
        "--only",
        choices=("resnet", "transformer", "decoder"),
        help="one model family; its table goes to results/compression_<family>.md",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = min(args.runs, 10)
    start = time.perf_counter()
    rows: list[Row] = []
    speed: list = []
    stages: list = []
    if args.only in (None, "resnet"):
        resnet_epochs = 4 if args.quick else 12
        dense = run_demo(epochs=resnet_epochs, lam_filter=0.0, lam_layer=0.0, progress=False)
        for level, (lf, ll) in tqdm(RESNET_LEVELS.items(), desc="resnet18 / digits"):
            res = run_demo(epochs=resnet_epochs, lam_filter=lf, lam_layer=ll, progress=False)
            rows.append(measure("resnet18 / digits", level, f"{lf:g}, {ll:g}", dense.accuracy,
                                res.model, res.hierarchy, res.x_test, res.y_test, res.accuracy,
                                args.runs))  # fmt: skip
            sparsest = res.model
        speed = where_speed_goes(sparsest, args.runs)
        stages = per_stage(sparsest, gp.compress(sparsest), args.runs)
    if args.only in (None, "transformer"):
        tr_epochs = 8 if args.quick else 40
        *_, acc_dense = train_transformer(0.0, 0.0, tr_epochs)
        for level, (lu, ll) in tqdm(TRANSFORMER_LEVELS.items(), desc="transformer / mnist1d"):
            model, h, x_test, y_test, acc = train_transformer(lu, ll, tr_epochs)
            rows.append(measure("transformer / mnist1d", level, f"{lu:g}, {ll:g}", acc_dense,
                                model, h, x_test, y_test, acc, args.runs))  # fmt: skip
    if args.only in (None, "decoder"):
        dec_steps = 100 if args.quick else 300
        *_, acc_dense = train_decoder(0.0, dec_steps)
        for level, fraction in tqdm(DECODER_LEVELS.items(), desc="Llama-style decoder"):
            rows.append(measure_decoder(level, fraction, acc_dense,
                                        *train_decoder(fraction, dec_steps), args.runs))  # fmt: skip
    text = write(rows, speed, stages, args, time.perf_counter() - start)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = "compression" if args.only is None else f"compression_{args.only}"
        (RESULTS / f"{name}.md").write_text(text)
        plot(rows, RESULTS / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
