"""``compress``: a sparse model in, a smaller model with the same outputs out; saving it as data."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..hierarchy import Hierarchy
from . import auto, moe, resnet, transformer
from .plan import CompressionPlan, Op
from .report import _tensors, as_tuple

__all__ = ["compress", "load_compressed", "save_compressed"]

_FILE_FORMAT = "group_prox.compressed/1"
_PLAN_ATTR = "group_prox_plan"


def _family_ops(model: nn.Module, multiple: int) -> list[Op] | None:
    """Operations from every family found in ``model``; ``None`` if no family was found."""
    found = False
    ops: list[Op] = []
    for family in (resnet, transformer, moe):
        if family.applies(model):
            found = True
            ops += family.plan(model, multiple=multiple)
    return ops if found else None


def _check_hierarchy(model: nn.Module, hierarchy: Hierarchy | None) -> None:
    if hierarchy is None:
        return
    if not isinstance(hierarchy, Hierarchy):
        raise TypeError(
            f"compress(): hierarchy must be a group_prox.Hierarchy or None, got "
            f"{type(hierarchy).__name__}."
        )
    own = {id(p) for p in model.parameters()}
    for layout in hierarchy.tensors:
        if id(layout.param) not in own:
            raise ValueError(
                f"compress(): the hierarchy's parameter {layout.name!r} is not a parameter of this "
                "model; build the hierarchy from the model you compress."
            )


@torch.no_grad()
def _check_same_outputs(model: nn.Module, small: nn.Module, example_inputs: Any) -> None:
    training = model.training, small.training
    model.eval(), small.eval()
    try:
        want = model(*as_tuple(example_inputs))
        got = small(*as_tuple(example_inputs))
    finally:
        model.train(training[0]), small.train(training[1])
    for w, g in zip(_tensors(want), _tensors(got), strict=True):
        if not w.is_floating_point():
            same = w.shape == g.shape and torch.equal(w, g)
        else:
            rtol, atol = _tolerance(w)
            same = w.shape == g.shape and torch.allclose(w, g, rtol=rtol, atol=atol)
        if not same:
            diff = (w - g).abs().max().item() if w.shape == g.shape else "shape mismatch"
            raise RuntimeError(
                "compress(): the compressed model's outputs differ from the original's on "
                f"example_inputs (max abs difference {diff}). Please report this model."
            )


def _tf32(t: Tensor) -> bool:
    """Whether CUDA may compute float32 convolutions or matmuls in TF32 (10-bit mantissa), whose
    rounding depends on the shapes, so on the compressed widths."""
    return t.is_cuda and (
        torch.backends.cudnn.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    )


def _tolerance(w: Tensor) -> tuple[float, float]:
    """Float rounding differs between the two models (other widths, other kernels), never more."""
    scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
    if w.dtype == torch.float64:
        return 1e-9, 1e-12 * scale
    if w.dtype in (torch.float16, torch.bfloat16):
        return 2e-2, 2e-2 * scale
    if _tf32(w):
        return 5e-3, 5e-3 * scale
    # Sums over other widths round differently in proportion to the activations, which can be
    # much larger than the outputs; a removed structure that mattered changes far more.
    return 1e-4, 1e-5 * scale


def compress(
    model: nn.Module,
    hierarchy: Hierarchy | None = None,
    *,
    example_inputs: Any = None,
    multiple: int = 1,
) -> nn.Module:
    """A physically smaller copy of ``model`` with the same outputs in ``eval()`` mode.

    Every structure whose contribution is exactly zero is removed: dead conv/linear output channels
    with their BatchNorm channels and the matching input channels of every consumer (a channel of a
    residual stream only when it is dead in every layer adding into it), residual branches (the
    block becomes its shortcut), attention heads, MLP neurons and whole attention/MLP sublayers,
    expert hidden units and whole experts (a removed expert stays in the router, which routes as
    before; it just adds nothing). ``model`` is left untouched.

    Model families are recognised by their modules: torchvision ``BasicBlock``/``Bottleneck``
    ResNets, ``torch.nn`` transformer layers and ``MultiheadAttention``, and modules with an
    ``experts`` attribute (see :func:`group_prox.hierarchy.moe`). Any other model is compressed
    through Torch-Pruning's dependency graph, traced on ``example_inputs`` (optional extra
    ``group_prox[auto]``).

    Args:
        model: the trained sparse model.
        hierarchy: the hierarchy it was trained with; its parameters must be the model's. Which
            structures are removed is read from the weights (exact zeros), so the hierarchy is only
            checked, and tells how an ``auto`` hierarchy was traced.
        example_inputs: a tensor or tuple of positional inputs. Needed for models of no known
            family; when given, the outputs of both models are compared on it in ``eval()`` mode
            and a ``RuntimeError`` is raised if they differ.
        multiple: round every reduced width up to a multiple of this by keeping some dead
            channels (exact zeros), for kernels that prefer aligned sizes.

    Returns:
        The compressed model, an ordinary ``nn.Module`` (same mode and device as ``model``). Its
        attribute ``group_prox_plan`` (a :class:`~group_prox.compression.CompressionPlan`) records the
        edits, which :func:`save_compressed` stores as plain data.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress(): expected an nn.Module, got {type(model).__name__}.")
    if not isinstance(multiple, int) or isinstance(multiple, bool):
        raise TypeError(
            f"compress(): multiple must be a positive int, got {type(multiple).__name__} "
            f"{multiple!r}."
        )
    if multiple < 1:
        raise ValueError(f"compress(): multiple must be a positive int, got {multiple!r}.")
    _check_hierarchy(model, hierarchy)

    ops = None if auto.built_by_auto(hierarchy) else _family_ops(model, multiple)
    if ops is None:
        inputs = example_inputs if example_inputs is not None else auto.example_inputs_of(hierarchy)
        if inputs is None:
            raise ValueError(
                "compress(): the model has no ResNet block, transformer layer, attention or MoE "
                "layer that group_prox knows; pass example_inputs=... so that its channel "
                "dependencies can be traced (needs the optional extra group_prox[auto])."
            )
        ops = auto.plan(model, inputs, hierarchy, multiple=multiple)

    small = copy.deepcopy(model)
    previous = getattr(model, _PLAN_ATTR, None)
    plan = CompressionPlan.of(ops)
    plan.apply(small)
    small.group_prox_plan = plan if previous is None else previous + plan
    if example_inputs is not None:
        _check_same_outputs(model, small, example_inputs)
    return small


