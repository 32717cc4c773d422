"""The ``resnet`` builder: the hierarchy of the ResNet families of the registry.

What each family knows (its levels, its compression) lives in its own module:
:mod:`group_prox.families.torchvision_resnet` for torchvision's blocks,
:mod:`group_prox.families.timm_resnet` and :mod:`group_prox.families.timm_convnext` for timm's.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from .core import Hierarchy, check_include_frozen, from_families, gc_paused, without_frozen

__all__ = ["resnet"]


@gc_paused()
def resnet(model: nn.Module, *, include_frozen: bool = False, stream: bool = False) -> Hierarchy:
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

    **Residual-stream level** (``stream=True``, torchvision ``ResNet`` only). The stem ``conv1``,
    every downsample conv and every block's last conv (``conv2`` of a ``BasicBlock``, ``conv3`` of
    a ``Bottleneck``) write the residual stream; :func:`~group_prox.compress` removes a stream
    channel only when it is dead in *every* writer of its segment (the stem starts a segment, each
    downsample the next), so a zero writer filter alone is wasted. The level ``stream`` has one
    group per channel ``c`` of each segment that blocks add into: filter ``c`` (with its BatchNorm
    channel) of every writer of the segment, named ``"<stage>.stream[c]"`` (``"layer2.stream[5]"``).
    A zero stream group is a channel compress removes from every writer and reader at once.

    A writer filter of a block's last conv lies in both its branch and its stream channel, while a
    branch holds many stream channels and a stream channel spans many branches: the two cross, and
    no order of the levels makes them a tree, which the :class:`Hierarchy` requires (the level by
    level prox is the exact prox of the sum of the penalties only on a tree, and the optimizer's
    step sizes, targets and reports rely on it). So with ``stream=True`` the last conv and its
    BatchNorm leave ``layer``, whose groups become the branch interior (``conv1``/``bn1``, and
    ``conv2``/``bn2`` of a ``Bottleneck``): ``base_level`` filters nest in ``layer`` or in
    ``stream`` groups, ``layer`` and ``stream`` are disjoint, and the prox stays exact. A zero
    ``layer`` group then makes the branch interior dead (compress shrinks it to one channel) and
    the branch a per-channel constant; the block becomes its shortcut once its last conv's filters
    are zero too (through their ``base_level`` groups). The stem output of a ``Bottleneck`` ResNet,
    which no block adds into, has no stream group (its ``base_level`` groups remove it).

    Parameters with ``requires_grad=False`` (frozen) are left out: a group all of whose members
    lie in frozen tensors is in no level (a coarser group too, once everything in it is frozen),
    so the hierarchy suits an optimizer over the trainable parameters only. A group with both
    frozen and trainable members is refused.

    Args:
        model: the ResNet.
        include_frozen: keep frozen parameters in their groups instead; then give them to the
            optimizer too, whose prox shrinks them although no gradient step changes them.
        stream: add the ``stream`` level (and take the last conv of each branch out of
            ``layer``), see above.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``include_frozen`` or ``stream`` is not
            a ``bool``.
        ValueError: if the model contains no ``BasicBlock`` or ``Bottleneck``, or a group is
            partly frozen (a filter with a frozen BatchNorm, a block with one frozen conv): the
            message names the level, the group and the frozen tensors. With ``stream=True``, also
            if the model is not a torchvision ``ResNet`` running ``ResNet.forward`` with its
            layout (stem ``conv1`` + ``bn1``, downsample ``Sequential(Conv2d, BatchNorm2d)``,
            ``nn.Linear`` classifier), or holds other ResNet blocks (timm's, whose stream
            compress does not remove).
    """
    if not isinstance(stream, (bool, np.bool_)):
        raise TypeError(f"resnet(): stream must be True or False, got {type(stream).__name__}.")
    if not stream:
        return from_families(model, "resnet", include_frozen=include_frozen)
    from ..families.torchvision_resnet import stream_levels  # the families import this package

    caller = "resnet(stream=True)"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: expected an nn.Module, got {type(model).__name__}.")
    include = check_include_frozen(include_frozen, caller)
    levels = without_frozen(
        stream_levels(model, caller), model, include_frozen=include, caller=caller
    )
    return Hierarchy(levels, names=model)
