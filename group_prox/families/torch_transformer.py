"""``torch.nn`` transformers: levels and compression of heads, MLP neurons and whole sublayers.

Levels (``builder="transformer"``, see :func:`group_prox.hierarchy.transformer`), for every
``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer`` and every other
``nn.MultiheadAttention`` (and the layers compression made of them):

* ``base_level``: one group per attention head (``"<attn>.head[h]"``) and per MLP neuron
  (``"<layer>.mlp[i]"``);
* ``layer``: one group per attention sublayer (``"<attn>"``) and per MLP sublayer
  (``"<layer>.mlp"``), with the LayerNorm feeding it when ``norm_first=True``.

Compression: three kinds of removal, each exact in ``eval()`` mode (and in ``train()`` mode up to
dropout's randomness), for every ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer``
(also inside ``nn.TransformerEncoder``/``nn.TransformerDecoder``/``nn.Transformer``) and every
other ``nn.MultiheadAttention``:

* **Attention heads.** An attention computes ``out_proj(concat_h o_h)`` with
  ``o_h = softmax(q_h k_hᵀ/√hd + mask) v_h``, i.e. ``Σ_h W_h o_h + b`` where ``W_h`` are the
  columns ``h·hd:(h+1)·hd`` of ``out_proj.weight``. Head ``h`` is dead when ``W_h = 0``, or when
  its values are identically 0 (its rows of the v projection, of its bias and of ``bias_v`` are
  0): either way ``W_h o_h = 0`` whatever the queries, keys and masks. Its q/k/v rows, its
  ``bias_k``/``bias_v`` channels and its ``out_proj`` columns are removed; since
  ``nn.MultiheadAttention`` cannot have an inner width other than ``embed_dim``, the attention
  becomes a :class:`PrunedMultiheadAttention` (replacement kind ``"attention_heads"``).
* **MLP neurons.** ``linear2(act(linear1(x)))`` is ``Σ_i linear2.weight[:, i]·act(·)_i + b``:
  neuron ``i`` is dead when column ``i`` of ``linear2.weight`` is 0, whatever the activation. Its
  row of ``linear1`` (and bias) and its column of ``linear2`` are sliced away.
* **Whole sublayers.** An attention with no live head and a zero (or no) ``out_proj`` bias, or an
  MLP with no live neuron and a zero (or no) ``linear2`` bias, outputs exactly 0, so its residual
  block is ``x + 0 = x`` (pre-norm: the branch and its LayerNorm go) or ``norm(x + 0) = norm(x)``
  (post-norm: only the norm stays). The layer becomes a
  :class:`CompressedTransformerEncoderLayer`/:class:`CompressedTransformerDecoderLayer`
  (replacement kinds ``"transformer_encoder_layer"``/``"transformer_decoder_layer"``), which
  never calls a removed sublayer.

An encoder layer that loses a head is replaced too, because ``nn.TransformerEncoderLayer``'s
inference fast path (``torch._transformer_encoder_layer_fwd``) assumes a full-width attention;
a layer that only loses MLP neurons stays a torch layer (its fast path takes any hidden width).

LayerNorms, embeddings and anything else are untouched. Left alone, and documented as such:
modules reached under several names or sharing parameters with other modules, subclasses that
override ``forward`` (or the ``_sa_block``/``_mha_block``/``_ff_block`` helpers), and a model that
is itself an attention or a transformer layer (a plan cannot replace the model itself: such an
encoder layer only loses MLP neurons, a decoder layer MLP neurons and heads).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compression.plan import Op, ReplaceOp, SliceOp, indices, register_replacement
from ..compression.surgery import kept_indices
from ..hierarchy.core import Member, hidden_unit
from .registry import Family, register_family

__all__ = [
    "TORCH_TRANSFORMER",
    "CompressedTransformerDecoderLayer",
    "CompressedTransformerEncoderLayer",
    "PrunedMultiheadAttention",
    "applies",
    "dead_heads",
    "dead_neurons",
    "levels",
    "plan",
    "register_attention_kind",
    "register_layer_kind",
]


# --------------------------------------------------------------------------------------------
# Detection and levels


# The layer classes the levels group, each with the torch layer whose structure it has (the
# compressed layers below add themselves through register_layer_kind, so that a compressed model
# gets a hierarchy again).
_LAYER_KINDS: dict[type[nn.Module], type[nn.Module]] = {
    nn.TransformerEncoderLayer: nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer: nn.TransformerDecoderLayer,
}
# Attention classes grouped as nn.MultiheadAttention (PrunedMultiheadAttention below adds itself).
_ATTENTION_KINDS: list[type[nn.Module]] = [nn.MultiheadAttention]


def register_layer_kind(cls: type[nn.Module], like: type[nn.Module]) -> None:
    """Group the layers of class ``cls`` as those of ``like`` (``nn.TransformerEncoderLayer`` or
    ``nn.TransformerDecoderLayer``), whose sublayer attributes they share."""
    if like not in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
        raise ValueError(f"register_layer_kind(): like must be a torch layer class, got {like}.")
    _LAYER_KINDS[cls] = like


def register_attention_kind(cls: type[nn.Module]) -> None:
    """Group the heads of class ``cls`` as those of ``nn.MultiheadAttention``, whose attributes
    (``num_heads``, ``head_dim``, ``in_proj_weight`` …, ``out_proj``) it has."""
    if cls not in _ATTENTION_KINDS:
        _ATTENTION_KINDS.append(cls)


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, tuple(_LAYER_KINDS))


def _is_attention(m: object) -> bool:
    return isinstance(m, tuple(_ATTENTION_KINDS))


def applies(model: nn.Module) -> bool:
    """Whether ``model`` holds a ``torch.nn`` transformer layer or ``MultiheadAttention`` (or a
    layer or attention compression made of one: compressing a compressed model again composes)."""
    return any(_is_layer(m) or _is_attention(m) for m in model.modules())


# (attention attribute, norm feeding it when norm_first=True), in the order torch applies them.
_ATTENTION = {
    nn.TransformerEncoderLayer: (("self_attn", "norm1"),),
    nn.TransformerDecoderLayer: (("self_attn", "norm1"), ("multihead_attn", "norm2")),
}
# The norm feeding the feed-forward branch when norm_first=True.
_MLP_NORM = {nn.TransformerEncoderLayer: "norm2", nn.TransformerDecoderLayer: "norm3"}

# Group name of the layer group of a MultiheadAttention that is the model itself (module name "").
_ROOT_ATTENTION = "attention"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _kind(layer: nn.Module) -> type[nn.Module]:
    return next(like for cls, like in _LAYER_KINDS.items() if isinstance(layer, cls))


def _head_members(mha: nn.MultiheadAttention, h: int) -> list[Member]:
    """Rows of head ``h`` in the q, k, v projections (and their biases), its channels of
    ``bias_k``/``bias_v``, and its columns of ``out_proj.weight``."""
    hd = mha.head_dim
    e = mha.num_heads * hd  # embed_dim, or fewer rows once compressed
    rows = slice(h * hd, (h + 1) * hd)
    # Fused in_proj_weight/in_proj_bias stack q, k, v along dim 0: head h owns one slice of each.
    qkv_rows = [slice(j * e + h * hd, j * e + (h + 1) * hd) for j in range(3)]
    members: list[Member] = []
    if mha.in_proj_weight is not None:
        members += [(mha.in_proj_weight, 0, r) for r in qkv_rows]
    else:
        members += [(w, 0, rows) for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)]
    if mha.in_proj_bias is not None:
        members += [(mha.in_proj_bias, 0, r) for r in qkv_rows]
    members += [(b, 2, rows) for b in (mha.bias_k, mha.bias_v) if b is not None]
    members.append((mha.out_proj.weight, 1, rows))
    return members


def _check_layer(name: str, layer: nn.Module) -> None:
    """Refuse subclasses that replaced the sublayers this builder slices."""
    label = name or "the model"
    for attr, _ in _ATTENTION[_kind(layer)]:
        if not _is_attention(getattr(layer, attr, None)):
            raise ValueError(
                f"transformer(): {label}.{attr} is not an nn.MultiheadAttention; build the "
                "hierarchy with group_prox.Hierarchy(...) instead."
            )
    l1, l2 = getattr(layer, "linear1", None), getattr(layer, "linear2", None)
    if not (
        isinstance(l1, nn.Linear)
        and isinstance(l2, nn.Linear)
        and l1.out_features == l2.in_features
    ):
        raise ValueError(
            f"transformer(): {label}.linear1/linear2 are not two nn.Linear with matching hidden "
            "size; build the hierarchy with group_prox.Hierarchy(...) instead."
        )


def levels(model: nn.Module) -> dict[str, dict[str, list]]:
    """The levels of :func:`group_prox.hierarchy.transformer` for the ``torch.nn`` layers and attentions of ``model``,
    frozen parameters included."""
    modules = list(model.named_modules())
    layers = [(n, m) for n, m in modules if _is_layer(m)]
    attentions = [(n, m) for n, m in modules if _is_attention(m)]
    base: dict[str, list[Member]] = {}
    layer_groups: dict[str, list[Tensor]] = {}
    # Sublayers already grouped, by identity of their modules, so shared ones are grouped once.
    seen: set[tuple[int, ...]] = set()

    def add_attention(name: str, mha: nn.MultiheadAttention, norm: nn.Module | None) -> None:
        if (id(mha),) in seen:
            return
        seen.add((id(mha),))
        for h in range(mha.num_heads):
            base[_join(name, f"head[{h}]")] = _head_members(mha, h)
        params = list(mha.parameters())
        if norm is not None:
            params += list(norm.parameters())
        layer_groups[name or _ROOT_ATTENTION] = params

    for name, layer in layers:
        _check_layer(name, layer)
        kind = _kind(layer)
        for attr, norm_attr in _ATTENTION[kind]:
            norm = getattr(layer, norm_attr) if layer.norm_first else None
            add_attention(_join(name, attr), getattr(layer, attr), norm)
        l1, l2 = layer.linear1, layer.linear2
        if (id(l1), id(l2)) in seen:
            continue
        seen.add((id(l1), id(l2)))
        mlp = _join(name, "mlp")
        for i in range(l1.out_features):
            base[f"{mlp}[{i}]"] = hidden_unit([l1], l2, i)
        params = [*l1.parameters(), *l2.parameters()]
        if layer.norm_first:
            params += list(getattr(layer, _MLP_NORM[kind]).parameters())
        layer_groups[mlp] = params

    for name, mha in attentions:
        add_attention(name, mha, None)

    _check_disjoint(model, layer_groups)
    return {"base_level": base, "layer": layer_groups}


def _check_disjoint(model: nn.Module, layer_groups: dict[str, list[Tensor]]) -> None:
    """Name the shared parameter and both sublayers, rather than let Hierarchy report an overlap of
    two groups without saying that weight tying is the cause."""
    owner: dict[int, str] = {}
    pname = {id(p): n for n, p in model.named_parameters()}
    for group, params in layer_groups.items():
        for p in params:
            other = owner.setdefault(id(p), group)
            if other != group:
                raise ValueError(
                    f"transformer(): parameter {pname.get(id(p), tuple(p.shape))} is shared by the "
                    f"sublayers {other!r} and {group!r}, which share only part of their "
                    "parameters, so their groups would overlap. Share whole sublayers (or whole "
                    "layers), or build the hierarchy with group_prox.Hierarchy(...)."
                )


# --------------------------------------------------------------------------------------------
# Masks


def _float_mask(mask: Tensor | None, dtype: torch.dtype, what: str) -> Tensor | None:
    """An additive float mask, as torch's ``F._canonical_mask`` makes it: ``True`` (not allowed)
    becomes ``-inf``, a float mask is added as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(
            f"{what}: only bool and floating-point masks are supported, got {mask.dtype}."
        )
    return mask.to(dtype)


