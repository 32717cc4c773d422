"""Compression of ``torch.nn`` transformers, kept under this name for existing imports.

The family (its levels, its compression plan, :class:`PrunedMultiheadAttention` and the
compressed layers) lives in :mod:`group_prox.families.torch_transformer`.
"""

from ..families.torch_transformer import (
    CompressedTransformerDecoderLayer,
    CompressedTransformerEncoderLayer,
    PrunedMultiheadAttention,
    applies,
    dead_heads,
    dead_neurons,
    plan,
)

__all__ = [
    "CompressedTransformerDecoderLayer",
    "CompressedTransformerEncoderLayer",
    "PrunedMultiheadAttention",
    "applies",
    "dead_heads",
    "dead_neurons",
    "plan",
]
