"""A compression plan: the structural edits that turn a sparse model into a small one, as plain data.

A plan is a list of operations on named submodules, applied in order to an ``nn.Module``:

* ``SliceOp(module, side, keep)``: keep only the channels ``keep`` of ``module``'s outputs
  (``side="out"``) or inputs (``side="in"``), indices counted in the module as it is when the
  operation is applied;
* ``ReplaceOp(module, kind, args)``: replace ``module`` by the module that the replacement
  ``kind`` builds from it and ``args`` (a residual block by its shortcut, an expert by nothing, an
  attention by one with fewer heads).

Both are plain data (strings, integers, lists, dicts), so a plan is stored next to a
``state_dict`` and loads with ``torch.load(..., weights_only=True)``: applying it to a freshly built
original model gives the small architecture, and the ``state_dict`` then fills in its weights.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .surgery import keep_inputs, keep_outputs

__all__ = [
    "CompressionPlan",
    "ReplaceOp",
    "SliceOp",
    "indices",
    "integer",
    "meta_copy",
    "register_replacement",
]

PLAN_FORMAT = "group_prox.compression_plan/1"

Side = Literal["out", "in"]
Replacement = Callable[[nn.Module, Mapping[str, Any]], nn.Module]

# kind -> function(original module, args) -> replacement module. Filled by the family modules.
_REPLACEMENTS: dict[str, Replacement] = {}


def register_replacement(kind: str) -> Callable[[Replacement], Replacement]:
    """Register ``fn(module, args) -> nn.Module`` as the builder of replacements of ``kind``.

    The builder must depend only on the module's structure and on ``args``, never on its weights'
    values, so that applying a plan to a freshly built model gives the same architecture.
    """

    def register(fn: Replacement) -> Replacement:
        if kind in _REPLACEMENTS and _REPLACEMENTS[kind] is not fn:
            raise ValueError(f"a replacement of kind {kind!r} is already registered.")
        _REPLACEMENTS[kind] = fn
        return fn

    return register


@dataclass(frozen=True)
class SliceOp:
    """Keep only channels ``keep`` (increasing) of ``module``'s outputs or inputs."""

    module: str
    side: Side
    keep: tuple[int, ...]

    def describe(self) -> str:
        return f"slice of {self.module!r}, side {self.side!r}"

    def to_dict(self) -> dict[str, Any]:
        return {"op": "slice", "module": self.module, "side": self.side, "keep": list(self.keep)}

    def apply(self, model: nn.Module) -> None:
        target = _submodule(model, self.module)
        (keep_outputs if self.side == "out" else keep_inputs)(target, list(self.keep), self.module)


@dataclass(frozen=True)
class ReplaceOp:
    """Replace ``module`` by ``build(module, args)``, ``build`` being registered for ``kind``."""

    module: str
    kind: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"replace of {self.module!r} by kind {self.kind!r}"

    def to_dict(self) -> dict[str, Any]:
        return {"op": "replace", "module": self.module, "kind": self.kind, "args": dict(self.args)}

    def apply(self, model: nn.Module) -> None:
        if self.kind not in _REPLACEMENTS:
            raise ValueError(
                f"unknown replacement kind {self.kind!r} for {self.module!r}; known kinds: "
                f"{sorted(_REPLACEMENTS)}."
            )
        new = _REPLACEMENTS[self.kind](_submodule(model, self.module), self.args)
        if not self.module:
            raise ValueError("a plan cannot replace the model itself.")
        parent, _, child = self.module.rpartition(".")
        setattr(_submodule(model, parent), child, new)


Op = SliceOp | ReplaceOp


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(
            f"the plan names the submodule {name!r}, which this model does not have: was the "
            "model built with the architecture that was compressed?"
        ) from e


