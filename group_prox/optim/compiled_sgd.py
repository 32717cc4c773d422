"""ProxSGD's compiled path: the momentum-SGD update and the prox in two fused passes.

torch's multi-tensor SGD makes several passes over memory (scale the momentum buffer, add the
gradient, add to the parameter), and the prox then reads every tensor for its atom norms and reads
and writes it again to scale it. Compiled with ``torch.compile``, a step is instead

1. one read of every parameter, gradient and momentum buffer that computes the new values ``v``
   without writing them, and from them the squared norm of every atom (and, for tensors outside
   the hierarchy, a sum): these say whether anything is NaN or infinite *before* anything is
   written, which replaces the separate look at the gradients and parameters;
2. the group scales ``s`` of the prox from those norms (arithmetic on one number per atom);
3. one read of the parameter, gradient and buffer and one write of ``v·s`` and of the buffer.

When the prox is not a scaling from atom norms alone (an elementwise L1 part, a frozen pattern,
sharded tensors) only the update is compiled (one pass), and the prox follows as usual.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..distributed import local_tensor
from ..prox import HierarchicalProx

__all__ = ["CompiledSGDUpdate", "FusedNorms"]

#: How the first pass reduces a parameter's new values: ``"outside"`` (not in the hierarchy: a
#: sum, for the look at non-finite values), ``"whole"`` (one atom), or the dimensions to reduce
#: over (empty: one atom per element).
Reduction = str | tuple[int, ...]
_Flags = tuple[bool, bool, bool, bool]


def _direction(
    p: Tensor, g: Tensor, b: Tensor | None, coefs: Tensor, flags: _Flags
) -> tuple[Tensor, Tensor | None]:
    """torch.optim.SGD's step direction ``d`` (the parameter moves by ``-lr·d``) and the new
    momentum buffer, once the buffers exist."""
    momentum, weight_decay, nesterov, maximize = flags
    mom, damp, wd = coefs[1], coefs[2], coefs[3]
    d = -g if maximize else g
    if weight_decay:
        d = d + wd * p
    new_b = None
    if momentum:
        assert b is not None
        new_b = b * mom + (1 - damp) * d
        d = d + mom * new_b if nesterov else new_b
    return d, new_b


def _make_update(flags: _Flags, scaled: tuple[bool, ...]) -> Callable[..., None]:
    """The update of torch.optim.SGD, each new value multiplied by its atom's scale where
    ``scaled`` says so (``scales`` holds one broadcastable view per scaled tensor, in order).

    Only what changes the graph is fixed here; the coefficients arrive as 0-dim tensors, so that
    schedulers (OneCycleLR cycles the momentum) change them without a recompilation.
    """

    def update(
        params: list[Tensor],
        grads: list[Tensor],
        bufs: list[Tensor],
        coefs: Tensor,  # lr, momentum, dampening, weight_decay
        scales: list[Tensor],
    ) -> None:
        lr = coefs[0]
        k = 0
        for i, (p, g) in enumerate(zip(params, grads)):
            d, new_b = _direction(p, g, bufs[i] if flags[0] else None, coefs, flags)
            if new_b is not None:
                bufs[i].copy_(new_b)
            v = p - lr * d
            if scaled[i]:
                v = v * scales[k]
                k += 1
            p.copy_(v)

    return update


def _make_norms(
    flags: _Flags, reductions: tuple[Reduction, ...], acc: torch.dtype
) -> Callable[..., tuple[Tensor, Tensor]]:
    """The first pass: the new values' squared atom norms (hierarchy tensors, in order,
    concatenated) and a sum of each other tensor's new values, nothing written."""

    def norms(
        params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], coefs: Tensor
    ) -> tuple[Tensor, Tensor]:
        lr = coefs[0]
        atoms = [torch.zeros(0, dtype=acc, device=params[0].device)]
        others = [torch.zeros(0, dtype=acc, device=params[0].device)]
        for i, (p, g) in enumerate(zip(params, grads)):
            d, _ = _direction(p, g, bufs[i] if flags[0] else None, coefs, flags)
            v = (p - lr * d).to(acc)
            how = reductions[i]
            if how == "outside":
                others.append(v.sum().reshape(1))
            elif how == "whole":
                atoms.append((v * v).sum().reshape(1))
            elif how:
                atoms.append((v * v).sum(how).reshape(-1))
            else:
                atoms.append((v * v).reshape(-1))
        return torch.cat(atoms), torch.cat(others)

    return norms


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own. torch.compile keeps its graphs per code object, at
    most ``torch._dynamo.config.recompile_limit`` of them (8), and every configuration (SGD
    options, param group, hierarchy) is another graph of the same closure's code: with
    ``fullgraph=True`` the ninth in a process would fail."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