# --------------------------------------------------------------------------------------------
# Attention with fewer heads


def _new_linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` and ``bias``; it may have zero width, which
    ``nn.Linear(...)``'s initialisation warns about."""
    linear = nn.Linear(1, 1, bias=bias is not None, device="meta")
    linear.out_features, linear.in_features = weight.shape
    linear.weight = weight
    linear.bias = bias
    return linear


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` keeping only some of its heads: a drop-in replacement.

    Same call signature and return value as ``nn.MultiheadAttention`` (``batch_first`` honoured,
    unbatched inputs, 2-D ``[L, S]`` or 3-D ``[B·num_heads, L, S]`` bool or float ``attn_mask``,
    ``key_padding_mask``, ``is_causal`` with the same meaning, ``bias_k``/``bias_v``,
    ``add_zero_attn``, dropout on the attention weights in training mode), and the same parameter
    names (``in_proj_weight`` or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when
    ``kdim``/``vdim`` differ from ``embed_dim``, ``in_proj_bias``, ``bias_k``, ``bias_v``,
    ``out_proj.weight``, ``out_proj.bias``), with ``num_heads·head_dim`` rows instead of
    ``embed_dim``. A 3-D ``attn_mask`` is given for all ``source_num_heads`` heads of the original
    attention; the kept heads' masks are selected.

    The output equals the original attention's when the removed heads are dead (their
    contribution ``W_h o_h`` to ``out_proj`` is 0). The returned attention weights, however, are
    the kept heads' only: averaged over the kept heads when ``average_attn_weights=True`` (all
    zeros when no head is kept), ``[B, num_heads, L, S]`` with the kept heads otherwise.

    With no head kept the output is ``out_proj.bias`` broadcast (or 0). Built by
    :meth:`from_attention`; the constructor leaves the parameters uninitialised.
    """

    def __init__(
        self,
        embed_dim: int,
        head_dim: int,
        kept_heads: Sequence[int],
        source_num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        in_proj_bias: bool = True,
        out_proj_bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        dropout: float = 0.0,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kept = [int(h) for h in kept_heads]
        if any(not 0 <= h < source_num_heads for h in kept) or kept != sorted(set(kept)):
            raise ValueError(
                f"PrunedMultiheadAttention: kept heads must be increasing indices in "
                f"[0, {source_num_heads}), got {kept}."
            )
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = len(kept)
        self.head_dim = head_dim
        self.source_num_heads = source_num_heads
        self.kept_heads = tuple(kept)
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        inner = self.num_heads * head_dim
        # Not saved: it follows from the plan. A buffer, so it moves with the module's device.
        self.register_buffer(
            "kept_heads_index",
            torch.tensor(kept, dtype=torch.long, device=device),
            persistent=False,
        )
        self._selects_heads = self.kept_heads != tuple(range(source_num_heads))

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, **factory))

        if self._qkv_same_embed_dim:
            self.in_proj_weight = param(3 * inner, embed_dim)
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = param(inner, embed_dim)
            self.k_proj_weight = param(inner, self.kdim)
            self.v_proj_weight = param(inner, self.vdim)
            self.register_parameter("in_proj_weight", None)
        if in_proj_bias:
            self.in_proj_bias = param(3 * inner)
        else:
            self.register_parameter("in_proj_bias", None)
        if add_bias_kv:
            self.bias_k, self.bias_v = param(1, 1, inner), param(1, 1, inner)
        else:
            self.bias_k = self.bias_v = None
        self.out_proj = _new_linear(
            param(embed_dim, inner), param(embed_dim) if out_proj_bias else None
        )

    @classmethod
    @torch.no_grad()
    def from_attention(
        cls, attention: nn.Module, keep: Sequence[int], *, out_proj_bias: bool = True
    ) -> PrunedMultiheadAttention:
        """The attention keeping heads ``keep`` (indices among ``attention``'s current heads) of an
        ``nn.MultiheadAttention`` or ``PrunedMultiheadAttention``, with copies of their weights.
        ``out_proj_bias=False`` drops ``out_proj``'s bias (only exact if it is 0)."""
        if not isinstance(attention, nn.MultiheadAttention | PrunedMultiheadAttention):
            raise TypeError(
                f"PrunedMultiheadAttention.from_attention(): expected an nn.MultiheadAttention, "
                f"got {type(attention).__name__}."
            )
        keep = [int(h) for h in keep]
        heads, hd = attention.num_heads, attention.head_dim
        if any(not 0 <= h < heads for h in keep) or keep != sorted(set(keep)):
            raise ValueError(
                f"PrunedMultiheadAttention.from_attention(): heads to keep must be increasing "
                f"indices in [0, {heads}), got {keep}."
            )
        if isinstance(attention, PrunedMultiheadAttention):
            source_heads = attention.source_num_heads
            kept_source = [attention.kept_heads[h] for h in keep]
        else:
            source_heads, kept_source = heads, keep
        old_bias = attention.out_proj.bias
        weight = attention.out_proj.weight
        new = cls(
            attention.embed_dim,
            hd,
            kept_source,
            source_heads,
            kdim=attention.kdim,
            vdim=attention.vdim,
            in_proj_bias=attention.in_proj_bias is not None,
            out_proj_bias=out_proj_bias and old_bias is not None,
            add_bias_kv=attention.bias_k is not None,
            add_zero_attn=attention.add_zero_attn,
            dropout=attention.dropout,
            batch_first=attention.batch_first,
            device=weight.device,
            dtype=weight.dtype,
        )
        inner = heads * hd
        rows = torch.tensor(
            [h * hd + j for h in keep for j in range(hd)], dtype=torch.long, device=weight.device
        )
        qkv_rows = torch.cat([rows, rows + inner, rows + 2 * inner])

        def copy(name: str, source: Tensor, dim: int, index: Tensor) -> None:
            target = getattr(new, name) if "." not in name else new.get_parameter(name)
            target.copy_(source.index_select(dim, index))
            target.requires_grad_(source.requires_grad)

        if new._qkv_same_embed_dim:
            copy("in_proj_weight", attention.in_proj_weight, 0, qkv_rows)
        else:
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                copy(name, getattr(attention, name), 0, rows)
        if attention.in_proj_bias is not None:
            copy("in_proj_bias", attention.in_proj_bias, 0, qkv_rows)
        if attention.bias_k is not None:
            copy("bias_k", attention.bias_k, 2, rows)
            copy("bias_v", attention.bias_v, 2, rows)
        copy("out_proj.weight", weight, 1, rows)
        if new.out_proj.bias is not None:
            new.out_proj.bias.copy_(old_bias)
            new.out_proj.bias.requires_grad_(old_bias.requires_grad)
        new.train(attention.training)
        return new

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, heads={list(self.kept_heads)} of "
            f"{self.source_num_heads}, head_dim={self.head_dim}, batch_first={self.batch_first}"
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``; the weights are the kept heads' only."""
        if query.is_nested or key.is_nested or value.is_nested:
            raise TypeError("PrunedMultiheadAttention does not take nested tensors.")
        is_batched = query.dim() == 3
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            # Keep `query is key is value` (self-attention projects once) through the transpose.
            if key is value:
                if query is key:
                    query = key = value = query.transpose(0, 1)
                else:
                    query = query.transpose(0, 1)
                    key = value = key.transpose(0, 1)
            else:
                query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = self._attend(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
            is_causal,
        )  # fmt: skip
        if not is_batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        inner = self.num_heads * self.head_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.split(inner)
        if self.in_proj_weight is None:
            return (
                F.linear(query, self.q_proj_weight, bq),
                F.linear(key, self.k_proj_weight, bk),
                F.linear(value, self.v_proj_weight, bv),
            )
        w = self.in_proj_weight
        if key is value:
            if query is key:
                q, k, v = F.linear(query, w, b).split(inner, dim=-1)
                return q, k, v
            k, v = F.linear(key, w[inner:], None if b is None else b[inner:]).split(inner, dim=-1)
            return F.linear(query, w[:inner], bq), k, v
        wq, wk, wv = w.split(inner)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Sequence-first ``[L, B, E]`` inputs; follows ``F.multi_head_attention_forward``."""
        tgt_len, bsz, _ = query.shape
        src_len = key.shape[0]
        heads, hd = self.num_heads, self.head_dim
        name = type(self).__name__
        kpm = _float_mask(key_padding_mask, query.dtype, f"{name} key_padding_mask")
        if is_causal and attn_mask is None:
            raise RuntimeError(
                f"{name}: is_causal=True needs attn_mask, as in nn.MultiheadAttention."
            )
        # As torch: the causal hint replaces the mask only when nothing else needs the mask.
        if is_causal and kpm is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = _float_mask(attn_mask, query.dtype, f"{name} attn_mask")
            if kpm is not None:
                is_causal = False
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(
                        f"{name}: the 2-D attn_mask has shape {tuple(attn_mask.shape)}, expected "
                        f"{(tgt_len, src_len)}."
                    )
                attn_mask = attn_mask.view(1, 1, tgt_len, src_len)
            elif attn_mask.dim() == 3:
                want = (bsz * self.source_num_heads, tgt_len, src_len)
                if attn_mask.shape != want:
                    raise RuntimeError(
                        f"{name}: the 3-D attn_mask has shape {tuple(attn_mask.shape)}, expected "
                        f"{want} (batch × the original {self.source_num_heads} heads)."
                    )
                attn_mask = attn_mask.view(bsz, self.source_num_heads, tgt_len, src_len)
                if self._selects_heads:
                    attn_mask = attn_mask.index_select(1, self.kept_heads_index)
            else:
                raise RuntimeError(
                    f"{name}: attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D."
                )
        if kpm is not None:
            if kpm.shape != (bsz, src_len):
                raise RuntimeError(
                    f"{name}: key_padding_mask has shape {tuple(kpm.shape)}, expected "
                    f"{(bsz, src_len)}."
                )
            kpm = kpm.view(bsz, 1, 1, src_len)

        if heads == 0:
            return self._no_heads(query, src_len, need_weights, average_attn_weights)

        q, k, v = self._project(query, key, value)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(1, bsz, -1)])
            v = torch.cat([v, self.bias_v.expand(1, bsz, -1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        q = q.reshape(tgt_len, bsz, heads, hd).permute(1, 2, 0, 3)
        k = k.reshape(k.shape[0], bsz, heads, hd).permute(1, 2, 0, 3)
        v = v.reshape(v.shape[0], bsz, heads, hd).permute(1, 2, 0, 3)
        if self.add_zero_attn:
            zeros = k.new_zeros(bsz, heads, 1, hd)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        if kpm is not None:
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            scores = torch.matmul(q * math.sqrt(1.0 / hd), k.transpose(-2, -1))
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, heads * hd)
        return self.out_proj(out), weights

    def _no_heads(
        self, query: Tensor, src_len: int, need_weights: bool, average_attn_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        tgt_len, bsz, _ = query.shape
        out = self.out_proj(query.new_zeros(tgt_len, bsz, 0))
        if not need_weights:
            return out, None
        src_len += int(self.bias_k is not None) + int(self.add_zero_attn)
        shape = (bsz, tgt_len, src_len) if average_attn_weights else (bsz, 0, tgt_len, src_len)
        return out, query.new_zeros(shape)


# The attentions whose computation the plan knows (and rebuilds as PrunedMultiheadAttention).
_ATTENTIONS = (nn.MultiheadAttention, PrunedMultiheadAttention)


@register_replacement("attention_heads")
def _attention_heads(attention: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    return PrunedMultiheadAttention.from_attention(attention, indices(args["keep"], "args['keep']"))


# --------------------------------------------------------------------------------------------
# Layers without some sublayers


@torch.no_grad()
def _linear(linear: nn.Linear, out_keep: Tensor | None, in_keep: Tensor | None) -> nn.Linear:
    """A copy of ``linear`` keeping some outputs and inputs; unlike ``surgery.keep_outputs`` it may
    keep none (a zero-width sublayer)."""
    weight, bias = linear.weight, linear.bias
    w = weight if out_keep is None else weight.index_select(0, out_keep.to(weight.device))
    w = w if in_keep is None else w.index_select(1, in_keep.to(weight.device))
    b = None
    if bias is not None:
        b = bias if out_keep is None else bias.index_select(0, out_keep.to(bias.device))
        b = nn.Parameter(b.clone(), requires_grad=bias.requires_grad)
    new = _new_linear(nn.Parameter(w.clone(), requires_grad=weight.requires_grad), b)
    new.train(linear.training)
    return new


def _removed_attention(attention: nn.Module) -> PrunedMultiheadAttention:
    """A removed attention stays as a zero-width module (no head, only its zero ``out_proj``
    bias) that the layer never calls, because torch's stacks inspect their first layer:
    ``nn.TransformerDecoder.forward`` reads ``layers[0].self_attn.batch_first`` and
    ``nn.TransformerEncoder.forward`` reads ``self_attn.in_proj_weight``, ``out_proj.bias``,
    ``linear1.weight``... (and their ``requires_grad``) to choose its nested-tensor path."""
    return PrunedMultiheadAttention.from_attention(attention, [])


def _removed_mlp(linear1: nn.Linear, linear2: nn.Linear) -> tuple[nn.Linear, nn.Linear]:
    """A removed MLP stays as zero-width ``linear1``/``linear2`` (``linear2`` keeps its zero bias),
    never called, for the same reason."""
    none = torch.zeros(0, dtype=torch.long)
    return _linear(linear1, none, None), _linear(linear2, None, none)


class _CompressedLayer(nn.Module):
    """What encoder and decoder layers share: copying the kept children, removing sublayers."""

    _SUBLAYERS: tuple[str, ...] = ()
    # Sublayer -> the LayerNorm feeding it when norm_first=True (dropped with it).
    _NORMS: Mapping[str, str] = {}
    _TORCH: type[nn.Module] = nn.Module

    def __init__(self, layer: nn.Module, remove: Collection[str] = ()) -> None:
        """``layer``: a torch layer of kind ``_TORCH`` or an already compressed one."""
        super().__init__()
        self._take(layer, remove)

    def _take(self, layer: nn.Module, remove: Collection[str]) -> None:
        kind = type(self).__name__
        if not isinstance(layer, self._TORCH | type(self)):
            raise TypeError(
                f"{kind}: expected an nn.{self._TORCH.__name__} or a {kind}, got "
                f"{type(layer).__name__}."
            )
        unknown = set(remove) - set(self._SUBLAYERS)
        if unknown:
            raise ValueError(
                f"{kind}: unknown sublayers {sorted(unknown)}; expected some of {self._SUBLAYERS}."
            )
        removed = set(getattr(layer, "removed", ())) | set(remove)
        self.removed = tuple(s for s in self._SUBLAYERS if s in removed)
        self.norm_first = layer.norm_first
        for s in self._SUBLAYERS:
            setattr(self, f"has_{s}", s not in removed)
        for name, child in layer.named_children():
            setattr(self, name, child)
        for attr in ("activation", "activation_relu_or_gelu"):
            if hasattr(layer, attr) and attr not in self._modules:
                setattr(self, attr, getattr(layer, attr))
        for s in self.removed:
            if s == "mlp":
                self.linear1, self.linear2 = _removed_mlp(layer.linear1, layer.linear2)
            else:
                setattr(self, s, _removed_attention(getattr(layer, s)))
            if self.norm_first:
                # Pre-norm: the LayerNorm only fed the removed branch.
                self.register_module(self._NORMS[s], None)
        self.train(layer.training)

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}, removed={list(self.removed)}"

    def _ff_block(self, x: Tensor, dropout: nn.Module) -> Tensor:
        return dropout(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def _attention_block(
        self,
        attention: nn.Module,
        dropout: nn.Module,
        x: Tensor,
        mem: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
    ) -> Tensor:
        out = attention(
            x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
            is_causal=is_causal, need_weights=False,
        )[0]  # fmt: skip
        return dropout(out)


def _residual(
    norm_first: bool, norm: nn.Module | None, x: Tensor, branch: Any, keep: bool
) -> Tensor:
    """One residual block: ``x + f(norm(x))`` (pre-norm) or ``norm(x + f(x))`` (post-norm);
    without its branch, ``x`` or ``norm(x)``."""
    if norm_first:
        return x + branch(norm(x)) if keep else x
    return norm(x + branch(x)) if keep else norm(x)


class CompressedTransformerEncoderLayer(_CompressedLayer):
    """An ``nn.TransformerEncoderLayer`` without the sublayers in ``removed`` (``"self_attn"``,
    ``"mlp"``), whose outputs are exactly 0.

    The kept children have torch's names (``self_attn``, ``linear1``, ``dropout``, ``linear2``,
    ``norm1``, ``norm2``, ``dropout1``, ``dropout2``), so state_dict keys do not change; a removed
    sublayer stays as a zero-width module that is never called, and with ``norm_first=True`` its
    LayerNorm is ``None``. Same ``forward`` as torch's layer, without its fused inference path.
    A nested-tensor input (what ``nn.TransformerEncoder``'s inference fast path passes its layers)
    is padded, run, and packed again.
    """

    _SUBLAYERS = ("self_attn", "mlp")
    _NORMS = {"self_attn": "norm1", "mlp": "norm2"}  # noqa: RUF012
    _TORCH = nn.TransformerEncoderLayer

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        if src.is_nested:
            return self._forward_nested(src, src_mask, src_key_padding_mask)
        name = type(self).__name__
        src_key_padding_mask = _float_mask(src_key_padding_mask, src.dtype, f"{name} padding mask")
        src_mask = _float_mask(src_mask, src.dtype, f"{name} src_mask")

        def sa(x: Tensor) -> Tensor:
            return self._attention_block(
                self.self_attn, self.dropout1, x, x, src_mask, src_key_padding_mask, is_causal
            )

        x = _residual(self.norm_first, self.norm1, src, sa, self.has_self_attn)

        def ff(x: Tensor) -> Tensor:
            return self._ff_block(x, self.dropout2)

        return _residual(self.norm_first, self.norm2, x, ff, self.has_mlp)

    def _forward_nested(
        self, src: Tensor, src_mask: Tensor | None, src_key_padding_mask: Tensor | None
    ) -> Tensor:
        """``nn.TransformerEncoder`` packs a padded batch into a nested tensor on its inference
        fast path (eval, no grad, a key padding mask) when ``layers[0]`` looks like its own layer;
        the padding becomes a key padding mask again."""
        if src_mask is not None or src_key_padding_mask is not None:
            raise RuntimeError(
                f"{type(self).__name__}: masks are not supported with a nested-tensor input."
            )
        lengths = torch.tensor([t.size(0) for t in src.unbind()], device=src.device)
        padded = src.to_padded_tensor(0.0)
        valid = torch.arange(padded.size(1), device=src.device) < lengths[:, None]
        batch_first = getattr(self.self_attn, "batch_first", True)
        x = padded if batch_first else padded.transpose(0, 1)
        out = self.forward(x, None, ~valid)
        out = out if batch_first else out.transpose(0, 1)
        # The packing nn.TransformerEncoder itself uses.
        return torch._nested_tensor_from_mask(out, valid, mask_check=False)


class CompressedTransformerDecoderLayer(_CompressedLayer):
    """An ``nn.TransformerDecoderLayer`` without the sublayers in ``removed`` (``"self_attn"``,
    ``"multihead_attn"``, ``"mlp"``), whose outputs are exactly 0.

    Kept children have torch's names (``self_attn``, ``multihead_attn``, ``linear1``, ``dropout``,
    ``linear2``, ``norm1``..``norm3``, ``dropout1``..``dropout3``); a removed sublayer stays as a
    zero-width module that is never called, and with ``norm_first=True`` its LayerNorm is
    ``None``. Same ``forward`` as torch's layer.
    """

    _SUBLAYERS = ("self_attn", "multihead_attn", "mlp")
    _NORMS = {"self_attn": "norm1", "multihead_attn": "norm2", "mlp": "norm3"}  # noqa: RUF012
    _TORCH = nn.TransformerDecoderLayer

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        def sa(x: Tensor) -> Tensor:
            return self._attention_block(
                self.self_attn, self.dropout1, x, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal
            )

        def mha(x: Tensor) -> Tensor:
            return self._attention_block(
                self.multihead_attn, self.dropout2, x, memory, memory_mask,
                memory_key_padding_mask, memory_is_causal,
            )  # fmt: skip

        x = _residual(self.norm_first, self.norm1, tgt, sa, self.has_self_attn)
        x = _residual(self.norm_first, self.norm2, x, mha, self.has_multihead_attn)

        def ff(x: Tensor) -> Tensor:
            return self._ff_block(x, self.dropout3)

        return _residual(self.norm_first, self.norm3, x, ff, self.has_mlp)


# A compressed model gets a hierarchy again.
register_attention_kind(PrunedMultiheadAttention)
register_layer_kind(CompressedTransformerEncoderLayer, nn.TransformerEncoderLayer)
register_layer_kind(CompressedTransformerDecoderLayer, nn.TransformerDecoderLayer)


def _sublayer_names(args: Mapping[str, Any]) -> tuple[str, ...]:
    remove = args.get("remove", [])
    if not isinstance(remove, list | tuple) or not all(isinstance(s, str) for s in remove):
        raise ValueError(f"args['remove'] must be a list of sublayer names, got {remove!r:.80}.")
    return tuple(remove)


@register_replacement("transformer_encoder_layer")
def _encoder_layer(layer: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    return CompressedTransformerEncoderLayer(layer, _sublayer_names(args))


@register_replacement("transformer_decoder_layer")
def _decoder_layer(layer: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    return CompressedTransformerDecoderLayer(layer, _sublayer_names(args))


# --------------------------------------------------------------------------------------------
# Planning


@torch.no_grad()
def dead_heads(attention: nn.Module) -> Tensor:
    """Heads of an ``nn.MultiheadAttention`` (or :class:`PrunedMultiheadAttention`) contributing
    exactly 0 to its output whatever the inputs and masks (a bool tensor over heads).

    The output is ``Σ_h W_h o_h + b``, ``W_h`` the columns ``h·hd:(h+1)·hd`` of
    ``out_proj.weight`` and ``o_h`` a convex combination of head ``h``'s value vectors (plus a
    zero vector with ``add_zero_attn``). Head ``h`` is dead when ``W_h = 0``, or when its values
    are identically 0: its rows of the v projection, of the v bias and of ``bias_v`` are 0.
    """
    heads, hd = attention.num_heads, attention.head_dim
    if heads == 0:
        return torch.zeros(0, dtype=torch.bool)
    inner = heads * hd
    w_out = attention.out_proj.weight.detach()
    dead = (w_out.reshape(-1, heads, hd) == 0).all(-1).all(0)
    if attention.in_proj_weight is not None:
        w_v = attention.in_proj_weight.detach()[2 * inner :]
    else:
        w_v = attention.v_proj_weight.detach()
    values_zero = (w_v.reshape(heads, -1) == 0).all(-1)
    if attention.in_proj_bias is not None:
        b_v = attention.in_proj_bias.detach()[2 * inner :]
        values_zero &= (b_v.reshape(heads, hd) == 0).all(-1)
    if attention.bias_v is not None:
        values_zero &= (attention.bias_v.detach().reshape(heads, hd) == 0).all(-1)
    return (dead | values_zero).cpu()


@torch.no_grad()
def dead_neurons(linear2: nn.Linear) -> Tensor:
    """Hidden neurons of an MLP ``linear2(act(linear1(x)))`` contributing exactly 0: column ``i``
    of ``linear2.weight`` is 0, so ``act(·)_i`` is multiplied by 0 whatever the activation."""
    return (linear2.weight.detach() == 0).all(0).cpu()


def _zero_or_none(bias: Tensor | None) -> bool:
    return bias is None or not bool(bias.detach().any())


def _attention_is_zero(attention: nn.Module, dead: Tensor) -> bool:
    """No live head and a zero ``out_proj`` bias: the sublayer's output is exactly 0."""
    return bool(dead.all()) and _zero_or_none(attention.out_proj.bias)


