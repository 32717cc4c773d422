"""The main job: train a ResNet on scikit-learn's digits with ProxSGD, show what survived, and
compress it into a smaller, faster model with the same outputs.

Run it with ``python -m group_prox.demo`` (``--help`` for options). Everything is offline: the
digits ship with scikit-learn.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock, ResNet
from tqdm.auto import tqdm

import group_prox as gp

__all__ = [
    "DemoResult",
    "compress_and_compare",
    "digits_resnet18",
    "load_digits_tensors",
    "main",
    "resnet10",
    "run_demo",
]


def load_digits_tensors(
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits as 3-channel images, split 80/20 (stratified, seeded)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the demo needs scikit-learn: pip install 'group_prox[demo]'") from err
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div_(16.0)
    x = ((x - 0.3) / 0.4).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=0.2, random_state=seed, stratify=digits.target
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def digits_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's resnet18 adapted to 8×8 inputs: a 3×3 stride-1 stem and no max-pooling."""
    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def resnet10(width: int = 64, in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """A torchvision ``ResNet`` with one ``BasicBlock`` per stage and stage widths ``width``·(1, 2,
    4, 8), for small inputs: a 3×3 stride-1 stem, no max-pooling. Its ``forward`` is torchvision's,
    so every group_prox builder and compressor treats it as a torchvision ResNet."""
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    model.inplanes = width
    model.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.maxpool = nn.Identity()
    model.layer1 = model._make_layer(BasicBlock, width, 1)
    model.layer2 = model._make_layer(BasicBlock, 2 * width, 1, stride=2)
    model.layer3 = model._make_layer(BasicBlock, 4 * width, 1, stride=2)
    model.layer4 = model._make_layer(BasicBlock, 8 * width, 1, stride=2)
    model.fc = nn.Linear(8 * width, num_classes)
    init_like_torchvision(model)
    return model


def init_like_torchvision(model: nn.Module) -> None:
    """torchvision's ResNet initialisation: Kaiming-normal convs (fan-out), BatchNorm γ = 1, β = 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@dataclass
class DemoResult:
    accuracy: float
    report: gp.SparsityReport
    model: nn.Module
    hierarchy: gp.Hierarchy
    seconds: float
    x_test: torch.Tensor
    y_test: torch.Tensor


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def run_demo(
    epochs: int = 12,
    lr: float = 0.1,
    lam_filter: float = 5e-3,
    lam_layer: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    targets: dict[str, float] | None = None,
    params: float | None = None,
) -> DemoResult:
    """Train, with group lasso on every filter (``base_level``) and every residual branch
    (``layer``), and return the test accuracy and the sparsity report.

    With ``targets`` (e.g. ``{"base_level": 0.6, "layer": 0.25}``) the λs are not fixed but
    steered by a :class:`~group_prox.SparsityTarget`: one epoch of warm-up, the fractions reached
    at 60% of the epochs and held, the zero pattern frozen for the last 20%. With ``params`` (e.g.
    0.7) the same schedule steers the share of the parameters :func:`~group_prox.compress`
    removes, the filters' λ five times the branches' (``lam_filter``/``lam_layer`` set only that
    ratio then)."""
    if targets is not None and params is not None:
        raise ValueError("run_demo(): give targets or params, not both.")
    steered = targets is not None or params is not None
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_tensors(seed)
    model = digits_resnet18()
    hierarchy = gp.hierarchy.resnet(model)
    opt = gp.ProxSGD(
        model.parameters(),
        lr=lr,
        momentum=0.9,
        weight_decay=0.0,
        hierarchy=hierarchy,
        penalties={
            "base_level": gp.GroupLasso(lam_filter),
            "layer": gp.GroupLasso(lam_layer),
        },
    )
    steps_per_epoch = (len(y_train) + batch_size - 1) // batch_size
    total_steps = epochs * steps_per_epoch
    target = (
        gp.SparsityTarget(
            opt,
            targets,
            params=params,
            model=model if params is not None else None,
            warmup_steps=steps_per_epoch,
            reach_step=max(steps_per_epoch + 1, round(0.6 * total_steps)),
            freeze_step=max(steps_per_epoch + 1, round(0.8 * total_steps)),
        )
        if steered
        else None
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total_steps, pct_start=0.15
    )
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc="training", unit="epoch", disable=not progress)
    for _ in bar:
        model.train()
        perm = torch.randperm(len(y_train))
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            sched.step()
            if target is not None:
                target.step()
        rep = opt.get_sparsity_report()
        bar.set_postfix(
            loss=f"{loss.item():.3f}",
            zero_filters=f"{100 * rep.levels['base_level'].group_fraction:.0f}%",
            zero_branches=rep.levels["layer"].zero_groups,
        )
    seconds = time.perf_counter() - start
    return DemoResult(
        evaluate(model, x_test, y_test),
        opt.get_sparsity_report(model),
        model,
        hierarchy,
        seconds,
        x_test,
        y_test,
    )


def compress_and_compare(result: DemoResult, runs: int = 30) -> list[gp.CompressionReport]:
    """Compress the trained model and compare it with the original at batch 1 and batch 64."""
    small = gp.compress(result.model, result.hierarchy, example_inputs=result.x_test[:64])
    small_accuracy = evaluate(small, result.x_test, result.y_test)
    print(f"compressed: test accuracy {small_accuracy:.4f} (same function, fewer parameters)\n")
    return [
        gp.compression_report(result.model, small, result.x_test[:batch], runs=runs)
        for batch in (1, 64)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m group_prox.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--lam-filter", type=float, default=5e-3, help="group lasso λ per filter")
    parser.add_argument(
        "--lam-layer", type=float, default=1e-3, help="group lasso λ per residual branch"
    )
    parser.add_argument(
        "--target",
        type=float,
        nargs=2,
        metavar=("FILTERS", "BRANCHES"),
        help="ask for these fractions of zero filters and zero branches (gp.SparsityTarget) "
        "instead of fixed λs, e.g. --target 0.6 0.25",
    )
    parser.add_argument(
        "--params",
        type=float,
        metavar="SHARE",
        help="ask for this share of the parameters removed by compress (gp.SparsityTarget) "
        "instead of fixed λs, e.g. --params 0.7",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    targets = (
        {"base_level": args.target[0], "layer": args.target[1]} if args.target is not None else None
    )
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if targets is not None and args.params is not None:
        parser.error("give --target or --params, not both")
    result = run_demo(
        args.epochs,
        args.lr,
        args.lam_filter,
        args.lam_layer,
        seed=args.seed,
        targets=targets,
        params=args.params,
    )
    print(f"\ntest accuracy: {result.accuracy:.4f}   training time: {result.seconds:.0f} s\n")
    print(result.report)
    print()
    for report in compress_and_compare(result):
        print(report, end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
