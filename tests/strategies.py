"""Hypothesis strategies: random tensors and random nested (tree) hierarchies over them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

import group_prox as gp

from .reference import RefPenalty

KINDS = ("lasso", "l1", "sgl", "decay", "l0")


@dataclass
class RandomTree:
    shapes: list[tuple[int, ...]]
    cut: list[int | None]
    # levels, finest first: groups of members (tensor index, dim or None, int index or slice)
    levels: list[list[list[tuple]]]


@st.composite
def random_trees(draw, max_tensors: int = 4, max_levels: int = 3) -> RandomTree:
    n = draw(st.integers(1, max_tensors))
    shapes, cut = [], []
    for _ in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
        shapes.append(shape)
        cut.append(draw(st.one_of(st.none(), st.integers(0, len(shape) - 1))))
    atoms = [
        (t, None) if cut[t] is None else (t, i)
        for t in range(n)
        for i in range(shapes[t][cut[t]] if cut[t] is not None else 1)
    ]
    atoms = list(dict.fromkeys(atoms))

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
    by_tensor: dict[int, list[int | None]] = {}
    for t, i in group_atoms:
        by_tensor.setdefault(t, []).append(i)
    members = []
    for t, idxs in by_tensor.items():
        d = cut[t]
        if d is None:
            members.append((t, None, None))
            continue
        idxs = sorted(idxs)
        if len(idxs) == shapes[t][d] and draw(st.booleans()):
            members.append((t, None, None))
        elif idxs == list(range(idxs[0], idxs[-1] + 1)) and draw(st.booleans()):
            members.append((t, d, slice(idxs[0], idxs[-1] + 1)))
        else:
            neg = draw(st.booleans())
            members += [(t, d, i - shapes[t][d] if neg else i) for i in idxs]
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