def _kept_heads(dead: Tensor, multiple: int) -> list[int]:
    # Unlike a layer's channels, an attention may keep no head at all (it then outputs its bias).
    return [] if bool(dead.all()) else kept_indices(dead, multiple)


def _overrides(module: nn.Module, base: type, methods: tuple[str, ...]) -> bool:
    return any(getattr(type(module), m, None) is not getattr(base, m) for m in methods)


_ENC_METHODS = ("forward", "_sa_block", "_ff_block")
_DEC_METHODS = (*_ENC_METHODS, "_mha_block")
_TORCH_LAYERS = {nn.TransformerEncoderLayer: _ENC_METHODS, nn.TransformerDecoderLayer: _DEC_METHODS}
_OUR_LAYERS = (CompressedTransformerEncoderLayer, CompressedTransformerDecoderLayer)
_LAYERS = (*_TORCH_LAYERS, *_OUR_LAYERS)
_REPLACEMENT_KIND = {
    nn.TransformerEncoderLayer: "transformer_encoder_layer",
    CompressedTransformerEncoderLayer: "transformer_encoder_layer",
    nn.TransformerDecoderLayer: "transformer_decoder_layer",
    CompressedTransformerDecoderLayer: "transformer_decoder_layer",
}


def _base(module: nn.Module) -> type | None:
    """The known class ``module`` behaves as, or ``None`` if it overrides the computation."""
    for base, methods in _TORCH_LAYERS.items():
        if isinstance(module, base):
            return None if _overrides(module, base, methods) else base
    for base in (*_OUR_LAYERS, *_ATTENTIONS):
        if isinstance(module, base):
            return None if _overrides(module, base, ("forward",)) else base
    return None


