"""Hugging Face GPT-2 (``GPT2Model``, ``GPT2LMHeadModel`` …): levels and compression.

GPT-2's projections are ``transformers``' ``Conv1D``, whose weight is ``[in, out]`` (transposed
relative to ``nn.Linear``): ``attn.c_attn`` holds the queries, keys and values side by side along
its output dimension (``[E, 3E]``), ``attn.c_proj`` is ``[E, E]``, ``mlp.c_fc`` ``[E, I]``,
``mlp.c_proj`` ``[I, E]``. Each ``GPT2Block`` computes ``x + attn(ln_1(x))`` then
``x + mlp(ln_2(x))`` (pre-norm). Classes are recognised by name and module, so that importing
group_prox never imports ``transformers``.

Levels (``<block>`` is a block's name, e.g. ``"transformer.h.0"``):

* ``base_level``: each head ``h`` of ``attn``: its columns ``j·E + h·hd : j·E + (h+1)·hd`` of
  ``c_attn.weight`` and entries of ``c_attn.bias`` for ``j`` = q, k, v, and its rows
  ``h·hd:(h+1)·hd`` of ``attn.c_proj.weight``: ``"<block>.attn.head[h]"``; each MLP neuron ``i``:
  column ``i`` of ``c_fc.weight``, ``c_fc.bias[i]``, row ``i`` of ``mlp.c_proj.weight``:
  ``"<block>.mlp[i]"``;
* ``layer``: the attention sublayer ``"<block>.attn"`` (with ``ln_1``) and the MLP sublayer
  ``"<block>.mlp"`` (with ``ln_2``); the output biases are in these groups only.

Compression (exact in ``eval()`` mode, with and without ``past_key_values``, so greedy generation
gives the same tokens):

* a head is dead when its ``c_proj`` rows are 0, or its values are identically 0 (value columns
  and bias of ``c_attn``): the attention keeps its other heads in place (replacement kind
  ``"gpt2_attention_heads"``: ``c_attn``, ``c_proj``, ``num_heads`` and ``split_size`` sliced
  consistently; ``head_dim`` and the scaling are unchanged), and its cache holds the kept heads;
* a neuron is dead when its row of ``mlp.c_proj`` is 0 (kind ``"gpt2_mlp_neurons"``);
* an attention with no live head becomes a :class:`RemovedGPT2Attention`, which outputs the
  ``c_proj`` bias (or 0) and still records the tokens in the cache (the cache reads the sequence
  length from its layers); an MLP with no live neuron a
  :class:`~group_prox.families.hf_encoder.ZeroBranch`; the LayerNorm feeding a removed branch an
  ``nn.Identity``.

Left alone: cross-attention (``crossattention``, ``ln_cross_attn``: in no group), subclasses,
other layouts (with a warning) and modules reached under several names. With
``output_attentions=True`` a removed attention reports no weights (``None``), and a pruned one
the kept heads only.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..compression.plan import Op, ReplaceOp, indices, register_replacement
from ..compression.surgery import kept_indices
from .hf_encoder import ZeroBranch, keep_cache_length
from .registry import Family, register_family

__all__ = ["RemovedGPT2Attention", "applies", "levels", "plan"]

_GPT2 = "transformers.models.gpt2."


def _is(module: object, name: str, prefix: str = _GPT2) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__.startswith(prefix)


def _conv1d(module: object) -> bool:
    return _is(module, "Conv1D", "transformers.")


def _derived(module: object) -> bool:
    return any(
        c.__name__ == "GPT2Block" and c.__module__.startswith(_GPT2)
        for c in type(module).__mro__[1:]
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --------------------------------------------------------------------------------------------
# Replacements


class _BiasOnly(nn.Module):
    def __init__(self, bias: nn.Parameter) -> None:
        super().__init__()
        self.bias = bias


class RemovedGPT2Attention(nn.Module):
    """A ``GPT2Attention`` with no live head: outputs its ``c_proj`` bias (``has_bias``) or 0,
    through its ``resid_dropout``; with a cache, records the tokens' length in it (see
    :func:`~group_prox.families.hf_encoder.keep_cache_length`). Returns ``(output, None)``."""

    def __init__(self, attention: nn.Module, has_bias: bool) -> None:
        super().__init__()
        self.layer_idx = attention.layer_idx
        self.embed_dim = attention.c_proj.nf
        self.has_bias = has_bias
        if has_bias:
            self.c_proj = _BiasOnly(attention.c_proj.bias)
        self.resid_dropout = attention.resid_dropout

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, bias={self.has_bias}"

    def forward(
        self,
        hidden_states: Tensor,
        cache: Any = None,
        attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        output_attentions: bool | None = False,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        cache = cache if cache is not None else past_key_values
        keep_cache_length(cache, self.layer_idx, hidden_states, kwargs)
        out = hidden_states.new_zeros((*hidden_states.shape[:-1], self.embed_dim))
        if self.has_bias:
            out = self.resid_dropout(out + self.c_proj.bias)
        return out, None


def _check_attention(module: nn.Module, kind: str) -> None:
    if not _is(module, "GPT2Attention") or module.is_cross_attention:
        raise TypeError(
            f"{kind}: expected a GPT2Attention (self-attention), got {type(module).__name__}."
        )


def _set(owner: nn.Module, name: str, dim: int, index: Tensor) -> None:
    old = getattr(owner, name)
    new = old.detach().index_select(dim, index.to(old.device)).contiguous()
    setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad))


@register_replacement("gpt2_attention_heads")
@torch.no_grad()
def _attention_heads(module: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    """Keep heads ``args["keep"]`` (among the current ones) of a GPT2Attention, in place."""
    _check_attention(module, "gpt2_attention_heads")
    keep = indices(args["keep"], "gpt2_attention_heads: args['keep']")
    heads, hd = module.num_heads, module.head_dim
    if not keep or keep[-1] >= heads:
        raise ValueError(
            f"gpt2_attention_heads: kept heads must be 1 or more indices in [0, {heads}), got "
            f"{list(keep)}."
        )
    inner = module.split_size
    if inner != heads * hd or module.c_attn.nf != 3 * inner or module.c_proj.nx != inner:
        raise ValueError("gpt2_attention_heads: c_attn/c_proj do not match num_heads × head_dim.")
    rows = torch.tensor([h * hd + j for h in keep for j in range(hd)], dtype=torch.long)
    cols = torch.cat([rows, rows + inner, rows + 2 * inner])
    _set(module.c_attn, "weight", 1, cols)
    _set(module.c_attn, "bias", 0, cols)
    module.c_attn.nf = cols.numel()
    _set(module.c_proj, "weight", 0, rows)
    module.c_proj.nx = rows.numel()
    module.num_heads = len(keep)
    module.split_size = rows.numel()
    return module


@register_replacement("gpt2_mlp_neurons")
@torch.no_grad()
def _mlp_neurons(module: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    """Keep neurons ``args["keep"]`` of a GPT2MLP, in place."""
    if not _is(module, "GPT2MLP"):
        raise TypeError(f"gpt2_mlp_neurons: expected a GPT2MLP, got {type(module).__name__}.")
    keep = indices(args["keep"], "gpt2_mlp_neurons: args['keep']")
    width = module.c_fc.nf
    if not keep or keep[-1] >= width or module.c_proj.nx != width:
        raise ValueError(
            f"gpt2_mlp_neurons: kept neurons must be 1 or more indices in [0, {width}), got "
            f"{list(keep)}."
        )
    index = torch.tensor(keep, dtype=torch.long)
    _set(module.c_fc, "weight", 1, index)
    _set(module.c_fc, "bias", 0, index)
    module.c_fc.nf = len(keep)
    _set(module.c_proj, "weight", 0, index)
    module.c_proj.nx = len(keep)
    return module


@register_replacement("gpt2_removed_attention")
def _removed_attention(module: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    _check_attention(module, "gpt2_removed_attention")
    has_bias = args["bias"]
    if not isinstance(has_bias, bool):
        raise ValueError(
            f"gpt2_removed_attention: args['bias'] must be a bool, got {has_bias!r:.80}."
        )
    return RemovedGPT2Attention(module, has_bias)


# --------------------------------------------------------------------------------------------
# Layout


class _Block:
    """One recognised block; a sublayer removed by compression is ``None``."""

    def __init__(self, name: str, block: nn.Module) -> None:
        self.name = name
        self.attn: nn.Module | None = None
        self.mlp: nn.Module | None = None
        attn, mlp = block.attn, block.mlp
        if not isinstance(attn, RemovedGPT2Attention):
            if not (_is(attn, "GPT2Attention") and not attn.is_cross_attention):
                raise ValueError(f"attn is a {type(attn).__name__}")
            if not (_conv1d(attn.c_attn) and _conv1d(attn.c_proj)):
                raise ValueError("attn.c_attn/c_proj are not Conv1D")
            inner, hd = attn.split_size, attn.head_dim
            if not (
                hd > 0
                and inner == attn.num_heads * hd
                and tuple(attn.c_attn.weight.shape) == (attn.c_proj.nf, 3 * inner)
                and tuple(attn.c_proj.weight.shape) == (inner, attn.c_proj.nf)
            ):
                raise ValueError("attn.c_attn/c_proj do not match num_heads × head_dim")
            if type(block.ln_1) is not nn.LayerNorm:
                raise ValueError("ln_1 is not an nn.LayerNorm")
            self.attn, self.ln_1 = attn, block.ln_1
        if isinstance(mlp, ZeroBranch):
            return
        if not (_is(mlp, "GPT2MLP") and _conv1d(mlp.c_fc) and _conv1d(mlp.c_proj)):
            raise ValueError(f"mlp is a {type(mlp).__name__}")
        if mlp.c_fc.nf != mlp.c_proj.nx or type(block.ln_2) is not nn.LayerNorm:
            raise ValueError("mlp.c_fc/c_proj widths differ or ln_2 is not an nn.LayerNorm")
        self.mlp, self.ln_2 = mlp, block.ln_2


def _blocks(model: nn.Module, caller: str) -> list[_Block]:
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    pcounts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    found: list[_Block] = []
    for name, module in model.named_modules():
        label = name or "the model"
        if not _is(module, "GPT2Block"):
            if _derived(module):
                warnings.warn(
                    f"{caller}: {label} ({type(module).__name__}) subclasses GPT2Block and is "
                    "left alone.",
                    stacklevel=4,
                )
            continue
        parts = [
            m for attr in ("attn", "ln_1", "mlp", "ln_2") for m in getattr(module, attr).modules()
        ]
        if any(counts[id(m)] > 1 for m in parts) or any(
            pcounts[id(p)] > 1 for m in parts for p in m.parameters()
        ):
            warnings.warn(
                f"{caller}: {label} shares modules or parameters with others and is left alone.",
                stacklevel=4,
            )
            continue
        try:
            found.append(_Block(name, module))
        except (ValueError, AttributeError) as e:
            warnings.warn(
                f"{caller}: {label} has a layout this family does not know ({e}) and is left "
                "alone.",
                stacklevel=4,
            )
    return found


# --------------------------------------------------------------------------------------------
# Levels and planning


def levels(model: nn.Module) -> dict[str, dict[str, list]]:
    """The levels of the module docstring for every recognised block (frozen ones included)."""
    base: dict[str, list] = {}
    layer: dict[str, list] = {}
    for b in _blocks(model, "transformer()"):
        if b.attn is not None:
            attn, inner, hd = b.attn, b.attn.split_size, b.attn.head_dim
            name = _join(b.name, "attn")
            for h in range(attn.num_heads):
                cols = [slice(j * inner + h * hd, j * inner + (h + 1) * hd) for j in range(3)]
                base[f"{name}.head[{h}]"] = [
                    *((attn.c_attn.weight, 1, c) for c in cols),
                    *((attn.c_attn.bias, 0, c) for c in cols),
                    (attn.c_proj.weight, 0, slice(h * hd, (h + 1) * hd)),
                ]
            layer[name] = [*attn.c_attn.parameters(), *attn.c_proj.parameters(),
                           *b.ln_1.parameters()]  # fmt: skip
        if b.mlp is not None:
            mlp = b.mlp
            name = _join(b.name, "mlp")
            for i in range(mlp.c_fc.nf):
                base[f"{name}[{i}]"] = [
                    (mlp.c_fc.weight, 1, i),
                    (mlp.c_fc.bias, 0, i),
                    (mlp.c_proj.weight, 0, i),
                ]
            layer[name] = [*mlp.c_fc.parameters(), *mlp.c_proj.parameters(),
                           *b.ln_2.parameters()]  # fmt: skip
    return {"base_level": base, "layer": layer}


@torch.no_grad()
def dead_heads(attn: nn.Module) -> Tensor:
    """Heads contributing exactly 0: zero ``c_proj`` rows, or zero values (``c_attn`` value
    columns and bias)."""
    heads, hd, inner = attn.num_heads, attn.head_dim, attn.split_size
    out_zero = (attn.c_proj.weight.detach().reshape(heads, -1) == 0).all(-1)
    w_v = attn.c_attn.weight.detach()[:, 2 * inner :]
    b_v = attn.c_attn.bias.detach()[2 * inner :]
    values_zero = (w_v.reshape(-1, heads, hd) == 0).all(-1).all(0)
    values_zero &= (b_v.reshape(heads, hd) == 0).all(-1)
    return (out_zero | values_zero).cpu()


def _zero(t: Tensor) -> bool:
    return not bool(t.detach().any())


def _block_ops(b: _Block, multiple: int) -> list[Op]:
    ops: list[Op] = []
    if b.attn is not None:
        dead = dead_heads(b.attn)
        attn = _join(b.name, "attn")
        if bool(dead.all()):
            has_bias = not _zero(b.attn.c_proj.bias)
            ops += [
                ReplaceOp(attn, "gpt2_removed_attention", {"bias": has_bias}),
                ReplaceOp(_join(b.name, "ln_1"), "hf_unused_norm", {}),
            ]
        else:
            keep = kept_indices(dead, multiple)
            if len(keep) < dead.numel():
                ops.append(ReplaceOp(attn, "gpt2_attention_heads", {"keep": keep}))
    if b.mlp is not None:
        dead = (b.mlp.c_proj.weight.detach() == 0).all(1).cpu()
        mlp = _join(b.name, "mlp")
        if bool(dead.all()):
            has_bias = not _zero(b.mlp.c_proj.bias)
            args = {"width": b.mlp.c_proj.nf, "bias": "c_proj" if has_bias else None,
                    "proj": "c_proj", "dropout": "dropout", "tuple": False}  # fmt: skip
            ops += [
                ReplaceOp(mlp, "hf_removed_branch", args),
                ReplaceOp(_join(b.name, "ln_2"), "hf_unused_norm", {}),
            ]
        else:
            keep = kept_indices(dead, multiple)
            if len(keep) < dead.numel():
                ops.append(ReplaceOp(mlp, "gpt2_mlp_neurons", {"keep": keep}))
    return ops


def plan(model: nn.Module, multiple: int = 1) -> list[Op]:
    """Operations removing the dead heads, neurons and sublayers of every recognised block (see
    the module docstring). Widths are rounded up to a multiple of ``multiple`` by keeping dead
    units."""
    return [op for b in _blocks(model, "compress()") for op in _block_ops(b, multiple)]


def applies(model: nn.Module) -> bool:
    """Whether ``model`` holds a ``GPT2Block`` (or a subclass of one)."""
    return any(_is(m, "GPT2Block") or _derived(m) for m in model.modules())


HF_GPT2 = register_family(
    Family(
        name="hf-gpt2",
        builder="transformer",
        description="Hugging Face GPT-2 blocks (GPT2Block)",
        applies=applies,
        levels=levels,
        plan=plan,
    )
)
