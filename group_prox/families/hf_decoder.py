"""Hugging Face decoder-only transformers: q/k/v/o attention (grouped-query allowed), gated MLP.

Recognised decoder layers (``transformers`` classes, found by class name and module, so that
importing group_prox never imports transformers): Llama, Mistral, Qwen2, Qwen3 (``q_norm``/``k_norm``
over the head dimension), Gemma, Gemma-2 and Gemma-3 (text), Phi-3 (fused projections, below), and
the attention of the MoE decoders Mixtral, Qwen2-MoE and Qwen3-MoE (their sparse MLP blocks,
modules with ``experts``, belong to the ``experts`` family).

Gemma-2/Gemma-3 close each branch with a post-norm, ``post_attention_layernorm`` on the attention's
output and ``post_feedforward_layernorm`` on the MLP's (``pre_feedforward_layernorm`` feeds the
MLP): an RMSNorm ``x · rsqrt(mean(x²) + eps) · (1 + w)`` maps a zero branch to exactly 0 whatever
``w`` (``eps > 0``), and heads still add up before it, so dead heads, neurons and branches are
found as for Llama; their norms are in their branch's ``layer`` group. Attention softcapping
(``tanh`` of each head's scores) and sliding windows act per head and per layer: unchanged.

Phi-3 fuses the projections: ``qkv_proj`` holds the query rows (head ``h``: rows ``h·hd:(h+1)·hd``),
then the key rows, then the value rows; ``gate_up_proj`` the gate rows, then the up rows
(``chunk(2)``). Its attention splits ``qkv_proj``'s output at ``config.num_attention_heads · hd``,
a number every layer shares, so an attention losing heads becomes :class:`FusedQKVAttention`
(same ``qkv_proj``/``o_proj`` names, its own head counts); a neuron is removed by slicing both
halves of ``gate_up_proj`` and the column of ``down_proj``.

Every such attention computes, in the layout of ``transformers`` (``view(*input_shape, -1,
head_dim)``), ``o_proj(concat_h o_h)`` with ``o_h = softmax(q_h k_{g(h)}ᵀ·scale + mask) v_{g(h)}``,
query head ``h`` reading key/value head ``g(h) = h // num_key_value_groups``. So, with
``hd = head_dim``:

* query head ``h`` contributes exactly 0 when its columns ``h·hd:(h+1)·hd`` of ``o_proj.weight``
  are 0, or when the values of its kv head are identically 0 (rows of ``v_proj`` and its bias);
* a kv head is dead when its values are 0 or every query head reading it is dead;
* the attention outputs exactly 0 when every head is dead and ``o_proj`` has no (or a zero) bias;
* MLP neuron ``i`` of ``down_proj(act(gate_proj(x)) * up_proj(x))`` contributes 0 when column
  ``i`` of ``down_proj.weight`` is 0, or row ``i`` of ``up_proj`` (and its bias) is 0; the MLP
  outputs 0 when every neuron is dead and ``down_proj`` has no (or a zero) bias.

Compression keeps the attention module of ``transformers`` and its ``forward``: only its
projections shrink. Removing query heads in unequal numbers per kv head breaks the uniform layout
``repeat_kv`` assumes (query head ``h`` reads kv head ``h // num_key_value_groups``); then
``k_proj``/``v_proj`` become :class:`HeadGatherLinear` (an ``nn.Linear`` holding the kept kv
heads' rows that writes, per kept query head, the key/value head it reads) and
``num_key_value_groups`` becomes 1: the function is exactly the same, and the KV cache then holds
one key/value head per kept query head. When every kept kv head keeps the same number of query
heads, the layout stays grouped (``num_key_value_groups`` = that number) and the cache holds the
kept kv heads only. (Phi-3's attention becomes :class:`FusedQKVAttention`, whose own forward
gathers the keys and values per query head after the cache, which then holds the kept kv heads
only.) A dead attention becomes :class:`HFZeroAttention` (zeros, ``None``; it still
advances the KV cache of its layer so that cached sequence lengths stay right), a dead MLP
:class:`HFZeroMLP`. Layouts not understood are left alone with a warning.

Exact in ``eval()`` mode for finite activations: a NaN inside a removed structure (eager
attention's fully masked padded rows can overflow to NaN in float64) is no longer multiplied by 0.
Left alone: the ``input_layernorm`` of a removed attention (and ``post_attention_layernorm`` of a
removed MLP; Gemma-2/3: the post-norm of a removed branch, computed on zeros) stays and is
computed, its output unused or zero; modules shared between layers are not
looked for.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compression.plan import Op, ReplaceOp, SliceOp, indices, register_replacement
from ..compression.surgery import keep_inputs, keep_outputs, kept_indices
from ..hierarchy.core import GroupTable, Member, Part
from .registry import Family, register_family

__all__ = [
    "FusedQKVAttention",
    "HFZeroAttention",
    "HFZeroMLP",
    "HeadGatherLinear",
    "applies",
    "decoder_layers",
    "levels",
    "plan",
]

_ARCHS = (
    "Llama",
    "Mistral",
    "Mixtral",
    "Qwen2",
    "Qwen2Moe",
    "Qwen3",
    "Qwen3Moe",
    "Gemma",
    "Gemma2",
    "Gemma3",
)
# Fused projections: ``qkv_proj`` (query rows, then key rows, then value rows) and
# ``gate_up_proj`` (gate rows, then up rows).
_FUSED_ARCHS = ("Phi3",)
_LAYERS = frozenset(f"{a}DecoderLayer" for a in (*_ARCHS, *_FUSED_ARCHS))
_ATTENTIONS = frozenset(f"{a}Attention" for a in _ARCHS)
_FUSED_ATTENTIONS = frozenset(f"{a}Attention" for a in _FUSED_ARCHS)
# Dense gated MLPs ``down_proj(act(gate_proj(x)) * up_proj(x))`` (Mixtral has none).
_MLPS = frozenset(f"{a}MLP" for a in _ARCHS if a != "Mixtral")
# ``gate, up = gate_up_proj(x).chunk(2, -1)``; ``down_proj(up * act(gate))``.
_FUSED_MLPS = frozenset(f"{a}MLP" for a in _FUSED_ARCHS)


def _hf_class(module: nn.Module, names: frozenset[str]) -> bool:
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("transformers.models.")


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The recognised ``transformers`` decoder layers of ``model``, with their names."""
    if sys.modules.get("transformers") is None:
        return []
    return [(n, m) for n, m in model.named_modules() if _hf_class(m, _LAYERS)]


