"""Training frameworks: the callbacks step the target, and a resumed run equals the
uninterrupted one (Hugging Face Trainer, Lightning)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import group_prox as gp
from tests.identical import assert_identical

TARGETS = {"unit": 0.5}
SCHEDULE = {"warmup_steps": 2, "reach_step": 6, "freeze_step": 9}
STEPS = 10


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def hierarchy(self) -> gp.Hierarchy:
        f1, f2 = self.fc1, self.fc2
        units = {
            f"u{i}": [(f1.weight, 0, i), (f1.bias, 0, i), (f2.weight, 1, i)] for i in range(16)
        }
        return gp.Hierarchy({"unit": units}, names=self)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def _data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * 4, 6, generator=g)
    y = torch.randint(0, 3, (STEPS * 4,), generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(len(x))]


def _optimizer(net: Net) -> gp.ProxSGD:
    h = net.hierarchy()
    return gp.ProxSGD(
        net.parameters(), lr=0.2, momentum=0.9, hierarchy=h, penalties={"unit": gp.GroupLasso(0.0)}
    )


def _outcome(net: Net, target: gp.SparsityTarget) -> dict:
    state = target.state_dict()
    return {
        "params": [p.detach().clone() for p in net.parameters()],
        "multiplier": state["multiplier"],
        "step_count": state["step_count"],
        "penalised": state["penalised"],
        "frozen": target.optimizer.frozen,
    }


# ----------------------------------------------------------------------- Hugging Face Trainer
def _hf_run(tmp_path, *, stop_at: int | None, resume: bool) -> dict:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from group_prox.integrations.hf import SparsityTargetCallback

    net = Net()
    opt = _optimizer(net)
    target = gp.SparsityTarget(opt, TARGETS, **SCHEDULE)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=STEPS if stop_at is None else stop_at,
        save_steps=4,
        save_strategy="steps",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=net,
        args=args,
        train_dataset=_data(),
        optimizers=(opt, sched),
        callbacks=[SparsityTargetCallback(target)],
    )
    if resume:
        trainer.args.max_steps = STEPS
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    else:
        trainer.train()
    return _outcome(net, target)


def test_hf_trainer_steps_the_target_and_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    whole = _hf_run(tmp_path / "whole", stop_at=None, resume=False)
    assert whole["step_count"] == STEPS and whole["frozen"]
    fc1_weight = whole["params"][0]
    assert int((fc1_weight.abs().sum(1) == 0).sum()) == 8  # half of the 16 units
    _hf_run(tmp_path / "parts", stop_at=4, resume=False)
    assert (tmp_path / "parts" / "checkpoint-4" / "sparsity_target.pt").is_file()
    resumed = _hf_run(tmp_path / "parts", stop_at=None, resume=True)
    assert_identical(whole, resumed)


def test_hf_callback_refuses_what_is_not_a_target():
    pytest.importorskip("transformers")
    from group_prox.integrations.hf import SparsityTargetCallback

    with pytest.raises(TypeError, match=r"expected a group_prox\.SparsityTarget"):
        SparsityTargetCallback({"unit": 0.5})


# ------------------------------------------------------------------------------- Lightning
def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    return pl


def _lightning_run(tmp_path, *, max_steps: int, ckpt: str | None) -> dict:
    pl = _lightning()
    from group_prox.integrations.lightning import SparsityTargetCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def training_step(self, batch, batch_idx):
            return self.net(batch["x"], batch["labels"])["loss"]

        def configure_optimizers(self):
            return _optimizer(self.net)

    module = Module()
    callback = SparsityTargetCallback(lambda opt: gp.SparsityTarget(opt, TARGETS, **SCHEDULE))
    saver = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path), every_n_train_steps=4, save_top_k=-1, filename="{step}"
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=[callback, saver],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=str(tmp_path),
    )
    # One epoch of 4 batches: the checkpoint at step 4 ends an epoch (Lightning restarts an
    # epoch interrupted in the middle with a plain DataLoader, which would change the data).
    loader = torch.utils.data.DataLoader(_data()[:16], batch_size=4, shuffle=False)
    trainer.fit(module, loader, ckpt_path=ckpt)
    return _outcome(module.net, callback.target)


def test_lightning_steps_the_target_and_a_resumed_fit_equals_the_uninterrupted_one(tmp_path):
    whole = _lightning_run(tmp_path / "whole", max_steps=STEPS, ckpt=None)
    assert whole["step_count"] == STEPS and whole["frozen"]
    _lightning_run(tmp_path / "parts", max_steps=4, ckpt=None)
    resumed = _lightning_run(
        tmp_path / "parts", max_steps=STEPS, ckpt=str(tmp_path / "parts" / "step=4.ckpt")
    )
    assert_identical(whole, resumed)
