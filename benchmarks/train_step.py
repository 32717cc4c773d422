"""What does the prox add to a whole training step (forward, backward, optimizer step)?

``prox_overhead.py`` compares optimizer steps alone; a user pays for a training step. For each
shape, each iteration runs every case once, in turn (the starting case rotates), on the same batch:
``zero_grad`` + forward + loss + backward, then the optimizer step, timed separately. Every case
trains its own copy of the model, all with the same initial weights.

Shapes:

  resnet50      torchvision resnet50, 224×224 images, batch 32, ``gp.hierarchy.resnet``
                (filters + residual branches), cross-entropy on random labels;
  decoder       a Llama-style decoder from a ``transformers`` config (hidden 512, 8 layers, 8 heads,
                4 key/value heads, MLP 1408, vocabulary 8000), sequences of 128, batch 8,
                ``gp.hierarchy.transformer`` (heads and neurons, key/value heads, sublayers, layers),
                next-token loss on random tokens;
  efficientnet  torchvision efficientnet_b0, 224×224, batch 32, ``gp.hierarchy.auto`` (many small
                tensors).

Cases: (1) ``torch.optim.SGD`` (momentum 0.9, torch's default implementation), (2) ``ProxSGD``
(momentum 0.9, otherwise defaults), (3) ``ProxSGD`` + ``SparsityTarget`` mid-ramp (no warm-up,
a ramp longer than the run; ``target.step()`` is timed with the optimizer step), (4)
``torch.optim.AdamW``, (5) ``ProxAdam`` (defaults). Reports medians over iterations of the whole
step, forward + backward and the optimizer step of each case, and the prox's share of the training
step, ``(ProxSGD − SGD) / ProxSGD`` on whole steps (the median of per-iteration values), with the
same share computed from the optimizer steps alone (less noisy: forward and backward are the same
work in both cases). Writes ``benchmarks/results/train_step.md``.

    python benchmarks/train_step.py [--shapes resnet50 decoder efficientnet] [--iters 8]
                                    [--warmup 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from _common import RESULTS as RESULTS_DIR
from _common import machine, publish
from torch import nn
from tqdm.auto import tqdm

import group_prox as gp

RESULTS = RESULTS_DIR / "train_step.md"
SGD_LR, ADAM_LR = 0.01, 1e-3


@dataclass
class Shape:
    """A model, one batch, its loss and how group_prox sees it."""

    name: str
    description: str
    model: nn.Module
    batch: dict[str, torch.Tensor]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    hierarchy: Callable[[nn.Module], gp.Hierarchy]
    #: λ of each penalised level (the same for ProxSGD and ProxAdam: the threshold is lr·λ·w_g).
    lams: dict[str, float]
    #: the SparsityTarget's fractions of zero groups.
    targets: dict[str, float]
    extra: dict[str, str] = field(default_factory=dict)


def _image_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def resnet50_shape() -> Shape:
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = resnet50()
    batch = {"x": torch.randn(32, 3, 224, 224), "y": torch.randint(0, 1000, (32,))}
    return Shape(
        "resnet50",
        "torchvision resnet50, 224×224, batch 32",
        model,
        batch,
        _image_loss,
        gp.hierarchy.resnet,
        {"base_level": 1e-5, "layer": 1e-6},
        {"base_level": 0.5, "layer": 0.25},
    )


def efficientnet_shape() -> Shape:
    from torchvision.models import efficientnet_b0

    torch.manual_seed(0)
    model = efficientnet_b0()
    batch = {"x": torch.randn(32, 3, 224, 224), "y": torch.randint(0, 1000, (32,))}
    example = batch["x"][:1]
    return Shape(
        "efficientnet",
        "torchvision efficientnet_b0, 224×224, batch 32",
        model,
        batch,
        _image_loss,
        lambda m: gp.hierarchy.auto(m, example),
        {"base_level": 1e-5, "layer": 1e-6},
        {"base_level": 0.5, "layer": 0.25},
    )


def decoder_shape() -> Shape:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    seq, batch_size = 128, 8
    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq))

    def loss(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(input_ids=b["input_ids"], labels=b["input_ids"]).loss

    return Shape(
        "decoder",
        f"Llama-style decoder (hidden 512, 8 layers, 8 heads / 4 KV heads, MLP 1408, "
        f"vocabulary 8000), sequences of {seq}, batch {batch_size}",
        model,
        {"input_ids": ids},
        loss,
        gp.hierarchy.transformer,
        {"base_level": 1e-5, "kv_head": 1e-6, "layer": 1e-6, "whole_layer": 1e-7},
        {"base_level": 0.5},
    )


SHAPES = {"resnet50": resnet50_shape, "decoder": decoder_shape, "efficientnet": efficientnet_shape}

SGD, PROX_SGD, TARGET, ADAMW, PROX_ADAM = (
    "torch SGD",
    "ProxSGD",
    "ProxSGD + SparsityTarget",
    "torch AdamW",
    "ProxAdam",
)
#: Each case and the torch case it replaces.
BASELINE = {SGD: SGD, PROX_SGD: SGD, TARGET: SGD, ADAMW: ADAMW, PROX_ADAM: ADAMW}


def build_cases(shape: Shape, total_steps: int):
    """One model copy and one optimizer (+ an optional SparsityTarget) per case."""
    state = copy.deepcopy(shape.model.state_dict())
    cases = {}
    hierarchy = None
    for name in (SGD, PROX_SGD, TARGET, ADAMW, PROX_ADAM):
        model = copy.deepcopy(shape.model)
        model.load_state_dict(state)
        model.train()
        params = list(model.parameters())
        target = None
        if name == SGD:
            opt = torch.optim.SGD(params, lr=SGD_LR, momentum=0.9)
        elif name == ADAMW:
            opt = torch.optim.AdamW(params, lr=ADAM_LR)
        else:
            h = shape.hierarchy(model)
            hierarchy = hierarchy or h
            lams = {lv: lam for lv, lam in shape.lams.items() if lv in h.level_names}
            if name == TARGET:
                lams = {lv: 0.0 if lv in shape.targets else lam for lv, lam in lams.items()}
            pens = {lv: gp.GroupLasso(lam) for lv, lam in lams.items()}
            if name == PROX_ADAM:
                opt = gp.ProxAdam(params, lr=ADAM_LR, hierarchy=h, penalties=pens)
            else:
                opt = gp.ProxSGD(params, lr=SGD_LR, momentum=0.9, hierarchy=h, penalties=pens)
            if name == TARGET:
                # Mid-ramp for the whole run: no warm-up, the targets reached long after it.
                target = gp.SparsityTarget(
                    opt, shape.targets, warmup_steps=0, reach_step=max(1000, 10 * total_steps)
                )
        cases[name] = (model, opt, target)
    assert hierarchy is not None
    return cases, hierarchy


def run_shape(shape: Shape, warmup: int, iters: int) -> tuple[dict, gp.Hierarchy]:
    cases, hierarchy = build_cases(shape, warmup + iters)
    names = list(cases)
    times: dict[str, dict[str, list[float]]] = {
        n: {"whole": [], "fwd_bwd": [], "step": [], "target": []} for n in names
    }
    for it in tqdm(range(warmup + iters), desc=shape.name, unit="iter"):
        k = it % len(names)
        for name in names[k:] + names[:k]:
            model, opt, target = cases[name]
            gc.collect()
            t0 = time.perf_counter()
            opt.zero_grad()
            shape.loss(model, shape.batch).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if target is not None:
                target.step()
            t3 = time.perf_counter()
            if it >= warmup:
                rec = times[name]
                rec["whole"].append(t3 - t0)
                rec["fwd_bwd"].append(t1 - t0)
                rec["step"].append(t3 - t1)
                rec["target"].append(t3 - t2)
    for name, (model, _, _) in cases.items():
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise RuntimeError(f"{shape.name}, {name}: non-finite parameters {bad[:3]}")
    return times, hierarchy


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def report(shape: Shape, times: dict, h: gp.Hierarchy) -> list[str]:
    n_params = sum(p.numel() for p in shape.model.parameters())
    levels = ", ".join(f"{lv} {h.num_groups(lv)}" for lv in h.level_names)
    pens = ", ".join(f"{lv} {lam:g}" for lv, lam in shape.lams.items() if lv in h.level_names)
    targets = ", ".join(f"{lv} {f:g}" for lv, f in shape.targets.items())
    lines = [
        f"## {shape.name}",
        "",
        f"{shape.description}; {n_params / 1e6:.1f} M parameters in {len(h.tensors)} penalised "
        f"tensors; groups per level: {levels}. GroupLasso λ: {pens}; SparsityTarget: {targets}.",
        "",
        "| case | whole step (ms) | forward + backward (ms) | optimizer step (ms) | step ÷ whole |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, rec in times.items():
        share = med([s / w for s, w in zip(rec["step"], rec["whole"], strict=True)])
        step = f"{1e3 * med(rec['step']):.1f}"
        if name == TARGET:
            step += f" (target {1e3 * med(rec['target']):.1f})"
        lines.append(
            f"| {name} | {1e3 * med(rec['whole']):.0f} | {1e3 * med(rec['fwd_bwd']):.0f} "
            f"| {step} | {100 * share:.1f}% |"
        )
    lines += [
        "",
        "| what the prox adds | share of the training step, from whole steps "
        "| from optimizer steps alone | whole step ÷ torch's |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in (PROX_SGD, TARGET, PROX_ADAM):
        rec, base = times[name], times[BASELINE[name]]
        whole = med([(w - b) / w for w, b in zip(rec["whole"], base["whole"], strict=True)])
        steps = med(
            [(s - b) / w for s, b, w in zip(rec["step"], base["step"], rec["whole"], strict=True)]
        )
        ratio = med([w / b for w, b in zip(rec["whole"], base["whole"], strict=True)])
        lines.append(
            f"| {name} vs {BASELINE[name]} | {100 * whole:.1f}% | {100 * steps:.1f}% "
            f"| {ratio:.3f} |"
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--iters", type=int, default=8, help="timed iterations per shape")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--iters and --threads must be at least 1, --warmup at least 0")
    torch.set_num_threads(args.threads)

    sections = []
    for key in args.shapes:
        shape = SHAPES[key]()
        times, h = run_shape(shape, args.warmup, args.iters)
        sections += report(shape, times, h)

    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/train_step.py", *given])
    lines = [
        "# What the prox adds to a training step",
        "",
        f"Machine: {machine()}.",
        f"{args.iters} timed iterations after {args.warmup} warm-up ones per shape; in each, "
        "every case runs zero_grad + forward + loss + backward, then its optimizer step (timed "
        "separately), on the same batch, one case after another (the first case rotates). Each "
        "case trains its own copy of the model from the same initial weights. Medians over the "
        f"iterations; lr {SGD_LR:g} for SGD and ProxSGD (momentum 0.9), {ADAM_LR:g} for AdamW and "
        "ProxAdam. The SparsityTarget is mid-ramp (no warm-up, targets reached long after the "
        "run), and its `step()` is counted in the optimizer step.",
        "",
        f"torch's own optimizers run their default implementation (on CPU tensors in torch "
        f"{torch.__version__}: one tensor at a time, not foreach); ProxSGD and ProxAdam default "
        "to torch's fused kernels where they apply, so their step includes that faster update "
        "as well as the prox.",
        "",
        *sections,
        'The share "from whole steps" is the median of (case − torch\'s) ÷ case on whole steps; '
        '"from optimizer steps" subtracts the optimizer steps alone and divides by the case\'s '
        "whole step, which leaves out the iteration-to-iteration noise of forward and backward "
        "(the same work in both cases).",
        "",
        f"Produced by `{command}`.",
    ]
    publish(RESULTS, lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
