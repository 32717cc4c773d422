"""A Lightning callback for :class:`~group_prox.SparsityTarget`.

Lightning builds the optimizer inside ``fit`` (``configure_optimizers``), so the callback is
usually given a function that builds the target from it::

    def configure_optimizers(self):
        return gp.ProxAdam(self.parameters(), lr=1e-3, hierarchy=self.hierarchy, penalties=...)

    callback = SparsityTargetCallback(
        lambda opt: gp.SparsityTarget(opt, {"base_level": 0.5}, warmup_steps=50, reach_step=400)
    )
    Trainer(callbacks=[callback]).fit(module)      # or .fit(module, ckpt_path="last.ckpt")

The target is stepped after every optimizer step (once per update under gradient accumulation),
and its state is part of every Lightning checkpoint (the callback's ``state_dict``): a fit resumed
from a checkpoint continues the uninterrupted one. Works with ``lightning`` and with
``pytorch_lightning``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback

from ..target import SparsityTarget
from ._common import TargetSpec, build, check_spec

__all__ = ["SparsityTargetCallback"]


class SparsityTargetCallback(Callback):
    """Steps a :class:`~group_prox.SparsityTarget` and keeps its state in Lightning checkpoints.

    Args:
        target: a function ``optimizer -> SparsityTarget``, called at the start of ``fit`` with
            the one group_prox optimizer of ``configure_optimizers``; or a target already built
            on that optimizer.
    """

    def __init__(self, target: TargetSpec) -> None:
        check_spec(target, "SparsityTargetCallback")
        self._spec = target
        self.target: SparsityTarget | None = target if isinstance(target, SparsityTarget) else None
        self._pending: Mapping[str, Any] | None = None
        self._global_step = 0

    @property
    def state_key(self) -> str:
        return "group_prox.SparsityTargetCallback"

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # After configure_optimizers; a checkpoint's state arrived before the optimizer existed.
        self.target = build(
            self._spec if self.target is None else self.target,
            trainer.optimizers,
            "SparsityTargetCallback",
        )
        if self._pending is not None:
            self.target.load_state_dict(self._pending)
            self._pending = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # After a checkpoint's loop state is restored: count the optimizer steps from here.
        self._global_step = trainer.global_step

    def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        # global_step counts optimizer steps: under gradient accumulation some batches step none.
        while self.target is not None and self._global_step < trainer.global_step:
            self._global_step += 1
            self.target.step()

    def state_dict(self) -> dict[str, Any]:
        if self.target is None:
            return {} if self._pending is None else dict(self._pending)
        return self.target.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not state_dict:
            return
        if self.target is None:
            self._pending = state_dict
        else:
            self.target.load_state_dict(state_dict)
