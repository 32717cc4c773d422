"""Hierarchies of parameter groups, and builders for common architectures."""

from .core import Hierarchy, Member, TensorLayout
from .moe import moe
from .resnet import resnet
from .tags import from_module_tags

__all__ = ["Hierarchy", "Member", "TensorLayout", "from_module_tags", "moe", "resnet"]
