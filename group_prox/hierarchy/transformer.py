"""Hierarchy of a transformer built from ``torch.nn``'s attention and transformer layers."""

from __future__ import annotations

from torch import Tensor, nn

from ..families.registry import levels_for
from .core import Hierarchy, Member, check_include_frozen, gc_paused, without_frozen

__all__ = [
    "has_torch_transformer",
    "register_attention_kind",
    "register_layer_kind",
    "torch_transformer_levels",
    "transformer",
]

# Layer classes by the torch layer whose structure they have (compression's own layers add
# themselves through register_layer_kind, so that a compressed model gets a hierarchy again).
_LAYER_KINDS: dict[type[nn.Module], type[nn.Module]] = {
    nn.TransformerEncoderLayer: nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer: nn.TransformerDecoderLayer,
}
_ATTENTIONS: list[type[nn.Module]] = [nn.MultiheadAttention]


def register_layer_kind(cls: type[nn.Module], like: type[nn.Module]) -> None:
    """Group the layers of class ``cls`` as those of ``like`` (``nn.TransformerEncoderLayer`` or
    ``nn.TransformerDecoderLayer``), whose sublayer attributes they share."""
    if like not in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
        raise ValueError(f"register_layer_kind(): like must be a torch layer class, got {like}.")
    _LAYER_KINDS[cls] = like


def register_attention_kind(cls: type[nn.Module]) -> None:
    """Group the heads of class ``cls`` as those of ``nn.MultiheadAttention``, whose attributes
    (``num_heads``, ``head_dim``, ``in_proj_weight`` …, ``out_proj``) it has."""
    if cls not in _ATTENTIONS:
        _ATTENTIONS.append(cls)


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, tuple(_LAYER_KINDS))


def _is_attention(m: object) -> bool:
    return isinstance(m, tuple(_ATTENTIONS))


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


def _neuron_members(linear1: nn.Linear, linear2: nn.Linear, i: int) -> list[Member]:
    members: list[Member] = [(linear1.weight, 0, i)]
    if linear1.bias is not None:
        members.append((linear1.bias, 0, i))
    members.append((linear2.weight, 1, i))
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


