"""torchvision ResNets (``BasicBlock`` and ``Bottleneck``): levels and compression.

Levels (``builder="resnet"``, see :func:`group_prox.hierarchy.resnet`):

* ``base_level``: one group per output filter of every ``Conv2d`` of the model (the stem, every
  block conv and every downsample conv): the filter, its bias if any, and channel ``i`` of the
  ``BatchNorm2d`` registered right after the conv. Name ``"<conv name>[i]"``.
* ``layer``: one group per residual branch, i.e. per ``BasicBlock``/``Bottleneck``: all
  parameters of its ``conv*``/``bn*``, not the shortcut ``downsample``. Name: the block's name,
  e.g. ``"layer1.0"``.

Compression: three kinds of removal, each exact in ``eval()`` mode:

* a residual block whose branch output is exactly 0 (every channel of its last BatchNorm is dead)
  is replaced by its shortcut, ``relu(x)`` or ``relu(downsample(x))`` (:class:`BlockShortcut`,
  replacement kind ``"resnet_shortcut"``);
* a dead channel inside a branch (output of ``conv1``, and of ``conv2`` in a ``Bottleneck``) is
  removed from its conv and BatchNorm and from the next conv's inputs;
* a channel of the residual stream (the tensor the blocks of one stage add into) is removed when
  it is dead in *every* layer that writes it (the stem or the stage's downsample, and every
  remaining branch), from all those writers and from every reader: the next blocks' ``conv1`` and
  ``downsample``, and the classifier. A channel that is dead in some writers only stays.

A channel is dead when its conv + BatchNorm output is exactly 0 whatever the input (see
:func:`~group_prox.compression.surgery.dead_channels`); ``relu(0) = 0`` keeps it so.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ..compression.plan import Op, ReplaceOp, SliceOp, register_replacement
from ..compression.surgery import dead_channels, kept_indices
from ..hierarchy.core import Member
from .registry import Family, register_family

__all__ = [
    "TORCHVISION_RESNET",
    "BlockShortcut",
    "applies",
    "conv_bn_pairs",
    "filter_members",
    "levels",
    "plan",
]

_BLOCKS = (BasicBlock, Bottleneck)


# --------------------------------------------------------------------------------------------
# Detection and levels


def applies(model: nn.Module) -> bool:
    """Whether ``model`` holds a torchvision ``BasicBlock`` or ``Bottleneck``."""
    return any(isinstance(m, _BLOCKS) for m in model.modules())


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]]:
    """Each Conv2d with the BatchNorm2d registered right after it (its normalisation), in order."""
    pairs = []
    modules = [m for _, m in model.named_modules()]
    names = [n for n, _ in model.named_modules()]
    for i, m in enumerate(modules):
        if isinstance(m, nn.Conv2d):
            nxt = modules[i + 1] if i + 1 < len(modules) else None
            bn = (
                nxt
                if isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == m.out_channels
                else None
            )
            pairs.append((names[i], m, bn))
    return pairs


def filter_members(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, i: int) -> list[Member]:
    """Filter ``i`` of ``conv``: its weight slice, its bias if any, and channel ``i`` of ``bn``."""
    members: list[Member] = [(conv.weight, 0, i)]
    if conv.bias is not None:
        members.append((conv.bias, 0, i))
    if bn is not None and bn.affine:
        members += [(bn.weight, 0, i), (bn.bias, 0, i)]
    return members


def levels(model: nn.Module) -> dict[str, dict[str, list[Member]]]:
    """The levels of :func:`group_prox.hierarchy.resnet` for the torchvision blocks of ``model``,
    frozen parameters included."""
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, _BLOCKS)]
    base: dict[str, list[Member]] = {}
    for name, conv, bn in conv_bn_pairs(model):
        for i in range(conv.out_channels):
            base[f"{name}[{i}]"] = filter_members(conv, bn, i)

    layer: dict[str, list[Member]] = {}
    for name, block in blocks:
        members: list[Member] = []
        for child_name, child in block.named_children():
            if child_name == "downsample":
                continue
            members.extend(child.parameters(recurse=True))
        layer[name] = members
    return {"base_level": base, "layer": layer}


# --------------------------------------------------------------------------------------------
# Compression


class BlockShortcut(nn.Module):
    """A residual block whose branch is exactly 0: ``relu(x)``, or ``relu(downsample(x))``."""

    def __init__(self, downsample: nn.Module | None) -> None:
        super().__init__()
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x if self.downsample is None else self.downsample(x))


@register_replacement("resnet_shortcut")
def _shortcut(block: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    if not isinstance(block, _BLOCKS):
        raise TypeError(f"resnet_shortcut replaces a BasicBlock/Bottleneck, not a {type(block)}.")
    return BlockShortcut(block.downsample)


def _branch_layers(block: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d]]:
    n = 3 if isinstance(block, Bottleneck) else 2
    return [
        (f"conv{i}", getattr(block, f"conv{i}"), getattr(block, f"bn{i}")) for i in range(1, n + 1)
    ]


def _downsample_pair(block: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d] | None:
    ds = block.downsample
    if ds is None:
        return None
    if (
        isinstance(ds, nn.Sequential)
        and len(ds) == 2
        and isinstance(ds[0], nn.Conv2d)
        and isinstance(ds[1], nn.BatchNorm2d)
    ):
        return ds[0], ds[1]
    raise _Unsupported("a downsample other than Sequential(Conv2d, BatchNorm2d)")


class _Unsupported(Exception):
    pass


def _is_torchvision_resnet(model: nn.Module) -> bool:
    """The stream layout this module knows: stem ``conv1``/``bn1``, stages ``layer1..4`` of blocks,
    ``avgpool`` then ``fc``, as torchvision's ``ResNet.forward`` runs them."""
    return isinstance(model, ResNet) and type(model).forward is ResNet.forward


