"""The vectorised hierarchical proximal operator.

One proximal step on the parameters of a :class:`~group_prox.Hierarchy`:

1. elementwise soft-thresholding by the L1 parts of all penalties (one pass, only if any is active);
2. one read of every tensor for its *atom* squared norms (see :class:`AtomNormReader`: a
   reduction over all dims but the ones its members select along, decided once per tensor);
3. on the tiny vector of atom norms, level by level from the finest to the coarsest, the group
   norms are the segment sums of ``atom_norm² · scale²`` (the current values, without re-reading the
   tensors), the penalty turns them into group scales, and the atom scales are multiplied by them;
4. one in-place multiplication of every tensor by its atom scales (``_foreach_mul_``).

For group lasso and L1 levels on a tree this computes the exact prox of the sum of all levels: by
Jenatton et al. (JMLR 2011, Proximal methods for hierarchical sparse coding) it is the
composition of the per-group proxes from the leaves to the root, elementwise penalties being the
leaves. No Python loop runs over groups or filters: only over tensors and levels.

Sharded parameters (FSDP2, ``DTensor``): step 2 reads each rank's shard into a global atom vector
of partial sums of squares and all-reduces it, the only collective of the step; step 3 then runs
identically on every rank, and steps 1 and 4 act on each rank's own shard (see
:mod:`group_prox.distributed`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .hierarchy.core import Hierarchy, TensorLayout
from .penalties import Penalty, threshold
from .sharding import Sharding, sharding_of

__all__ = [
    "AtomNormReader",
    "NonFiniteAtoms",
    "ProxPlan",
    "atom_sq_norms",
    "atom_sum",
    "group_scales",
    "group_sq_norms",
    "hierarchical_prox_",
    "scale_atoms_",
    "scales_from_norms",
    "soft_threshold_",
]


@dataclass
class _LevelPlan:
    name: str
    num_groups: int
    # int32 (int64 past 2³¹ atoms) [num_atoms], num_groups where an atom is in no group of this
    # level: an index of index_select/index_add_, which take int32 (half the bytes of a 7B plan).
    atom_group: Tensor
    in_level: Tensor  # bool[num_atoms]
    group_component: Tensor  # long[num_groups]
    weights: Tensor  # float64[num_groups], the penalty's w_g (times any group multiplier)
    covered: Tensor  # bool[num_groups], the groups the penalty acts on


class ProxPlan:
    """Index layout of a hierarchy for the levels that carry a penalty, built once.

    ``param_group_of[i]`` is the index of the optimizer param group that holds tensor ``i`` of the
    hierarchy. A *component* is a tree of penalised groups: the coarsest penalised group around an
    atom. The prox step size must be one number per component; ``linked_param_groups`` lists the
    sets of param groups that some component spans, whose learning rates must therefore be equal.

    ``sharding`` is the :class:`~group_prox.distributed.Sharding` of the tensors when they are
    ``DTensor``s (FSDP2), decided here once, else ``None``.
    """

    def __init__(
        self,
        hierarchy: Hierarchy,
        penalties: Sequence[tuple[str, Penalty]],
        param_group_of: Sequence[int],
    ) -> None:
        self.hierarchy = hierarchy
        self.tensors: tuple[TensorLayout, ...] = hierarchy.tensors
        self.penalties = list(penalties)
        order = {lv: i for i, lv in enumerate(hierarchy.level_names)}
        self.penalties.sort(key=lambda item: order[item[0]])
        n = hierarchy.num_atoms
        param_group_of = np.asarray(param_group_of, dtype=np.int64)
        atom_pg = np.repeat(param_group_of, [lay.num_atoms for lay in self.tensors])

        num_groups_of = [hierarchy.num_groups(level) for level, _ in self.penalties] + [0]
        # A penalty restricted to some groups of its level sees the other atoms as outside it.
        owners = {level: _penalised_owner(hierarchy, level, pen) for level, pen in self.penalties}

        # Component of each atom: its group in the coarsest penalised level that holds it.
        component = np.full(n, -1, dtype=np.int64)
        base = 0
        for level, _ in reversed(self.penalties):
            owner = owners[level]
            free = (owner >= 0) & (component < 0)
            component[free] = base + owner[free]
            base += hierarchy.num_groups(level)
        uniq, inverse = np.unique(component, return_inverse=True)
        has_none = uniq.size > 0 and uniq[0] < 0
        num_components = uniq.size - int(has_none)
        component = inverse - int(has_none)
        component[component < 0] = num_components  # the "no penalty" bucket
        self.num_components = num_components

        comp_pg = np.zeros(num_components + 1, dtype=np.int64)
        in_comp = component < num_components
        comp_pg[component[in_comp]] = atom_pg[in_comp]
        mismatch = np.flatnonzero(in_comp & (comp_pg[component] != atom_pg))
        pairs, first = np.unique(
            np.stack([comp_pg[component[mismatch]], atom_pg[mismatch]], axis=1),
            axis=0,
            return_index=True,
        )
        # Param groups a tree spans, with one atom of such a tree to name in errors.
        self._first_linked_atom: dict[frozenset[int], int] = {}
        for (pg_a, pg_b), k in zip(pairs.tolist(), first.tolist()):
            self._first_linked_atom.setdefault(frozenset((pg_a, pg_b)), int(mismatch[k]))
        self.linked_param_groups: list[frozenset[int]] = sorted(self._first_linked_atom, key=sorted)

        index = np.int32 if n + sum(num_groups_of) < np.iinfo(np.int32).max else np.int64
        self.levels: list[_LevelPlan] = []
        for level, penalty in self.penalties:
            owner = owners[level]
            g = hierarchy.num_groups(level)
            group_comp = np.zeros(g, dtype=np.int64)
            group_comp[owner[owner >= 0]] = component[owner >= 0]
            sizes = hierarchy.group_sizes(level)
            covered = np.zeros(g, dtype=bool)
            covered[owner[owner >= 0]] = True
            lp = _LevelPlan(
                name=level,
                num_groups=g,
                atom_group=torch.from_numpy(np.where(owner >= 0, owner, g).astype(index)),
                in_level=torch.from_numpy(owner >= 0),
                group_component=torch.from_numpy(group_comp),
                weights=torch.tensor(penalty.weights(sizes), dtype=torch.float64),
                covered=torch.from_numpy(covered),
            )
            self.levels.append(lp)
        self.atom_component = torch.from_numpy(component.astype(index))
        self.component_param_group = torch.from_numpy(comp_pg)
        self.acc_dtype = _acc_dtype(self.tensors)
        self._base_weights = [lv.weights.clone() for lv in self.levels]
        self.sharding: Sharding | None = sharding_of(self.tensors)
        self._device_cache: dict[torch.device, ProxPlan._OnDevice] = {}

    def bind(self, hierarchy: Hierarchy) -> ProxPlan:
        """The same plan over the tensors of ``hierarchy``, a :meth:`Hierarchy.bind
        <group_prox.Hierarchy.bind>` of this plan's hierarchy (same layout, other tensors): the
        index tensors are shared, not built again; the per-device buffers and the sharding are
        made for the new tensors."""
        if hierarchy._atom_group is not self.hierarchy._atom_group or len(hierarchy.tensors) != len(
            self.tensors
        ):
            raise ValueError(
                "ProxPlan.bind: the hierarchy is not a bind() of the plan's hierarchy; build a new "
                "plan for it."
            )
        out = copy.copy(self)
        out.hierarchy = hierarchy
        out.tensors = hierarchy.tensors
        out.levels = [dataclasses.replace(lp) for lp in self.levels]
        out._base_weights = list(self._base_weights)
        out.acc_dtype = _acc_dtype(out.tensors)
        out.sharding = sharding_of(out.tensors)
        out._device_cache = {}
        return out

    def __getstate__(self) -> dict[str, Any]:
        """The plan without its per-device buffers (:meth:`on` makes them again when next asked),
        for ``copy.deepcopy`` and ``pickle``; a sharded plan is refused with a ``TypeError``: its
        shards belong to a process group."""
        if self.sharding is not None:
            raise TypeError(
                "ProxPlan: the hierarchy's parameters are sharded (DTensor, FSDP2), so the plan "
                "cannot be copied or pickled. Save the optimizer with torch.distributed.checkpoint "
                "(or its state_dict()) and build a new one on the copied model."
            )
        state = self.__dict__.copy()
        state["_device_cache"] = {}
        return state

    def atoms_in(self, level: int, groups: Tensor) -> Tensor:
        """Whether each atom lies in a group marked in ``groups`` (bool, one per group of level
        ``level``, its index in ``self.levels``), on ``groups``' device."""
        marks = torch.cat([groups, groups.new_zeros(1)])  # the trailing "no group" bucket
        return marks.index_select(0, self.on(groups.device).atom_group[level])

    def base_weights(self, level: int) -> Tensor:
        """The penalty's own weights ``w_g`` of level ``level``, without multipliers."""
        return self._base_weights[level]

    def set_group_multipliers(self, level: int, multipliers: Tensor | None) -> None:
        """Scale the weights ``w_g`` of level ``level`` (its index in ``self.levels``) by
        ``multipliers[g] ≥ 0`` (``None``: back to the penalty's own weights). A multiplier of 0
        exempts a group from the penalty; the prox stays exact for the reweighted penalty."""
        base = self._base_weights[level]
        # Always a new tensor: a device buffer may alias the level's weights, never the base.
        weights = base.clone() if multipliers is None else base * multipliers.to("cpu", base.dtype)
        self.levels[level].weights = weights
        for dev in self._device_cache.values():
            dev.weights[level].copy_(weights)

    @dataclass
    class _OnDevice:
        atom_group: list[Tensor]
        in_level: list[Tensor]
        group_component: list[Tensor]
        weights: list[Tensor]
        atom_component: Tensor
        # Buffers reused at every step, with their per-tensor views made once: building 100+
        # views per step costs more than the arithmetic on the atom vectors. Sharded, a tensor's
        # view covers only the atoms of its local shard.
        atom_sq: Tensor
        scale: Tensor
        scale_views: list[Tensor]
        # Reads the atom norms into ``atom_sq`` (None when sharded: the shards are read instead).
        norm_reader: AtomNormReader | None

    def on(self, device: torch.device) -> ProxPlan._OnDevice:
        """The index tensors and work buffers on ``device`` (made once, then cached)."""
        cached = self._device_cache.get(device)
        if cached is None:
            acc = self.acc_dtype
            atom_sq = torch.zeros(self.hierarchy.num_atoms, dtype=acc, device=device)
            scale = torch.ones_like(atom_sq)
            spans = [(lay.offset, lay.offset + lay.num_atoms) for lay in self.tensors]
            cached = ProxPlan._OnDevice(
                atom_group=[lv.atom_group.to(device) for lv in self.levels],
                in_level=[lv.in_level.to(device) for lv in self.levels],
                group_component=[lv.group_component.to(device) for lv in self.levels],
                weights=[lv.weights.to(device, acc) for lv in self.levels],
                atom_component=self.atom_component.to(device),
                atom_sq=atom_sq,
                scale=scale,
                scale_views=[
                    scale[a:b].view(lay.atom_shape) for (a, b), lay in zip(spans, self.tensors)
                ]
                if self.sharding is None
                else [self.sharding.atom_view(i, scale) for i in range(len(self.tensors))],
                norm_reader=AtomNormReader(self.tensors, atom_sq)
                if self.sharding is None
                else None,
            )
            self._device_cache[device] = cached
        return cached

    def level_sq_norms(self, atom_sq: Tensor) -> list[Tensor]:
        """For each penalised level (in ``self.levels`` order), the squared norm of each of its
        groups from the atoms' squared norms ``atom_sq`` (uncovered groups count 0)."""
        dev = self.on(atom_sq.device)
        out = []
        for i, lp in enumerate(self.levels):
            sq = torch.zeros(lp.num_groups + 1, dtype=atom_sq.dtype, device=atom_sq.device)
            sq.index_add_(0, dev.atom_group[i], atom_sq)
            out.append(sq[:-1])
        return out

    def describe_link(self, link: frozenset[int]) -> str:
        """Name a tensor of a component that spans the param groups in ``link``."""
        atom = self._first_linked_atom[link]
        for lay in self.tensors:
            if lay.offset <= atom < lay.offset + lay.num_atoms:
                return lay.name
        return "?"  # pragma: no cover


