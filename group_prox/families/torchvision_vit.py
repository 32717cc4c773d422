"""torchvision Vision Transformers (``torchvision.models.vision_transformer.EncoderBlock``): the MLP
neurons and sublayers, and the whole encoder blocks.

An ``EncoderBlock`` computes, pre-norm,

    ``x = x + dropout(self_attention(ln_1(x)))``;  ``x = x + mlp(ln_2(x))``

with ``self_attention`` an ``nn.MultiheadAttention`` and ``mlp`` an ``MLPBlock``
(``Sequential(Linear, GELU, Dropout, Linear, Dropout)``). The attention is the torch-transformer
family's (:mod:`group_prox.hierarchy.transformer`): its heads ``"<block>.self_attention.head[h]"``
and its sublayer group ``"<block>.self_attention"`` come from there, and compress removes its dead
heads (``PrunedMultiheadAttention``, which takes the block's call unchanged). That family knows
no ``EncoderBlock``, so its attention group holds the attention's parameters only, not ``ln_1``.

This family adds (``builder="transformer"``):

* ``base_level``: MLP neuron ``i``, ``"<block>.mlp[i]"``: row ``i`` of ``mlp[0]`` (and its bias),
  column ``i`` of ``mlp[3]``;
* ``layer``: the MLP sublayer ``"<block>.mlp"``: ``ln_2`` and ``mlp``;
* ``whole_layer``: the block ``"<block>"``: all of its parameters (``ln_1`` included, which is in
  no finer group). A zero block is the identity.

Compression, exact in ``eval()`` mode: dead neurons (zero column of ``mlp[3]``) are sliced from
``mlp[0]``/``mlp[3]`` under their names; an MLP with no live neuron and a zero ``mlp[3]`` bias, and
an attention with no live head and a zero ``out_proj`` bias, output exactly 0, so the block becomes
a :class:`CompressedEncoderBlock` (replacement kind ``"torchvision_encoder_block"``) that skips
that residual branch and its LayerNorm. Blocks with another layout, subclasses overriding
``forward`` and shared modules are left alone (the first with a warning).
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..compression.plan import Op, ReplaceOp, SliceOp, register_replacement
from ..compression.surgery import kept_indices
from ..hierarchy.core import Member, hidden_unit
from .registry import Family, register_family
from .torch_transformer import dead_heads

__all__ = ["TORCHVISION_VIT", "CompressedEncoderBlock", "applies", "levels", "plan"]

_SUBLAYERS = ("self_attention", "mlp")
_PARTS = {"self_attention": ("ln_1", "self_attention", "dropout"), "mlp": ("ln_2", "mlp")}


def _encoder_block() -> type | None:
    mod = sys.modules.get("torchvision.models.vision_transformer")
    return None if mod is None else mod.EncoderBlock


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    kind = _encoder_block()
    kinds = (CompressedEncoderBlock,) + ((kind,) if kind is not None else ())
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def applies(model: nn.Module) -> bool:
    """Whether ``model`` holds a torchvision ``EncoderBlock`` (or one compress made smaller)."""
    return bool(_blocks(model))


def _mlp_layout(mlp: object) -> bool:
    return (
        isinstance(mlp, nn.Sequential)
        and len(mlp) == 5
        and isinstance(mlp[0], nn.Linear)
        and isinstance(mlp[3], nn.Linear)
        and mlp[0].out_features == mlp[3].in_features
        and all(isinstance(mlp[i], (nn.GELU, nn.ReLU, nn.SiLU, nn.Dropout)) for i in (1, 2, 4))
    )


def _understood(name: str, block: nn.Module, caller: str) -> bool:
    kind = _encoder_block()
    ok = isinstance(block, CompressedEncoderBlock) or (
        kind is not None and type(block).forward is kind.forward
    )
    if ok and block.mlp is not None:
        ok = _mlp_layout(block.mlp)
    if not ok:
        warnings.warn(
            f"{caller}: torchvision EncoderBlock {name or 'the model'} overrides forward or its "
            "mlp is not Sequential(Linear, GELU, Dropout, Linear, Dropout); it is left out.",
            stacklevel=4,
        )
    return ok


def levels(model: nn.Module) -> dict[str, dict[str, list[Member]]]:
    """MLP neurons (``base_level``), MLP sublayers (``layer``) and blocks (``whole_layer``),
    frozen parameters included."""
    base: dict[str, list[Member]] = {}
    layer: dict[str, list[Member]] = {}
    whole: dict[str, list[Member]] = {}
    for name, block in _blocks(model):
        if not name or not _understood(name, block, "transformer()"):
            continue
        mlp = block.mlp
        if mlp is not None:
            l1, l2 = mlp[0], mlp[3]
            for i in range(l1.out_features):
                base[f"{name}.mlp[{i}]"] = hidden_unit([l1], l2, i)
            layer[f"{name}.mlp"] = [*block.ln_2.parameters(), *mlp.parameters()]
        whole[name] = list(block.parameters())
    return {"base_level": base, "layer": layer, "whole_layer": whole}


class CompressedEncoderBlock(nn.Module):
    """A torchvision ``EncoderBlock`` without the sublayers in ``removed`` (``"self_attention"``,
    ``"mlp"``), whose outputs were exactly 0. Kept children keep their names (``ln_1``,
    ``self_attention``, ``dropout``, ``ln_2``, ``mlp``); a removed sublayer's modules are gone."""

    def __init__(self, block: nn.Module, removed: tuple[str, ...]) -> None:
        super().__init__()
        before = tuple(getattr(block, "removed", ()))
        self.removed = tuple(s for s in _SUBLAYERS if s in removed or s in before)
        self.num_heads = block.num_heads
        for sub in _SUBLAYERS:
            for part in _PARTS[sub]:
                setattr(self, part, None if sub in self.removed else getattr(block, part))

    def forward(self, input: Tensor) -> Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch, seq, hidden), got {input.shape}")
        x = input
        if self.self_attention is not None:
            y, _ = self.self_attention(*(self.ln_1(x),) * 3, need_weights=False)
            x = x + self.dropout(y)
        if self.mlp is not None:
            x = x + self.mlp(self.ln_2(x))
        return x


