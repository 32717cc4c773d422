"""Hugging Face BERT-style encoders (BERT, RoBERTa) and ViT: levels and compression.

Recognised layers (exact classes of ``transformers``, found by class name and module, so that
importing group_prox never imports ``transformers``):

* **post-norm BERT layers** (``BertLayer``, ``RobertaLayer``, as in ``BertModel``,
  ``BertForSequenceClassification``, ``RobertaModel`` …): ``attention.self.query/key/value``,
  ``attention.output.dense`` + ``attention.output.LayerNorm`` (``LayerNorm(x + dense(·))``),
  ``intermediate.dense``, ``output.dense`` + ``output.LayerNorm``;
* **pre-norm ViT layers** (``ViTLayer``, as in ``ViTModel``/``ViTForImageClassification``):
  ``layernorm_before`` → ``attention.q_proj/k_proj/v_proj/o_proj``, ``layernorm_after`` →
  ``mlp.fc1/fc2``, each branch added to the residual stream.

Levels (group names are module names plus a suffix; ``<layer>`` is a layer's name, e.g.
``"bert.encoder.layer.0"``):

* ``base_level``: each attention head ``h`` (its rows of the query, key and value projections and
  their biases, its columns of the output projection): ``"<layer>.attention.head[h]"``; each MLP
  neuron ``i`` (row ``i`` and bias of ``intermediate.dense``/``fc1``, column ``i`` of
  ``output.dense``/``fc2``): ``"<layer>.mlp[i]"``;
* ``layer``: the attention sublayer ``"<layer>.attention"`` (every projection with its bias) and
  the MLP sublayer ``"<layer>.mlp"``. In post-norm BERT the LayerNorms come after the residual
  addition: they are trunk, in no group, and the output projections' biases belong to the
  sublayer groups only. In pre-norm ViT the norm feeding a branch belongs to its group
  (``layernorm_before`` → attention, ``layernorm_after`` → MLP).

Compression (exact in ``eval()`` mode, with or without an ``attention_mask``):

* a head is dead when its output-projection columns are 0, or its values are identically 0 (its
  value rows and value bias are 0): its query/key/value rows and output columns are sliced away and
  the attention's ``num_attention_heads`` (and BERT's ``all_head_size``) follow (replacement kind
  ``"hf_encoder_attention_heads"``, which changes only these counts);
* a neuron is dead when its column of ``output.dense``/``fc2`` is 0: sliced away;
* an attention with no live head, or an MLP with no live neuron, outputs its output bias (a
  constant, often 0): the sublayer goes. Post-norm BERT: the attention becomes
  :class:`RemovedBertAttention` (``LayerNorm(x + b)``), the MLP's ``intermediate`` an
  :class:`EmptyIntermediate` and its ``output`` a :class:`RemovedBertOutput`
  (``LayerNorm(x + b)``). Pre-norm ViT: the branch becomes a :class:`ZeroBranch` (its output bias,
  or 0) and its LayerNorm, whose output only gives the branch its shape, an ``nn.Identity``.

Left alone: BERT cross-attention (``crossattention`` of decoder layers: in no group, never
compressed), subclasses of these classes, other layouts (with a warning), and modules reached
under several names.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..compression.plan import Op, ReplaceOp, SliceOp, integer, register_replacement
from ..compression.surgery import kept_indices
from ..hierarchy.core import hidden_unit
from .registry import Family, register_family

__all__ = [
    "EmptyIntermediate",
    "RemovedBertAttention",
    "RemovedBertOutput",
    "ZeroBranch",
    "applies",
    "keep_cache_length",
    "levels",
    "plan",
]

# Layer class name -> the transformers module prefix it must come from.
_BERT = {"BertLayer": "transformers.models.bert.", "RobertaLayer": "transformers.models.roberta."}
_VIT = {"ViTLayer": "transformers.models.vit."}
_KNOWN = {**_BERT, **_VIT}
# Self-attention classes whose head count "hf_encoder_attention_heads" updates.
_SELF_ATTENTIONS = {
    "BertSelfAttention": "transformers.models.bert.",
    "RobertaSelfAttention": "transformers.models.roberta.",
    "ViTAttention": "transformers.models.vit.",
}


def _is(module: object, names: Mapping[str, str], *suffixes: str) -> bool:
    """Whether ``module``'s exact class is one of ``names`` (with one of ``suffixes`` replacing
    the ``"Layer"`` of the name, e.g. ``BertLayer`` + ``"SelfOutput"`` → ``BertSelfOutput``)."""
    cls = type(module)
    for name, prefix in names.items():
        stem = name[: -len("Layer")] if name.endswith("Layer") else name
        wanted = [stem + s for s in suffixes] if suffixes else [name]
        if cls.__name__ in wanted and cls.__module__.startswith(prefix):
            return True
    return False


def _derived(module: object) -> bool:
    """A subclass of a recognised layer (its computation may differ: left alone)."""
    return any(
        c.__name__ in _KNOWN and c.__module__.startswith(_KNOWN[c.__name__])
        for c in type(module).__mro__[1:]
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _linear(module: object) -> bool:
    return type(module) is nn.Linear


def _norm(module: object) -> bool:
    return type(module) is nn.LayerNorm


# --------------------------------------------------------------------------------------------
# Replacement modules


class _BiasOnly(nn.Module):
    """Holds the output bias of a removed projection under its original name (``<proj>.bias``)."""

    def __init__(self, bias: nn.Parameter) -> None:
        super().__init__()
        self.bias = bias


def _bias_from(module: nn.Module, keep: bool, where: str) -> nn.Parameter | None:
    bias = getattr(module, "bias", None)
    if not keep:
        return None
    if not isinstance(bias, nn.Parameter):
        raise ValueError(f"{where}: args['bias'] is true but the projection has no bias.")
    return bias


def _flag(args: Mapping[str, Any], key: str, where: str) -> bool:
    value = args[key]
    if not isinstance(value, bool):
        raise ValueError(f"{where}: args[{key!r}] must be a bool, got {value!r:.80}.")
    return value


def _name_arg(args: Mapping[str, Any], key: str, where: str) -> str | None:
    value = args[key]
    if value is not None and not (isinstance(value, str) and value.isidentifier()):
        raise ValueError(
            f"{where}: args[{key!r}] must be an attribute name or None, got {value!r:.80}."
        )
    return value


class ZeroBranch(nn.Module):
    """A residual branch with no live unit: its output is its output bias (or 0), whatever the
    input, of the input's shape (the residual stream's width).

    ``bias_name`` keeps that bias under the name of the projection it belonged to (``o_proj``,
    ``fc2``, ``c_proj``), so ``state_dict`` keys do not change; ``dropout`` is the branch's dropout
    on its output, if any; ``returns_tuple`` returns ``(output, None)`` as attentions do.
    """

    def __init__(
        self,
        width: int,
        bias_name: str | None,
        bias: nn.Parameter | None,
        dropout: nn.Module | None,
        returns_tuple: bool,
    ) -> None:
        super().__init__()
        self.width = width
        self.bias_name = bias_name
        self.returns_tuple = returns_tuple
        if bias_name is not None:
            setattr(self, bias_name, _BiasOnly(bias))
        self.dropout = dropout

    def extra_repr(self) -> str:
        return f"width={self.width}, bias={self.bias_name is not None}"

    def output(self, hidden_states: Tensor) -> Tensor:
        out = hidden_states.new_zeros((*hidden_states.shape[:-1], self.width))
        if self.bias_name is not None:
            out = out + getattr(self, self.bias_name).bias
            if self.dropout is not None:
                out = self.dropout(out)
        return out

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.output(hidden_states)
        return (out, None) if self.returns_tuple else out


@register_replacement("hf_removed_branch")
def _removed_branch(module: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    where = f"hf_removed_branch of a {type(module).__name__}"
    bias_name = _name_arg(args, "bias", where)
    dropout_name = _name_arg(args, "dropout", where)
    proj = _name_arg(args, "proj", where)
    returns_tuple = _flag(args, "tuple", where)
    projection = getattr(module, proj or "", None)
    width = integer(args["width"], f"{where}: args['width']", minimum=1)
    bias = None
    if bias_name is not None:
        if projection is None:
            raise ValueError(f"{where}: the module has no projection {proj!r}.")
        bias = _bias_from(projection, True, where)
        if bias.numel() != width:
            raise ValueError(f"{where}: the bias has {bias.numel()} entries, not {width}.")
    dropout = getattr(module, dropout_name) if dropout_name is not None else None
    if dropout is not None and not isinstance(dropout, nn.Dropout):
        raise ValueError(f"{where}: {dropout_name!r} is not an nn.Dropout.")
    return ZeroBranch(width, bias_name, bias, dropout, returns_tuple)


@register_replacement("hf_unused_norm")
def _unused_norm(module: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    """The LayerNorm feeding a removed pre-norm branch: the branch reads only its shape."""
    if not isinstance(module, nn.LayerNorm):
        raise TypeError(f"hf_unused_norm: expected an nn.LayerNorm, got {type(module).__name__}.")
    return nn.Identity()


@register_replacement("hf_encoder_attention_heads")
def _attention_heads(module: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    """Set the head count of a self-attention whose projections were sliced to ``heads`` heads
    (the forward reshapes with ``-1`` heads; the count is kept consistent for everything else)."""
    if not _is(module, _SELF_ATTENTIONS):
        raise TypeError(
            f"hf_encoder_attention_heads: not a known attention, got {type(module).__name__}."
        )
    heads = integer(args["heads"], "hf_encoder_attention_heads: args['heads']", minimum=1)
    hd = _head_dim(module)
    for proj in _qkv(module):
        if proj.out_features != heads * hd:
            raise ValueError(
                f"hf_encoder_attention_heads: a projection has {proj.out_features} outputs, not "
                f"{heads} heads × {hd}."
            )
    module.num_attention_heads = heads
    if hasattr(module, "all_head_size"):
        module.all_head_size = heads * hd
    return module


def keep_cache_length(cache: Any, layer_idx: Any, hidden_states: Tensor, kwargs: Any) -> None:
    """Record in ``cache`` (a ``transformers`` ``Cache``) that layer ``layer_idx`` saw the tokens
    of ``hidden_states``, for an attention that was removed: the cache measures the sequence
    length from its layers' keys, so a removed attention stores one zero key/value of width 1 per
    token instead of nothing."""
    if cache is None:
        return
    current = getattr(cache, "self_attention_cache", cache)
    empty = hidden_states.new_zeros((hidden_states.shape[0], 1, hidden_states.shape[-2], 1))
    current.update(empty, empty.clone(), layer_idx, kwargs=kwargs)


class RemovedBertOutput(nn.Module):
    """A BERT ``SelfOutput``/``Output`` (``LayerNorm(dropout(dense(h)) + x)``) whose ``dense``
    has no live input: ``LayerNorm(x + b)`` with ``b`` its bias (``has_bias``) or 0. The
    LayerNorm (and the bias, as ``dense.bias``) keep their names."""

    def __init__(self, output: nn.Module, has_bias: bool) -> None:
        super().__init__()
        where = f"RemovedBertOutput of a {type(output).__name__}"
        self.LayerNorm = output.LayerNorm
        self.dropout = output.dropout
        self.has_bias = has_bias
        if has_bias:
            self.dense = _BiasOnly(_bias_from(output.dense, True, where))

    def extra_repr(self) -> str:
        return f"bias={self.has_bias}"

    def forward(self, hidden_states: Any, input_tensor: Tensor) -> Tensor:
        if not self.has_bias:
            return self.LayerNorm(input_tensor)
        return self.LayerNorm(self.dropout(self.dense.bias) + input_tensor)


class RemovedBertAttention(nn.Module):
    """A BERT attention sublayer (``BertAttention``) with no live head: ``LayerNorm(x + b)``.

    Same call as ``BertAttention`` (returns ``(output, None)``); in a decoder with a cache it
    records the tokens' length in the cache (:func:`keep_cache_length`)."""

    def __init__(self, attention: nn.Module, has_bias: bool) -> None:
        super().__init__()
        self.layer_idx = getattr(attention.self, "layer_idx", None)
        self.output = RemovedBertOutput(attention.output, has_bias)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        keep_cache_length(cache if cache is not None else past_key_values, self.layer_idx,
                          hidden_states, kwargs)  # fmt: skip
        return self.output(None, hidden_states), None