def _flags(group: dict[str, Any]) -> _Flags:
    return (
        group["momentum"] != 0,
        float(group["weight_decay"]) != 0,
        bool(group["nesterov"]),
        bool(group["maximize"]),
    )


def _coefs(group: dict[str, Any], device: torch.device) -> Tensor:
    # On the parameters' device: a CPU tensor among CUDA ones would split the compiled graph.
    return torch.tensor(
        [float(group[k]) for k in ("lr", "momentum", "dampening", "weight_decay")],
        dtype=torch.float64,
        device=device,
    )


@dataclass
class FusedNorms:
    """What the first pass computed: the squared norm of every atom of the hierarchy (in the plan's
    atom order) and, per param group, a sum of the new values of each tensor outside the
    hierarchy; all NaN or infinite where a new value is."""

    atom_sq: Tensor
    outside: list[Tensor]

    def finite(self) -> bool:
        """Whether every new value is finite (one synchronisation with the device; an overflow of
        a square or a sum counts as not finite, and the optimizer's exact look decides)."""
        flags = [
            torch.isfinite(self.atom_sq).all(),
            *(torch.isfinite(o).all() for o in self.outside),
        ]
        return bool(torch.stack(flags).all())


@dataclass(frozen=True)
class _GroupLayout:
    """Where one param group's tensors lie in the hierarchy, for the first pass."""

    params: tuple[int, ...]  # ids of the group's parameters, to notice a changed group
    reductions: tuple[Reduction, ...]
    scaled: tuple[bool, ...]
    hierarchy_index: tuple[int, ...]  # index in the plan of each scaled tensor, in group order
    atoms: Tensor  # the atoms of the scaled tensors, in group order, on the plan's device


