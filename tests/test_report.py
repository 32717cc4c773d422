"""SparsityReport: counts, text, dict and markdown."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import group_prox as gp
from group_prox.report import _strip


@pytest.fixture()
def sparse_model():
    torch.manual_seed(0)
    conv, bn, head = nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.Linear(6, 2)
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    h = gp.Hierarchy(
        {
            "base_level": {
                f"0[{i}]": [(conv.weight, 0, i), (bn.weight, 0, i), (bn.bias, 0, i)]
                for i in range(6)
            },
            "layer": {"first": [conv.weight, bn.weight, bn.bias]},
        },
        names=model,
    )
    with torch.no_grad():
        bn.bias.fill_(0.1)
        for i in (1, 4):
            conv.weight[i] = 0
            bn.weight[i] = 0
            bn.bias[i] = 0
        conv.weight[2, 0] = 0  # a partly zero filter is not a zero group
    return model, h


def test_counts(sparse_model):
    model, h = sparse_model
    r = gp.get_sparsity_report(model, h)
    base = r.levels["base_level"]
    assert (base.groups, base.zero_groups) == (6, 2)
    assert base.params == 6 * 20 and base.zero_params == 2 * 20
    assert base.zero_group_names == ["0[1]", "0[4]"]
    assert r.levels["layer"].zero_groups == 0
    assert r.total_params == sum(p.numel() for p in model.parameters())
    assert r.zero_params == 2 * 20 + 9
    assert r.structured_zero_params == 40
    conv_row = r.tensors[0]
    assert (conv_row.name, conv_row.module, conv_row.zero_units, conv_row.units) == (
        "0.weight",
        "0",
        2,
        6,
    )


def test_text_dict_markdown(sparse_model):
    model, h = sparse_model
    r = gp.get_sparsity_report(model, h)
    text = str(r)
    assert "█░██░█" in text
    assert "[first]" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    d = json.loads(json.dumps(r.to_dict()))
    assert d["levels"]["base_level"]["zero_groups"] == 2
    md = r.to_markdown()
    assert "| base_level | 6 | 2 (33.3%)" in md


def test_zero_branch_line():
    names = [f"layer1.{i}" for i in range(3)]
    from group_prox.report import _wrap_groups

    assert _wrap_groups(names, {"layer1.1"}) == ["  [layer1.0] ░ [layer1.2]"]


def test_strip_compression():
    assert _strip([False, True], 10) == "█░"
    long = [False] * 50 + [True] * 50 + [False, True] * 25
    s = _strip(long, 20)
    assert len(s) == 20 and s.startswith("█") and "░" in s and s.endswith("▒")


def test_report_argument_types(sparse_model):
    model, h = sparse_model
    with pytest.raises(TypeError, match=r"nn\.Module"):
        gp.get_sparsity_report(h, model)
    with pytest.raises(TypeError, match="Hierarchy"):
        gp.get_sparsity_report(model, {})
