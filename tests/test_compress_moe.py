"""gp.compress on MoE layers: dead expert hidden units and whole experts are removed exactly."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import group_prox as gp
from examples.moe import FusedExperts, MoEClassifier, TopKMoE, train
from group_prox.compression.moe import ZeroExpert

from .test_moe import _Gated

D_IN, D, C, E = 6, 8, 3, 4
H = 4 * D  # MoEClassifier's expert hidden width
UNITS = [1, 5, 6, 20]  # dead hidden units
DEAD = 2  # dead expert


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _classifier(fused: bool, seed: int = 0, dtype=torch.float32) -> MoEClassifier:
    torch.manual_seed(seed)
    return MoEClassifier(D_IN, D, C, num_experts=E, fused=fused).to(dtype)


def _inputs(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(16, 5, D_IN, generator=torch.Generator().manual_seed(1), dtype=dtype)


@torch.no_grad()
def _kill(model: MoEClassifier, fused: bool) -> None:
    """Zero hidden units UNITS (in every expert when fused, in expert 0 otherwise), one more unit
    in expert 1 only, and the projection out of expert DEAD (its projection in stays)."""
    ex = model.moe.experts
    if fused:
        ex.w_out[:, UNITS] = 0
        ex.w_out[1, 9] = 0  # dead in one expert only: the shared hidden width keeps it
        ex.w_out[DEAD] = 0
        ex.b_out[DEAD] = 0
    else:
        ex[0].fc2.weight[:, UNITS] = 0
        ex[DEAD].fc2.weight.zero_()
        ex[DEAD].fc2.bias.zero_()


def _expected_params(fused: bool) -> int:
    before = _params(_classifier(fused))
    k, unit = len(UNITS), 2 * D + 1  # a unit: a row of fc1, its bias, a column of fc2
    if fused:
        return before - E * k * unit - ((H - k) * unit + D)
    return before - k * unit - (H * unit + D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fused", [False, True])
def test_dead_units_and_experts_are_removed(fused, dtype):
    model = _classifier(fused, dtype=dtype)
    _kill(model, fused)
    x = _inputs(dtype)
    small = gp.compress(model, gp.hierarchy.moe(model), example_inputs=x)  # checks the outputs
    assert _params(small) == _expected_params(fused)
    ex = small.moe.experts
    if fused:
        assert ex.w_in.shape == (E - 1, D, H - len(UNITS))
        assert ex.w_out.shape == (E - 1, H - len(UNITS), D)
        assert len(ex) == E and ex.rows == [0, 1, None, 2]
    else:
        assert isinstance(ex[DEAD], ZeroExpert) and not list(ex[DEAD].parameters())
        assert ex[0].fc1.out_features == ex[0].fc2.in_features == H - len(UNITS)
        assert ex[1].fc1.out_features == H
    model.eval(), small.eval()
    with torch.no_grad():
        want, got = model(x), small(x)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0}
    assert torch.allclose(got, want, **tol)
    assert model.moe.experts is not ex  # the original is untouched
    assert _params(model) == _params(_classifier(fused))


@pytest.mark.parametrize("fused", [False, True])
def test_routing_is_unchanged(fused):
    model = _classifier(fused)
    _kill(model, fused)
    small = gp.compress(model)
    tokens = model.norm(model.embed(_inputs())).reshape(-1, D).detach()
    chosen, gates = model.moe.routing(tokens)
    assert (chosen == DEAD).any()  # the dead expert is still chosen, with its gate
    chosen_s, gates_s = small.moe.routing(tokens)
    assert torch.equal(chosen, chosen_s) and torch.equal(gates, gates_s)
    with torch.no_grad():
        assert (small.moe.run_expert(DEAD, tokens) == 0).all()
        # slicing a hidden layer may reorder a float sum, hence allclose rather than equal
        assert torch.allclose(small.moe(tokens), model.moe(tokens), rtol=1e-5, atol=1e-6)


def _swap_experts(experts: nn.Module, seed: int = 0) -> TopKMoE:
    torch.manual_seed(seed)
    layer = TopKMoE(D, H, E, top_k=2)
    layer.experts = experts
    return layer


def test_gated_experts():
    layer = _swap_experts(nn.ModuleList(_Gated(D, 12) for _ in range(E)))
    with torch.no_grad():
        layer.experts[1].w2.weight[:, [0, 3, 11]] = 0
        layer.experts[3].w2.weight.zero_()
    before = _params(layer)
    x = torch.randn(40, D)
    small = gp.compress(layer, gp.hierarchy.moe(layer), example_inputs=x)
    ex = small.experts
    assert ex[1].w1.out_features == ex[1].w3.out_features == ex[1].w2.in_features == 9
    assert isinstance(ex[3], ZeroExpert)
    assert _params(small) == before - 3 * 3 * D - 3 * 12 * D
    assert torch.allclose(small(x), layer(x), rtol=1e-5, atol=1e-6)


class _FusedGated(nn.Module):
    """Fused SwiGLU experts without the keep_experts protocol: dead experts stay as zero rows."""

    def __init__(self, e: int, d: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(e, d, hidden) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(e, hidden, d) / hidden**0.5)
        self.w3 = nn.Parameter(torch.randn(e, d, hidden) / d**0.5)


class _DenseMoE(nn.Module):
    """Every expert on every token, combined by the gates of the top-2 (zero elsewhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(D, E, bias=False)
        self.experts = _FusedGated(E, D, 12)

    def forward(self, x):
        ex = self.experts
        h = F.silu(torch.einsum("td,edh->teh", x, ex.w1)) * torch.einsum("td,edh->teh", x, ex.w3)
        y = torch.einsum("teh,ehd->ted", h, ex.w2)
        logits, chosen = self.router(x).topk(2, dim=-1)
        gates = torch.zeros(x.shape[0], E).scatter(1, chosen, logits.softmax(-1))
        return torch.einsum("te,ted->td", gates, y)


def test_fused_experts_without_the_protocol_keep_their_rows():
    torch.manual_seed(0)
    layer = _DenseMoE()
    with torch.no_grad():
        layer.experts.w2[:, [2, 7]] = 0
        layer.experts.w2[1] = 0  # a dead expert: no keep_experts, so its row stays
    x = torch.randn(30, D)
    small = gp.compress(layer, example_inputs=x)
    assert small.experts.w1.shape == small.experts.w3.shape == (E, D, 10)
    assert small.experts.w2.shape == (E, 10, D)
    assert _params(small) == _params(layer) - E * 2 * 3 * D
    assert torch.allclose(small(x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_compress_after_training(fused):
    torch.manual_seed(0)
    x = torch.randn(256, 4, D_IN)
    y = (x[:, :, :2].sum(dim=(1, 2)) > 0).long()
    model = MoEClassifier(D_IN, 16, num_classes=2, num_experts=E, fused=fused)
    opt = train(model, x, y, lam=0.3, lr=1e-2, epochs=8, batch_size=32)
    dead = opt.get_sparsity_report().levels["block"].zero_groups
    assert dead >= 1
    small = gp.compress(model, opt.hierarchy, example_inputs=x[:64])
    assert _params(small) < _params(model)
    ex = small.moe.experts
    if fused:
        assert ex.rows.count(None) >= dead and len(ex) == E
    else:
        assert sum(isinstance(m, ZeroExpert) for m in ex) >= dead


@pytest.mark.parametrize("fused", [False, True])
def test_save_and_load_round_trip(fused):
    model = _classifier(fused)
    _kill(model, fused)
    small = gp.compress(model).eval()
    buf = io.BytesIO()
    gp.save_compressed(small, buf)
    buf.seek(0)
    loaded = gp.load_compressed(lambda: _classifier(fused, seed=7), buf).eval()
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert _params(loaded) == _params(small)
    assert loaded.state_dict().keys() == small.state_dict().keys()


@pytest.mark.parametrize("fused", [False, True])
def test_compressed_model_trains_and_compiles(fused):
    model = _classifier(fused)
    _kill(model, fused)
    small = gp.compress(model)
    x, y = _inputs(), torch.arange(16) % C
    opt = torch.optim.Adam(small.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in small.parameters()]
    F.cross_entropy(small(x), y).backward()
    opt.step()
    assert all(p.grad is not None for p in small.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, small.parameters()))
    small.eval()
    compiled = torch.compile(small, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), small(x), rtol=1e-5, atol=1e-6)
    # training can go on with group_prox: removed experts are simply not in the hierarchy
    h = gp.hierarchy.moe(small)
    assert h.num_groups("block") == E - 1


@pytest.mark.parametrize("fused", [False, True])
def test_nothing_dead_keeps_the_size(fused):
    model = _classifier(fused)
    small = gp.compress(model, example_inputs=_inputs())
    assert len(small.group_prox_plan) == 0 and _params(small) == _params(model)


def test_multiple_keeps_some_dead_units():
    model = _classifier(False)
    _kill(model, False)
    small = gp.compress(model, example_inputs=_inputs(), multiple=8)
    assert small.moe.experts[0].fc1.out_features == 32  # 28 live units, rounded up to 32
    small = gp.compress(model, example_inputs=_inputs(), multiple=3)
    assert small.moe.experts[0].fc1.out_features == 30


def test_compressing_twice_composes():
    model = _classifier(True)
    _kill(model, True)
    small = gp.compress(model)
    with torch.no_grad():  # expert 3 is row 2 of the compressed tensors
        small.moe.experts.w_out[2] = 0
        small.moe.experts.b_out[2] = 0
    x = _inputs()
    smaller = gp.compress(small, example_inputs=x).eval()
    assert smaller.moe.experts.rows == [0, 1, None, None]
    assert len(smaller.group_prox_plan) == len(small.group_prox_plan) + 1
    buf = io.BytesIO()
    gp.save_compressed(smaller, buf)
    buf.seek(0)
    loaded = gp.load_compressed(lambda: _classifier(True, seed=3), buf).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), smaller(x))