class CompiledSGDUpdate:
    """Per param group, a compiled torch.optim.SGD update, alone (:meth:`step`) or fused with the
    prox (:meth:`norms`, then :meth:`step` with the prox's scales).

    The optimizer takes torch's own path where :meth:`applicable` is false: a parameter without
    ``grad``, a momentum buffer not created yet (the first step), sparse gradients, or
    ``differentiable=True``.
    """

    def __init__(self) -> None:
        self._compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}
        # Per param group: the plan it was made for and where the group's tensors lie in it.
        self._layouts: dict[int, tuple[Any, _GroupLayout]] = {}

    def __getstate__(self) -> dict[str, Any]:
        """No compiled function (they cannot be copied or pickled): a copy compiles its own at
        its first compiled step, from torch.compile's cache where it has the code."""
        return {"_compiled": {}, "_layouts": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._compiled = {}
        self._layouts = {}

    def _fn(
        self, key: tuple[Any, ...], make: Callable[[], Callable[..., Any]]
    ) -> Callable[..., Any]:
        fn = self._compiled.get(key)
        if fn is None:
            # Without horizontal fusion inductor keeps one loop nest per tensor for the norms;
            # fused, reductions of tensors of different shapes share loops and run 2x slower
            # (the update, without reductions, is faster fused).
            options = {"cpp.max_horizontal_fusion_size": 1} if key[0] == "norms" else None
            fn = torch.compile(_own_code(make()), fullgraph=True, dynamic=False, options=options)
            self._compiled[key] = fn
        return fn

    @staticmethod
    def applicable(param_groups: Sequence[dict[str, Any]], state: Any) -> bool:
        for group in param_groups:
            if group.get("differentiable"):
                return False
            for p in group["params"]:
                if p.grad is None or p.grad.is_sparse:
                    return False
                if group["momentum"] != 0 and state.get(p, {}).get("momentum_buffer") is None:
                    return False
        return True

    @staticmethod
    def _tensors(group: dict[str, Any], state: Any) -> tuple[list[Tensor], ...]:
        params = [local_tensor(p) for p in group["params"]]
        grads = [local_tensor(p.grad) for p in group["params"]]
        bufs = (
            [local_tensor(state[p]["momentum_buffer"]) for p in group["params"]]
            if group["momentum"]
            else []
        )
        return params, grads, bufs

    def _layout(self, gi: int, group: dict[str, Any], prox: HierarchicalProx) -> _GroupLayout:
        ids = tuple(id(p) for p in group["params"])
        cached = self._layouts.get(gi)
        if cached is not None and cached[0] is prox.plan and cached[1].params == ids:
            return cached[1]
        plan = prox.plan
        index = {id(lay.param): i for i, lay in enumerate(plan.tensors)}
        where = [index.get(i) for i in ids]
        reductions = tuple(
            "outside"
            if i is None
            else "whole"
            if not plan.tensors[i].dims
            else plan.tensors[i].reduce_dims
            for i in where
        )
        inside = tuple(i for i in where if i is not None)
        spans = [
            torch.arange(plan.tensors[i].offset, plan.tensors[i].offset + plan.tensors[i].num_atoms)
            for i in inside
        ]
        atoms = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
        layout = _GroupLayout(
            ids,
            reductions,
            tuple(i is not None for i in where),
            inside,
            atoms.to(plan.tensors[0].param.device),
        )
        self._layouts[gi] = (plan, layout)
        return layout

    @torch.no_grad()
    def norms(
        self, param_groups: Sequence[dict[str, Any]], state: Any, prox: HierarchicalProx
    ) -> FusedNorms:
        """The first pass over every param group: the squared atom norms of the values the
        update will compute, written into the prox plan's atom buffer, and a sum of each other
        tensor's new values (see :class:`FusedNorms`). Nothing else is written, and nothing waits
        for the device."""
        plan = prox.plan
        atom_sq = plan.on(plan.tensors[0].param.device).atom_sq
        outside = []
        for gi, group in enumerate(param_groups):
            if not group["params"]:
                continue
            layout = self._layout(gi, group, prox)
            flags = _flags(group)
            key = ("norms", gi, flags, layout.reductions, plan.acc_dtype)
            fn = self._fn(
                key, lambda f=flags, r=layout.reductions: _make_norms(f, r, plan.acc_dtype)
            )
            tensors = self._tensors(group, state)
            atoms, others = fn(*tensors, _coefs(group, tensors[0][0].device))
            if layout.hierarchy_index:
                atom_sq.index_copy_(0, layout.atoms, atoms.to(atom_sq.dtype))
            outside.append(others)
        return FusedNorms(atom_sq, outside)

    @torch.no_grad()
    def step(
        self,
        param_groups: Sequence[dict[str, Any]],
        state: Any,
        prox: HierarchicalProx | None = None,
        scales: Sequence[Tensor] | None = None,
    ) -> None:
        """Update every parameter and momentum buffer in place; with ``prox`` and ``scales`` (its
        :meth:`~group_prox.HierarchicalProx.scales`, one view per tensor of its hierarchy), each
        new value of the hierarchy's tensors is multiplied by its atom's scale as it is written.

        The update is elementwise, so sharded tensors (FSDP2's ``DTensor``s) are updated through
        their local shards: each rank updates what it holds, with no collective and no DTensor
        dispatch inside the compiled graph."""
        for gi, group in enumerate(param_groups):
            if not group["params"]:
                continue
            if prox is None or scales is None:
                scaled = (False,) * len(group["params"])
                views: list[Tensor] = []
            else:
                layout = self._layout(gi, group, prox)
                scaled = layout.scaled
                views = [scales[i] for i in layout.hierarchy_index]
            flags = _flags(group)
            fn = self._fn(
                ("update", gi, flags, scaled), lambda f=flags, s=scaled: _make_update(f, s)
            )
            tensors = self._tensors(group, state)
            fn(*tensors, _coefs(group, tensors[0][0].device), views)