def _acc_dtype(tensors: Sequence[TensorLayout]) -> torch.dtype:
    """float64 if some tensor is, else float32: the precision of norms and scales."""
    return (
        torch.float64 if any(lay.param.dtype == torch.float64 for lay in tensors) else torch.float32
    )


def _penalised_owner(hierarchy: Hierarchy, level: str, penalty: Penalty) -> np.ndarray:
    """The level's group of every atom (-1: none), keeping only the groups ``penalty`` covers."""
    owner = hierarchy.atom_group(level)
    if penalty.groups is None:
        return owner
    covered = np.array([n in penalty.groups for n in hierarchy.group_names(level)] + [False])
    return np.where(covered[owner], owner, -1)


class AtomNormReader:
    """How to read the atom norms of a list of tensors, decided once from their layouts.

    Each tensor takes the cheapest exact read for its atoms:

    * one atom (the whole tensor): one multi-tensor ``_foreach_norm`` for all such tensors;
    * one atom per element (a bias, a norm layer's scale): one ``_foreach_abs`` for all of them;
    * atoms along the leading dimensions (filters, rows of a projection): ``vector_norm`` over the
      trailing dimensions, a contiguous reduction;
    * atoms along a later dimension (columns of a projection, input channels): on a CPU, sums of
      squares over blocks of 2^18 elements (1 MiB in float32) of the leading dimensions, whose
      squares stay in a core's cache; ``vector_norm`` over a leading dimension is a strided
      reduction that is 10 to 20 times slower there (a 4096 × 11008 matrix: 266 ms against 16
      ms on two cores). Smaller blocks cost more in per-block operations than they gain in
      cache (256 KiB blocks: 20 ms). Accelerators reduce along any dimension at memory speed and
      take ``vector_norm``.

    ``out`` is the buffer of one entry per atom that :meth:`read` fills; its views are made here
    once, since making a hundred views per step costs more than the arithmetic on small tensors.
    """

    _BLOCK_NUMEL = 1 << 18

    def __init__(self, tensors: Sequence[TensorLayout], out: Tensor) -> None:
        self.tensors = tuple(tensors)
        self.out = out
        self.acc_dtype = out.dtype
        self._whole: list[int] = []
        self._whole_out: list[Tensor] = []
        self._vectors: list[int] = []
        self._vectors_out: list[Tensor] = []
        # (tensor index, dims to reduce, view of its atoms' entries shaped like the grid)
        self._rows: list[tuple[int, tuple[int, ...], Tensor]] = []
        # (tensor index, leading size, rows per block, trailing shape, trailing dims to reduce,
        #  view of its atoms' entries)
        self._columns: list[tuple[int, int, int, tuple[int, ...], tuple[int, ...], Tensor]] = []
        blocked = out.device.type == "cpu"
        for i, lay in enumerate(self.tensors):
            view = out[lay.offset : lay.offset + lay.num_atoms]
            shape = tuple(lay.param.shape)
            reduce_dims = lay.reduce_dims
            if not lay.dims:
                self._whole.append(i)
                self._whole_out.append(view)
            elif not reduce_dims:
                self._vectors.append(i)
                self._vectors_out.append(view.view(shape))
            elif not blocked or reduce_dims[0] > lay.dims[-1] or lay.dims[0] == 0:
                self._rows.append((i, reduce_dims, view.view(lay.grid)))
            else:
                lead = lay.dims[0]
                leading = math.prod(shape[:lead])
                trailing = shape[lead:]
                rows = max(1, min(leading, self._BLOCK_NUMEL // max(1, math.prod(trailing))))
                rest = tuple(d - lead for d in reduce_dims if d > lead)
                self._columns.append((i, leading, rows, trailing, rest, view.view(lay.grid)))

    def read(self) -> Tensor:
        """Fill ``out`` with the squared norm of every atom (one read of every tensor); return
        it."""
        tensors = self.tensors
        acc = self.acc_dtype
        with torch.no_grad():
            # Norms are written first and squared once at the end, in one operation.
            if self._whole:
                norms = torch._foreach_norm([tensors[i].param for i in self._whole], 2, dtype=acc)
                torch._foreach_copy_(self._whole_out, [n.reshape(1) for n in norms])
            if self._vectors:
                torch._foreach_copy_(
                    self._vectors_out, torch._foreach_abs([tensors[i].param for i in self._vectors])
                )
            for i, dims, view in self._rows:
                torch.linalg.vector_norm(tensors[i].param, 2, dim=dims, dtype=acc, out=view)
            for i, leading, rows, trailing, rest, view in self._columns:
                flat = tensors[i].param.reshape(leading, -1)
                total = torch.zeros(flat.shape[1], dtype=acc, device=flat.device)
                for start in range(0, leading, rows):
                    block = flat[start : start + rows].to(acc)
                    total += (block * block).sum(0)
                total = total.view(trailing)
                if rest:
                    total = total.sum(rest)
                view.copy_(total.sqrt_())
            return self.out.square_()


def atom_sq_norms(
    tensors: Sequence[TensorLayout],
    acc_dtype: torch.dtype,
    out: Tensor | None = None,
    sharding: Sharding | None = None,
) -> Tensor:
    """Squared Euclidean norm of every atom in atom order, one read per tensor (see
    :class:`AtomNormReader`, which a caller reading the same tensors at every step keeps).

    ``out`` (optional) is a buffer of one entry per atom to write them into. With ``sharding`` (the
    tensors are ``DTensor``s) the norms are those of the global atoms, the same on every rank: each
    rank's partial sums of squares, added up by one all-reduce."""
    if sharding is not None:
        return sharding.atom_sq_norms(acc_dtype, out)
    if out is None:
        out = torch.empty(
            sum(lay.num_atoms for lay in tensors), dtype=acc_dtype, device=tensors[0].param.device
        )
    return AtomNormReader(tensors, out).read()


def atom_sum(lay: TensorLayout, x: Tensor) -> Tensor:
    """Sum of ``x`` (shaped like ``lay.param``) over each atom of ``lay``: shape ``(num_atoms,)``.

    For sharded tensors use :meth:`~group_prox.distributed.Sharding.add_atom_sums_` on the local
    shards and one :meth:`~group_prox.distributed.Sharding.all_reduce_` for all tensors."""
    if not lay.dims:
        return x.sum().reshape(1)
    if not lay.reduce_dims:
        return x.reshape(-1)
    return x.sum(dim=lay.reduce_dims).reshape(-1)


def soft_threshold_(
    tensors: Sequence[TensorLayout], thresholds: Tensor, sharding: Sharding | None = None
) -> None:
    """``x ← sign(x)·max(0, |x| − τ)`` in place, with one threshold ``τ`` per atom (with
    ``sharding``, on each rank's shard: elementwise, it needs nothing from the other ranks)."""
    if sharding is not None:
        sharding.soft_threshold_(thresholds)
        return
    for lay in tensors:
        tau = thresholds[lay.offset : lay.offset + lay.num_atoms]
        # On the CPU a check is free and saves a pass; on an accelerator it would synchronise,
        # and under torch.compile it would break the graph.
        if tau.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(tau.any()):
            continue
        p = lay.param.detach()
        shrunk = (p.abs() - tau.view(lay.atom_shape)).clamp_(min=0)
        p.copy_(shrunk.mul_(p.sign()))


class NonFiniteAtoms(FloatingPointError):
    """Raised by :func:`hierarchical_prox_` before it scales anything when an atom's norm is NaN or
    infinite: one NaN would make every group around it NaN. ``tensor`` is the index, in the plan,
    of the first tensor holding such an atom."""

    def __init__(self, tensor: int) -> None:
        super().__init__(f"tensor {tensor} of the hierarchy holds NaN or infinite values")
        self.tensor = tensor


def hierarchical_prox_(
    plan: ProxPlan, component_eta: Tensor, *, check_finite: bool = False
) -> Tensor | None:
    """Apply the prox of the plan's penalties in place, with step size ``component_eta[c]`` on
    component ``c`` (``component_eta`` has one extra trailing entry for unpenalised atoms).

    Levels whose λ is 0 are skipped, and nothing is read or written when every λ is 0, so that the
    optimizers reduce exactly to their ``torch.optim`` counterparts. With ``check_finite`` the atom
    norms (read anyway) are checked before any group is scaled, and :class:`NonFiniteAtoms` is
    raised if one is not finite; the elementwise L1 part, applied before, cannot spread a NaN.

    Returns:
        When a group level was applied, the squared norm of every atom after the step,
        ``‖x_a‖²·s_a²`` from the norms read and the scales written (a new tensor, so that callers
        may keep it); ``None`` when the atom norms were not read.
    """
    active = _active_levels(plan)
    if not active:
        return None
    device = plan.tensors[0].param.device
    dev = plan.on(device)
    acc = plan.acc_dtype
    eta = component_eta.to(device=device, dtype=acc)

    l1 = [(i, pen.l1_part) for i, pen in active if pen.l1_part > 0]
    if l1:
        eta_atom = eta.index_select(0, dev.atom_component)
        tau = torch.zeros(eta_atom.shape, dtype=acc, device=device)
        for i, coef in l1:
            tau += torch.where(dev.in_level[i], threshold(eta_atom, coef), 0.0)
        soft_threshold_(plan.tensors, tau, plan.sharding)

    if not any(pen.has_group_part for _, pen in active):
        return None
    atom_sq = _read_atom_sq(plan, dev)
    if check_finite:
        _check_finite_atoms(plan, atom_sq)
    scale = group_scales(plan, eta, atom_sq)
    _multiply_(plan, dev.scale_views)
    return atom_sq * scale.square()


def _active_levels(plan: ProxPlan) -> list[tuple[int, Penalty]]:
    return [
        (i, pen)
        for i, (_, pen) in enumerate(plan.penalties)
        if pen.lam > 0 and plan.levels[i].num_groups
    ]


def scales_from_norms(plan: ProxPlan) -> bool:
    """Whether the plan's prox is, at the current λs, a scaling of atoms computed from their norms
    alone (no active elementwise L1 part, no sharding, some active group level): then the norms
    can come from wherever the new values are computed (see :func:`group_scales`)."""
    active = _active_levels(plan)
    return (
        plan.sharding is None
        and any(pen.has_group_part for _, pen in active)
        and not any(pen.l1_part > 0 for _, pen in active)
    )


def group_scales(plan: ProxPlan, component_eta: Tensor, atom_sq: Tensor) -> Tensor:
    """The scale of every atom under the prox of the plan's group penalties, from the squared
    atom norms ``atom_sq`` of the values it acts on (written into the plan's scale buffer on
    ``atom_sq``'s device, whose per-tensor views are ``plan.on(device).scale_views``).

    Level by level from the finest (penalties ordered ``"last"`` after the others), the group
    norms are the segment sums of ``atom_sq · scale²`` (the current values, without re-reading the
    tensors), the penalty turns them into group scales (thresholds formed in float64, see
    :func:`group_prox.penalties.threshold`), and the atom scales are multiplied by them."""
    device = atom_sq.device
    dev = plan.on(device)
    acc = plan.acc_dtype
    eta = component_eta.to(device=device, dtype=acc)
    grouped = [(i, pen) for i, pen in _active_levels(plan) if pen.has_group_part]
    scale = dev.scale.fill_(1.0)
    one = torch.ones(1, dtype=acc, device=device)
    for k, (i, pen) in enumerate(sorted(grouped, key=lambda item: item[1].order == "last")):
        lp = plan.levels[i]
        owner = dev.atom_group[i]
        sq = torch.zeros(lp.num_groups + 1, dtype=acc, device=device)
        # Current atom norms are the read ones times the scales so far (all 1 at the first level).
        sq.index_add_(0, owner, atom_sq if k == 0 else atom_sq * scale.square())
        eta_group = eta.index_select(0, dev.group_component[i])
        # Thresholds are formed in float64 (see penalties.threshold); the scales are rounded once.
        group_scale = pen.group_scale(sq[:-1], eta_group, dev.weights[i]).to(acc)
        scale.mul_(torch.cat([group_scale, one]).index_select(0, owner))
    return scale


def _check_finite_atoms(plan: ProxPlan, atom_sq: Tensor) -> None:
    finite = torch.isfinite(atom_sq)
    if bool(finite.all()):
        return
    atom = int(torch.nonzero(~finite)[0])
    offsets = [lay.offset for lay in plan.tensors]
    raise NonFiniteAtoms(int(np.searchsorted(offsets, atom, side="right")) - 1)


def _multiply_(plan: ProxPlan, views: Sequence[Tensor]) -> None:
    # Sharded, ``views`` are the plan's views of the local boxes (see ProxPlan.on).
    # Under no_grad the parameters themselves are written: a detached alias of each would cost
    # more than scaling a small tensor.
    with torch.no_grad():
        if plan.sharding is None:
            params = [lay.param for lay in plan.tensors]
        else:
            params = plan.sharding.local_tensors()
        if all(p.dtype == views[0].dtype for p in params):
            torch._foreach_mul_(params, views)
        else:
            # Mixed precisions: the product is formed in the scales' precision and rounded once.
            for p, s in zip(params, views):
                p.mul_(s)


def scale_atoms_(plan: ProxPlan, atom_scale: Tensor) -> None:
    """Multiply every atom of the plan's hierarchy in place by ``atom_scale[atom]`` (for example a
    0/1 mask that keeps a pattern of zero groups)."""
    device = plan.tensors[0].param.device
    dev = plan.on(device)
    dev.scale.copy_(atom_scale)
    _multiply_(plan, dev.scale_views)


@torch.no_grad()
def group_sq_norms(plan: ProxPlan) -> tuple[Tensor, list[Tensor]]:
    """Atom squared norms (one read of every tensor) and, for each penalised level of the plan, the
    squared norm of each of its groups (``num_groups`` entries; uncovered groups count 0)."""
    atom_sq = _read_atom_sq(plan, plan.on(plan.tensors[0].param.device)).clone()
    return atom_sq, plan.level_sq_norms(atom_sq)


def _read_atom_sq(plan: ProxPlan, dev: ProxPlan._OnDevice) -> Tensor:
    """The atom squared norms, read into the plan's buffer on ``dev`` by its cached reader (the
    shards' partial sums, all-reduced, when sharded)."""
    if dev.norm_reader is not None:
        return dev.norm_reader.read()
    return atom_sq_norms(plan.tensors, plan.acc_dtype, out=dev.atom_sq, sharding=plan.sharding)
