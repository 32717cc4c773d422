"""Resuming: a checkpoint taken mid-run and loaded into fresh objects in a new process continues
bit for bit; checkpoints load with ``weights_only=True``; another hierarchy is refused."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import group_prox as gp
from tests import resume_run

from .identical import assert_identical

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [(o, d) for o in ("sgd", "adam") for d in ("float32", "float64")]
STOP_AT = 12  # inside the ramp of the sparsity controller; its freeze comes after


def _run_in_new_process(specs: list[dict], tmp_path: Path, name: str) -> None:
    spec_file = tmp_path / f"{name}.json"
    spec_file.write_text(json.dumps(specs))
    subprocess.run(
        [sys.executable, "-m", "tests.resume_run", str(spec_file)],
        cwd=ROOT,
        check=True,
        timeout=300,
    )


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    """Model, optimizer, OneCycleLR and SparsityTarget saved at step 12 of 30, loaded into fresh
    objects in another process: after the remaining 18 steps (through the controller's freeze)
    every parameter, buffer and state entry equals the uninterrupted run's, bit for bit."""
    first, second = [], []
    for opt, dtype in CONFIGS:
        tag = f"{opt}-{dtype}"
        first.append(
            {"optimizer": opt, "dtype": dtype, "start": 0, "stop": STOP_AT,
             "save": str(tmp_path / f"{tag}-k.pt")}
        )  # fmt: skip
        first.append(
            {"optimizer": opt, "dtype": dtype, "start": 0, "stop": resume_run.TOTAL_STEPS,
             "save": str(tmp_path / f"{tag}-whole.pt")}
        )  # fmt: skip
        second.append(
            {"optimizer": opt, "dtype": dtype, "start": STOP_AT, "stop": resume_run.TOTAL_STEPS,
             "load": str(tmp_path / f"{tag}-k.pt"), "save": str(tmp_path / f"{tag}-resumed.pt")}
        )  # fmt: skip
    _run_in_new_process(first, tmp_path, "first")
    _run_in_new_process(second, tmp_path, "second")
    for opt, dtype in CONFIGS:
        tag = f"{opt}-{dtype}"
        whole = torch.load(tmp_path / f"{tag}-whole.pt", weights_only=True)
        resumed = torch.load(tmp_path / f"{tag}-resumed.pt", weights_only=True)
        assert_identical(whole, resumed, tag)
        # The run went through the freeze with real sparsity, not a trivial fixed point.
        assert whole["target"]["step_count"] == resume_run.TOTAL_STEPS
        assert whole["opt"]["group_prox"]["frozen"] is not None
        assert not whole["opt"]["group_prox"]["frozen"].all()


def _small_run(optimizer: str = "sgd") -> dict:
    run = resume_run.build(optimizer, "float32")
    resume_run.train(run, 0, 26, "float32")  # frozen by now
    run["opt"].nonfinite = "skip"
    return run


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_checkpoints_load_with_weights_only(optimizer):
    run = _small_run(optimizer)
    buf = io.BytesIO()
    torch.save(resume_run.checkpoint(run), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = resume_run.build(optimizer, "float32")
    for name, obj in fresh.items():
        obj.load_state_dict(saved[name])
    assert fresh["opt"].frozen and fresh["target"].step_count == 26
    assert_identical(resume_run.checkpoint(run), resume_run.checkpoint(fresh))


def _mlp_and_optimizer(split: int) -> tuple[nn.Module, gp.ProxSGD]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    units = [[(model[0].weight, 0, i), (model[0].bias, 0, i)] for i in range(6)]
    # Same levels, group counts and shapes; only which units form the two blocks differs.
    blocks = [[m for u in units[:split] for m in u], [m for u in units[split:] for m in u]]
    h = gp.Hierarchy({"unit": units, "block": blocks}, names=model)
    opt = gp.ProxSGD(
        model.parameters(), lr=0.1, momentum=0.9, hierarchy=h,
        penalties={"unit": gp.GroupLasso(0.1), "block": gp.GroupLasso(0.1)},
    )  # fmt: skip
    return model, opt


def test_checkpoint_of_another_grouping_is_refused_before_loading():
    model, opt = _mlp_and_optimizer(split=3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    state = opt.state_dict()
    other_model, other = _mlp_and_optimizer(split=2)
    other_model(torch.randn(5, 4)).sum().backward()
    other.step()
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="another hierarchy"):
        other.load_state_dict(state)
    assert_identical(before, other.state_dict())


def test_checkpoint_of_another_model_size_is_refused():
    run = resume_run.build("sgd", "float32")
    torch.manual_seed(0)
    wider = gp.demo.resnet10(6, in_channels=1, num_classes=10)
    opt = gp.ProxSGD(
        wider.parameters(), lr=0.1, hierarchy=gp.hierarchy.resnet(wider),
        penalties={"base_level": gp.GroupLasso(0.0), "layer": gp.GroupLasso(0.0)},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"another hierarchy .*groups.*Rebuild the hierarchy"):
        opt.load_state_dict(run["opt"].state_dict())
