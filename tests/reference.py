"""Independent float64 NumPy references: group index sets, penalty values, proximal operators.

Nothing here uses group_prox's atom layout: groups are turned into flat index sets straight from
their (tensor, dim, index) members, and every group is processed by an explicit loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class RefPenalty:
    kind: str  # "lasso" | "l1" | "sgl" | "decay" | "l0"
    lam: float
    l1_ratio: float = 0.0

    def weight(self, n: int) -> float:
        return float(n) if self.kind == "l0" else math.sqrt(n)


def member_indices(shapes, offsets, member) -> np.ndarray:
    """Flat indices of a member ``(tensor_index, dim, index)`` (``dim`` None: whole tensor; a
    tuple of dims with a tuple of indices selects along each)."""
    t, dim, index = member
    ids = np.arange(int(np.prod(shapes[t]))).reshape(shapes[t]) + offsets[t]
    if dim is None:
        return ids.ravel()
    dims, indices = (dim, index) if isinstance(dim, tuple) else ((dim,), (index,))
    key = [slice(None)] * len(shapes[t])
    for d, i in zip(dims, indices):
        key[d] = i
    return ids[tuple(key)].ravel()


def group_index_sets(shapes, levels) -> tuple[list[list[np.ndarray]], int]:
    """``levels``: list (finest first) of lists of groups of members -> flat index sets."""
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    out = []
    for groups in levels:
        out.append(
            [np.concatenate([member_indices(shapes, offsets, m) for m in g]) for g in groups]
        )
    return out, int(sum(sizes))


def penalty_value(x: np.ndarray, index_sets, penalties) -> float:
    total = 0.0
    for sets, pen in zip(index_sets, penalties):
        if pen is None:
            continue
        for idx in sets:
            xg = x[idx]
            norm = float(np.sqrt(np.sum(xg * xg)))
            if pen.kind == "lasso":
                total += pen.lam * pen.weight(idx.size) * norm
            elif pen.kind == "l1":
                total += pen.lam * float(np.abs(xg).sum())
            elif pen.kind == "sgl":
                total += pen.lam * (
                    pen.l1_ratio * float(np.abs(xg).sum())
                    + (1 - pen.l1_ratio) * pen.weight(idx.size) * norm
                )
            elif pen.kind == "decay":
                total += 0.5 * pen.lam * norm**2
            elif pen.kind == "l0":
                total += pen.lam * pen.weight(idx.size) * float(norm > 0)
    return total


def prox(v: np.ndarray, index_sets, penalties, eta: float) -> np.ndarray:
    """The composition documented by group_prox: elementwise parts, then tree levels finest
    first, then decay levels."""
    x = v.astype(np.float64).copy()
    for sets, pen in zip(index_sets, penalties):
        if pen is None or pen.kind not in ("l1", "sgl"):
            continue
        tau = eta * pen.lam * (1.0 if pen.kind == "l1" else pen.l1_ratio)
        for idx in sets:
            x[idx] = np.sign(x[idx]) * np.maximum(np.abs(x[idx]) - tau, 0.0)
    for sets, pen in zip(index_sets, penalties):
        if pen is None or pen.kind not in ("lasso", "sgl", "l0"):
            continue
        for idx in sets:
            norm = float(np.sqrt(np.sum(x[idx] ** 2)))
            w = pen.weight(idx.size)
            if pen.kind == "l0":
                if 0.5 * norm**2 <= eta * pen.lam * w:
                    x[idx] = 0.0
                continue
            tau = eta * pen.lam * w * (1.0 if pen.kind == "lasso" else 1 - pen.l1_ratio)
            x[idx] *= max(0.0, 1.0 - tau / norm) if norm > 0 else 0.0
    for sets, pen in zip(index_sets, penalties):
        if pen is None or pen.kind != "decay":
            continue
        for idx in sets:
            x[idx] /= 1.0 + eta * pen.lam
    return x


def prox_objective(u: np.ndarray, v: np.ndarray, index_sets, penalties, eta: float) -> float:
    """F(u) = ½‖u − v‖² + η·Ω(u)."""
    return 0.5 * float(np.sum((u - v) ** 2)) + eta * penalty_value(u, index_sets, penalties)
