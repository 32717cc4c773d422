"""gp.hierarchy.auto: traced channel groups and residual branches; zero group = removed channel."""

from __future__ import annotations

import copy
import random
import sys

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torchvision.models import DenseNet, VisionTransformer, mobilenet_v3_small, resnet18

import group_prox as gp
from group_prox.hierarchy.auto import auto

X32 = (1, 3, 32, 32)


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so eval mode is not the identity,
    and unit-scale linear layers (torchvision's 0.01 makes MobileNet's logits insensitive)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def _group_masks(h: gp.Hierarchy, level: str, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(param, boolean mask of the group's scalars) for every tensor the group touches, from the
    hierarchy's public atom layout: exactly what the optimizer zeroes."""
    g = h.group_names(level).index(name)
    owner = h.atom_group(level)
    out = []
    for lay in h.tensors:
        hit = torch.from_numpy(owner[lay.offset : lay.offset + lay.num_atoms] == g)
        if hit.any():
            mask = hit.reshape(lay.grid).reshape(lay.atom_shape).expand_as(lay.param)
            out.append((lay.param, mask))
    return out


def _indices(h: gp.Hierarchy, name: str) -> list[tuple[str, int]]:
    """(tensor name, index along its cut dimension) of every atom of a base_level group."""
    g = h.group_names("base_level").index(name)
    owner = h.atom_group("base_level")
    return [
        (lay.name, int(k))
        for lay in h.tensors
        for k in (owner[lay.offset : lay.offset + lay.num_atoms] == g).nonzero()[0]
    ]


def _tensors_of(h: gp.Hierarchy, name: str) -> set[tuple[str, tuple[int, ...]]]:
    where = {lay.name: lay.dims for lay in h.tensors}
    return {(t, where[t]) for t, _ in _indices(h, name)}


def _root(model: nn.Module, name: str) -> tuple[nn.Module, object, int]:
    module_name, _, index = name.rstrip("]").rpartition("[")
    module = model.get_submodule(module_name)
    fn = (
        tp.prune_linear_out_channels
        if isinstance(module, nn.Linear)
        else tp.prune_conv_out_channels
    )
    return module, fn, int(index)


def _assert_zero_is_removal(
    model: nn.Module, h: gp.Hierarchy, fixed: list[str], k: int, seed: int
) -> None:
    """Zeroing a group gives the outputs of the model with that channel removed by Torch-Pruning
    (an independent implementation of removal), in eval mode and float64, for the ``fixed``
    groups and ``k`` random ones."""
    names = h.group_names("base_level")
    assert set(fixed) <= set(names)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        full = model(x)
    # Far above float64 rounding, far below the effect of a channel (MobileNet's early channels
    # move its logits by ~1e-8 of their size).
    tol = 1e-12 * full.abs().max().item()
    for name in fixed + random.Random(seed).sample(names, k):
        pruned = copy.deepcopy(model)
        graph = tp.DependencyGraph().build_dependency(
            pruned, example_inputs=x, forward_fn=lambda m, inp: m(inp), verbose=False
        )
        module, fn, index = _root(pruned, name)
        graph.get_pruning_group(module, fn, idxs=[index]).prune()
        masks = _group_masks(h, "base_level", name)
        saved = [p.detach().clone() for p, _ in masks]
        with torch.no_grad():
            for p, mask in masks:
                p.masked_fill_(mask, 0.0)
            zeroed = model(x)
            for (p, _), s in zip(masks, saved):
                p.copy_(s)
            removed = pruned(x)
        torch.testing.assert_close(
            zeroed, removed, rtol=0, atol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )
        if name in fixed:  # the comparison means something: the channel matters
            assert (zeroed - full).abs().max() > 100 * tol, name


# ----------------------------------------------------------------------------- torchvision models
@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    model = _randomise_norms(resnet18(num_classes=10)).double()
    return model, auto(model, torch.randn(X32, dtype=torch.float64))


def test_resnet18_groups(r18):
    model, h = r18
    assert h.level_names == ("base_level", "layer")
    # Per stage: one stream group per channel (stem/downsample + every conv2/bn2) and the
    # internal channels of each block's conv1; the classifier's logits are not grouped.
    assert h.num_groups("base_level") == sum(3 * w for w in (64, 128, 256, 512))
    names = set(h.group_names("base_level"))
    assert {"conv1[0]", "layer1.0.conv1[5]", "layer2.0.conv2[127]", "layer4.1.conv1[511]"} <= names
    assert not any(n.startswith(("fc", "layer1.0.conv2", "layer2.0.downsample")) for n in names)
    stream = {name for name, _ in _tensors_of(h, "conv1[3]")}
    assert stream == {
        "conv1.weight", "bn1.weight", "bn1.bias",
        *(f"layer1.{b}.{m}" for b in (0, 1) for m in ("conv2.weight", "bn2.weight", "bn2.bias")),
    }  # fmt: skip
    # the ignored classifier's input columns join the stage-4 stream groups
    assert ("fc.weight", (1,)) in _tensors_of(h, "layer4.0.conv2[0]")
    # layer: each BasicBlock's branch, holding its internal channels (conv1, bn1)
    assert h.group_names("layer") == tuple(f"layer{s}.{b}" for s in range(1, 5) for b in range(2))
    block = model.layer2[0]
    assert h.group_sizes("layer")[2] == block.conv1.weight.numel() + 2 * block.bn1.num_features


def test_resnet18_zero_group_is_removed_channel(r18):
    model, h = r18
    fixed = ["conv1[5]", "layer3.0.conv2[7]", "layer4.0.conv2[3]", "layer1.1.conv1[3]"]
    _assert_zero_is_removal(model, h, fixed, k=2, seed=0)


def test_resnet18_zero_branch_leaves_shortcut_plus_constant(r18):
    model, h = r18
    model.eval()
    block = model.layer1[0]
    x = torch.randn(2, 64, 8, 8, dtype=torch.float64)
    masks = _group_masks(h, "layer", "layer1.0")
    saved = [p.detach().clone() for p, _ in masks]
    try:
        with torch.no_grad():
            for p, mask in masks:
                p.masked_fill_(mask, 0.0)
            # conv2 reads zeros, so the branch is the constant bn2(0), not zero (documented)
            const = block.bn2(torch.zeros_like(x))
            torch.testing.assert_close(block(x), torch.relu(x + const), rtol=0, atol=0)
    finally:
        with torch.no_grad():
            for (p, _), s in zip(masks, saved):
                p.copy_(s)


def test_mobilenet_v3_small():
    torch.manual_seed(0)
    model = _randomise_norms(mobilenet_v3_small(num_classes=10)).double()
    h = auto(model, torch.randn(X32, dtype=torch.float64))
    names = h.group_names("base_level")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # Depthwise convs and squeeze-excitation fc2 filters join the channel of their input; every
    # other conv's filters (residual streams merged) and classifier.0's units are grouped.
    assert len(names) == 4872 < sum(c.out_channels for c in convs) + 1024
    assert not any(
        ".block.1.0[" in n or ".fc2[" in n or n.startswith("classifier.3") for n in names
    )
    # the residual InvertedResidual blocks of mobilenet_v3_small are features 3, 5, 6, 8, 10, 11
    assert h.group_names("layer") == tuple(f"features.{i}.block" for i in (3, 5, 6, 8, 10, 11))
    b = "features.4.block"
    expected = ["0.0.weight", "0.1.weight", "0.1.bias", "1.0.weight", "1.1.weight", "1.1.bias"]
    expected += ["2.fc2.weight", "2.fc2.bias"]  # squeeze-excitation gate of the same channel
    assert _tensors_of(h, f"{b}.0.0[5]") == {(f"{b}.{m}", (0,)) for m in expected}
    fixed = [
        "features.0.0[3]",  # stem + depthwise + SE fc2 of features.1
        "features.4.block.0.0[5]",  # expand + depthwise + SE fc2 (hardsigmoid times zero)
        "features.4.block.2.fc1[0]",  # SE squeeze channel
        "features.4.block.3.0[2]",  # residual stream of features 4-6
        "classifier.0[7]",  # with the logits layer's input column
    ]
    _assert_zero_is_removal(model, h, fixed, k=2, seed=1)


def test_densenet_concatenations():
    torch.manual_seed(0)
    model = DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10)
    model = _randomise_norms(model).double()
    h = auto(model, torch.randn(X32, dtype=torch.float64))
    assert h.num_groups("base_level") == 16 + 2 * (32 + 8) + 16 + 2 * (32 + 8)
    assert h.num_groups("layer") == 0  # no additions
    # a dense layer's new channel c sits at offset 16 + c of every later concatenation
    assert set(_indices(h, "features.denseblock2.denselayer1.conv2[3]")) == {
        ("features.denseblock2.denselayer1.conv2.weight", 3),
        ("features.denseblock2.denselayer2.norm1.weight", 19),
        ("features.denseblock2.denselayer2.norm1.bias", 19),
        ("features.norm5.weight", 19),
        ("features.norm5.bias", 19),
        ("classifier.weight", 19),
    }
    fixed = [
        "features.conv0[0]",  # through three concatenations and four BatchNorms
        "features.denseblock2.denselayer1.conv2[3]",
        "features.transition1.conv[2]",
        "features.denseblock1.denselayer2.conv1[4]",
    ]
    _assert_zero_is_removal(model, h, fixed, k=2, seed=2)


def test_vit_branches_are_whole_when_the_stream_is_not_grouped():
    torch.manual_seed(0)
    model = VisionTransformer(32, 8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32).eval()
    h = auto(model, torch.randn(1, 3, 32, 32))
    # MultiheadAttention cannot be sliced, so the embedding channels get no group; the MLP's
    # hidden units can (with the second linear's input columns, which no other group cuts).
    block = "encoder.layers.encoder_layer_0"
    assert h.group_names("base_level") == tuple(f"{block}.mlp.0[{j}]" for j in range(32))
    assert h.group_names("layer") == (f"{block}.{{ln_1,self_attention}}", f"{block}.{{ln_2,mlp}}")
    layer = model.encoder.layers[0]
    assert sum(h.group_sizes("layer")) == sum(p.numel() for p in layer.parameters())
    # a zero attention branch contributes exactly nothing
    x = torch.randn(2, 17, 16)
    with torch.no_grad():
        for p, mask in _group_masks(h, "layer", f"{block}.{{ln_1,self_attention}}"):
            p.masked_fill_(mask, 0.0)
        torch.testing.assert_close(layer(x), x + layer.mlp(layer.ln_2(x)), rtol=0, atol=0)


# ----------------------------------------------------------------------------- a small residual net
class _Block(nn.Module):
    def __init__(self, c: int, swap: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.swap = swap

    def forward(self, x):
        f = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(f + x if self.swap else x + f)


class _TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(_Block(8, False), _Block(8, True))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_tiny_resnet_structure_and_options():
    torch.manual_seed(0)
    model = _TinyResNet().train()
    x = torch.randn(1, 3, 8, 8)
    h = auto(model, x)
    assert model.training and all(m.training for m in model.modules())  # eval during the trace only
    assert h.group_names("layer") == ("blocks.0", "blocks.1")  # x + f(x) and f(x) + x
    assert h.num_groups("base_level") == 8 + 2 * 8
    assert auto(model, (x,)).group_names("base_level") == h.group_names("base_level")
    # the logits are grouped only on request
    assert "head[0]" in auto(model, x, prune_outputs=True).group_names("base_level")
    # an ignored layer drops every channel coupled to its outputs (here the whole stream); a
    # container stands for all its layers
    names = auto(model, x, ignored_layers=["blocks.1.conv2"]).group_names("base_level")
    assert names == tuple(f"blocks.{b}.conv1[{i}]" for b in (0, 1) for i in range(8))
    names = auto(model, x, ignored_layers=[model.blocks[1]]).group_names("base_level")
    assert names == tuple(f"blocks.0.conv1[{i}]" for i in range(8))
    assert auto(model, x, branches=False).num_groups("layer") == 0
    with pytest.raises(ValueError, match="not a submodule"):
        auto(model, x, ignored_layers=["nope"])


def test_training_gives_exact_zero_groups_and_branches():
    torch.manual_seed(0)
    model = _TinyResNet()
    h = auto(model, torch.randn(1, 3, 8, 8))
    x = torch.randn(64, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    opt = gp.ProxSGD(
        model.parameters(),
        lr=0.1,
        momentum=0.9,
        hierarchy=h,
        penalties={"base_level": gp.GroupLasso(0.065), "layer": gp.GroupLasso(0.0)},
    )

    def train(steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    train(30)
    base = gp.get_sparsity_report(model, h).levels["base_level"]
    assert 0 < base.zero_groups < base.groups
    for name in base.zero_group_names:
        for p, mask in _group_masks(h, "base_level", name):
            assert torch.count_nonzero(p.detach()[mask]) == 0
    opt.penalties["layer"].lam = 1.0
    train(10)
    layer = gp.get_sparsity_report(model, h).levels["layer"]
    assert layer.zero_groups >= 1
    for name in layer.zero_group_names:
        block = model.get_submodule(name)
        for p in (block.conv1.weight, block.bn1.weight, block.bn1.bias):
            assert torch.count_nonzero(p) == 0
    assert torch.isfinite(model(x)).all()


# ----------------------------------------------------------------------------- errors
def test_missing_torch_pruning(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ImportError, match=r'pip install "group_prox\[auto\]"'):
        auto(nn.Linear(2, 2), torch.randn(1, 2))


def test_not_a_module():
    with pytest.raises(TypeError, match=r"expected an nn\.Module"):
        auto(lambda x: x, torch.randn(1, 2))


class _Cache:
    """Stands for a KV cache object in a model's output (not a tensor, not a container)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.keys = [t]


class _WithCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict:
        h = torch.relu(self.fc1(x))
        return {"logits": self.fc2(h), "past_key_values": _Cache(h), "extra": (None, 3)}


def test_auto_traces_the_tensors_of_an_output_holding_a_cache_object():
    model = _WithCache()
    h = gp.hierarchy.auto(model, torch.randn(2, 4))
    assert h.num_groups("base_level") == 8  # the hidden units; outputs stay (prune_outputs=False)


def test_auto_records_how_long_the_trace_took():
    h = gp.hierarchy.auto(_WithCache(), torch.randn(2, 4))
    assert h.trace is not None and 0 < h.trace.seconds < 60
