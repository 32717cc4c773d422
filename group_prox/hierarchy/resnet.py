"""The ``resnet`` builder: the hierarchy of the ResNet families of the registry.

What each family knows (its levels, its compression) lives in its own module:
:mod:`group_prox.families.torchvision_resnet` for torchvision's blocks,
:mod:`group_prox.families.timm_resnet` and :mod:`group_prox.families.timm_convnext` for timm's.
"""

from __future__ import annotations

from torch import nn

from .core import Hierarchy, from_families, gc_paused

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
    return from_families(model, "resnet", include_frozen=include_frozen)
