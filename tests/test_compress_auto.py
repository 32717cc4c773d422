"""gp.compress through Torch-Pruning's graph: zero coupled channels go, outputs stay the same."""

from __future__ import annotations

import copy
import io
import pickle
import sys

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer, mobilenet_v3_small

pytest.importorskip("torch_pruning")

import group_prox as gp
from group_prox.compression import auto as compress_auto
from group_prox.compression.report import count_params
from group_prox.tracing import AutoTrace

from .seed_like import SeedLikeResNet

# The plan's own output check falls back with a RuntimeWarning: in these models it never should.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


# ----------------------------------------------------------------------------- helpers
def _randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Trained-looking BatchNorms (μ ≠ 0, σ ≠ 1, γ, β ≠ default), so equivalence cannot lean on
    the defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def _zero(h: gp.Hierarchy, *names: str) -> None:
    """Zero base_level groups in place, through the hierarchy's atom layout (what the optimizer
    zeroes)."""
    level = h.group_names("base_level")
    owner = h.atom_group("base_level")
    with torch.no_grad():
        for name in names:
            g = level.index(name)
            for lay in h.tensors:
                hit = torch.from_numpy(owner[lay.offset : lay.offset + lay.num_atoms] == g)
                if hit.any():
                    mask = hit.reshape(lay.grid).reshape(lay.atom_shape).expand_as(lay.param)
                    lay.param.masked_fill_(mask, 0.0)


def _assert_same(model: nn.Module, small: nn.Module, x: torch.Tensor) -> None:
    model.eval(), small.eval()
    tol = (1e-9, 1e-12) if x.dtype == torch.float64 else (1e-5, 1e-6)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), rtol=tol[0], atol=tol[1])


def _keep(small: nn.Module, module: str, side: str) -> tuple[int, ...]:
    (op,) = [op for op in small.group_prox_plan.ops if (op.module, op.side) == (module, side)]
    return op.keep


def _x(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- models
class Chain(nn.Module):
    """conv-bn-relu twice, flatten, linear: the linear reads channel × position."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1, stride=2), nn.BatchNorm2d(12), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Residual(nn.Module):
    """A residual stream written by the stem and by both blocks' conv2/bn2."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(10, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU())
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.c(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


class Depthwise(nn.Module):
    """Expand, depthwise, squeeze-excitation gate (sigmoid(fc2) × x), project."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.project = nn.Sequential(nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.dw(self.expand(x))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.fc(self.project(x * gate).mean((2, 3)))


class SigmoidChain(nn.Module):
    """A zero channel becomes sigmoid(0) = 1/2 before the next conv: it must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.sigmoid(self.conv1(x)))).mean((2, 3)))


def _zero_groups_left(model: nn.Module, x: torch.Tensor) -> list[str]:
    h = gp.hierarchy.auto(model, x)
    groups = zip(h.group_names("base_level"), h.groups("base_level"))
    return [name for name, g in groups if all(bool((t == 0).all()) for t in g)]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _grouped_conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1, groups=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )  # fmt: skip


def _layernorm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


