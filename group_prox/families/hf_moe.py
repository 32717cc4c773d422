"""Hugging Face fused experts: the mixture-of-experts sublayers of transformers' MoE decoders.

transformers (5.x) stores the experts of an MoE sublayer (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek, GPT-OSS …) in one module of 3-D tensors, ``block.experts``, called as
``experts(hidden, top_k_index, top_k_weights)`` after the router ``block.gate``; Qwen2-MoE-like
blocks add a dense ``shared_expert`` (or ``shared_experts``) MLP, scaled by
``sigmoid(shared_expert_gate(x))`` where there is one. Expert ``e`` computes

    ``h = _apply_gate(x · gate_up_proj[e]ᵀ)``, ``y_e = h · down_proj[e]ᵀ``

in the ``F.linear`` convention: ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` (``[out,
in]``), the gate being the first ``I`` rows and the up projection the last ``I``
(``chunk(2, dim=-1)``). The ``@use_experts_implementation`` decorator records the variants on the
module: ``is_transposed`` (``[E, H, 2I]`` and ``[E, I, H]``, matmul convention), ``is_concatenated``
(``False``: interleaved rows ``[g0, u0, g1, u1, …]``), ``has_gate`` (``False``: ``up_proj [E, I,
H]`` and an activation), ``has_bias`` (``gate_up_proj_bias``/``up_proj_bias [E, 2I or I]``,
``down_proj_bias [E, H]``), ``has_post_expert_norm``. Without the flags (a module of the same
names outside transformers) the transposition is read off the shapes and the rows are taken as
concatenated, as transformers' default. Hidden unit ``j`` of expert ``e`` depends on its gate and
up rows only (the activation and the gating product act unit by unit).

Levels (shared names of :mod:`group_prox.families.registry`), under
:func:`group_prox.hierarchy.transformer`:

* ``base_level``: hidden unit ``j`` of expert ``e``, ``"<block>.experts.<e>[j]"``: its gate and
  up rows of ``gate_up_proj[e]`` (and bias entries) and column ``j`` of ``down_proj[e]``; and
  neuron ``j`` of the shared expert, ``"<block>.shared_expert[j]"``: rows ``j`` of its
  ``gate_proj``/``up_proj`` (and biases) and column ``j`` of its ``down_proj``;
* ``expert``: expert ``e`` whole, ``"<block>.experts.<e>"``: its slices of every expert tensor;
* ``layer``: the MoE sublayer, ``"<block>"`` (e.g. ``"model.layers.0.mlp"``): every parameter of
  the block (router, experts, shared expert and its gate) and the pre-norm feeding it
  (``pre_feedforward_layernorm`` where the layer has one, else ``post_attention_layernorm`` of a
  pre-norm layer with an ``input_layernorm``), and a ``post_feedforward_layernorm``. When it is
  zero the sublayer outputs zero: every expert and the shared expert output zero, whatever the
  router and the shared-expert gate compute.

Compression (exact, for finite activations: ``0 · h = 0``):

* a hidden unit whose column of ``down_proj`` is zero in every kept expert is sliced from every
  expert tensor (replacement kind ``"hf_experts_hidden"``; the hidden width is shared by all
  experts, so a unit stays while one kept expert uses it);
* an expert whose ``down_proj[e]`` (and ``down_proj_bias[e]``) is zero outputs zero: its rows of
  every expert tensor go (replacement kind ``"hf_experts_keep"``). The router is untouched, so it
  still scores all the original experts and chooses as before; the experts module gets a forward
  pre-hook (:class:`ExpertIndexMap`) that maps the router's indices onto the kept rows and gives
  a removed expert's slot the weight 0 (it is computed by a kept expert, times 0), so the output
  is the same for every experts implementation (eager, batched_mm, grouped_mm);
* a shared-expert neuron whose ``down_proj`` column is zero: ``SliceOp`` on its three
  projections.

A sublayer all of whose experts are dead keeps one expert of one unit (and its router and norm):
its output is zero. Left alone with a warning: experts modules with other parameters (quantised
scales …), and shared experts that are not a gate/up/down MLP of ``nn.Linear`` layers. An expert
with a post-expert norm keeps its rows (the norm of zero need not be zero).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..compression.plan import Op, ReplaceOp, SliceOp, indices, integer, register_replacement
from ..compression.surgery import check_keep, kept_indices, set_tensor
from ..hierarchy.core import GroupTable, Member, Part
from .registry import Family, register_family

__all__ = [
    "ExpertIndexMap",
    "ExpertsLayout",
    "applies",
    "expert_groups",
    "experts_layout",
    "is_hf_experts",
    "levels",
    "plan",
]

_SHARED = ("shared_expert", "shared_experts")
_EXPERT_TENSORS = ("gate_up_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------
# Layout


def is_hf_experts(module: object) -> bool:
    """Whether ``module`` is a fused experts module in transformers' layout: 3-D parameters
    ``down_proj`` and ``gate_up_proj`` (or ``up_proj``)."""
    if not isinstance(module, nn.Module) or isinstance(module, nn.ModuleList):
        return False
    params = module._parameters
    down = params.get("down_proj")
    up = params.get("gate_up_proj", params.get("up_proj"))
    return isinstance(down, Tensor) and down.dim() == 3 and isinstance(up, Tensor) and up.dim() == 3


@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused experts module stores its experts (see the module docstring)."""

    up: str  # "gate_up_proj" or "up_proj"
    gated: bool
    transposed: bool
    concatenated: bool
    up_bias: str | None
    down_bias: str | None
    num_experts: int
    hidden: int  # I, the hidden width of every expert
    post_norm: bool

    @property
    def up_dim(self) -> int:
        """The hidden dimension of the projection into the hidden layer."""
        return 2 if self.transposed else 1

    @property
    def down_dim(self) -> int:
        """The hidden dimension of ``down_proj``."""
        return 1 if self.transposed else 2

    def up_rows(self, j: int) -> list[int]:
        """The rows of hidden unit ``j`` along :attr:`up_dim` (gate first)."""
        if not self.gated:
            return [j]
        if self.concatenated:
            return [j, self.hidden + j]
        return [2 * j, 2 * j + 1]

    def up_keep(self, keep: list[int]) -> list[int]:
        """The increasing rows along :attr:`up_dim` of the hidden units ``keep``."""
        return sorted(r for j in keep for r in self.up_rows(j))

    def tensors(self) -> list[str]:
        """The names of every expert tensor (first dimension: the experts)."""
        return [n for n in (self.up, "down_proj", self.up_bias, self.down_bias) if n]


