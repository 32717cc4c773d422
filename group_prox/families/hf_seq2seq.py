"""Hugging Face encoder-decoder transformers: T5 and BART (levels and compression).

Recognised modules (exact ``transformers`` classes, found by class name and module, so that
importing group_prox never imports ``transformers``):

* **BART** (``BartEncoderLayer``, ``BartDecoderLayer``, as in ``BartModel``,
  ``BartForConditionalGeneration``), post-norm: ``LayerNorm(x + self_attn(x))``, in decoder layers
  ``LayerNorm(x + encoder_attn(x, enc))``, then ``LayerNorm(x + fc2(act(fc1(x))))``;
* **T5** (``T5LayerSelfAttention``, ``T5LayerCrossAttention``, ``T5LayerFF`` of the blocks of
  ``T5Model``, ``T5ForConditionalGeneration``, ``T5EncoderModel``), pre-norm:
  ``x + SelfAttention(layer_norm(x))``, ``x + EncDecAttention(layer_norm(x), enc)``,
  ``x + DenseReluDense(layer_norm(x))`` (``wo(act(wi(·)))``, or gated ``wo(act(wi_0(·)) · wi_1(·))``
  for T5 v1.1).

Levels (group names are module names plus a suffix):

* ``base_level``: each head ``h`` of every self- and cross-attention (its rows of the query, key and
  value projections and their biases, its columns of the output projection),
  ``"<attention>.head[h]"`` (``"model.decoder.layers.0.encoder_attn.head[2]"``,
  ``"decoder.block.0.layer.1.EncDecAttention.head[2]"``); each feed-forward neuron ``i`` (row ``i``
  of ``fc1`` and its bias, or of ``wi`` / ``wi_0`` and ``wi_1``; column ``i`` of ``fc2`` / ``wo``):
  BART ``"<layer>.mlp[i]"``, T5 ``"<T5LayerFF>.DenseReluDense[i]"``;
* ``layer``: each attention and feed-forward sublayer: BART ``"<layer>.self_attn"``,
  ``"<layer>.encoder_attn"``, ``"<layer>.mlp"`` (projections and biases; the LayerNorms come after
  the residual addition: trunk, in no group); T5 the sublayer module itself,
  ``"encoder.block.0.layer.0"`` … (projections and its pre-norm ``layer_norm``).

T5's ``relative_attention_bias`` (held by the first block's self-attention of each stack) gives the
position bias that every layer of the stack adds to its attention scores, per head: it is shared
by all layers, so it is in no group (like the embeddings) and is never removed.

Compression (exact in ``eval()`` mode for finite activations, with or without the KV cache):

* a head is dead when its output-projection columns are 0, or its values are identically 0 (value
  rows and bias): its q/k/v rows and output columns are sliced away. BART's attention reshapes
  with ``-1`` heads, so only its ``num_heads`` is updated (``"hf_seq2seq_bart_heads"``). T5 passes
  the position bias ``[batch, n_heads, q, k]`` computed by the first layer to the later layers, so
  a T5 attention losing heads becomes :class:`T5PrunedAttention` (``"hf_seq2seq_t5_heads"``): the
  same computation, which receives and returns the position bias with all of the stack's heads
  and adds to its scores the rows of its kept heads; layers may then keep different heads;
* a neuron is dead when its column of ``fc2``/``wo`` is 0 (or, gated T5, its row of ``wi_1``):
  sliced away;
* an attention with no live head outputs its output bias: BART's becomes
  :class:`BartRemovedAttention` (that bias, or 0), T5's :class:`T5RemovedAttention` (0; it still
  computes and returns the stack's position bias when it is the first layer's, and its
  ``layer_norm`` becomes ``nn.Identity``); both still record the tokens' length in the KV cache, so
  that cached sequence lengths stay right. A feed-forward with no live neuron: BART's ``fc1``
  becomes an :class:`EmptyLinear` (zero-width output) and ``fc2`` a :class:`BiasOnlyLinear` (its
  bias, or 0); T5's ``DenseReluDense`` a :class:`T5RemovedFF` (0) and its ``layer_norm`` an
  ``nn.Identity``.

Left alone (with a warning): layouts not understood inside a recognised layer. Subclasses and other
encoder-decoder architectures (mBART, Marian, Pegasus, mT5 …) are not recognised.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..compression.plan import Op, ReplaceOp, SliceOp, indices, integer, register_replacement
from ..compression.surgery import kept_indices
from ..hierarchy.core import Member
from .registry import Family, register_family

__all__ = [
    "BartRemovedAttention",
    "BiasOnlyLinear",
    "EmptyLinear",
    "T5PrunedAttention",
    "T5RemovedAttention",
    "T5RemovedFF",
    "applies",
    "levels",
    "plan",
]

_BART = "transformers.models.bart."
_T5 = "transformers.models.t5."
_BART_LAYERS = frozenset({"BartEncoderLayer", "BartDecoderLayer"})
_T5_SUBLAYERS = frozenset({"T5LayerSelfAttention", "T5LayerCrossAttention", "T5LayerFF"})


def _is(module: object, names: str | frozenset[str], prefix: str) -> bool:
    cls = type(module)
    names = frozenset({names}) if isinstance(names, str) else names
    return cls.__name__ in names and cls.__module__.startswith(prefix)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _linear(module: object) -> bool:
    return type(module) is nn.Linear


def _zero(t: Tensor | None) -> bool:
    return t is None or not bool(t.detach().any())


# --------------------------------------------------------------------------------------------
# KV cache and T5 position bias


def _record_length(module: nn.Module, cache: Any, hidden: Tensor, kv: Tensor | None, kw) -> None:
    """Add one zero key/value channel per token of a removed attention to its layer's cache, as
    the attention would have added its keys and values: the cache's sequence lengths (which the
    model reads to place new positions and build masks) stay right."""
    layer_idx = getattr(module, "layer_idx", None)
    if cache is None or layer_idx is None:
        return
    cross = kv is not None
    if hasattr(cache, "self_attention_cache"):  # EncoderDecoderCache
        if cross:
            if cache.is_updated.get(layer_idx):
                return
            z = kv.new_zeros(kv.shape[0], 1, kv.shape[1], 1)
            cache.cross_attention_cache.update(z, z, layer_idx, kwargs=kw)
            cache.is_updated[layer_idx] = True
            return
        cache = cache.self_attention_cache
    elif cross:
        return
    z = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
    cache.update(z, z, layer_idx, kwargs=kw)


def _past_length(cache: Any, layer_idx: int | None) -> Any:
    if cache is None:
        return 0
    past = cache.get_seq_length(layer_idx)
    return past.clone() if isinstance(past, Tensor) else past


def _relative_bias(module: nn.Module, q_len: int, k_len: int, device: Any, past: Any) -> Tensor:
    """T5's relative position bias ``[1, heads, q_len, k_len]`` (``T5Attention.compute_bias``)."""
    from transformers.models.t5.modeling_t5 import T5Attention

    context = torch.arange(q_len, dtype=torch.long, device=device)[:, None] + past
    memory = torch.arange(k_len, dtype=torch.long, device=device)[None, :]
    bucket = T5Attention._relative_position_bucket(
        memory - context,
        bidirectional=not module.is_decoder,
        num_buckets=module.relative_attention_num_buckets,
        max_distance=module.relative_attention_max_distance,
    )
    return module.relative_attention_bias(bucket).permute([2, 0, 1]).unsqueeze(0)