def _build(cls, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise(cls()).eval()


# ----------------------------------------------------------------------------- removal is exact
def test_chain_flatten_linear():
    model, x = _build(Chain), _x(2, 3, 8, 8)
    h = gp.hierarchy.auto(model, x)
    _zero(h, "features.0[1]", "features.0[4]", "features.3[0]", "features.3[7]", "features.3[11]")
    small = gp.compress(model, h, example_inputs=x)  # checks the outputs itself
    _assert_same(model, small, _x(3, 3, 8, 8, seed=1))
    assert _keep(small, "features.0", "out") == (0, 2, 3, 5, 6, 7)
    assert small.features[3].in_channels == 6 and small.features[3].out_channels == 9
    assert small.features[4].num_features == 9
    # flattened: channel c is the inputs c·16 … c·16 + 15 of the linear
    kept = [c for c in range(12) if c not in (0, 7, 11)]
    assert _keep(small, "fc", "in") == tuple(c * 16 + k for c in kept for k in range(16))
    assert small.fc.out_features == 5  # the logits stay
    assert count_params(small) < count_params(model)


def test_float64_is_exact_to_rounding():
    model, x = _build(Chain).double(), _x(2, 3, 8, 8, dtype=torch.float64)
    h = gp.hierarchy.auto(model, x)
    _zero(h, "features.0[2]", "features.3[5]")
    small = gp.compress(model, h, example_inputs=x)
    _assert_same(model, small, _x(2, 3, 8, 8, seed=3, dtype=torch.float64))
    assert small.features[0].out_channels == 7 and small.fc.in_features == 11 * 16


def test_residual_stream_goes_only_where_every_writer_is_dead():
    model, x = _build(Residual), _x(2, 3, 8, 8)
    h = gp.hierarchy.auto(model, x)
    stem = h.group_names("base_level")[0]
    assert stem == "stem.0[0]"
    # Stream channel 2: dead in the stem and both blocks (one group). Stream channel 5: dead in
    # the stem only, the blocks still add into it, so it stays. Block-internal channel 3 goes.
    _zero(h, "stem.0[2]", "blocks.0.conv1[3]", "blocks.1.conv1[0]")
    with torch.no_grad():
        for p in (model.stem[0].weight, model.stem[0].bias, model.stem[1].weight):
            p[5] = 0
        model.stem[1].bias[5] = 0
    small = gp.compress(model, h, example_inputs=x)
    _assert_same(model, small, _x(4, 3, 8, 8, seed=5))
    stream = (0, 1, 3, 4, 5, 6, 7)
    for name, side in [
        ("stem.0", "out"), ("stem.1", "out"), ("blocks.0.conv1", "in"), ("blocks.0.conv2", "out"),
        ("blocks.0.bn2", "out"), ("blocks.1.conv1", "in"), ("blocks.1.conv2", "out"),
        ("blocks.1.bn2", "out"), ("head", "in"),
    ]:  # fmt: skip
        assert _keep(small, name, side) == stream, name
    assert _keep(small, "blocks.0.conv1", "out") == (0, 1, 2, 4, 5, 6, 7)
    assert _keep(small, "blocks.0.conv2", "in") == (0, 1, 2, 4, 5, 6, 7)
    assert small.blocks[1].conv1.out_channels == 7 and small.blocks[1].bn1.num_features == 7


def test_concatenation_offsets():
    model, x = _build(Concat), _x(2, 3, 6, 6)
    h = gp.hierarchy.auto(model, x)
    _zero(h, "a.0[1]", "b.0[2]", "b.0[5]")
    small = gp.compress(model, h, example_inputs=x)
    _assert_same(model, small, _x(2, 3, 6, 6, seed=2))
    assert _keep(small, "c.0", "in") == (0, 2, 3, 4, 5, 7, 8)  # b's channels sit at 4 + i
    assert small.a[0].out_channels == 3 and small.b[1].num_features == 4


def test_depthwise_and_squeeze_excitation_gate():
    model, x = _build(Depthwise), _x(2, 3, 6, 6)
    h = gp.hierarchy.auto(model, x)
    # One group per expanded channel: expand + depthwise + their BatchNorms + the SE gate's fc2
    # filter; zero, the gate is sigmoid(0) = 1/2, times a zero channel.
    _zero(h, "expand.0[1]", "expand.0[6]", "fc1[2]")
    small = gp.compress(model, h, example_inputs=x)
    _assert_same(model, small, _x(2, 3, 6, 6, seed=4))
    expanded = (0, 2, 3, 4, 5, 7)
    for name, side in [("expand.0", "out"), ("dw.0", "out"), ("dw.1", "out"), ("fc1", "in")]:
        assert _keep(small, name, side) == expanded, name
    assert _keep(small, "fc2", "out") == expanded and _keep(small, "project.0", "in") == expanded
    dw = small.dw[0]
    assert dw.groups == dw.in_channels == dw.out_channels == 6
    assert small.fc1.out_channels == 3 and small.fc2.in_channels == 3


def test_mlp_hidden_units():
    model, x = _mlp().eval(), _x(4, 6)
    h = gp.hierarchy.auto(model, x)
    assert h.num_groups("base_level") == 16  # the logits are not grouped
    _zero(h, *(f"0[{j}]" for j in range(0, 16, 3)))
    small = gp.compress(model, h, example_inputs=x)
    _assert_same(model, small, _x(8, 6, seed=1))
    assert small[0].out_features == small[2].in_features == 10
    assert small[2].out_features == 3


def test_mobilenet_v3_every_zero_group_goes():
    # Residual streams, depthwise convs, hardswish, hardsigmoid squeeze-excitation gates and a
    # Linear-Hardswish-Linear classifier; float64, so equal to rounding.
    torch.manual_seed(0)
    model = _randomise(mobilenet_v3_small(num_classes=10)).double().eval()
    x = _x(2, 3, 32, 32, dtype=torch.float64)
    h = gp.hierarchy.auto(model, x)
    names = h.group_names("base_level")
    _zero(h, *names[::3])
    small = gp.compress(model, h, example_inputs=x)
    _assert_same(model, small, _x(2, 3, 32, 32, seed=1, dtype=torch.float64))
    assert _zero_groups_left(small, x) == []
    assert count_params(small) < 0.75 * count_params(model)


def test_vision_transformer_mlp_units():
    # A linear on tokens is traced as view, weight.t(), addmm, view; the embedding dimension meets
    # MultiheadAttention and LayerNorm, so only the MLP's hidden units can go.
    torch.manual_seed(0)
    model = VisionTransformer(16, 8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32).eval()
    x = _x(2, 3, 16, 16)
    h = gp.hierarchy.auto(model, x)
    mlp = "encoder.layers.encoder_layer_0.mlp"
    _zero(h, *(f"{mlp}.0[{j}]" for j in range(0, 32, 4)))
    small = gp.compress(model, h, example_inputs=x)
    _assert_same(model, small, _x(2, 3, 16, 16, seed=1))
    assert small.get_submodule(f"{mlp}.0").out_features == 24
    assert small.get_submodule(f"{mlp}.3").in_features == 24
    assert [op.module for op in small.group_prox_plan.ops] == [f"{mlp}.0", f"{mlp}.3"]


@pytest.mark.parametrize(
    "make", [SigmoidChain, _layernorm_mlp, _grouped_conv], ids=["sigmoid", "layernorm", "grouped"]
)
def test_channels_that_are_not_removable_stay(make):
    # sigmoid(0) ≠ 0 reaches conv2; a LayerNorm's statistics include the zero channel; a grouped
    # conv reads it, which the plan cannot slice.
    torch.manual_seed(0)
    model = make().eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    x = _x(2, 3, 6, 6) if isinstance(first, nn.Conv2d) else _x(4, 6)
    with torch.no_grad():
        first.weight[1] = 0
        first.bias[1] = 0
    assert compress_auto.plan(model, x, None) == []
    small = gp.compress(model, example_inputs=x)
    _assert_same(model, small, x)
    assert count_params(small) == count_params(model)


def test_literal_sizes_in_forward_are_caught_by_the_output_check():
    class Literal(Chain):
        def forward(self, x):
            return self.fc(self.features(x).view(-1, 192))  # 192 written in the code

    model, x = _build(Literal), _x(2, 3, 8, 8)
    h = gp.hierarchy.auto(model, x)
    _zero(h, "features.0[1]", "features.3[2]")
    with pytest.warns(RuntimeWarning, match="features.3"):
        small = gp.compress(model, h, example_inputs=x)
    _assert_same(model, small, x)
    assert small.features[0].out_channels == 7 and small.features[3].out_channels == 12


# ----------------------------------------------------------------------------- options and data
def test_the_trace_is_kept_on_the_hierarchy():
    model, x = _build(Chain), _x(2, 3, 8, 8)
    h = gp.hierarchy.auto(model, x, ignored_layers=["features.3"])
    assert isinstance(h.trace, AutoTrace) and h.trace.example_inputs is x
    assert h.trace.ignored_layers == ("features.3",)
    with pytest.raises(AttributeError):
        h.trace = None  # read-only
    for kept in (
        h.with_level("net", [list(model.parameters())]),
        copy.copy(h),
        copy.deepcopy(h),
        pickle.loads(pickle.dumps(h)),
    ):
        assert isinstance(kept.trace, AutoTrace)
        assert kept.trace.ignored_layers == ("features.3",)
    assert gp.hierarchy.from_module_tags(SeedLikeResNet()).trace is None
    assert gp.Hierarchy({"base_level": [[p] for p in model.parameters()]}).trace is None


def test_recorded_inputs_and_options_are_used():
    model, x = _build(Chain), _x(2, 3, 8, 8)
    before = copy.deepcopy(model.state_dict())
    model.train()
    h = gp.hierarchy.auto(model, x, ignored_layers=["features.3"])
    assert compress_auto.built_by_auto(h) and compress_auto.example_inputs_of(h) is x
    assert not compress_auto.built_by_auto(gp.hierarchy.from_module_tags(SeedLikeResNet()))
    assert "features.3[0]" not in h.group_names("base_level")
    assert compress_auto.built_by_auto(h.with_level("net", [list(model.parameters())]))
    _zero(h, "features.0[3]")
    with torch.no_grad():  # zero, but in an ignored layer: stays
        model.features[3].weight[4] = 0
        model.features[3].bias[4] = 0
        model.features[4].weight[4] = 0
        model.features[4].bias[4] = 0
    small = gp.compress(model, h)  # no example_inputs: traced on the recorded ones
    assert model.training and all(m.training for m in model.modules())  # flags restored
    assert small.features[0].out_channels == 7 and small.features[3].out_channels == 12
    _assert_same(model, small, x)
    for k, v in model.state_dict().items():  # the model is not changed but for the zeros
        assert v.shape == before[k].shape
    # recorded float32 inputs still trace the model once it is float64
    small64 = gp.compress(model.double(), h)
    assert small64.features[0].out_channels == 7
    _assert_same(model, small64, x.double())


def test_multiple_rounds_widths_up():
    model, x = _build(Chain), _x(2, 3, 8, 8)
    h = gp.hierarchy.auto(model, x)
    _zero(h, *(f"features.0[{i}]" for i in (0, 1, 2)), *(f"features.3[{i}]" for i in range(7)))
    small = gp.compress(model, h, example_inputs=x, multiple=4)
    assert small.features[0].out_channels == 8  # 5 live → 8 (all)
    assert small.features[3].out_channels == 8  # 5 live → 8
    _assert_same(model, small, x)


def test_save_and_load_without_torch_pruning(monkeypatch):
    model, x = _build(Residual), _x(2, 3, 8, 8)
    h = gp.hierarchy.auto(model, x)
    _zero(h, "stem.0[4]", "blocks.1.conv1[2]")
    small = gp.compress(model, h, example_inputs=x)
    buf = io.BytesIO()
    gp.save_compressed(small, buf)
    buf.seek(0)
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # the plan is plain data
    loaded = gp.load_compressed(lambda: _build(Residual, seed=9), buf).eval()
    _assert_same(model, loaded, _x(2, 3, 8, 8, seed=7))
    assert loaded.stem[0].out_channels == 7 and loaded.blocks[1].conv1.out_channels == 7


def test_no_hierarchy_and_seed_like_tagged_resnet():
    # No torchvision blocks: compress goes through the trace, with the tags' hierarchy or none.
    torch.manual_seed(0)
    model, x = _randomise(SeedLikeResNet()).eval(), _x(2, 3, 8, 8)
    h = gp.hierarchy.from_module_tags(model)
    with torch.no_grad():  # block-internal channels: conv1 filter with its bn1 (γ, β)
        for block, dead in ((model.layers[0][1], (0, 5)), (model.layers[1][0], (3,))):
            for i in dead:
                block.conv1.module.weight[i] = 0
                block.bn1.weight[i] = 0
                block.bn1.bias[i] = 0
    for hierarchy in (h, None):
        small = gp.compress(model, hierarchy, example_inputs=x)
        _assert_same(model, small, _x(2, 3, 8, 8, seed=6))
        assert small.layers[0][1].conv1.module.out_channels == 6
        assert small.layers[0][1].conv2.module.in_channels == 6
        assert small.layers[1][0].bn1.num_features == 15
    with pytest.raises(ValueError, match="example_inputs"):
        gp.compress(model, h)