def _flag(module: nn.Module, name: str, default: bool | None) -> bool | None:
    value = getattr(module, name, default)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"its attribute {name} must be a bool, got {value!r:.40}.")
    return value


def experts_layout(module: nn.Module) -> ExpertsLayout:
    """The layout of a module :func:`is_hf_experts` accepts; a ``ValueError`` saying why when its
    tensors do not fit one."""
    params = dict(module.named_parameters(recurse=False))
    up = "gate_up_proj" if "gate_up_proj" in params else "up_proj"
    gated = _flag(module, "has_gate", None)
    if gated is None:
        gated = up == "gate_up_proj"
    if gated != (up == "gate_up_proj"):
        raise ValueError(f"has_gate={gated} does not fit its tensor {up!r}.")
    factor = 2 if gated else 1
    w_up, w_down = params[up], params["down_proj"]
    (e, a, b), (e2, c, d) = w_up.shape, w_down.shape
    shapes = f"{up} {tuple(w_up.shape)}, down_proj {tuple(w_down.shape)}"
    if e != e2:
        raise ValueError(f"its tensors disagree on the number of experts ({shapes}).")
    linear = b == c and a == factor * d  # [E, 2I, H], [E, H, I]
    matmul = a == d and b == factor * c  # [E, H, 2I], [E, I, H]
    transposed = _flag(module, "is_transposed", None)
    if transposed is None:
        if linear == matmul:
            raise ValueError(
                f"its shapes ({shapes}) fit {'both' if linear else 'neither'} of the F.linear "
                "([experts, out, in]) and matmul ([experts, in, out]) conventions; set its "
                "attribute is_transposed (True: matmul)."
            )
        transposed = matmul
    elif not (matmul if transposed else linear):
        raise ValueError(f"its shapes ({shapes}) do not fit is_transposed={transposed}.")
    hidden = c if transposed else d
    model_dim = d if transposed else c
    concatenated = _flag(module, "is_concatenated", True)
    biases = {}
    for name, width in ((f"{up}_bias", factor * hidden), ("down_proj_bias", model_dim)):
        bias = params.get(name)
        if bias is not None and tuple(bias.shape) != (e, width):
            raise ValueError(f"its {name} has shape {tuple(bias.shape)}, expected {(e, width)}.")
        biases[name] = name if bias is not None else None
    post_norm = bool(_flag(module, "has_post_expert_norm", False))
    known = {up, "down_proj", *(b for b in biases.values() if b)}
    norm = getattr(module, "post_expert_norm", None) if post_norm else None
    norm_params = {id(p) for p in norm.parameters()} if isinstance(norm, nn.Module) else set()
    other = [n for n, p in module.named_parameters() if n not in known and id(p) not in norm_params]
    if other:
        raise ValueError(f"it has parameters {other} besides its expert projections.")
    return ExpertsLayout(
        up=up,
        gated=gated,
        transposed=bool(transposed),
        concatenated=bool(concatenated),
        up_bias=biases[f"{up}_bias"],
        down_bias=biases["down_proj_bias"],
        num_experts=int(e),
        hidden=int(hidden),
        post_norm=post_norm,
    )


