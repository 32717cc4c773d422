"""The ``transformer`` builder: the hierarchy of the transformer families of the registry.

What each family knows (its levels, its compression) lives in its own module:
:mod:`group_prox.families.torch_transformer` for ``torch.nn``'s attention and transformer layers,
the ``hf_*``, ``timm_vit`` and ``torchvision_vit`` modules of :mod:`group_prox.families` for the
others.
"""

from __future__ import annotations

from torch import nn

from .core import Hierarchy, from_families, gc_paused

__all__ = ["transformer"]


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
    return from_families(model, "transformer", include_frozen=include_frozen)
