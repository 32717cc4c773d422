"""torchvision VisionTransformer: MLP neurons, sublayers and whole blocks next to the attention
heads of the torch-transformer family; compression and files."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer

import group_prox as gp
from group_prox.compression.transformer import PrunedMultiheadAttention
from group_prox.families import torchvision_vit
from tests.family_helpers import train_steps

E, HEADS, HIDDEN, LAYERS = 64, 4, 128, 2
BLOCK = "encoder.layers.encoder_layer_{}"


def small_vit() -> nn.Module:
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=LAYERS, num_heads=HEADS, hidden_dim=E,
        mlp_dim=HIDDEN, num_classes=10,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.double()


def members_of(level: str, group: str, model: nn.Module):
    return dict(zip(*_named(gp.hierarchy.transformer(model, include_frozen=True), level)))[group]


def _named(h: gp.Hierarchy, level: str):
    return h.group_names(level), h.groups(level)


def zero_heads(mha: nn.MultiheadAttention, heads: list[int]) -> None:
    hd = E // HEADS
    with torch.no_grad():
        for h in heads:
            for j in range(3):
                mha.in_proj_weight[j * E + h * hd : j * E + (h + 1) * hd] = 0
                mha.in_proj_bias[j * E + h * hd : j * E + (h + 1) * hd] = 0
            mha.out_proj.weight[:, h * hd : (h + 1) * hd] = 0


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval(), b.eval()
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


def test_levels_merge_heads_neurons_sublayers_and_blocks():
    h = gp.hierarchy.transformer(small_vit())
    base = h.group_names("base_level")
    assert sum(".self_attention.head[" in g for g in base) == LAYERS * HEADS
    assert sum(".mlp[" in g for g in base) == LAYERS * HIDDEN
    blocks = [BLOCK.format(i) for i in range(LAYERS)]
    assert set(h.group_names("layer")) == {
        f"{b}.{s}" for b in blocks for s in ("self_attention", "mlp")
    }
    assert set(h.group_names("whole_layer")) == set(blocks)
    # ln_2 is in the MLP sublayer; ln_1 (in no finer group) in the whole block.
    layer = dict(zip(*_named(h, "layer")))
    assert sum(t.shape == (E,) for t in layer[f"{blocks[0]}.mlp"]) == 3  # ln_2 γ, β; mlp.3 bias
    assert sum(t.numel() for t in dict(zip(*_named(h, "whole_layer")))[blocks[0]]) == sum(
        p.numel() for p in small_vit().encoder.layers[0].parameters()
    )


def test_compress_neurons_heads_and_sublayers():
    model = small_vit().eval()
    b0, b1 = model.encoder.layers[0], model.encoder.layers[1]
    zero_heads(b0.self_attention, [1, 2])
    zero_heads(b1.self_attention, list(range(HEADS)))
    with torch.no_grad():
        b1.self_attention.out_proj.bias.zero_()  # the whole attention sublayer of block 1 is zero
        b0.mlp[0].weight[::2] = 0
        b0.mlp[0].bias[::2] = 0
        b0.mlp[3].weight[:, ::2] = 0  # half of block 0's neurons
        b1.mlp[3].weight.zero_()
        b1.mlp[3].bias.zero_()  # the whole MLP of block 1
    dead = 2 * 4 * E * E // HEADS + (HIDDEN // 2) * (2 * E + 1)
    dead += sum(p.numel() for p in b1.self_attention.parameters()) + 2 * E * HIDDEN + E
    small = gp.compress(model)
    s0, s1 = small.encoder.layers[0], small.encoder.layers[1]
    assert isinstance(s0.self_attention, PrunedMultiheadAttention)
    assert s0.self_attention.num_heads == HEADS - 2
    assert s0.mlp[0].out_features == HIDDEN // 2
    assert isinstance(s1, torchvision_vit.CompressedEncoderBlock)
    assert s1.removed == ("self_attention", "mlp")
    assert num_params(model) - num_params(small) >= 0.9 * dead
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert max_diff(model, small, x) <= 1e-10
    buf = io.BytesIO()
    gp.save_compressed(small, buf)
    buf.seek(0)
    loaded = gp.load_compressed(small_vit, buf)
    assert max_diff(small, loaded, x) == 0
    assert num_params(gp.compress(small)) == num_params(small)


def test_training_makes_zero_neurons_and_skips_frozen():
    torch.manual_seed(0)
    model = small_vit().float()
    model.conv_proj.requires_grad_(False)
    model.encoder.layers[0].requires_grad_(False)
    h = gp.hierarchy.transformer(model)
    assert set(h.group_names("whole_layer")) == {BLOCK.format(1)}
    assert not any(g.startswith(BLOCK.format(0)) for g in h.group_names("base_level"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = gp.ProxAdam(
        trainable, lr=1e-2, hierarchy=h,
        penalties={"base_level": gp.GroupLasso(500.0), "layer": gp.GroupLasso(0.0)},
    )  # fmt: skip
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train_steps(opt, lambda: F.cross_entropy(model(x), y), 3)
    zero = gp.get_sparsity_report(model, h).levels["base_level"].zero_group_names
    assert any(".mlp[" in g for g in zero)
    small = gp.compress(model, h, example_inputs=x)
    assert num_params(small) < num_params(model)


def test_other_mlp_layout_is_left_out_with_a_warning():
    model = small_vit()
    model.encoder.layers[0].mlp = nn.Sequential(nn.Linear(E, E))
    with pytest.warns(UserWarning, match="encoder_layer_0"):
        h = gp.hierarchy.transformer(model)
    assert BLOCK.format(0) + ".mlp" not in h.group_names("layer")
