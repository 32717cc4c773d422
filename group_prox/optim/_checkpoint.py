"""Checking a checkpoint before any of it is loaded.

torch's ``Optimizer.load_state_dict`` applies what it can and fails on the rest, and a damaged
value of this package's entry would only fail in the middle of a later step. Everything loaded is
checked here first, so that a refused checkpoint leaves the optimizer exactly as it was.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..checksums import checksums_of, first_mismatch
from ..penalties import Penalty

__all__ = [
    "FORMAT",
    "STATE_KEY",
    "OptimizerKind",
    "check_checksums",
    "check_prox_state",
    "check_torch_state",
    "describe_hierarchy",
    "state_checksums",
]

#: The key of this package's entry in an optimizer's state dict.
STATE_KEY = "group_prox"
#: The version of that entry. An entry without ``"format"`` was saved before versions, kinds and
#: checksums were recorded; it is read with the other checks alone.
FORMAT = "group_prox.optimizer/2"


@dataclass(frozen=True)
class OptimizerKind:
    """What a checkpoint of one optimizer kind holds, to tell it from another kind's before
    torch replaces anything: the hyper-parameters every param group has, and the buffers of a
    parameter's state (``required`` in every entry, nothing outside ``allowed``)."""

    name: str
    group_keys: frozenset[str]
    state_required: frozenset[str]
    state_allowed: frozenset[str]


def _state_tensors(torch_state: Mapping[Any, Any]) -> Iterator[tuple[str, str, str, Tensor]]:
    """``(key, parameter id, buffer name, tensor)`` for every tensor of torch's per-parameter
    state, ``key`` naming where it lies."""
    for pid, entry in torch_state.items():
        if not isinstance(entry, Mapping):
            continue
        for name, value in entry.items():
            if isinstance(value, Tensor):
                yield f"state/{pid}/{name}", str(pid), str(name), value


def state_checksums(torch_state: Mapping[Any, Any], frozen: Tensor | None) -> dict[str, int]:
    """A checksum of every tensor of an optimizer's state dict, keyed by where it lies."""
    tensors = {key: t for key, _, _, t in _state_tensors(torch_state)}
    if frozen is not None:
        tensors["frozen"] = frozen
    return checksums_of(tensors)


def check_checksums(owner: str, state_dict: Mapping[str, Any], names: Mapping[str, str]) -> None:
    """Refuse a state dict whose tensors differ from the checksums recorded when it was made.
    ``names``: the parameters' names by the checkpoint's ids (as strings), for messages."""
    entry = state_dict[STATE_KEY]
    saved = entry.get("checksums")
    if not isinstance(saved, Mapping) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in saved.items()
    ):
        raise TypeError(
            f"{owner}: the checkpoint's checksums must be a dict {{str: int}}, got "
            f"{type(saved).__name__}; the checkpoint is damaged."
        )
    found = {
        key: (f"{name!r} of parameter {names.get(pid, pid)}", t)
        for key, pid, name, t in _state_tensors(state_dict["state"])
    }
    frozen = entry.get("frozen")
    if isinstance(frozen, Tensor):
        found["frozen"] = ("frozen zero pattern", frozen)
    if set(found) != set(saved):
        odd = sorted(set(found) ^ set(saved))
        raise ValueError(
            f"{owner}: the checkpoint's tensors and checksums do not match ({odd[:3]}): the "
            "checkpoint was edited or damaged after it was saved."
        )
    bad = first_mismatch({key: t for key, (_, t) in found.items()}, saved)
    if bad is not None:
        raise ValueError(
            f"{owner}: the checkpoint's {found[bad][0]} does not match the checksum recorded when the "
            "state dict was made: the file is damaged, or the dict was changed after "
            "state_dict() returned it (it holds the optimizer's live buffers; copy.deepcopy "
            "it to keep a snapshot)."
        )


def check_torch_state(
    owner: str,
    state_dict: object,
    param_groups: Sequence[Mapping[str, Any]],
    names: Mapping[int, str],
    kind: OptimizerKind,
) -> tuple[list[object], dict[str, str]]:
    """Check the torch part of a state dict against ``param_groups`` and ``kind`` (same numbers
    of groups and parameters; the kind's hyper-parameters in every group; every state entry a
    dict of the kind's buffers, shaped like its parameter) and return the checkpoint's learning
    rates, for the optimizer to check as it checks its own, and the parameters' names by the
    checkpoint's ids (as strings), for later messages. ``names``: parameter names by ``id``."""
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
        absent = sorted(kind.group_keys - set(saved))
        if absent:
            raise ValueError(
                f"{owner}: param group {i} of the checkpoint has no {', '.join(map(repr, absent))}: "
                f"it was not saved by a {kind.name} (nor by its torch.optim counterpart). Load it "
                "into the optimizer kind that saved it."
            )
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
        foreign = sorted(set(map(str, entry)) - kind.state_allowed)
        lacking = sorted(kind.state_required - set(entry))
        if foreign or lacking:
            what = (
                f"holds {', '.join(map(repr, foreign))}"
                if foreign
                else f"has no {', '.join(map(repr, lacking))}"
            )
            raise ValueError(
                f"{owner}: the checkpoint's state of parameter {label} {what}: it was not saved "
                f"by a {kind.name}, or it is damaged. Load it into the optimizer kind that saved it."
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
    return [g["lr"] for g in saved_groups], {
        str(pid): label for pid, (label, _) in param_of.items()
    }


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
    version = state.get("format")
    if version is not None and version != FORMAT:
        raise ValueError(
            f"{owner}: the checkpoint's entry has format {version!r}; this version of group_prox "
            f"reads {FORMAT!r} and entries saved before formats were recorded. Load it with the "
            "group_prox version that saved it."
        )
    if version is not None and state.get("optimizer") != mine["optimizer"]:
        raise ValueError(
            f"{owner}: the checkpoint was saved by a {state.get('optimizer')!r}, this optimizer is "
            f"a {mine['optimizer']}; load it into the optimizer kind that saved it."
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