def indices(value: object, where: str) -> tuple[int, ...]:
    """``value`` as increasing non-negative indices, refusing anything but a list or tuple of
    ``int`` (a string, floats, bools or a tensor are not silently read as indices)."""
    if not isinstance(value, list | tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        raise ValueError(
            f"{where} must be a list of int indices, got {type(value).__name__} {value!r:.80}."
        )
    if any(i < 0 for i in value) or any(b <= a for a, b in itertools.pairwise(value)):
        raise ValueError(f"{where} must be increasing indices >= 0, got {list(value)!r:.80}.")
    return tuple(value)


def integer(value: object, where: str, *, minimum: int = 0) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(
            f"{where} must be an int >= {minimum}, got {type(value).__name__} {value!r:.80}."
        )
    return value


def _plain(value: object, where: str) -> None:
    """Refuse anything but ``None``, ``bool``, ``int``, ``float``, ``str``, lists and ``str``-keyed
    dicts of them: the values ``torch.load(weights_only=True)`` gives back unchanged."""
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _plain(v, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} has the key {k!r}; keys must be str.")
            _plain(v, f"{where}[{k!r}]")
        return
    raise ValueError(
        f"{where} must be plain data (str, int, list, dict), got {type(value).__name__}."
    )


_OP_KEYS = {"slice": {"op", "module", "side", "keep"}, "replace": {"op", "module", "kind", "args"}}


def _op_from_dict(d: object, where: str) -> Op:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(d).__name__}.")
    kind = d.get("op")
    if kind not in _OP_KEYS:
        raise ValueError(
            f"{where}: unknown plan operation {kind!r}; expected 'slice' or 'replace'."
        )
    unknown = sorted(map(repr, set(d) - _OP_KEYS[kind]))
    missing = sorted(_OP_KEYS[kind] - set(d) - {"args"})
    if unknown or missing:
        raise ValueError(
            f"{where} ({kind}): "
            + "; ".join(
                ([f"unknown keys {', '.join(unknown)}"] if unknown else [])
                + ([f"missing keys {missing}"] if missing else [])
            )
            + f" (a {kind} operation has the keys {sorted(_OP_KEYS[kind])})."
        )
    module = d["module"]
    if not isinstance(module, str):
        raise ValueError(f"{where}: 'module' must be a str, got {type(module).__name__}.")
    where = f"{where} ({kind} of {module!r})"
    if kind == "slice":
        if d["side"] not in ("out", "in") or not isinstance(d["side"], str):
            raise ValueError(f"{where}: 'side' must be 'out' or 'in', got {d['side']!r}.")
        return SliceOp(module, d["side"], indices(d["keep"], f"{where}: 'keep'"))
    if not isinstance(d["kind"], str):
        raise ValueError(f"{where}: 'kind' must be a str, got {type(d['kind']).__name__}.")
    args = d.get("args", {})
    if not isinstance(args, Mapping):
        raise ValueError(f"{where}: 'args' must be a dict, got {type(args).__name__}.")
    _plain(args, f"{where}: 'args'")
    return ReplaceOp(module, d["kind"], dict(args))


@dataclass(frozen=True)
class CompressionPlan:
    """The ordered structural edits made by :func:`group_prox.compress`."""

    ops: tuple[Op, ...] = ()

    def __add__(self, other: CompressionPlan) -> CompressionPlan:
        return CompressionPlan(self.ops + other.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def apply(self, model: nn.Module) -> nn.Module:
        """Edit ``model`` in place, operation by operation, and return it.

        An operation that does not fit ``model`` raises a ``ValueError``/``TypeError`` naming it;
        the operations before it are then applied (:func:`group_prox.load_compressed` tries a plan
        on a copy first).
        """
        for i, op in enumerate(self.ops):
            try:
                op.apply(model)
            except (ValueError, TypeError) as e:
                raise type(e)(f"compression plan, operation {i} ({op.describe()}): {e}") from e
            except KeyError as e:
                raise ValueError(
                    f"compression plan, operation {i} ({op.describe()}): its args have no key "
                    f"{e}; the plan is damaged or was made by another version."
                ) from e
        return model

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, strings, integers) that ``torch.load(weights_only=True)``
        accepts."""
        return {"format": PLAN_FORMAT, "ops": [op.to_dict() for op in self.ops]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionPlan:
        """The plan that :meth:`to_dict` described, its values checked exactly: an operation with
        an unknown or missing key, a module name that is not a ``str``, indices that are not
        increasing ``int`` s, or arguments that are not plain data raise a ``ValueError`` naming
        the operation and the key."""
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise ValueError(
                f"not a group_prox compression plan (expected format {PLAN_FORMAT!r}, got "
                f"{data.get('format') if isinstance(data, Mapping) else type(data).__name__!r})."
            )
        unknown = sorted(map(repr, set(data) - {"format", "ops"}))
        if unknown:
            raise ValueError(f"compression plan: unknown keys {', '.join(unknown)}.")
        ops = data.get("ops")
        if not isinstance(ops, list | tuple):
            raise ValueError(
                f"compression plan: 'ops' must be a list of operations, got {type(ops).__name__}."
            )
        return cls(
            tuple(_op_from_dict(d, f"compression plan, operation {i}") for i, d in enumerate(ops))
        )

    @classmethod
    def of(cls, ops: Iterable[Op]) -> CompressionPlan:
        return cls(tuple(ops))


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no data copied):
    where a plan is tried or measured without touching, or allocating, any weight."""
    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)
