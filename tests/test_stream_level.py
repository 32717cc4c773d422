"""gp.hierarchy.resnet(model, stream=True): the residual-stream channel level of torchvision ResNets.

A stream group is filter ``c`` (with its BatchNorm channel) of every layer writing channel ``c``
of one stream segment; once it is zero, compress removes the channel from every writer and reader.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock, ResNet

import group_prox as gp
from group_prox.compression.report import count_params
from group_prox.demo import resnet10
from group_prox.families.torchvision_resnet import BlockShortcut, stream_levels
from tests.family_helpers import randomise_bn, zero_members


def zero_group(model: nn.Module, level: str, group: str) -> None:
    """Zero the members of one group as the level spec lists them."""
    zero_members(stream_levels(model, "test")[level][group])


def r18() -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(resnet18(num_classes=10), torch.Generator().manual_seed(0))


def r10() -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(resnet10(width=8), torch.Generator().manual_seed(0))


def filter_size(conv: nn.Conv2d) -> int:
    return conv.weight[0].numel() + 2  # + BatchNorm γ, β (torchvision convs have no bias)


# ---------------------------------------------------------------------------------- structure


def test_resnet18_stream_level_structure():
    model = r18()
    plain = gp.hierarchy.resnet(model)
    h = gp.hierarchy.resnet(model, stream=True)
    assert h.level_names == ("base_level", "layer", "stream")
    assert h.group_names("base_level") == plain.group_names("base_level")
    assert h.group_names("layer") == plain.group_names("layer")
    widths = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    assert h.group_names("stream") == tuple(
        f"{s}.stream[{c}]" for s, w in widths.items() for c in range(w)
    )
    size = dict(zip(h.group_names("stream"), h.group_sizes("stream")))
    # the stem and both blocks' conv2 write the first stream; a downsample and conv2s the others
    assert size["layer1.stream[0]"] == filter_size(model.conv1) + 2 * filter_size(
        model.layer1[0].conv2
    )
    assert size["layer2.stream[5]"] == filter_size(model.layer2[0].downsample[0]) + 2 * (
        filter_size(model.layer2[0].conv2)
    )
    # a branch group is the branch without its last conv + BatchNorm, which are stream writers
    layer = dict(zip(h.group_names("layer"), h.group_sizes("layer")))
    block = model.layer2[1]
    assert layer["layer2.1"] == sum(
        p.numel() for p in [*block.conv1.parameters(), *block.bn1.parameters()]
    )
    # the levels form a tree: every base filter lies in exactly one layer or stream group
    base, lay, st = (h.atom_group(lv) for lv in h.level_names)
    assert ((base >= 0) == ((lay >= 0) ^ (st >= 0))).all()


def test_resnet50_bottleneck_stream_level_structure():
    model = resnet50()
    h = gp.hierarchy.resnet(model, stream=True)
    # the stem output (read by layer1.0's conv1 and downsample only) is no stream
    assert h.num_groups("stream") == 256 + 512 + 1024 + 2048
    assert h.group_names("stream")[0] == "layer1.stream[0]"
    size = dict(zip(h.group_names("stream"), h.group_sizes("stream")))
    assert size["layer1.stream[0]"] == filter_size(model.layer1[0].downsample[0]) + 3 * (
        filter_size(model.layer1[0].conv3)
    )
    block = model.layer3[2]
    inner = [*block.conv1.parameters(), *block.bn1.parameters(), *block.conv2.parameters()]
    inner += list(block.bn2.parameters())
    layer = dict(zip(h.group_names("layer"), h.group_sizes("layer")))
    assert layer["layer3.2"] == sum(p.numel() for p in inner)


def test_default_is_unchanged():
    model = r10()
    h = gp.hierarchy.resnet(model)
    assert h.level_names == ("base_level", "layer")
    assert h.signature() == gp.hierarchy.resnet(model, stream=False).signature()


# ---------------------------------------------------------------------------------- compression


@pytest.mark.parametrize(
    ("model_fn", "size", "group", "writers", "readers"),
    [
        (
            r18,
            32,
            "layer2.stream[5]",
            ["layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2"],
            ["layer2.1.conv1", "layer3.0.conv1", "layer3.0.downsample.0"],
        ),
        (
            r18,
            32,
            "layer1.stream[0]",
            ["conv1", "layer1.0.conv2", "layer1.1.conv2"],
            ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"],
        ),
        (
            r10,
            8,
            "layer4.stream[3]",
            ["layer4.0.downsample.0", "layer4.0.conv2"],
            ["fc"],
        ),
        (
            r10,
            8,
            "layer1.stream[2]",
            ["conv1", "layer1.0.conv2"],
            ["layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0"],
        ),
    ],
)
def test_zero_stream_group_is_removed_by_compress(model_fn, size, group, writers, readers):
    model = model_fn()
    h = gp.hierarchy.resnet(model, stream=True)
    x = torch.randn(2, 3, size, size)
    assert len(gp.compress(model, h, example_inputs=x).group_prox_plan) == 0

    zero_group(model, "stream", group)
    rep = gp.get_sparsity_report(model, h)
    assert rep.levels["stream"].zero_group_names == [group]
    assert rep.levels["stream"].zero_groups == 1

    small = gp.compress(model, h, example_inputs=x)  # also checks the outputs
    mods = dict(model.named_modules())
    group_size = h.group_sizes("stream")[h.group_names("stream").index(group)]
    assert group_size == sum(filter_size(mods[w]) for w in writers)
    expected = group_size + sum(mods[r].weight[:, 0].numel() for r in readers)
    assert count_params(model) - count_params(small) == expected
    assert gp.removable(model, h).params_left == count_params(small)
    small_mods = dict(small.named_modules())
    for w in writers:
        assert small_mods[w].out_channels == mods[w].out_channels - 1
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_zero_branch_interior_then_last_filters_removes_the_block():
    model = r10()
    h = gp.hierarchy.resnet(model, stream=True)
    x = torch.randn(2, 3, 8, 8)
    zero_group(model, "layer", "layer3.0")
    small = gp.compress(model, h, example_inputs=x)
    assert small.layer3[0].conv1.out_channels == 1  # the dead interior shrinks to one channel
    for c in range(model.layer3[0].conv2.out_channels):
        zero_group(model, "base_level", f"layer3.0.conv2[{c}]")
    small = gp.compress(model, h, example_inputs=x)
    assert isinstance(small.layer3[0], BlockShortcut)


def test_compressing_twice_past_a_shortcut_with_downsample():
    model = r10()
    h = gp.hierarchy.resnet(model, stream=True)
    x = torch.randn(2, 3, 8, 8)
    zero_group(model, "layer", "layer2.0")
    for c in range(model.layer2[0].conv2.out_channels):
        zero_group(model, "base_level", f"layer2.0.conv2[{c}]")
    small = gp.compress(model, h, example_inputs=x)
    assert isinstance(small.layer2[0], BlockShortcut)
    # the shortcut's downsample still starts the layer2 stream: compress again, then a new zero
    h_small = gp.hierarchy.resnet(small, stream=True)
    again = gp.compress(small, h_small, example_inputs=x)  # raised before: segments mixed up
    assert count_params(again) == count_params(small)
    zero_group(small, "stream", "layer3.stream[1]")
    smaller = gp.compress(small, h_small, example_inputs=x)
    assert smaller.layer3[0].conv2.out_channels == small.layer3[0].conv2.out_channels - 1


# ---------------------------------------------------------------------------------- training


def test_proxsgd_with_three_levels_zeroes_a_stream_channel():
    model = r10().train()
    h = gp.hierarchy.resnet(model, stream=True)
    target = "layer3.stream[7]"
    opt = gp.ProxSGD(
        model.parameters(), lr=0.05, hierarchy=h,
        penalties={
            "base_level": gp.GroupLasso(1e-4),
            "layer": gp.GroupLasso(1e-4),
            "stream": gp.GroupLasso(1e3, groups=[target]),
        },
    )  # fmt: skip
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    rep = gp.get_sparsity_report(model, h)
    assert rep.levels["stream"].zero_group_names == [target]
    assert "stream" in str(rep) and "stream" in rep.to_markdown()
    assert rep.to_dict()["levels"]["stream"]["zero_groups"] == 1
    before = count_params(model)
    model.eval()
    small = gp.compress(model, h, example_inputs=x)
    assert small.layer3[0].conv2.out_channels == model.layer3[0].conv2.out_channels - 1
    assert (
        before - count_params(small)
        >= h.group_sizes("stream")[h.group_names("stream").index(target)]
    )


def test_frozen_stem_refuses_a_partly_frozen_stream_group():
    model = r10()
    model.conv1.requires_grad_(False)
    model.bn1.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'layer1\.stream\[0\]' of level 'stream' is partly"):
        gp.hierarchy.resnet(model, stream=True)
    h = gp.hierarchy.resnet(model, stream=True, include_frozen=True)
    assert h.num_groups("stream") == 8 + 16 + 32 + 64


# ---------------------------------------------------------------------------------- refusals


def test_blocks_outside_a_torchvision_resnet_refuse_stream():
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), BasicBlock(8, 8))
    gp.hierarchy.resnet(seq)  # without the stream level it is fine
    with pytest.raises(ValueError, match=r"not a torchvision\.models\.ResNet.*stream=False"):
        gp.hierarchy.resnet(seq, stream=True)

    class Custom(ResNet):
        def forward(self, x):
            return super().forward(x)

    with pytest.raises(ValueError, match=r"overrides ResNet\.forward.*keeps ResNet\.forward"):
        gp.hierarchy.resnet(Custom(BasicBlock, [1, 1, 1, 1]), stream=True)


def test_unknown_downsample_refuses_stream():
    model = resnet10(width=8)
    ds = model.layer2[0].downsample
    model.layer2[0].downsample = nn.Sequential(nn.Identity(), *ds)
    with pytest.raises(ValueError, match=r"downsample other than Sequential.*stream=False"):
        gp.hierarchy.resnet(model, stream=True)


def test_stream_must_be_a_bool():
    with pytest.raises(TypeError, match="stream must be True or False"):
        gp.hierarchy.resnet(r10(), stream="yes")


def test_not_a_resnet_at_all():
    with pytest.raises(ValueError, match=r"none of torchvision ResNet blocks"):
        gp.hierarchy.resnet(nn.Sequential(nn.Conv2d(3, 4, 3)), stream=True)


def test_timm_resnet_refuses_stream():
    pytest.importorskip("timm")
    from timm.models.resnet import BasicBlock as TimmBasic
    from timm.models.resnet import ResNet as TimmResNet

    model = TimmResNet(TimmBasic, [1, 1, 1, 1], num_classes=10, stem_width=8)
    gp.hierarchy.resnet(model)
    with pytest.raises(
        ValueError, match=r"timm ResNet blocks.*only built for torchvision.*stream=False"
    ):
        gp.hierarchy.resnet(model, stream=True)
