"""gp.hierarchy.resnet on torchvision ResNets: structure, exact zeros in train and eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50

import group_prox as gp
from group_prox.demo import digits_resnet18


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return resnet18(num_classes=10)


def test_resnet18_structure(r18):
    h = gp.hierarchy.resnet(r18)
    convs = [m for m in r18.modules() if isinstance(m, nn.Conv2d)]
    assert h.num_groups("base_level") == sum(c.out_channels for c in convs)
    assert h.group_names("layer") == tuple(f"layer{s}.{b}" for s in range(1, 5) for b in range(2))
    # a filter group: conv filter + BN gamma + BN beta
    assert h.group_sizes("base_level")[0] == 3 * 7 * 7 + 2
    assert "layer1.0.conv1[0]" in h.group_names("base_level")
    # the fc layer is not penalised; the shortcut is not part of a branch
    names = {lay.name for lay in h.tensors}
    assert "fc.weight" not in names
    branch = r18.layer2[0]
    expected = sum(
        p.numel() for n, p in branch.named_parameters() if not n.startswith("downsample")
    )
    assert h.group_sizes("layer")[2] == expected


def test_resnet50_bottleneck_structure():
    model = resnet50()
    h = gp.hierarchy.resnet(model)
    assert h.num_groups("layer") == 16
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert h.num_groups("base_level") == sum(c.out_channels for c in convs)


def test_not_a_resnet():
    with pytest.raises(ValueError, match=r"none of torchvision ResNet blocks.*hierarchy\.auto"):
        gp.hierarchy.resnet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_a_refusal_names_the_builder_that_applies():
    encoder = nn.TransformerEncoderLayer(8, 2, 16)
    with pytest.raises(ValueError, match=r"use group_prox\.hierarchy\.transformer\(model\)"):
        gp.hierarchy.resnet(encoder)
    with pytest.raises(ValueError, match=r"use group_prox\.hierarchy\.resnet\(model\)"):
        gp.hierarchy.transformer(digits_resnet18())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_zero_filter_gives_exactly_zero_channel(mode):
    torch.manual_seed(0)
    model = digits_resnet18()
    h = gp.hierarchy.resnet(model)
    # Kill filter 5 of layer1.0.conv1 through the prox (a huge λ on a one-group level).
    conv, bn = model.layer1[0].conv1, model.layer1[0].bn1
    h_one = gp.Hierarchy({"one": [[(conv.weight, 0, 5), (bn.weight, 0, 5), (bn.bias, 0, 5)]]})
    gp.ProxSGD(
        model.parameters(), lr=1.0, hierarchy=h_one, penalties={"one": gp.GroupLasso(1e6)}
    ).step()
    outputs = {}
    bn.register_forward_hook(lambda m, i, o: outputs.setdefault("bn", o))
    model.train(mode == "train")
    model(torch.randn(8, 3, 8, 8))
    assert torch.equal(outputs["bn"][:, 5], torch.zeros_like(outputs["bn"][:, 5]))
    report = gp.get_sparsity_report(model, h)
    assert report.levels["base_level"].zero_groups == 1
    assert report.levels["base_level"].zero_group_names == ["layer1.0.conv1[5]"]


def test_zero_branch_makes_block_its_shortcut():
    torch.manual_seed(0)
    model = digits_resnet18()
    h = gp.hierarchy.resnet(model)
    opt = gp.ProxSGD(
        model.parameters(), lr=1.0, hierarchy=h, penalties={"layer": gp.GroupLasso(0.0)}
    )
    opt.penalties["layer"].lam = 1e6
    opt.step()  # no gradients: the prox alone zeroes every branch
    block = model.layer2[0]
    model.eval()
    x = torch.randn(4, 64, 8, 8)
    torch.testing.assert_close(block(x), torch.relu(block.downsample(x)), rtol=0, atol=0)
    report = gp.get_sparsity_report(model, h)
    assert report.levels["layer"].zero_groups == 8
    assert block.downsample[0].weight.abs().sum() > 0 and block.downsample[1].weight.abs().sum() > 0
