"""What FSDP2 sharding needs: one all-reduce of atom norms per step.

Under data parallelism (DDP) every rank holds whole parameters and, after the gradient all-reduce,
the same values: the prox runs unchanged on each rank and gives the same result everywhere.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``), or any ``DTensor`` sharding, a rank holds
one box of every parameter, and a group's norm spans ranks. All the prox needs from the other ranks
is the vector of atom squared norms ``a`` (one entry per atom of the hierarchy, a few thousand
numbers): every level's group norms are segment sums of ``a`` times the scales of the finer levels,
so one ``all_reduce(SUM)`` of ``a`` per step gives every rank the same ``a``, hence the same group
scales, the same zero groups and, applied to its own box, the same parameters as an unsharded run.

Each rank writes into a zeroed global atom vector what its box holds:

* along a dimension the atoms are cut along (``TensorLayout.dims``), the box covers a range of
  atoms, and only those entries are written;
* along a dimension that is reduced over, the box holds part of every atom, so the rank writes
  the partial sum of squares of its part; the all-reduce adds the parts up, since
  ``‖x‖² = Σ_ranks ‖x_rank‖²``;
* along a mesh dimension where the tensor is ``Replicate``-d, every rank holds the same values:
  only mesh coordinate 0 writes them, so that the sum does not count them twice.

Supported: ``Shard(d)`` and ``Replicate`` placements on a 1-D mesh (the collective runs on the
mesh's process group), or on an N-D mesh that spans the whole world (it runs on WORLD, as for HSDP's
``(Replicate(), Shard(0))``). Refused, with a ``ValueError`` naming the parameter: ``Partial``
placements (a pending reduction), strided shards, parameters on different meshes, and a hierarchy
that mixes ``DTensor``s with plain tensors. The last is nearly always FSDP2's unsharded copy of a
root module's parameters, which it keeps after a forward pass and overwrites at the next one.

This module holds the plain ``DTensor`` helpers and depends on nothing else in the package; the
mapping of shards onto a hierarchy's atoms is :class:`group_prox.sharding.Sharding`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "full_tensor",
    "is_dtensor",
    "local_count",
    "local_tensor",
    "mesh_and_group",
    "process_group",
]


# Resolved once at import: a cached lookup would be traced anew by torch.compile at every step.
if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor as _DTensor
else:  # pragma: no cover - builds without torch.distributed
    _DTensor = None


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (a sharded or replicated tensor)."""
    return _DTensor is not None and isinstance(t, _DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The data this process holds, detached: the local shard of a ``DTensor``, else ``t``."""
    return t.detach().to_local() if is_dtensor(t) else t.detach()  # type: ignore[attr-defined]


def full_tensor(t: Tensor) -> Tensor:
    """``t`` detached and, if it is a ``DTensor``, gathered whole (a collective: every rank of its
    mesh must call it, in the same order)."""
    t = t.detach()
    return t.full_tensor() if is_dtensor(t) else t


def _check_placements(t: Any, label: str) -> None:
    for pl in t.placements:
        if pl.is_replicate():
            continue
        if pl.is_shard() and type(pl).__name__ == "Shard":
            continue
        if pl.is_partial():
            raise ValueError(
                f"{label} has a Partial placement ({pl}): its values are a pending sum over "
                "ranks, not parameters. Redistribute it to Shard or Replicate placements (FSDP2 "
                "and DDP parameters always are)."
            )
        raise ValueError(
            f"{label} has placement {pl}, which group_prox cannot map to a box of the tensor; "
            "only Shard(dim) and Replicate placements are supported."
        )


def mesh_and_group(tensors: Sequence[Tensor], labels: Sequence[str]) -> tuple[Any, Any] | None:
    """The one device mesh of the ``DTensor``s among ``tensors`` and the process group to reduce
    over; ``None`` when none is a ``DTensor``."""
    import torch.distributed as dist

    mesh, first = None, ""
    for t, label in zip(tensors, labels):
        if not is_dtensor(t):
            continue
        _check_placements(t, label)
        if mesh is None:
            mesh, first = t.device_mesh, label  # type: ignore[attr-defined]
        elif t.device_mesh != mesh:  # type: ignore[attr-defined]
            raise ValueError(
                f"{label} lies on device mesh {t.device_mesh}, {first} on {mesh}: "  # type: ignore[attr-defined]
                "the prox all-reduces the norms of all parameters in one collective, so they must "
                "share one mesh. Shard the whole model with the same mesh."
            )
    if mesh is None:
        return None
    if mesh.ndim == 1:
        return mesh, mesh.get_group(0)
    if mesh.size() != dist.get_world_size():
        raise ValueError(
            f"{first} lies on a {mesh.ndim}-D device mesh of {mesh.size()} ranks inside a world of "
            f"{dist.get_world_size()}: group_prox reduces over WORLD for N-D meshes, so an N-D "
            "mesh must span every rank (or use a 1-D mesh)."
        )
    return mesh, dist.group.WORLD


def process_group(tensors: Iterable[Tensor]) -> ProcessGroup | None:
    """The process group over which quantities of the sharded ``tensors`` must be reduced: the mesh's
    group for a 1-D mesh, WORLD for an N-D mesh that spans it; ``None`` when no tensor is a
    ``DTensor`` (nothing to reduce). Raises ``ValueError`` for unsupported placements or several
    meshes."""
    tensors = list(tensors)
    found = mesh_and_group(tensors, [f"a parameter of shape {tuple(t.shape)}" for t in tensors])
    return None if found is None else found[1]


def local_count(t: Tensor, group: ProcessGroup | None) -> tuple[Tensor, bool]:
    """This rank's part of any tensor ``t`` and whether it counts in a sum over ``group`` (a plain
    tensor counts on group rank 0 only, as a replica)."""
    if is_dtensor(t):
        coord = t.device_mesh.get_coordinate()  # type: ignore[attr-defined]
        counts = coord is not None and all(
            c == 0
            for c, pl in zip(coord, t.placements)  # type: ignore[attr-defined]
            if pl.is_replicate()
        )
        return local_tensor(t), counts
    return local_tensor(t), torch.distributed.get_rank(group) == 0
