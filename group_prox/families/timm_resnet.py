"""timm ResNets (``timm.models.resnet``'s ``BasicBlock`` and ``Bottleneck``): levels and compression.

timm's blocks compute ``act(drop_path(se(branch(x))) + shortcut(x))`` with

* ``BasicBlock``: ``branch = bn2 ∘ conv2 ∘ aa ∘ act1 ∘ drop_block ∘ bn1 ∘ conv1``;
* ``Bottleneck``: ``branch = bn3 ∘ conv3 ∘ aa ∘ act2 ∘ drop_block ∘ bn2 ∘ conv2 ∘ act1 ∘ bn1 ∘
  conv1``;

``shortcut`` is ``downsample`` (``Sequential(Conv2d, BatchNorm2d)``, or ``(AvgPool2d, Conv2d,
BatchNorm2d)`` in the ``d`` variants) or the identity, and ``se`` an optional channel gate.

Levels (``builder="resnet"``, as for torchvision's ResNets):

* ``base_level``: one group per output filter of every ``Conv2d`` of the stem (also the deep
  stems' ``Sequential``), of every block branch (``conv1``, ``conv2``, ``conv3``) and of every
  ``downsample``: the filter, its bias if any, and channel ``i`` of the ``BatchNorm2d``
  registered right after the conv. Name ``"<conv name>[i]"``. The 1×1 convs inside ``se`` have
  no group of their own (they are in their block's ``layer`` group).
* ``layer``: one group per block: every parameter of the block but its ``downsample`` (the
  branch, ``se`` included). Name: the block's name, e.g. ``"layer1.0"``.

Compression, exact in ``eval()`` mode:

* a block whose last BatchNorm outputs exactly 0 on every channel (see
  :func:`~group_prox.compression.surgery.dead_channels`) becomes its shortcut,
  ``act(downsample(x))`` or ``act(x)`` (:class:`TimmBlockShortcut`, replacement kind
  ``"timm_resnet_shortcut"``): ``se`` (a multiplicative gate: timm's ``SEModule``,
  ``EffectiveSEModule``, ``EcaModule``, ``CecaModule``) and ``drop_path`` keep a zero branch zero;
* a dead channel between two branch convs (``conv1 → conv2``, and ``conv2 → conv3`` in a
  ``Bottleneck``) is removed from the conv, its BatchNorm and the next conv's inputs, under the
  original module names. What lies between must act channel by channel and keep 0 at 0: an
  activation with ``act(0) = 0``, ``aa`` and ``drop_block`` the identity or a pooling /
  ``DropBlock2d``; grouped convs (ResNeXt) keep their channels.

Left alone (documented, not removed): channels of the residual stream (the stem, downsample and
last branch convs write a stream every block of a stage adds into), blocks or layouts other than
the above (with a warning), modules shared between several names, and subclasses overriding
``forward``.
"""

from __future__ import annotations

import itertools
import sys
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..compression.plan import Op, ReplaceOp, SliceOp, register_replacement
from ..compression.surgery import dead_channels, kept_indices
from ..hierarchy.core import Member
from .registry import Family, register_family
from .torchvision_resnet import conv_bn_pairs, filter_members

__all__ = ["TIMM_RESNET", "TimmBlockShortcut", "applies", "levels", "plan"]

# Channel gates of timm.layers computing ``x * gate(x)``: a zero input stays exactly zero.
_GATES = {"SEModule", "EffectiveSEModule", "EcaModule", "CecaModule"}
# Channel-agnostic modules allowed between two branch convs (besides nn.Identity).
_PASS_THROUGH = (nn.Identity, nn.AvgPool2d, nn.MaxPool2d, nn.Dropout)
_PASS_THROUGH_NAMES = {"DropBlock2d"}


def _block_classes() -> tuple[type, ...]:
    mod = sys.modules.get("timm.models.resnet")
    return () if mod is None else (mod.BasicBlock, mod.Bottleneck)


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = _block_classes()
    return [(n, m) for n, m in model.named_modules() if kinds and isinstance(m, kinds)]


