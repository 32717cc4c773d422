"""A small Hugging Face decoder and an offline task for it, for the example and the benchmark.

``build_llama`` makes a Llama-style decoder from a config (nothing downloaded); ``copy_task``
makes sequences whose second half copies the first, so a model learns it in seconds on a CPU and
``copy_accuracy`` tells whether compression kept what it learned. Needs ``transformers``
(``pip install "group_prox[hf]"``).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["HALF", "VOCAB", "build_llama", "copy_accuracy", "copy_task"]

VOCAB, HALF = 64, 8


def copy_task(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences ``a + a`` of ``2·HALF`` tokens; only the copied half is scored."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(1, VOCAB, (n, HALF), generator=g)
    ids = torch.cat([first, first], dim=1)
    labels = ids.clone()
    labels[:, :HALF] = -100
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]


def build_llama(
    hidden: int = 64, intermediate: int = 256, layers: int = 2, heads: int = 8, kv_heads: int = 4
) -> LlamaForCausalLM:
    """A Llama-style decoder (grouped-query attention, SwiGLU MLP) with seeded random weights."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2 * HALF,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def copy_accuracy(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    """The share of copied tokens predicted right (greedy, teacher forcing)."""
    model.eval()
    ids = torch.stack([d["input_ids"] for d in data])
    predicted = model(input_ids=ids).logits[:, HALF - 1 : -1].argmax(-1)
    return float((predicted == ids[:, HALF:]).float().mean())
