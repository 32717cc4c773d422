"""Where each rank's shard of a hierarchy's tensors lies in the global atom grid (FSDP2).

The plain helpers for ``DTensor``s (which placements, which process group) live in
:mod:`group_prox.distributed`, which depends on nothing in this package; this module maps them onto
the atoms of a :class:`~group_prox.Hierarchy` for the kernels and the report. How one all-reduce of
atom norms per step gives every rank the unsharded result is explained in
:mod:`group_prox.distributed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .distributed import is_dtensor, local_tensor, mesh_and_group
from .hierarchy.core import TensorLayout

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["Sharding", "sharding_of"]


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

        found = mesh_and_group([lay.param for lay in tensors], [lay.name for lay in tensors])
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
