"""gp.hierarchy.from_module_tags: the earlier project's tagged models, and plain tagged modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

import group_prox as gp

from .seed_like import SeedLikeResNet


@pytest.fixture
def seed_model():
    torch.manual_seed(0)
    return SeedLikeResNet()


def test_seed_model_structure(seed_model):
    h = gp.hierarchy.from_module_tags(seed_model)
    assert h.level_names == ("base_level", "heels", "shortcut", "head", "layer", "block")
    convs = [m for m in seed_model.modules() if isinstance(m, nn.Conv2d)]
    assert h.num_groups("base_level") == sum(c.out_channels for c in convs)
    assert h.group_names("layer") == ("layers.0.0", "layers.0.1", "layers.1.0", "layers.1.1")
    assert h.group_names("block") == h.group_names("layer")
    assert h.group_names("shortcut") == ("layers.1.0.shortcut.0",)
    assert h.group_names("head") == ("fc",)
    # A filter: its conv weight row and its BatchNorm channel.
    assert h.group_sizes("base_level")[0] == 3 * 3 * 3 + 2
    block = seed_model.layers[1][0]
    branch = [block.conv1, block.bn1, block.conv2, block.bn2]
    assert h.group_sizes("layer")[2] == sum(p.numel() for m in branch for p in m.parameters())
    assert h.group_sizes("block")[2] == sum(p.numel() for p in block.parameters())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_zero_layer_group_leaves_the_shortcut(seed_model, mode):
    h = gp.hierarchy.from_module_tags(seed_model)
    gp.ProxSGD(
        seed_model.parameters(), lr=1.0, hierarchy=h, penalties={"layer": gp.GroupLasso(1e9)}
    ).step()
    block = seed_model.layers[1][0]
    seed_model.train(mode == "train")
    x = torch.randn(4, 8, 6, 6)
    torch.testing.assert_close(block(x), torch.relu(block.shortcut(x)), rtol=0, atol=0)
    assert gp.get_sparsity_report(seed_model, h).levels["layer"].zero_groups == 4


def test_plain_attributes_on_a_torchvision_resnet():
    model = resnet18(num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.param_groups = ["base_level"]
    model.layer1[0].param_groups = "layer"
    h = gp.hierarchy.from_module_tags(model)
    ref = gp.hierarchy.resnet(model)
    assert h.group_names("base_level") == ref.group_names("base_level")
    assert h.group_sizes("base_level") == ref.group_sizes("base_level")
    assert h.group_names("layer") == ("layer1.0",)
    assert h.group_sizes("layer") == [sum(p.numel() for p in model.layer1[0].parameters())]


def test_errors():
    with pytest.raises(TypeError, match=r"expected an nn\.Module"):
        gp.hierarchy.from_module_tags([1])
    with pytest.raises(ValueError, match="no module of the model has a `param_groups` tag"):
        gp.hierarchy.from_module_tags(nn.Sequential(nn.Linear(2, 2)))


def test_seed_config_trains_to_exact_zeros(seed_model):
    # The earlier project's README example, on the model it was written for.
    config = {
        "type": "hierarchical",
        "children": [
            {"groups": "base_level", "norm": "L2", "lambda": 0.001},
            {"groups": "layer", "norm": "L1", "lambda": 2.0},
        ],
    }
    h = gp.hierarchy.from_module_tags(seed_model)
    opt = gp.ProxSGD(
        seed_model.parameters(),
        lr=0.1,
        momentum=0.9,
        hierarchy=h,
        penalties=gp.from_config(config, h),
    )
    torch.manual_seed(1)
    x = torch.randn(64, 3, 8, 8)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long()
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(seed_model(x), y).backward()
        opt.step()
    report = opt.get_sparsity_report()
    assert report.levels["layer"].zero_groups >= 1
    for name in report.levels["layer"].zero_group_names:
        block = seed_model.get_submodule(name)
        assert all((m.weight == 0).all() for m in (block.conv1.module, block.bn2))
