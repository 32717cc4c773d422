"""torchvision ResNets (``BasicBlock`` and ``Bottleneck``): levels and compression.

Levels (``builder="resnet"``, see :func:`group_prox.hierarchy.resnet`):

* ``base_level``: one group per output filter of every ``Conv2d`` of the model (the stem, every
  block conv and every downsample conv): the filter, its bias if any, and channel ``i`` of the
  ``BatchNorm2d`` registered right after the conv. Name ``"<conv name>[i]"``.
* ``layer``: one group per residual branch, i.e. per ``BasicBlock``/``Bottleneck``: all
  parameters of its ``conv*``/``bn*``, not the shortcut ``downsample``. Name: the block's name,
  e.g. ``"layer1.0"``.

With ``stream=True`` (:func:`stream_levels`, torchvision ``ResNet`` only) a third level,
``stream``, holds one group per channel of each residual stream (all the filters writing that
channel), and ``layer`` holds the branch without its last conv and BatchNorm (which are writers);
see :func:`group_prox.hierarchy.resnet` for why.

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
from typing import Any, NamedTuple

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
    "stream_levels",
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
    return {"base_level": _base_level(model), "layer": _layer_level(model, whole=True)}


def _base_level(model: nn.Module) -> dict[str, list[Member]]:
    base: dict[str, list[Member]] = {}
    for name, conv, bn in conv_bn_pairs(model):
        for i in range(conv.out_channels):
            base[f"{name}[{i}]"] = filter_members(conv, bn, i)
    return base


def _layer_level(model: nn.Module, *, whole: bool) -> dict[str, list[Member]]:
    """Every branch (not ``downsample``); without its last conv and BatchNorm unless ``whole``."""
    layer: dict[str, list[Member]] = {}
    for name, block in model.named_modules():
        if not isinstance(block, _BLOCKS):
            continue
        skip = {"downsample"}
        if not whole:
            cname = _branch_layers(block)[-1][0]
            skip |= {cname, f"bn{cname[-1]}"}
        members: list[Member] = []
        for child_name, child in block.named_children():
            if child_name not in skip:
                members.extend(child.parameters(recurse=True))
        if members:
            layer[name] = members
    return layer


def stream_levels(model: nn.Module, caller: str) -> dict[str, dict[str, list[Member]]]:
    """The levels of ``resnet(model, stream=True)``, frozen parameters included: ``base_level``,
    ``layer`` (each branch without its last conv and BatchNorm) and ``stream`` (one group per
    channel of each residual stream that blocks add into, named ``"<stage>.stream[c]"``).

    Raises:
        ValueError: if ``model`` is not a torchvision ``ResNet`` running ``ResNet.forward`` (the
            only model whose stream :func:`plan` removes), or has a layout it does not know.
    """
    from .registry import applicable, no_family_message

    others = [f.description for f in applicable(model, "resnet") if f is not TORCHVISION_RESNET]
    if others:
        raise ValueError(
            f"{caller}: the model holds {'; '.join(others)}, whose residual-stream channels "
            "compress() does not remove, so zeros of a stream level would stay in the model. The "
            "stream level is only built for torchvision ResNets (torchvision.models.ResNet); use "
            "stream=False for this model."
        )
    if not applies(model):
        raise ValueError(no_family_message(caller, model, "resnet"))
    if not _is_torchvision_resnet(model):
        kind = type(model).__name__
        why = (
            "overrides ResNet.forward"
            if isinstance(model, ResNet)
            else "is not a torchvision.models.ResNet"
        )
        raise ValueError(
            f"{caller}: the model ({kind}) {why}, so who writes and reads its residual stream is "
            "unknown and compress() removes only the branches and the channels inside them. Build "
            "the network as a torchvision.models.ResNet (a subclass that keeps ResNet.forward), "
            "or use stream=False."
        )
    try:
        segments = _segments(model)
    except _Unsupported as e:
        raise ValueError(
            f"{caller}: the ResNet has {e}, whose stream compress() does not remove; use "
            "stream=False, or torchvision's layout (stem conv1 + bn1, downsample "
            "Sequential(Conv2d, BatchNorm2d), classifier nn.Linear)."
        ) from None
    stream: dict[str, list[Member]] = {}
    added = [seg for seg in segments if any(w.block is not None for w in seg.writers)]
    for label, seg in zip(_segment_names(added), added):
        for w in seg.writers:
            if not isinstance(w.bn, nn.BatchNorm2d):
                raise ValueError(
                    f"{caller}: {w.bn_name} is a {type(w.bn).__name__}; the stream level needs "
                    "BatchNorm2d after every conv writing the stream. Use stream=False."
                )
        for c in range(seg.writers[0].conv.out_channels):
            stream[f"{label}.stream[{c}]"] = [
                m for w in seg.writers for m in filter_members(w.conv, w.bn, c)
            ]
    return {
        "base_level": _base_level(model),
        "layer": _layer_level(model, whole=False),
        "stream": stream,
    }


def _segment_names(segments: list[_Segment]) -> list[str]:
    """Each segment's stage (``"layer2"``) when every segment lies in one stage of its own, else
    the first block adding into it (``"layer2.0"``)."""
    stages = [{w.block.split(".")[0] for w in seg.writers if w.block} for seg in segments]
    names = [next(iter(s)) for s in stages if len(s) == 1]
    if len(names) == len(segments) and len(set(names)) == len(names):
        return names
    return [next(w.block for w in seg.writers if w.block) for seg in segments]


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
            ops += _stream_ops(model, dead_branch, multiple)
    return ops


class _Writer(NamedTuple):
    block: str | None  # the block whose branch writes; None for the stem and a downsample
    conv_name: str
    bn_name: str
    conv: nn.Module
    bn: nn.Module


class _Segment(NamedTuple):
    """A residual-stream segment: the layers writing it and those reading it, each reader with the
    block whose branch reads it (``None`` for a downsample and the classifier)."""

    writers: list[_Writer]
    readers: list[tuple[str | None, str]]


def _segments(model: nn.Module) -> list[_Segment]:
    """The residual-stream segments of a torchvision ``ResNet``: the stem starts one, every
    downsample (also one a :class:`BlockShortcut` kept) starts the next. Each segment has writers
    (conv + BatchNorm) and readers (the convs and the linear reading it)."""
    if not (isinstance(model.conv1, nn.Conv2d) and isinstance(model.bn1, nn.BatchNorm2d)):
        raise _Unsupported("a stem other than conv1 + bn1")
    if not isinstance(model.fc, nn.Linear):
        raise _Unsupported("a classifier other than nn.Linear")
    segments = [_Segment([_Writer(None, "conv1", "bn1", model.conv1, model.bn1)], [])]
    for name, block in model.named_modules():
        if not isinstance(block, (*_BLOCKS, BlockShortcut)):
            continue
        branch = None if isinstance(block, BlockShortcut) else _branch_layers(block)
        if branch is not None:
            segments[-1].readers.append((name, f"{name}.conv1"))
        pair = _downsample_pair(block)
        if pair is not None:
            segments[-1].readers.append((None, f"{name}.downsample.0"))
            writer = _Writer(None, f"{name}.downsample.0", f"{name}.downsample.1", *pair)
            segments.append(_Segment([writer], []))
        elif branch is not None and block.conv1.in_channels != branch[-1][1].out_channels:
            raise _Unsupported("a block changing width without downsample")
        if branch is not None:
            cname, conv, bn = branch[-1]
            segments[-1].writers.append(
                _Writer(name, f"{name}.{cname}", f"{name}.bn{cname[-1]}", conv, bn)
            )
    segments[-1].readers.append((None, "fc"))
    return segments


def _stream_ops(model: nn.Module, dead_branch: set[str], multiple: int) -> list[Op]:
    """Remove the stream channels dead in every writer of their segment (a dead branch, replaced
    by its shortcut, neither writes nor reads)."""
    ops: list[Op] = []
    for seg in _segments(model):
        writers = [w for w in seg.writers if w.block not in dead_branch]
        readers = [r for block, r in seg.readers if block not in dead_branch]
        dead = torch.stack([dead_channels(w.conv, w.bn) for w in writers]).all(0)
        keep = tuple(kept_indices(dead, multiple))
        if len(keep) == dead.numel():
            continue
        for w in writers:
            ops += [SliceOp(w.conv_name, "out", keep), SliceOp(w.bn_name, "out", keep)]
        ops += [SliceOp(r, "in", keep) for r in readers]
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