def _is_bottleneck(block: nn.Module) -> bool:
    return type(block).__name__ == "Bottleneck" or hasattr(block, "conv3")


def _branch(block: nn.Module) -> list[tuple[str, str]]:
    """(conv, norm) attribute names of the branch, in order."""
    n = 3 if _is_bottleneck(block) else 2
    return [(f"conv{i}", f"bn{i}") for i in range(1, n + 1)]


def _out_act_name(block: nn.Module) -> str:
    return "act3" if _is_bottleneck(block) else "act2"


def applies(model: nn.Module) -> bool:
    """Whether ``model`` holds a timm ``BasicBlock``/``Bottleneck`` (or a block compress made a
    shortcut of)."""
    return bool(_blocks(model)) or any(isinstance(m, TimmBlockShortcut) for m in model.modules())


def levels(model: nn.Module) -> dict[str, dict[str, list[Member]]]:
    """The ``base_level`` (filters) and ``layer`` (block branches) groups, frozen parameters
    included."""
    blocks = _blocks(model)
    allowed: set[str] = set()
    under: list[str] = []
    for name, block in blocks:
        prefix = f"{name}." if name else ""
        under.append(prefix)
        allowed.update(prefix + conv for conv, _ in _branch(block))
    base: dict[str, list[Member]] = {}
    for name, conv, bn in conv_bn_pairs(model):
        inside = [p for p in under if name.startswith(p)]
        if inside:
            prefix = max(inside, key=len)
            if name not in allowed and not name.startswith(prefix + "downsample."):
                continue
        for i in range(conv.out_channels):
            base[f"{name}[{i}]"] = filter_members(conv, bn, i)
    layer: dict[str, list[Member]] = {}
    for name, block in blocks:
        layer[name] = [
            p
            for child_name, child in block.named_children()
            if child_name != "downsample"
            for p in child.parameters()
        ]
    return {"base_level": base, "layer": layer}


class TimmBlockShortcut(nn.Module):
    """A timm residual block whose branch is exactly 0: ``act(downsample(x))`` or ``act(x)``.

    ``downsample`` and the block's output activation keep their names (``downsample``, and
    ``act2`` or ``act3``), so their state_dict keys do not change.
    """

    def __init__(self, downsample: nn.Module | None, act: nn.Module, act_name: str) -> None:
        super().__init__()
        self.downsample = downsample
        self.act_name = act_name
        self.add_module(act_name, act)

    def forward(self, x: Tensor) -> Tensor:
        act = getattr(self, self.act_name)
        if self.downsample is not None:
            x = self.downsample(x)
        elif getattr(act, "inplace", False):
            x = x.clone()  # the block's output was a new tensor; never edit the caller's input
        return act(x)


