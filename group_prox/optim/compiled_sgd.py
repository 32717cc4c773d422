"""ProxSGD's compiled path: the momentum-SGD update as one fused pass per tensor.

torch's multi-tensor SGD makes several passes over memory (scale the momentum buffer, add the
gradient, add to the parameter); compiled with ``torch.compile`` the same update is one read of
the parameter, gradient and buffer and one write of the parameter and buffer. The time saved pays
for much of the prox. (Fusing the atom norms into this kernel as well does not pay on CPUs:
inductor computes the reduction in a separate loop that re-reads the inputs and recomputes the
update.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..distributed import local_tensor

__all__ = ["CompiledSGDUpdate"]


def _make_update(
    *, momentum: bool, weight_decay: bool, nesterov: bool, maximize: bool
) -> Callable[..., None]:
    """The update of torch.optim.SGD once its momentum buffers exist.

    Only what changes the graph is fixed here; the coefficients arrive as 0-dim tensors, so that
    schedulers (OneCycleLR cycles the momentum) change them without a recompilation.
    """

    def update(
        params: list[Tensor],
        grads: list[Tensor],
        bufs: list[Tensor],
        coefs: Tensor,  # lr, momentum, dampening, weight_decay
    ) -> None:
        lr, mom, damp, wd = coefs[0], coefs[1], coefs[2], coefs[3]
        for i, (p, g) in enumerate(zip(params, grads)):
            d = -g if maximize else g
            if weight_decay:
                d = d + wd * p
            if momentum:
                b = bufs[i] * mom + (1 - damp) * d
                bufs[i].copy_(b)
                d = d + mom * b if nesterov else b
            p.copy_(p - lr * d)

    return update


def _flags(group: dict[str, Any]) -> tuple[bool, bool, bool, bool]:
    return (
        group["momentum"] != 0,
        float(group["weight_decay"]) != 0,
        bool(group["nesterov"]),
        bool(group["maximize"]),
    )


class CompiledSGDUpdate:
    """Per param group, a compiled torch.optim.SGD update.

    The optimizer takes torch's own path where :meth:`applicable` is false: a parameter without
    ``grad``, a momentum buffer not created yet (the first step), sparse gradients, or
    ``differentiable=True``.
    """

    def __init__(self) -> None:
        self._compiled: dict[tuple[int, tuple[bool, ...]], Callable[..., None]] = {}

    def __getstate__(self) -> dict[str, Any]:
        """No compiled function (they cannot be copied or pickled): a copy compiles its own at
        its first compiled step, from torch.compile's cache where it has the code."""
        return {"_compiled": {}}

    def _fn(self, index: int, group: dict[str, Any]) -> Callable[..., None]:
        flags = _flags(group)
        fn = self._compiled.get((index, flags))
        if fn is None:
            momentum, weight_decay, nesterov, maximize = flags
            update = _make_update(
                momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize
            )
            fn = torch.compile(update, fullgraph=True, dynamic=False)
            self._compiled[(index, flags)] = fn
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

    @torch.no_grad()
    def step(self, param_groups: Sequence[dict[str, Any]], state: Any) -> None:
        """Update every parameter and momentum buffer in place.

        The update is elementwise, so sharded tensors (FSDP2's ``DTensor``s) are updated through
        their local shards: each rank updates what it holds, with no collective and no DTensor
        dispatch inside the compiled graph."""
        for index, group in enumerate(param_groups):
            params = [local_tensor(p) for p in group["params"]]
            grads = [local_tensor(p.grad) for p in group["params"]]
            bufs = (
                [local_tensor(state[p]["momentum_buffer"]) for p in group["params"]]
                if group["momentum"]
                else []
            )
            coefs = torch.tensor(
                [float(group[k]) for k in ("lr", "momentum", "dampening", "weight_decay")],
                dtype=torch.float64,
            )
            self._fn(index, group)(params, grads, bufs, coefs)
