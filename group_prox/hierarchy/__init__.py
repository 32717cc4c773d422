"""Hierarchies of parameter groups, and builders for common architectures."""

from .auto import auto
from .core import Hierarchy, Member, TensorLayout
from .moe import moe
from .resnet import resnet
from .tags import from_module_tags
from .transformer import transformer

__all__ = [
    "Hierarchy",
    "Member",
    "TensorLayout",
    "auto",
    "from_module_tags",
    "moe",
    "resnet",
    "transformer",
]
