"""Mixture-of-experts layers (modules with an ``experts`` attribute): levels and compression.

An MoE layer is a module with an ``experts`` attribute holding an ``nn.ModuleList`` of expert
MLPs, or a module of fused ``[experts, ...]`` parameters (see :func:`group_prox.hierarchy.moe`);
Hugging Face fused experts are grouped by their own layout (:mod:`group_prox.families.hf_moe`).

Levels (``builder="moe"``): ``base_level``, one group per hidden unit of each expert, and
``expert``, one group per whole expert (:func:`group_prox.hierarchy.moe` names the latter
``block``).

Compression, of the layouts the levels recognise (by the same code): expert ``e`` computes
``y_e(x) = W_down^e · h^e(x) + b_down^e``, where the hidden activation
``h^e_j(x) = act(u^e_j(x))`` (or ``act(g^e_j(x)) · u^e_j(x)`` for gated experts) depends on unit
``j``'s rows of the projections into the hidden layer only. The router is never touched.

Removals, each exact (for finite activations, ``0 · h = 0``):

* **hidden unit** ``j`` of a ``ModuleList`` expert whose column ``W_down[:, j]`` is zero: its term
  ``W_down[:, j] · h_j`` is zero whatever ``h_j`` is, so its rows of the projections into the
  hidden layer and its column of the projection out are sliced away (``SliceOp``);
* **whole expert** ``e`` of a ``ModuleList`` whose ``W_down^e = 0`` and ``b_down^e = 0`` (or
  absent): ``y_e ≡ 0``, so it becomes a parameter-free :class:`ZeroExpert` (replacement kind
  ``"moe_zero_expert"``). The router still scores it, so the top-k choice and the softmax over the
  chosen logits are unchanged; tokens routed to it still receive ``gate · 0``;
* **fused hidden unit** ``j``, zero in the projection out of *every* expert (the hidden width is
  shared by all experts): sliced from every fused tensor along its hidden dimension (replacement
  kind ``"moe_fused_hidden"``);
* **fused whole expert** ``e`` (``W_down[e] = 0``, ``b_down[e] = 0``): only if the fused module
  implements the protocol below (replacement kind ``"moe_keep_experts"``); otherwise its zero
  rows stay, computing zero as before.

**Fused-experts protocol.** A fused experts module may define
``keep_experts(self, kept: list[int]) -> None``: keep only the rows ``kept`` (increasing indices
along the fused tensors' first dimension, as they are when it is called) of every fused parameter,
in place and under the same parameter names, after which the module must still be called with the
router's original expert indices (``len()`` unchanged) and compute exactly zero for an expert whose
row was dropped. The planner only drops rows whose expert computes zero, so outputs are unchanged.
It must depend only on ``kept`` and the module's structure (the plan is re-applied to a freshly
built model by :func:`group_prox.load_compressed`). ``examples/moe.py``'s ``FusedExperts``
implements it.

Assumed, as by the hierarchy: an expert's output is its down projection's output, and everything
between the projections acts unit by unit (activations, gating products). A ``ModuleList`` expert
with parameters outside its ``nn.Linear`` layers keeps its hidden units; a layer whose projection
out cannot be recognised (see ``down=`` in :func:`group_prox.hierarchy.moe`) is left as it is, with
a warning. ``compress(..., example_inputs=x)`` checks the result.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..compression.plan import Op, ReplaceOp, SliceOp, indices, integer, register_replacement
from ..compression.surgery import check_keep, kept_indices, set_tensor
from ..hierarchy.core import GroupTable, Member, hidden_unit
from .registry import Family, register_family

__all__ = ["EXPERTS", "ZeroExpert", "applies", "expert_groups", "levels", "plan"]


# --------------------------------------------------------------------------------------------
# Detection and levels


def applies(model: nn.Module) -> bool:
    """Whether some submodule of ``model`` has an ``experts`` module (an MoE layer)."""
    return any(isinstance(getattr(m, "experts", None), nn.Module) for m in model.modules())


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
            units[f"{where}[{j}]"] = hidden_unit(ups, proj, j)
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


def levels(model: nn.Module) -> dict[str, GroupTable]:
    """The levels of :func:`group_prox.hierarchy.moe` in the shared names of
    :mod:`group_prox.families.registry`
    (``base_level``: expert hidden units, ``expert``: whole experts), frozen parameters
    included."""
    units, experts = expert_groups(model, None)
    return {"base_level": units, "expert": experts}


def expert_groups(model: nn.Module, down: str | None) -> tuple[GroupTable, GroupTable]:
    """``(hidden units, whole experts)``: the groups of :func:`group_prox.hierarchy.moe` (``down``
    as there), frozen parameters included."""
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
    units: list[Mapping[str, list[Member]]] = []
    blocks: list[Mapping[str, list[Member]]] = []
    from . import hf_moe  # registered after this family, so imported here

    for name, experts in layers:
        prefix = f"{name}.experts" if name else "experts"
        if hf_moe.is_hf_experts(experts):
            # transformers' layout ([experts, out, in], gate and up rows in one tensor)
            u, b = hf_moe.expert_groups(prefix, experts)
        else:
            build = (
                _list_expert_groups if isinstance(experts, nn.ModuleList) else _fused_expert_groups
            )
            u, b = build(prefix, experts, down)
        units.append(u)
        blocks.append(b)
    return GroupTable.concat(units), GroupTable.concat(blocks)


# --------------------------------------------------------------------------------------------
# Compression


def _output_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear layer would have produced from ``x`` (autocast's, when it is on)."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class ZeroExpert(nn.Module):
    """An expert whose output was exactly zero: ``x ↦ 0`` of width ``out_features``.

    It has no parameters and does no arithmetic, just allocates ``x.shape[:-1] + (out_features,)``
    zeros on ``x``'s device, in the dtype the removed expert's last linear layer would have given.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros(
            (*x.shape[:-1], self.out_features), dtype=_output_dtype(x), device=x.device
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


@register_replacement("moe_zero_expert")
def _zero_expert(expert: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    return ZeroExpert(
        integer(args["in_features"], "args['in_features']", minimum=1),
        integer(args["out_features"], "args['out_features']", minimum=1),
    )


@register_replacement("moe_fused_hidden")
def _fused_hidden(experts: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    """Keep hidden units ``args["keep"]`` of every tensor ``name`` along ``args["dims"][name]``."""
    where = f"fused experts {type(experts).__name__!r}"
    keep = indices(args["keep"], "args['keep']")
    dims = args["dims"]
    if not isinstance(dims, Mapping):
        raise ValueError(f"args['dims'] must be a dict {{tensor name: dim}}, got {dims!r:.80}.")
    for name, dim in dims.items():
        dim = integer(dim, f"args['dims'][{name!r}]")
        t = getattr(experts, name, None)
        if not isinstance(t, Tensor) or t.dim() <= dim:
            raise ValueError(f"{where}: has no fused tensor {name!r} with a dimension {dim}.")
        idx = check_keep(keep, int(t.shape[dim]), f"{where}, tensor {name!r}")
        set_tensor(experts, name, dim, idx)
    return experts


@register_replacement("moe_keep_experts")
def _keep_experts(experts: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    keep = getattr(experts, "keep_experts", None)
    if not callable(keep):
        raise TypeError(
            f"fused experts {type(experts).__name__!r} have no keep_experts(kept) method, which "
            "this plan calls; was the model built with the class that was compressed?"
        )
    keep(list(indices(args["keep"], "args['keep']")))
    return experts


def _moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, experts)`` of every MoE layer, ``name`` being the experts module's own name."""
    from .hf_moe import is_hf_experts  # registered after this family, so imported here

    names = {id(m): n for n, m in model.named_modules()}
    layers = []
    for m in model.modules():
        experts = getattr(m, "experts", None)
        # Hugging Face fused experts are compressed by their own family (families/hf_moe.py).
        if isinstance(experts, nn.Module) and id(experts) in names and not is_hf_experts(experts):
            layers.append((names[id(experts)], experts))
    return layers


def plan(model: nn.Module, *, multiple: int = 1) -> list[Op]:
    """Operations removing every dead hidden unit and expert of the MoE layers in ``model``.

    Hidden widths are rounded up to a multiple of ``multiple`` by keeping some dead units; at least
    one unit is kept. Layers whose layout is not recognised are left unchanged, with a warning.
    """
    ops: list[Op] = []
    for name, experts in _moe_layers(model):
        try:
            if isinstance(experts, nn.ModuleList):
                ops += _list_ops(name, experts, multiple)
            else:
                ops += _fused_ops(name, experts, multiple)
        except ValueError as e:
            warnings.warn(f"compress(): MoE layer {name!r} is left uncompressed: {e}", stacklevel=4)
    return ops


def _projections(where: str, expert: nn.Module) -> tuple[list[str], str]:
    """Names of the expert's projections into its hidden layer, and of the one out of it."""
    linears = [(n, m) for n, m in expert.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        raise ValueError(f"expert {where!r} has {len(linears)} nn.Linear layer(s), not an MLP.")
    names = [n for n, _ in linears]
    try:
        k = _down_index(
            names, [m.in_features for _, m in linears], [m.out_features for _, m in linears], None
        )
    except ValueError:
        # A Sequential runs its layers in order: of two linear layers, the second reads the hidden
        # layer the first writes.
        direct = all("." not in n for n in names)
        if not (isinstance(expert, nn.Sequential) and len(linears) == 2 and direct):
            raise ValueError(
                f"cannot tell which of the projections {names} of expert {where!r} reads its hidden "
                "layer (recognised by shape, by name such as fc2/w2/down_proj, or as the second "
                "linear layer of an nn.Sequential)."
            ) from None
        k = 1
    return [n for i, n in enumerate(names) if i != k], names[k]


def _list_ops(name: str, experts: nn.ModuleList, multiple: int) -> list[Op]:
    ops: list[Op] = []
    for e, expert in enumerate(experts):
        if isinstance(expert, ZeroExpert):
            continue
        where = f"{name}.{e}"
        ups, down = _projections(where, expert)
        proj = expert.get_submodule(down)
        with torch.no_grad():
            dead_units = (proj.weight == 0).all(0).cpu()
            dead_expert = bool(dead_units.all()) and (
                proj.bias is None or bool((proj.bias == 0).all())
            )
        if dead_expert:
            d_in = expert.get_submodule(ups[0]).in_features
            args = {"in_features": d_in, "out_features": proj.out_features}
            ops.append(ReplaceOp(where, "moe_zero_expert", args))
            continue
        own = {id(p) for n in (*ups, down) for p in expert.get_submodule(n).parameters()}
        if any(id(p) not in own for p in expert.parameters()):
            continue  # a parameterised module between the projections might mix hidden units
        keep = tuple(kept_indices(dead_units, multiple))
        if len(keep) < dead_units.numel():
            ops += [SliceOp(f"{where}.{u}", "out", keep) for u in ups]
            ops.append(SliceOp(f"{where}.{down}", "in", keep))
    return ops


def _fused_layout(name: str, experts: nn.Module) -> tuple[dict[str, int], str, list[str]]:
    """``({tensor: its hidden dimension}, the projection out, [output biases])``, read off the
    hierarchy's own grouping of hidden unit 0 of expert 0, so that a removed unit is exactly what
    a ``base_level`` group of :func:`group_prox.hierarchy.moe` covers."""
    params = dict(experts.named_parameters(recurse=False))
    if len({int(p.shape[0]) for p in params.values() if p.dim()}) > 1:
        raise ValueError("the fused tensors disagree on the number of experts.")
    # The grouping depends on names and shapes only: read it off a one-expert copy on the meta
    # device, which costs O(hidden) instead of O(experts · hidden).
    one = nn.Module()
    for n, p in params.items():
        shape = (1, *p.shape[1:]) if p.dim() else ()
        one.register_parameter(n, nn.Parameter(torch.empty(shape, device="meta")))
    units, _ = _fused_expert_groups(name, one, None)
    by_id = {id(p): n for n, p in one.named_parameters()}
    members = units[f"{name}.0[0]"]
    dims = {by_id[id(t)]: int(d[1]) for t, d, _ in members}
    down = by_id[id(members[-1][0])]  # the hierarchy lists the projection out last
    out_biases = [n for n, p in params.items() if p.dim() == 2 and n not in dims]
    return dims, down, out_biases


def _fused_ops(name: str, experts: nn.Module, multiple: int) -> list[Op]:
    dims, down, out_biases = _fused_layout(name, experts)
    with torch.no_grad():
        proj = getattr(experts, down)
        rows = (proj.movedim(dims[down], 1) == 0).flatten(2).all(2).cpu()  # [experts, hidden]
        dead_expert = rows.all(1)
        for b in out_biases:
            dead_expert &= (getattr(experts, b) == 0).all(1).cpu()
    ops: list[Op] = []
    keep = kept_indices(rows.all(0), multiple)
    if len(keep) < rows.shape[1]:
        ops.append(ReplaceOp(name, "moe_fused_hidden", {"keep": keep, "dims": dims}))
    if callable(getattr(experts, "keep_experts", None)) and bool(dead_expert.any()):
        ops.append(ReplaceOp(name, "moe_keep_experts", {"keep": kept_indices(dead_expert)}))
    return ops


EXPERTS = register_family(
    Family(
        name="experts",
        builder="moe",
        description="mixture-of-experts layers (modules with an `experts` attribute)",
        applies=applies,
        levels=levels,
        plan=lambda model, multiple: plan(model, multiple=multiple),
    )
)
