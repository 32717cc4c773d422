"""Hierarchies of parameter groups, and the builders that make them.

``resnet``, ``transformer`` and ``moe`` build the levels of the model families found in a model
(each family is one module of :mod:`group_prox.families`); ``auto`` traces any model,
``from_module_tags`` reads tags put on its modules.
"""

from .auto import auto
from .core import GroupTable, Hierarchy, Member, Part, TensorLayout
from .moe import moe
from .resnet import resnet
from .tags import from_module_tags
from .transformer import transformer

__all__ = [
    "GroupTable",
    "Hierarchy",
    "Member",
    "Part",
    "TensorLayout",
    "auto",
    "from_module_tags",
    "moe",
    "resnet",
    "transformer",
]
