"""timm ConvNeXt (``timm.models.convnext.ConvNeXtBlock``): levels and compression.

A ``ConvNeXtBlock`` computes ``drop_path(γ · mlp(norm(conv_dw(x)))) + shortcut(x)``: a depthwise
conv, a LayerNorm over channels, timm's ``Mlp`` (``fc2(act(fc1(·)))``, ``nn.Linear`` or 1×1
``Conv2d`` with ``conv_mlp``) and an optional layer scale ``gamma``. It is a residual CNN, so its
levels go to ``gp.hierarchy.resnet`` (``builder="resnet"``), with ConvNeXt's own finest unit:

* ``base_level``: MLP neuron ``i`` of every block, ``"<block>.mlp[i]"``: row ``i`` of ``fc1`` (and
  its bias), column ``i`` of ``fc2``. A zero neuron contributes exactly nothing.
* ``layer``: every block's branch, ``"<block>"``: ``conv_dw``, ``norm``, ``mlp`` and ``gamma``
  (not ``shortcut``). A zero branch leaves the block equal to its shortcut.

Compression, exact in ``eval()`` mode: a dead neuron (zero ``fc2`` column) is sliced from ``fc1``
and ``fc2`` under their names (not when ``Mlp.norm`` is used); a block whose branch outputs
exactly 0 (no live neuron and a zero or absent ``fc2`` bias, or an all-zero ``gamma``) becomes its
shortcut, :class:`ConvNeXtShortcut` (replacement kind ``"timm_convnext_shortcut"``). The channels
of the stages (the stream every block adds into) stay, as do other MLP kinds (ConvNeXt-V2's
``GlobalResponseNormMlp``) and blocks overriding ``forward`` (with a warning).
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ..compression.plan import Op, ReplaceOp, SliceOp, register_replacement
from ..compression.surgery import kept_indices
from ..hierarchy.core import Member, hidden_unit
from .registry import Family, register_family

__all__ = ["TIMM_CONVNEXT", "ConvNeXtShortcut", "applies", "levels", "plan"]


def _classes() -> tuple[type, type] | None:
    convnext, mlp = sys.modules.get("timm.models.convnext"), sys.modules.get("timm.layers.mlp")
    return None if convnext is None or mlp is None else (convnext.ConvNeXtBlock, mlp.Mlp)


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    classes = _classes()
    if classes is None:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, classes[0])]


def applies(model: nn.Module) -> bool:
    """Whether ``model`` holds a timm ``ConvNeXtBlock`` (or a block compress made a shortcut of)."""
    return bool(_blocks(model)) or any(isinstance(m, ConvNeXtShortcut) for m in model.modules())


def _understood(name: str, block: nn.Module, caller: str) -> bool:
    block_kind, mlp_kind = _classes()  # type: ignore[misc]
    mlp = getattr(block, "mlp", None)
    ok = (
        type(block).forward is block_kind.forward
        and isinstance(mlp, mlp_kind)
        and type(mlp).forward is mlp_kind.forward
        and isinstance(mlp.fc1, nn.Linear | nn.Conv2d)
        and isinstance(mlp.fc2, nn.Linear | nn.Conv2d)
        and getattr(mlp.fc1, "groups", 1) == 1
        and getattr(mlp.fc2, "groups", 1) == 1
    )
    if not ok:
        warnings.warn(
            f"{caller}: ConvNeXt block {name or 'the model'} overrides forward or has an MLP other "
            "than timm's Mlp of Linear / 1x1 Conv2d; it is left out.",
            stacklevel=4,
        )
    return ok


def levels(model: nn.Module) -> dict[str, dict[str, list[Member]]]:
    """MLP neurons (``base_level``) and block branches (``layer``), frozen parameters included."""
    base: dict[str, list[Member]] = {}
    layer: dict[str, list[Member]] = {}
    for name, block in _blocks(model):
        if not name or not _understood(name, block, "resnet()"):
            continue
        fc1, fc2 = block.mlp.fc1, block.mlp.fc2
        for i in range(fc1.out_channels if isinstance(fc1, nn.Conv2d) else fc1.out_features):
            base[f"{name}.mlp[{i}]"] = hidden_unit([fc1], fc2, i)
        layer[name] = [
            p for child, m in block.named_children() if child != "shortcut" for p in m.parameters()
        ]
        if block.gamma is not None:
            layer[name].append(block.gamma)
    return {"base_level": base, "layer": layer}


class ConvNeXtShortcut(nn.Module):
    """A ConvNeXt block whose branch is exactly 0: ``shortcut(x)`` (the name ``shortcut`` is
    kept, so a ``Downsample``'s state_dict keys do not change)."""

    def __init__(self, shortcut: nn.Module) -> None:
        super().__init__()
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x)


@register_replacement("timm_convnext_shortcut")
def _shortcut(block: nn.Module, args: Mapping[str, Any]) -> nn.Module:
    classes = _classes()
    if not (classes and isinstance(block, classes[0])):
        raise TypeError(
            f"timm_convnext_shortcut replaces a timm ConvNeXtBlock, not a {type(block).__name__}."
        )
    return ConvNeXtShortcut(block.shortcut)


def _zero(t: Tensor | None) -> bool:
    return t is None or not bool(t.detach().any())


def plan(model: nn.Module, multiple: int = 1) -> list[Op]:
    """Operations removing the dead MLP neurons and zero branches of the ConvNeXt blocks in
    ``model`` (see the module docstring)."""
    modules = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    params = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    ops: list[Op] = []
    for name, block in _blocks(model):
        if not name or not _understood(name, block, "compress()"):
            continue
        if any(modules[id(m)] > 1 for m in block.modules()) or any(
            params[id(p)] > 1 for p in block.parameters()
        ):
            continue
        fc2 = block.mlp.fc2
        w = fc2.weight.detach()
        dead = (w.transpose(0, 1).reshape(w.shape[1], -1) == 0).all(1).cpu()
        if (block.gamma is not None and _zero(block.gamma)) or (
            bool(dead.all()) and _zero(fc2.bias)
        ):
            ops.append(ReplaceOp(name, "timm_convnext_shortcut"))
            continue
        if not isinstance(block.mlp.norm, nn.Identity):
            continue
        keep = tuple(kept_indices(dead, multiple))
        if len(keep) < dead.numel():
            ops += [
                SliceOp(f"{name}.mlp.fc1", "out", keep),
                SliceOp(f"{name}.mlp.fc2", "in", keep),
            ]
    return ops


TIMM_CONVNEXT = register_family(
    Family(
        name="timm-convnext",
        builder="resnet",
        description="timm ConvNeXt blocks (timm.models.convnext ConvNeXtBlock, a residual CNN)",
        applies=applies,
        levels=levels,
        plan=plan,
    )
)
