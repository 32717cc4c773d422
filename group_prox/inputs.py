"""Example inputs as users hold them, and running a model on them.

Everywhere the package runs a model (tracing a hierarchy with :func:`group_prox.hierarchy.auto`,
checking and planning in :func:`group_prox.compress`, :func:`group_prox.compression_report`), its
``example_inputs`` are passed the same way:

* a tensor ``x`` (or any object that is not one of the below): ``model(x)``;
* a tuple or list of positional inputs: ``model(*inputs)``;
* a dict (any ``Mapping`` with ``str`` keys) of keyword inputs, as Hugging Face models take them:
  ``model(**inputs)``.

A tuple is never unpacked twice and a tensor never unpacked at all (``model(*x)`` would silently
split a batch of size 1 into its rows).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

__all__ = [
    "ExampleInputs",
    "batch_size",
    "check",
    "devices",
    "like_model",
    "run_model",
    "tensors_of",
]

ExampleInputs: TypeAlias = Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]


def check(inputs: object, owner: str) -> None:
    """Refuse a ``Mapping`` whose keys are not all strings (they cannot be keyword arguments)."""
    if isinstance(inputs, Mapping):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(
                f"{owner}: a dict of example_inputs is passed as keyword arguments, so its keys "
                f"must be str; got the key {bad[0]!r} ({type(bad[0]).__name__})."
            )


def run_model(model: Callable[..., Any], inputs: object) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple or list, else
    ``model(inputs)``; also Torch-Pruning's ``forward_fn(model, inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def tensors_of(tree: object) -> list[Tensor]:
    """The tensors of a nest of tensors, tuples, lists and dicts (an output, or inputs), in order.

    Mappings include Hugging Face's ``ModelOutput``; other leaves are skipped.
    """
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        return [t for v in tree.values() for t in tensors_of(v)]
    if isinstance(tree, tuple | list):
        return [t for v in tree for t in tensors_of(v)]
    return []


def batch_size(inputs: object) -> int:
    """The first dimension of the first tensor of ``inputs`` (1 for a scalar or no tensor)."""
    found = tensors_of(inputs)
    return int(found[0].shape[0]) if found and found[0].dim() else 1


def devices(inputs: object) -> list[torch.device]:
    """The devices of the tensors of ``inputs``, each once, in order of appearance."""
    seen: dict[torch.device, None] = {}
    for t in tensors_of(inputs):
        seen.setdefault(t.device)
    return list(seen)


def like_model(inputs: Any, model: nn.Module) -> Any:
    """``inputs`` with their tensors on the device of ``model``'s first parameter, and its
    floating-point tensors in its dtype (inputs recorded for a model since moved with ``.to``)."""
    p = next(model.parameters(), None)
    if p is None:
        return inputs
    if isinstance(inputs, Tensor):
        return inputs.to(p.device, p.dtype) if inputs.is_floating_point() else inputs.to(p.device)
    if isinstance(inputs, Mapping):
        return {k: like_model(v, model) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(like_model(x, model) for x in inputs)
    return inputs
