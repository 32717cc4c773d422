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


# ------------------------------------------------------------ non-convex penalties of group norms
# Written from the published definitions, on plain float64 arrays; the proxes are found by brute
# force (a grid and its refinement), never from group_prox's closed forms.


def mcp_penalty(r, lam_w: float, gamma: float):
    """Breheny–Huang MCP of norms ``r``: λw·r − r²/(2γ) up to γλw, then γλ²w²/2."""
    r = np.asarray(r, dtype=np.float64)
    return np.where(r <= gamma * lam_w, lam_w * r - r**2 / (2 * gamma), 0.5 * gamma * lam_w**2)


def scad_penalty(r, lam_w: float, a: float):
    """Fan–Li SCAD of norms ``r`` with c = λw: c·r up to c, a quadratic up to a·c, then constant."""
    r = np.asarray(r, dtype=np.float64)
    c = lam_w
    return np.where(
        r <= c,
        c * r,
        np.where(r <= a * c, (2 * a * c * r - r**2 - c**2) / (2 * (a - 1)), (a + 1) * c**2 / 2),
    )


def log_sum_penalty(r, lam_w: float, eps: float):
    """λw·log(1 + r/ε)."""
    return lam_w * np.log1p(np.asarray(r, dtype=np.float64) / eps)


NORM_PENALTIES = {"mcp": mcp_penalty, "scad": scad_penalty, "logsum": log_sum_penalty}


def prox_objective_1d(rho, r: float, eta: float, penalty) -> np.ndarray:
    """½(ρ − r)² + η·P(ρ) for a penalty ``P`` of the norm."""
    rho = np.asarray(rho, dtype=np.float64)
    return 0.5 * (rho - r) ** 2 + eta * penalty(rho)


def prox_norm_brute(r: float, eta: float, penalty, points: int = 2001, rounds: int = 6) -> float:
    """argmin over ρ ∈ [0, r] of ½(ρ − r)² + η·P(ρ) (a nondecreasing P never gains from ρ > r):
    the best point of a grid, then of finer grids around it. The grid holds 0 and r exactly, so
    an exact 0 or an exact r is found exactly."""
    lo, hi = 0.0, float(r)
    best = 0.0
    for _ in range(rounds):
        grid = np.linspace(lo, hi, points)
        k = int(np.argmin(prox_objective_1d(grid, r, eta, penalty)))
        best = float(grid[k])
        lo, hi = float(grid[max(k - 1, 0)]), float(grid[min(k + 1, points - 1)])
        if hi <= lo:
            break
    return best


def mcp_prox_norm(r, eta: float, lam_w: float, gamma: float) -> np.ndarray:
    """The closed-form prox of MCP on norms ``r``: ρ = argmin ½(ρ − r)² + η·MCP(ρ), written from
    the firm threshold of Breheny and Huang (η < γ, τ = ηλw): 0 up to τ, (r − τ)/(1 − η/γ) up to
    the knee γλw, then r; for η ≥ γ the hard threshold: r if r > sqrt(ηγ)·λw, else 0."""
    r = np.asarray(r, dtype=np.float64)
    tau = eta * lam_w
    if eta < gamma:
        ramp = (r - tau) / (1.0 - eta / gamma)
        return np.where(r <= tau, 0.0, np.where(r <= gamma * lam_w, ramp, r))
    return np.where(r > math.sqrt(eta * gamma) * lam_w, r, 0.0)


def scad_prox_norm(r, eta: float, lam_w: float, a: float) -> np.ndarray:
    """The closed-form prox of SCAD on norms ``r`` (c = λw, τ = ηc). For η < a − 1 (Fan and Li's
    a > 2 at η = 1): the soft threshold max(r − τ, 0) up to c + τ, ((a − 1)r − aτ)/(a − 1 − η) up
    to a·c, then r. For η ≥ a − 1: the better of ρ₁ = min(max(r − τ, 0), c) and (if r > a·c) r,
    a tie taking ρ₁."""
    r = np.asarray(r, dtype=np.float64)
    c, tau = lam_w, eta * lam_w
    if eta < a - 1.0:
        middle = ((a - 1.0) * r - a * tau) / (a - 1.0 - eta)
        return np.where(r <= c + tau, np.maximum(r - tau, 0.0), np.where(r <= a * c, middle, r))
    rho1 = np.minimum(np.maximum(r - tau, 0.0), c)
    f1 = 0.5 * (rho1 - r) ** 2 + eta * scad_penalty(rho1, lam_w, a)
    f3 = eta * (a + 1.0) * c**2 / 2.0
    return np.where((r > a * c) & (f3 < f1), r, rho1)


NORM_PROXES = {"mcp": mcp_prox_norm, "scad": scad_prox_norm}


@dataclass
class RefNormPenalty:
    kind: str  # "mcp" | "scad" | "logsum"
    lam: float
    shape: float  # gamma, a or eps

    def weight(self, n: int) -> float:
        return math.sqrt(n)

    def of_norm(self, n: int):
        lam_w = self.lam * self.weight(n)
        fn = NORM_PENALTIES[self.kind]
        return lambda r: fn(r, lam_w, self.shape)


def norm_penalty_value(x: np.ndarray, index_sets, penalties) -> float:
    total = 0.0
    for sets, pen in zip(index_sets, penalties):
        if pen is None:
            continue
        for idx in sets:
            total += float(pen.of_norm(idx.size)(np.sqrt(np.sum(x[idx] ** 2))))
    return total


def norm_prox(v: np.ndarray, index_sets, penalties, eta: float) -> np.ndarray:
    """The composition documented by group_prox for penalties of group norms: level by level
    from the finest, each group scaled to the brute-force 1-D prox of its current norm."""
    x = v.astype(np.float64).copy()
    for sets, pen in zip(index_sets, penalties):
        if pen is None:
            continue
        for idx in sets:
            r = float(np.sqrt(np.sum(x[idx] ** 2)))
            rho = prox_norm_brute(r, eta, pen.of_norm(idx.size)) if r > 0 else 0.0
            x[idx] *= rho / r if r > 0 else 0.0
    return x
