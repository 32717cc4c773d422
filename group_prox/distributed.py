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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from .hierarchy.core import TensorLayout

__all__ = [
    "Sharding",
    "full_tensor",
    "is_dtensor",
    "local_count",
    "local_tensor",
    "process_group",
    "sharding_of",
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


def _mesh_and_group(tensors: Sequence[Tensor], labels: Sequence[str]) -> tuple[Any, Any] | None:
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
    found = _mesh_and_group(tensors, [f"a parameter of shape {tuple(t.shape)}" for t in tensors])
    return None if found is None else found[1]


class Sharding:
    """Where this rank's shard of every tensor of a hierarchy lies in the global atom grid.

    Built once per plan. For tensor ``i`` it knows the range of atoms its local shard covers along
    each of ``TensorLayout.dims`` and whether this rank's values count in a sum over ranks (not on
    a replica other than mesh coordinate 0, nor for a plain tensor on a group rank other than 0).

    Args:
        tensors: the layouts of the hierarchy.
        group: the process group to reduce over; by default the one of the tensors' mesh. Given,
            plain tensors are allowed and count as replicas (to count zeros, not to train).
    """

    def __init__(self, tensors: Sequence[TensorLayout], group: ProcessGroup | None = None) -> None:
        import torch.distributed as dist
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        found = _mesh_and_group([lay.param for lay in tensors], [lay.name for lay in tensors])
        if found is None and group is None:
            raise ValueError("Sharding: no tensor is a DTensor and no process group was given.")
        self.is_dtensor = tuple(is_dtensor(lay.param) for lay in tensors)
        if group is None and not all(self.is_dtensor):
            plain = next(lay.name for lay, d in zip(tensors, self.is_dtensor) if not d)
            sharded = next(lay.name for lay, d in zip(tensors, self.is_dtensor) if d)
            raise ValueError(
                f"{plain} is a plain tensor but {sharded} is a DTensor: shard every parameter of "
                "the hierarchy. Under FSDP2 the plain one is usually the unsharded copy that a "
                "root module keeps after a forward pass (group_prox.hierarchy.auto runs one): "
                "build the hierarchy and the optimizer before any forward, or apply fully_shard "
                "to every submodule that holds parameters so that the root holds none."
            )
        self.group = found[1] if group is None else group  # type: ignore[index]
        plain_counts = dist.get_rank(self.group) == 0
        self.tensors = tuple(tensors)
        self.starts: list[tuple[int, ...]] = []
        self.lengths: list[tuple[int, ...]] = []
        self.counts: list[bool] = []
        self.local_shapes: list[tuple[int, ...]] = []
        for lay, sharded in zip(tensors, self.is_dtensor):
            p: Any = lay.param
            if sharded:
                shape, offset = compute_local_shape_and_global_offset(
                    p.shape, p.device_mesh, p.placements
                )
                local = tuple(p.to_local().shape)
                if local != tuple(shape):
                    raise ValueError(
                        f"{lay.name}: its local shard has shape {local}, but its placements "
                        f"{p.placements} give {tuple(shape)}. group_prox needs shards laid out as "
                        "torch.chunk does (FSDP2, distribute_tensor)."
                    )
                coord = p.device_mesh.get_coordinate()
                counts = coord is not None and all(
                    c == 0 for c, pl in zip(coord, p.placements) if pl.is_replicate()
                )
            else:
                shape, offset, counts = tuple(p.shape), (0,) * p.dim(), plain_counts
            self.starts.append(tuple(offset[d] for d in lay.dims))
            self.lengths.append(tuple(shape[d] for d in lay.dims))
            self.counts.append(bool(counts))
            self.local_shapes.append(tuple(shape))
        self.device = self.local(0).device if tensors else torch.device("cpu")

    def local(self, i: int, t: Tensor | None = None) -> Tensor:
        """This rank's part of ``t`` (by default tensor ``i`` itself), detached; ``t`` may be any
        tensor sharded as tensor ``i`` is (its optimizer state)."""
        t = self.tensors[i].param if t is None else t
        local = local_tensor(t)
        if tuple(local.shape) != self.local_shapes[i]:
            raise ValueError(
                f"{self.tensors[i].name}: a tensor sharded like it has local shape "
                f"{tuple(local.shape)}, not {self.local_shapes[i]}; shard the optimizer state as "
                "its parameter."
            )
        return local

    def local_tensors(self) -> list[Tensor]:
        """The local shards of all tensors, in place-writable."""
        return [self.local(i) for i in range(len(self.tensors))]

    def box(self, i: int, atoms: Tensor) -> Tensor:
        """The entries of the global atom vector ``atoms`` that tensor ``i``'s local shard covers, as
        a view shaped like its local atom grid (writing into it writes into ``atoms``)."""
        lay = self.tensors[i]
        view = atoms[lay.offset : lay.offset + lay.num_atoms].view(lay.grid)
        for k, (start, length) in enumerate(zip(self.starts[i], self.lengths[i])):
            view = view.narrow(k, start, length)
        return view

    def atom_view(self, i: int, atoms: Tensor) -> Tensor:
        """:meth:`box` with size-1 dimensions inserted so that it broadcasts against the shard."""
        view = self.box(i, atoms)
        for d in self.tensors[i].reduce_dims:
            view = view.unsqueeze(d)
        return view

    def add_atom_sums_(self, out: Tensor, i: int, x: Tensor) -> None:
        """Add to ``out`` (a global atom vector) the sums over each atom of ``x``, a local tensor
        shaped like tensor ``i``'s shard, if this rank's values count."""
        if not self.counts[i] or x.numel() == 0:
            return
        dims = self.tensors[i].reduce_dims
        self.box(i, out).add_(x.sum(dim=dims) if dims else x)

    def all_reduce_(self, x: Tensor) -> Tensor:
        """Sum ``x`` over the ranks of the group, in place; returns ``x``."""
        torch.distributed.all_reduce(x, group=self.group)
        return x

    def atom_sq_norms(self, acc_dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        """Squared norm of every (global) atom: local partial sums of squares, one all-reduce."""
        n = sum(lay.num_atoms for lay in self.tensors)
        out = torch.zeros(n, dtype=acc_dtype, device=self.device) if out is None else out.zero_()
        for i, lay in enumerate(self.tensors):
            if not self.counts[i]:
                continue
            x = self.local(i)
            if x.numel() == 0:
                continue
            if lay.reduce_dims:
                part = torch.linalg.vector_norm(x, 2, dim=lay.reduce_dims, dtype=acc_dtype)
                self.box(i, out).copy_(part.square_())
            else:
                self.box(i, out).copy_(x.to(acc_dtype).square())
        return self.all_reduce_(out)

    def soft_threshold_(self, thresholds: Tensor) -> None:
        """``x ← sign(x)·max(0, |x| − τ)`` on every local shard, ``τ`` one per global atom."""
        for i in range(len(self.tensors)):
            x = self.local(i)
            if x.numel() == 0:
                continue
            tau = self.atom_view(i, thresholds)
            if tau.device.type == "cpu" and not bool(tau.any()):
                continue
            shrunk = (x.abs() - tau).clamp_(min=0)
            x.copy_(shrunk.mul_(x.sign()))


def sharding_of(tensors: Sequence[TensorLayout]) -> Sharding | None:
    """The :class:`Sharding` of a hierarchy's tensors, or ``None`` if none is a ``DTensor`` (the
    plain, single-process path)."""
    if not any(is_dtensor(lay.param) for lay in tensors):
        return None
    return Sharding(tensors)


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