def _attention_attrs(layer: nn.Module) -> tuple[str, ...]:
    decoder = isinstance(layer, nn.TransformerDecoderLayer | CompressedTransformerDecoderLayer)
    return ("self_attn", "multihead_attn") if decoder else ("self_attn",)


class _Sharing:
    """Modules reached under several names and parameters held by several modules: editing one
    name of them would silently change (or not change) the others, so they are left alone."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.params = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))

    def shared(self, module: nn.Module) -> bool:
        return any(self.modules[id(m)] > 1 for m in module.modules()) or any(
            self.params[id(p)] > 1 for p in module.parameters()
        )


def _usable_layer(layer: nn.Module) -> bool:
    """A layer whose computation is torch's (or ours) on standard sublayers."""
    if _base(layer) is None:
        return False
    for attr in _attention_attrs(layer):
        attention = getattr(layer, attr, None)
        if not isinstance(attention, nn.Module) or _base(attention) not in _ATTENTIONS:
            return False
    l1, l2 = getattr(layer, "linear1", None), getattr(layer, "linear2", None)
    return (
        isinstance(l1, nn.Linear)
        and isinstance(l2, nn.Linear)
        and l1.out_features == l2.in_features
    )


def _layer_ops(name: str, layer: nn.Module, multiple: int) -> list[Op]:
    """Ops for one encoder/decoder layer named ``name`` ("" when it is the model itself)."""
    is_root = not name
    prefix = f"{name}." if name else ""
    removed_before = set(getattr(layer, "removed", ()))
    is_torch_layer = isinstance(layer, tuple(_TORCH_LAYERS))
    # nn.TransformerEncoderLayer's fused inference path assumes full-width attention.
    heads_need_our_layer = isinstance(layer, nn.TransformerEncoderLayer)
    ops: list[Op] = []
    remove: list[str] = []
    pruned_heads = False
    for attr in _attention_attrs(layer):
        if attr in removed_before:
            continue
        attention = getattr(layer, attr)
        dead = dead_heads(attention)
        if not is_root and _attention_is_zero(attention, dead):
            remove.append(attr)
            continue
        if is_root and heads_need_our_layer:
            continue
        keep = _kept_heads(dead, multiple)
        if len(keep) < attention.num_heads:
            ops.append(ReplaceOp(prefix + attr, "attention_heads", {"keep": keep}))
            pruned_heads = True
    if "mlp" not in removed_before:
        dead = dead_neurons(layer.linear2)
        if not is_root and bool(dead.all()) and _zero_or_none(layer.linear2.bias):
            remove.append("mlp")
        else:
            keep = tuple(kept_indices(dead, multiple))
            if len(keep) < dead.numel():
                ops += [
                    SliceOp(prefix + "linear1", "out", keep),
                    SliceOp(prefix + "linear2", "in", keep),
                ]
    # A model that is itself a layer cannot be replaced (it then loses no sublayer, see above).
    if not is_root and (remove or (pruned_heads and is_torch_layer)):
        ops.append(ReplaceOp(name, _REPLACEMENT_KIND[_base(layer)], {"remove": remove}))
    return ops