def _layout(name: str, module: nn.Module) -> ExpertsLayout:
    try:
        return experts_layout(module)
    except ValueError as err:
        raise ValueError(f"fused experts {name!r} ({type(module).__name__}): {err}") from None


# --------------------------------------------------------------------------------------------
# Levels


def expert_groups(prefix: str, experts: nn.Module) -> tuple[GroupTable, GroupTable]:
    """``(hidden units, whole experts)`` of the fused experts module ``experts`` named
    ``prefix``: ``"<prefix>.<e>[j]"`` and ``"<prefix>.<e>"`` (see the module docstring), as
    :class:`~group_prox.hierarchy.GroupTable` objects (expert-major, one row of arrays per
    group: 64 experts of 1,408 units build in milliseconds)."""
    lay = _layout(prefix, experts)
    w_up, w_down = getattr(experts, lay.up), experts.down_proj
    b_up = getattr(experts, lay.up_bias) if lay.up_bias else None
    num, hidden = lay.num_experts, lay.hidden
    e = np.repeat(np.arange(num, dtype=np.int64), hidden)
    j = np.tile(np.arange(hidden, dtype=np.int64), num)
    # Row k of unit j along up_dim (gate first): the same rule for every j.
    rows = np.asarray([lay.up_rows(k) for k in range(hidden)], dtype=np.int64)[j]
    parts = [
        Part(w_up, (0, lay.up_dim), np.stack([e, rows[:, k]], 1), (1, 1), ints=True)
        for k in range(rows.shape[1])
    ]
    if b_up is not None:
        parts += [
            Part(b_up, (0, 1), np.stack([e, rows[:, k]], 1), (1, 1), ints=True)
            for k in range(rows.shape[1])
        ]
    parts.append(Part(w_down, (0, lay.down_dim), np.stack([e, j], 1), (1, 1), ints=True))
    units = GroupTable([f"{prefix}.{a}[{b}]" for a in range(num) for b in range(hidden)], parts)
    tensors = [getattr(experts, n) for n in lay.tensors()]
    every = np.arange(num, dtype=np.int64)
    blocks = GroupTable(
        [f"{prefix}.{a}" for a in range(num)],
        [Part(t, (0,), every, (1,), ints=True) for t in tensors],
    )
    return units, blocks


