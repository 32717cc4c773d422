"""Model families, found through one registry (see :mod:`group_prox.families.registry`)."""

from . import builtin, timm_convnext, timm_resnet, timm_vit, torchvision_vit
from .registry import LEVEL_ORDER, Family, applicable, families, register_family

__all__ = [
    "LEVEL_ORDER",
    "Family",
    "applicable",
    "builtin",
    "families",
    "register_family",
    "timm_convnext",
    "timm_resnet",
    "timm_vit",
    "torchvision_vit",
]
