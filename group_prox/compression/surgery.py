"""Physical removal of channels from standard layers, and the tests that a channel is exactly zero.

``keep_outputs(m, keep)`` / ``keep_inputs(m, keep)`` shrink one layer in place: its parameters and
buffers are replaced by the kept slices (new tensors, same dtype, device and ``requires_grad``) and
its size attributes (``out_channels``, ``in_features``, ``num_features`` …) are updated, so the
layer is an ordinary, smaller layer of the same type.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "check_keep",
    "dead_channels",
    "is_depthwise",
    "keep_inputs",
    "keep_outputs",
    "kept_indices",
    "set_tensor",
]

_Conv = nn.modules.conv._ConvNd
_BatchNorm = nn.modules.batchnorm._BatchNorm
_InstanceNorm = nn.modules.instancenorm._InstanceNorm


def set_tensor(module: nn.Module, name: str, dim: int, keep: Tensor) -> None:
    """Replace ``module.<name>`` (a parameter or buffer; nothing if it is ``None``) by its slices
    ``keep`` along ``dim``, a new tensor with the same ``requires_grad``."""
    old = getattr(module, name, None)
    if old is None:
        return
    new = old.detach().index_select(dim, keep.to(old.device)).contiguous()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, name, new)


def is_depthwise(conv: _Conv) -> bool:
    """One filter per channel (``groups = in = out``): input channel i is output channel i."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def check_keep(keep: Sequence[int], size: int, where: str) -> Tensor:
    """``keep`` as an index tensor, refused (naming ``where``) unless it is a non-empty
    increasing sequence of indices below ``size``."""
    idx = torch.as_tensor(list(keep), dtype=torch.long)
    if idx.numel() == 0:
        raise ValueError(f"{where}: cannot remove every channel; keep at least one.")
    if idx.min() < 0 or idx.max() >= size or (idx[1:] <= idx[:-1]).any():
        raise ValueError(
            f"{where}: kept channels must be increasing indices in [0, {size}), got {list(keep)}."
        )
    return idx


def keep_outputs(module: nn.Module, keep: Sequence[int], name: str = "") -> None:
    """Keep only output channels ``keep`` of a conv, linear, norm, PReLU or embedding layer."""
    where = f"module {name or type(module).__name__!r}"
    if isinstance(module, _Conv):
        if module.transposed:
            raise TypeError(f"{where}: transposed convolutions are not sliced.")
        if module.groups > 1 and not is_depthwise(module):
            raise TypeError(f"{where}: grouped (not depthwise) convolutions are not sliced.")
        idx = check_keep(keep, module.out_channels, where)
        if is_depthwise(module):
            if len(keep) == module.out_channels:
                return
            module.in_channels = module.groups = len(keep)
        set_tensor(module, "weight", 0, idx)
        set_tensor(module, "bias", 0, idx)
        module.out_channels = len(keep)
    elif isinstance(module, nn.Linear):
        idx = check_keep(keep, module.out_features, where)
        set_tensor(module, "weight", 0, idx)
        set_tensor(module, "bias", 0, idx)
        module.out_features = len(keep)
    elif isinstance(module, _BatchNorm | _InstanceNorm):
        idx = check_keep(keep, module.num_features, where)
        for t in ("weight", "bias", "running_mean", "running_var"):
            set_tensor(module, t, 0, idx)
        module.num_features = len(keep)
    elif isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise TypeError(f"{where}: only LayerNorms over one dimension are sliced.")
        idx = check_keep(keep, module.normalized_shape[0], where)
        set_tensor(module, "weight", 0, idx)
        set_tensor(module, "bias", 0, idx)
        module.normalized_shape = (len(keep),)
    elif isinstance(module, nn.PReLU):
        if module.num_parameters > 1:
            idx = check_keep(keep, module.num_parameters, where)
            set_tensor(module, "weight", 0, idx)
            module.num_parameters = len(keep)
    elif isinstance(module, nn.Embedding):
        idx = check_keep(keep, module.embedding_dim, where)
        set_tensor(module, "weight", 1, idx)
        module.embedding_dim = len(keep)
    else:
        raise TypeError(f"{where}: cannot remove output channels of a {type(module).__name__}.")


