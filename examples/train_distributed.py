"""Structured sparsity under DDP or FSDP2: every rank ends with the same zero filters.

A small residual CNN with GroupNorm is trained on synthetic images (offline, nothing to download)
with ``ProxSGD`` (or ``ProxAdam``) and a group lasso on filters and on residual branches. Each rank
draws its own batches; the gradients are averaged by DDP, or reduce-scattered by FSDP2.

* DDP (default): every rank holds whole parameters and, after the gradient all-reduce, the same
  values; the prox runs on each rank as in a single process.
* ``--fsdp``: the model is sharded with ``fully_shard``; the hierarchy is built afterwards, on the
  sharded parameters. Each prox step all-reduces the vector of atom norms once (a few hundred
  numbers here), so every rank zeroes the same groups.

Launch on one machine with two processes (CPU and gloo; CUDA and NCCL when there are GPUs)::

    torchrun --nproc-per-node=2 examples/train_distributed.py [--fsdp] [--optimizer adam]

Without ``torchrun`` it runs as a single process. The hierarchy comes from
``group_prox.hierarchy.auto``, which needs Torch-Pruning (``pip install "group_prox[auto]"``).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import group_prox as gp

CLASSES, SIZE = 4, 16


class Block(nn.Module):
    """``x + GN(conv(ReLU(GN(conv(x)))))``: a residual branch, one group of the ``layer`` level."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))


class Net(nn.Module):
    """Stem, two residual blocks, pooled linear head. The root holds no parameter of its own, so
    that under FSDP2 every parameter stays sharded after a forward pass (see :func:`shard`)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(4, width))
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(F.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def batch(step: int, rank: int, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Synthetic images: a class-specific colour and texture plus noise, different on every rank
    and step."""
    g = torch.Generator().manual_seed(10_000 * rank + step)
    fixed = torch.Generator().manual_seed(0)
    colours = torch.randn(CLASSES, 3, 1, 1, generator=fixed)
    patterns = colours + 0.5 * torch.randn(CLASSES, 3, SIZE, SIZE, generator=fixed)
    y = torch.randint(0, CLASSES, (size,), generator=g)
    x = patterns[y] + 0.8 * torch.randn(size, 3, SIZE, SIZE, generator=g)
    return x.to(device), y.to(device)


def shard(model: Net, device: torch.device) -> None:
    """FSDP2: one unit per stem, block and head, then the root. ``group_prox.hierarchy.auto`` runs
    a forward pass, after which FSDP2 keeps the *root's* own parameters unsharded; with no
    parameter at the root, the hierarchy sees only sharded ones."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in (model.stem, *model.blocks, model.head):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def zero_pattern_digest(report: gp.SparsityReport) -> str:
    masks = "".join("".join("01"[z] for z in t.zero_mask) for t in report.tensors)
    return hashlib.sha1(masks.encode()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument(
        "--lam", type=float, help="λ of the filter group lasso (default: 0.03 SGD, 0.01 Adam)"
    )
    args = parser.parse_args(argv)

    if "RANK" not in os.environ:  # not under torchrun: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial model on every rank
    model = Net().to(device)
    net: nn.Module = model
    if args.fsdp:
        shard(model, device)
    else:
        net = nn.parallel.DistributedDataParallel(model)

    # Built after fully_shard, on the parameters the optimizer updates (DTensors under FSDP2).
    # base_level: each filter with its GroupNorm channel (and the head's input column);
    # layer: each residual branch.
    hierarchy = gp.hierarchy.auto(model, torch.randn(2, 3, SIZE, SIZE, device=device))
    lam = args.lam if args.lam is not None else {"sgd": 0.03, "adam": 0.01}[args.optimizer]
    penalties = {"base_level": gp.GroupLasso(lam), "layer": gp.GroupLasso(lam / 4)}
    if args.optimizer == "sgd":
        opt: torch.optim.Optimizer = gp.ProxSGD(
            model.parameters(), lr=0.05, momentum=0.9, hierarchy=hierarchy, penalties=penalties
        )
    else:  # the prox step per tree follows Adam's scale: one more all-reduce per step
        opt = gp.ProxAdam(
            model.parameters(),
            lr=3e-3,
            weight_decay=0.0,
            hierarchy=hierarchy,
            penalties=penalties,
            prox_metric="preconditioner",
        )

    for step in range(args.steps):
        x, y = batch(step, rank, args.batch_size, device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                print(f"step {step:3d}  loss {mean_loss.item() / world:.3f}")

    # Under FSDP2 both are collectives: every rank calls them.
    report = opt.get_sparsity_report()  # type: ignore[attr-defined]
    penalty = opt.penalty_value()  # type: ignore[attr-defined]
    digests: list[str | None] = [None] * world
    dist.all_gather_object(digests, zero_pattern_digest(report))
    if rank == 0:
        mode = "FSDP2 (fully_shard)" if args.fsdp else "DDP"
        print(f"\n{mode}, {world} rank(s), {type(opt).__name__}, penalty {penalty:.4f}")
        print(report)
        same = len(set(digests)) == 1
        print(f"\nzero pattern identical on all {world} ranks: {same} ({digests[0]})")
    # Release the graph auto() traced through FSDP2's hooks (reference cycles) while the process
    # group lives, and let no rank tear down while another finishes: either can abort the
    # process at exit under gloo.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
