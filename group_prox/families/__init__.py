"""Model families, found through one registry (see :mod:`group_prox.families.registry`)."""

from . import builtin, hf_decoder
from .registry import LEVEL_ORDER, Family, applicable, families, register_family

__all__ = [
    "LEVEL_ORDER",
    "Family",
    "applicable",
    "builtin",
    "families",
    "hf_decoder",
    "register_family",
]