def keep_inputs(module: nn.Module, keep: Sequence[int], name: str = "") -> None:
    """Keep only input channels ``keep`` of a conv or linear layer (a depthwise conv's inputs are
    its outputs)."""
    where = f"module {name or type(module).__name__!r}"
    if isinstance(module, _Conv) and is_depthwise(module):
        keep_outputs(module, keep, name)
    elif isinstance(module, _Conv):
        if module.transposed or module.groups > 1:
            raise TypeError(f"{where}: only plain (groups=1) convolutions lose input channels.")
        idx = check_keep(keep, module.in_channels, where)
        set_tensor(module, "weight", 1, idx)
        module.in_channels = len(keep)
    elif isinstance(module, nn.Linear):
        idx = check_keep(keep, module.in_features, where)
        set_tensor(module, "weight", 1, idx)
        module.in_features = len(keep)
    else:
        raise TypeError(f"{where}: cannot remove input channels of a {type(module).__name__}.")


def _rows_zero(t: Tensor | None, dim: int = 0) -> Tensor | None:
    if t is None:
        return None
    t = t.detach()
    return (t == 0).flatten(1).all(1) if t.dim() > 1 and dim == 0 else (t == 0)


@torch.no_grad()
def dead_channels(layer: nn.Module, norm: nn.Module | None = None) -> Tensor:
    """Output channels of ``layer`` (conv or linear), followed by ``norm`` in eval mode, that are
    exactly 0 whatever the input (a bool tensor over output channels).

    A channel is dead when the norm's affine map sends everything to 0 (``γ = β = 0``), or when the
    layer's filter and bias are 0 and the norm maps 0 to 0 (``β − γ·μ/√(σ²+ε) = 0``, i.e. ``β = 0``
    and ``γ·μ = 0``; without affine parameters ``μ = 0``). Activations with ``f(0) = 0`` (ReLU,
    GELU, SiLU …) keep dead channels dead.
    """
    zero_filter = _rows_zero(layer.weight)
    if getattr(layer, "bias", None) is not None:
        zero_filter = zero_filter & _rows_zero(layer.bias)
    if norm is None:
        return zero_filter.cpu()
    if not isinstance(norm, _BatchNorm):
        raise TypeError(f"dead_channels(): unsupported norm {type(norm).__name__}.")
    mean = norm.running_mean
    if mean is None:  # batch statistics even in eval: a zero channel stays zero only if β = 0
        maps_zero_to_zero = _rows_zero(norm.bias) if norm.affine else torch.ones_like(zero_filter)
        return (zero_filter & maps_zero_to_zero).cpu()
    if norm.affine:
        gamma_zero, beta_zero = _rows_zero(norm.weight), _rows_zero(norm.bias)
        kills_all = gamma_zero & beta_zero
        maps_zero_to_zero = beta_zero & (gamma_zero | (mean == 0))
    else:
        kills_all = torch.zeros_like(zero_filter)
        maps_zero_to_zero = mean == 0
    return (kills_all | (zero_filter & maps_zero_to_zero)).cpu()


def kept_indices(dead: Tensor, multiple: int = 1) -> list[int]:
    """Indices of the live channels, plus the fewest dead ones needed to make the count a multiple
    of ``multiple`` (never more than all) and at least one: a removed channel must be dead, a kept
    dead channel is harmless (it stays exactly 0)."""
    dead = dead.bool().cpu()
    n = dead.numel()
    live = int((~dead).sum())
    target = max(live, 1)
    if multiple > 1:
        target = min(n, -(-target // multiple) * multiple)
    keep = ~dead
    extra = target - live
    if extra > 0:
        keep[dead.nonzero().flatten()[:extra]] = True
    return keep.nonzero().flatten().tolist()