def applies(model: nn.Module) -> bool:
    """Whether ``model`` holds a recognised ``transformers`` decoder layer."""
    return bool(decoder_layers(model))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --------------------------------------------------------------------------------------------
# Modules


class HeadGatherLinear(nn.Linear):
    """``nn.Linear`` whose output, split into heads of ``head_dim``, is gathered by ``heads``:
    output head ``j`` is head ``heads[j]`` of ``F.linear(x, weight, bias)``.

    ``weight``/``bias`` hold the rows of the kept key/value heads (``out_features`` is their
    number times ``head_dim``, as for a plain ``Linear``); the output has ``len(heads)`` heads,
    one per kept query head, so an attention with ``num_key_value_groups = 1`` reads for each
    query head the key/value head it read before. The parameters keep ``k_proj``/``v_proj``'s
    state_dict keys (``weight``, ``bias``); the index is not saved (it comes from the plan).
    """

    def __init__(self, linear: nn.Linear, head_dim: int, heads: Sequence[int]) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.head_dim = head_dim
        self.heads = tuple(heads)
        idx = torch.tensor(self.heads, dtype=torch.long, device=linear.weight.device)
        self.register_buffer("head_index", idx, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias).unflatten(-1, (-1, self.head_dim))
        idx = self.head_index
        if idx.device != y.device or idx.is_meta:
            idx = torch.tensor(self.heads, dtype=torch.long, device=y.device)
        return y.index_select(-2, idx).flatten(-2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, head_dim={self.head_dim}, heads={list(self.heads)}"


def _plain_linear(linear: nn.Linear) -> nn.Linear:
    """``linear`` as a plain ``nn.Linear`` (same parameter objects)."""
    if type(linear) is nn.Linear:
        return linear
    plain = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    plain.weight = linear.weight
    plain.bias = linear.bias
    return plain


class FusedQKVAttention(nn.Module):
    """The attention of a fused-``qkv_proj`` decoder (Phi-3) with fewer heads.

    ``transformers``' ``Phi3Attention`` splits ``qkv_proj``'s output at
    ``config.num_attention_heads * head_dim``, a number shared by every layer; this module
    carries its own sizes instead and computes the same forward: ``qkv_proj`` gives the
    ``num_heads`` query heads, then the ``num_key_value_heads`` key heads, then as many value
    heads; rotary embeddings and the eager attention are those of the original model's module;
    ``o_proj`` maps the heads back. Query head ``h`` reads key/value head ``kv_of_q[h]``: when
    that is ``h // num_key_value_groups`` the layout stays grouped, otherwise the keys and values
    (the cache holds the kept kv heads only) are gathered per query head and
    ``num_key_value_groups`` is 1. ``qkv_proj``/``o_proj`` are the original ``nn.Linear``
    modules, so the state_dict keys stay the original model's.
    """

    def __init__(
        self, attn: nn.Module, num_heads: int, num_kv_heads: int, kv_of_q: Sequence[int]
    ) -> None:
        super().__init__()
        self.config = attn.config
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.attention_dropout = attn.attention_dropout
        self.is_causal = attn.is_causal
        self.source = getattr(attn, "source", type(attn).__module__)
        self.num_heads = num_heads
        self.kv_of_q = tuple(kv_of_q)
        self.num_key_value_heads = num_kv_heads
        r = num_heads // num_kv_heads
        grouped = r * num_kv_heads == num_heads and self.kv_of_q == tuple(
            h // r for h in range(num_heads)
        )
        self.num_key_value_groups = r if grouped else 1
        self.gathered = not grouped
        self.qkv_proj = attn.qkv_proj
        self.o_proj = attn.o_proj
        idx = torch.tensor(self.kv_of_q, dtype=torch.long, device=self.qkv_proj.weight.device)
        self.register_buffer("kv_index", idx, persistent=False)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        import importlib

        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        source = importlib.import_module(self.source)
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        qkv = self.qkv_proj(hidden_states)
        q_end = self.num_heads * self.head_dim
        k_end = q_end + self.num_key_value_heads * self.head_dim
        query = qkv[..., :q_end].view(hidden_shape).transpose(1, 2)
        key = qkv[..., q_end:k_end].view(hidden_shape).transpose(1, 2)
        value = qkv[..., k_end:].view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = source.apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        if self.gathered:
            idx = self.kv_index
            if idx.device != key.device or idx.is_meta:
                idx = torch.tensor(self.kv_of_q, dtype=torch.long, device=key.device)
            key, value = key.index_select(1, idx), value.index_select(1, idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, source.eager_attention_forward
        )
        out, weights = interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=getattr(self.config, "sliding_window", None),
            **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights

    def extra_repr(self) -> str:
        return (
            f"layer_idx={self.layer_idx}, num_heads={self.num_heads}, "
            f"num_key_value_heads={self.num_key_value_heads}, kv_of_q={list(self.kv_of_q)}"
        )


class HFZeroAttention(nn.Module):
    """A removed attention sublayer: returns ``(zeros_like(hidden_states), None)`` as the
    decoder layer expects of ``self_attn``. Given a cache, it still adds one zero key/value
    channel per token for its layer, so that the cache's sequence length (which the model reads
    from layer 0 to place new positions) stays right."""

    def __init__(self, layer_idx: int | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: Any = None,
        attention_mask: Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        cache = cache if cache is not None else past_key_values
        if cache is not None and self.layer_idx is not None:
            b, n = hidden_states.shape[0], hidden_states.shape[-2]
            z = hidden_states.new_zeros(b, 1, n, 1)
            cache.update(z, z, self.layer_idx, kwargs=kwargs)
        return torch.zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


class HFZeroMLP(nn.Module):
    """A removed MLP sublayer: returns zeros of its input's shape."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


# --------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class _Layout:
    head_dim: int
    q_heads: int
    kv_heads: int
    kv_of_q: tuple[int, ...]  # the kv head each query head reads
    fused: bool = False  # one qkv_proj: query rows, key rows, value rows


def _is_fused_attention(attn: nn.Module) -> bool:
    return isinstance(attn, FusedQKVAttention) or _hf_class(attn, _FUSED_ATTENTIONS)


def _is_attention(attn: nn.Module) -> bool:
    return _hf_class(attn, _ATTENTIONS) or _is_fused_attention(attn)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _fused_layout(attn: nn.Module, where: str) -> _Layout:
    """The head layout of a ``qkv_proj`` attention (``Phi3Attention`` or
    :class:`FusedQKVAttention`)."""
    qkv, o = getattr(attn, "qkv_proj", None), getattr(attn, "o_proj", None)
    if type(qkv) is not nn.Linear or type(o) is not nn.Linear:
        raise ValueError(f"{where}: qkv_proj/o_proj are not both nn.Linear")
    hd = getattr(attn, "head_dim", None)
    nkv = getattr(attn, "num_key_value_heads", None)
    if isinstance(attn, FusedQKVAttention):
        nq, kv_of_q = attn.num_heads, attn.kv_of_q
    else:
        nq = getattr(getattr(attn, "config", None), "num_attention_heads", None)
        groups = getattr(attn, "num_key_value_groups", None)
        if not all(_positive_int(v) for v in (nq, nkv, groups)) or nq != nkv * groups:
            raise ValueError(
                f"{where}: config.num_attention_heads={nq!r} is not num_key_value_heads={nkv!r} "
                f"x num_key_value_groups={groups!r}"
            )
        kv_of_q = tuple(h // groups for h in range(nq))
    if not all(_positive_int(v) for v in (hd, nq, nkv)):
        raise ValueError(f"{where}: head_dim/head counts are not positive ints")
    if o.in_features != nq * hd or qkv.out_features != (nq + 2 * nkv) * hd:
        raise ValueError(
            f"{where}: qkv_proj ({qkv.out_features} rows) and o_proj ({o.in_features} inputs) do "
            f"not fit {nq} query and {nkv} key/value heads of head_dim={hd}"
        )
    if len(kv_of_q) != nq or any(not 0 <= j < nkv for j in kv_of_q):
        raise ValueError(f"{where}: the kv head of each query head does not fit {nkv} kv heads")
    return _Layout(hd, nq, nkv, tuple(kv_of_q), fused=True)


def _layout(attn: nn.Module, where: str) -> _Layout:
    """The head layout of a recognised attention; ``ValueError`` if it is not one we know."""
    if _is_fused_attention(attn):
        return _fused_layout(attn, where)
    projs = [getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if not all(isinstance(p, nn.Linear) for p in projs):
        raise ValueError(f"{where}: q_proj/k_proj/v_proj/o_proj are not all nn.Linear")
    q, k, v, o = projs
    hd = getattr(attn, "head_dim", None)
    groups = getattr(attn, "num_key_value_groups", None)
    if not isinstance(hd, int) or hd < 1 or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{where}: head_dim/num_key_value_groups are not positive ints")
    if q.out_features % hd or k.out_features % hd or o.in_features != q.out_features:
        raise ValueError(f"{where}: projection widths do not fit head_dim={hd}")
    if k.out_features != v.out_features or k.in_features != v.in_features:
        raise ValueError(f"{where}: k_proj and v_proj differ in shape")
    nq, nkv = q.out_features // hd, k.out_features // hd
    gather = [isinstance(p, HeadGatherLinear) for p in (k, v)]
    if any(gather):
        if not all(gather) or k.heads != v.heads or k.head_dim != hd or groups != 1:
            raise ValueError(f"{where}: k_proj/v_proj gather different heads")
        kv_of_q = k.heads
        if len(kv_of_q) != nq or any(not 0 <= j < nkv for j in kv_of_q):
            raise ValueError(f"{where}: k_proj/v_proj gather heads that do not fit q_proj")
    else:
        if nq != nkv * groups:
            raise ValueError(
                f"{where}: {nq} query heads are not {nkv} kv heads x num_key_value_groups={groups}"
            )
        kv_of_q = tuple(h // groups for h in range(nq))
    return _Layout(hd, nq, nkv, tuple(kv_of_q))


def _attention_of(name: str, layer: nn.Module, caller: str) -> tuple[nn.Module, _Layout] | None:
    """The layer's attention and its layout; ``None`` (with a warning) if not understood, or if
    it was removed."""
    attn = getattr(layer, "self_attn", None)
    where = _join(name, "self_attn")
    if isinstance(attn, HFZeroAttention):
        return None
    if not isinstance(attn, nn.Module) or not _is_attention(attn):
        warnings.warn(
            f"{caller}: {where} is a {type(attn).__name__}, not an attention this family knows; "
            "it is left alone.",
            stacklevel=3,
        )
        return None
    try:
        return attn, _layout(attn, where)
    except ValueError as e:
        warnings.warn(f"{caller}: {e}; the attention is left alone.", stacklevel=3)
        return None


def _dense_mlp(name: str, layer: nn.Module, caller: str) -> nn.Module | None:
    """The layer's dense gated MLP, or ``None``: removed, a sparse (MoE) block, or not
    understood (then with a warning)."""
    mlp = getattr(layer, "mlp", None)
    if isinstance(mlp, HFZeroMLP) or hasattr(mlp, "experts"):
        return None
    where = _join(name, "mlp")
    if isinstance(mlp, nn.Module) and _hf_class(mlp, _FUSED_MLPS):
        gate_up, down = getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)
        ok = (
            type(gate_up) is nn.Linear
            and type(down) is nn.Linear
            and gate_up.out_features == 2 * down.in_features
        )
    else:
        projs = [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        ok = (
            isinstance(mlp, nn.Module)
            and _hf_class(mlp, _MLPS)
            and all(type(p) is nn.Linear for p in projs)
            and projs[0].out_features == projs[1].out_features == projs[2].in_features
            and projs[0].in_features == projs[1].in_features
        )
    if not ok:
        warnings.warn(
            f"{caller}: {where} ({type(mlp).__name__}) is not a gated MLP (gate_proj/up_proj/"
            "down_proj or gate_up_proj/down_proj) this family knows; it is left alone.",
            stacklevel=3,
        )
        return None
    return mlp


def _mlp_rows(mlp: nn.Module, i: int) -> tuple[list[tuple[nn.Linear, slice]], slice]:
    """The (linear, rows) pairs of neuron ``i``'s gate and up rows; the up rows alone."""
    one = slice(i, i + 1)
    if _hf_class(mlp, _FUSED_MLPS):
        n = mlp.down_proj.in_features
        up = slice(n + i, n + i + 1)
        return [(mlp.gate_up_proj, one), (mlp.gate_up_proj, up)], up
    return [(mlp.gate_proj, one), (mlp.up_proj, one)], one


def _norms(layer: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The norms feeding (or, Gemma-2 style, closing) the attention and MLP branches."""

    def get(*names: str) -> list[nn.Module]:
        return [m for n in names if isinstance(m := getattr(layer, n, None), nn.Module)]

    if hasattr(layer, "pre_feedforward_layernorm"):
        return (
            get("input_layernorm", "post_attention_layernorm"),
            get("pre_feedforward_layernorm", "post_feedforward_layernorm"),
        )
    return get("input_layernorm"), get("post_attention_layernorm")


# --------------------------------------------------------------------------------------------
# Levels


def _rows(h: int, hd: int) -> slice:
    return slice(h * hd, (h + 1) * hd)


def _linear_rows(linear: nn.Linear, rows: slice) -> list[Member]:
    members: list[Member] = [(linear.weight, 0, rows)]
    if linear.bias is not None:
        members.append((linear.bias, 0, rows))
    return members


def _head_rows(attn: nn.Module, lay: _Layout, part: str, j: int) -> tuple[nn.Linear, slice]:
    """The linear and rows of query (``part="q"``), key (``"k"``) or value (``"v"``) head ``j``."""
    if not lay.fused:
        return getattr(attn, f"{part}_proj"), _rows(j, lay.head_dim)
    first = {"q": 0, "k": lay.q_heads, "v": lay.q_heads + lay.kv_heads}[part]
    return attn.qkv_proj, _rows(first + j, lay.head_dim)


def _query_members(attn: nn.Module, lay: _Layout, h: int) -> list[Member]:
    return [
        *_linear_rows(*_head_rows(attn, lay, "q", h)),
        (attn.o_proj.weight, 1, _rows(h, lay.head_dim)),
    ]


def _row_parts(linear: nn.Linear, starts: np.ndarray, size: int) -> list[Part]:
    """Rows ``starts[g] : starts[g] + size`` of ``linear``'s weight and bias, for every group."""
    parts = [Part(linear.weight, (0,), starts, (size,))]
    if linear.bias is not None:
        parts.append(Part(linear.bias, (0,), starts, (size,)))
    return parts


def _head_parts(attn: nn.Module, lay: _Layout, part: str, heads: np.ndarray) -> list[Part]:
    """The rows of query (``part="q"``), key or value heads ``heads``, one group per entry."""
    linear, first = _head_rows(attn, lay, part, 0)
    return _row_parts(linear, first.start + heads * lay.head_dim, lay.head_dim)


def _query_parts(attn: nn.Module, lay: _Layout, heads: np.ndarray) -> list[Part]:
    return [
        *_head_parts(attn, lay, "q", heads),
        Part(attn.o_proj.weight, (1,), heads * lay.head_dim, (lay.head_dim,)),
    ]


def _attention_tables(a: str, attn: nn.Module, lay: _Layout) -> tuple[GroupTable, GroupTable]:
    """The query-head groups and the kv-head groups of one attention (see :func:`levels`)."""
    q = np.arange(lay.q_heads, dtype=np.int64)
    heads = GroupTable([f"{a}.head[{h}]" for h in range(lay.q_heads)], _query_parts(attn, lay, q))
    kv_names = [f"{a}.kv_head[{j}]" for j in range(lay.kv_heads)]
    kv_of_q = np.asarray(lay.kv_of_q, dtype=np.int64)
    readers = np.bincount(kv_of_q, minlength=lay.kv_heads)
    if (readers == readers[0]).all():
        # Query head i of kv head j (in increasing order): column i of ``reads``.
        reads = np.argsort(kv_of_q, kind="stable").reshape(lay.kv_heads, -1)
        j = np.arange(lay.kv_heads, dtype=np.int64)
        parts = [*_head_parts(attn, lay, "k", j), *_head_parts(attn, lay, "v", j)]
        for i in range(reads.shape[1]):
            parts += _query_parts(attn, lay, reads[:, i])
        return heads, GroupTable(kv_names, parts)
    # kv heads read by unequal numbers of query heads (a compressed attention): one by one.
    kv: dict[str, list[Member]] = {}
    for j, name in enumerate(kv_names):
        members = [
            *_linear_rows(*_head_rows(attn, lay, "k", j)),
            *_linear_rows(*_head_rows(attn, lay, "v", j)),
        ]
        for h in range(lay.q_heads):
            if lay.kv_of_q[h] == j:
                members += _query_members(attn, lay, h)
        kv[name] = members
    return heads, GroupTable.concat([kv])


def _neuron_table(m: str, mlp: nn.Module) -> GroupTable:
    """The neuron groups of one dense MLP (see :func:`levels`)."""
    down = mlp.down_proj
    n = down.in_features
    i = np.arange(n, dtype=np.int64)
    parts = []
    for linear, rows in _mlp_rows(mlp, 0)[0]:
        parts += _row_parts(linear, rows.start + i, 1)
    parts.append(Part(down.weight, (1,), i, (1,)))
    return GroupTable([f"{m}[{k}]" for k in range(n)], parts)


def levels(model: nn.Module) -> dict[str, GroupTable | dict[str, list[Member]]]:
    """Levels of the recognised decoder layers (frozen parameters included):

    * ``base_level``: query head ``h`` of each attention (its rows of ``q_proj`` and bias, or its
      query rows of ``qkv_proj``; its columns of ``o_proj``), ``"<layer>.self_attn.head[h]"``;
      MLP neuron ``i`` (row ``i`` of ``gate_proj``/``up_proj`` and biases, or rows ``i`` and
      ``n + i`` of ``gate_up_proj``; column ``i`` of ``down_proj``), ``"<layer>.mlp[i]"``;
    * ``kv_head``: key/value head ``j`` (its rows of ``k_proj``/``v_proj`` and biases, or its key
      and value rows of ``qkv_proj``) with every query head reading it,
      ``"<layer>.self_attn.kv_head[j]"``;
    * ``layer``: the attention sublayer (all of ``self_attn``, ``q_norm``/``k_norm`` included, and
      ``input_layernorm``; Gemma-2/3: and ``post_attention_layernorm``) ``"<layer>.self_attn"``,
      and the MLP sublayer (its projections and ``post_attention_layernorm``; Gemma-2/3:
      ``pre_feedforward_layernorm`` and ``post_feedforward_layernorm``) ``"<layer>.mlp"``;
    * ``whole_layer``: the whole decoder layer, ``"<layer>"``, for layers with a dense MLP.

    ``base_level`` and ``kv_head`` are :class:`~group_prox.hierarchy.GroupTable` objects (arrays of
    rows per head and neuron: a 7B-parameter decoder's ~350,000 groups build in about a second).
    A sparse (MoE) MLP gets no groups here: its attention's groups still apply.
    """
    base: list[GroupTable] = []
    kv: list[GroupTable] = []
    sub: dict[str, list[Member]] = {}
    whole: dict[str, list[Member]] = {}
    caller = "transformer()"
    for name, layer in decoder_layers(model):
        attn_norms, mlp_norms = _norms(layer)
        found = _attention_of(name, layer, caller)
        if found is not None:
            attn, lay = found
            a = _join(name, "self_attn")
            heads, kv_heads = _attention_tables(a, attn, lay)
            base.append(heads)
            kv.append(kv_heads)
            sub[a] = [*attn.parameters(), *(p for n in attn_norms for p in n.parameters())]
        mlp = _dense_mlp(name, layer, caller)
        if mlp is not None:
            m = _join(name, "mlp")
            base.append(_neuron_table(m, mlp))
            sub[m] = [*mlp.parameters(), *(p for n in mlp_norms for p in n.parameters())]
        dense = mlp is not None or isinstance(getattr(layer, "mlp", None), HFZeroMLP)
        params = list(layer.parameters())
        if dense and params and name:
            whole[name] = params
    out = {
        "base_level": GroupTable.concat(base),
        "kv_head": GroupTable.concat(kv),
        "layer": sub,
        "whole_layer": whole,
    }
    return {k: v for k, v in out.items() if len(v)}


# --------------------------------------------------------------------------------------------
# Replacements


def _no_args(args: Mapping[str, Any], kind: str) -> None:
    if args:
        raise ValueError(f"a {kind!r} replacement takes no args, got keys {sorted(args)!r}.")


def _check_keys(args: Mapping[str, Any], keys: set[str], kind: str) -> None:
    if set(args) != keys:
        raise ValueError(
            f"{kind!r} args must have exactly the keys {sorted(keys)}, got {sorted(args)}."
        )


@register_replacement("hf_decoder_attention_heads")
def _attention_heads(attn: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    """Keep query heads ``args["q_heads"]`` and kv heads ``args["kv_heads"]`` (indices in the
    attention as it is) of a ``transformers`` attention, in place."""
    kind = "hf_decoder_attention_heads"
    if not _hf_class(attn, _ATTENTIONS):
        raise TypeError(f"{kind!r} applies to a transformers attention, not {type(attn).__name__}.")
    lay, q, kv, new_map = _kept_heads(attn, args, kind)
    hd = lay.head_dim

    def rows(heads: Sequence[int]) -> list[int]:
        return [h * hd + d for h in heads for d in range(hd)]

    keep_outputs(attn.q_proj, rows(q), "q_proj")
    keep_inputs(attn.o_proj, rows(q), "o_proj")
    k, v = _plain_linear(attn.k_proj), _plain_linear(attn.v_proj)
    keep_outputs(k, rows(kv), "k_proj")
    keep_outputs(v, rows(kv), "v_proj")
    r = len(q) // len(kv)
    if len(q) == r * len(kv) and new_map == [i // r for i in range(len(q))]:
        attn.k_proj, attn.v_proj = k, v
        attn.num_key_value_groups = r
    else:
        attn.k_proj, attn.v_proj = (
            HeadGatherLinear(k, hd, new_map),
            HeadGatherLinear(v, hd, new_map),
        )
        attn.num_key_value_groups = 1
    return attn


def _kept_heads(
    attn: nn.Module, args: Mapping[str, Any], kind: str
) -> tuple[_Layout, tuple[int, ...], tuple[int, ...], list[int]]:
    """The layout, the kept query and kv heads of ``args`` (validated) and, per kept query head,
    the position among the kept kv heads of the kv head it reads."""
    _check_keys(args, {"q_heads", "kv_heads"}, kind)
    lay = _layout(attn, type(attn).__name__)
    q = indices(args["q_heads"], "args['q_heads']")
    kv = indices(args["kv_heads"], "args['kv_heads']")
    if not q or not kv or q[-1] >= lay.q_heads or kv[-1] >= lay.kv_heads:
        raise ValueError(
            f"{kind!r}: q_heads must be non-empty in [0, {lay.q_heads}) and kv_heads in "
            f"[0, {lay.kv_heads}), got {list(q)} and {list(kv)}."
        )
    pos = {j: i for i, j in enumerate(kv)}
    if any(lay.kv_of_q[h] not in pos for h in q):
        raise ValueError(f"{kind!r}: a kept query head reads a kv head not in kv_heads {list(kv)}.")
    return lay, q, kv, [pos[lay.kv_of_q[h]] for h in q]


@register_replacement("hf_decoder_fused_attention_heads")
def _fused_attention_heads(attn: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    """Keep query heads ``args["q_heads"]`` and kv heads ``args["kv_heads"]`` (indices in the
    attention as it is) of a fused-``qkv_proj`` attention: a :class:`FusedQKVAttention` holding
    its sliced ``qkv_proj``/``o_proj``."""
    kind = "hf_decoder_fused_attention_heads"
    if not _is_fused_attention(attn):
        raise TypeError(
            f"{kind!r} applies to a transformers attention with a fused qkv_proj, not "
            f"{type(attn).__name__}."
        )
    lay, q, kv, new_map = _kept_heads(attn, args, kind)
    hd = lay.head_dim

    def rows(part: str, heads: Sequence[int]) -> list[int]:
        out: list[int] = []
        for h in heads:
            r = _head_rows(attn, lay, part, h)[1]
            out += range(r.start, r.stop)
        return out

    keep_outputs(attn.qkv_proj, rows("q", q) + rows("k", kv) + rows("v", kv), "qkv_proj")
    keep_inputs(attn.o_proj, [h * hd + d for h in q for d in range(hd)], "o_proj")
    return FusedQKVAttention(attn, len(q), len(kv), new_map)


@register_replacement("hf_zero_attention")
def _zero_attention(attn: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    _no_args(args, "hf_zero_attention")
    layer_idx = getattr(attn, "layer_idx", None)
    if not _is_attention(attn) or not isinstance(layer_idx, int):
        raise TypeError(
            f"'hf_zero_attention' applies to a transformers attention with a layer_idx, not "
            f"{type(attn).__name__}."
        )
    return HFZeroAttention(layer_idx)


@register_replacement("hf_zero_mlp")
def _zero_mlp(mlp: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    _no_args(args, "hf_zero_mlp")
    if not _hf_class(mlp, _MLPS | _FUSED_MLPS):
        raise TypeError(
            f"'hf_zero_mlp' applies to a transformers gated MLP, not {type(mlp).__name__}."
        )
    return HFZeroMLP()


# --------------------------------------------------------------------------------------------
# Planning


def _zero_or_none(bias: Tensor | None) -> bool:
    return bias is None or not bool(bias.detach().any())


@torch.no_grad()
def dead_query_heads(attn: nn.Module, lay: _Layout) -> Tensor:
    """Query heads contributing exactly 0 (bool over heads): zero ``o_proj`` columns, or zero
    values of the kv head they read."""
    hd = lay.head_dim
    w_o = attn.o_proj.weight.detach()
    dead = (w_o.reshape(w_o.shape[0], lay.q_heads, hd) == 0).all(-1).all(0)
    v_zero = torch.zeros(lay.kv_heads, dtype=torch.bool, device=w_o.device)
    for j in range(lay.kv_heads):
        v, rows = _head_rows(attn, lay, "v", j)
        zero = not bool(v.weight.detach()[rows].any())
        v_zero[j] = zero and (v.bias is None or not bool(v.bias.detach()[rows].any()))
    return (dead | v_zero[torch.tensor(lay.kv_of_q, dtype=torch.long, device=v_zero.device)]).cpu()


def _attention_ops(name: str, attn: nn.Module, lay: _Layout, multiple: int) -> list[Op]:
    dead = dead_query_heads(attn, lay)
    if bool(dead.all()):
        if _zero_or_none(attn.o_proj.bias):
            return [ReplaceOp(name, "hf_zero_attention", {})]
        keep_q = [0]  # the output is o_proj's bias: keep the smallest attention
    else:
        keep_q = [h for h in range(lay.q_heads) if not dead[h]]
        target = min(lay.q_heads, -(-len(keep_q) // multiple) * multiple)
        if len(keep_q) < target:
            # Pad with dead heads reading kv heads that stay, then any.
            stay = {lay.kv_of_q[h] for h in keep_q}
            spare = sorted(
                (h for h in range(lay.q_heads) if dead[h]),
                key=lambda h: (lay.kv_of_q[h] not in stay, h),
            )
            keep_q = sorted(keep_q + spare[: target - len(keep_q)])
    keep_kv = sorted({lay.kv_of_q[h] for h in keep_q})
    if len(keep_q) == lay.q_heads and len(keep_kv) == lay.kv_heads:
        return []
    kind = "hf_decoder_fused_attention_heads" if lay.fused else "hf_decoder_attention_heads"
    return [ReplaceOp(name, kind, {"q_heads": keep_q, "kv_heads": keep_kv})]


@torch.no_grad()
def dead_neurons(mlp: nn.Module) -> Tensor:
    """MLP neurons contributing exactly 0 (bool): zero column of ``down_proj``, or zero row of
    ``up_proj`` (and its bias); for a fused ``gate_up_proj``, its up half."""
    dead = (mlp.down_proj.weight.detach() == 0).all(0)
    n = dead.numel()
    if _hf_class(mlp, _FUSED_MLPS):
        up, rows = mlp.gate_up_proj, slice(n, 2 * n)
    else:
        up, rows = mlp.up_proj, slice(0, n)
    up_zero = (up.weight.detach()[rows] == 0).all(1)
    if up.bias is not None:
        up_zero &= up.bias.detach()[rows] == 0
    return (dead | up_zero).cpu()


def _mlp_ops(name: str, mlp: nn.Module, multiple: int) -> list[Op]:
    dead = dead_neurons(mlp)
    if bool(dead.all()) and _zero_or_none(mlp.down_proj.bias):
        return [ReplaceOp(name, "hf_zero_mlp", {})]
    keep = tuple(kept_indices(dead, multiple))
    if len(keep) == dead.numel():
        return []
    if _hf_class(mlp, _FUSED_MLPS):
        n = dead.numel()
        return [
            SliceOp(_join(name, "gate_up_proj"), "out", keep + tuple(n + i for i in keep)),
            SliceOp(_join(name, "down_proj"), "in", keep),
        ]
    return [
        SliceOp(_join(name, "gate_proj"), "out", keep),
        SliceOp(_join(name, "up_proj"), "out", keep),
        SliceOp(_join(name, "down_proj"), "in", keep),
    ]


def plan(model: nn.Module, multiple: int = 1) -> list[Op]:
    """Operations removing the dead query heads, kv heads, MLP neurons and whole sublayers of the
    recognised decoder layers (see the module docstring). Head and neuron counts are rounded up
    to a multiple of ``multiple`` by keeping dead ones."""
    ops: list[Op] = []
    caller = "compress()"
    for name, layer in decoder_layers(model):
        if not name:
            continue  # a plan cannot replace the model itself; its sublayers can be
        found = _attention_of(name, layer, caller)
        if found is not None:
            ops += _attention_ops(_join(name, "self_attn"), *found, multiple)
        mlp = _dense_mlp(name, layer, caller)
        if mlp is not None:
            ops += _mlp_ops(_join(name, "mlp"), mlp, multiple)
    return ops


HF_DECODER = register_family(
    Family(
        name="hf-decoder",
        builder="transformer",
        description=(
            "Hugging Face decoder layers with q/k/v/o attention and a gated MLP (Llama, Mistral, "
            "Qwen2, Qwen3, Gemma, Gemma-2, Gemma-3, Phi-3; the attention of Mixtral, Qwen2-MoE, "
            "Qwen3-MoE)"
        ),
        applies=applies,
        levels=levels,
        plan=lambda model, multiple: plan(model, multiple),
    )
)
