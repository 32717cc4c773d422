"""Hierarchy of a torchvision-style ResNet (BasicBlock and Bottleneck)."""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..families.registry import levels_for
from .core import Hierarchy, Member, check_include_frozen, gc_paused, without_frozen

__all__ = ["conv_bn_pairs", "filter_members", "resnet", "resnet_levels"]

_BLOCKS = (BasicBlock, Bottleneck)


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
    members: list[Member] = [(conv.weight, 0, i)]
    if conv.bias is not None:
        members.append((conv.bias, 0, i))
    if bn is not None and bn.affine:
        members += [(bn.weight, 0, i), (bn.bias, 0, i)]
    return members


@gc_paused()
def resnet(model: nn.Module, *, include_frozen: bool = False) -> Hierarchy:
    """Two-level hierarchy of a ResNet built from torchvision's ``BasicBlock``/``Bottleneck``.

    * ``base_level``: one group per output filter of every ``Conv2d`` in the model (the stem, every
      block conv and every downsample conv): the filter ``conv.weight[i]``, its bias if any, and
      channel ``i`` of the ``BatchNorm2d`` registered right after the conv (``γ_i``, ``β_i``), so a
      zero group gives an exactly zero channel in train and eval mode. Group name:
      ``"<conv name>[i]"``.
    * ``layer``: one group per residual branch, i.e. per ``BasicBlock``/``Bottleneck``: all
      parameters of its ``conv*``/``bn*`` (the branch ``f`` in ``x + f(x)``), not the shortcut
      ``downsample``. Group name: the block's module name, e.g. ``"layer1.0"``. A zero branch leaves
      the block equal to its shortcut.

    The stem and downsample filters belong to no ``layer`` group. Every other parameter (the
    classifier ``fc`` in particular) is in no group and is not penalised.

    Parameters with ``requires_grad=False`` (frozen) are left out: a group all of whose members
    lie in frozen tensors is in no level (a coarser group too, once everything in it is frozen),
    so the hierarchy suits an optimizer over the trainable parameters only. A group with both
    frozen and trainable members is refused.

    Args:
        model: the ResNet.
        include_frozen: keep frozen parameters in their groups instead; then give them to the
            optimizer too, whose prox shrinks them although no gradient step changes them.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``include_frozen`` is not a ``bool``.
        ValueError: if the model contains no ``BasicBlock`` or ``Bottleneck``, or a group is
            partly frozen (a filter with a frozen BatchNorm, a block with one frozen conv): the
            message names the level, the group and the frozen tensors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"resnet(): expected an nn.Module, got {type(model).__name__}.")
    check_include_frozen(include_frozen, "resnet()")
    levels = without_frozen(
        levels_for(model, "resnet", "resnet()"),
        model,
        include_frozen=include_frozen,
        caller="resnet()",
    )
    return Hierarchy(levels, names=model)


def has_blocks(model: nn.Module) -> bool:
    """Whether ``model`` holds a torchvision ``BasicBlock`` or ``Bottleneck``."""
    return any(isinstance(m, _BLOCKS) for m in model.modules())


def resnet_levels(model: nn.Module) -> dict[str, dict[str, list[Member]]]:
    """The levels of :func:`resnet` for the torchvision blocks of ``model``, frozen parameters
    included."""
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
