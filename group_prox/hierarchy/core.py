"""The hierarchy: named levels of parameter groups, validated as a tree.

A *member* is a whole parameter or a part of one selected along one or more dimensions. Internally
every parameter is cut into *atoms*: the whole tensor when it only appears whole, otherwise the
cells of the grid spanned by all the dimensions its members select along (rows of a weight; or,
for a fused expert weight ``[experts, d_in, hidden]`` sliced by expert and by hidden unit, the
``(expert, unit)`` fibres). Every group is then a set of atoms, and everything the optimizer needs
at each step is an integer array over atoms, built once here.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import itertools
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ..distributed import full_tensor

__all__ = ["GroupTable", "Hierarchy", "Member", "Part", "TensorLayout"]

Index = int | slice
Member = Tensor | tuple[Tensor, int, Index] | tuple[Tensor, tuple[int, ...], tuple[Index, ...]]
GroupSpec = Sequence[Member]
LevelSpec = Sequence[GroupSpec] | Mapping[str, GroupSpec]


class Part(NamedTuple):
    """One member of every group of a :class:`GroupTable`, as arrays.

    For group ``g`` of the table, the member is the box of ``tensor`` spanning
    ``[starts[g, i], starts[g, i] + sizes[i])`` along dimension ``dims[i]`` (all of the other
    dimensions): ``(tensor, dims[0], slice(starts[g, 0], starts[g, 0] + sizes[0]))`` for one
    dimension, ``(tensor, dims, (…))`` for several, and ``tensor`` itself when ``dims`` is empty.
    With ``ints=True`` every size is 1 and the member is written with ``int`` indices
    (``(tensor, 0, e)``) instead of slices; the scalars are the same.

    Build one with :meth:`GroupTable` ``(names, parts)``; ``starts`` may be any integer array of
    ``len(names) × len(dims)`` entries (a 1-D array for one dimension).
    """

    tensor: Tensor
    dims: tuple[int, ...]
    starts: np.ndarray  # int32 or int64 [num_groups, len(dims)]
    sizes: tuple[int, ...]
    ints: bool = False

    def member(self, g: int) -> Member:
        """The member of group ``g``, as a group written by hand lists it."""
        if not self.dims:
            return self.tensor
        idx = tuple(
            int(s) if self.ints else slice(int(s), int(s) + n)
            for s, n in zip(self.starts[g], self.sizes)
        )
        if len(self.dims) == 1:
            return (self.tensor, self.dims[0], idx[0])
        return (self.tensor, self.dims, idx)


class _ArrayBlock(NamedTuple):
    names: tuple[str, ...]
    parts: tuple[Part, ...]


class GroupTable(Mapping[str, list[Member]]):
    """Many groups of one level at once: a level spec that builds in array operations.

    ``GroupTable(names, parts)`` holds ``len(names)`` groups; group ``g`` is named ``names[g]``
    and holds one member per :class:`Part` (``parts[k].member(g)``). For example the MLP neurons
    ``i`` of a ``gate_proj``/``up_proj``/``down_proj`` MLP of width ``n``::

        i = np.arange(n)
        GroupTable(
            [f"mlp[{j}]" for j in range(n)],
            [Part(gate.weight, (0,), i, (1,)), Part(up.weight, (0,), i, (1,)),
             Part(down.weight, (1,), i, (1,))],
        )

    is the level ``{f"mlp[{j}]": [(gate.weight, 0, slice(j, j + 1)), …] for j in range(n)}``,
    and :class:`Hierarchy` builds it without a Python loop over the groups (builders of large
    models use tables: ~10⁵ groups per second otherwise, ~10⁷ so). :meth:`concat` joins tables
    and plain mappings ``{group name: members}`` into one level. A table is a read-only mapping
    ``group name -> members`` (``table[name]`` writes the members out; iterating a large table
    group by group is slow, which the hierarchy never does).

    Raises:
        TypeError, ValueError: if a part's ``starts`` does not have one row per group, or its
            ``dims`` and ``sizes`` differ in length or are not positive; ranges are checked by
            :class:`Hierarchy`, which names the level and the group.
    """

    def __init__(self, names: Sequence[str], parts: Sequence[Part]) -> None:
        names = tuple(names)
        if not all(isinstance(n, str) for n in names):
            raise TypeError("GroupTable: group names must be strings.")
        self._blocks: tuple[_ArrayBlock | dict[str, list[Member]], ...] = (
            (_ArrayBlock(names, tuple(_checked_part(p, len(names)) for p in parts)),)
            if names
            else ()
        )
        self._index: dict[str, tuple[int, int]] | None = None

    @classmethod
    def concat(cls, pieces: Iterable[Mapping[str, Sequence[Member]]]) -> GroupTable:
        """One level of the groups of ``pieces`` in order: tables, or mappings
        ``{group name: members}`` (kept as they are, built group by group)."""
        out = cls((), ())
        blocks: list[_ArrayBlock | dict[str, list[Member]]] = []
        for piece in pieces:
            if isinstance(piece, GroupTable):
                blocks += piece._blocks
            elif isinstance(piece, Mapping):
                if piece:
                    blocks.append({str(k): list(v) for k, v in piece.items()})
            else:
                raise TypeError(
                    f"GroupTable.concat: expected GroupTables or mappings, got {type(piece).__name__}."
                )
        out._blocks = tuple(blocks)
        return out

    @property
    def blocks(self) -> tuple[_ArrayBlock | dict[str, list[Member]], ...]:
        """The table's pieces in order: array blocks ``(names, parts)`` and plain mappings."""
        return self._blocks

    def remap(self, tensors: Mapping[int, Tensor]) -> GroupTable:
        """The same groups over other tensors: each tensor ``t`` of a member becomes
        ``tensors[id(t)]`` where given (the arrays are shared, not copied)."""
        out = GroupTable((), ())
        out._blocks = tuple(
            _ArrayBlock(
                b.names,
                tuple(p._replace(tensor=tensors.get(id(p.tensor), p.tensor)) for p in b.parts),
            )
            if isinstance(b, _ArrayBlock)
            else {k: [_remap_member(m, tensors) for m in v] for k, v in b.items()}
            for b in self._blocks
        )
        return out

    def names(self) -> Iterator[str]:
        return itertools.chain.from_iterable(
            b.names if isinstance(b, _ArrayBlock) else b.keys() for b in self._blocks
        )

    def __iter__(self) -> Iterator[str]:
        return self.names()

    def __len__(self) -> int:
        return sum(len(b.names) if isinstance(b, _ArrayBlock) else len(b) for b in self._blocks)

    def __getitem__(self, name: str) -> list[Member]:
        if self._index is None:
            self._index = {
                n: (k, g)
                for k, b in enumerate(self._blocks)
                if isinstance(b, _ArrayBlock)
                for g, n in enumerate(b.names)
            }
        found = self._index.get(name)
        if found is not None:
            k, g = found
            return [p.member(g) for p in self._blocks[k].parts]
        for b in self._blocks:
            if not isinstance(b, _ArrayBlock) and name in b:
                return b[name]
        raise KeyError(name)

    def __repr__(self) -> str:
        return f"GroupTable({len(self)} groups in {len(self._blocks)} blocks)"


