"""timm Vision Transformers (``timm.models.vision_transformer.Block``): levels and compression.

A timm ``Block`` computes, pre-norm,

    ``x = x + drop_path1(ls1(attn(norm1(x))))``;  ``x = x + drop_path2(ls2(mlp(norm2(x))))``

where ``attn`` is timm's ``Attention`` (one fused ``qkv`` Linear ``[3·A, E]``, ``A = num_heads ·
head_dim``, laid out ``q | k | v`` with head ``h`` owning rows ``h·hd:(h+1)·hd`` of each; optional
per-head ``q_norm``/``k_norm``, optional sigmoid ``gate`` Linear ``[A, E]``; then ``proj``
``[E, A]``), ``mlp`` is timm's ``Mlp`` (``fc2(norm(drop(act(fc1(x)))))``), and ``ls1``/``ls2``
are ``LayerScale`` (``x · γ``) or the identity.

Levels (``builder="transformer"``, merged with the other transformer families):

* ``base_level``: head ``h`` of every attention, ``"<block>.attn.head[h]"``: its rows of ``qkv``
  (q, k and v, weight and bias), of ``gate`` if any, and its columns of ``proj.weight``; MLP
  neuron ``i``, ``"<block>.mlp[i]"``: row ``i`` of ``fc1`` (and bias) and column ``i`` of ``fc2``.
  A zero group contributes exactly nothing.
* ``layer``: the attention sublayer ``"<block>.attn"`` (``norm1``, ``attn``, ``ls1``) and the MLP
  sublayer ``"<block>.mlp"`` (``norm2``, ``mlp``, ``ls2``).

Compression, exact in ``eval()`` mode:

* a dead head (zero ``proj`` columns, or zero values: its v rows and v bias) is removed from
  ``qkv``, ``gate`` and ``proj``, and the attention's ``num_heads``/``attn_dim`` (which its forward
  reads in its reshapes, in both the fused and the manual path) are updated in place (replacement
  kind ``"timm_attention_heads"``; the module stays a timm ``Attention`` with the same parameter
  names). Not with ``scale_norm`` (a LayerNorm over all heads): its heads stay;
* a dead MLP neuron (zero ``fc2`` column) is sliced from ``fc1`` and ``fc2`` under their names;
  not when ``Mlp.norm`` (a norm over the hidden units) is used;
* a sublayer whose output is exactly 0 (no live head and a zero or absent ``proj`` bias / no live
  neuron and a zero or absent ``fc2`` bias, or an all-zero ``LayerScale``) goes with its norm and
  LayerScale: the block becomes a :class:`CompressedTimmBlock` (replacement kind
  ``"timm_vit_block"``) that skips that residual branch.

Left alone (documented): other block kinds (``ResPostBlock``, parallel blocks), attentions or MLPs
of other classes (RoPE, GLU), subclasses overriding ``forward``, and shared modules; a block whose
attention or MLP is not the timm class is skipped with a warning.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..compression.plan import Op, ReplaceOp, SliceOp, indices, register_replacement
from ..compression.surgery import kept_indices
from ..hierarchy.core import Member, hidden_unit
from .registry import Family, register_family

__all__ = ["TIMM_VIT", "CompressedTimmBlock", "applies", "levels", "plan"]

_SUBLAYERS = ("attn", "mlp")
# Per sublayer: the modules that go with it (norm, module, layer scale, drop path).
_PARTS = {
    "attn": ("norm1", "attn", "ls1", "drop_path1"),
    "mlp": ("norm2", "mlp", "ls2", "drop_path2"),
}


def _timm_classes() -> tuple[type, type, type] | None:
    vit = sys.modules.get("timm.models.vision_transformer")
    attention = sys.modules.get("timm.layers.attention")
    mlp = sys.modules.get("timm.layers.mlp")
    if vit is None or attention is None or mlp is None:
        return None
    return vit.Block, attention.Attention, mlp.Mlp


def _same_forward(module: object, kind: type) -> bool:
    return isinstance(module, kind) and type(module).forward is kind.forward


class CompressedTimmBlock(nn.Module):
    """A timm ViT ``Block`` without the sublayers in ``removed`` (``"attn"``, ``"mlp"``), whose
    outputs were exactly 0. Kept children keep their names (``norm1``, ``attn``, ``ls1``,
    ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``), so their state_dict keys do not
    change; a removed sublayer's modules are gone. Same call signature as timm's ``Block``."""

    def __init__(self, block: nn.Module, removed: tuple[str, ...]) -> None:
        super().__init__()
        before = tuple(getattr(block, "removed", ()))
        self.removed = tuple(s for s in _SUBLAYERS if s in removed or s in before)
        for sub in _SUBLAYERS:
            for part in _PARTS[sub]:
                setattr(self, part, None if sub in self.removed else getattr(block, part))

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        if self.attn is not None:
            y = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
            x = x + self.drop_path1(self.ls1(y))
        if self.mlp is not None:
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


@register_replacement("timm_vit_block")
def _block(block: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    classes = _timm_classes()
    if not (isinstance(block, CompressedTimmBlock) or (classes and isinstance(block, classes[0]))):
        raise TypeError(f"timm_vit_block replaces a timm ViT Block, not a {type(block).__name__}.")
    remove = args.get("remove", [])
    if not isinstance(remove, list | tuple) or not set(remove) <= set(_SUBLAYERS):
        raise ValueError(f"args['remove'] must be a list of 'attn'/'mlp', got {remove!r:.80}.")
    return CompressedTimmBlock(block, tuple(remove))


def _head_rows(attn: nn.Module, keep: tuple[int, ...]) -> list[int]:
    hd, a = attn.head_dim, attn.attn_dim
    return [j * a + h * hd + d for j in range(3) for h in keep for d in range(hd)]


def _select(module: nn.Module, name: str, dim: int, idx: list[int]) -> None:
    old = getattr(module, name, None)
    if old is None:
        return
    new = old.detach().index_select(dim, torch.as_tensor(idx, device=old.device)).contiguous()
    setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))


@register_replacement("timm_attention_heads")
def _attention_heads(attn: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    classes = _timm_classes()
    if not (classes and isinstance(attn, classes[1])):
        raise TypeError(
            f"timm_attention_heads edits a timm Attention, not a {type(attn).__name__}."
        )
    keep = indices(args["keep"], "args['keep']")
    if not keep or keep[-1] >= attn.num_heads:
        raise ValueError(
            f"args['keep'] must name at least one of the {attn.num_heads} heads, got {list(keep)}."
        )
    hd = attn.head_dim
    inner = [h * hd + d for h in keep for d in range(hd)]
    rows = _head_rows(attn, keep)
    _select(attn.qkv, "weight", 0, rows)
    _select(attn.qkv, "bias", 0, rows)
    attn.qkv.out_features = len(rows)
    if getattr(attn, "gate", None) is not None:
        _select(attn.gate, "weight", 0, inner)
        _select(attn.gate, "bias", 0, inner)
        attn.gate.out_features = len(inner)
    _select(attn.proj, "weight", 1, inner)
    attn.proj.in_features = len(inner)
    attn.num_heads = len(keep)
    attn.attn_dim = len(inner)
    return attn


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    classes = _timm_classes()
    kinds: tuple[type, ...] = (CompressedTimmBlock,) + ((classes[0],) if classes else ())
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def applies(model: nn.Module) -> bool:
    """Whether ``model`` holds a timm ViT ``Block`` (or a block compress made smaller)."""
    return bool(_blocks(model))


def _understood(name: str, block: nn.Module, caller: str) -> bool:
    """A block of timm's computation on timm's Attention and Mlp (warns otherwise)."""
    classes = _timm_classes()
    if classes is None:
        return False
    kind, attention, mlp = classes
    ok = isinstance(block, CompressedTimmBlock) or _same_forward(block, kind)
    if ok and block.attn is not None:
        ok = _same_forward(block.attn, attention) and isinstance(block.attn.qkv, nn.Linear)
    if ok and block.mlp is not None:
        ok = _same_forward(block.mlp, mlp)
    if not ok:
        warnings.warn(
            f"{caller}: timm block {name or 'the model'} is not timm's Block on timm's Attention "
            "and Mlp (or overrides forward); it is left out.",
            stacklevel=4,
        )
    return ok


def _head_members(attn: nn.Module, h: int) -> list[Member]:
    hd, a = attn.head_dim, attn.attn_dim
    rows = [slice(j * a + h * hd, j * a + (h + 1) * hd) for j in range(3)]
    inner = slice(h * hd, (h + 1) * hd)
    members: list[Member] = [(attn.qkv.weight, 0, r) for r in rows]
    if attn.qkv.bias is not None:
        members += [(attn.qkv.bias, 0, r) for r in rows]
    gate = getattr(attn, "gate", None)
    if gate is not None:
        members.append((gate.weight, 0, inner))
        if gate.bias is not None:
            members.append((gate.bias, 0, inner))
    members.append((attn.proj.weight, 1, inner))
    return members


def levels(model: nn.Module) -> dict[str, dict[str, list[Member]]]:
    """Heads and neurons (``base_level``), attention and MLP sublayers (``layer``), frozen
    parameters included."""
    base: dict[str, list[Member]] = {}
    layer: dict[str, list[Member]] = {}
    for name, block in _blocks(model):
        if not _understood(name, block, "transformer()"):
            continue
        prefix = f"{name}." if name else ""
        if block.attn is not None:
            for h in range(block.attn.num_heads):
                base[f"{prefix}attn.head[{h}]"] = _head_members(block.attn, h)
        if block.mlp is not None:
            for i in range(block.mlp.fc1.out_features):
                base[f"{prefix}mlp[{i}]"] = hidden_unit([block.mlp.fc1], block.mlp.fc2, i)
        for sub in _SUBLAYERS:
            if getattr(block, sub) is not None:
                layer[prefix + sub] = [
                    p for part in _PARTS[sub] for p in getattr(block, part).parameters()
                ]
    return {"base_level": base, "layer": layer}


@torch.no_grad()
def dead_heads(attn: nn.Module) -> Tensor:
    """Heads of a timm ``Attention`` contributing exactly 0: zero ``proj`` columns, or zero
    values (v rows of ``qkv`` and their bias), whatever the queries, keys, gate and mask."""
    heads, hd, a = attn.num_heads, attn.head_dim, attn.attn_dim
    dead = (attn.proj.weight.detach().reshape(-1, heads, hd) == 0).all(-1).all(0)
    values_zero = (attn.qkv.weight.detach()[2 * a :].reshape(heads, -1) == 0).all(-1)
    if attn.qkv.bias is not None:
        values_zero &= (attn.qkv.bias.detach()[2 * a :].reshape(heads, hd) == 0).all(-1)
    return (dead | values_zero).cpu()


def _zero(t: Tensor | None) -> bool:
    return t is None or not bool(t.detach().any())


def _scale_zero(ls: nn.Module) -> bool:
    gamma = getattr(ls, "gamma", None)
    return isinstance(gamma, Tensor) and not bool(gamma.detach().any())


def _shared(model: nn.Module) -> set[int]:
    modules = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    params = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    out = {k for k, c in modules.items() if c > 1}
    out |= {id(m) for m in model.modules() if any(params[id(p)] > 1 for p in m.parameters())}
    return out


def plan(model: nn.Module, multiple: int = 1) -> list[Op]:
    """Operations removing the dead heads, MLP neurons and sublayers of the timm ViT blocks in
    ``model`` (see the module docstring). Counts are rounded up to a multiple of ``multiple``."""
    ops: list[Op] = []
    shared = _shared(model)
    for name, block in _blocks(model):
        if not _understood(name, block, "compress()") or any(
            id(m) in shared for m in block.modules()
        ):
            continue
        prefix = f"{name}." if name else ""
        remove: list[str] = []
        attn, mlp = block.attn, block.mlp
        if attn is not None:
            dead = dead_heads(attn)
            if name and (_scale_zero(block.ls1) or (bool(dead.all()) and _zero(attn.proj.bias))):
                remove.append("attn")
            elif isinstance(attn.norm, nn.Identity):
                keep = kept_indices(dead, multiple)
                if len(keep) < attn.num_heads:
                    ops.append(ReplaceOp(prefix + "attn", "timm_attention_heads", {"keep": keep}))
        if mlp is not None:
            w = mlp.fc2.weight.detach()  # [out, hidden] (Linear) or [out, hidden, 1, 1] (conv)
            dead = (w.transpose(0, 1).reshape(w.shape[1], -1) == 0).all(1).cpu()
            if name and (_scale_zero(block.ls2) or (bool(dead.all()) and _zero(mlp.fc2.bias))):
                remove.append("mlp")
            elif isinstance(mlp.norm, nn.Identity):
                keep = tuple(kept_indices(dead, multiple))
                if len(keep) < dead.numel():
                    ops += [
                        SliceOp(prefix + "mlp.fc1", "out", keep),
                        SliceOp(prefix + "mlp.fc2", "in", keep),
                    ]
        if remove:
            ops.append(ReplaceOp(name, "timm_vit_block", {"remove": remove}))
    return ops


TIMM_VIT = register_family(
    Family(
        name="timm-vit",
        builder="transformer",
        description="timm Vision Transformer blocks (timm.models.vision_transformer Block)",
        applies=applies,
        levels=levels,
        plan=plan,
    )
)