@gc_paused()
def transformer(model: nn.Module, *, include_frozen: bool = False) -> Hierarchy:
    """Two-level hierarchy of a model built from ``torch.nn``'s transformer building blocks.

    Every ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer`` (also inside
    ``nn.TransformerEncoder``/``nn.TransformerDecoder``/``nn.Transformer``) and every other
    ``nn.MultiheadAttention`` of the model are found by type. Below, ``E`` is ``embed_dim``,
    ``hd = E // num_heads`` the head dimension, and a group name is the module name followed by a
    suffix (``<attn>`` is the name of a ``MultiheadAttention``, e.g.
    ``"encoder.layers.0.self_attn"``; ``<layer>`` that of an encoder/decoder layer).

    * ``base_level``:

      - one group per attention head ``h`` of every ``MultiheadAttention``: its rows
        ``h·hd:(h+1)·hd`` of the q, k and v projections (the three matching slices of the fused
        ``in_proj_weight`` and ``in_proj_bias``, or rows of ``q_proj_weight``/``k_proj_weight``/
        ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``E``), its channels of ``bias_k`` and
        ``bias_v`` if ``add_bias_kv``, and its columns ``h·hd:(h+1)·hd`` of ``out_proj.weight``.
        Name: ``"<attn>.head[h]"``. A zero head has zero queries, keys and values, so its
        attention is uniform over the keys it may attend to, whose values are all zero, and its
        ``out_proj`` columns are zero: it contributes exactly nothing to the output, with or
        without masks.
      - one group per hidden neuron ``i`` of the feed-forward block of every encoder/decoder
        layer: row ``i`` of ``linear1.weight``, ``linear1.bias[i]`` and column ``i`` of
        ``linear2.weight``. Name: ``"<layer>.mlp[i]"``. A zero neuron contributes exactly nothing,
        whatever the activation.

    * ``layer``: one group per residual branch ``f`` of ``x + f(...)``:

      - every attention sublayer: all parameters of ``self_attn`` (and, in a decoder layer, of
        ``multihead_attn``, its own group). Name: ``"<attn>"``, e.g.
        ``"decoder.layers.1.multihead_attn"``;
      - every feed-forward sublayer: ``linear1`` and ``linear2`` with their biases. Name:
        ``"<layer>.mlp"``;
      - a ``MultiheadAttention`` outside encoder/decoder layers: all its parameters. Name:
        ``"<attn>"`` (``"attention"`` when the model itself is a ``MultiheadAttention``).

      With ``norm_first=True`` the ``LayerNorm`` feeding a branch belongs to that branch's group
      (``norm1`` → self-attention; encoder ``norm2`` → feed-forward; decoder ``norm2`` →
      cross-attention, ``norm3`` → feed-forward). A zero attention or feed-forward group makes the
      sublayer's output exactly 0 (``out_proj``/``linear2`` and their biases are zero), so the
      residual block passes its input through: ``x + 0`` with ``norm_first=True``,
      ``norm(x + 0)`` with ``norm_first=False``.

    Every head and neuron group lies in its sublayer's group; ``out_proj.bias`` and ``linear2.bias``
    are in the ``layer`` group only. Not penalised (in no group): the ``LayerNorm`` of post-norm
    layers (``norm_first=False``: they come after the residual addition, so they are part of the
    trunk, not of a branch), the final ``norm`` of ``nn.TransformerEncoder``/``TransformerDecoder``,
    and every other parameter (embeddings, classifier).

    A module reached under several names (one layer object repeated in a ``ModuleList``, or an
    attention or a pair ``linear1``/``linear2`` shared by several layers) gets its groups once,
    under the first name it is met by (encoder/decoder layers first, in ``model.named_modules()``
    order, then the other attentions); a pre-norm layer that reuses an earlier layer's sublayer
    leaves its own norm for that sublayer in no group. ``nn.TransformerEncoder`` and
    ``nn.TransformerDecoder`` deep-copy their layer, so their layers share nothing.

    Parameters with ``requires_grad=False`` (frozen) are left out: a group all of whose members
    lie in frozen tensors is in no level (a coarser group too, once everything in it is frozen),
    so the hierarchy suits an optimizer over the trainable parameters only. A group with both
    frozen and trainable members is refused.

    Args:
        model: the model.
        include_frozen: keep frozen parameters in their groups instead; then give them to the
            optimizer too, whose prox shrinks them although no gradient step changes them.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``include_frozen`` is not a ``bool``.
        ValueError: if the model contains no ``MultiheadAttention``, ``TransformerEncoderLayer`` or
            ``TransformerDecoderLayer``, if such a layer's ``self_attn``/``multihead_attn``/
            ``linear1``/``linear2`` were replaced by other modules, if two different sublayers
            share only some of their parameters (their groups would overlap), or if a group is
            partly frozen (a head whose ``out_proj`` is frozen but not its ``in_proj``, a pre-norm
            sublayer with a frozen LayerNorm): the message names the level, the group and the
            frozen tensors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"transformer(): expected an nn.Module, got {type(model).__name__}.")
    check_include_frozen(include_frozen, "transformer()")
    levels = without_frozen(
        levels_for(model, "transformer", "transformer()"),
        model,
        include_frozen=include_frozen,
        caller="transformer()",
    )
    return Hierarchy(levels, names=model)


def has_torch_transformer(model: nn.Module) -> bool:
    """Whether ``model`` holds a ``torch.nn`` transformer layer or ``MultiheadAttention``."""
    return any(_is_layer(m) or _is_attention(m) for m in model.modules())


def torch_transformer_levels(model: nn.Module) -> dict[str, dict[str, list]]:
    """The levels of :func:`transformer` for the ``torch.nn`` layers and attentions of ``model``,
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
            base[f"{mlp}[{i}]"] = _neuron_members(l1, l2, i)
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
