"""Fine-tune a small Llama-style model (built from a config, nothing downloaded) with Hugging
Face's ``Trainer``, ``ProxAdam`` and a ``SparsityTarget`` that removes half of its attention heads
and MLP neurons, then compress it and compare::

    pip install "group_prox[hf]"
    python examples/hf_trainer.py [--steps 300] [--output-dir /tmp/hf_trainer]

The task is synthetic (copy the first half of each sequence into its second half), so the
script runs offline in a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import Trainer, TrainingArguments

import group_prox as gp
from group_prox.demo_hf import build_llama, copy_accuracy, copy_task
from group_prox.integrations.hf import SparsityTargetCallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()

    model = build_llama()
    h = gp.hierarchy.transformer(model)
    print(h)
    opt = gp.ProxAdam(
        model.parameters(), lr=3e-3, hierarchy=h, penalties={"base_level": gp.GroupLasso(0.0)}
    )
    target = gp.SparsityTarget(
        opt,
        {"base_level": 0.5},
        warmup_steps=args.steps // 10,
        reach_step=args.steps // 2,
        freeze_step=3 * args.steps // 4,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(
            output_dir=args.output_dir or tmp,
            max_steps=args.steps,
            per_device_train_batch_size=32,
            logging_steps=max(1, args.steps // 6),
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(
            model=model,
            args=training,
            train_dataset=copy_task(4096, seed=0),
            optimizers=(opt, schedule),
            callbacks=[SparsityTargetCallback(target)],
        )
        trainer.train()

    test = copy_task(256, seed=1)
    print(opt.get_sparsity_report())
    ids = torch.stack([d["input_ids"] for d in test[:64]])
    small = gp.compress(model.eval(), h, example_inputs={"input_ids": ids})
    print(f"copy accuracy: sparse {copy_accuracy(model, test):.3f}, "
          f"compressed {copy_accuracy(small, test):.3f}")  # fmt: skip
    print(gp.compression_report(model, small, {"input_ids": ids}))


if __name__ == "__main__":
    main()