def test_square_sequential_experts_and_unrecognised_ones():
    # In a Sequential, the second of two linear layers is the projection out, whatever the shapes.
    seq = _swap_experts(
        nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D)) for _ in range(E))
    )
    with torch.no_grad():
        seq.experts[0][2].weight[:, :3] = 0
    x = torch.randn(20, D)
    small = gp.compress(seq, example_inputs=x)
    assert small.experts[0][0].out_features == D - 3

    class Square(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    odd = _swap_experts(nn.ModuleList(Square() for _ in range(E)))
    with torch.no_grad():
        odd.experts[0].b.weight.zero_()
    with pytest.warns(UserWarning, match="'experts' is left uncompressed.*cannot tell which"):
        small = gp.compress(odd, example_inputs=x)
    assert _params(small) == _params(odd)


def test_zero_expert_output():
    z = ZeroExpert(D, 5)
    x = torch.randn(2, 3, D, dtype=torch.float64)
    assert z(x).shape == (2, 3, 5) and z(x).dtype == torch.float64 and not z(x).any()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert z(x.float()).dtype == nn.Linear(D, 5)(x.float()).dtype == torch.bfloat16


def test_fused_protocol_errors_name_the_module():
    from group_prox.compression import CompressionPlan, ReplaceOp

    layer = _DenseMoE()
    with pytest.raises(TypeError, match="'_FusedGated' have no keep_experts"):
        CompressionPlan.of([ReplaceOp("experts", "moe_keep_experts", {"keep": [0]})]).apply(layer)
    bad = ReplaceOp("experts", "moe_fused_hidden", {"keep": [0], "dims": {"w9": 2}})
    with pytest.raises(ValueError, match="'_FusedGated': has no fused tensor 'w9'"):
        CompressionPlan.of([bad]).apply(layer)
    assert isinstance(FusedExperts(2, 3, 4).rows, list)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(gp.compress(layer).group_prox_plan) == 0