def plan(model: nn.Module, *, multiple: int = 1) -> list[Op]:
    """Operations removing the dead heads, MLP neurons and whole sublayers of ``model``'s
    transformer layers and attentions (see the module docstring for the criteria).

    Head and neuron counts are rounded up to a multiple of ``multiple`` by keeping some dead ones
    (an attention may keep no head; an MLP that is not removed keeps at least one neuron). Shared
    modules, subclasses overriding the computation and a model that is itself an attention are
    left unchanged; a model that is itself a layer only loses MLP neurons (and, for a decoder
    layer, heads).
    """
    sharing = _Sharing(model)
    ops: list[Op] = []
    in_layers: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, _LAYERS):
            continue
        # Attentions of a layer are the layer's business, even if the layer is left alone.
        in_layers.update(id(getattr(module, a, None)) for a in _attention_attrs(module))
        if _usable_layer(module) and not sharing.shared(module):
            ops += _layer_ops(name, module, multiple)
    for name, module in model.named_modules():
        if (
            not name
            or id(module) in in_layers
            or _base(module) not in _ATTENTIONS
            or sharing.shared(module)
        ):
            continue
        keep = _kept_heads(dead_heads(module), multiple)
        if len(keep) < module.num_heads:
            ops.append(ReplaceOp(name, "attention_heads", {"keep": keep}))
    return ops


TORCH_TRANSFORMER = register_family(
    Family(
        name="torch-transformer",
        builder="transformer",
        description=(
            "torch.nn transformer layers and attentions (TransformerEncoderLayer, "
            "TransformerDecoderLayer, MultiheadAttention)"
        ),
        applies=applies,
        levels=levels,
        plan=lambda model, multiple: plan(model, multiple=multiple),
    )
)