@register_replacement("timm_resnet_shortcut")
def _shortcut(block: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    kinds = _block_classes()
    if not (kinds and isinstance(block, kinds)):
        raise TypeError(
            f"timm_resnet_shortcut replaces a timm BasicBlock/Bottleneck, not a "
            f"{type(block).__name__}."
        )
    act_name = _out_act_name(block)
    return TimmBlockShortcut(block.downsample, getattr(block, act_name), act_name)


def _plain_bn(bn: object) -> bool:
    return isinstance(bn, nn.BatchNorm2d) and type(bn).forward is nn.BatchNorm2d.forward


def _keeps_zero(act: nn.Module, channels: int) -> bool:
    """Whether the (parameter-free or per-channel) activation maps 0 to exactly 0."""
    if isinstance(act, _PASS_THROUGH):
        return True
    try:
        with torch.no_grad():
            ref = next(iter(act.parameters()), None)
            kw = {} if ref is None else {"dtype": ref.dtype, "device": ref.device}
            out = act(torch.zeros(1, channels, 1, 1, **kw))
    except Exception:  # an activation that cannot take a 4-d tensor is not understood
        return False
    return isinstance(out, Tensor) and out.shape == (1, channels, 1, 1) and not bool(out.any())


def _channel_wise(module: nn.Module | None) -> bool:
    return (
        module is None
        or isinstance(module, _PASS_THROUGH)
        or type(module).__name__ in _PASS_THROUGH_NAMES
    )


def _between(block: nn.Module, i: int) -> list[tuple[str, nn.Module | None]]:
    """The modules applied between branch conv ``i`` (1-based) and conv ``i + 1``."""
    if _is_bottleneck(block):
        names = ["act1"] if i == 1 else ["drop_block", "act2", "aa"]
    else:
        names = ["drop_block", "act1", "aa"]
    return [(n, getattr(block, n, None)) for n in names]


def _gate_ok(block: nn.Module) -> bool:
    se = getattr(block, "se", None)
    return se is None or (
        type(se).__name__ in _GATES and type(se).__module__.startswith("timm.layers")
    )


def _shared(model: nn.Module) -> set[int]:
    modules = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    params = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    shared = {k for k, c in modules.items() if c > 1}
    for m in model.modules():
        if any(params[id(p)] > 1 for p in m.parameters(recurse=False)):
            shared.add(id(m))
    return shared


def plan(model: nn.Module, multiple: int = 1) -> list[Op]:
    """Operations removing the dead branches of timm ResNet blocks and the dead channels inside
    the others (see the module docstring). Widths are rounded up to a multiple of ``multiple``."""
    ops: list[Op] = []
    shared = _shared(model)
    for name, block in _blocks(model):
        kind = next(k for k in _block_classes() if isinstance(block, k))
        label = name or "the model"
        if type(block).forward is not kind.forward:
            warnings.warn(
                f"compress(): timm block {label} overrides forward; it is left as it is.",
                stacklevel=3,
            )
            continue
        if any(id(m) in shared for m in block.modules()):
            continue
        layers = [(c, b, getattr(block, c), getattr(block, b)) for c, b in _branch(block)]
        if not all(isinstance(conv, nn.Conv2d) and _plain_bn(bn) for _, _, conv, bn in layers):
            warnings.warn(
                f"compress(): timm block {label} has branch layers other than Conv2d + "
                "BatchNorm2d; it is left as it is.",
                stacklevel=3,
            )
            continue
        prefix = f"{name}." if name else ""
        _, _, last_conv, last_bn = layers[-1]
        if name and bool(dead_channels(last_conv, last_bn).all()):
            if _gate_ok(block):
                ops.append(ReplaceOp(name, "timm_resnet_shortcut"))
                continue
            warnings.warn(
                f"compress(): the branch of timm block {label} is zero but its se module "
                f"({type(block.se).__name__}) is not a known gate; the block is kept.",
                stacklevel=3,
            )
        for i, ((cname, bname, conv, bn), (nname, _, nxt, _)) in enumerate(
            itertools.pairwise(layers), start=1
        ):
            keep = kept_indices(dead_channels(conv, bn), multiple)
            if len(keep) == conv.out_channels:
                continue
            if conv.groups != 1 or nxt.groups != 1:
                continue  # grouped convs (ResNeXt) keep their channels
            between = _between(block, i)
            odd = [
                n
                for n, m in between
                if not (
                    _channel_wise(m) or (n.startswith("act") and _keeps_zero(m, conv.out_channels))
                )
            ]
            if odd:
                warnings.warn(
                    f"compress(): in timm block {label}, {', '.join(odd)} between {cname} and "
                    f"{nname} is not known to act channel by channel with f(0) = 0; its dead "
                    "channels are kept.",
                    stacklevel=3,
                )
                continue
            keep_t = tuple(keep)
            ops += [
                SliceOp(prefix + cname, "out", keep_t),
                SliceOp(prefix + bname, "out", keep_t),
                SliceOp(prefix + nname, "in", keep_t),
            ]
    return ops


TIMM_RESNET = register_family(
    Family(
        name="timm-resnet",
        builder="resnet",
        description="timm ResNet blocks (timm.models.resnet BasicBlock, Bottleneck)",
        applies=applies,
        levels=lambda model: levels(model) if _blocks(model) else {},
        plan=plan,
    )
)
