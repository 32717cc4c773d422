"""``compress``: a sparse model in, a smaller model with the same outputs out; saving it as data."""

from __future__ import annotations

import copy
import json
import os
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..checksums import checksums_of, first_mismatch
from ..distributed import is_dtensor
from ..families.registry import families
from ..hierarchy import Hierarchy
from ..inputs import ExampleInputs, check, run_model, tensors_of
from . import auto
from .plan import CompressionPlan, Op, meta_copy

__all__ = ["compress", "compression_plan", "load_compressed", "save_compressed"]

_FILE_FORMAT = "group_prox.compressed/2"
_FILE_FORMATS = ("group_prox.compressed/1", _FILE_FORMAT)  # /1: no checksums
_PLAN_ATTR = "group_prox_plan"


_SHARDED = (
    "{owner}: the model's parameters are sharded (DTensor, e.g. under FSDP2's fully_shard); "
    "compression needs whole tensors. Gather them first, on one rank: "
    "state = torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
    "options=StateDictOptions(full_state_dict=True, cpu_offload=True)); build an unsharded copy "
    "of the architecture, load_state_dict(state) into it and pass that copy."
)


def _sharded(model: nn.Module) -> bool:
    return any(is_dtensor(t) for t in (*model.parameters(), *model.buffers()))


def _family_ops(model: nn.Module, multiple: int) -> list[Op] | None:
    """Operations from every registered family found in ``model``; ``None`` if none was found."""
    found = [f for f in families() if f.plan is not None and f.applies(model)]
    if not found:
        return None
    return [op for f in found for op in f.plan(model, multiple)]


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
        want = run_model(model, example_inputs)
        got = run_model(small, example_inputs)
    finally:
        model.train(training[0]), small.train(training[1])
    for w, g in zip(tensors_of(want), tensors_of(got), strict=True):
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


def compression_plan(
    model: nn.Module,
    hierarchy: Hierarchy | None = None,
    *,
    example_inputs: ExampleInputs | None = None,
    multiple: int = 1,
) -> CompressionPlan:
    """The edits :func:`compress` would make to ``model`` now, without making them.

    The plan is read from the weights' exact zeros by the same planner :func:`compress` uses
    (the registered model families, else the traced dependency graph), so applying it to a copy of
    ``model`` gives exactly the model :func:`compress` returns. Arguments as for :func:`compress`;
    they are not checked again here.
    """
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
    return CompressionPlan.of(ops)


