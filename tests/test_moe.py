"""gp.hierarchy.moe on the example MoE layer (ModuleList and fused experts) and gated experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import group_prox as gp
from examples.moe import ExpertMLP, MoEClassifier, TopKMoE, train

D, H, E = 6, 5, 4


def _layer(fused: bool, seed: int = 0) -> TopKMoE:
    torch.manual_seed(seed)
    return TopKMoE(D, H, E, top_k=2, fused=fused).double()


def _same_weights(src: TopKMoE, dst: TopKMoE) -> None:
    """Copy a ModuleList MoE into a fused one."""
    with torch.no_grad():
        dst.router.weight.copy_(src.router.weight)
        for e, ex in enumerate(src.experts):
            dst.experts.w_in[e].copy_(ex.fc1.weight.T)
            dst.experts.b_in[e].copy_(ex.fc1.bias)
            dst.experts.w_out[e].copy_(ex.fc2.weight.T)
            dst.experts.b_out[e].copy_(ex.fc2.bias)


@pytest.mark.parametrize("fused", [False, True])
def test_structure(fused):
    layer = _layer(fused)
    h = gp.hierarchy.moe(layer)
    assert h.level_names == ("base_level", "block")
    assert h.num_groups("base_level") == E * H and h.num_groups("block") == E
    # a hidden unit: its row of the input projection, its bias entry, its column of the output
    assert h.group_sizes("base_level") == [D + 1 + D] * (E * H)
    assert h.group_sizes("block") == [D * H + H + H * D + D] * E
    assert h.group_names("block")[2] == "experts.2"
    assert h.group_names("base_level")[H + 3] == "experts.1[3]"
    assert "router.weight" not in {lay.name for lay in h.tensors}


def test_fused_and_list_forms_compute_the_same_function():
    listed, fused = _layer(False), _layer(True)
    _same_weights(listed, fused)
    x = torch.randn(3, 7, D, dtype=torch.float64)
    torch.testing.assert_close(listed(x), fused(x))


def _zero(members) -> None:
    with torch.no_grad():
        for view in members:
            view.zero_()


def _reference(layer: TopKMoE, x: torch.Tensor, skip: int) -> torch.Tensor:
    """Token by token: the gated sum over the chosen experts other than ``skip``."""
    chosen, gates = layer.routing(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(layer.top_k):
            e = int(chosen[t, slot])
            if e != skip:
                out[t] += gates[t, slot] * layer.run_expert(e, x[t : t + 1])[0]
    return out


@pytest.mark.parametrize("fused", [False, True])
def test_zero_expert_contributes_nothing(fused):
    layer = _layer(fused)
    x = torch.randn(40, D, dtype=torch.float64)
    chosen, _ = layer.routing(x)
    victim = int(chosen[0, 0])
    h = gp.hierarchy.moe(layer)
    one = gp.Hierarchy({"one": {"e": _block_members(h, layer, victim, fused)}})
    gp.ProxSGD(
        layer.parameters(), lr=1.0, hierarchy=one, penalties={"one": gp.GroupLasso(1e9)}
    ).step()
    assert gp.get_sparsity_report(layer, h).levels["block"].zero_group_names == [
        f"experts.{victim}"
    ]
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(y, _reference(layer, x, skip=victim), rtol=0, atol=1e-12)
        assert (layer.run_expert(victim, x) == 0).all()


def _block_members(h, layer, e, fused):
    if fused:
        return [(p, 0, e) for p in layer.experts.parameters()]
    return list(layer.experts[e].parameters())


@pytest.mark.parametrize("fused", [False, True])
def test_zero_hidden_unit_equals_removed_unit(fused):
    layer = _layer(fused)
    e, j = 1, 3
    h = gp.hierarchy.moe(layer)
    g = h.group_names("base_level").index(f"experts.{e}[{j}]")
    x = torch.randn(9, D, dtype=torch.float64)
    with torch.no_grad():
        if fused:
            ex = layer.experts
            keep = [i for i in range(H) if i != j]
            w_in, b_in, w_out = ex.w_in[e][:, keep], ex.b_in[e][keep], ex.w_out[e][keep]
            removed = F.gelu(x @ w_in + b_in) @ w_out + ex.b_out[e]
            ex.w_in[e, :, j] = 0
            ex.b_in[e, j] = 0
            ex.w_out[e, j] = 0
        else:
            ex = layer.experts[e]
            small = ExpertMLP(D, H - 1).double()
            keep = [i for i in range(H) if i != j]
            small.fc1.weight.copy_(ex.fc1.weight[keep])
            small.fc1.bias.copy_(ex.fc1.bias[keep])
            small.fc2.weight.copy_(ex.fc2.weight[:, keep])
            small.fc2.bias.copy_(ex.fc2.bias)
            removed = small(x)
            ex.fc1.weight[j] = 0
            ex.fc1.bias[j] = 0
            ex.fc2.weight[:, j] = 0
        torch.testing.assert_close(layer.run_expert(e, x), removed, rtol=0, atol=1e-12)
    report = gp.get_sparsity_report(layer, h)
    assert report.levels["base_level"].zero_group_names == [h.group_names("base_level")[g]]


class _Gated(nn.Module):
    """Mixtral's expert: w2(silu(w1 x) * w3 x), registered in the order w1, w2, w3."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _Sparse(nn.Module):
    def __init__(self, expert, n=3):
        super().__init__()
        self.experts = nn.ModuleList(expert() for _ in range(n))


def test_gated_experts_recognise_the_down_projection():
    model = _Sparse(lambda: _Gated(4, 6))
    h = gp.hierarchy.moe(model)
    assert h.num_groups("base_level") == 3 * 6
    assert h.group_sizes("base_level")[0] == 4 + 4 + 4
    names = {lay.name: lay.dims for lay in h.tensors}
    assert names["experts.0.w2.weight"] == (1,) and names["experts.0.w1.weight"] == (0,)


def test_square_experts_need_the_down_name():
    model = _Sparse(lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="pass down=<its name>"):
        gp.hierarchy.moe(model)
    h = gp.hierarchy.moe(model, down="2")
    assert {lay.name: lay.dims for lay in h.tensors}["experts.0.2.weight"] == (1,)
    with pytest.raises(ValueError, match="down='fc9' is not one of"):
        gp.hierarchy.moe(model, down="fc9")


def test_errors():
    with pytest.raises(TypeError, match=r"expected an nn\.Module"):
        gp.hierarchy.moe("model")
    with pytest.raises(ValueError, match="no module of the model has an `experts`"):
        gp.hierarchy.moe(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"has 1 nn\.Linear"):
        gp.hierarchy.moe(_Sparse(lambda: nn.Linear(3, 3)))


@pytest.mark.parametrize("fused", [False, True])
def test_training_removes_units_and_experts(fused):
    torch.manual_seed(0)
    x = torch.randn(256, 4, 8)
    y = (x[:, :, :2].sum(dim=(1, 2)) > 0).long()
    model = MoEClassifier(8, 16, num_classes=2, num_experts=4, fused=fused)
    opt = train(model, x, y, lam=0.2, lr=1e-2, epochs=8, batch_size=32)
    report = opt.get_sparsity_report()
    assert report.levels["base_level"].zero_groups > 0
    assert 1 <= report.levels["block"].zero_groups < 4
    for name in report.levels["block"].zero_group_names:
        e = int(name.rpartition(".")[2])
        params = (
            [p[e] for p in model.moe.experts.parameters()]
            if fused
            else list(model.moe.experts[e].parameters())
        )
        assert all((p == 0).all() for p in params)