class EmptyIntermediate(nn.Module):
    """A BERT ``Intermediate`` with no neuron left: a zero-width output (what
    :class:`RemovedBertOutput` ignores)."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        return hidden_states.new_empty((*hidden_states.shape[:-1], 0))


@register_replacement("hf_bert_removed_attention")
def _bert_removed_attention(module: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    if not _is(module, _BERT, "Attention"):
        raise TypeError(
            f"hf_bert_removed_attention: expected a BERT attention, got {type(module).__name__}."
        )
    return RemovedBertAttention(module, _flag(args, "bias", "hf_bert_removed_attention"))


@register_replacement("hf_bert_removed_output")
def _bert_removed_output(module: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    if not _is(module, _BERT, "Output"):
        raise TypeError(
            f"hf_bert_removed_output: expected a BERT output, got {type(module).__name__}."
        )
    return RemovedBertOutput(module, _flag(args, "bias", "hf_bert_removed_output"))


@register_replacement("hf_bert_empty_intermediate")
def _bert_empty_intermediate(module: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    if not _is(module, _BERT, "Intermediate"):
        raise TypeError(
            f"hf_bert_empty_intermediate: expected a BERT intermediate, got "
            f"{type(module).__name__}."
        )
    return EmptyIntermediate()


# --------------------------------------------------------------------------------------------
# Layout


def _qkv(attention: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    if hasattr(attention, "q_proj"):
        return attention.q_proj, attention.k_proj, attention.v_proj
    return attention.query, attention.key, attention.value


def _head_dim(attention: nn.Module) -> int:
    hd = getattr(attention, "attention_head_size", None)
    return int(hd if hd is not None else attention.head_dim)


class _Parts:
    """The pieces of one recognised layer; a sublayer already removed by compression is
    ``None``."""

    def __init__(self, name: str, layer: nn.Module) -> None:
        self.name = name
        self.bert = _is(layer, _BERT)
        self.attention: nn.Module | None = None  # the module holding q/k/v
        self.out: nn.Linear | None = None  # the attention's output projection
        self.fc1: nn.Linear | None = None
        self.fc2: nn.Linear | None = None
        self.attn_norm: nn.Module | None = None  # pre-norm only
        self.mlp_norm: nn.Module | None = None
        if self.bert:
            self._bert(layer)
        else:
            self._vit(layer)
        if self.attention is not None:
            hd = _head_dim(self.attention)
            q, k, v = _qkv(self.attention)
            if not (
                all(_linear(p) for p in (q, k, v, self.out))
                and hd > 0
                and q.out_features == k.out_features == v.out_features == self.out.in_features
                and q.out_features % hd == 0
                and q.out_features // hd == self.attention.num_attention_heads
            ):
                raise ValueError("its query/key/value/output projections do not match its heads")
            self.heads, self.hd = q.out_features // hd, hd
        if self.fc1 is not None and not (
            _linear(self.fc1)
            and _linear(self.fc2)
            and self.fc1.out_features == self.fc2.in_features
        ):
            raise ValueError("its MLP projections are not two nn.Linear of matching width")

    def _bert(self, layer: nn.Module) -> None:
        attention = layer.attention
        if isinstance(attention, RemovedBertAttention):
            pass
        elif _is(attention, _BERT, "Attention") and _is(attention.self, _BERT, "SelfAttention"):
            if not (
                _is(attention.output, _BERT, "SelfOutput") and _norm(attention.output.LayerNorm)
            ):
                raise ValueError("attention.output is not a BERT SelfOutput")
            self.attention, self.out = attention.self, attention.output.dense
        else:
            raise ValueError(f"attention is a {type(attention).__name__}")
        inter, out = layer.intermediate, layer.output
        if isinstance(inter, EmptyIntermediate) and isinstance(out, RemovedBertOutput):
            return
        if not (_is(inter, _BERT, "Intermediate") and _is(out, _BERT, "Output")):
            raise ValueError(
                f"intermediate/output are a {type(inter).__name__} and a {type(out).__name__}"
            )
        if not _norm(out.LayerNorm):
            raise ValueError("output.LayerNorm is not an nn.LayerNorm")
        self.fc1, self.fc2 = inter.dense, out.dense

    def _vit(self, layer: nn.Module) -> None:
        attention, mlp = layer.attention, layer.mlp
        if isinstance(attention, ZeroBranch):
            pass
        elif _is(attention, _SELF_ATTENTIONS) and _norm(layer.layernorm_before):
            self.attention, self.out = attention, attention.o_proj
            self.attn_norm = layer.layernorm_before
        else:
            raise ValueError(f"attention is a {type(attention).__name__}")
        if isinstance(mlp, ZeroBranch):
            return
        if not (_is(mlp, _VIT, "MLP") and _norm(layer.layernorm_after)):
            raise ValueError(f"mlp is a {type(mlp).__name__}")
        self.fc1, self.fc2, self.mlp_norm = mlp.fc1, mlp.fc2, layer.layernorm_after


def _layers(model: nn.Module, caller: str) -> list[_Parts]:
    """The recognised layers of ``model`` that are safe to handle; others with a warning."""
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    pcounts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    found: list[_Parts] = []
    for name, module in model.named_modules():
        label = name or "the model"
        if not _is(module, _KNOWN):
            if _derived(module):
                warnings.warn(
                    f"{caller}: {label} ({type(module).__name__}) subclasses a Hugging Face "
                    "encoder layer and is left alone.",
                    stacklevel=4,
                )
            continue
        if any(counts[id(m)] > 1 for m in module.modules()) or any(
            pcounts[id(p)] > 1 for p in module.parameters()
        ):
            warnings.warn(
                f"{caller}: {label} shares modules or parameters with others and is left alone.",
                stacklevel=4,
            )
            continue
        try:
            found.append(_Parts(name, module))
        except (ValueError, AttributeError) as e:
            warnings.warn(
                f"{caller}: {label} ({type(module).__name__}) has a layout this family does not "
                f"know ({e}) and is left alone.",
                stacklevel=4,
            )
    return found


# --------------------------------------------------------------------------------------------
# Levels


def _head_members(p: _Parts, h: int) -> list:
    rows = slice(h * p.hd, (h + 1) * p.hd)
    members: list = []
    for proj in _qkv(p.attention):
        members.append((proj.weight, 0, rows))
        if proj.bias is not None:
            members.append((proj.bias, 0, rows))
    members.append((p.out.weight, 1, rows))
    return members


def levels(model: nn.Module) -> dict[str, dict[str, list]]:
    """The levels of the module docstring for every recognised layer (frozen ones included)."""
    base: dict[str, list] = {}
    layer: dict[str, list] = {}
    for p in _layers(model, "transformer()"):
        if p.attention is not None:
            attn = _join(p.name, "attention")
            for h in range(p.heads):
                base[f"{attn}.head[{h}]"] = _head_members(p, h)
            params = [t for proj in (*_qkv(p.attention), p.out) for t in proj.parameters()]
            if p.attn_norm is not None:
                params += list(p.attn_norm.parameters())
            layer[attn] = params
        if p.fc1 is not None:
            mlp = _join(p.name, "mlp")
            for i in range(p.fc1.out_features):
                base[f"{mlp}[{i}]"] = hidden_unit([p.fc1], p.fc2, i)
            params = [*p.fc1.parameters(), *p.fc2.parameters()]
            if p.mlp_norm is not None:
                params += list(p.mlp_norm.parameters())
            layer[mlp] = params
    return {"base_level": base, "layer": layer}


# --------------------------------------------------------------------------------------------
# Planning


def _zero(t: Tensor | None) -> bool:
    return t is None or not bool(t.detach().any())


@torch.no_grad()
def dead_heads(p: _Parts) -> Tensor:
    """Heads contributing exactly 0: zero output columns, or zero values (rows and bias)."""
    heads, hd = p.heads, p.hd
    out_zero = (p.out.weight.detach().reshape(-1, heads, hd) == 0).all(-1).all(0)
    v = _qkv(p.attention)[2]
    values_zero = (v.weight.detach().reshape(heads, -1) == 0).all(-1)
    if v.bias is not None:
        values_zero &= (v.bias.detach().reshape(heads, hd) == 0).all(-1)
    return (out_zero | values_zero).cpu()


def _rows(keep: Sequence[int], hd: int) -> tuple[int, ...]:
    return tuple(h * hd + j for h in keep for j in range(hd))


def _attention_ops(p: _Parts, multiple: int) -> list[Op]:
    layer = p.name
    dead = dead_heads(p)
    has_bias = not _zero(p.out.bias)
    if bool(dead.all()):
        if p.bert:
            return [ReplaceOp(_join(layer, "attention"), "hf_bert_removed_attention",
                              {"bias": has_bias})]  # fmt: skip
        args = {"width": p.out.out_features, "bias": "o_proj" if has_bias else None,
                "proj": "o_proj", "dropout": None, "tuple": True}  # fmt: skip
        return [
            ReplaceOp(_join(layer, "attention"), "hf_removed_branch", args),
            ReplaceOp(_join(layer, "layernorm_before"), "hf_unused_norm", {}),
        ]
    keep = kept_indices(dead, multiple)
    if len(keep) == p.heads:
        return []
    rows = _rows(keep, p.hd)
    if p.bert:
        attn, names = _join(layer, "attention.self"), ("query", "key", "value")
        out = _join(layer, "attention.output.dense")
    else:
        attn, names = _join(layer, "attention"), ("q_proj", "k_proj", "v_proj")
        out = _join(layer, "attention.o_proj")
    ops: list[Op] = [SliceOp(_join(attn, n), "out", rows) for n in names]
    ops.append(SliceOp(out, "in", rows))
    ops.append(ReplaceOp(attn, "hf_encoder_attention_heads", {"heads": len(keep)}))
    return ops


def _mlp_ops(p: _Parts, multiple: int) -> list[Op]:
    layer = p.name
    dead = (p.fc2.weight.detach() == 0).all(0).cpu()
    has_bias = not _zero(p.fc2.bias)
    if bool(dead.all()):
        if p.bert:
            return [
                ReplaceOp(_join(layer, "intermediate"), "hf_bert_empty_intermediate", {}),
                ReplaceOp(_join(layer, "output"), "hf_bert_removed_output", {"bias": has_bias}),
            ]
        args = {"width": p.fc2.out_features, "bias": "fc2" if has_bias else None,
                "proj": "fc2", "dropout": None, "tuple": False}  # fmt: skip
        return [
            ReplaceOp(_join(layer, "mlp"), "hf_removed_branch", args),
            ReplaceOp(_join(layer, "layernorm_after"), "hf_unused_norm", {}),
        ]
    keep = tuple(kept_indices(dead, multiple))
    if len(keep) == dead.numel():
        return []
    fc1, fc2 = ("intermediate.dense", "output.dense") if p.bert else ("mlp.fc1", "mlp.fc2")
    return [SliceOp(_join(layer, fc1), "out", keep), SliceOp(_join(layer, fc2), "in", keep)]


def plan(model: nn.Module, multiple: int = 1) -> list[Op]:
    """Operations removing the dead heads, neurons and sublayers of the recognised layers (see the
    module docstring). Widths are rounded up to a multiple of ``multiple`` by keeping dead units."""
    ops: list[Op] = []
    for p in _layers(model, "compress()"):
        # Every replacement is of a child of the layer, so a model that is a layer works too.
        if p.attention is not None:
            ops += _attention_ops(p, multiple)
        if p.fc1 is not None:
            ops += _mlp_ops(p, multiple)
    return ops


def applies(model: nn.Module) -> bool:
    """Whether ``model`` holds a recognised BERT/RoBERTa/ViT layer (or a subclass of one)."""
    return any(_is(m, _KNOWN) or _derived(m) for m in model.modules())


HF_ENCODER = register_family(
    Family(
        name="hf-encoder",
        builder="transformer",
        description=(
            "Hugging Face BERT-style encoder layers (BertLayer, RobertaLayer) and ViT layers "
            "(ViTLayer)"
        ),
        applies=applies,
        levels=levels,
        plan=plan,
    )
)
