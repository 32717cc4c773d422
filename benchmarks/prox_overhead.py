"""What does a step of ProxSGD/ProxAdam cost against torch's own steps, at default settings?

For each model, every iteration times in turn, on the same gradients:

  pass       one in-place ``_foreach_mul_`` over all parameters (the memory floor),
  SGD        ``torch.optim.SGD`` with momentum, torch's default (foreach) and ``fused=True``,
  ProxSGD    at its defaults (momentum; fused update, the look for NaN and infinite values),
             with ``nonfinite="ignore"``, and followed by ``SparsityTarget.step()`` mid-ramp,
  AdamW      ``torch.optim.AdamW`` (foreach and fused) and ``ProxAdam`` at its defaults,
  prox       the hierarchical prox alone,

and reports medians over the iterations of the per-iteration ratios to torch's default step, and
the overheads in passes. Models: torchvision resnet50 (2-level hierarchy: filters and residual
branches), torchvision efficientnet_b0, mobilenet_v3_large and regnet_y_400mf with the ``auto``
hierarchy (many small tensors), and a
Llama-style decoder from a transformers config (heads, MLP neurons, sublayers; an MLP neuron's
atoms include a column of the down projection). Writes ``benchmarks/results/prox_overhead.md``.

    python benchmarks/prox_overhead.py [--iters 40] [--models resnet50,efficientnet_b0,...]
                                       [--device cuda]   # on a GPU: prox_overhead_cuda.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _common import RESULTS as RESULTS_DIR
from _common import machine, publish
from torch import nn
from tqdm.auto import tqdm

import group_prox as gp

RESULTS = RESULTS_DIR / "prox_overhead.md"


def _resnet50() -> tuple[nn.Module, Callable[[nn.Module], gp.Hierarchy], str]:
    from torchvision.models import resnet50

    return resnet50(), gp.hierarchy.resnet, "filters + residual branches"


def _auto(name: str) -> Callable[[], tuple[nn.Module, Callable[[nn.Module], gp.Hierarchy], str]]:
    def build() -> tuple[nn.Module, Callable[[nn.Module], gp.Hierarchy], str]:
        from torchvision import models

        x = torch.randn(1, 3, 64, 64)

        def hierarchy(m: nn.Module) -> gp.Hierarchy:
            return gp.hierarchy.auto(m, x.to(next(m.parameters()).device))

        return getattr(models, name)(), hierarchy, "auto (Torch-Pruning trace)"

    return build


def _decoder() -> tuple[nn.Module, Callable[[nn.Module], gp.Hierarchy], str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=8000,
    )
    return (
        LlamaForCausalLM(config),
        gp.hierarchy.transformer,
        "heads, kv heads, MLP neurons, sublayers",
    )


MODELS = {
    "resnet50": _resnet50,
    "efficientnet_b0": _auto("efficientnet_b0"),
    "mobilenet_v3_large": _auto("mobilenet_v3_large"),
    "regnet_y_400mf": _auto("regnet_y_400mf"),
    "decoder": _decoder,
}


def _copies(
    build, n: int, device: torch.device
) -> tuple[list[nn.Module], Callable[[nn.Module], gp.Hierarchy], str]:
    torch.manual_seed(0)
    first, hierarchy, what = build()
    first.to(device)
    models = [first]
    for _ in range(n - 1):
        m, _, _ = build()
        m.to(device).load_state_dict(first.state_dict())
        models.append(m)
    torch.manual_seed(1)
    grads = [torch.randn_like(p) * 1e-3 for p in first.parameters()]
    for m in models:
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()
    return models, hierarchy, what


def measure(
    name: str, iters: int, warmup: int, device: torch.device
) -> tuple[list[str], dict[str, float]]:
    models, build_h, what = _copies(MODELS[name], 12, device)
    # On an accelerator a step only queues kernels: wait for them before and after each case.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    (m_floor, m_sgd, m_sgdf, m_prox, m_ign, m_tgt, m_adamw, m_adamwf, m_padam, m_alone) = models[
        :10
    ]
    m_comp, m_comp_tgt = models[10:]
    h = build_h(m_prox)

    def pens(h: gp.Hierarchy, lam: float = 1e-6) -> dict[str, gp.Penalty]:
        return {
            lv: gp.GroupLasso(lam if i == 0 else lam / 10) for i, lv in enumerate(h.level_names)
        }

    def prox_sgd(m: nn.Module, **kw) -> gp.ProxSGD:
        hm = build_h(m)
        return gp.ProxSGD(
            m.parameters(), lr=0.01, momentum=0.9, hierarchy=hm, penalties=pens(hm), **kw
        )

    sgd = torch.optim.SGD(m_sgd.parameters(), lr=0.01, momentum=0.9, foreach=True)
    sgdf = torch.optim.SGD(m_sgdf.parameters(), lr=0.01, momentum=0.9, fused=True)
    psgd = prox_sgd(m_prox)
    ign = prox_sgd(m_ign, nonfinite="ignore")
    tgt_opt = prox_sgd(m_tgt)
    # Mid-ramp: λ is steered at every step, and the ramp outlasts the run.
    target = gp.SparsityTarget(
        tgt_opt, dict.fromkeys(tgt_opt.penalties, 0.5), reach_step=100_000, warmup_steps=0
    )
    comp = prox_sgd(m_comp, compiled=True)
    comp_tgt_opt = prox_sgd(m_comp_tgt, compiled=True)
    comp_target = gp.SparsityTarget(
        comp_tgt_opt, dict.fromkeys(comp_tgt_opt.penalties, 0.5), reach_step=100_000, warmup_steps=0
    )
    start = time.perf_counter()
    for _ in range(2):  # the first step creates the momentum buffers, the second compiles
        comp.step()
        comp_tgt_opt.step()
        comp_target.step()
    compile_seconds = time.perf_counter() - start
    adamw = torch.optim.AdamW(m_adamw.parameters(), lr=1e-3, foreach=True)
    adamwf = torch.optim.AdamW(m_adamwf.parameters(), lr=1e-3, fused=True)
    h_adam = build_h(m_padam)
    padam = gp.ProxAdam(m_padam.parameters(), lr=1e-3, hierarchy=h_adam, penalties=pens(h_adam))
    alone = gp.HierarchicalProx(build_h(m_alone), pens(h))
    floor = list(m_floor.parameters())

    def with_target() -> None:
        tgt_opt.step()
        target.step()

    def compiled_with_target() -> None:
        comp_tgt_opt.step()
        comp_target.step()

    cases: dict[str, Callable[[], object]] = {
        "pass": lambda: torch._foreach_mul_([p.detach() for p in floor], 1.0),
        "SGD (foreach)": sgd.step,
        "SGD (fused)": sgdf.step,
        "ProxSGD": psgd.step,
        "ProxSGD, nonfinite='ignore'": ign.step,
        "ProxSGD + SparsityTarget.step()": with_target,
        "ProxSGD, compiled=True": comp.step,
        "ProxSGD, compiled=True, + SparsityTarget.step()": compiled_with_target,
        "AdamW (foreach)": adamw.step,
        "AdamW (fused)": adamwf.step,
        "ProxAdam": padam.step,
        "prox alone": lambda: alone.apply_(0.01),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for it in tqdm(range(warmup + iters), desc=name, unit="iter"):
        for key, fn in cases.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if it >= warmup:
                times[key].append(time.perf_counter() - start)

    def ratio(a: str, b: str) -> float:
        return statistics.median([x / y for x, y in zip(times[a], times[b])])

    def passes(a: str, b: str) -> float:
        return statistics.median(
            [(x - y) / z for x, y, z in zip(times[a], times[b], times["pass"])]
        )

    ratios = {
        "ProxSGD ÷ SGD (foreach)": ratio("ProxSGD", "SGD (foreach)"),
        "ProxSGD ÷ SGD (fused)": ratio("ProxSGD", "SGD (fused)"),
        "(ProxSGD + SparsityTarget) ÷ SGD (foreach)": ratio(
            "ProxSGD + SparsityTarget.step()", "SGD (foreach)"
        ),
        "ProxSGD compiled ÷ SGD (foreach)": ratio("ProxSGD, compiled=True", "SGD (foreach)"),
        "(ProxSGD compiled + SparsityTarget) ÷ SGD (foreach)": ratio(
            "ProxSGD, compiled=True, + SparsityTarget.step()", "SGD (foreach)"
        ),
        "ProxAdam ÷ AdamW (foreach)": ratio("ProxAdam", "AdamW (foreach)"),
        "ProxAdam ÷ AdamW (fused)": ratio("ProxAdam", "AdamW (fused)"),
        "prox alone, in passes": ratio("prox alone", "pass"),
        "the non-finite look, in passes": passes("ProxSGD", "ProxSGD, nonfinite='ignore'"),
    }
    n_params = sum(p.numel() for p in floor)
    groups = ", ".join(f"{h.num_groups(lv):,} {lv}" for lv in h.level_names)
    lines = [
        f"## {name}",
        "",
        f"{n_params / 1e6:.1f} M parameters in {len(floor)} tensors; hierarchy {what}: {groups}. "
        f"`compiled=True`: its first two steps took {compile_seconds:.0f} s with torch.compile's on-disk cache as it was (not in the timings).",
        "",
        "| case | median (ms) | ÷ SGD (foreach) |",
        "| --- | ---: | ---: |",
        *[
            f"| {k} | {1e3 * statistics.median(v):.2f} | {ratio(k, 'SGD (foreach)'):.2f} |"
            for k, v in times.items()
        ],
        "",
        "| ratio (median of per-iteration ratios) | value |",
        "| --- | ---: |",
        *[f"| {k} | {v:.2f} |" for k, v in ratios.items()],
        "",
    ]
    return lines, ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (results to prox_overhead_cuda.md)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = f"{torch.cuda.get_device_name(device)}, driven by " if device.type == "cuda" else ""
    lines = [
        "# What a step costs",
        "",
        f"Machine: {where}{machine()}. {args.iters} timed iterations after {args.warmup} warm-up ones, "
        "the cases interleaved in each iteration, on the same gradients; medians of the "
        "per-iteration ratios. A *pass* is one in-place multiplication of every parameter.",
        "",
    ]
    for name in args.models.split(","):
        section, _ = measure(name, args.iters, args.warmup, device)
        lines += section
    lines += [
        "ProxSGD and ProxAdam use torch's fused update by default where it applies (one pass over "
        "each tensor where foreach makes several). Then the default step reads every gradient "
        "once for NaN and infinite values, so that a bad step changes nothing (the parameters "
        "that the last prox found finite and nothing wrote since are not read again), and the "
        "prox reads every tensor once for its atom norms and reads and writes it once to scale "
        "it. `nonfinite='ignore'` saves the look. A SparsityTarget takes its group norms from "
        "what the prox last read, so its step reads no parameter.",
        "",
        f"Produced by `python benchmarks/prox_overhead.py{' --threads ' + str(args.threads) if args.threads else ''}"
        f"{' --device ' + args.device if device.type != 'cpu' else ''}`.",
    ]
    path = RESULTS if device.type == "cpu" else RESULTS.with_name(f"prox_overhead_{device.type}.md")
    publish(path, lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
