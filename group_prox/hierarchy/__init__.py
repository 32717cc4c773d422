"""Hierarchies of parameter groups, and builders for common architectures."""

from .core import Hierarchy, Member, TensorLayout
from .resnet import resnet

__all__ = ["Hierarchy", "Member", "TensorLayout", "resnet"]
