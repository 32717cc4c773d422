"""Model families, found through one registry (see :mod:`group_prox.families.registry`)."""

from . import builtin, hf_encoder, hf_gpt2, hf_moe
from .registry import LEVEL_ORDER, Family, applicable, families, register_family

__all__ = [
    "LEVEL_ORDER",
    "Family",
    "applicable",
    "builtin",
    "families",
    "hf_encoder",
    "hf_gpt2",
    "hf_moe",
    "register_family",
]
