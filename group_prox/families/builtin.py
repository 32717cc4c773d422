"""The families the package ships with, registered in the order ``compress`` consults them."""

from __future__ import annotations

from ..compression import moe as moe_compression
from ..compression import resnet as resnet_compression
from ..compression import transformer as transformer_compression
from ..hierarchy.moe import has_experts, moe_levels
from ..hierarchy.resnet import has_blocks, resnet_levels
from ..hierarchy.transformer import has_torch_transformer, torch_transformer_levels
from .registry import Family, register_family

TORCHVISION_RESNET = register_family(
    Family(
        name="torchvision-resnet",
        builder="resnet",
        description="torchvision ResNet blocks (BasicBlock, Bottleneck)",
        applies=has_blocks,
        levels=resnet_levels,
        plan=lambda model, multiple: resnet_compression.plan(model, multiple=multiple),
    )
)

TORCH_TRANSFORMER = register_family(
    Family(
        name="torch-transformer",
        builder="transformer",
        description=(
            "torch.nn transformer layers and attentions (TransformerEncoderLayer, "
            "TransformerDecoderLayer, MultiheadAttention)"
        ),
        # Layers compress already made count: compressing a compressed model again composes.
        applies=lambda model: (
            has_torch_transformer(model) or transformer_compression.applies(model)
        ),
        levels=torch_transformer_levels,
        plan=lambda model, multiple: transformer_compression.plan(model, multiple=multiple),
    )
)

EXPERTS = register_family(
    Family(
        name="experts",
        builder="moe",
        description="mixture-of-experts layers (modules with an `experts` attribute)",
        applies=has_experts,
        levels=moe_levels,
        plan=lambda model, multiple: moe_compression.plan(model, multiple=multiple),
    )
)
