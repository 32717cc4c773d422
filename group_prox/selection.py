"""Per-layer selection of the groups a controller penalises: what :class:`~group_prox.SparsityTarget`
uses to choose, at each update, the groups its penalty acts on.

It cuts about the same fraction from every layer (``spread`` loosens it), like per-layer magnitude
pruning, so the loss has no say in which layers lose most. Pure functions on group norms,
testable alone.

A level's *families* are the groups whose first scalar lies in the same tensor (the filters of
one conv). Saliency is ``‖x_g‖ / (w_g·m_f)``, with ``m_f`` the median of ``‖x_g‖/w_g`` over the
family when the ramp began, so that layers initialised at different scales compete fairly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .kernels import ProxPlan

__all__ = ["families", "family_medians", "group_by_family", "smallest_first"]


def group_by_family(order: Tensor, family: Tensor) -> Tensor:
    """``order`` (indices of groups) regrouped family by family, keeping ``order`` within each
    family: the same as a stable argsort by ``(family, position in order)``.

    A stable sort of the family ids alone gives it, and numpy sorts 16-bit integers by radix:
    about 7 times faster than torch's stable sort of composite int64 keys (26,560 groups: 0.19
    against 1.37 ms), at every controller update."""
    keys = family.index_select(0, order).cpu().numpy()
    if keys.size and int(keys.max()) < np.iinfo(np.int16).max:
        keys = keys.astype(np.int16)
    perm = torch.from_numpy(np.argsort(keys, kind="stable")).to(order.device)
    return order.index_select(0, perm)


def families(plan: ProxPlan, level: int) -> Tensor | None:
    """For each covered group of ``plan.levels[level]``, the index of the family (the tensor
    holding its first atom, renumbered from 0); ``None`` when no two groups share one."""
    lp = plan.levels[level]
    owner = lp.atom_group.numpy()
    first = np.full(lp.num_groups + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, owner, np.arange(owner.size))
    starts = np.array([lay.offset for lay in plan.tensors])
    tensor_of = np.searchsorted(starts, first[:-1][lp.covered.numpy()], side="right") - 1
    if np.unique(tensor_of).size == tensor_of.size:
        return None
    return torch.from_numpy(np.unique(tensor_of, return_inverse=True)[1].reshape(-1))


def family_medians(rel_norm: Tensor, family: Tensor) -> Tensor:
    """The median ``‖x_g‖/w_g`` of every family, at least the smallest positive float. Taken once,
    when the ramp begins: a median of the live groups would keep declaring half of a family's
    survivors small, and empty the family."""
    ref = torch.stack([rel_norm[family == f].median() for f in range(int(family.max()) + 1)])
    return ref.clamp_min(torch.finfo(ref.dtype).tiny)


def smallest_first(
    rel_norm: Tensor,
    zero: Tensor,
    fraction: float,
    family: Tensor | None,
    medians: Tensor | None,
    spread: float,
) -> Tensor:
    """Covered groups that may be zeroed at ``fraction`` of the level, least salient first: the
    zero ones, then by ``‖x_g‖/(w_g·m_f)``; at most ``(fraction + spread·(1 − fraction))·n_f``
    of the ``n_f`` groups of a family (rounded by largest remainders, so that the caps add up to
    the level's count) and never all of them (emptying a conv would cut the network; whole
    branches are a coarser level's job)."""
    scale = torch.ones_like(rel_norm) if medians is None else medians[family].to(rel_norm.dtype)
    saliency = torch.where(zero, -1.0, rel_norm / scale)
    order = torch.argsort(saliency, stable=True)
    if family is None or spread >= 1.0:
        return order
    n = order.numel()
    by_family = group_by_family(order, family)
    sizes = torch.bincount(family)
    starts = torch.cumsum(sizes, 0) - sizes
    within = torch.empty_like(order)
    within[by_family] = torch.arange(n) - starts[family[by_family]]
    share = sizes.double() * (fraction + spread * (1.0 - fraction))
    cap = torch.floor(share).long()
    missing = max(0, round(fraction * n) - int(cap.sum()))
    cap[torch.argsort(cap - share, stable=True)[:missing]] += 1
    cap = torch.minimum(cap, sizes - 1)
    eligible = zero | (within < cap[family])
    return order[eligible[order]]