def plan(model: nn.Module, *, multiple: int = 1) -> list[Op]:
    """Operations removing every dead branch and channel of the ResNet blocks in ``model``.

    Residual-stream channels are only removed in a torchvision ``ResNet`` (whose forward fixes who
    reads the stream); in other models containing ``BasicBlock``/``Bottleneck`` only branches and
    the channels inside them are. Widths are rounded up to a multiple of ``multiple`` by keeping
    some dead channels.
    """
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, _BLOCKS)]
    ops: list[Op] = []
    dead_branch: set[str] = set()
    for name, block in blocks:
        layers = _branch_layers(block)
        last_conv, last_bn = layers[-1][1], layers[-1][2]
        if bool(dead_channels(last_conv, last_bn).all()):
            dead_branch.add(name)
            ops.append(ReplaceOp(name, "resnet_shortcut"))
            continue
        # Inside the branch: output of conv_i feeds conv_{i+1} only.
        for (cname, conv, bn), (nname, _, _) in itertools.pairwise(layers):
            keep = kept_indices(dead_channels(conv, bn), multiple)
            if len(keep) < conv.out_channels:
                ops += [
                    SliceOp(f"{name}.{cname}", "out", tuple(keep)),
                    SliceOp(f"{name}.bn{cname[-1]}", "out", tuple(keep)),
                    SliceOp(f"{name}.{nname}", "in", tuple(keep)),
                ]
    if _is_torchvision_resnet(model):
        with contextlib.suppress(_Unsupported):
            ops += _stream_ops(model, blocks, dead_branch, multiple)
    return ops


def _stream_ops(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    dead_branch: set[str],
    multiple: int,
) -> list[Op]:
    """Residual-stream segments: the stem starts one, every downsample starts the next. Each
    segment has writers (conv + BatchNorm) and readers (the convs and the linear reading it)."""
    if not (isinstance(model.conv1, nn.Conv2d) and isinstance(model.bn1, nn.BatchNorm2d)):
        raise _Unsupported("a stem other than conv1 + bn1")
    if not isinstance(model.fc, nn.Linear):
        raise _Unsupported("a classifier other than nn.Linear")
    # Each writer: (conv name, bn name, conv, bn).
    writers: list[list[tuple[str, str, nn.Module, nn.Module]]] = [
        [("conv1", "bn1", model.conv1, model.bn1)]
    ]
    readers: list[list[str]] = [[]]
    for name, block in blocks:
        if name not in dead_branch:
            readers[-1].append(f"{name}.conv1")
        pair = _downsample_pair(block)
        if pair is not None:
            readers[-1].append(f"{name}.downsample.0")
            writers.append([(f"{name}.downsample.0", f"{name}.downsample.1", *pair)])
            readers.append([])
        elif block.conv1.in_channels != _branch_layers(block)[-1][1].out_channels:
            raise _Unsupported("a block changing width without downsample")
        if name not in dead_branch:
            cname, conv, bn = _branch_layers(block)[-1]
            writers[-1].append((f"{name}.{cname}", f"{name}.bn{cname[-1]}", conv, bn))
    readers[-1].append("fc")

    ops: list[Op] = []
    for seg_writers, seg_readers in zip(writers, readers):
        dead = torch.stack([dead_channels(conv, bn) for _, _, conv, bn in seg_writers]).all(0)
        keep = tuple(kept_indices(dead, multiple))
        if len(keep) == dead.numel():
            continue
        for conv_name, bn_name, _, _ in seg_writers:
            ops += [SliceOp(conv_name, "out", keep), SliceOp(bn_name, "out", keep)]
        ops += [SliceOp(r, "in", keep) for r in seg_readers]
    return ops


TORCHVISION_RESNET = register_family(
    Family(
        name="torchvision-resnet",
        builder="resnet",
        description="torchvision ResNet blocks (BasicBlock, Bottleneck)",
        applies=applies,
        levels=levels,
        plan=lambda model, multiple: plan(model, multiple=multiple),
    )
)
