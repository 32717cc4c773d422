"""The README's main job keeps its promise: exact zeros at good accuracy, quickly."""

from __future__ import annotations

import pytest
import torch

import group_prox as gp
from group_prox.demo import evaluate, main, run_demo


def test_demo_meets_its_targets():
    result = run_demo(progress=False)
    levels = result.report.levels
    assert result.accuracy >= 0.90
    assert levels["layer"].zero_groups >= 1
    assert levels["base_level"].group_fraction >= 0.30
    # zero groups are exactly zero tensors, not small ones
    for name in levels["layer"].zero_group_names:
        block = result.model.get_submodule(name)
        assert all(
            (p == 0).all() for n, p in block.named_parameters() if not n.startswith("downsample")
        )

    # compression keeps the function and removes what the demo promises
    small = gp.compress(result.model, result.hierarchy)
    assert evaluate(small, result.x_test, result.y_test) == result.accuracy
    with torch.no_grad():
        torch.testing.assert_close(small(result.x_test), result.model(result.x_test))
    rep = gp.compression_report(result.model, small, result.x_test[:64], runs=3, warmup=1)
    assert rep.params_removed >= 0.5


def test_demo_cli_prints_report(capsys):
    assert main(["--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "Sparsity report" in out
    assert "Compression report" in out and "latency (batch 64)" in out


def test_demo_with_sparsity_targets():
    result = run_demo(epochs=4, targets={"base_level": 0.5, "layer": 0.25}, progress=False)
    levels = result.report.levels
    assert levels["base_level"].group_fraction == pytest.approx(0.5, abs=0.01)
    assert levels["layer"].zero_groups == 2  # of resnet18's 8 branches
    assert result.accuracy > 0.9
