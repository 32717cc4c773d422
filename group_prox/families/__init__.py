"""Model families, found through one registry (see :mod:`group_prox.families.registry`)."""

from . import (
    builtin,
    hf_decoder,
    hf_encoder,
    hf_gpt2,
    hf_moe,
    hf_seq2seq,
    timm_convnext,
    timm_resnet,
    timm_vit,
    torchvision_vit,
)
from .registry import LEVEL_ORDER, Family, applicable, families, register_family

__all__ = [
    "LEVEL_ORDER",
    "Family",
    "applicable",
    "builtin",
    "families",
    "hf_decoder",
    "hf_encoder",
    "hf_gpt2",
    "hf_moe",
    "hf_seq2seq",
    "register_family",
    "timm_convnext",
    "timm_resnet",
    "timm_vit",
    "torchvision_vit",
]