def neuron_table(where: str, ups: list[nn.Linear], down: nn.Linear) -> GroupTable:
    """The hidden units of an MLP as :func:`~group_prox.hierarchy.core.hidden_unit` writes them
    (row ``j`` of every ``ups`` weight and bias, column ``j`` of ``down``), ``"<where>[j]"``."""
    n = down.in_features
    j = np.arange(n, dtype=np.int64)
    parts: list[Part] = []
    for up in ups:
        parts.append(Part(up.weight, (0,), j, (1,), ints=True))
        if up.bias is not None:
            parts.append(Part(up.bias, (0,), j, (1,), ints=True))
    parts.append(Part(down.weight, (1,), j, (1,), ints=True))
    return GroupTable([f"{where}[{k}]" for k in range(n)], parts)


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every module whose ``experts`` is a fused experts module, once each."""
    seen: set[int] = set()
    found = []
    for name, m in model.named_modules():
        experts = getattr(m, "experts", None)
        if is_hf_experts(experts) and id(m) not in seen:
            seen.add(id(m))
            found.append((name, m))
    return found


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _shared_mlp(block: nn.Module, attr: str) -> tuple[list[nn.Linear], nn.Linear] | None:
    """``([gate_proj, up_proj], down_proj)`` of the block's shared expert ``attr``; ``None``
    where it has none; a ``ValueError`` where it is not such an MLP."""
    mlp = getattr(block, attr, None)
    if not isinstance(mlp, nn.Module):
        return None
    ups = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")]
    ups = [u for u in ups if u is not None]
    down = getattr(mlp, "down_proj", None)
    linears = [*ups, down]
    if not ups or not all(type(m) is nn.Linear for m in linears):
        raise ValueError("it is not an MLP of nn.Linear gate_proj/up_proj and down_proj.")
    if any(u.out_features != down.in_features for u in ups):
        raise ValueError("its projections disagree on the hidden width.")
    own = {id(p) for m in linears for p in m.parameters()}
    if any(id(p) not in own for p in mlp.parameters()):
        raise ValueError("it has parameters outside its projections.")
    return ups, down


def _shared(
    name: str, block: nn.Module, caller: str
) -> list[tuple[str, list[nn.Linear], nn.Linear]]:
    found = []
    for attr in _SHARED:
        where = _join(name, attr)
        try:
            mlp = _shared_mlp(block, attr)
        except ValueError as err:
            warnings.warn(f"{caller}: shared expert {where!r} is left alone: {err}", stacklevel=3)
            continue
        if mlp is not None:
            found.append((where, *mlp))
    return found


def _norms(model: nn.Module, name: str) -> list[nn.Module]:
    """The norms of the decoder layer around the block ``name`` that belong to its branch."""
    if not name:
        return []
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    pre = getattr(parent, "pre_feedforward_layernorm", None)
    if pre is None and isinstance(getattr(parent, "input_layernorm", None), nn.Module):
        pre = getattr(parent, "post_attention_layernorm", None)
    post = getattr(parent, "post_feedforward_layernorm", None)
    return [m for m in (pre, post) if isinstance(m, nn.Module)]


def levels(model: nn.Module) -> dict[str, GroupTable | dict[str, list[Member]]]:
    """The levels of the MoE sublayers of ``model`` (module docstring), frozen params included."""
    units: list[GroupTable] = []
    experts: list[GroupTable] = []
    layers: dict[str, list[Member]] = {}
    for name, block in _blocks(model):
        u, b = expert_groups(_join(name, "experts"), block.experts)
        units.append(u)
        experts.append(b)
        for where, ups, down in _shared(name, block, "transformer()"):
            units.append(neuron_table(where, ups, down))
        params = list(block.parameters())
        own = {id(p) for p in params}
        for norm in _norms(model, name):
            params += [p for p in norm.parameters() if id(p) not in own]
        layers[name or "experts_block"] = params
    return {
        "base_level": GroupTable.concat(units),
        "expert": GroupTable.concat(experts),
        "layer": layers,
    }


# --------------------------------------------------------------------------------------------
# Compression


class ExpertIndexMap:
    """Forward pre-hook of a fused experts module that lost experts: it maps the router's expert
    indices onto the kept rows and sets the weight of a removed expert's slot to 0 (the slot is
    computed by the first kept expert, times 0: the removed expert output exactly 0).

    ``table[e]`` is the row of original expert ``e``, ``-1`` if it was removed. The routing
    indices are the one integer tensor among the call's arguments after the hidden states, the
    weights the floating-point tensor of the same shape.
    """

    def __init__(self, table: list[int]) -> None:
        self.table = list(table)

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        slots = [("a", i, v) for i, v in enumerate(args) if i > 0]
        slots += [("k", k, v) for k, v in kwargs.items()]
        tensors = [s for s in slots if isinstance(s[2], Tensor)]
        index = [s for s in tensors if not s[2].is_floating_point() and s[2].dtype != torch.bool]
        if len(index) != 1:
            raise RuntimeError(
                f"{type(module).__name__}: expected one integer tensor of expert indices among the "
                "arguments after the hidden states."
            )
        idx = index[0][2]
        weights = [s for s in tensors if s[2].is_floating_point() and s[2].shape == idx.shape]
        if len(weights) != 1:
            raise RuntimeError(
                f"{type(module).__name__}: expected one tensor of routing weights shaped like the "
                f"expert indices {tuple(idx.shape)}."
            )
        table = torch.tensor(self.table, dtype=idx.dtype, device=idx.device)
        new = table[idx]
        removed = new < 0
        new_weights = weights[0][2].masked_fill(removed, 0)
        new = new.clamp(min=0)
        args, kwargs = list(args), dict(kwargs)
        for (kind, key, _), value in ((index[0], new), (weights[0], new_weights)):
            if kind == "a":
                args[key] = value
            else:
                kwargs[key] = value
        return tuple(args), kwargs


def _check_args(args: Mapping[str, Any], keys: set[str], where: str) -> None:
    if set(args) != keys:
        raise ValueError(f"{where}: args must have the keys {sorted(keys)}, got {sorted(args)}.")


def _slice(module: nn.Module, name: str, dim: int, keep: list[int]) -> None:
    set_tensor(module, name, dim, torch.as_tensor(keep, dtype=torch.long))


def _check_keep(keep: tuple[int, ...], size: int, where: str) -> list[int]:
    return check_keep(keep, size, where).tolist()


@register_replacement("hf_experts_hidden")
def _experts_hidden(experts: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    where = f"fused experts {type(experts).__name__!r}"
    _check_args(args, {"keep"}, where)
    if not is_hf_experts(experts):
        raise ValueError(f"{where}: not a fused experts module (gate_up_proj/down_proj).")
    lay = _layout(type(experts).__name__, experts)
    keep = _check_keep(indices(args["keep"], "args['keep']"), lay.hidden, where)
    _slice(experts, lay.up, lay.up_dim, lay.up_keep(keep))
    if lay.up_bias:
        _slice(experts, lay.up_bias, 1, lay.up_keep(keep))
    _slice(experts, "down_proj", lay.down_dim, keep)
    for attr in ("intermediate_dim", "intermediate_size"):
        if getattr(experts, attr, None) == lay.hidden and isinstance(getattr(experts, attr), int):
            setattr(experts, attr, len(keep))
    return experts


@register_replacement("hf_experts_keep")
def _experts_keep(experts: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    where = f"fused experts {type(experts).__name__!r}"
    _check_args(args, {"keep", "num_experts"}, where)
    if not is_hf_experts(experts):
        raise ValueError(f"{where}: not a fused experts module (gate_up_proj/down_proj).")
    lay = _layout(type(experts).__name__, experts)
    num = integer(args["num_experts"], "args['num_experts']", minimum=1)
    if num != lay.num_experts or getattr(experts, "num_experts", num) != num:
        raise ValueError(
            f"{where}: the plan was made for {num} experts, the module has {lay.num_experts}."
        )
    keep = _check_keep(indices(args["keep"], "args['keep']"), num, where)
    for name in lay.tensors():
        _slice(experts, name, 0, keep)
    if isinstance(getattr(experts, "num_experts", None), int):
        experts.num_experts = len(keep)
    row = {e: i for i, e in enumerate(keep)}
    hooks = [h for h in experts._forward_pre_hooks.values() if isinstance(h, ExpertIndexMap)]
    if hooks:  # compressed before: compose, the router still gives the original indices
        hooks[0].table = [row.get(r, -1) if r >= 0 else -1 for r in hooks[0].table]
    else:
        experts.register_forward_pre_hook(
            ExpertIndexMap([row.get(e, -1) for e in range(num)]), with_kwargs=True
        )
    return experts


def _experts_ops(name: str, experts: nn.Module, multiple: int) -> list[Op]:
    lay = _layout(name, experts)
    with torch.no_grad():
        zero = experts.down_proj == 0
        dead_units = zero.all(2 if lay.transposed else 1).cpu()  # [experts, hidden]
        dead_experts = dead_units.all(1)
        if lay.down_bias:
            dead_experts &= (getattr(experts, lay.down_bias) == 0).all(1).cpu()
        if lay.post_norm:
            dead_experts[:] = False
    keep_experts = kept_indices(dead_experts)
    keep_units = kept_indices(dead_units[keep_experts].all(0), multiple)
    ops: list[Op] = []
    if len(keep_units) < lay.hidden:
        ops.append(ReplaceOp(name, "hf_experts_hidden", {"keep": keep_units}))
    if len(keep_experts) < lay.num_experts:
        args = {"keep": keep_experts, "num_experts": lay.num_experts}
        ops.append(ReplaceOp(name, "hf_experts_keep", args))
    return ops


def plan(model: nn.Module, multiple: int = 1) -> list[Op]:
    """Operations removing the dead hidden units, experts and shared-expert neurons of every MoE
    sublayer of ``model``; a layout not understood is left alone with a warning."""
    ops: list[Op] = []
    for name, block in _blocks(model):
        where = _join(name, "experts")
        try:
            ops += _experts_ops(where, block.experts, multiple)
        except ValueError as err:
            warnings.warn(f"compress(): {err}; left uncompressed.", stacklevel=3)
        for shared, _ups, down in _shared(name, block, "compress()"):
            with torch.no_grad():
                dead = (down.weight == 0).all(0).cpu()
            keep = kept_indices(dead, multiple)
            if len(keep) < down.in_features:
                for up in ("gate_proj", "up_proj"):
                    if getattr(model.get_submodule(shared), up, None) is not None:
                        ops.append(SliceOp(f"{shared}.{up}", "out", tuple(keep)))
                ops.append(SliceOp(f"{shared}.down_proj", "in", tuple(keep)))
    return ops


def applies(model: nn.Module) -> bool:
    """Whether ``model`` holds a module whose ``experts`` is a fused experts module."""
    return any(is_hf_experts(getattr(m, "experts", None)) for m in model.modules())


HF_EXPERTS = register_family(
    Family(
        name="hf-fused-experts",
        builder="transformer",
        description=(
            "Hugging Face MoE sublayers of fused experts (gate_up_proj/down_proj tensors, "
            "optional shared expert)"
        ),
        applies=applies,
        levels=levels,
        plan=plan,
    )
)
