"""Hierarchy of mixture-of-experts layers: expert hidden units inside whole experts."""

from __future__ import annotations

from torch import nn

from .core import Hierarchy, Member, check_include_frozen, gc_paused, without_frozen

__all__ = ["has_experts", "moe", "moe_levels"]

# Names that mark the projection out of the hidden layer, for experts where shapes cannot tell.
_DOWN_NAMES = ("fc2", "w2", "down_proj", "linear2", "w_out", "w_down", "out_proj", "proj_out")


def _down_index(names: list[str], in_dims: list[int], hidden: list[int], down: str | None) -> int:
    """Which of the expert's projections reads the hidden layer (the others write it)."""
    if down is not None:
        if down not in names:
            raise ValueError(f"down={down!r} is not one of the expert's projections {names}.")
        return names.index(down)
    # The down projection is the one whose input width is the others' (shared) hidden width.
    fits = [
        i
        for i in range(len(names))
        if all(
            hidden[j] == in_dims[i] and in_dims[j] != in_dims[i]
            for j in range(len(names))
            if j != i
        )
    ]
    if len(fits) == 1:
        return fits[0]
    named = [i for i, n in enumerate(names) if n.rpartition(".")[2] in _DOWN_NAMES]
    if len(named) == 1 and all(
        hidden[j] == in_dims[named[0]] for j in range(len(names)) if j != named[0]
    ):
        return named[0]
    raise ValueError(
        f"cannot tell which of the expert's projections {names} reads the hidden layer (its "
        f"input widths are {in_dims}); pass down=<its name>."
    )


def _list_expert_groups(
    prefix: str, experts: nn.ModuleList, down: str | None
) -> tuple[dict[str, list[Member]], dict[str, list[Member]]]:
    units: dict[str, list[Member]] = {}
    blocks: dict[str, list[Member]] = {}
    for e, expert in enumerate(experts):
        where = f"{prefix}.{e}"
        if next(expert.parameters(), None) is None:
            continue  # an expert removed by compression: nothing left to penalise
        linears = [(n, m) for n, m in expert.named_modules() if isinstance(m, nn.Linear)]
        if len(linears) < 2:
            raise ValueError(
                f"expert {where!r} has {len(linears)} nn.Linear layer(s); an expert MLP needs a "
                "projection into its hidden layer and one out of it."
            )
        names = [n for n, _ in linears]
        k = _down_index(
            names, [m.in_features for _, m in linears], [m.out_features for _, m in linears], down
        )
        ups = [m for i, (_, m) in enumerate(linears) if i != k]
        proj = linears[k][1]
        for j in range(proj.in_features):
            members: list[Member] = []
            for up in ups:
                members.append((up.weight, 0, j))
                if up.bias is not None:
                    members.append((up.bias, 0, j))
            members.append((proj.weight, 1, j))
            units[f"{where}[{j}]"] = members
        blocks[where] = list(expert.parameters())
    return units, blocks


def _fused_expert_groups(
    prefix: str, experts: nn.Module, down: str | None
) -> tuple[dict[str, list[Member]], dict[str, list[Member]]]:
    params = dict(experts.named_parameters(recurse=False))
    weights = {n: p for n, p in params.items() if p.dim() == 3}
    biases = {n: p for n, p in params.items() if p.dim() == 2}
    if len(weights) < 2 or len(params) != len(weights) + len(biases):
        raise ValueError(
            f"{prefix!r}: fused experts need 3-D weights [experts, d_in, d_hidden] and "
            "[experts, d_hidden, d_out] (and optional 2-D biases [experts, width]); found "
            f"{ {n: tuple(p.shape) for n, p in params.items()} }."
        )
    names = list(weights)
    k = _down_index(
        names,
        [int(p.shape[1]) for p in weights.values()],
        [int(p.shape[2]) for p in weights.values()],
        down,
    )
    num_experts = {int(p.shape[0]) for p in params.values()}
    if len(num_experts) != 1:
        raise ValueError(f"{prefix!r}: the fused tensors disagree on the number of experts.")
    (num,) = num_experts
    proj = weights[names[k]]
    hidden = int(proj.shape[1])
    ups = [w for i, w in enumerate(weights.values()) if i != k]
    if hidden != int(proj.shape[2]):
        up_biases = [b for b in biases.values() if b.shape[1] == hidden]
    else:
        # Square experts: tell the output bias by its name (w_out -> b_out, w_down -> b_down).
        tag = names[k].rpartition("_")[2]
        up_biases = [b for n, b in biases.items() if n.rpartition("_")[2] != tag]
    units: dict[str, list[Member]] = {}
    for e in range(num):
        for j in range(hidden):
            members: list[Member] = [(w, (0, 2), (e, j)) for w in ups]
            members += [(b, (0, 1), (e, j)) for b in up_biases]
            members.append((proj, (0, 1), (e, j)))
            units[f"{prefix}.{e}[{j}]"] = members
    blocks = {f"{prefix}.{e}": [(p, 0, e) for p in params.values()] for e in range(num)}
    return units, blocks


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
    units, experts = _expert_groups(model, down)
    levels = without_frozen(
        {"base_level": units, "block": experts},
        model,
        include_frozen=include_frozen,
        caller="moe()",
    )
    return Hierarchy(levels, names=model)


def has_experts(model: nn.Module) -> bool:
    """Whether some submodule of ``model`` has an ``experts`` module (an MoE layer)."""
    return any(isinstance(getattr(m, "experts", None), nn.Module) for m in model.modules())


def moe_levels(model: nn.Module) -> dict[str, dict[str, list[Member]]]:
    """The levels of :func:`moe` in the shared names of :mod:`group_prox.families.registry`
    (``base_level``: expert hidden units, ``expert``: whole experts), frozen parameters
    included."""
    units, experts = _expert_groups(model, None)
    return {"base_level": units, "expert": experts}


def _expert_groups(
    model: nn.Module, down: str | None
) -> tuple[dict[str, list[Member]], dict[str, list[Member]]]:
    layers = [
        (name, m.experts)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "experts", None), nn.Module)
    ]
    if not layers:
        raise ValueError(
            "moe(): no module of the model has an `experts` attribute (an nn.ModuleList of expert "
            "MLPs, or a module of fused [experts, ...] weights); build the hierarchy with "
            "group_prox.Hierarchy(...) instead."
        )
    units: dict[str, list[Member]] = {}
    blocks: dict[str, list[Member]] = {}
    from ..families import hf_moe  # the family module imports this one

    for name, experts in layers:
        prefix = f"{name}.experts" if name else "experts"
        if hf_moe.is_hf_experts(experts):
            # transformers' layout ([experts, out, in], gate and up rows in one tensor)
            u, b = hf_moe.expert_groups(prefix, experts)
            units.update(u)
            blocks.update(b)
            continue
        build = _list_expert_groups if isinstance(experts, nn.ModuleList) else _fused_expert_groups
        u, b = build(prefix, experts, down)
        units.update(u)
        blocks.update(b)
    return units, blocks
