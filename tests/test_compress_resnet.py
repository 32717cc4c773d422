"""Compression of ResNets: exact equivalence, residual streams, saving as plain data."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock

import group_prox as gp
from group_prox.compression.resnet import BlockShortcut
from group_prox.demo import digits_resnet18
from group_prox.families.torchvision_resnet import conv_bn_pairs
from tests.family_helpers import randomise_bn


def kill_filters(model: nn.Module, fraction: float, gen: torch.Generator) -> None:
    """Zero a random fraction of (filter, γ, β) triples, as a group lasso on filters does."""
    with torch.no_grad():
        for _, conv, bn in conv_bn_pairs(model):
            dead = torch.rand(conv.out_channels, generator=gen) < fraction
            conv.weight[dead] = 0
            bn.weight[dead] = 0
            bn.bias[dead] = 0


def kill_branch(block: nn.Module) -> None:
    with torch.no_grad():
        for name, p in block.named_parameters():
            if not name.startswith("downsample"):
                p.zero_()


def sparse(model_fn, seed=0, fraction=0.6, branches=("layer2.1",), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = model_fn().to(dtype)
    randomise_bn(model, gen)
    kill_filters(model, fraction, gen)
    for b in branches:
        kill_branch(model.get_submodule(b))
    return model.eval()


def assert_same(model, small, x, rtol=1e-5, atol=1e-6):
    model.eval(), small.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    ("model_fn", "size", "branches"),
    [
        (digits_resnet18, 8, ("layer2.1", "layer3.0")),
        (resnet18, 32, ("layer1.0",)),
        (resnet50, 32, ("layer2.0", "layer3.2")),
    ],
)
def test_compressed_resnet_computes_the_same_function(model_fn, size, branches):
    model = sparse(model_fn, branches=branches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, size, size)
    small = gp.compress(model, gp.hierarchy.resnet(model), example_inputs=x)
    assert_same(model, small, x)
    for b in branches:
        assert isinstance(small.get_submodule(b), BlockShortcut)
    removed = 1 - gp.compression.report.count_params(small) / gp.compression.report.count_params(
        model
    )
    assert removed > 0.5
    # the input model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_float64_equivalence_is_tighter():
    model = sparse(digits_resnet18, seed=3, dtype=torch.float64)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    small = gp.compress(model, example_inputs=x)
    assert_same(model, small, x, rtol=1e-12, atol=1e-13)


def test_stream_channel_goes_only_when_dead_on_every_path_into_it():
    model = resnet18(num_classes=10)
    randomise_bn(model, torch.Generator().manual_seed(1))
    writers = [(model.conv1, model.bn1), (model.layer1[0].conv2, model.layer1[0].bn2)]
    writers.append((model.layer1[1].conv2, model.layer1[1].bn2))
    with torch.no_grad():
        for conv, bn in writers:  # channel 5: dead in the stem and in both blocks
            conv.weight[5], bn.weight[5], bn.bias[5] = 0, 0, 0
        for conv, bn in writers[:2]:  # channel 7: alive in layer1.1's branch
            conv.weight[7], bn.weight[7], bn.bias[7] = 0, 0, 0
    model.eval()
    small = gp.compress(model)
    assert small.conv1.out_channels == 63
    assert small.layer1[1].conv2.out_channels == 63
    assert small.layer1[0].conv1.in_channels == 63
    assert small.layer2[0].conv1.in_channels == 63
    assert small.layer2[0].downsample[0].in_channels == 63
    assert_same(model, small, torch.randn(2, 3, 32, 32))


def test_dead_branch_with_downsample_keeps_its_shortcut_path():
    model = sparse(resnet18, fraction=0.0, branches=("layer3.0",))
    small = gp.compress(model)
    block = small.layer3[0]
    assert isinstance(block, BlockShortcut) and block.downsample is not None
    assert "layer3.0.downsample.0.weight" in small.state_dict()
    assert_same(model, small, torch.randn(2, 3, 32, 32))


def test_channels_inside_a_branch_are_removed():
    model = sparse(resnet50, fraction=0.0, branches=())
    with torch.no_grad():
        for i in (0, 3, 4):
            b = model.layer1[0]
            b.conv2.weight[i], b.bn2.weight[i], b.bn2.bias[i] = 0, 0, 0
    small = gp.compress(model)
    assert small.layer1[0].conv2.out_channels == 61
    assert small.layer1[0].bn2.num_features == 61
    assert small.layer1[0].conv3.in_channels == 61
    assert_same(model, small, torch.randn(2, 3, 32, 32))


def test_blocks_outside_a_torchvision_resnet_lose_branches_and_inner_channels_only():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), BasicBlock(16, 16), BasicBlock(16, 16), nn.Flatten()
    )
    randomise_bn(model, torch.Generator().manual_seed(0))
    kill_branch(model[2])
    with torch.no_grad():
        b = model[1]
        for i in range(8):  # inner channels 0..7, and stream channels 0..7 of block 1's output
            b.conv1.weight[i], b.bn1.weight[i], b.bn1.bias[i] = 0, 0, 0
            b.conv2.weight[i], b.bn2.weight[i], b.bn2.bias[i] = 0, 0, 0
    model.eval()
    small = gp.compress(model)
    assert isinstance(small[2], BlockShortcut)
    assert small[1].conv1.out_channels == 8
    assert small[1].conv2.out_channels == 16  # stream readers are unknown here: stays
    assert_same(model, small, torch.randn(2, 3, 8, 8))


def test_multiple_rounds_widths_up_with_exact_zeros():
    model = sparse(digits_resnet18, seed=2, fraction=0.55)
    x = torch.randn(4, 3, 8, 8)
    small = gp.compress(model, multiple=8, example_inputs=x)
    for m in small.modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels % 8 == 0 or m.out_channels == 64
    assert_same(model, small, x)


def test_nothing_dead_means_nothing_changes():
    model = resnet18().eval()
    small = gp.compress(model)
    assert len(small.group_prox_plan) == 0
    assert gp.compression.report.count_params(small) == gp.compression.report.count_params(model)


def test_save_and_load_use_plain_data_only():
    model = sparse(digits_resnet18, seed=4)
    small = gp.compress(model)
    buf = io.BytesIO()
    gp.save_compressed(small, buf)
    buf.seek(0)
    raw = torch.load(buf, weights_only=True)  # no pickled modules or classes
    assert raw["plan"]["ops"][0]["op"] in ("slice", "replace")
    buf.seek(0)
    loaded = gp.load_compressed(digits_resnet18, buf)
    x = torch.randn(3, 3, 8, 8)
    assert_same(small, loaded, x, rtol=0, atol=0)
    # the loaded model can be saved again, and the instance form of model_fn works
    buf2 = io.BytesIO()
    gp.save_compressed(loaded, buf2)
    buf2.seek(0)
    again = gp.load_compressed(digits_resnet18(), buf2)
    assert_same(small, again, x, rtol=0, atol=0)


def test_compressing_twice_composes_the_plans():
    model = sparse(digits_resnet18, seed=5, fraction=0.3, branches=())
    small = gp.compress(model)
    with torch.no_grad():  # more zeros appear after further training
        small.layer4[1].conv1.weight[:3] = 0
        small.layer4[1].bn1.weight[:3] = 0
        small.layer4[1].bn1.bias[:3] = 0
    smaller = gp.compress(small)
    assert len(smaller.group_prox_plan) > len(small.group_prox_plan)
    buf = io.BytesIO()
    gp.save_compressed(smaller, buf)
    buf.seek(0)
    loaded = gp.load_compressed(digits_resnet18, buf)
    assert_same(smaller, loaded, torch.randn(2, 3, 8, 8), rtol=0, atol=0)


def test_compressed_model_trains_compiles_and_exports():
    model = sparse(digits_resnet18, seed=6)
    small = gp.compress(model)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    # an ordinary module: it can keep training, with group_prox too
    small.train()
    opt = gp.ProxSGD(
        small.parameters(),
        lr=0.01,
        hierarchy=gp.hierarchy.resnet(small),
        penalties={"base_level": gp.GroupLasso(1e-4)},
    )
    nn.functional.cross_entropy(small(x), y).backward()
    opt.step()
    small.eval()
    exported = torch.export.export(small, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), small(x))
        compiled = torch.compile(small, backend="eager")
        torch.testing.assert_close(compiled(x), small(x))


def test_errors_name_what_to_change():
    model = sparse(digits_resnet18)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        gp.compress("model")
    with pytest.raises(ValueError, match="multiple"):
        gp.compress(model, multiple=0)
    other = digits_resnet18()
    with pytest.raises(ValueError, match="not a parameter of this model"):
        gp.compress(model, gp.hierarchy.resnet(other))
    with pytest.raises(ValueError, match="group_prox_plan"):
        gp.save_compressed(model, io.BytesIO())
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(1)}, buf)
    buf.seek(0)
    with pytest.raises(ValueError, match="save_compressed"):
        gp.load_compressed(digits_resnet18, buf)
    buf = io.BytesIO()
    gp.save_compressed(gp.compress(model), buf)
    buf.seek(0)
    with pytest.raises(ValueError, match="architecture"):
        gp.load_compressed(lambda: nn.Sequential(nn.Linear(2, 2)), buf)


def test_report_counts_params_flops_and_time():
    model = sparse(digits_resnet18, seed=7)
    small = gp.compress(model)
    x = torch.randn(2, 3, 8, 8)
    rep = gp.compression_report(model, small, x, runs=3, warmup=1)
    assert rep.params_after < rep.params_before
    assert rep.flops_ratio > 1.5
    assert rep.max_abs_diff < 1e-5
    assert rep.batch_size == 2 and rep.runs == 3
    assert "parameters" in str(rep) and "| FLOPs |" in rep.to_markdown()
    assert rep.to_dict()["speedup"] == pytest.approx(rep.speedup)
    assert model.training is False and small.training is False
