"""The ``resnet`` builder: the hierarchy of the ResNet families of the registry.

What each family knows (its levels, its compression) lives in its own module:
:mod:`group_prox.families.torchvision_resnet` for torchvision's blocks,
:mod:`group_prox.families.timm_resnet` and :mod:`group_prox.families.timm_convnext` for timm's.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..families.registry import levels_for
from .core import Hierarchy, check_include_frozen, gc_paused, without_frozen

__all__ = ["resnet"]


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


# Names this module held before the torchvision family got a module of its own.
_MOVED = {
    "conv_bn_pairs": "conv_bn_pairs",
    "filter_members": "filter_members",
    "has_blocks": "applies",
    "resnet_levels": "levels",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from ..families import torchvision_resnet

        return getattr(torchvision_resnet, _MOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