@register_replacement("torchvision_encoder_block")
def _replace_block(block: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    kind = _encoder_block()
    if not (
        isinstance(block, CompressedEncoderBlock) or (kind is not None and isinstance(block, kind))
    ):
        raise TypeError(
            f"torchvision_encoder_block replaces an EncoderBlock, not a {type(block).__name__}."
        )
    remove = args.get("remove", [])
    if not isinstance(remove, list | tuple) or not set(remove) <= set(_SUBLAYERS):
        raise ValueError(
            f"args['remove'] must be a list of 'self_attention'/'mlp', got {remove!r:.80}."
        )
    return CompressedEncoderBlock(block, tuple(remove))


def _zero(t: Tensor | None) -> bool:
    return t is None or not bool(t.detach().any())


def _shared(model: nn.Module) -> set[int]:
    modules = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    params = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    out = {k for k, c in modules.items() if c > 1}
    out |= {id(m) for m in model.modules() if any(params[id(p)] > 1 for p in m.parameters())}
    return out


def plan(model: nn.Module, multiple: int = 1) -> list[Op]:
    """Operations removing the dead MLP neurons and the zero sublayers of the torchvision encoder
    blocks in ``model`` (the torch-transformer family removes the attention heads)."""
    ops: list[Op] = []
    shared = _shared(model)
    for name, block in _blocks(model):
        if (
            not name
            or not _understood(name, block, "compress()")
            or any(id(m) in shared for m in block.modules())
        ):
            continue
        remove: list[str] = []
        attn = block.self_attention
        if (
            attn is not None
            and hasattr(attn, "out_proj")
            and bool(dead_heads(attn).all())
            and _zero(attn.out_proj.bias)
        ):
            remove.append("self_attention")
        if block.mlp is not None:
            l2 = block.mlp[3]
            dead = (l2.weight.detach() == 0).all(0).cpu()
            if bool(dead.all()) and _zero(l2.bias):
                remove.append("mlp")
            else:
                keep = tuple(kept_indices(dead, multiple))
                if len(keep) < dead.numel():
                    ops += [
                        SliceOp(f"{name}.mlp.0", "out", keep),
                        SliceOp(f"{name}.mlp.3", "in", keep),
                    ]
        if remove:
            ops.append(ReplaceOp(name, "torchvision_encoder_block", {"remove": remove}))
    return ops


TORCHVISION_VIT = register_family(
    Family(
        name="torchvision-vit",
        builder="transformer",
        description="torchvision Vision Transformer encoder blocks (EncoderBlock)",
        applies=applies,
        levels=levels,
        plan=plan,
    )
)
