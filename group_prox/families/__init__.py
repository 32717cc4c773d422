"""Model families, one module each, found through one registry (see
:mod:`group_prox.families.registry`).

Each module holds everything the package knows of one kind of model (how to recognise it, its
hierarchy levels, its compression plan and replacement modules) and registers it at its bottom.
Families are consulted in the order they register, so the import order below matters: the
ResNet, ``torch.nn`` transformer and experts families first, then the others (those of timm and
transformers only act on models of a library already imported).
"""

# isort: off
from . import torchvision_resnet, torch_transformer, experts  # registered first, in this order

# isort: on
from . import (
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
    "experts",
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
    "torch_transformer",
    "torchvision_resnet",
    "torchvision_vit",
]
