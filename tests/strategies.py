"""Hypothesis strategies: random tensors and random nested (tree) hierarchies over them."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

import group_prox as gp

from .reference import RefPenalty

KINDS = ("lasso", "l1", "sgl", "decay", "l0")


@dataclass
class RandomTree:
    shapes: list[tuple[int, ...]]
    cut: list[tuple[int, ...] | None]
    # levels, finest first: groups of members (tensor index, dim(s) or None, index(es))
    levels: list[list[list[tuple]]]


@st.composite
def random_trees(draw, max_tensors: int = 4, max_levels: int = 3) -> RandomTree:
    n = draw(st.integers(1, max_tensors))
    shapes, cut = [], []
    for _ in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
        shapes.append(shape)
        # A tensor is whole, or cut along one or two dimensions (rows; or expert x hidden unit).
        dims = draw(
            st.one_of(st.none(), st.sets(st.integers(0, len(shape) - 1), min_size=1, max_size=2))
        )
        cut.append(None if dims is None else tuple(sorted(dims)))
    atoms = []
    for t in range(n):
        if cut[t] is None:
            atoms.append((t, None))
        else:
            atoms += [(t, i) for i in itertools.product(*(range(shapes[t][d]) for d in cut[t]))]

    num_levels = draw(st.integers(1, max_levels))
    levels_atoms: list[list[list[tuple]]] = []
    free = list(atoms)
    prev: list[list[tuple]] = []
    for _ in range(num_levels):
        order = draw(st.permutations(range(len(prev)))) if prev else []
        groups: list[list[tuple]] = []
        k = 0
        # Coarser groups: unions of 1..3 finer groups (some finer groups get no parent) ...
        while k < len(order):
            take = draw(st.integers(1, 3))
            if draw(st.booleans()):
                union = [a for j in order[k : k + take] for a in prev[j]]
                groups.append(union)
            k += take
        # ... plus fresh atoms that no finer level holds.
        fresh = (
            draw(st.lists(st.sampled_from(free), unique=True, max_size=len(free))) if free else []
        )
        for a in fresh:
            free.remove(a)
        while fresh:
            take = draw(st.integers(1, 3))
            if groups and draw(st.booleans()):
                groups[draw(st.integers(0, len(groups) - 1))].extend(fresh[:take])
            else:
                groups.append(fresh[:take])
            fresh = fresh[take:]
        levels_atoms.append(groups)
        prev = groups
    levels = [[_members(g, shapes, cut, draw) for g in groups] for groups in levels_atoms]
    return RandomTree(shapes, cut, levels)


def _members(group_atoms, shapes, cut, draw) -> list[tuple]:
    by_tensor: dict[int, list] = {}
    for t, i in group_atoms:
        by_tensor.setdefault(t, []).append(i)
    members = []
    for t, idxs in by_tensor.items():
        dims = cut[t]
        if dims is None:
            members.append((t, None, None))
            continue
        grid = [shapes[t][d] for d in dims]
        idxs = sorted(idxs)
        if len(idxs) == math.prod(grid) and draw(st.booleans()):
            members.append((t, None, None))
        elif len(dims) == 1:
            d, flat = dims[0], [i for (i,) in idxs]
            if flat == list(range(flat[0], flat[-1] + 1)) and draw(st.booleans()):
                members.append((t, d, slice(flat[0], flat[-1] + 1)))
            else:
                neg = draw(st.booleans())
                members += [(t, d, i - grid[0] if neg else i) for i in flat]
        else:
            # Whole rows along the first dim as one single-dim member, the rest cell by cell.
            rows: dict[int, list[int]] = {}
            for i, j in idxs:
                rows.setdefault(i, []).append(j)
            for i, js in rows.items():
                if len(js) == grid[1] and draw(st.booleans()):
                    members.append((t, dims[0], i))
                else:
                    neg = draw(st.booleans())
                    members += [(t, dims, (i - grid[0] if neg else i, j)) for j in js]
    return members


def to_hierarchy(tree: RandomTree, params: list[torch.Tensor]) -> gp.Hierarchy:
    levels = {}
    for k, groups in enumerate(tree.levels):
        levels[f"level{k}"] = [
            [params[t] if d is None else (params[t], d, i) for t, d, i in g] for g in groups
        ]
    return gp.Hierarchy(levels)


def ref_levels(tree: RandomTree) -> list[list[list[tuple]]]:
    return tree.levels


def to_penalty(ref: RefPenalty) -> gp.Penalty:
    if ref.kind == "lasso":
        return gp.GroupLasso(ref.lam)
    if ref.kind == "l1":
        return gp.L1(ref.lam)
    if ref.kind == "sgl":
        return gp.SparseGroupLasso(ref.lam, ref.l1_ratio)
    if ref.kind == "decay":
        return gp.GroupDecay(ref.lam)
    return gp.GroupL0(ref.lam)


def ref_penalties(kinds=KINDS):
    return st.builds(
        RefPenalty,
        kind=st.sampled_from(kinds),
        lam=st.floats(0.0, 2.0),
        l1_ratio=st.floats(0.0, 1.0),
    )