def _stack_bias(module: nn.Module, q: Tensor, q_len: int, k_len: int, past: Any) -> Tensor:
    """The position bias with all of the stack's heads, as the first layer computes it."""
    if module.has_relative_attention_bias:
        return _relative_bias(module, q_len, k_len, q.device, past)
    return torch.zeros((1, module.total_heads, q_len, k_len), device=q.device, dtype=q.dtype)


_T5_FIELDS = (
    "config",
    "is_decoder",
    "is_causal",
    "has_relative_attention_bias",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "d_model",
    "key_value_proj_dim",
    "dropout",
    "scaling",
    "layer_idx",
)


def _total_heads(attn: nn.Module) -> int:
    """The head count of the position bias of ``attn``'s stack."""
    total = getattr(attn, "total_heads", None)
    return int(total if total is not None else attn.n_heads)


# --------------------------------------------------------------------------------------------
# Replacement modules


class T5PrunedAttention(nn.Module):
    """A T5 attention keeping the heads ``heads`` (indices among the stack's ``total_heads``).

    The same computation as ``T5Attention`` (eager or SDPA, with or without cache) on the kept
    heads. The position bias it receives, computes (first layer: ``relative_attention_bias``, kept
    whole) and returns has all of the stack's heads, so the layers of a stack may keep different
    heads; its own scores get the rows of its kept heads. ``q``/``k``/``v``/``o`` (and
    ``relative_attention_bias``) keep their names, so ``state_dict`` keys do not change; the head
    index is not saved (it comes from the plan)."""

    def __init__(self, attn: nn.Module, heads: Sequence[int]) -> None:
        super().__init__()
        for name in _T5_FIELDS:
            setattr(self, name, getattr(attn, name))
        self.q, self.k, self.v, self.o = attn.q, attn.k, attn.v, attn.o
        if self.has_relative_attention_bias:
            self.relative_attention_bias = attn.relative_attention_bias
        self.gradient_checkpointing = getattr(attn, "gradient_checkpointing", False)
        self.total_heads = _total_heads(attn)
        self.heads = tuple(heads)
        self.n_heads = len(self.heads)
        self.inner_dim = self.n_heads * self.key_value_proj_dim
        idx = torch.tensor(self.heads, dtype=torch.long, device=attn.q.weight.device)
        self.register_buffer("head_index", idx, persistent=False)
        self.train(attn.training)

    def extra_repr(self) -> str:
        return f"heads={list(self.heads)}, total_heads={self.total_heads}"

    def _local(self, bias: Tensor) -> Tensor:
        if bias.shape[1] == 1:
            return bias
        if bias.shape[1] != self.total_heads:
            raise ValueError(
                f"T5PrunedAttention: the position bias has {bias.shape[1]} heads, expected "
                f"{self.total_heads} (the stack's) or 1."
            )
        idx = self.head_index
        if idx.device != bias.device or idx.is_meta:
            idx = torch.tensor(self.heads, dtype=torch.long, device=bias.device)
        return bias.index_select(1, idx)

    def forward(
        self,
        hidden_states: Tensor,
        mask: Tensor | None = None,
        key_value_states: Tensor | None = None,
        position_bias: Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor, Any]:
        from transformers.models.t5 import modeling_t5

        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hd = self.key_value_proj_dim
        past = _past_length(cache, self.layer_idx)
        cross = key_value_states is not None
        query = self.q(hidden_states).view(*input_shape, -1, hd).transpose(1, 2)
        is_updated = False
        curr = cache
        if hasattr(cache, "self_attention_cache"):
            is_updated = cache.is_updated.get(self.layer_idx)
            curr = cache.cross_attention_cache if cross else cache.self_attention_cache
        current = key_value_states if cross else hidden_states
        if cross and cache is not None and is_updated:
            key = curr.layers[self.layer_idx].keys
            value = curr.layers[self.layer_idx].values
        else:
            kv_shape = (*current.shape[:-1], -1, hd)
            key = self.k(current).view(kv_shape).transpose(1, 2)
            value = self.v(current).view(kv_shape).transpose(1, 2)
            if cache is not None:
                key, value = curr.update(key, value, self.layer_idx, kwargs=kwargs)
                if cross and hasattr(cache, "self_attention_cache"):
                    cache.is_updated[self.layer_idx] = True
        if position_bias is None:
            position_bias = _stack_bias(self, query, input_shape[1], key.shape[-2], past)
        interface = modeling_t5.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling_t5.eager_attention_forward
        )
        out, weights = interface(
            self,
            query,
            key,
            value,
            mask,
            dropout=0.0 if not self.training else self.dropout,
            scaling=self.scaling,
            position_bias=self._local(position_bias),
            **kwargs,
        )
        out = self.o(out.reshape(*input_shape, -1).contiguous())
        return out, position_bias, weights


