"""The hierarchy: named levels of parameter groups, validated as a tree.

A *member* is a whole parameter or a slice of one along a single dimension. Internally every
parameter is cut into *atoms*: the whole tensor when it only appears whole, otherwise its
sub-tensors along the one dimension its members slice. Every group is then a set of atoms, and
everything the optimizer needs at each step is an integer array over atoms, built once here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["Hierarchy", "Member", "TensorLayout"]

Member = Tensor | tuple[Tensor, int, int | slice]
GroupSpec = Sequence[Member]
LevelSpec = Sequence[GroupSpec] | Mapping[str, GroupSpec]


@dataclass(frozen=True)
class TensorLayout:
    """How one parameter is cut into atoms.

    ``dim`` is the dimension its members slice (``None``: the whole tensor is one atom);
    atoms of this tensor occupy ``[offset, offset + num_atoms)`` in the hierarchy's atom order.
    """

    param: Tensor
    name: str
    dim: int | None
    num_atoms: int
    offset: int

    @property
    def atom_numel(self) -> int:
        return self.param.numel() // self.num_atoms

    @property
    def reduce_dims(self) -> tuple[int, ...]:
        """The dimensions to reduce over to get one value per atom."""
        return tuple(d for d in range(self.param.dim()) if d != self.dim)

    @property
    def atom_shape(self) -> tuple[int, ...]:
        """A shape that broadcasts one value per atom against the parameter."""
        if self.dim is None:
            return (1,) * self.param.dim()
        shape = [1] * self.param.dim()
        shape[self.dim] = self.num_atoms
        return tuple(shape)

    @property
    def module_name(self) -> str:
        return self.name.rpartition(".")[0] or self.name


@dataclass(frozen=True)
class _NormalMember:
    tensor_index: int
    dim: int | None
    indices: tuple[int, ...] | None  # None: the whole tensor


def _names_from(names: nn.Module | Mapping[str, Tensor] | None) -> dict[int, str]:
    if names is None:
        return {}
    if isinstance(names, nn.Module):
        return {id(p): n for n, p in names.named_parameters(remove_duplicate=True)}
    if isinstance(names, Mapping):
        return {id(p): str(n) for n, p in names.items()}
    raise TypeError(
        "names must be an nn.Module, a mapping from name to parameter, or None; "
        f"got {type(names).__name__}."
    )


class Hierarchy:
    """Levels of parameter groups, finest level first, that nest as a tree.

    Args:
        levels: an ordered mapping ``level name -> groups``, finest level first (for example
            ``"base_level"``, then ``"layer"``, then ``"block"``). The groups of a level are
            either a list (group ``i`` is called ``"<level>[i]"``) or a mapping
            ``group name -> members``. A member is a parameter (the whole tensor) or a tuple
            ``(param, dim, index)`` meaning ``param.select(dim, index)`` for an ``int`` index, or
            the sub-tensor ``index`` along ``dim`` for a ``slice``. A group may span several
            tensors (a conv filter with its BatchNorm scale and shift).
        names: an ``nn.Module`` or a mapping ``name -> parameter``, used to name parameters in
            messages and reports.

    Validation (a ``ValueError`` naming the level, group and member):

    * members are floating-point leaf tensors, with ``dim`` and ``index`` in range and not empty;
    * all members that slice one tensor slice it along the same dimension;
    * groups of one level are disjoint, and no group lists a scalar twice;
    * any two groups of different levels are disjoint or nested, the smaller one in the finer
      level (so the groups form a forest: each group lies in at most one group of each coarser
      level).

    Empty levels are allowed, and parameters in no group are not penalised.
    """

    def __init__(
        self,
        levels: Mapping[str, LevelSpec],
        names: nn.Module | Mapping[str, Tensor] | None = None,
    ) -> None:
        if not isinstance(levels, Mapping):
            raise TypeError(
                "levels must be an ordered mapping {level name: groups}, finest level first; "
                f"got {type(levels).__name__}."
            )
        name_of = _names_from(names)
        self.level_names: tuple[str, ...] = tuple(levels)
        for level in self.level_names:
            if not isinstance(level, str) or not level:
                raise TypeError(f"level names must be non-empty strings, got {level!r}.")

        tensors: list[Tensor] = []
        index_of: dict[int, int] = {}
        level_groups: dict[str, list[tuple[str, list[_NormalMember]]]] = {}
        # Every sliced member fixes the dimension its tensor is cut along; remember who fixed it.
        cut_dim: dict[int, tuple[int, str]] = {}

        for level, spec in levels.items():
            named = self._named_groups(level, spec)
            normal_groups = []
            for gname, group in named:
                where = f"level {level!r}, group {gname!r}"
                if isinstance(group, Tensor) or not isinstance(group, (Sequence, Iterable)):
                    raise TypeError(
                        f"{where}: a group must be a list of members (parameters or "
                        f"(param, dim, index) tuples), got {type(group).__name__}."
                    )
                group = list(group)
                if not group:
                    raise ValueError(f"{where} is empty; drop it or give it members.")
                members = []
                for k, member in enumerate(group):
                    m = self._normalise(member, f"{where}, member {k}", tensors, index_of, name_of)
                    if m.dim is not None:
                        prev = cut_dim.setdefault(m.tensor_index, (m.dim, where))
                        if prev[0] != m.dim:
                            pname = self._default_name(
                                tensors[m.tensor_index], m.tensor_index, name_of
                            )
                            raise ValueError(
                                f"{where}, member {k}: parameter {pname} is sliced along dim {m.dim}, "
                                f"but {prev[1]} slices it along dim {prev[0]}. Slices of one tensor "
                                "must use one dimension (groups along two dimensions cannot nest)."
                            )
                    members.append(m)
                normal_groups.append((gname, members))
            level_groups[level] = normal_groups

        layouts = []
        offset = 0
        for i, t in enumerate(tensors):
            dim = cut_dim.get(i, (None,))[0]
            n = 1 if dim is None else t.shape[dim]
            layouts.append(TensorLayout(t, self._default_name(t, i, name_of), dim, n, offset))
            offset += n
        self.tensors: tuple[TensorLayout, ...] = tuple(layouts)
        self.num_atoms: int = offset
        self._atom_numel = np.array(
            [lay.atom_numel for lay in layouts for _ in range(lay.num_atoms)], dtype=np.int64
        )

        self._atom_group: dict[str, np.ndarray] = {}
        self._group_names: dict[str, tuple[str, ...]] = {}
        self._group_atoms: dict[str, tuple[np.ndarray, ...]] = {}
        self._group_members: dict[str, tuple[tuple[_NormalMember, ...], ...]] = {}
        for level, groups in level_groups.items():
            self._build_level(level, groups)
        self._check_tree()

    # ----------------------------------------------------------------------------- construction
    @staticmethod
    def _named_groups(level: str, spec: LevelSpec) -> list[tuple[str, GroupSpec]]:
        if isinstance(spec, Mapping):
            return [(str(k), v) for k, v in spec.items()]
        if isinstance(spec, Tensor) or not isinstance(spec, (Sequence, Iterable)):
            raise TypeError(
                f"level {level!r}: expected a list of groups or a mapping {{group name: members}}, "
                f"got {type(spec).__name__}."
            )
        return [(f"{level}[{i}]", g) for i, g in enumerate(spec)]

    @staticmethod
    def _default_name(t: Tensor, i: int, name_of: dict[int, str]) -> str:
        return name_of.get(id(t), f"param#{i}{tuple(t.shape)}")

    def _normalise(
        self,
        member: object,
        where: str,
        tensors: list[Tensor],
        index_of: dict[int, int],
        name_of: dict[int, str],
    ) -> _NormalMember:
        if isinstance(member, Tensor):
            t, dim, index = member, None, None
        elif isinstance(member, tuple) and len(member) == 3:
            t, dim, index = member
            if not isinstance(t, Tensor):
                raise TypeError(f"{where}: the first item of (param, dim, index) must be a tensor.")
        else:
            raise TypeError(
                f"{where}: a member is a parameter or a (param, dim, index) tuple, "
                f"got {type(member).__name__}."
            )
        label = name_of.get(id(t), f"tensor of shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(
                f"{where}: {label} has dtype {t.dtype}; members must be floating point."
            )
        if not t.is_leaf or t._base is not None:
            raise ValueError(
                f"{where}: {label} is a view or a computed tensor, not a parameter. To select a "
                "part of a parameter write (param, dim, index), e.g. (conv.weight, 0, 3)."
            )
        if t.numel() == 0:
            raise ValueError(f"{where}: {label} has no elements.")
        if id(t) not in index_of:
            index_of[id(t)] = len(tensors)
            tensors.append(t)
        ti = index_of[id(t)]
        if dim is None:
            return _NormalMember(ti, None, None)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"{where}: dim must be an int, got {dim!r}.")
        if t.dim() == 0:
            raise ValueError(f"{where}: {label} is 0-dimensional; use the whole parameter.")
        if not -t.dim() <= dim < t.dim():
            raise ValueError(
                f"{where}: dim {dim} is out of range for {label} of shape {tuple(t.shape)}."
            )
        dim %= t.dim()
        size = t.shape[dim]
        if isinstance(index, slice):
            indices = tuple(range(*index.indices(size)))
            if not indices:
                raise ValueError(
                    f"{where}: slice {index} selects nothing of dim {dim} (size {size})."
                )
        elif isinstance(index, int) and not isinstance(index, bool):
            if not -size <= index < size:
                raise ValueError(
                    f"{where}: index {index} is out of range for dim {dim} (size {size}) of {label}."
                )
            indices = (index % size,)
        else:
            raise TypeError(f"{where}: index must be an int or a slice, got {index!r}.")
        return _NormalMember(ti, dim, indices)

    def _member_atoms(self, m: _NormalMember) -> np.ndarray:
        lay = self.tensors[m.tensor_index]
        if m.indices is None:
            return np.arange(lay.offset, lay.offset + lay.num_atoms, dtype=np.int64)
        return lay.offset + np.asarray(m.indices, dtype=np.int64)

    def _build_level(self, level: str, groups: list[tuple[str, list[_NormalMember]]]) -> None:
        owner = np.full(self.num_atoms, -1, dtype=np.int64)
        names, atoms_of = [], []
        for g, (gname, members) in enumerate(groups):
            atoms = np.concatenate([self._member_atoms(m) for m in members])
            if np.unique(atoms).size != atoms.size:
                raise ValueError(
                    f"level {level!r}, group {gname!r}: its members overlap (a scalar is listed twice)."
                )
            taken = owner[atoms]
            if (taken >= 0).any():
                other = names[int(taken[taken >= 0][0])]
                raise ValueError(
                    f"level {level!r}: groups {other!r} and {gname!r} overlap; "
                    "groups of one level must be disjoint."
                )
            owner[atoms] = g
            names.append(gname)
            atoms_of.append(np.sort(atoms))
        self._atom_group[level] = owner
        self._group_names[level] = tuple(names)
        self._group_atoms[level] = tuple(atoms_of)
        self._group_members[level] = tuple(tuple(m) for _, m in groups)

    def _check_tree(self) -> None:
        levels = self.level_names
        for i, fine in enumerate(levels):
            fine_owner = self._atom_group[fine]
            in_fine = fine_owner >= 0
            num_fine = len(self._group_names[fine])
            for coarse in levels[i + 1 :]:
                # A finer group is fine if all its atoms share one coarse owner (or none, -1).
                coarse_owner = self._atom_group[coarse][in_fine]
                lo = np.full(num_fine, np.iinfo(np.int64).max, dtype=np.int64)
                hi = np.full(num_fine, -2, dtype=np.int64)
                np.minimum.at(lo, fine_owner[in_fine], coarse_owner)
                np.maximum.at(hi, fine_owner[in_fine], coarse_owner)
                bad = np.flatnonzero(lo != hi)
                if bad.size:
                    self._raise_not_nested(fine, coarse, int(bad[0]))

    def _raise_not_nested(self, fine: str, coarse: str, g: int) -> None:
        atoms = self._group_atoms[fine][g]
        parents = np.unique(self._atom_group[coarse][atoms])
        fname = self._group_names[fine][g]
        inside = [self._group_names[coarse][p] for p in parents if p >= 0]
        if parents.size == 2 and parents[0] < 0:
            c_atoms = self._group_atoms[coarse][int(parents[1])]
            if np.isin(c_atoms, atoms).all():
                raise ValueError(
                    f"group {inside[0]!r} of level {coarse!r} lies inside group {fname!r} of the "
                    f"finer level {fine!r}: a coarser level must hold the larger groups. "
                    "List the levels finest first."
                )
        raise ValueError(
            f"group {fname!r} of level {fine!r} overlaps {', '.join(repr(n) for n in inside)} of "
            f"level {coarse!r} without being contained in one of them: groups of different levels "
            "must be disjoint or nested (a tree)."
        )

    # ----------------------------------------------------------------------------- queries
    @property
    def params(self) -> list[Tensor]:
        """Every tensor that appears in some group, in first-appearance order."""
        return [lay.param for lay in self.tensors]

    def num_groups(self, level: str) -> int:
        return len(self._group_names[self._level(level)])

    def group_names(self, level: str) -> tuple[str, ...]:
        return self._group_names[self._level(level)]

    def group_sizes(self, level: str) -> list[int]:
        """Number of scalars in each group of ``level``."""
        level = self._level(level)
        return [int(self._atom_numel[a].sum()) for a in self._group_atoms[level]]

    def atom_group(self, level: str) -> np.ndarray:
        """For every atom, the index of its group in ``level``, or -1."""
        return self._atom_group[self._level(level)]

    @property
    def atom_numel(self) -> np.ndarray:
        """Number of scalars in each atom."""
        return self._atom_numel

    def groups(self, level: str) -> list[list[Tensor]]:
        """The groups of ``level`` as lists of (detached) member tensors, for inspection and
        :meth:`~group_prox.penalties.Penalty.value`."""
        level = self._level(level)
        out = []
        for members in self._group_members[level]:
            views = []
            for m in members:
                t = self.tensors[m.tensor_index].param.detach()
                if m.indices is None:
                    views.append(t)
                else:
                    idx = torch.as_tensor(m.indices, device=t.device)
                    views.append(t.index_select(m.dim, idx))
            out.append(views)
        return out

    def signature(self) -> dict[str, object]:
        """Plain-data description used to detect a checkpoint from another hierarchy."""
        return {
            "levels": list(self.level_names),
            "groups": [self.num_groups(lv) for lv in self.level_names],
            "shapes": [list(lay.param.shape) for lay in self.tensors],
        }

    def _level(self, level: str) -> str:
        if level not in self._atom_group:
            raise KeyError(f"no level {level!r}; the levels are {list(self.level_names)}.")
        return level

    def __repr__(self) -> str:
        parts = ", ".join(f"{lv}: {self.num_groups(lv)} groups" for lv in self.level_names)
        return f"Hierarchy({parts}; {len(self.tensors)} tensors)"
