"""What survived: counts of exactly-zero groups per level, per-tensor strips, and exports."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from .distributed import local_count, process_group
from .hierarchy.core import Hierarchy
from .kernels import atom_sum
from .sharding import Sharding

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from .compression.removable import Removable
    from .inputs import ExampleInputs

__all__ = ["LevelSparsity", "SparsityReport", "TensorSparsity", "get_sparsity_report"]

_WIDTH = 80
ALIVE, ZERO, MIXED = "█", "░", "▒"


@dataclass
class LevelSparsity:
    """Counts for one level. A group is zero only if every scalar in it is exactly 0.0."""

    groups: int
    zero_groups: int
    params: int
    zero_params: int
    zero_group_names: list[str] = field(default_factory=list)
    group_names: list[str] = field(default_factory=list, repr=False)

    @property
    def group_fraction(self) -> float:
        return self.zero_groups / self.groups if self.groups else 0.0


@dataclass
class TensorSparsity:
    """One tensor of the hierarchy: its units (filters, rows, columns or the whole tensor).

    ``dims`` are the dimensions the units are cut along (empty: the whole tensor is one unit);
    ``zero_mask`` lists the units in row-major order over ``dims``.
    """

    name: str
    module: str
    shape: list[int]
    dims: list[int]
    units: int
    zero_units: int
    numel: int
    zero_numel: int
    zero_mask: list[bool] = field(repr=False)


@dataclass
class SparsityReport:
    """Exact zeros in a model, per level of a hierarchy and per tensor.

    Attributes:
        levels: ``level name -> LevelSparsity`` (``groups``, ``zero_groups``, ``params``,
            ``zero_params``; ``params`` counts the scalars the level's groups cover).
        tensors: one :class:`TensorSparsity` per tensor of the hierarchy.
        total_params: scalars in all parameters of the model (or optimizer).
        zero_params: scalars among them that are exactly 0.0.
        structured_zero_params: scalars inside a zero group of some level (removable structure).
        removable: what :func:`~group_prox.compress` would remove now (the same planner), when
            the report was asked for with the model (``opt.get_sparsity_report(model)``); not
            every zero group is removable (a zero filter writing into a residual stream stays
            while other layers write that channel).
    """

    levels: dict[str, LevelSparsity]
    tensors: list[TensorSparsity]
    total_params: int
    zero_params: int
    structured_zero_params: int
    removable: Removable | None = None

    @property
    def zero_fraction(self) -> float:
        return self.zero_params / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of everything in the report."""
        found = self.removable
        out = asdict(replace(self, removable=None))
        out["zero_fraction"] = self.zero_fraction
        out["removable"] = (
            None
            if found is None
            else {
                "params": found.params,
                "params_left": found.params_left,
                "params_removed": found.params_removed,
                "flops": found.flops,
                "flops_left": found.flops_left,
                "flops_removed": found.flops_removed,
            }
        )
        return out

    def to_markdown(self) -> str:
        lines = [
            "| level | groups | zero groups | params | zero params |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, lv in self.levels.items():
            lines.append(
                f"| {name} | {lv.groups} | {lv.zero_groups} ({100 * lv.group_fraction:.1f}%) | "
                f"{lv.params} | {lv.zero_params} |"
            )
        lines += [
            "",
            f"Exact zeros: {self.zero_params} of {self.total_params} parameters "
            f"({100 * self.zero_fraction:.1f}%); {self.structured_zero_params} inside zero groups."
            + (f" {self._removable_line()}." if self.removable is not None else ""),
            "",
            "| tensor | shape | zero units |",
            "| --- | --- | ---: |",
        ]
        for t in self.tensors:
            lines.append(f"| {t.name} | {tuple(t.shape)} | {t.zero_units}/{t.units} |")
        return "\n".join(lines) + "\n"

    def _removable_line(self) -> str:
        found = self.removable
        assert found is not None
        line = (
            f"compress removes {found.params - found.params_left:,} of {found.params:,} "
            f"parameters ({100 * found.params_removed:.1f}%)"
        )
        if found.flops_removed is not None:
            line += f" and {100 * found.flops_removed:.1f}% of the FLOPs"
        return line

    def __str__(self) -> str:
        out = [
            f"Sparsity report: {self.zero_params:,} of {self.total_params:,} parameters exactly zero "
            f"({100 * self.zero_fraction:.1f}%)",
        ]
        if self.removable is not None:
            out.append(self._removable_line())
        out.append(f"{'level':<14}{'zero groups':>24}{'zero params':>34}")
        for name, lv in self.levels.items():
            pct = 100 * lv.zero_params / lv.params if lv.params else 0.0
            groups = f"{lv.zero_groups}/{lv.groups} ({100 * lv.group_fraction:.1f}%)"
            params = f"{lv.zero_params:,}/{lv.params:,} ({pct:.1f}%)"
            out.append(f"{_fit(name, 14)}{groups:>24}{params:>34}")
        strips = [t for t in self.tensors if t.dims and len(t.shape) >= 2]
        if strips:
            out.append(f"filters ({ALIVE} active, {ZERO} zero, {MIXED} some zero):")
            # A module with several cut tensors (fused experts) is shown tensor by tensor.
            per_module = Counter(t.module for t in strips)
            labels = [t.name if per_module[t.module] > 1 else t.module for t in strips]
            label = min(30, max(len(lb) for lb in labels))
            counts = [f"{t.zero_units}/{t.units}" for t in strips]
            cw = max(len(c) for c in counts)
            width = _WIDTH - label - cw - 2
            for t, lb, count in zip(strips, labels, counts):
                out.append(f"{_fit(lb, label)} {count:>{cw}} {_strip(t.zero_mask, width)}")
        for name in list(self.levels)[1:]:
            lv = self.levels[name]
            if lv.groups:
                out.append(f"{name} ({ZERO} zero):")
                out.extend(_wrap_groups(lv.group_names, set(lv.zero_group_names)))
        return "\n".join(out)


def _fit(text: str, width: int) -> str:
    return text.ljust(width) if len(text) <= width else "…" + text[-(width - 1) :]


def _strip(zero_mask: list[bool], width: int) -> str:
    zeros = np.asarray(zero_mask, dtype=bool)
    if zeros.size <= width:
        return "".join(ZERO if z else ALIVE for z in zeros)
    # More units than columns: each column stands for a bucket of consecutive units.
    edges = np.linspace(0, zeros.size, width + 1).astype(int)
    chars = []
    for lo, hi in itertools.pairwise(edges):
        bucket = zeros[lo:hi]
        chars.append(ZERO if bucket.all() else ALIVE if not bucket.any() else MIXED)
    return "".join(chars)


def _wrap_groups(names: Iterable[str], zero: set[str]) -> list[str]:
    lines, line = [], "  "
    for n in names:
        token = ZERO if n in zero else f"[{n}]"
        if len(line) + len(token) + 1 > _WIDTH and line.strip():
            lines.append(line.rstrip())
            line = "  "
        line += token + " "
    if line.strip():
        lines.append(line.rstrip())
    return lines


@torch.no_grad()
def build_report(hierarchy: Hierarchy, all_params: Iterable[Tensor]) -> SparsityReport:
    """Count exact zeros of ``hierarchy`` and of ``all_params`` (the whole model's parameters)."""
    unique = {id(p): p for p in all_params}
    for lay in hierarchy.tensors:
        unique.setdefault(id(lay.param), lay.param)
    total = sum(p.numel() for p in unique.values())
    group = process_group(unique.values())
    if group is None:
        zero = sum(int((p.detach() == 0).sum()) for p in unique.values())
        masks = [
            (atom_sum(lay, lay.param.detach() != 0) == 0).cpu().numpy() for lay in hierarchy.tensors
        ]
        zero_numel = [int((lay.param.detach() == 0).sum()) for lay in hierarchy.tensors]
    else:
        zero, masks, zero_numel = _sharded_counts(hierarchy, list(unique.values()), group)

    atom_zero_parts, tensors = [], []
    for lay, mask_np, zeros in zip(hierarchy.tensors, masks, zero_numel):
        atom_zero_parts.append(mask_np)
        tensors.append(
            TensorSparsity(
                name=lay.name,
                module=lay.module_name,
                shape=list(lay.param.shape),
                dims=list(lay.dims),
                units=lay.num_atoms,
                zero_units=int(mask_np.sum()),
                numel=lay.param.numel(),
                zero_numel=zeros,
                zero_mask=mask_np.tolist(),
            )
        )
    atom_zero = np.concatenate(atom_zero_parts) if atom_zero_parts else np.zeros(0, bool)
    numel = hierarchy.atom_numel
    in_zero_group = np.zeros_like(atom_zero)

    levels = {}
    for name in hierarchy.level_names:
        owner = hierarchy.atom_group(name)
        g = hierarchy.num_groups(name)
        member = owner >= 0
        alive_atoms = np.bincount(owner[member], weights=~atom_zero[member], minlength=g)
        group_zero = alive_atoms == 0
        sizes = np.bincount(owner[member], weights=numel[member], minlength=g).astype(np.int64)
        # owner -1 (no group) picks the appended False; a level may have no group at all.
        in_zero_group |= np.append(group_zero, False)[owner]
        names = list(hierarchy.group_names(name))
        levels[name] = LevelSparsity(
            groups=g,
            zero_groups=int(group_zero.sum()),
            params=int(sizes.sum()),
            zero_params=int(sizes[group_zero].sum()),
            zero_group_names=[n for n, z in zip(names, group_zero) if z],
            group_names=names,
        )
    return SparsityReport(
        levels=levels,
        tensors=tensors,
        total_params=total,
        zero_params=zero,
        structured_zero_params=int(numel[in_zero_group].sum()),
    )


def _sharded_counts(
    hierarchy: Hierarchy, params: list[Tensor], group: ProcessGroup
) -> tuple[int, list[np.ndarray], list[int]]:
    """Zero counts of sharded parameters (FSDP2), the same on every rank: the number of nonzero
    scalars of each atom and of zero scalars of every parameter, each rank counting its shards (a
    replica only once), added up by one all-reduce. Returns the total zero count, each tensor's
    zero-atom mask and each tensor's zero count."""
    sharding = Sharding(hierarchy.tensors, group)
    n = hierarchy.num_atoms
    # Counts are exact in float64 up to 2⁵³ scalars, and every backend reduces float64.
    counts = torch.zeros(n + len(params), dtype=torch.float64, device=sharding.device)
    for i in range(len(hierarchy.tensors)):
        sharding.add_atom_sums_(counts, i, (sharding.local(i) != 0).to(torch.float64))
    for k, p in enumerate(params):
        local, counted = local_count(p, group)
        if counted:
            counts[n + k] = (local == 0).sum().to(torch.float64)
    counts = sharding.all_reduce_(counts).cpu().to(torch.int64).numpy()
    masks, zero_numel = [], []
    for lay in hierarchy.tensors:
        nonzero = counts[lay.offset : lay.offset + lay.num_atoms]
        masks.append(nonzero == 0)
        zero_numel.append(int(lay.param.numel() - nonzero.sum()))
    return int(counts[n:].sum()), masks, zero_numel


def get_sparsity_report(
    model: nn.Module,
    hierarchy: Hierarchy,
    *,
    removable: bool = False,
    example_inputs: ExampleInputs | None = None,
) -> SparsityReport:
    """The :class:`SparsityReport` of ``model`` for the groups of ``hierarchy``; with
    ``removable=True`` also what :func:`~group_prox.compress` would remove now
    (:func:`~group_prox.removable`; ``example_inputs`` as there, and its FLOPs are counted when
    given)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    if not isinstance(hierarchy, Hierarchy):
        raise TypeError(
            f"hierarchy must be a group_prox.Hierarchy, got {type(hierarchy).__name__}."
        )
    params = list(model.parameters())
    # Counting another model's tensors would report a sparsity that neither model has.
    foreign = hierarchy.names_outside(params)
    if foreign:
        raise ValueError(
            f"get_sparsity_report(): the hierarchy holds parameters that are not parameters of "
            f"model: {foreign}. Build the hierarchy from this model."
        )
    report = build_report(hierarchy, params)
    if removable:
        report = with_removable(report, model, hierarchy, example_inputs)
    return report


def with_removable(
    report: SparsityReport,
    model: nn.Module,
    hierarchy: Hierarchy,
    example_inputs: ExampleInputs | None,
) -> SparsityReport:
    """``report`` with its :attr:`~SparsityReport.removable` filled in."""
    from .compression.removable import removable as find_removable  # compression imports us

    found = find_removable(
        model, hierarchy, example_inputs=example_inputs, flops=example_inputs is not None
    )
    return replace(report, removable=found)