def _checked_part(part: object, n: int) -> Part:
    if not isinstance(part, Part):
        raise TypeError(f"GroupTable: parts must be Part tuples, got {type(part).__name__}.")
    if not isinstance(part.tensor, Tensor):
        raise TypeError(
            f"GroupTable: a part's tensor must be a tensor, got {type(part.tensor).__name__}."
        )
    dims, sizes = tuple(part.dims), tuple(part.sizes)
    if len(dims) != len(sizes) or any(
        isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in (*dims, *sizes)
    ):
        raise TypeError(f"GroupTable: dims {dims!r} and sizes {sizes!r} must be as many ints.")
    if any(s < 1 for s in sizes) or (part.ints and any(s != 1 for s in sizes)):
        raise ValueError(f"GroupTable: sizes {sizes!r} must be positive (1 with ints=True).")
    starts = np.asarray(part.starts)
    if starts.dtype.kind not in "iu" or starts.size != n * len(dims):
        raise ValueError(
            f"GroupTable: a part's starts must be integers, one per group and dim "
            f"({n} x {len(dims)}), got {starts.dtype} of shape {starts.shape}."
        )
    # int32 where the indices fit: the starts of a table are its largest arrays but one.
    bound = max(int(starts.max(initial=0)), -int(starts.min(initial=0)))
    starts = starts.astype(_index_dtype(bound + 1), copy=False)
    starts = starts.reshape(n, len(dims))
    return Part(
        part.tensor,
        tuple(int(d) for d in dims),
        starts,
        tuple(int(s) for s in sizes),
        bool(part.ints),
    )


def _remap_member(member: object, tensors: Mapping[int, Tensor]) -> object:
    if isinstance(member, Tensor):
        return tensors.get(id(member), member)
    if isinstance(member, tuple) and member and isinstance(member[0], Tensor):
        return (tensors.get(id(member[0]), member[0]), *member[1:])
    return member


def _remap_level(spec: object, tensors: Mapping[int, Tensor]) -> object:
    if isinstance(spec, GroupTable):
        return spec.remap(tensors)
    if isinstance(spec, Mapping):
        return {k: [_remap_member(m, tensors) for m in v] for k, v in spec.items()}
    return [[_remap_member(m, tensors) for m in g] for g in spec]  # type: ignore[union-attr]


