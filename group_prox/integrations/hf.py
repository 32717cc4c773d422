"""A Hugging Face ``Trainer`` callback for :class:`~group_prox.SparsityTarget`.

``Trainer`` saves and restores the optimizer (whose state holds every penalty's λ and the frozen
zero pattern) but knows nothing of the controller, so without this callback a resumed run would
start the target's schedule again. Usage::

    opt = gp.ProxAdam(model.parameters(), lr=1e-3, hierarchy=h, penalties=...)
    target = gp.SparsityTarget(opt, {"base_level": 0.5}, warmup_steps=50, reach_step=400)
    trainer = Trainer(
        model, args, train_dataset=data,
        optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)),
        callbacks=[SparsityTargetCallback(target)],
    )
    trainer.train()                              # or trainer.train(resume_from_checkpoint=True)

The callback steps the target after every optimizer step (``on_step_end``: after gradient
accumulation, once per update), writes ``sparsity_target.pt`` into each checkpoint folder
``checkpoint-<step>`` next to ``optimizer.pt`` (``on_save``), and when training resumes from such
a checkpoint loads it back (``on_train_begin``, after ``Trainer`` has restored the optimizer), so
the resumed run continues the uninterrupted one.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback

from ..target import SparsityTarget
from ._common import TargetSpec, build, check_spec

__all__ = ["FILE_NAME", "SparsityTargetCallback"]

#: The file the target's state is saved to, in each ``checkpoint-<step>`` folder.
FILE_NAME = "sparsity_target.pt"


class SparsityTargetCallback(TrainerCallback):
    """Steps a :class:`~group_prox.SparsityTarget` and keeps its state with the checkpoints.

    Args:
        target: the target, built on the optimizer given to ``Trainer(optimizers=(opt, sched))``;
            or a function ``optimizer -> SparsityTarget``, called at the start of training with
            the trainer's group_prox optimizer (for an optimizer the trainer creates).
        resume_from: the checkpoint folder to load the target's state from at the start of
            training; by default ``<output_dir>/checkpoint-<global step>`` when ``Trainer``
            resumes (a run resumed from a folder outside ``output_dir`` needs it).
    """

    def __init__(self, target: TargetSpec, *, resume_from: str | os.PathLike | None = None) -> None:
        check_spec(target, "SparsityTargetCallback")
        self._spec = target
        self.target: SparsityTarget | None = target if isinstance(target, SparsityTarget) else None
        self.resume_from = resume_from

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        self.target = build(
            self._spec if self.target is None else self.target,
            [] if optimizer is None else [optimizer],
            "SparsityTargetCallback",
        )
        folder = self.resume_from
        if folder is None and state.global_step > 0:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if folder is None:
            return
        path = os.path.join(folder, FILE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"SparsityTargetCallback: training resumes at step {state.global_step}, but "
                f"{path!r} does not exist, so the target would start its schedule again. Resume "
                "from a checkpoint saved with this callback, or pass resume_from=<its folder> "
                "(a checkpoint outside output_dir)."
            )
        self.target.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.target is not None:
            self.target.step()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.target is None or not getattr(args, "should_save", True):
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(self.target.state_dict(), os.path.join(folder, FILE_NAME))
