"""timm families: ResNet blocks, ViT blocks and ConvNeXt blocks (levels, compression, files)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm")

import group_prox as gp  # noqa: E402
from group_prox.families import timm_resnet  # noqa: E402
from tests.family_helpers import train_steps, zero_members  # noqa: E402


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and trained-looking BatchNorms, so no default value hides a wrong group."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval(), b.eval()
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


def roundtrip(small: nn.Module, model_fn) -> nn.Module:
    buf = io.BytesIO()
    gp.save_compressed(small, buf)
    buf.seek(0)
    return gp.load_compressed(model_fn, buf)


# --------------------------------------------------------------------------------------------
# ResNet


def small_resnet(kind: str = "basic") -> nn.Module:
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    if kind == "basic":
        model = ResNet(
            BasicBlock, [1, 2, 1, 1], num_classes=10, stem_width=8, channels=(8, 16, 16, 32)
        )
    else:  # Bottleneck, deep stem, average-pool downsample, squeeze-excitation
        model = ResNet(
            Bottleneck, [1, 2, 1, 1], num_classes=10, stem_width=8, stem_type="deep",
            avg_down=True, channels=(4, 8, 8, 8), block_args={"attn_layer": "se"},
        )  # fmt: skip
    return randomise(model).double()


def resnet_fn(kind: str):
    return lambda: small_resnet(kind).double()


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_timm_resnet_levels_count_filters_and_branches(kind):
    model = small_resnet(kind)
    h = gp.hierarchy.resnet(model)
    blocks = [
        n for n, m in model.named_modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")
    ]
    assert set(h.group_names("layer")) == set(blocks)
    branch = [
        f"{b}.conv{i}"
        for b in blocks
        for i in (1, 2, 3)
        if hasattr(model.get_submodule(b), f"conv{i}")
    ]
    convs = {
        n: m.out_channels
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and (".se." not in n)
    }
    assert all(b in convs for b in branch)
    assert h.num_groups("base_level") == sum(convs.values())
    assert "layer1.0.conv1[0]" in h.group_names("base_level")
    assert not any(".se." in g for g in h.group_names("base_level"))


def kill_resnet(model: nn.Module, kind: str) -> tuple[list[str], list[str]]:
    """Zero two filters of every inner branch conv and the whole branch of layer2.1."""
    lv = timm_resnet.levels(model)
    inner = ["conv1"] if kind == "basic" else ["conv1", "conv2"]
    killed = [
        f"{b}.{c}[{i}]" for b in lv["layer"] if b != "layer2.1" for c in inner for i in (0, 2)
    ]
    for g in killed:
        zero_members(lv["base_level"][g])
    zero_members(lv["layer"]["layer2.1"])
    return killed, ["layer2.1"]


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_timm_resnet_compress_dead_filters_and_branch(kind):
    model = small_resnet(kind).eval()
    lv = timm_resnet.levels(model)
    killed, _ = kill_resnet(model, kind)
    dead = sum(
        (t.numel() if isinstance(t, torch.Tensor) else t[0].select(t[1], 0).numel())
        for g in killed
        for t in lv["base_level"][g]
    )
    dead += sum(p.numel() for p in lv["layer"]["layer2.1"])
    small = gp.compress(model)
    assert isinstance(small.layer2[1], timm_resnet.TimmBlockShortcut)
    # Zero filters also remove their inputs in the next conv: more goes than was zeroed.
    assert num_params(model) - num_params(small) >= 0.9 * dead
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert max_diff(model, small, x) <= 1e-10
    loaded = roundtrip(small, resnet_fn(kind))
    assert max_diff(small, loaded, x) == 0
    assert set(loaded.state_dict()) == set(small.state_dict())


def test_timm_resnet_training_makes_zero_groups_and_skips_frozen():
    torch.manual_seed(0)
    model = small_resnet("basic").float()
    model.conv1.requires_grad_(False)
    model.bn1.requires_grad_(False)
    h = gp.hierarchy.resnet(model)
    assert not any(g.startswith("conv1[") for g in h.group_names("base_level"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = gp.ProxSGD(
        trainable, lr=0.1, hierarchy=h,
        penalties={"base_level": gp.GroupLasso(20.0), "layer": gp.GroupLasso(0.0)},
    )  # fmt: skip
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train_steps(opt, lambda: F.cross_entropy(model(x), y), 3)
    zero = gp.get_sparsity_report(model, h).levels["base_level"].zero_group_names
    assert len(zero) > 0
    small = gp.compress(model, h, example_inputs=x)
    assert num_params(small) < num_params(model)


# --------------------------------------------------------------------------------------------
# Vision Transformer

E, HEADS, HIDDEN, DEPTH = 64, 4, 128, 2


def small_vit(**kw) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    config = dict(
        img_size=32, patch_size=8, embed_dim=E, depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0,
        num_classes=10, qkv_bias=True, init_values=0.5,
    )  # fmt: skip
    return randomise(VisionTransformer(**{**config, **kw})).double()


def test_timm_vit_levels_count_heads_neurons_and_sublayers():
    model = small_vit()
    h = gp.hierarchy.transformer(model)
    names = h.group_names("base_level")
    assert sum(".attn.head[" in g for g in names) == DEPTH * HEADS
    assert sum(".mlp[" in g for g in names) == DEPTH * HIDDEN
    assert set(h.group_names("layer")) == {
        f"blocks.{i}.{s}" for i in range(DEPTH) for s in ("attn", "mlp")
    }
    # The pre-norm and the LayerScale belong to their sublayer.
    layer = dict(zip(h.group_names("layer"), h.groups("layer")))
    sizes = {tuple(t.shape) for t in layer["blocks.0.attn"]}
    assert (3 * E, E) in sizes and (E,) in sizes


def kill_vit(model: nn.Module) -> list[str]:
    lv = gp.families.timm_vit.levels(model)
    killed = ["blocks.0.attn.head[1]", "blocks.0.attn.head[3]"]
    killed += [f"blocks.{b}.mlp[{i}]" for b in range(DEPTH) for i in range(0, HIDDEN, 2)]
    for g in killed:
        zero_members(lv["base_level"][g])
    zero_members(lv["layer"]["blocks.1.attn"])
    with torch.no_grad():
        model.blocks[0].ls2.gamma.zero_()  # a zero LayerScale kills the whole MLP sublayer
    return killed


@pytest.mark.parametrize("qk_norm", [False, True])
def test_timm_vit_compress_heads_neurons_and_sublayers(qk_norm):
    model = small_vit(qk_norm=qk_norm).eval()
    lv = gp.families.timm_vit.levels(model)
    killed = kill_vit(model)
    zeroed = {id(t) if isinstance(t, torch.Tensor) else (id(t[0]), t[1], str(t[2])): t
              for g in killed for t in lv["base_level"][g]}  # fmt: skip
    dead = sum(t[0].narrow(t[1], t[2].start, t[2].stop - t[2].start).numel()
               if isinstance(t[2], slice) else t[0].select(t[1], t[2]).numel()
               for t in zeroed.values())  # fmt: skip
    dead += sum(p.numel() for p in lv["layer"]["blocks.1.attn"])
    small = gp.compress(model)
    assert isinstance(small.blocks[1], gp.families.timm_vit.CompressedTimmBlock)
    assert small.blocks[1].removed == ("attn",)
    assert small.blocks[0].removed == ("mlp",)
    assert small.blocks[0].attn.num_heads == HEADS - 2
    assert small.blocks[1].mlp.fc1.out_features == HIDDEN // 2
    assert num_params(model) - num_params(small) >= 0.9 * dead
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert max_diff(model, small, x) <= 1e-10
    loaded = roundtrip(small, lambda: small_vit(qk_norm=qk_norm))
    assert max_diff(small, loaded, x) == 0
    small.blocks[0].attn.fused_attn = model.blocks[0].attn.fused_attn = False  # manual path too
    assert max_diff(model, small, x) <= 1e-10
    # Compressing the compressed model again composes (nothing more to remove here).
    again = gp.compress(small)
    assert num_params(again) == num_params(small)


def test_timm_vit_training_makes_zero_groups_and_skips_frozen():
    torch.manual_seed(0)
    model = small_vit().float()
    model.patch_embed.requires_grad_(False)
    model.blocks[0].requires_grad_(False)
    h = gp.hierarchy.transformer(model)
    assert not any(g.startswith("blocks.0.") for g in h.group_names("base_level"))
    assert set(h.group_names("layer")) == {"blocks.1.attn", "blocks.1.mlp"}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = gp.ProxAdam(
        trainable, lr=1e-2, hierarchy=h,
        penalties={"base_level": gp.GroupLasso(500.0), "layer": gp.GroupLasso(0.0)},
    )  # fmt: skip
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train_steps(opt, lambda: F.cross_entropy(model(x), y), 3)
    zero = gp.get_sparsity_report(model, h).levels["base_level"].zero_group_names
    assert len(zero) > 0
    small = gp.compress(model, h, example_inputs=x)
    assert num_params(small) < num_params(model)


# --------------------------------------------------------------------------------------------
# ConvNeXt

DIMS = (8, 16, 16, 32)


def small_convnext(conv_mlp: bool = False) -> nn.Module:
    from timm.models.convnext import ConvNeXt

    model = ConvNeXt(
        depths=(1, 2, 1, 1), dims=DIMS, num_classes=10, ls_init_value=0.5, conv_mlp=conv_mlp
    )
    return randomise(model).double()


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_timm_convnext_levels_and_compression(conv_mlp):
    model = small_convnext(conv_mlp).eval()
    h = gp.hierarchy.resnet(model)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "ConvNeXtBlock"]
    assert set(h.group_names("layer")) == set(blocks)
    assert h.num_groups("base_level") == 4 * (DIMS[0] + 2 * DIMS[1] + DIMS[2] + DIMS[3])
    lv = gp.families.timm_convnext.levels(model)
    killed = [f"{b}.mlp[{i}]" for b in blocks for i in range(0, 4 * DIMS[0], 2)]
    for g in killed:
        zero_members(lv["base_level"][g])
    zero_members(lv["layer"]["stages.1.blocks.1"])
    dead = 2 * len(killed) * model.stages[0].blocks[0].mlp.fc1.weight[0].numel() + len(killed)
    dead += sum(p.numel() for p in lv["layer"]["stages.1.blocks.1"])
    small = gp.compress(model)
    assert isinstance(small.stages[1].blocks[1], gp.families.timm_convnext.ConvNeXtShortcut)
    assert num_params(model) - num_params(small) >= 0.9 * dead
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert max_diff(model, small, x) <= 1e-10
    loaded = roundtrip(small, lambda: small_convnext(conv_mlp))
    assert max_diff(small, loaded, x) == 0


def test_timm_convnext_training_makes_zero_neurons_and_skips_frozen():
    torch.manual_seed(0)
    model = small_convnext().float()
    model.stages[0].requires_grad_(False)
    h = gp.hierarchy.resnet(model)
    assert not any(g.startswith("stages.0.") for g in h.group_names("layer"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = gp.ProxAdam(
        trainable, lr=1e-2, hierarchy=h,
        penalties={"base_level": gp.GroupLasso(500.0), "layer": gp.GroupLasso(0.0)},
    )  # fmt: skip
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train_steps(opt, lambda: F.cross_entropy(model(x), y), 3)
    assert gp.get_sparsity_report(model, h).levels["base_level"].zero_group_names
    small = gp.compress(model, h, example_inputs=x)
    assert num_params(small) < num_params(model)
