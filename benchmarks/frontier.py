"""Accuracy against compression for several structured-sparsity methods, at equal training cost.

Two offline tasks, each with a narrow ResNet-10 (torchvision ``ResNet`` with ``BasicBlock`` and
one block per stage, widths w, 2w, 4w, 8w): scikit-learn's 8×8 digits, and mnist1d's signals of
length 40 fed as images of shape (1, 1, 40) through (1, 3) kernels. Every method trains for the
same number of epochs E (sparse training, then F = E // 4 epochs of fine-tuning) on the same data
order from the same initialisation, and is measured on the final, physically smaller model:

* test accuracy of the final model (mean ± std over seeds),
* parameters and FLOPs (batch 1, ``torch.utils.flop_counter``) removed relative to the dense model,
  conv filters (output channels) removed, residual branches removed (blocks that became shortcuts),
* wall time per training epoch on this machine.

Methods: dense SGD and AdamW; a group-lasso penalty added to the loss then thresholded
(``seed``); Torch-Pruning's ``GroupNormPruner`` (``tp-groupnorm``); per-layer magnitude pruning of
the blocks' inner filters (``magnitude``); ``ProxSGD``/``ProxAdam`` steered to a share of the
parameters removed by ``gp.SparsityTarget(params=...)`` (``prox-sgd``, ``prox-adam``: the default
path; ``prox-adam-branches``: ProxAdam with the branches penalised too); ProxSGD with one
fixed λ (``prox-fixed``); and the target's per-layer magnitude selection
(``prox-uniform``). Each sparse method has settings spanning
about 50% to 95% of the parameters removed; its accuracy
at exactly those points is read off its curve by linear interpolation (never extrapolated).

Writes ``benchmarks/results/frontier.md``, ``frontier.png`` and every run's row to
``frontier_rows.json``; ``--reuse`` reruns only the given methods and takes the other methods'
rows from that file (a change to one method costs its own runs, not the whole frontier).

    python benchmarks/frontier.py [--quick] [--seeds 3] [--jobs 2] [--tasks ...] [--methods ...]
                                  [--reuse]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import RESULTS, load_mnist1d, machine
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock
from tqdm.auto import tqdm

import group_prox as gp
from group_prox.compression.report import count_flops
from group_prox.compression.resnet import BlockShortcut
from group_prox.demo import evaluate, init_like_torchvision, load_digits_tensors, resnet10

TASKS = ("digits", "mnist1d")

# Stage widths (w, 2w, 4w, 8w). Chosen so that the task discriminates between methods: at these
# widths, zeroing 80% of the blocks' inner filters by magnitude and fine-tuning (full budget)
# costs at least 2 points of test accuracy, while the dense model is still good. Wider ResNet-10s
# are so over-parameterised for these tasks that every method looks perfect. Dense SGD vs
# magnitude-80% accuracy (%), mean over seeds: digits w = 4: 99.0 vs 95.5, w = 8: 99.2 vs 96.3,
# w = 16: 99.0 vs 97.7; mnist1d w = 8: 97.7 vs 93.7, w = 16: 98.0 vs 96.0, w = 32: 98.4 vs 97.5.
WIDTHS = {"digits": 8, "mnist1d": 8}
BATCH = {"digits": 64, "mnist1d": 100}

SGD_LR, SGD_MOMENTUM, SGD_WD = 0.1, 0.9, 5e-4
# AdamW's peak lr, swept for dense AdamW and ProxAdam (3 seeds, accuracy % digits / mnist1d):
# dense 2e-3: 97.96 / 96.17, 1e-2: 98.89 / 97.70, 2e-2: 98.70 / 98.03, 5e-2: 98.89 / 98.47,
# 1e-1: 98.80 / 98.33. ProxAdam (prox_metric="lr") at 90% removed on mnist1d: 1e-2 95.8,
# 2e-2 96.0, 5e-2 83.4 (the target lags the schedule, then snaps live groups). 2e-2: dense
# within 0.5 of its best, ProxAdam stable.
ADAMW_LR, ADAMW_WD = 2e-2, 5e-4
FINETUNE_SGD_LR = 0.01  # fine-tuning: a fresh OneCycle at a tenth of the training lr

# seed: the branch penalty is SEED_LAYER_RATIO × λ; groups (and branches) whose norm is below
# SEED_REL_THRESHOLD × the largest norm of their level are zeroed after sparse training.
SEED_REL_THRESHOLD = 1e-3
# tp-groupnorm: strength of GroupNormPruner's sparsity regulariser during sparse training.
TP_REG = 5e-4
# prox: the targets are reached after this fraction of the sparse epochs, then held until the
# zero pattern is frozen for the fine-tuning epochs.
PROX_REACH = float(__import__("os").environ.get("PROX_REACH", "0.6"))

Knob = float | dict[str, float] | None

# prox-sgd / prox-adam: the share of the parameters gp.compress removes, gp.SparsityTarget(params=).
PROX_TARGETS: list[Knob] = [0.5, 0.7, 0.9, 0.95]
# prox-uniform: fractions of zero filters / zero branches, selection="uniform" (per-layer magnitude).
UNIFORM_KNOBS: list[Knob] = [
    {"base_level": 0.5, "layer": 0.0},
    {"base_level": 0.4, "layer": 0.25},
    {"base_level": 0.8, "layer": 0.25},
]
# The branch penalty's share of the filters' λ, for the seed and for ProxSGD.
LAYER_RATIO = 0.2
# ProxAdam penalises the filters only: a branch still goes once its last filter does. With the
# branches at LAYER_RATIO too (prox-adam-branches), 5 seeds at 50 / 70 / 90 / 95% removed gave
# 98.38 / 98.24 / 95.93 / 88.02 on mnist1d (filters only: 98.28 / 98.36 / 97.30 / 91.40) and
# 0.05 gave 96.28 / 85.36 at 90 / 95%; ProxSGD is indifferent (filters only: 98.52 / 98.62 /
# 98.38 / 95.96 against 98.60 / 98.48 / 98.18 / 96.95).
ADAM_LAYER_RATIO = 0.0


@dataclass(frozen=True)
class Budget:
    """Training cost, equal for every method: ``epochs`` in all, the last ``finetune`` of them
    spent fine-tuning the pruned model (for dense baselines, all ``epochs`` are plain training)."""

    epochs: int
    finetune: int

    @property
    def sparse(self) -> int:
        return self.epochs - self.finetune


FULL_BUDGET = {"digits": Budget(30, 30 // 4), "mnist1d": Budget(30, 30 // 4)}
QUICK_BUDGET = {"digits": Budget(12, 3), "mnist1d": Budget(8, 2)}

# Per method and task, three settings aimed at ≈ 50 / 70 / 90 % of the parameters removed under
# the full budget (the quick budget uses the same values). Where a method cannot land near a point
# the settings bracket what it can do: on digits, ``seed`` jumps from ≈ 25% to ≈ 70% removed when
# layer4's branch (≈ 70% of the parameters) dies; on mnist1d, ``magnitude`` tops out near 82%
# (removing every inner filter still leaves the stem, downsamples and the blocks' output filters).
KNOBS: dict[str, dict[str, list[Knob]]] = {
    "dense-sgd": {t: [None] for t in TASKS},
    "dense-adamw": {t: [None] for t in TASKS},
    "seed": {"digits": [3e-4, 4e-4, 2e-3, 4e-3], "mnist1d": [4e-4, 7e-4, 2e-3, 4e-3]},
    "tp-groupnorm": {t: [0.27, 0.45, 0.7] for t in TASKS},
    "magnitude": {"digits": [0.5, 0.75, 0.95], "mnist1d": [0.55, 0.8, 0.95]},
    "prox-sgd": {t: PROX_TARGETS for t in TASKS},
    "prox-adam": {t: PROX_TARGETS for t in TASKS},
    "prox-adam-precond": {t: PROX_TARGETS for t in TASKS},
    "prox-adam-branches": {t: PROX_TARGETS for t in TASKS},
    # The seed's in-loss λs, translated by gp.prox_lambda (× 1/(1 − momentum) = 10).
    "prox-fixed": {t: [4e-4, 7e-4, 1.2e-3, 2e-3] for t in TASKS},
    # One zero branch (layer4's, the largest) removes about 70% of the parameters by itself.
    "prox-uniform": {t: UNIFORM_KNOBS for t in TASKS},
    "prox-stream": {t: PROX_TARGETS for t in TASKS},
}


# ---------------------------------------------------------------- data and model


@dataclass(frozen=True)
class Data:
    task: str
    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.y) / BATCH[self.task])


@functools.cache
def load_task(task: str, seed: int) -> Data:
    """Digits as (N, 3, 8, 8) images (split seeded by ``seed``); mnist1d as (N, 1, 1, 40) images
    (generated with ``seed``)."""
    if task == "digits":
        return Data(task, *load_digits_tensors(seed))
    if task == "mnist1d":
        x, y, x_test, y_test = load_mnist1d(seed)
        return Data(task, x[:, None, None, :], y, x_test[:, None, None, :], y_test)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def _as_1d(model: nn.Module) -> None:
    """Swap every Conv2d for one that only slides along the last axis: 3×3 → (1, 3) with padding
    (0, 1), 1×1 stays 1×1; stride s → (1, s). Inputs of height 1 then never meet a parameter that
    only sees padding."""
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if not isinstance(conv, nn.Conv2d):
                continue
            k, s = conv.kernel_size[1], conv.stride[1]
            new = nn.Conv2d(
                conv.in_channels, conv.out_channels, (1, k), stride=(1, s), padding=(0, k // 2),
                bias=conv.bias is not None,
            )  # fmt: skip
            setattr(parent, name, new)


def build_model(task: str, width: int) -> nn.Module:
    """``group_prox.demo.resnet10``: ResNet-10 (``BasicBlock``, layers [1, 1, 1, 1]) with stage
    widths w, 2w, 4w, 8w, a 3×3 stride-1 stem and no max-pooling; for mnist1d, every kernel is
    (1, k). The model is a plain torchvision ``ResNet``, initialised as torchvision does."""
    model = resnet10(width, in_channels=3 if task == "digits" else 1)
    if task == "mnist1d":
        _as_1d(model)
        init_like_torchvision(model)
    return model


def new_model(task: str, seed: int) -> nn.Module:
    """The task's model with the seed's initialisation (the same for every method)."""
    torch.manual_seed(seed)
    return build_model(task, WIDTHS[task])


def blocks(model: nn.Module) -> list[BasicBlock]:
    return [m for m in model.modules() if isinstance(m, BasicBlock)]


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Every conv with the BatchNorm that normalises it: stem, block convs, downsamples."""
    pairs = [(model.conv1, model.bn1)]
    for b in blocks(model):
        pairs += [(b.conv1, b.bn1), (b.conv2, b.bn2)]
        if b.downsample is not None:
            pairs.append((b.downsample[0], b.downsample[1]))
    return pairs


