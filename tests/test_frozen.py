"""Frozen parameters (requires_grad=False): every builder leaves them out by default, keeps them
with include_frozen=True, refuses partly frozen groups; the optimizer's message for them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

import group_prox as gp
from examples.moe import MoEClassifier

from .seed_like import SeedLikeResNet

# ----------------------------------------------------------------------------- models and helpers
E, HEADS, FF, VOCAB = 8, 2, 16, 20


class _TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, E)
        layer = nn.TransformerEncoderLayer(E, HEADS, FF, dropout=0.0, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(E, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(0))


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return resnet18(num_classes=4)


def _freeze(*modules: nn.Module) -> None:
    for m in modules:
        m.requires_grad_(False)


def _frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _train(model: nn.Module, h: gp.Hierarchy, x: torch.Tensor, steps: int = 2) -> None:
    """A few steps of ProxSGD over the trainable parameters with a strong group lasso on every
    level; check that the frozen tensors did not change by one bit and that groups were zeroed."""
    before = _frozen(model)
    assert before, "the test must freeze something"
    assert not any(n in before for n in (lay.name for lay in h.tensors))
    opt = gp.ProxSGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=0.1,
        momentum=0.9,
        hierarchy=h,
        penalties={level: gp.GroupLasso(5.0) for level in h.level_names},
    )
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out, torch.arange(len(out)) % out.shape[1]).backward()
        opt.step()
    after = dict(model.named_parameters())
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    # The penalty zeroed trainable groups (it is strong enough to zero most of them at once).
    assert any(torch.count_nonzero(lay.param) < lay.param.numel() for lay in h.tensors)


def _touches(h: gp.Hierarchy, prefix: str) -> list[str]:
    return [lay.name for lay in h.tensors if lay.name.startswith(prefix)]


# ----------------------------------------------------------------------------- resnet
def test_resnet_leaves_frozen_stem_and_stage_out():
    model = _resnet18()
    full = gp.hierarchy.resnet(model)
    _freeze(model.conv1, model.bn1, model.layer1)
    h = gp.hierarchy.resnet(model)
    assert not _touches(h, "conv1.") and not _touches(h, "bn1.") and not _touches(h, "layer1.")
    assert h.group_names("layer") == full.group_names("layer")[2:]
    assert h.num_groups("base_level") == full.num_groups("base_level") - 64 * 5
    _train(model, h, torch.randn(2, 3, 16, 16))


def test_resnet_include_frozen_keeps_them():
    model = _resnet18()
    full = gp.hierarchy.resnet(model)
    _freeze(model.conv1, model.bn1, model.layer1)
    kept = gp.hierarchy.resnet(model, include_frozen=True)
    assert kept.signature() == full.signature()
    # Such a hierarchy needs the frozen tensors in the optimizer too, where the prox shrinks them.
    with pytest.raises(ValueError, match=r"frozen parameters \(requires_grad=False\)"):
        gp.ProxSGD([p for p in model.parameters() if p.requires_grad], lr=0.1, hierarchy=kept)
    opt = gp.ProxSGD(
        model.parameters(), lr=0.1, hierarchy=kept, penalties={"base_level": gp.GroupLasso(1e3)}
    )
    opt.step()
    assert torch.count_nonzero(model.conv1.weight) == 0


def test_resnet_partly_frozen_filter_is_refused():
    model = _resnet18()
    _freeze(model.bn1)  # the stem's BatchNorm, not its conv
    with pytest.raises(ValueError) as info:
        gp.hierarchy.resnet(model)
    msg = str(info.value)
    assert "group 'conv1[0]' of level 'base_level' is partly frozen" in msg
    assert "bn1.weight, bn1.bias have requires_grad=False" in msg
    assert "those in conv1.weight do not" in msg
    assert "63 other groups of this level are partly frozen too" in msg
    assert "include_frozen=True" in msg
    assert gp.hierarchy.resnet(model, include_frozen=True).num_groups("base_level") > 0


def test_resnet_block_with_a_frozen_conv_is_refused():
    # Every filter group of layer1.0.conv2 is wholly frozen, but the branch layer1.0 is not: left
    # without its frozen part, a zero branch would output bn2's frozen shift, not zero.
    model = _resnet18()
    _freeze(model.layer1[0].conv2, model.layer1[0].bn2)
    with pytest.raises(ValueError, match=r"group 'layer1\.0' of level 'layer' is partly frozen"):
        gp.hierarchy.resnet(model)


# ----------------------------------------------------------------------------- auto
def test_auto_leaves_frozen_stem_and_stage_out():
    model = _resnet18()
    x = torch.randn(1, 3, 16, 16)
    full = gp.hierarchy.auto(model, x)
    _freeze(model.conv1, model.bn1, model.layer1)
    # Frozen layers are traced like the others (Torch-Pruning follows autograd), and their
    # requires_grad is restored.
    assert gp.hierarchy.auto(model, x, include_frozen=True).signature() == full.signature()
    assert not any(p.requires_grad for p in model.layer1.parameters())
    h = gp.hierarchy.auto(model, x)
    assert not _touches(h, "conv1.") and not _touches(h, "layer1.")
    assert h.group_names("layer") == full.group_names("layer")[2:]
    # The stage-1 stream (stem and both blocks) and both blocks' conv1 channels.
    assert h.num_groups("base_level") == full.num_groups("base_level") - 3 * 64
    _train(model, h, torch.randn(2, 3, 16, 16))


def test_auto_stream_written_by_a_frozen_stem_is_refused():
    model = _resnet18()
    x = torch.randn(1, 3, 16, 16)
    _freeze(model.conv1, model.bn1)
    with pytest.raises(ValueError) as info:
        gp.hierarchy.auto(model, x)
    msg = str(info.value)
    assert msg.startswith("auto(): group 'conv1[0]' of level 'base_level' is partly frozen")
    assert "conv1.weight, bn1.weight, bn1.bias have requires_grad=False" in msg
    assert "ignored_layers=" in msg
    # What the message suggests: no channel coupled to the stem is grouped.
    h = gp.hierarchy.auto(model, x, ignored_layers=[model.conv1])
    assert not _touches(h, "conv1.") and not _touches(h, "bn1.")


# ----------------------------------------------------------------------------- transformer
def test_transformer_leaves_frozen_embedding_and_layer_out():
    torch.manual_seed(0)
    model = _TinyTransformer()
    full = gp.hierarchy.transformer(model)
    _freeze(model.embed, model.encoder.layers[0])
    h = gp.hierarchy.transformer(model)
    assert not _touches(h, "encoder.layers.0.")
    assert h.group_names("layer") == ("encoder.layers.1.self_attn", "encoder.layers.1.mlp")
    assert h.num_groups("base_level") == full.num_groups("base_level") // 2
    assert gp.hierarchy.transformer(model, include_frozen=True).signature() == full.signature()
    _train(model, h, torch.randint(0, VOCAB, (5, 4)))


def test_transformer_partly_frozen_sublayer_is_refused():
    torch.manual_seed(0)
    model = _TinyTransformer()
    _freeze(model.encoder.layers[1].norm1)  # in the self-attention sublayer's group (pre-norm)
    with pytest.raises(ValueError) as info:
        gp.hierarchy.transformer(model)
    msg = str(info.value)
    assert "group 'encoder.layers.1.self_attn' of level 'layer' is partly frozen" in msg
    assert "encoder.layers.1.norm1.weight, encoder.layers.1.norm1.bias" in msg
    model = _TinyTransformer()
    _freeze(model.encoder.layers[0].self_attn.out_proj)
    with pytest.raises(ValueError, match=r"'encoder\.layers\.0\.self_attn\.head\[0\]' of level"):
        gp.hierarchy.transformer(model)


# ----------------------------------------------------------------------------- moe
def test_moe_leaves_a_frozen_expert_out():
    torch.manual_seed(0)
    model = MoEClassifier(6, 8, 3, num_experts=4)
    full = gp.hierarchy.moe(model)
    _freeze(model.embed, model.moe.router, model.moe.experts[0])
    h = gp.hierarchy.moe(model)
    assert h.group_names("block") == full.group_names("block")[1:]
    assert h.num_groups("base_level") == full.num_groups("base_level") * 3 // 4
    assert gp.hierarchy.moe(model, include_frozen=True).signature() == full.signature()
    _train(model, h, torch.randn(4, 5, 6))


def test_moe_fused_with_frozen_router_and_partly_frozen_expert():
    torch.manual_seed(0)
    model = MoEClassifier(6, 8, 3, num_experts=4, fused=True)
    full = gp.hierarchy.moe(model)
    _freeze(model.embed, model.moe.router)  # in no group: nothing changes
    h = gp.hierarchy.moe(model)
    assert h.signature() == full.signature()
    _train(model, h, torch.randn(4, 5, 6))
    model.moe.experts.b_out.requires_grad_(False)  # only in the experts' block groups
    with pytest.raises(ValueError, match=r"group 'moe\.experts\.0' of level 'block' is partly"):
        gp.hierarchy.moe(model)


# ----------------------------------------------------------------------------- from_module_tags
def test_from_module_tags_leaves_the_frozen_stem_out():
    torch.manual_seed(0)
    model = SeedLikeResNet()
    full = gp.hierarchy.from_module_tags(model)
    _freeze(model.conv1, model.bn1)
    h = gp.hierarchy.from_module_tags(model)
    assert h.num_groups("heels") == 0  # the stem's own level, now empty
    assert h.num_groups("base_level") == full.num_groups("base_level") - 8
    assert h.group_names("layer") == full.group_names("layer")
    assert gp.hierarchy.from_module_tags(model, include_frozen=True).signature() == (
        full.signature()
    )
    _train(model, h, torch.randn(4, 3, 8, 8))
    model.layers[0][0].bn2.requires_grad_(False)
    with pytest.raises(ValueError, match=r"group 'layers\.0\.0\.conv2\[0\]' of level"):
        gp.hierarchy.from_module_tags(model)


# ----------------------------------------------------------------------------- options and messages
@pytest.mark.parametrize(
    "build",
    [
        lambda m: gp.hierarchy.resnet(m, include_frozen="yes"),
        lambda m: gp.hierarchy.auto(m, torch.randn(1, 3, 16, 16), include_frozen=1),
        lambda m: gp.hierarchy.from_module_tags(m, include_frozen=None),
    ],
)
def test_include_frozen_must_be_a_bool(build):
    with pytest.raises(TypeError, match="include_frozen must be True or False"):
        build(_resnet18())


def test_include_frozen_is_keyword_only():
    with pytest.raises(TypeError):
        gp.hierarchy.resnet(_resnet18(), True)  # type: ignore[misc]


def test_optimizer_names_frozen_parameters_missing_from_it():
    lin = nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    h = gp.Hierarchy({"rows": [[(lin.weight, 0, i), (lin.bias, 0, i)] for i in range(2)]}, lin)
    with pytest.raises(ValueError) as info:
        gp.ProxSGD([lin.weight], lr=0.1, hierarchy=h)
    msg = str(info.value)
    assert "frozen parameters (requires_grad=False) that are not among the optimizer's" in msg
    assert "not among the optimizer's parameters: bias. " in msg
    assert "Build the hierarchy without them" in msg and "include_frozen=True" in msg
    assert "Pass the same model's parameters" not in msg
    # A trainable parameter missing from the optimizer keeps the other advice.
    with pytest.raises(ValueError, match=r"parameters: weight\. Pass the same model's parameters"):
        gp.ProxSGD([lin.bias], lr=0.1, hierarchy=h)