class T5RemovedAttention(nn.Module):
    """A T5 attention with no live head: outputs 0. The first layer's self-attention keeps its
    ``relative_attention_bias`` and still returns the stack's position bias (the other layers add
    it to their scores); any other returns the bias it is given, or zeros with the stack's heads.
    Given a cache, it records the tokens' length for its layer."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.layer_idx = attn.layer_idx
        self.is_decoder = attn.is_decoder
        self.has_relative_attention_bias = attn.has_relative_attention_bias
        self.relative_attention_num_buckets = attn.relative_attention_num_buckets
        self.relative_attention_max_distance = attn.relative_attention_max_distance
        if self.has_relative_attention_bias:
            self.relative_attention_bias = attn.relative_attention_bias
        self.total_heads = _total_heads(attn)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, total_heads={self.total_heads}"

    def forward(
        self,
        hidden_states: Tensor,
        mask: Tensor | None = None,
        key_value_states: Tensor | None = None,
        position_bias: Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor, None]:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        past = _past_length(cache, self.layer_idx)
        _record_length(self, cache, hidden_states, key_value_states, kwargs)
        q_len = hidden_states.shape[1]
        k_len = key_value_states.shape[1] if key_value_states is not None else past + q_len
        if position_bias is None:
            position_bias = _stack_bias(self, hidden_states, q_len, k_len, past)
        return torch.zeros_like(hidden_states), position_bias, None


class T5RemovedFF(nn.Module):
    """A T5 ``DenseReluDense`` with no live neuron: outputs 0."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        return torch.zeros_like(hidden_states)


