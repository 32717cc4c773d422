"""Checksums that tell a damaged checkpoint or file from a good one.

Every checkpoint this package writes (an optimizer's entry, a :class:`~group_prox.SparsityTarget`'s
state, a compressed model's file) records a CRC-32 of each of its tensors' raw bytes, checked
before anything is loaded: a flipped bit anywhere in a tensor, of any dtype, is refused rather
than trained on.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch
from torch import Tensor

from .distributed import local_tensor

__all__ = ["checksum", "checksums_of", "first_mismatch"]


def checksum(t: Tensor) -> int:
    """CRC-32 of ``t``'s raw bytes (its local shard, for a ``DTensor``), as an ``int``."""
    data = local_tensor(t).contiguous().cpu()
    return zlib.crc32(data.reshape(-1).view(torch.uint8).numpy())


def checksums_of(tensors: Mapping[str, Tensor]) -> dict[str, int]:
    """The :func:`checksum` of each tensor, by its key: what a checkpoint records."""
    return {key: checksum(t) for key, t in tensors.items()}


def first_mismatch(tensors: Mapping[str, Tensor], saved: Mapping[str, object]) -> str | None:
    """The first key of ``tensors`` whose checksum is not the one ``saved`` records for it (or
    that ``saved`` lacks), else ``None``."""
    return next((key for key, t in tensors.items() if saved.get(key) != checksum(t)), None)
