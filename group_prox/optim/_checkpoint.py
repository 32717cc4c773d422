"""Checking a checkpoint before any of it is loaded.

torch's ``Optimizer.load_state_dict`` applies what it can and fails on the rest, and a damaged
value of this package's entry would only fail in the middle of a later step. Everything loaded is
checked here first, so that a refused checkpoint leaves the optimizer exactly as it was.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..penalties import Penalty

__all__ = ["STATE_KEY", "check_prox_state", "check_torch_state", "describe_hierarchy"]

#: The key of this package's entry in an optimizer's state dict.
STATE_KEY = "group_prox"


def check_torch_state(
    owner: str,
    state_dict: object,
    param_groups: Sequence[Mapping[str, Any]],
    names: Mapping[int, str],
) -> list[object]:
    """Check the torch part of a state dict against ``param_groups`` (same numbers of groups and
    parameters; every state entry a dict whose buffers have its parameter's shape) and return the
    checkpoint's learning rates, for the optimizer to check as it checks its own. ``names``:
    parameter names by ``id``, for messages."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"{owner}: expected the dict returned by optimizer.state_dict(), "
            f"got {type(state_dict).__name__}."
        )
    missing = [key for key in ("state", "param_groups") if key not in state_dict]
    if missing:
        raise ValueError(
            f"{owner}: the state dict has no {', '.join(map(repr, missing))} (its keys: "
            f"{sorted(map(str, state_dict))}); pass the dict returned by optimizer.state_dict()."
        )
    saved_state, saved_groups = state_dict["state"], state_dict["param_groups"]
    if not isinstance(saved_state, Mapping):
        raise TypeError(
            f"{owner}: the state dict's 'state' must be a dict {{param id: state}}, "
            f"got {type(saved_state).__name__}."
        )
    if (
        isinstance(saved_groups, (str, bytes))
        or not isinstance(saved_groups, Sequence)
        or not all(isinstance(g, Mapping) for g in saved_groups)
    ):
        raise TypeError(
            f"{owner}: the state dict's 'param_groups' must be a list of dicts, "
            f"got {type(saved_groups).__name__}."
        )
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"{owner}: the checkpoint has {len(saved_groups)} param group(s), this optimizer "
            f"{len(param_groups)}; build the optimizer with the param groups it was "
            "saved with."
        )
    param_of: dict[Any, tuple[str, Tensor]] = {}
    for i, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        ids = saved.get("params")
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(
                f"{owner}: param group {i} of the checkpoint has no list of 'params' "
                f"(got {type(ids).__name__})."
            )
        if len(ids) != len(group["params"]):
            raise ValueError(
                f"{owner}: param group {i} of the checkpoint holds {len(ids)} parameters, "
                f"this optimizer's {len(group['params'])}; build the optimizer with the "
                "parameters it was saved with."
            )
        if "lr" not in saved:
            raise ValueError(f"{owner}: param group {i} of the checkpoint has no 'lr'.")
        for j, (pid, p) in enumerate(zip(ids, group["params"])):
            label = names.get(id(p), f"{j} of param group {i}")
            param_of[pid] = (label, p)
    for pid, entry in saved_state.items():
        if pid not in param_of:
            continue  # torch keeps state of unknown ids as it is
        label, p = param_of[pid]
        if not isinstance(entry, Mapping):
            raise TypeError(
                f"{owner}: the state of parameter {label} must be a dict, "
                f"got {type(entry).__name__}."
            )
        for key, value in entry.items():
            # Buffers such as momentum and Adam's moments have the parameter's shape; one of
            # another shape would only fail in the middle of a later step.
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise ValueError(
                    f"{owner}: the checkpoint's {key!r} of parameter {label} has shape "
                    f"{tuple(value.shape)}, the parameter {tuple(p.shape)}: the checkpoint "
                    "is of another model."
                )
    return [g["lr"] for g in saved_groups]


def check_prox_state(
    owner: str,
    state: object,
    mine: Mapping[str, Any],
    penalties: Mapping[str, Penalty],
    num_atoms: int | None,
) -> None:
    """Check this package's entry of a state dict against ``mine`` (the optimizer's own entry):
    the same hierarchy and penalised levels, valid penalty states, a frozen pattern of one entry
    per atom, a count of skipped steps."""
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{owner}: the checkpoint's {STATE_KEY!r} entry must be a dict, got "
            f"{type(state).__name__}; pass a dict returned by this optimizer's state_dict()."
        )
    theirs = state.get("hierarchy")
    if theirs != mine["hierarchy"]:
        try:
            described = describe_hierarchy(theirs)
        except (AttributeError, IndexError, KeyError, TypeError):
            described = f"an unreadable description {theirs!r:.80}"
        raise ValueError(
            f"{owner}: the checkpoint was saved with another hierarchy ({described}) than "
            f"this optimizer's ({describe_hierarchy(mine['hierarchy'])}). Rebuild the hierarchy from "
            "the same model."
        )
    saved = state.get("penalties", {})
    if not isinstance(saved, Mapping):
        raise TypeError(
            f"{owner}: the checkpoint's penalties must be a dict {{level: penalty state}}, "
            f"got {type(saved).__name__}."
        )
    if set(saved) != set(penalties):
        raise ValueError(
            f"{owner}: the checkpoint penalises levels {sorted(map(str, saved))}, this "
            f"optimizer {sorted(penalties)}; build the optimizer with the same "
            "penalties= keys."
        )
    for level, pen_state in saved.items():
        try:
            penalties[level]._parse_state(pen_state)
        except (TypeError, ValueError) as e:
            raise type(e)(
                f"{owner}: the checkpoint's penalty for level {level!r} is invalid: {e}"
            ) from None
    frozen = state.get("frozen")
    if frozen is not None and num_atoms is not None:
        n = num_atoms
        wanted = f"a bool tensor of {n} entries (one per atom of the hierarchy)"
        if not isinstance(frozen, Tensor):
            raise TypeError(
                f"{owner}: the checkpoint's frozen zero pattern must be {wanted}, "
                f"got {type(frozen).__name__}."
            )
        if tuple(frozen.shape) != (n,) or not (
            frozen.dtype == torch.bool or frozen.is_floating_point()
        ):
            raise ValueError(
                f"{owner}: the checkpoint's frozen zero pattern must be {wanted}, got a "
                f"{frozen.dtype} tensor of shape {tuple(frozen.shape)}."
            )
    skipped = state.get("skipped_steps", 0)
    if isinstance(skipped, bool) or not isinstance(skipped, numbers.Integral):
        raise TypeError(f"{owner}: the checkpoint's skipped_steps must be an int, got {skipped!r}.")
    if skipped < 0:
        raise ValueError(
            f"{owner}: the checkpoint's skipped_steps must be an int >= 0, got {skipped!r}."
        )


def describe_hierarchy(sig: Any) -> str:
    if not sig:
        return "none"
    levels = ", ".join(f"{lv}: {n} groups" for lv, n in zip(sig["levels"], sig["groups"]))
    grouping = f"; grouping {sig['grouping']}" if sig.get("grouping") else ""
    return f"{levels}; {len(sig['shapes'])} tensors{grouping}"
