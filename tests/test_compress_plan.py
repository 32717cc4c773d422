"""Plans as plain data, layer surgery, and the dead-channel criterion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from group_prox.compression import CompressionPlan, ReplaceOp, SliceOp
from group_prox.compression.surgery import dead_channels, keep_inputs, keep_outputs, kept_indices


def test_plan_round_trips_through_plain_data():
    plan = CompressionPlan.of(
        [SliceOp("a.b", "out", (0, 2)), ReplaceOp("c", "resnet_shortcut", {"k": [1, 2]})]
    )
    data = plan.to_dict()
    assert CompressionPlan.from_dict(data) == plan
    assert len(plan + plan) == 4
    with pytest.raises(ValueError, match="format"):
        CompressionPlan.from_dict({"ops": []})
    with pytest.raises(ValueError, match="unknown plan operation"):
        CompressionPlan.from_dict({"format": data["format"], "ops": [{"op": "drop"}]})
    with pytest.raises(ValueError, match="side"):
        CompressionPlan.from_dict(
            {
                "format": data["format"],
                "ops": [{"op": "slice", "module": "a", "side": "up", "keep": [0]}],
            }
        )


def test_plan_errors_name_the_module_and_the_kind():
    model = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="'1'"):
        CompressionPlan.of([SliceOp("1", "out", (0,))]).apply(model)
    with pytest.raises(ValueError, match="unknown replacement kind 'nope'"):
        CompressionPlan.of([ReplaceOp("0", "nope")]).apply(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_slicing_keeps_values_dtype_and_grad_flags(dtype):
    conv = nn.Conv2d(4, 6, 3).to(dtype)
    conv.bias.requires_grad_(False)
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    keep_outputs(conv, [1, 4])
    keep_inputs(conv, [0, 3])
    assert conv.weight.shape == (2, 2, 3, 3) and conv.out_channels == 2 and conv.in_channels == 2
    assert torch.equal(conv.weight, w[[1, 4]][:, [0, 3]])
    assert torch.equal(conv.bias, b[[1, 4]])
    assert conv.weight.dtype == dtype and not conv.bias.requires_grad
    assert conv.weight.is_contiguous()

    bn = nn.BatchNorm1d(5)
    bn.running_mean.copy_(torch.arange(5.0))
    keep_outputs(bn, [0, 2])
    assert bn.num_features == 2 and bn.running_mean.tolist() == [0.0, 2.0]
    ln = nn.LayerNorm(5)
    keep_outputs(ln, [4])
    assert ln.normalized_shape == (1,) and ln.weight.shape == (1,)


def test_depthwise_conv_loses_inputs_and_outputs_together():
    dw = nn.Conv2d(6, 6, 3, groups=6)
    keep_outputs(dw, [0, 5])
    assert (dw.in_channels, dw.out_channels, dw.groups) == (2, 2, 2)
    keep_inputs(dw, [0, 1])  # already that size: nothing more to do
    assert dw.weight.shape == (2, 1, 3, 3)
    dw(torch.randn(1, 2, 5, 5))


def test_surgery_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="keep at least one"):
        keep_outputs(nn.Linear(2, 3), [], "fc")
    with pytest.raises(ValueError, match="increasing"):
        keep_outputs(nn.Linear(2, 3), [2, 1], "fc")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        keep_outputs(nn.Linear(2, 3), [3], "fc")
    with pytest.raises(TypeError, match="grouped"):
        keep_outputs(nn.Conv2d(4, 4, 1, groups=2), [0], "g")
    with pytest.raises(TypeError, match="ReLU"):
        keep_inputs(nn.ReLU(), [0], "act")


def test_dead_channel_criterion_follows_eval_batchnorm():
    conv = nn.Conv2d(1, 5, 1, bias=False)
    bn = nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.weight[1:4] = 0  # channels 1, 2, 3 have zero filters
        bn.running_mean.copy_(torch.tensor([0.0, 0.0, 2.0, 2.0, 0.0]))
        bn.weight.copy_(torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.3]))
    # 0: γ = β = 0 kills anything; 1: zero filter, μ = 0, β = 0; 2: zero filter but γμ ≠ 0;
    # 3: zero filter, γ = 0, β = 0; 4: live.
    assert dead_channels(conv, bn).tolist() == [True, True, False, True, False]
    out = bn(conv(torch.randn(2, 1, 3, 3)))
    assert (out[:, [0, 1, 3]] == 0).all() and (out[:, 2] != 0).all()


def test_kept_indices_rounds_up_with_dead_channels():
    dead = torch.tensor([True, False, True, True, False, True])
    assert kept_indices(dead) == [1, 4]
    assert kept_indices(dead, 4) == [0, 1, 2, 4]
    assert kept_indices(dead, 8) == list(range(6))
    assert kept_indices(torch.ones(3, dtype=torch.bool)) == [0]