def save_compressed(model: nn.Module, path: str | os.PathLike | Any) -> None:
    """Save a model returned by :func:`compress` as its plan (plain data) and its ``state_dict``.

    Nothing is pickled but tensors, strings, numbers, lists and dicts, so the file loads with
    ``torch.load(path, weights_only=True)`` (which :func:`load_compressed` uses).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"save_compressed(): expected the nn.Module returned by group_prox.compress(...), "
            f"got {type(model).__name__}."
        )
    plan = getattr(model, _PLAN_ATTR, None)
    if not isinstance(plan, CompressionPlan):
        raise ValueError(
            "save_compressed(): the model has no group_prox_plan; save a model returned by "
            "group_prox.compress(...), or use torch.save(model.state_dict(), path) for others."
        )
    torch.save(
        {"format": _FILE_FORMAT, "plan": plan.to_dict(), "state_dict": model.state_dict()}, path
    )


def load_compressed(
    model_fn: Callable[[], nn.Module] | nn.Module,
    path: str | os.PathLike | Any,
    *,
    map_location: Any = None,
) -> nn.Module:
    """Rebuild a compressed model saved by :func:`save_compressed`.

    Args:
        model_fn: builds the *original* (uncompressed) architecture, e.g. ``torchvision.models.
            resnet18``, or that model itself (it is then edited in place). Its weights do not
            matter: the plan shrinks it and the saved ``state_dict`` fills it.
        path: the file (or file-like object) written by :func:`save_compressed`.
        map_location: as in ``torch.load``.

    Returns:
        The compressed model, with ``group_prox_plan`` set, so it can be saved again.
    """
    if not isinstance(model_fn, nn.Module) and not callable(model_fn):
        raise TypeError(
            "load_compressed(): model_fn must build the original architecture (a callable such "
            f"as torchvision.models.resnet18) or be that nn.Module, got {type(model_fn).__name__}."
        )
    data = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(data, dict) or data.get("format") != _FILE_FORMAT:
        raise ValueError(f"load_compressed(): {path!r} was not written by save_compressed().")
    missing = [key for key in ("plan", "state_dict") if key not in data]
    if missing:
        raise ValueError(
            f"load_compressed(): {path!r} has no {', '.join(map(repr, missing))}; the file is "
            "damaged, save the model again with save_compressed()."
        )
    plan = CompressionPlan.from_dict(data["plan"])
    model = model_fn if isinstance(model_fn, nn.Module) else model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"load_compressed(): model_fn must return an nn.Module, got {type(model).__name__}."
        )
    plan.apply(model)
    model.load_state_dict(data["state_dict"])
    model.group_prox_plan = plan
    return model