def compress(
    model: nn.Module,
    hierarchy: Hierarchy | None = None,
    *,
    example_inputs: ExampleInputs | None = None,
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
        example_inputs: a tensor, a tuple or list of positional inputs, or a dict of keyword
            inputs (``model(**inputs)``, as Hugging Face models take them; see
            :mod:`group_prox.inputs`). Needed for models of no known family; when given, the outputs of both models are compared on it in ``eval()`` mode
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
    check(example_inputs, "compress()")
    if _sharded(model):
        raise ValueError(_SHARDED.format(owner="compress()"))
    _check_hierarchy(model, hierarchy)

    plan = compression_plan(model, hierarchy, example_inputs=example_inputs, multiple=multiple)
    small = copy.deepcopy(model)
    previous = getattr(model, _PLAN_ATTR, None)
    plan.apply(small)
    small.group_prox_plan = plan if previous is None else previous + plan
    if example_inputs is not None:
        _check_same_outputs(model, small, example_inputs)
    return small


def _plan_checksum(plan_data: Any) -> int:
    """CRC-32 of the plan's data, written canonically (sorted keys, tuples as lists, anything
    that is not plain data by its ``repr``, for :meth:`CompressionPlan.from_dict` to refuse)."""
    text = json.dumps(plan_data, sort_keys=True, separators=(",", ":"), default=repr)
    return zlib.crc32(text.encode())


def save_compressed(model: nn.Module, path: str | os.PathLike | Any) -> None:
    """Save a model returned by :func:`compress` as its plan (plain data) and its ``state_dict``.

    Nothing is pickled but tensors, strings, numbers, lists and dicts, so the file loads with
    ``torch.load(path, weights_only=True)`` (which :func:`load_compressed` uses). The file records
    its format version (``group_prox.compressed/2``) and a CRC-32 of the plan and of every tensor,
    which :func:`load_compressed` checks.
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
    if _sharded(model):
        raise ValueError(
            "save_compressed(): the model's parameters are sharded (DTensor); save the unsharded "
            "model returned by group_prox.compress(...)."
        )
    plan_data = plan.to_dict()
    state = model.state_dict()
    checksums = {
        "plan": _plan_checksum(plan_data),
        "tensors": checksums_of({k: t for k, t in state.items() if isinstance(t, Tensor)}),
    }
    torch.save(
        {"format": _FILE_FORMAT, "plan": plan_data, "state_dict": state, "checksums": checksums},
        path,
    )


def _describe(path: object) -> str:
    return repr(os.fspath(path)) if isinstance(path, str | os.PathLike) else "the file object"


def _read(path: str | os.PathLike | Any, map_location: Any) -> Mapping[str, Any]:
    """The file's contents, checked against its format and checksums before anything is built."""
    where = f"load_compressed(): {_describe(path)}"
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # torch.load raises RuntimeError, EOFError, UnpicklingError, ...
        raise ValueError(
            f"{where} cannot be read as a file written by save_compressed(): it is damaged, "
            f"truncated or of another kind ({type(e).__name__}: {str(e).splitlines()[0]:.200})."
        ) from e
    if not isinstance(data, Mapping) or data.get("format") not in _FILE_FORMATS:
        found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(
            f"{where} was not written by save_compressed() (format {found!r:.80}; this version "
            f"reads {', '.join(map(repr, _FILE_FORMATS))})."
        )
    keys = {"format", "plan", "state_dict"} | (
        {"checksums"} if data["format"] == _FILE_FORMAT else set()
    )
    missing, unknown = sorted(keys - set(data)), sorted(set(data) - keys)
    if missing or unknown:
        raise ValueError(
            f"{where} has {'no ' + ', '.join(map(repr, missing)) if missing else ''}"
            f"{' and ' if missing and unknown else ''}"
            f"{'the unknown keys ' + ', '.join(map(repr, unknown)) if unknown else ''}; the file is "
            "damaged, save the model again with save_compressed()."
        )
    state = data["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{where}: its state_dict is not a dict of named tensors; it is damaged.")
    if data["format"] == _FILE_FORMAT:
        _check_file_checksums(where, data)
    return data


def _check_file_checksums(where: str, data: Mapping[str, Any]) -> None:
    sums = data["checksums"]

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    tensors = sums.get("tensors") if isinstance(sums, Mapping) else None
    if not (
        isinstance(sums, Mapping)
        and set(sums) == {"plan", "tensors"}
        and is_int(sums["plan"])
        and isinstance(tensors, Mapping)
        and all(isinstance(k, str) and is_int(v) for k, v in tensors.items())
    ):
        raise ValueError(
            f"{where}: its checksums are not {{'plan': int, 'tensors': {{str: int}}}}; the file is damaged."
        )
    try:
        plan_sum = _plan_checksum(data["plan"])
    except (TypeError, ValueError):  # keys that are not str, values json cannot write
        plan_sum = None
    if plan_sum != sums["plan"]:
        raise ValueError(
            f"{where}: its plan does not match the checksum recorded when it was saved; the file "
            "is damaged or was edited."
        )
    state = data["state_dict"]
    named = {k for k, t in state.items() if isinstance(t, Tensor)}
    if named != set(tensors):
        odd = sorted(named ^ set(tensors))
        raise ValueError(
            f"{where}: its tensors and checksums do not match ({odd[:3]}); the file is damaged "
            "or was edited."
        )
    bad = first_mismatch({name: state[name] for name in sorted(named)}, tensors)
    if bad is not None:
        raise ValueError(
            f"{where}: the tensor {bad!r} does not match the checksum recorded when it was "
            "saved; the file is damaged."
        )


def _fits(model: nn.Module, state: Mapping[str, Any]) -> str | None:
    """Why ``state`` would not load strictly into ``model`` (keys and shapes), or ``None``."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in sorted(set(own) & set(state))
        if isinstance(state[k], Tensor)
        and isinstance(own[k], Tensor)
        and state[k].shape != own[k].shape
    ]
    problems = (
        ([f"missing {missing[:3]}"] if missing else [])
        + ([f"unexpected {unexpected[:3]}"] if unexpected else [])
        + ([f"other shapes ({'; '.join(shapes[:3])})"] if shapes else [])
    )
    return "; ".join(problems) or None


def _build(model: nn.Module, plan: CompressionPlan, state: Mapping[str, Any], where: str) -> None:
    try:
        plan.apply(model)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{where}: the file's plan does not fit this model ({e}). Build the architecture "
            "that was compressed (same class and sizes)."
        ) from e
    problem = _fits(model, state)
    if problem:
        raise ValueError(
            f"{where}: the file's weights do not fit the compressed model: {problem}. Build the "
            "architecture that was compressed (same class and sizes)."
        )


def load_compressed(
    model_fn: Callable[[], nn.Module] | nn.Module,
    path: str | os.PathLike | Any,
    *,
    map_location: Any = None,
) -> nn.Module:
    """Rebuild a compressed model saved by :func:`save_compressed`.

    Everything is checked before ``model_fn``'s model is changed: the file's format, its
    checksums, the plan's values (exact types), and that the plan and then the weights fit the
    architecture (tried on a copy of it on the meta device, which holds no data). A file or model
    that does not fit raises a ``ValueError`` saying why, and a model passed in is left as it was.
    Files of the first format (``group_prox.compressed/1``, without checksums) still load.

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
    data = _read(path, map_location)
    where = f"load_compressed(): {_describe(path)}"
    try:
        plan = CompressionPlan.from_dict(data["plan"])
    except ValueError as e:
        raise ValueError(f"{where}: {e} The file is damaged; save the model again.") from e
    state = data["state_dict"]
    model = model_fn if isinstance(model_fn, nn.Module) else model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"load_compressed(): model_fn must return an nn.Module, got {type(model).__name__}."
        )
    if model is model_fn:
        if _sharded(model):
            raise ValueError(
                "load_compressed(): the model's parameters are sharded (DTensor, e.g. under "
                "FSDP2's fully_shard); the plan edits whole tensors. Load into an unsharded model "
                "(pass model_fn), then shard the result."
            )
        _build(meta_copy(model), plan, state, where)
    _build(model, plan, state, where)
    model.load_state_dict(state)
    model.group_prox_plan = plan
    return model
