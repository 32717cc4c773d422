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

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from .surgery import keep_inputs, keep_outputs

__all__ = ["CompressionPlan", "ReplaceOp", "SliceOp", "register_replacement"]

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


def _op_from_dict(d: Mapping[str, Any]) -> Op:
    kind = d.get("op")
    if kind == "slice":
        if d["side"] not in ("out", "in"):
            raise ValueError(f"a slice operation's side must be 'out' or 'in', got {d['side']!r}.")
        return SliceOp(str(d["module"]), d["side"], tuple(int(i) for i in d["keep"]))
    if kind == "replace":
        return ReplaceOp(str(d["module"]), str(d["kind"]), dict(d.get("args", {})))
    raise ValueError(f"unknown plan operation {kind!r}; expected 'slice' or 'replace'.")


@dataclass(frozen=True)
class CompressionPlan:
    """The ordered structural edits made by :func:`group_prox.compress`."""

    ops: tuple[Op, ...] = ()

    def __add__(self, other: CompressionPlan) -> CompressionPlan:
        return CompressionPlan(self.ops + other.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def apply(self, model: nn.Module) -> nn.Module:
        """Edit ``model`` in place, operation by operation, and return it."""
        for op in self.ops:
            op.apply(model)
        return model

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, strings, integers) that ``torch.load(weights_only=True)``
        accepts."""
        return {"format": PLAN_FORMAT, "ops": [op.to_dict() for op in self.ops]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionPlan:
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise ValueError(
                f"not a group_prox compression plan (expected format {PLAN_FORMAT!r}, got "
                f"{data.get('format') if isinstance(data, Mapping) else type(data).__name__!r})."
            )
        return cls(tuple(_op_from_dict(d) for d in data["ops"]))

    @classmethod
    def of(cls, ops: Iterable[Op]) -> CompressionPlan:
        return cls(tuple(ops))