class BartRemovedAttention(nn.Module):
    """A BART attention with no live head: outputs its output bias (kept as ``out_proj.bias``) or
    0, and ``None`` weights, as ``BartAttention`` returns. Given a cache, it records the tokens'
    length for its layer."""

    def __init__(self, attn: nn.Module, has_bias: bool) -> None:
        super().__init__()
        self.layer_idx = attn.layer_idx
        self.embed_dim = attn.out_proj.out_features
        self.has_bias = has_bias
        if has_bias:
            self.out_proj = BiasOnlyLinear(attn.out_proj, True)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, bias={self.has_bias}"

    def forward(
        self,
        hidden_states: Tensor,
        key_value_states: Tensor | None = None,
        cache: Any = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        _record_length(self, cache, hidden_states, key_value_states, kwargs)
        out = hidden_states.new_zeros((*hidden_states.shape[:-1], self.embed_dim))
        if self.has_bias:
            out = out + self.out_proj.bias
        return out, None


class EmptyLinear(nn.Module):
    """A projection with no output left: a zero-width output (what :class:`BiasOnlyLinear`
    reads)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features=0"

    def forward(self, x: Tensor) -> Tensor:
        return x.new_empty((*x.shape[:-1], 0))


class BiasOnlyLinear(nn.Module):
    """A projection with no input left: outputs its bias (``has_bias``, kept as ``bias``) or 0."""

    def __init__(self, linear: nn.Linear, has_bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = 0, linear.out_features
        if has_bias:
            if linear.bias is None:
                raise ValueError(
                    "BiasOnlyLinear: args['bias'] is true but the projection has none."
                )
            self.bias = linear.bias
        else:
            self.bias = None

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: Tensor) -> Tensor:
        out = x.new_zeros((*x.shape[:-1], self.out_features))
        return out if self.bias is None else out + self.bias


# --------------------------------------------------------------------------------------------
# Replacements


def _check_keys(args: Mapping[str, Any], keys: set[str], kind: str) -> None:
    if set(args) != keys:
        raise ValueError(
            f"{kind!r} args must have exactly the keys {sorted(keys)}, got {sorted(args)}."
        )


def _flag(args: Mapping[str, Any], key: str, kind: str) -> bool:
    value = args[key]
    if not isinstance(value, bool):
        raise ValueError(f"{kind!r}: args[{key!r}] must be a bool, got {value!r:.80}.")
    return value


def _is_t5_attention(module: nn.Module) -> bool:
    return _is(module, "T5Attention", _T5) or isinstance(module, T5PrunedAttention)


@register_replacement("hf_seq2seq_bart_heads")
def _bart_heads(attn: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    """Set the head count of a BART attention whose projections were sliced to ``heads`` heads
    (its forward reshapes with ``-1`` heads)."""
    kind = "hf_seq2seq_bart_heads"
    _check_keys(args, {"heads"}, kind)
    if not _is(attn, "BartAttention", _BART):
        raise TypeError(f"{kind!r} applies to a BartAttention, not {type(attn).__name__}.")
    heads = integer(args["heads"], f"{kind!r}: args['heads']", minimum=1)
    width = heads * attn.head_dim
    if not all(p.out_features == width for p in (attn.q_proj, attn.k_proj, attn.v_proj)) or (
        attn.out_proj.in_features != width
    ):
        raise ValueError(f"{kind!r}: the projections do not hold {heads} heads of {attn.head_dim}.")
    attn.num_heads = heads
    return attn


@register_replacement("hf_seq2seq_t5_heads")
def _t5_heads(attn: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    """A T5 attention whose q/k/v/o were sliced to the heads ``args["heads"]`` (indices in the
    attention as it was): a :class:`T5PrunedAttention`."""
    kind = "hf_seq2seq_t5_heads"
    _check_keys(args, {"heads"}, kind)
    if not _is_t5_attention(attn):
        raise TypeError(f"{kind!r} applies to a T5 attention, not {type(attn).__name__}.")
    keep = indices(args["heads"], f"{kind!r}: args['heads']")
    if not keep or keep[-1] >= attn.n_heads:
        raise ValueError(
            f"{kind!r}: heads must be non-empty in [0, {attn.n_heads}), got {list(keep)}."
        )
    width = len(keep) * attn.key_value_proj_dim
    if (
        not all(p.out_features == width for p in (attn.q, attn.k, attn.v))
        or attn.o.in_features != width
    ):
        raise ValueError(
            f"{kind!r}: q/k/v/o do not hold {len(keep)} heads of {attn.key_value_proj_dim}."
        )
    before = getattr(attn, "heads", None) or tuple(range(attn.n_heads))
    return T5PrunedAttention(attn, [before[h] for h in keep])


@register_replacement("hf_seq2seq_t5_removed_attention")
def _t5_removed_attention(attn: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    _check_keys(args, set(), "hf_seq2seq_t5_removed_attention")
    if not _is_t5_attention(attn):
        raise TypeError(
            f"'hf_seq2seq_t5_removed_attention' applies to a T5 attention, not {type(attn).__name__}."
        )
    return T5RemovedAttention(attn)


@register_replacement("hf_seq2seq_t5_removed_ff")
def _t5_removed_ff(ff: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    _check_keys(args, set(), "hf_seq2seq_t5_removed_ff")
    if not _is(ff, frozenset({"T5DenseActDense", "T5DenseGatedActDense"}), _T5):
        raise TypeError(
            f"'hf_seq2seq_t5_removed_ff' applies to a T5 DenseReluDense, not {type(ff).__name__}."
        )
    return T5RemovedFF()


@register_replacement("hf_seq2seq_unused_norm")
def _unused_norm(norm: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    """The pre-norm feeding a removed T5 sublayer: the sublayer reads only its shape."""
    _check_keys(args, set(), "hf_seq2seq_unused_norm")
    if not _is(norm, "T5LayerNorm", _T5):
        raise TypeError(
            f"'hf_seq2seq_unused_norm' applies to a T5LayerNorm, not {type(norm).__name__}."
        )
    return nn.Identity()


@register_replacement("hf_seq2seq_bart_removed_attention")
def _bart_removed_attention(attn: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    kind = "hf_seq2seq_bart_removed_attention"
    _check_keys(args, {"bias"}, kind)
    if not _is(attn, "BartAttention", _BART):
        raise TypeError(f"{kind!r} applies to a BartAttention, not {type(attn).__name__}.")
    has_bias = _flag(args, "bias", kind)
    if has_bias and attn.out_proj.bias is None:
        raise ValueError(f"{kind!r}: args['bias'] is true but out_proj has no bias.")
    return BartRemovedAttention(attn, has_bias)


@register_replacement("hf_seq2seq_empty_linear")
def _empty_linear(linear: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    _check_keys(args, set(), "hf_seq2seq_empty_linear")
    if not _linear(linear):
        raise TypeError(
            f"'hf_seq2seq_empty_linear' applies to an nn.Linear, not {type(linear).__name__}."
        )
    return EmptyLinear(linear.in_features)


@register_replacement("hf_seq2seq_bias_only")
def _bias_only(linear: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    kind = "hf_seq2seq_bias_only"
    _check_keys(args, {"bias"}, kind)
    if not _linear(linear):
        raise TypeError(f"{kind!r} applies to an nn.Linear, not {type(linear).__name__}.")
    has_bias = _flag(args, "bias", kind)
    if has_bias and linear.bias is None:
        raise ValueError(f"{kind!r}: args['bias'] is true but the projection has no bias.")
    return BiasOnlyLinear(linear, has_bias)


# --------------------------------------------------------------------------------------------
# Layout


@dataclass
class _Attention:
    group: str  # the sublayer group's name
    path: str  # the attention module
    module: nn.Module
    proj: tuple[str, str, str, str]  # q, k, v, o attribute names
    head_dim: int
    heads: int
    t5: bool
    norm: str | None = None  # T5's pre-norm (module path)
    norm_module: nn.Module | None = None

    def linears(self) -> list[nn.Linear]:
        return [getattr(self.module, n) for n in self.proj]


@dataclass
class _FeedForward:
    group: str
    neuron: str  # prefix of the neuron groups' names
    ins: list[str]  # paths of the projections whose rows are the neurons (wi or wi_0, wi_1; fc1)
    out: str  # path of the projection whose columns are the neurons (wo; fc2)
    modules: dict[str, nn.Linear] = field(default_factory=dict)
    t5: bool = False
    gated: bool = False
    ff: str | None = None  # T5's DenseReluDense path
    norm: str | None = None
    norm_module: nn.Module | None = None


def _warn(caller: str, where: str, what: str) -> None:
    warnings.warn(
        f"{caller}: {where} is {what}, not a layout this family knows; it is left alone.",
        stacklevel=4,
    )


def _attention(group: str, path: str, attn: Any, caller: str, t5: bool) -> _Attention | None:
    if isinstance(attn, T5RemovedAttention | BartRemovedAttention):
        return None
    known = _is_t5_attention(attn) if t5 else _is(attn, "BartAttention", _BART)
    if not known:
        _warn(caller, path, f"a {type(attn).__name__}")
        return None
    proj = ("q", "k", "v", "o") if t5 else ("q_proj", "k_proj", "v_proj", "out_proj")
    q, k, v, o = (getattr(attn, n, None) for n in proj)
    hd = attn.key_value_proj_dim if t5 else attn.head_dim
    heads = attn.n_heads if t5 else attn.num_heads
    ok = (
        all(_linear(p) for p in (q, k, v, o))
        and isinstance(hd, int)
        and hd > 0
        and q.out_features == k.out_features == v.out_features == o.in_features == heads * hd
        and k.in_features == v.in_features
    )
    if not ok:
        _warn(caller, path, "an attention whose projections do not match its heads")
        return None
    return _Attention(group, path, attn, proj, hd, heads, t5)


def _bart_ff(name: str, layer: nn.Module, caller: str) -> _FeedForward | None:
    fc1, fc2 = getattr(layer, "fc1", None), getattr(layer, "fc2", None)
    if isinstance(fc1, EmptyLinear) and isinstance(fc2, BiasOnlyLinear):
        return None
    if not (_linear(fc1) and _linear(fc2) and fc1.out_features == fc2.in_features):
        _warn(caller, _join(name, "fc1/fc2"), "not two nn.Linear of matching width")
        return None
    p1, p2 = _join(name, "fc1"), _join(name, "fc2")
    return _FeedForward(_join(name, "mlp"), _join(name, "mlp"), [p1], p2, {p1: fc1, p2: fc2})


def _t5_ff(name: str, sub: nn.Module, caller: str) -> _FeedForward | None:
    dense = getattr(sub, "DenseReluDense", None)
    path = _join(name, "DenseReluDense")
    if isinstance(dense, T5RemovedFF):
        return None
    gated = _is(dense, "T5DenseGatedActDense", _T5)
    if not (gated or _is(dense, "T5DenseActDense", _T5)):
        _warn(caller, path, f"a {type(dense).__name__}")
        return None
    ins = ["wi_0", "wi_1"] if gated else ["wi"]
    mods = {_join(path, n): getattr(dense, n, None) for n in [*ins, "wo"]}
    wo = mods[_join(path, "wo")]
    if not all(_linear(m) for m in mods.values()) or not all(
        mods[_join(path, n)].out_features == wo.in_features for n in ins
    ):
        _warn(caller, path, "a feed-forward whose projections do not match")
        return None
    norm = sub.layer_norm
    if not _is(norm, "T5LayerNorm", _T5):
        _warn(caller, _join(name, "layer_norm"), f"a {type(norm).__name__}")
        return None
    return _FeedForward(
        name, path, [_join(path, n) for n in ins], _join(path, "wo"), mods, True, gated, path,
        _join(name, "layer_norm"), norm,
    )  # fmt: skip


def _sublayers(model: nn.Module, caller: str) -> tuple[list[_Attention], list[_FeedForward]]:
    """The recognised attention and feed-forward sublayers of ``model`` that are left to handle."""
    attns: list[_Attention] = []
    ffs: list[_FeedForward] = []
    if sys.modules.get("transformers") is None:
        return attns, ffs
    for name, m in model.named_modules():
        if _is(m, _BART_LAYERS, _BART):
            for attr in ("self_attn", "encoder_attn"):
                if attr == "encoder_attn" and not hasattr(m, attr):
                    continue
                path = _join(name, attr)
                a = _attention(path, path, getattr(m, attr, None), caller, t5=False)
                if a is not None:
                    attns.append(a)
            f = _bart_ff(name, m, caller)
            if f is not None:
                ffs.append(f)
        elif _is(m, _T5_SUBLAYERS, _T5):
            if type(m).__name__ == "T5LayerFF":
                f = _t5_ff(name, m, caller)
                if f is not None:
                    ffs.append(f)
                continue
            attr = (
                "SelfAttention" if type(m).__name__ == "T5LayerSelfAttention" else "EncDecAttention"
            )
            path = _join(name, attr)
            inner = getattr(m, attr, None)
            if isinstance(inner, T5RemovedAttention):
                continue
            a = _attention(name, path, inner, caller, t5=True)
            if a is None:
                continue
            if not _is(m.layer_norm, "T5LayerNorm", _T5):
                _warn(caller, _join(name, "layer_norm"), f"a {type(m.layer_norm).__name__}")
                continue
            a.norm, a.norm_module = _join(name, "layer_norm"), m.layer_norm
            attns.append(a)
    return attns, ffs


# --------------------------------------------------------------------------------------------
# Levels


def _rows(linear: nn.Linear, rows: slice) -> list[Member]:
    members: list[Member] = [(linear.weight, 0, rows)]
    if linear.bias is not None:
        members.append((linear.bias, 0, rows))
    return members


def levels(model: nn.Module) -> dict[str, dict[str, list[Member]]]:
    """The levels of the module docstring (frozen parameters included)."""
    base: dict[str, list[Member]] = {}
    sub: dict[str, list[Member]] = {}
    attns, ffs = _sublayers(model, "transformer()")
    for a in attns:
        q, k, v, o = a.linears()
        hd = a.head_dim
        for h in range(a.heads):
            rows = slice(h * hd, (h + 1) * hd)
            members = [*_rows(q, rows), *_rows(k, rows), *_rows(v, rows), (o.weight, 1, rows)]
            base[f"{a.path}.head[{h}]"] = members
        params = [t for lin in (q, k, v, o) for t in lin.parameters()]
        if a.norm_module is not None:
            params += list(a.norm_module.parameters())
        sub[a.group] = params
    for f in ffs:
        ins = [f.modules[p] for p in f.ins]
        out = f.modules[f.out]
        for i in range(out.in_features):
            members = [m for lin in ins for m in _rows(lin, slice(i, i + 1))]
            base[f"{f.neuron}[{i}]"] = [*members, (out.weight, 1, slice(i, i + 1))]
        params = [t for lin in (*ins, out) for t in lin.parameters()]
        if f.norm_module is not None:
            params += list(f.norm_module.parameters())
        sub[f.group] = params
    out_levels = {"base_level": base, "layer": sub}
    return {k: v for k, v in out_levels.items() if v}


# --------------------------------------------------------------------------------------------
# Planning


@torch.no_grad()
def dead_heads(a: _Attention) -> Tensor:
    """Heads contributing exactly 0 (bool over heads): zero output columns, or zero values (rows
    and bias)."""
    _, _, v, o = a.linears()
    out_zero = (o.weight.detach().reshape(o.out_features, a.heads, a.head_dim) == 0).all(-1).all(0)
    v_zero = (v.weight.detach().reshape(a.heads, -1) == 0).all(-1)
    if v.bias is not None:
        v_zero &= (v.bias.detach().reshape(a.heads, a.head_dim) == 0).all(-1)
    return (out_zero | v_zero).cpu()


@torch.no_grad()
def dead_neurons(f: _FeedForward) -> Tensor:
    """Neurons contributing exactly 0 (bool): zero column of ``fc2``/``wo`` or, gated, zero row of
    ``wi_1``."""
    dead = (f.modules[f.out].weight.detach() == 0).all(0)
    if f.gated:
        wi_1 = f.modules[f.ins[1]]
        up_zero = (wi_1.weight.detach() == 0).all(1)
        if wi_1.bias is not None:
            up_zero &= wi_1.bias.detach() == 0
        dead |= up_zero
    return dead.cpu()


def _attention_ops(a: _Attention, multiple: int) -> list[Op]:
    dead = dead_heads(a)
    o = a.linears()[3]
    if bool(dead.all()):
        if a.t5 and _zero(o.bias):
            return [
                ReplaceOp(a.path, "hf_seq2seq_t5_removed_attention", {}),
                ReplaceOp(a.norm, "hf_seq2seq_unused_norm", {}),
            ]
        if not a.t5:
            args = {"bias": not _zero(o.bias)}
            return [ReplaceOp(a.path, "hf_seq2seq_bart_removed_attention", args)]
    keep = kept_indices(dead, multiple)
    if len(keep) == a.heads:
        return []
    hd = a.head_dim
    rows = tuple(h * hd + j for h in keep for j in range(hd))
    ops: list[Op] = [SliceOp(_join(a.path, n), "out", rows) for n in a.proj[:3]]
    ops.append(SliceOp(_join(a.path, a.proj[3]), "in", rows))
    if a.t5:
        ops.append(ReplaceOp(a.path, "hf_seq2seq_t5_heads", {"heads": list(keep)}))
    else:
        ops.append(ReplaceOp(a.path, "hf_seq2seq_bart_heads", {"heads": len(keep)}))
    return ops


def _ff_ops(f: _FeedForward, multiple: int) -> list[Op]:
    dead = dead_neurons(f)
    out = f.modules[f.out]
    if bool(dead.all()):
        if f.t5 and _zero(out.bias):
            return [
                ReplaceOp(f.ff, "hf_seq2seq_t5_removed_ff", {}),
                ReplaceOp(f.norm, "hf_seq2seq_unused_norm", {}),
            ]
        if not f.t5:
            return [
                ReplaceOp(f.ins[0], "hf_seq2seq_empty_linear", {}),
                ReplaceOp(f.out, "hf_seq2seq_bias_only", {"bias": not _zero(out.bias)}),
            ]
    keep = tuple(kept_indices(dead, multiple))
    if len(keep) == dead.numel():
        return []
    return [*(SliceOp(p, "out", keep) for p in f.ins), SliceOp(f.out, "in", keep)]


def plan(model: nn.Module, multiple: int = 1) -> list[Op]:
    """Operations removing the dead heads, neurons and sublayers of the recognised layers (see the
    module docstring). Head and neuron counts are rounded up to a multiple of ``multiple`` by
    keeping dead ones."""
    attns, ffs = _sublayers(model, "compress()")
    ops: list[Op] = []
    for a in attns:
        ops += _attention_ops(a, multiple)
    for f in ffs:
        ops += _ff_ops(f, multiple)
    return ops


def applies(model: nn.Module) -> bool:
    """Whether ``model`` holds a recognised BART layer or T5 sublayer."""
    if sys.modules.get("transformers") is None:
        return False
    return any(_is(m, _BART_LAYERS, _BART) or _is(m, _T5_SUBLAYERS, _T5) for m in model.modules())


HF_SEQ2SEQ = register_family(
    Family(
        name="hf-seq2seq",
        builder="transformer",
        description=(
            "Hugging Face encoder-decoder layers: T5 (T5LayerSelfAttention, T5LayerCrossAttention, "
            "T5LayerFF) and BART (BartEncoderLayer, BartDecoderLayer)"
        ),
        applies=applies,
        levels=levels,
        plan=lambda model, multiple: plan(model, multiple),
    )
)
