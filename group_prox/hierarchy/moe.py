"""The ``moe`` builder: expert hidden units inside whole experts.

What the experts family knows (the layouts it recognises, its levels, its compression) lives in
:mod:`group_prox.families.experts`.
"""

from __future__ import annotations

from torch import nn

from .core import Hierarchy, check_include_frozen, gc_paused, without_frozen

__all__ = ["moe"]


@gc_paused()
def moe(model: nn.Module, *, down: str | None = None, include_frozen: bool = False) -> Hierarchy:
    """Two-level hierarchy of every mixture-of-experts layer in ``model``.

    An MoE layer is any module with an ``experts`` attribute holding either

    * an ``nn.ModuleList`` of expert MLPs, each with ``nn.Linear`` projections into its hidden
      layer (one, or two for gated experts such as SwiGLU's gate and up) and one out of it; or
    * a module of fused parameters: 3-D weights ``[experts, d_in, d_hidden]`` into the hidden layer
      and ``[experts, d_hidden, d_out]`` out of it, with optional 2-D biases ``[experts, width]``.
    * a Hugging Face fused experts module (transformers 5: ``gate_up_proj [experts, 2·d_hidden,
      d_model]`` and ``down_proj [experts, d_model, d_hidden]`` in the ``F.linear`` convention,
      or the variants its ``is_transposed``/``is_concatenated``/``has_gate``/``has_bias`` flags
      record): hidden unit ``j`` is its gate and up rows and column ``j`` of ``down_proj``, as
      :mod:`group_prox.families.hf_moe` groups them. ``down=`` does not apply to it. For a
      transformers MoE model :func:`group_prox.hierarchy.transformer` also gives the shared
      experts and the sublayers.

    The projection out of the hidden layer is recognised by its input width, the others' shared
    output width, when the others also share an input width of their own (gated experts). Where
    shapes cannot tell (two-layer experts, whose shapes are symmetric, and square ones) it is
    recognised by its name (``fc2``, ``w2``, ``down_proj``, ``w_out`` …), or give it as
    ``down=<name>``.

    Levels:

    * ``base_level``: one group per hidden unit ``j`` of expert ``e``: row ``j`` of every
      projection into the hidden layer and its bias entry, and column ``j`` of the projection out.
      A zero group is a removed hidden unit. Group name ``"<experts>.<e>[j]"``.
    * ``block``: one group per expert, all its parameters (including the output bias). A zero
      expert outputs exactly zero, so the tokens routed to it receive nothing from it. Group name
      ``"<experts>.<e>"`` (for a ``ModuleList`` this is the expert's module name).

    The router and everything outside the experts are in no group and are not penalised: the
    router still sends tokens to a zero expert, with its gate, and they receive ``gate · 0``.

    Parameters with ``requires_grad=False`` (frozen) are left out: a group all of whose members
    lie in frozen tensors is in no level (a coarser group too, once everything in it is frozen),
    so the hierarchy suits an optimizer over the trainable parameters only. A group with both
    frozen and trainable members is refused.

    Args:
        model: the model holding the MoE layers.
        down: the name of the experts' projection out of the hidden layer, where it cannot be
            recognised (see above).
        include_frozen: keep frozen parameters in their groups instead; then give them to the
            optimizer too, whose prox shrinks them although no gradient step changes them.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``down`` not a string or
            ``include_frozen`` not a ``bool``.
        ValueError: if ``model`` has no ``experts``, an expert's layout is not recognised, or a
            group is partly frozen (an expert with some of its projections frozen): the message
            names the level, the group and the frozen tensors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"moe(): expected an nn.Module, got {type(model).__name__}.")
    if down is not None and not isinstance(down, str):
        raise TypeError(
            "moe(): down must be the name of the experts' projection out of the hidden layer "
            f"(e.g. 'fc2'), or None; got {type(down).__name__}."
        )
    check_include_frozen(include_frozen, "moe()")
    from ..families.experts import expert_groups  # the family module imports this package

    units, experts = expert_groups(model, down)
    levels = without_frozen(
        {"base_level": units, "block": experts},
        model,
        include_frozen=include_frozen,
        caller="moe()",
    )
    return Hierarchy(levels, names=model)
