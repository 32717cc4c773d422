"""The README's main job keeps its promise: exact zeros at good accuracy, quickly."""

from __future__ import annotations

from group_prox.demo import main, run_demo


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


def test_demo_cli_prints_report(capsys):
    assert main(["--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "Sparsity report" in out