def filter_sq_norms(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
    """Squared norm of each filter group: the conv filter and its BatchNorm γ, β."""
    return conv.weight.flatten(1).pow(2).sum(1) + bn.weight.pow(2) + bn.bias.pow(2)


def branch_sq_norm(block: BasicBlock) -> Tensor:
    return sum(p.pow(2).sum() for p in _branch_params(block))


def _branch_params(block: BasicBlock) -> list[Tensor]:
    return [p for m in (block.conv1, block.bn1, block.conv2, block.bn2) for p in m.parameters()]


# ---------------------------------------------------------------- masks


@dataclass
class FilterMask:
    """Filter groups held at exactly zero: per (conv, bn) pair, a bool tensor over its filters."""

    dead: list[tuple[nn.Conv2d, nn.BatchNorm2d, Tensor]] = field(default_factory=list)

    def kill(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, dead: Tensor) -> None:
        self.dead.append((conv, bn, dead.clone()))

    def kill_branch(self, block: BasicBlock) -> None:
        for conv, bn in ((block.conv1, block.bn1), (block.conv2, block.bn2)):
            self.kill(conv, bn, torch.ones(conv.out_channels, dtype=torch.bool))

    @torch.no_grad()
    def apply(self) -> None:
        for conv, bn, dead in self.dead:
            conv.weight[dead] = 0.0
            bn.weight[dead] = 0.0
            bn.bias[dead] = 0.0


# ---------------------------------------------------------------- training


def sgd(model: nn.Module, lr: float, epochs: int, data: Data) -> tuple[Any, Any]:
    """SGD with momentum and weight decay under a OneCycle schedule over ``epochs``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=SGD_MOMENTUM, weight_decay=SGD_WD)
    return opt, _one_cycle(opt, lr, epochs, data)


def adamw(model: nn.Module, lr: float, epochs: int, data: Data) -> tuple[Any, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=ADAMW_WD)
    return opt, _one_cycle(opt, lr, epochs, data)


def _one_cycle(opt: torch.optim.Optimizer, lr: float, epochs: int, data: Data) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(1, epochs * data.steps_per_epoch), pct_start=0.15
    )


def train(
    model: nn.Module,
    data: Data,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    seed: int,
    first_epoch: int = 0,
    extra_loss: Callable[[], Tensor] | None = None,
    after_backward: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    desc: str = "",
) -> list[float]:
    """Train for ``epochs`` epochs with cross entropy (+ ``extra_loss()``); return the wall time
    of each epoch. Epoch ``e`` (counted from ``first_epoch``) visits the training set in the order
    of a permutation drawn from a generator seeded by (``seed``, ``e``), so every method sees the
    same batches. ``after_backward`` runs before each optimizer step (gradient regularisers),
    ``after_step`` after the scheduler step (masks, sparsity controllers)."""
    batch = BATCH[data.task]
    times = []
    for epoch in tqdm(range(first_epoch, first_epoch + epochs), desc=desc, unit="epoch",
                      leave=False):  # fmt: skip
        start = time.perf_counter()
        model.train()
        gen = torch.Generator().manual_seed(10_000 * seed + epoch)
        perm = torch.randperm(len(data.y), generator=gen)
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            if extra_loss is not None:
                loss = loss + extra_loss()
            loss.backward()
            if after_backward is not None:
                after_backward()
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
        times.append(time.perf_counter() - start)
    return times


def finetune(
    model: nn.Module, data: Data, budget: Budget, seed: int, mask: FilterMask | None = None
) -> list[float]:
    """The last ``budget.finetune`` epochs: SGD at the fine-tuning lr, the mask re-applied after
    every step."""
    mask_fn = mask.apply if mask is not None else None
    if mask is not None:
        mask.apply()
    opt, sched = sgd(model, FINETUNE_SGD_LR, budget.finetune, data)
    return train(model, data, budget.finetune, opt, sched, seed=seed, first_epoch=budget.sparse,
                 after_step=mask_fn, desc="fine-tune")  # fmt: skip


# ---------------------------------------------------------------- measurements


@dataclass
class Row:
    """One run: the final model's accuracy and what was removed from the dense model."""

    task: str
    method: str
    knob: str
    seed: int
    accuracy: float
    params_removed: float
    filters_removed: int
    branches_removed: int
    flops_removed: float
    s_per_epoch: float
    # seed only: filter groups exactly 0 / with norm < 1e-3 at the end of sparse training.
    zero_exact: float = math.nan
    zero_small: float = math.nan


def _filters(model: nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


@torch.no_grad()
def _flops(model: nn.Module, x: Tensor) -> int:
    model.eval()
    return count_flops(model, x)


def knob_str(knob: Knob) -> str:
    if knob is None:
        return "—"
    if isinstance(knob, dict):
        return ", ".join(f"{k}={v:g}" for k, v in knob.items())
    return f"{knob:g}"


def measure(
    method: str, knob: Knob, seed: int, final: nn.Module, data: Data, times: Sequence[float]
) -> Row:
    """Compare the final (already physically smaller) model with a dense model of the task."""
    dense = build_model(data.task, WIDTHS[data.task])
    x1 = data.x_test[:1]
    n_dense, n_final = (sum(p.numel() for p in m.parameters()) for m in (dense, final))
    f_dense, f_final = _flops(dense, x1), _flops(final, x1)
    shortcuts = sum(isinstance(m, BlockShortcut) for m in final.modules())
    return Row(
        task=data.task,
        method=method,
        knob=knob_str(knob),
        seed=seed,
        accuracy=evaluate(final, data.x_test, data.y_test),
        params_removed=1 - n_final / n_dense,
        filters_removed=_filters(dense) - _filters(final),
        branches_removed=shortcuts,
        flops_removed=1 - f_final / f_dense,
        s_per_epoch=statistics.mean(times),
    )


def compressed(model: nn.Module, data: Data) -> nn.Module:
    """``gp.compress``: the model without its exactly-zero filters and branches."""
    return gp.compress(model, gp.hierarchy.resnet(model), example_inputs=data.x_test[:64])


# ---------------------------------------------------------------- methods


def run_dense(task: str, knob: Knob, seed: int, budget: Budget, *, optimizer: str) -> Row:
    """Dense training for all ``budget.epochs`` epochs (SGD or AdamW, OneCycle)."""
    data, model = load_task(task, seed), new_model(task, seed)
    make = sgd if optimizer == "sgd" else adamw
    opt, sched = make(model, SGD_LR if optimizer == "sgd" else ADAMW_LR, budget.epochs, data)
    times = train(model, data, budget.epochs, opt, sched, seed=seed, desc=f"dense-{optimizer}")
    return measure(f"dense-{optimizer}", knob, seed, model, data, times)


def run_seed(task: str, knob: Knob, seed: int, budget: Budget) -> Row:
    """Group lasso added to the loss, λ Σ_f √|f| ‖f‖₂ + λ_layer Σ_b √|b| ‖b‖₂ over filter groups f
    (conv filter + BatchNorm γ, β, every conv) and residual branches b, λ_layer = 0.2 λ (the
    √size weights are group_prox's GroupLasso default), trained by SGD for the sparse epochs.
    Then filter groups and branches whose norm is below 1e-3 × the largest of their level are
    zeroed, and the rest fine-tuned with the zeros held."""
    assert isinstance(knob, float)
    data, model = load_task(task, seed), new_model(task, seed)
    lam, lam_layer = knob, LAYER_RATIO * knob
    pairs, bls = conv_bn_pairs(model), blocks(model)
    filter_w = [math.sqrt(conv.weight[0].numel() + 2) for conv, _ in pairs]
    branch_w = [math.sqrt(sum(p.numel() for p in _branch_params(b))) for b in bls]

    def penalty() -> Tensor:
        # The tiny epsilon keeps the gradient of ‖·‖ finite at 0.
        filters = sum(
            w * (filter_sq_norms(c, bn) + 1e-16).sqrt().sum() for w, (c, bn) in zip(filter_w, pairs)
        )
        branches = sum(w * (branch_sq_norm(b) + 1e-16).sqrt() for w, b in zip(branch_w, bls))
        return lam * filters + lam_layer * branches

    opt, sched = sgd(model, SGD_LR, budget.sparse, data)
    times = train(model, data, budget.sparse, opt, sched, seed=seed, extra_loss=penalty,
                  desc="seed: sparse")  # fmt: skip
    with torch.no_grad():
        norms = [filter_sq_norms(c, bn).sqrt() for c, bn in pairs]
        branch_norms = torch.stack([branch_sq_norm(b).sqrt() for b in bls])
    every = torch.cat(norms)
    zero_exact, zero_small = (
        float((every == 0).float().mean()),
        float((every < 1e-3).float().mean()),
    )
    mask = FilterMask()
    threshold = SEED_REL_THRESHOLD * every.max()
    for (conv, bn), n in zip(pairs, norms):
        mask.kill(conv, bn, n < threshold)
    for b, n in zip(bls, branch_norms):
        if n < SEED_REL_THRESHOLD * branch_norms.max():
            mask.kill_branch(b)
    times += finetune(model, data, budget, seed, mask)
    row = measure("seed", knob, seed, compressed(model, data), data, times)
    row.zero_exact, row.zero_small = zero_exact, zero_small
    return row


def run_magnitude(task: str, knob: Knob, seed: int, budget: Budget) -> Row:
    """Dense SGD for the sparse epochs, then in every block the fraction ``knob`` of the inner
    filters (``conv1`` with its ``bn1`` γ, β) with the smallest group L2 norm are zeroed (a block
    left without inner filters loses its whole branch), then masked fine-tuning."""
    assert isinstance(knob, float)
    data, model = load_task(task, seed), new_model(task, seed)
    opt, sched = sgd(model, SGD_LR, budget.sparse, data)
    times = train(model, data, budget.sparse, opt, sched, seed=seed, desc="magnitude: dense")
    mask = FilterMask()
    for b in blocks(model):
        with torch.no_grad():
            norms = filter_sq_norms(b.conv1, b.bn1)
        k = round(knob * len(norms))
        if k >= len(norms):
            mask.kill_branch(b)
            continue
        dead = torch.zeros(len(norms), dtype=torch.bool)
        dead[norms.argsort()[:k]] = True
        mask.kill(b.conv1, b.bn1, dead)
    times += finetune(model, data, budget, seed, mask)
    return measure("magnitude", knob, seed, compressed(model, data), data, times)


def run_tp(task: str, knob: Knob, seed: int, budget: Budget) -> Row:
    """Torch-Pruning's GroupNormPruner: SGD for the sparse epochs with its group regulariser
    (``pruner.regularize`` after every backward, ``reg`` = TP_REG), one pruning step at
    ``pruning_ratio = knob`` per layer (GroupMagnitudeImportance, p = 2; the classifier kept),
    then fine-tuning of the pruned model."""
    import torch_pruning as tp

    assert isinstance(knob, float)
    data, model = load_task(task, seed), new_model(task, seed)
    pruner = tp.pruner.GroupNormPruner(
        model,
        example_inputs=data.x[:2],
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=knob,
        ignored_layers=[model.fc],
        reg=TP_REG,
    )
    opt, sched = sgd(model, SGD_LR, budget.sparse, data)
    times = train(model, data, budget.sparse, opt, sched, seed=seed,
                  after_backward=lambda: pruner.regularize(model), desc="tp: sparse")  # fmt: skip
    model.eval()
    pruner.step()
    times += finetune(model, data, budget, seed)
    return measure("tp-groupnorm", knob, seed, model, data, times)


# ---------------------------------------------------------------- ProxSGD / ProxAdam


def _prox_optimizer(
    kind: str, model: nn.Module, lam: float, *, stream: bool = False
) -> tuple[gp.ProxSGD | gp.ProxAdam, float]:
    """ProxSGD with dense-sgd's settings or ProxAdam with dense-adamw's (``"adam-precond"``: with
    ``prox_metric="preconditioner"``), group lasso ``lam`` on filters and ``LAYER_RATIO·lam`` on
    residual branches (and on residual-stream channels with ``stream``), ``ADAM_LAYER_RATIO·lam``
    with ProxAdam (``"adam-branches"``: ``LAYER_RATIO·lam``); and its peak learning rate."""
    ratio = ADAM_LAYER_RATIO if kind in ("adam", "adam-precond") else LAYER_RATIO
    penalties = {"base_level": gp.GroupLasso(lam)}
    if ratio > 0:
        penalties["layer"] = gp.GroupLasso(ratio * lam)
    if stream:
        penalties["stream"] = gp.GroupLasso(LAYER_RATIO * lam)
    hierarchy = gp.hierarchy.resnet(model, stream=stream)
    if kind == "sgd":
        opt = gp.ProxSGD(model.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM,
                         weight_decay=SGD_WD, hierarchy=hierarchy, penalties=penalties)  # fmt: skip
        return opt, SGD_LR
    metric = "preconditioner" if kind == "adam-precond" else "lr"
    opt = gp.ProxAdam(model.parameters(), lr=ADAMW_LR, weight_decay=ADAMW_WD, hierarchy=hierarchy,
                      penalties=penalties, prox_metric=metric)  # fmt: skip
    return opt, ADAMW_LR


def run_prox(task: str, kind: str, knob: Knob, seed: int, budget: Budget) -> Row:
    """The default path: ProxSGD (momentum 0.9) or ProxAdam under one OneCycle schedule over all
    epochs, group lasso on every filter and branch, its λ steered by
    ``gp.SparsityTarget(opt, params=knob, model=model)`` so that ``gp.compress`` removes the
    share ``knob`` of the parameters: warm-up for the first epoch, the target reached at
    ``PROX_REACH`` of the sparse epochs and held, the zero pattern frozen for the last
    ``budget.finetune`` epochs while the survivors recover."""
    assert isinstance(knob, float)
    return _run_steered(task, kind, seed, budget, f"prox-{kind}", knob, params=knob)


def run_prox_stream(task: str, knob: Knob, seed: int, budget: Budget) -> Row:
    """As ``prox-sgd``, with the hierarchy's residual-stream level
    (``gp.hierarchy.resnet(model, stream=True)``), its groups penalised as the branches."""
    assert isinstance(knob, float)
    return _run_steered(task, "sgd", seed, budget, "prox-stream", knob, params=knob, stream=True)


def run_prox_uniform(task: str, knob: Knob, seed: int, budget: Budget) -> Row:
    """As ``prox-sgd``, with level fractions of zero groups (``knob``) and
    ``selection="uniform"``: the penalty acts only on the groups the schedule wants zero, the
    smallest of each conv (per-layer magnitude selection)."""
    assert isinstance(knob, dict)
    return _run_steered(task, "sgd", seed, budget, "prox-uniform", knob, targets=knob,
                        selection="uniform")  # fmt: skip


def _run_steered(
    task: str,
    kind: str,
    seed: int,
    budget: Budget,
    name: str,
    knob: Knob,
    *,
    stream: bool = False,
    **target_kw: Any,
) -> Row:
    data, model = load_task(task, seed), new_model(task, seed)
    opt, lr = _prox_optimizer(kind, model, 1.0, stream=stream)
    sched = _one_cycle(opt, lr, budget.epochs, data)
    steps = data.steps_per_epoch
    if "params" in target_kw:  # what compress removes is measured on the model
        target_kw["model"] = model
    target = gp.SparsityTarget(
        opt,
        warmup_steps=steps,
        reach_step=max(2 * steps, round(PROX_REACH * budget.sparse * steps)),
        freeze_step=budget.sparse * steps,
        **target_kw,
    )
    times = train(model, data, budget.epochs, opt, sched, seed=seed, after_step=target.step,
                  desc=name)  # fmt: skip
    return measure(name, knob, seed, compressed(model, data), data, times)


def run_prox_fixed(task: str, knob: Knob, seed: int, budget: Budget) -> Row:
    """ProxSGD with one fixed λ on every group from the first step, ``gp.prox_lambda(knob,
    momentum=0.9)`` (the seed's in-loss λ ``knob`` translated), for the sparse epochs; then the
    zero pattern is frozen and the survivors train on, unpenalised."""
    assert isinstance(knob, float)
    data, model = load_task(task, seed), new_model(task, seed)
    opt, lr = _prox_optimizer("sgd", model, gp.prox_lambda(knob, momentum=SGD_MOMENTUM))
    sched = _one_cycle(opt, lr, budget.epochs, data)
    freeze_at, taken = budget.sparse * data.steps_per_epoch, 0

    def after_step() -> None:
        nonlocal taken
        taken += 1
        if taken == freeze_at:
            for pen in opt.penalties.values():
                pen.lam = 0.0
            opt.freeze_zero_groups()

    times = train(model, data, budget.epochs, opt, sched, seed=seed, after_step=after_step,
                  desc="prox-fixed")  # fmt: skip
    return measure("prox-fixed", knob, seed, compressed(model, data), data, times)


# ---------------------------------------------------------------- registry

Method = Callable[[str, Knob, int, Budget], Row]

METHODS: dict[str, Method] = {
    "dense-sgd": functools.partial(run_dense, optimizer="sgd"),
    "dense-adamw": functools.partial(run_dense, optimizer="adamw"),
    "seed": run_seed,
    "tp-groupnorm": run_tp,
    "magnitude": run_magnitude,
}


def _prox_method(kind: str) -> Method:
    def method(task: str, knob: Knob, seed: int, budget: Budget) -> Row:
        return run_prox(task, kind, knob, seed, budget)

    return method


METHODS["prox-sgd"] = _prox_method("sgd")
METHODS["prox-adam"] = _prox_method("adam")
METHODS["prox-adam-precond"] = _prox_method("adam-precond")
METHODS["prox-adam-branches"] = _prox_method("adam-branches")
METHODS["prox-fixed"] = run_prox_fixed
METHODS["prox-uniform"] = run_prox_uniform
METHODS["prox-stream"] = run_prox_stream


# ---------------------------------------------------------------- report

TARGETS = (0.5, 0.7, 0.9, 0.95)


@dataclass
class Point:
    """One (method, knob) setting of one task, averaged over seeds."""

    method: str
    knob: str
    rows: list[Row]

    def mean(self, attr: str) -> float:
        return statistics.mean(getattr(r, attr) for r in self.rows)

    def std(self, attr: str) -> float:
        values = [getattr(r, attr) for r in self.rows]
        return statistics.stdev(values) if len(values) > 1 else 0.0


def points(rows: list[Row], task: str) -> list[Point]:
    out: dict[tuple[str, str], Point] = {}
    for r in rows:
        if r.task == task:
            out.setdefault((r.method, r.knob), Point(r.method, r.knob, [])).rows.append(r)
    return list(out.values())


# A setting within this many points of a target counts as reaching it (a target of 50% landing
# on 51.1% because the last filters removed were large ones).
REACH_TOLERANCE = 0.02


def interpolate(pts: list[Point], target: float) -> float:
    """Mean accuracy at ``target`` parameters removed, linearly interpolated between the method's
    settings (the end setting's accuracy within ``REACH_TOLERANCE`` beyond them); NaN further
    out."""
    xs = np.array([p.mean("params_removed") for p in pts])
    ys = np.array([p.mean("accuracy") for p in pts])
    order = np.argsort(xs)
    xs, ys = xs[order], ys[order]
    tol = REACH_TOLERANCE + 1e-9
    if len(xs) == 0 or target < xs[0] - tol or target > xs[-1] + tol:
        return math.nan
    return float(np.interp(target, xs, ys))


def _pct(v: float, digits: int = 1) -> str:
    return "—" if math.isnan(v) else f"{100 * v:.{digits}f}"


def _descriptions() -> dict[tuple[str, ...], str]:
    """What each method does, keyed by the methods a text describes, for the methods paragraph
    of the report (the texts of the methods that ran)."""
    return {
        ("dense-sgd",): f"**dense-sgd** SGD (momentum {SGD_MOMENTUM:g}, weight decay "
        f"{SGD_WD:g}), OneCycle to lr {SGD_LR:g}.",
        (
            "dense-adamw",
        ): f"**dense-adamw** AdamW (weight decay {ADAMW_WD:g}), OneCycle to lr {ADAMW_LR:g} "
        "(the best of a sweep over 2e-3–1e-1 within 0.5 point on both tasks, and stable for "
        "ProxAdam).",
        ("seed",): "**seed** (knob λ): group lasso added to the loss, λ Σ √|f| ‖f‖₂ over filter "
        f"groups (conv filter + BatchNorm γ, β) + {LAYER_RATIO:g} λ Σ √|b| ‖b‖₂ over residual "
        "branches, then groups and branches with norm below 1e-3 × the largest of their level are "
        "zeroed and held at zero; the last column shows how few groups plain SGD brings to "
        "exactly zero. seed, tp-groupnorm and magnitude train with dense-sgd's optimiser for the "
        f"sparse epochs, then fine-tune with SGD under a fresh OneCycle to lr {FINETUNE_SGD_LR:g}.",
        ("tp-groupnorm",): "**tp-groupnorm** (knob: per-layer pruning ratio): Torch-Pruning "
        f"GroupNormPruner (reg {TP_REG:g}, GroupMagnitudeImportance p = 2), one pruning step.",
        ("magnitude",): "**magnitude** (knob: fraction of each block's inner filters zeroed, "
        "smallest L2 norm first; a block losing all of them loses its branch).",
        (
            "prox-sgd",
            "prox-adam",
        ): "**prox-sgd / prox-adam** (knob: the share of the parameters `gp.compress` "
        "removes, `gp.SparsityTarget(opt, params=knob, model=model)`, the default path): ProxSGD "
        "with dense-sgd's settings or ProxAdam with dense-adamw's, group lasso on every filter "
        f"(λ) and, for ProxSGD, residual branch ({LAYER_RATIO:g} λ; ProxAdam: "
        + (f"{ADAM_LAYER_RATIO:g} λ" if ADAM_LAYER_RATIO else "filters only")
        + "), one OneCycle over all epochs; warm-up of one epoch, the target reached at "
        f"{PROX_REACH:g} of the sparse epochs and held, then the zero pattern frozen (`snap`) "
        "for the fine-tuning epochs, in which the same optimiser trains the survivors.",
        ("prox-adam-precond",): "**prox-adam-precond**: as prox-adam with "
        '`prox_metric="preconditioner"` (the prox step per tree lr / mean(√v̂ + ε)).',
        ("prox-adam-branches",): "**prox-adam-branches**: as prox-adam with the branches penalised "
        f"({LAYER_RATIO:g} λ).",
        ("prox-fixed",): "**prox-fixed** (knob: the seed's in-loss λ): ProxSGD with the fixed λ "
        "`gp.prox_lambda(knob, momentum=0.9)` on every group from the first step, the zero "
        "pattern frozen for the fine-tuning epochs.",
        ("prox-uniform",): "**prox-uniform** (knob: fractions of zero filters and zero branches): "
        'as prox-sgd with `selection="uniform"`, which penalises only the smallest groups of '
        "each conv (the selection before loss-aware targets).",
        ("prox-stream",): "**prox-stream**: as prox-sgd, with a level of residual-stream channels "
        "(`gp.hierarchy.resnet(model, stream=True)`) penalised as the branches.",
    }


def write(rows: list[Row], args: argparse.Namespace, seconds: float) -> str:
    budgets = QUICK_BUDGET if args.quick else FULL_BUDGET
    lines = [
        "# Accuracy–compression frontier",
        "",
        f"Machine: {machine()}; {args.jobs} run(s) at a time, one thread each. Seeds: "
        f"{args.seeds} (data split or generation, initialisation and batch order)."
        + (" **Quick mode** (few epochs)." if args.quick else ""),
        "",
        "Every method trains for the same number of epochs from the same initialisation on the "
        "same batches: sparse training, then fine-tuning of the pruned model; dense baselines "
        "train for all epochs. Measured on the final, physically smaller model (for masked models, "
        "after `gp.compress`): accuracy on the test set (%, mean ± std over seeds), parameters "
        "and FLOPs (batch 1) removed relative to the dense model (%), conv filters (output "
        "channels) and residual branches removed, training wall time per epoch.",
        "",
    ]
    for task in args.tasks:
        b = budgets[task]
        pts = points(rows, task)
        if not pts:
            continue
        dense = build_model(task, WIDTHS[task])
        n_params = sum(p.numel() for p in dense.parameters())
        lines += [
            f"## {task}: ResNet-10, widths {WIDTHS[task]}·(1, 2, 4, 8), "
            f"{n_params:,} parameters, {_filters(dense)} filters",
            "",
            f"{b.epochs} epochs in all; sparse methods: {b.sparse} sparse + {b.finetune} "
            f"fine-tuning, batch {BATCH[task]}.",
            "",
            "| method | knob | accuracy (%) | params removed (%) | filters removed | branches "
            "removed | FLOPs removed (%) | s/epoch | seed: groups = 0 / < 1e-3 before threshold (%) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in pts:
            zeros = (
                f"{_pct(p.mean('zero_exact'))} / {_pct(p.mean('zero_small'))}"
                if p.method == "seed"
                else ""
            )
            lines.append(
                f"| {p.method} | {p.knob} | {_pct(p.mean('accuracy'), 2)} ± "
                f"{_pct(p.std('accuracy'), 2)} | {_pct(p.mean('params_removed'))} | "
                f"{p.mean('filters_removed'):.1f} | {p.mean('branches_removed'):.1f} | "
                f"{_pct(p.mean('flops_removed'))} | {p.mean('s_per_epoch'):.2f} | {zeros} |"
            )
        sparse = sorted({p.method for p in pts if not p.method.startswith("dense")},
                        key=list(METHODS).index)  # fmt: skip
        compare = "prox-sgd" in sparse and "seed" in sparse
        dense_txt = ", ".join(
            f"{p.method} {_pct(p.mean('accuracy'), 2)}" for p in pts if p.method.startswith("dense")
        )
        lines += [
            "",
            f"Accuracy (%) at fixed parameters removed, interpolated linearly along each method's "
            f"curve (mean over seeds; a setting within {100 * REACH_TOLERANCE:.0f} points of the "
            f"point counts; — where none does). "
            f"Dense: {dense_txt or '—'}.",
            "",
            "| params removed | "
            + " | ".join(sparse)
            + " | best |"
            + (" prox-sgd − seed |" if compare else ""),
            "|---:|" + "---:|" * len(sparse) + "---|" + ("---:|" if compare else ""),
        ]
        for target in TARGETS:
            accs = {m: interpolate([p for p in pts if p.method == m], target) for m in sparse}
            reached = {m: a for m, a in accs.items() if not math.isnan(a)}
            best = max(reached, key=reached.__getitem__) if reached else "—"
            gap = accs["prox-sgd"] - accs["seed"] if compare else math.nan
            lines.append(
                f"| {100 * target:.0f}% | "
                + " | ".join(_pct(accs[m], 2) for m in sparse)
                + f" | {best} |"
                + (f" {'—' if math.isnan(gap) else f'{100 * gap:+.2f}'} |" if compare else "")
            )
        lines.append("")
    ran = {r.method for r in rows}
    lines += [
        "Methods: "
        + " ".join(text for methods, text in _descriptions().items() if ran.intersection(methods)),
        "",
        f"Produced by `{f'python benchmarks/frontier.py {args.command}'.rstrip()}` in "
        f"{seconds / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], tasks: Sequence[str], path: Path) -> None:
    """Accuracy against parameters removed, one panel per task (error bars: std over seeds).
    The axis starts 10 points below the weakest dense baseline; settings whose mean accuracy is
    lower are drawn as ▼ on the bottom edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        pts = points(rows, task)
        dense = [100 * p.mean("accuracy") for p in pts if p.method.startswith("dense")]
        bottom = (min(dense) if dense else 100.0) - 10.0
        for i, method in enumerate(m for m in METHODS if any(p.method == m for p in pts)):
            mine = sorted((p for p in pts if p.method == method),
                          key=lambda p: p.mean("params_removed"))  # fmt: skip
            color = f"C{i}"
            if method.startswith("dense"):
                ax.axhline(100 * mine[0].mean("accuracy"), ls=":", color=color, label=method)
                continue
            x = [100 * p.mean("params_removed") for p in mine]
            y = [100 * p.mean("accuracy") for p in mine]
            ax.errorbar(x, y, yerr=[100 * p.std("accuracy") for p in mine], marker="o",
                        capsize=3, color=color, label=method)  # fmt: skip
            low = [xi for xi, yi in zip(x, y) if yi < bottom]
            ax.plot(low, [bottom + 0.3] * len(low), "v", color=color, ms=9)
        ax.set_ylim(bottom, 100.5)
        ax.set(xlabel="parameters removed (%)", ylabel="test accuracy (%)",
               title=f"{task} (ResNet-10, width {WIDTHS[task]}; ▼ off-scale)")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- main


ROWS = RESULTS / "frontier_rows.json"


def save_rows(rows: Sequence[Row], path: Path) -> None:
    """Every run's row, as JSON (a list of objects with :class:`Row`'s fields)."""
    path.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=0) + "\n")


def load_rows(path: Path) -> list[Row]:
    """The rows :func:`save_rows` wrote; none when the file does not exist."""
    if not path.exists():
        return []
    return [Row(**fields) for fields in json.loads(path.read_text())]


def _run_job(job: tuple[str, str, Knob, int, Budget]) -> Row:
    torch.set_num_threads(1)
    task, method, knob, seed, budget = job
    return METHODS[method](task, knob, seed, budget)


def run_all(
    tasks: Sequence[str],
    methods: Sequence[str],
    seeds: int,
    budgets: dict[str, Budget],
    jobs: int = 1,
) -> list[Row]:
    """Every (task, method, knob, seed) run, ``jobs`` at a time in worker processes of one thread
    each (a run's result does not depend on the others)."""
    work = [
        (task, method, knob, seed, budgets[task])
        for task in tasks
        for method in methods
        for knob in KNOBS[method][task]
        for seed in range(seeds)
    ]
    bar = tqdm(total=len(work), desc="runs", unit="run")
    if jobs <= 1:
        rows = []
        for job in work:
            bar.set_postfix_str(f"{job[0]} {job[1]} {knob_str(job[2])} seed {job[3]}")
            rows.append(_run_job(job))
            bar.update()
        return rows
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
        futures = [pool.submit(_run_job, job) for job in work]
        for future in futures:
            future.add_done_callback(lambda _: bar.update())
        rows = [f.result() for f in futures]
    bar.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, few epochs")
    parser.add_argument("--seeds", type=int, default=None, help="default: 5, or 1 with --quick")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                        help=f"any of {', '.join(METHODS)}")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs in parallel, one thread each (default 1)")  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--sgd-lr", type=float, default=None,
                        help=f"peak lr of every SGD method (default {SGD_LR:g})")  # fmt: skip
    parser.add_argument("--reuse", action="store_true",
                        help=f"take the rows of methods not rerun from {ROWS.name}")  # fmt: skip
    args = parser.parse_args(argv)
    args.command = " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown or unavailable methods {unknown}; available: {list(METHODS)}")
    if args.seeds is None:
        args.seeds = 1 if args.quick else 5
    if args.sgd_lr is not None:
        globals()["SGD_LR"] = args.sgd_lr  # read by the workers, forked after this
    start = time.perf_counter()
    budgets = QUICK_BUDGET if args.quick else FULL_BUDGET
    rows = run_all(args.tasks, args.methods, args.seeds, budgets, args.jobs)
    if args.reuse:
        rerun = set(args.methods)
        rows += [r for r in load_rows(ROWS) if r.task in args.tasks and r.method not in rerun]
        order = {m: i for i, m in enumerate(METHODS)}
        rows.sort(key=lambda r: order.get(r.method, len(order)))
    text = write(rows, args, time.perf_counter() - start)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "frontier.md").write_text(text)
        save_rows(rows, ROWS)
        plot(rows, args.tasks, RESULTS / "frontier.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