@dataclass(frozen=True)
class TensorLayout:
    """How one parameter is cut into atoms.

    ``dims`` are the dimensions its members select along, increasing (empty: the whole tensor is
    one atom). The atoms are the cells of the grid over ``dims``, in row-major order, and occupy
    ``[offset, offset + num_atoms)`` in the hierarchy's atom order.
    """

    param: Tensor
    name: str
    dims: tuple[int, ...]
    num_atoms: int
    offset: int

    @property
    def atom_numel(self) -> int:
        return self.param.numel() // self.num_atoms

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of atoms along each of ``dims``."""
        return tuple(self.param.shape[d] for d in self.dims)

    @property
    def reduce_dims(self) -> tuple[int, ...]:
        """The dimensions to reduce over to get one value per atom."""
        return tuple(d for d in range(self.param.dim()) if d not in self.dims)

    @property
    def atom_shape(self) -> tuple[int, ...]:
        """A shape that broadcasts one value per atom (in atom order) against the parameter."""
        return tuple(n if d in self.dims else 1 for d, n in enumerate(self.param.shape))

    @property
    def module_name(self) -> str:
        return self.name.rpartition(".")[0] or self.name


class _NormalMember(NamedTuple):
    tensor_index: int
    dims: tuple[int, ...]  # increasing; empty: the whole tensor
    indices: tuple[tuple[int, ...], ...]  # the selected indices along each of dims


class _NormalPart(NamedTuple):
    tensor_index: int
    dims: tuple[int, ...]  # increasing; empty: the whole tensor
    starts: np.ndarray  # int64 [num_groups, len(dims)]
    sizes: tuple[int, ...]


class _Plain(NamedTuple):
    """Groups given one by one: the members of each."""

    groups: tuple[tuple[_NormalMember, ...], ...]


class _Table(NamedTuple):
    """``num_groups`` groups given as arrays (a block of a :class:`GroupTable`)."""

    num_groups: int
    parts: tuple[_NormalPart, ...]


def _index_dtype(n: int) -> type[np.signedinteger]:
    """The integer type for indices below ``n`` (and -1): int32 while it fits, halving the index
    arrays of large models."""
    return np.int32 if n < np.iinfo(np.int32).max else np.int64


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


@contextmanager
def gc_paused() -> Iterator[None]:
    """Building a hierarchy allocates ~10⁵ small objects and no reference cycles; the cyclic
    collector would rescan the heap over and over (half the build time of a ResNet-50)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def name_list(names: Sequence[str], limit: int = 3) -> str:
    """``"a, b, c and 4 more"``: the first ``limit`` names and how many others, for a message."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{', '.join(names[:limit])}{more}"


def hidden_unit(ups: Sequence[nn.Module], down: nn.Module, j: int) -> list[Member]:
    """The members of hidden unit ``j`` of an MLP: row ``j`` of the weight of every projection
    ``ups`` into the hidden layer (one, or gate and up) and its bias entry, and column ``j`` of
    the weight of the projection ``down`` out of it (``nn.Linear`` or 1×1 convolutions). A zero
    unit contributes exactly nothing, whatever the activation."""
    members: list[Member] = []
    for up in ups:
        members.append((up.weight, 0, j))
        if up.bias is not None:
            members.append((up.bias, 0, j))
    members.append((down.weight, 1, j))
    return members


def check_include_frozen(include_frozen: object, caller: str) -> bool:
    """``include_frozen`` of a builder, checked: a ``bool``."""
    if not isinstance(include_frozen, (bool, np.bool_)):
        raise TypeError(
            f"{caller}: include_frozen must be True or False, got {type(include_frozen).__name__}."
        )
    return bool(include_frozen)


def from_families(model: nn.Module, builder: str, *, include_frozen: object) -> Hierarchy:
    """The hierarchy of the registered families of ``builder`` (``"resnet"``, ``"transformer"``)
    found in ``model``, without its frozen parameters unless ``include_frozen``: what the builders
    :func:`~group_prox.hierarchy.resnet` and :func:`~group_prox.hierarchy.transformer` return."""
    from ..families.registry import levels_for  # the family modules import this module

    caller = f"{builder}()"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: expected an nn.Module, got {type(model).__name__}.")
    include = check_include_frozen(include_frozen, caller)
    levels = without_frozen(
        levels_for(model, builder, caller), model, include_frozen=include, caller=caller
    )
    return Hierarchy(levels, names=model)


def without_frozen(
    levels: Mapping[str, Mapping[str, Sequence[Member]]],
    model: nn.Module,
    *,
    include_frozen: bool,
    caller: str,
    hint: str = "",
) -> dict[str, dict[str, list[Member]]]:
    """A builder's levels without the groups whose parameters are all frozen.

    The rule every builder of :mod:`group_prox.hierarchy` follows for parameters with
    ``requires_grad=False`` (frozen): a group (of any level) all of whose members lie in frozen
    tensors is left out, so a model of which some layers are frozen gets a hierarchy, and an
    optimizer, over its trainable parameters only. A group of which some members are frozen and
    others are not is refused: its penalty shrinks all of it by one factor, so it can neither be
    kept without its frozen part nor left out without its trainable part. A coarser group contains
    the finer groups inside it, so it is left out only together with all of them, and one holding
    a frozen finer group next to trainable members is refused too: without its frozen part, what
    a zero group means would change unnoticed (a residual branch whose last layer is frozen does
    not output zero when the rest of the branch is zero). The groups kept are a subset of a tree,
    so still a tree, each with the same members as without frozen parameters.

    With ``include_frozen=True`` the levels are returned as they are (frozen tensors included:
    give them to the optimizer too, and the prox shrinks them although no gradient step does).

    Args:
        levels: ``level name -> {group name: members}``, finest level first.
        model: the model whose parameters all members belong to (when none of them is frozen
            the levels are returned unchanged), to name parameters in messages.
        include_frozen: keep frozen parameters (the builder's option, checked here).
        caller: the builder, ``"resnet()"``, to start messages with.
        hint: a builder-specific remedy appended to the message for a partly frozen group.

    Raises:
        ValueError: if a group has both frozen and trainable members; the message names the
            level, the group and its frozen and trainable tensors.
    """
    check_include_frozen(include_frozen, caller)
    if include_frozen or all(p.requires_grad for p in model.parameters()):
        return {
            level: groups if isinstance(groups, GroupTable) else dict(groups)
            for level, groups in levels.items()
        }
    kept_levels: dict[str, Mapping[str, list[Member]]] = {}
    for level, groups in levels.items():
        if not isinstance(groups, GroupTable):
            kept_levels[level] = _unfrozen_groups(groups, level, model, caller, hint)
            continue
        pieces: list[Mapping[str, Sequence[Member]]] = []
        for block in groups.blocks:
            if not isinstance(block, _ArrayBlock):
                pieces.append(_unfrozen_groups(block, level, model, caller, hint))
                continue
            # Every group of an array block has one member in each of the same tensors.
            num_frozen = sum(not p.tensor.requires_grad for p in block.parts)
            if num_frozen == 0:
                table = GroupTable((), ())
                table._blocks = (block,)
                pieces.append(table)
            elif num_frozen < len(block.parts):
                first = {block.names[0]: [p.member(0) for p in block.parts]}
                mixed = [block.names[0]] + [""] * (len(block.names) - 1)
                _raise_partly_frozen(first, level, mixed, model, caller, hint)
        kept_levels[level] = GroupTable.concat(pieces)
    return kept_levels  # type: ignore[return-value]


def _unfrozen_groups(
    groups: Mapping[str, Sequence[Member]],
    level: str,
    model: nn.Module,
    caller: str,
    hint: str,
) -> dict[str, list[Member]]:
    kept: dict[str, list[Member]] = {}
    mixed: list[str] = []
    for gname, members in groups.items():
        tensors = [_tensor_of(m) for m in members]
        num_frozen = sum(not t.requires_grad for t in tensors)
        if num_frozen == 0:
            kept[gname] = list(members)
        elif num_frozen < len(tensors):
            mixed.append(gname)
    if mixed:
        _raise_partly_frozen(groups, level, mixed, model, caller, hint)
    return kept


def _tensor_of(member: Member) -> Tensor:
    return member if isinstance(member, Tensor) else member[0]


def _raise_partly_frozen(
    groups: Mapping[str, Sequence[Member]],
    level: str,
    mixed: list[str],
    model: nn.Module,
    caller: str,
    hint: str,
) -> None:
    name_of = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    gname = mixed[0]
    unique = list({id(t): t for t in map(_tensor_of, groups[gname])}.values())

    def names(frozen: bool) -> str:
        return name_list(
            [
                name_of.get(id(t), f"tensor of shape {tuple(t.shape)}")
                for t in unique
                if (not t.requires_grad) == frozen
            ]
        )

    others = len(mixed) - 1
    also = ""
    if others == 1:
        also = " (1 other group of this level is partly frozen too)"
    elif others > 1:
        also = f" ({others} other groups of this level are partly frozen too)"
    raise ValueError(
        f"{caller}: group {gname!r} of level {level!r} is partly frozen: its members in "
        f"{names(True)} have requires_grad=False, those in {names(False)} do not{also}. A group is "
        "shrunk as one, so it can be neither penalised without its frozen part nor left out "
        "without its trainable part. Freeze all of the group (requires_grad_(False) on its "
        f"trainable tensors too) or none of it, {hint}or pass include_frozen=True to keep the "
        "frozen parameters in the hierarchy and give them to the optimizer too (the prox then "
        "shrinks them although no gradient step changes them)."
    )


def common_module_prefix(names: Sequence[str]) -> str:
    """The longest dotted module path shared by ``names`` (``""`` if none), to name a group."""
    parts = [n.split(".") for n in names if n]
    prefix = []
    for level in zip(*parts):
        if any(p != level[0] for p in level):
            break
        prefix.append(level[0])
    return ".".join(prefix)


class Hierarchy:
    """Levels of parameter groups, finest level first, that nest as a tree.

    Args:
        levels: an ordered mapping ``level name -> groups``, finest level first (for example
            ``"base_level"``, then ``"layer"``, then ``"block"``). The groups of a level are
            either a list (group ``i`` is called ``"<level>[i]"``) or a mapping
            ``group name -> members``. A member is a parameter (the whole tensor) or a tuple
            ``(param, dim, index)`` meaning ``param.select(dim, index)`` for an ``int`` index, or
            the sub-tensor ``index`` along ``dim`` for a ``slice``. To select along several
            dimensions at once give tuples: ``(w, (0, 2), (e, j))`` is ``w[e, :, j]`` (hidden
            unit ``j`` of expert ``e`` in a fused ``[experts, d_in, hidden]`` weight). A group may
            span several tensors (a conv filter with its BatchNorm scale and shift).
        names: an ``nn.Module`` or a mapping ``name -> parameter``, used to name parameters in
            messages and reports.
        trace: how a builder traced the model to find the groups, for :func:`group_prox.compress`
            to trace it again (:func:`group_prox.hierarchy.auto` gives a
            :class:`group_prox.tracing.AutoTrace`); ``None`` (the default) for the others. Read
            it back as :attr:`trace`; :meth:`with_level`, ``copy`` and ``pickle`` keep it.

    Validation (a ``ValueError`` naming the level, group and member):

    * members are floating-point leaf tensors, with ``dim`` and ``index`` in range and not empty;
    * groups of one level are disjoint, and no group lists a scalar twice;
    * any two groups of different levels are disjoint or nested, the smaller one in the finer
      level (so the groups form a forest: each group lies in at most one group of each coarser
      level).

    Empty levels are allowed, and parameters in no group are not penalised.
    """

    _trace: object | None = None  # also for a hierarchy pickled before it had a trace

    def __init__(
        self,
        levels: Mapping[str, LevelSpec],
        names: nn.Module | Mapping[str, Tensor] | None = None,
        *,
        trace: object | None = None,
    ) -> None:
        if not isinstance(levels, Mapping):
            raise TypeError(
                "levels must be an ordered mapping {level name: groups}, finest level first; "
                f"got {type(levels).__name__}."
            )
        with gc_paused():
            self._build(levels, _names_from(names))
        self._trace = trace

    @property
    def trace(self) -> object | None:
        """How the builder traced the model (an :class:`~group_prox.tracing.AutoTrace` for
        :func:`~group_prox.hierarchy.auto`), or ``None``. Read-only."""
        return self._trace

    def _build(self, levels: Mapping[str, LevelSpec], name_of: dict[int, str]) -> None:
        # The levels as given, with every group made a list: an iterable given for a level or a
        # group is consumed below, and with_level (and copy.deepcopy) need them again.
        self._levels: dict[str, LevelSpec] = {}
        self.level_names: tuple[str, ...] = tuple(levels)
        for level in self.level_names:
            if not isinstance(level, str) or not level:
                raise TypeError(f"level names must be non-empty strings, got {level!r}.")

        tensors: list[Tensor] = []
        index_of: dict[int, int] = {}
        shapes: list[tuple[int, ...]] = []
        level_pieces: dict[str, tuple[list[str], list[_Plain | _Table]]] = {}
        # The union of the dimensions members select along cuts each tensor into its atoms.
        cut_dims: dict[int, set[int]] = {}
        seen = (tensors, shapes, index_of, name_of)

        for level, spec in levels.items():
            names: list[str] = []
            pieces: list[_Plain | _Table] = []
            if isinstance(spec, GroupTable):
                self._levels[level] = spec
                for block in spec.blocks:
                    if isinstance(block, _ArrayBlock):
                        parts = tuple(
                            self._normalise_part(p, f"level {level!r}", block.names, k, *seen)
                            for k, p in enumerate(block.parts)
                        )
                        for part in parts:
                            cut_dims.setdefault(part.tensor_index, set()).update(part.dims)
                        pieces.append(_Table(len(block.names), parts))
                        names += block.names
                    else:
                        plain, _ = self._normalise_groups(level, block, cut_dims, seen)
                        pieces.append(_Plain(tuple(m for _, m in plain)))
                        names += [n for n, _ in plain]
                if len(set(names)) != len(names):
                    met: set[str] = set()
                    twice = next(n for n in names if n in met or met.add(n))
                    raise ValueError(f"level {level!r}: two groups are named {twice!r}.")
            else:
                plain, given = self._normalise_groups(level, spec, cut_dims, seen)
                self._levels[level] = dict(zip(spec, given)) if isinstance(spec, Mapping) else given
                pieces.append(_Plain(tuple(m for _, m in plain)))
                names += [n for n, _ in plain]
            level_pieces[level] = (names, pieces)

        layouts = []
        offset = 0
        for i, t in enumerate(tensors):
            dims = tuple(sorted(cut_dims.get(i, ())))
            n = int(np.prod([t.shape[d] for d in dims], dtype=np.int64))
            layouts.append(TensorLayout(t, self._default_name(t, i, name_of), dims, n, offset))
            offset += n
        self.tensors: tuple[TensorLayout, ...] = tuple(layouts)
        self.num_atoms: int = offset

        self._atom_group: dict[str, np.ndarray] = {}
        self._group_names: dict[str, tuple[str, ...]] = {}
        self._group_members: dict[str, tuple[_Plain | _Table, ...]] = {}
        for level, (names, pieces) in level_pieces.items():
            self._build_level(level, names, pieces)
        self._check_tree()

    def _normalise_groups(
        self,
        level: str,
        spec: LevelSpec,
        cut_dims: dict[int, set[int]],
        seen: tuple[list[Tensor], list[tuple[int, ...]], dict[int, int], dict[int, str]],
    ) -> tuple[list[tuple[str, tuple[_NormalMember, ...]]], list[list[Member]]]:
        """The groups of a plain level spec, normalised, and the groups as given (as lists)."""
        tensors, shapes, index_of, name_of = seen
        normal_groups = []
        given: list[list[Member]] = []
        for gname, group in self._named_groups(level, spec):
            where = f"level {level!r}, group {gname!r}"
            if isinstance(group, (Tensor, str, bytes)) or not isinstance(
                group, (Sequence, Iterable)
            ):
                raise TypeError(
                    f"{where}: a group must be a list of members (parameters or "
                    f"(param, dim, index) tuples), got {type(group).__name__}."
                )
            group = list(group)
            if not group:
                raise ValueError(f"{where} is empty; drop it or give it members.")
            members = []
            for k, member in enumerate(group):
                m = self._normalise(
                    member, f"{where}, member {k}", tensors, shapes, index_of, name_of
                )
                cut_dims.setdefault(m.tensor_index, set()).update(m.dims)
                members.append(m)
            normal_groups.append((gname, tuple(members)))
            given.append(group)
        return normal_groups, given

    # ----------------------------------------------------------------------------- construction
    @staticmethod
    def _named_groups(level: str, spec: LevelSpec) -> list[tuple[str, GroupSpec]]:
        if isinstance(spec, Mapping):
            return [(str(k), v) for k, v in spec.items()]
        if isinstance(spec, (Tensor, str, bytes)) or not isinstance(spec, (Sequence, Iterable)):
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
        shapes: list[tuple[int, ...]],
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
        ti = self._tensor_index(t, where, name_of, index_of, tensors, shapes)
        shape = shapes[ti]
        label = name_of.get(id(t)) or f"tensor of shape {shape}"
        if dim is None:
            return _NormalMember(ti, (), ())
        if isinstance(dim, tuple):
            if not isinstance(index, tuple) or len(index) != len(dim) or not dim:
                raise TypeError(
                    f"{where}: with a tuple of dims {dim!r}, index must be a tuple of as many "
                    f"ints or slices, got {index!r}."
                )
            dims, idxs = dim, index
        else:
            dims, idxs = (dim,), (index,)
        if not shape:
            raise ValueError(f"{where}: {label} is 0-dimensional; use the whole parameter.")
        selected: dict[int, tuple[int, ...]] = {}
        for d, index in zip(dims, idxs):
            d = self._check_dim(d, shape, label, where)
            if d in selected:
                raise ValueError(f"{where}: dim {d} is given twice in {dim!r}.")
            selected[d] = self._check_index(index, d, shape[d], label, where)
        order = sorted(selected)
        return _NormalMember(ti, tuple(order), tuple(selected[d] for d in order))

    def _tensor_index(
        self,
        t: Tensor,
        where: str,
        name_of: dict[int, str],
        index_of: dict[int, int],
        tensors: list[Tensor],
        shapes: list[tuple[int, ...]],
    ) -> int:
        """The index of ``t`` among the hierarchy's tensors, checked and added at its first use."""
        ti = index_of.get(id(t))
        if ti is None:
            self._check_tensor(t, where, name_of)
            ti = index_of[id(t)] = len(tensors)
            tensors.append(t)
            shapes.append(tuple(t.shape))
        return ti

    @staticmethod
    def _check_tensor(t: Tensor, where: str, name_of: dict[int, str]) -> None:
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

    @staticmethod
    def _check_dim(dim: object, shape: tuple[int, ...], label: str, where: str) -> int:
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"{where}: dim must be an int or a tuple of ints, got {dim!r}.")
        dim = int(dim)
        if not -len(shape) <= dim < len(shape):
            raise ValueError(f"{where}: dim {dim} is out of range for {label} of shape {shape}.")
        return dim % len(shape)

    @staticmethod
    def _check_index(index: object, dim: int, size: int, label: str, where: str) -> tuple[int, ...]:
        if isinstance(index, slice):
            indices = tuple(range(*index.indices(size)))
            if not indices:
                raise ValueError(
                    f"{where}: slice {index} selects nothing of dim {dim} (size {size})."
                )
            return indices
        if isinstance(index, numbers.Integral) and not isinstance(index, bool):
            index = int(index)
            if not -size <= index < size:
                raise ValueError(
                    f"{where}: index {index} is out of range for dim {dim} (size {size}) of {label}."
                )
            return (index % size,)
        raise TypeError(f"{where}: index must be an int or a slice, got {index!r}.")

    def _member_atoms(self, m: _NormalMember) -> np.ndarray:
        lay = self.tensors[m.tensor_index]
        if not m.dims:
            return np.arange(lay.offset, lay.offset + lay.num_atoms, dtype=np.int64)
        if len(lay.dims) == 1:
            return lay.offset + np.asarray(m.indices[0], dtype=np.int64)
        chosen = dict(zip(m.dims, m.indices))
        axes = [
            np.asarray(chosen[d], dtype=np.int64) if d in chosen else np.arange(n, dtype=np.int64)
            for d, n in zip(lay.dims, lay.grid)
        ]
        return lay.offset + np.ravel_multi_index(np.ix_(*axes), lay.grid).ravel()

    def _normalise_part(
        self,
        part: Part,
        where: str,
        names: tuple[str, ...],
        k: int,
        tensors: list[Tensor],
        shapes: list[tuple[int, ...]],
        index_of: dict[int, int],
        name_of: dict[int, str],
    ) -> _NormalPart:
        """A part of a table checked like a member (dims and ranges in bounds, vectorised)."""
        t = part.tensor
        member = f"{where}, group {names[0]!r}, member {k}"
        ti = self._tensor_index(t, member, name_of, index_of, tensors, shapes)
        shape = shapes[ti]
        label = name_of.get(id(t)) or f"tensor of shape {shape}"
        if not part.dims:
            return _NormalPart(ti, (), part.starts, ())
        if not shape:
            raise ValueError(f"{member}: {label} is 0-dimensional; use the whole parameter.")
        dims = [self._check_dim(d, shape, label, member) for d in part.dims]
        if len(set(dims)) != len(dims):
            raise ValueError(f"{member}: a dim is given twice in {part.dims!r}.")
        starts = part.starts
        for i, (d, size) in enumerate(zip(dims, part.sizes)):
            first = starts[:, i].astype(np.int64)
            bad = np.flatnonzero((first < 0) | (first + size > shape[d]))
            if bad.size:
                g = int(bad[0])
                raise ValueError(
                    f"{where}, group {names[g]!r}, member {k}: indices "
                    f"{int(starts[g, i])}:{int(starts[g, i]) + size} are out of range for dim "
                    f"{d} (size {shape[d]}) of {label}."
                )
        order = sorted(range(len(dims)), key=dims.__getitem__)
        if order != list(range(len(dims))):
            starts = starts[:, order]
        return _NormalPart(
            ti, tuple(dims[i] for i in order), starts, tuple(part.sizes[i] for i in order)
        )

    def _part_atoms(self, part: _NormalPart, n: int) -> np.ndarray:
        """The atoms of ``part`` in each of the ``n`` groups of its table: ``[n, atoms]``."""
        lay = self.tensors[part.tensor_index]
        if not part.dims:
            atoms = np.arange(lay.offset, lay.offset + lay.num_atoms, dtype=np.int64)
            return np.broadcast_to(atoms, (n, atoms.size))
        pos = {d: i for i, d in enumerate(part.dims)}
        # Row-major strides of the atom grid; the other cut dims are taken whole.
        strides = np.cumprod((*lay.grid[1:], 1)[::-1])[::-1]
        atoms = np.full((1,) * (len(lay.dims) + 1), lay.offset, dtype=np.int64)
        for k, (d, size, stride) in enumerate(zip(lay.dims, lay.grid, strides)):
            shape = [1] * (len(lay.dims) + 1)
            if d in pos:
                i = pos[d]
                axis = part.starts[:, i : i + 1] + np.arange(part.sizes[i], dtype=np.int64)
                shape[0], shape[k + 1] = n, part.sizes[i]
            else:
                axis = np.arange(size, dtype=np.int64)
                shape[k + 1] = size
            atoms = atoms + axis.reshape(shape) * int(stride)
        return np.broadcast_to(atoms, (n, *atoms.shape[1:])).reshape(n, -1)

    def _build_level(self, level: str, names: list[str], pieces: list[_Plain | _Table]) -> None:
        flats, gids = [], []
        first = 0
        for piece in pieces:
            if isinstance(piece, _Table):
                n = piece.num_groups
                atoms = np.concatenate([self._part_atoms(p, n) for p in piece.parts], axis=1)
                flats.append(atoms.reshape(-1))
                gids.append(np.repeat(np.arange(first, first + n), atoms.shape[1]))
            else:
                n = len(piece.groups)
                parts = [[self._member_atoms(m) for m in members] for members in piece.groups]
                sizes = np.array([sum(a.size for a in p) for p in parts], dtype=np.int64)
                if parts:
                    flats.append(np.concatenate([a for p in parts for a in p]))
                    gids.append(np.repeat(np.arange(first, first + n), sizes))
            first += n
        flat = np.concatenate(flats) if flats else np.zeros(0, np.int64)
        gid = np.concatenate(gids) if gids else np.zeros(0, np.int64)
        # Sorting (group, atom) pairs puts a scalar listed twice in one group next to itself.
        key = np.sort(gid * max(self.num_atoms, 1) + flat)
        twice = np.flatnonzero(np.diff(key) == 0)
        if twice.size:
            raise ValueError(
                f"level {level!r}, group {names[int(key[twice[0]]) // self.num_atoms]!r}: its "
                "members overlap (a scalar is listed twice)."
            )
        del key
        counts = np.bincount(flat, minlength=self.num_atoms)
        shared = np.flatnonzero(counts > 1)
        if shared.size:
            a, b = np.unique(gid[flat == shared[0]])[:2]
            raise ValueError(
                f"level {level!r}: groups {names[a]!r} and {names[b]!r} overlap; "
                "groups of one level must be disjoint."
            )
        owner = np.full(self.num_atoms, -1, dtype=_index_dtype(max(self.num_atoms, len(names))))
        owner[flat] = gid
        self._atom_group[level] = owner
        self._group_names[level] = tuple(names)
        self._group_members[level] = tuple(pieces)

    def _atoms_of(self, level: str, g: int) -> np.ndarray:
        return np.flatnonzero(self._atom_group[level] == g)

    def _check_tree(self) -> None:
        levels = self.level_names
        for i, fine in enumerate(levels):
            fine_owner = self._atom_group[fine]
            in_fine = np.flatnonzero(fine_owner >= 0)
            fine_of = fine_owner[in_fine]
            for coarse in levels[i + 1 :]:
                # A finer group is fine if all its atoms share one coarse owner (or none, -1):
                # that of any one of its atoms (the last written below).
                coarse_owner = self._atom_group[coarse][in_fine]
                one = np.empty(len(self._group_names[fine]), dtype=coarse_owner.dtype)
                one[fine_of] = coarse_owner
                bad = np.flatnonzero(one[fine_of] != coarse_owner)
                if bad.size:
                    self._raise_not_nested(fine, coarse, int(fine_of[bad[0]]))

    def _raise_not_nested(self, fine: str, coarse: str, g: int) -> None:
        atoms = self._atoms_of(fine, g)
        parents = np.unique(self._atom_group[coarse][atoms])
        fname = self._group_names[fine][g]
        inside = [self._group_names[coarse][p] for p in parents if p >= 0]
        # Every coarse group it touches lies inside it: the levels are most likely listed in the
        # wrong order, which is what the message should say.
        if all(np.isin(self._atoms_of(coarse, int(p)), atoms).all() for p in parents if p >= 0):
            more = f" and {len(inside) - 3} more" if len(inside) > 3 else ""
            named = f"{', '.join(repr(n) for n in inside[:3])}{more}"
            raise ValueError(
                f"group{'s' if len(inside) > 1 else ''} {named} of level {coarse!r} "
                f"{'lie' if len(inside) > 1 else 'lies'} inside group {fname!r} of the finer "
                f"level {fine!r}: a coarser level must hold the larger groups. List the levels "
                "finest first."
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
        owner = self._atom_group[level]
        inside = owner >= 0
        # Sums of integers in float64: exact below 2⁵³ scalars per group.
        sums = np.bincount(
            owner[inside], weights=self.atom_numel[inside], minlength=len(self._group_names[level])
        )
        return sums.astype(np.int64).tolist()

    def atom_group(self, level: str) -> np.ndarray:
        """For every atom, the index of its group in ``level``, or -1."""
        return self._atom_group[self._level(level)]

    @property
    def atom_numel(self) -> np.ndarray:
        """Number of scalars in each atom (made on each call: one entry per atom)."""
        return np.repeat(
            np.array([lay.atom_numel for lay in self.tensors], dtype=np.int64),
            [lay.num_atoms for lay in self.tensors],
        )

    def groups(self, level: str) -> list[list[Tensor]]:
        """The groups of ``level`` as lists of (detached) member tensors, for inspection and
        :meth:`~group_prox.penalties.Penalty.value`.

        A sharded parameter (``DTensor``, FSDP2) is gathered whole first, once per call: a
        collective, so every rank must call this together."""
        level = self._level(level)
        whole: dict[int, Tensor] = {}

        def tensor(i: int) -> Tensor:
            t = whole.get(i)
            if t is None:
                t = whole[i] = full_tensor(self.tensors[i].param)
            return t

        def select(t: Tensor, dims: Sequence[int], indices: Iterable[Sequence[int]]) -> Tensor:
            for d, idx in zip(dims, indices):
                t = t.index_select(d, torch.as_tensor(idx, device=t.device))
            return t

        out = []
        for piece in self._group_members[level]:
            if isinstance(piece, _Plain):
                out += [
                    [select(tensor(m.tensor_index), m.dims, m.indices) for m in members]
                    for members in piece.groups
                ]
                continue
            for g in range(piece.num_groups):
                out.append(
                    [
                        select(
                            tensor(p.tensor_index),
                            p.dims,
                            [range(s, s + n) for s, n in zip(p.starts[g].tolist(), p.sizes)],
                        )
                        for p in piece.parts
                    ]
                )
        return out

    def names_outside(
        self, params: Iterable[Tensor], *, requires_grad: bool | None = None
    ) -> str | None:
        """The names of the hierarchy's tensors that are not among ``params``, for a message
        (``"a, b, c and 4 more"``), or ``None`` if all of them are. With ``requires_grad`` given,
        only the tensors whose ``requires_grad`` has that value count."""
        own = {id(p) for p in params}
        missing = [
            lay.name
            for lay in self.tensors
            if id(lay.param) not in own
            and (requires_grad is None or lay.param.requires_grad == requires_grad)
        ]
        return name_list(missing) if missing else None

    def signature(self) -> dict[str, object]:
        """Plain-data description used to detect a checkpoint from another hierarchy."""
        # Two hierarchies with the same counts and shapes may still group the atoms differently.
        digest = hashlib.sha256()
        for level in self.level_names:
            digest.update(level.encode())
            digest.update(np.ascontiguousarray(self._atom_group[level], dtype=np.int64).tobytes())
        return {
            "levels": list(self.level_names),
            "groups": [self.num_groups(lv) for lv in self.level_names],
            "shapes": [list(lay.param.shape) for lay in self.tensors],
            "grouping": digest.hexdigest()[:16],
        }

    def with_level(self, name: str, groups: LevelSpec) -> Hierarchy:
        """A new hierarchy with one more level, ``name``, coarser than all the others.

        For example ``h.with_level("global", [h.params])`` adds one group holding everything.
        """
        if name in self.level_names:
            raise ValueError(f"the hierarchy already has a level {name!r}.")
        names = {lay.name: lay.param for lay in self.tensors}
        # How a builder traced the model (auto()) still describes the extended hierarchy.
        return Hierarchy({**self._levels, name: groups}, names=names, trace=self.trace)

    def bind(self, params: nn.Module | Mapping[str, Tensor]) -> Hierarchy:
        """The same hierarchy over other tensors of the same names and shapes: typically built
        on a model on the ``meta`` device, bound to the parameters of the materialised model.

        The levels, groups and atom layout are shared, not built again (a few milliseconds
        whatever the model's size); only the tensors change: the one named ``name`` becomes
        ``params[name]`` (``dict(model.named_parameters())`` for a module). The hierarchy's tensors
        are named as its ``names=`` gave them (the builders name them by the model's parameter
        names), so a hierarchy built without names cannot be bound.

        Args:
            params: an ``nn.Module`` or a mapping ``name -> tensor`` holding a tensor of every
                name of :attr:`tensors` (others are ignored).

        Returns:
            A new :class:`Hierarchy`; this one is not modified.

        Raises:
            TypeError: if ``params`` is neither, or a value is not a tensor.
            ValueError: if a name is missing, a tensor's shape differs, a tensor is on the
                ``meta`` device, is not a floating-point leaf tensor, or is given for two names;
                the message names the parameter.
        """
        if isinstance(params, nn.Module):
            named: Mapping[str, Tensor] = dict(params.named_parameters(remove_duplicate=True))
        elif isinstance(params, Mapping):
            named = params
        else:
            raise TypeError(
                "Hierarchy.bind: params must be an nn.Module or a mapping from name to tensor; "
                f"got {type(params).__name__}."
            )
        new: dict[int, Tensor] = {}
        taken: dict[int, str] = {}
        for lay in self.tensors:
            t = named.get(lay.name)
            if t is None:
                raise ValueError(
                    f"Hierarchy.bind: no parameter named {lay.name!r} among the "
                    f"{len(named)} given; bind to the same model (same parameter names) as the "
                    "hierarchy was built on."
                )
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"Hierarchy.bind: {lay.name!r} is a {type(t).__name__}, not a tensor."
                )
            if tuple(t.shape) != tuple(lay.param.shape):
                raise ValueError(
                    f"Hierarchy.bind: parameter {lay.name!r} has shape {tuple(t.shape)}, the "
                    f"hierarchy's has {tuple(lay.param.shape)}; bind to a model of the same "
                    "configuration."
                )
            if t.is_meta:
                raise ValueError(
                    f"Hierarchy.bind: parameter {lay.name!r} is on the meta device; materialise "
                    "the model first (model.to_empty(device=...), then initialise or load its "
                    "weights)."
                )
            self._check_tensor(t, "Hierarchy.bind", {id(t): repr(lay.name)})
            if id(t) in taken:
                raise ValueError(
                    f"Hierarchy.bind: one tensor is given for both {taken[id(t)]!r} and "
                    f"{lay.name!r}, which the hierarchy holds as two tensors."
                )
            taken[id(t)] = lay.name
            new[id(lay.param)] = t
        out = copy.copy(self)
        out.tensors = tuple(
            dataclasses.replace(lay, param=new[id(lay.param)]) for lay in self.tensors
        )
        out._levels = {level: _remap_level(spec, new) for level, spec in self._levels.items()}
        return out

    def __setstate__(self, state: dict[str, object]) -> None:
        # A hierarchy pickled before tables held each level's groups as tuples of members.
        members = state.get("_group_members")
        if isinstance(members, dict):
            for level, pieces in members.items():
                if pieces and not isinstance(pieces[0], (_Plain, _Table)):
                    members[level] = (_Plain(tuple(pieces)),)
        state.pop("_group_atoms", None)
        state.pop("_atom_numel", None)
        self.__dict__.update(state)

    def _level(self, level: str) -> str:
        if level not in self._atom_group:
            raise KeyError(f"no level {level!r}; the levels are {list(self.level_names)}.")
        return level

    def __repr__(self) -> str:
        parts = ", ".join(f"{lv}: {self.num_groups(lv)} groups" for lv in self.level_names)
        return f"Hierarchy({parts}; {len(self.tensors)} tensors)"
