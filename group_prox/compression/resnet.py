"""Compression of torchvision ResNets, kept under this name for existing imports.

The family (its levels, its compression plan and :class:`BlockShortcut`) lives in
:mod:`group_prox.families.torchvision_resnet`.
"""

from ..families.torchvision_resnet import BlockShortcut, applies, plan

__all__ = ["BlockShortcut", "applies", "plan"]
