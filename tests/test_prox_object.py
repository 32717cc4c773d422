"""HierarchicalProx: the prox the optimizers hold, usable on its own, and what it records."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import group_prox as gp
from group_prox.kernels import group_sq_norms

from .identical import assert_identical


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _hierarchy(model: nn.Sequential) -> gp.Hierarchy:
    first, second = model[0], model[2]
    units = [[(first.weight, 0, i), (first.bias, 0, i), (second.weight, 1, i)] for i in range(8)]
    return gp.Hierarchy(
        {"unit": units, "layer": [[first.weight, first.bias, second.weight]]}, names=model
    )


def _penalties() -> dict[str, gp.Penalty]:
    return {"unit": gp.GroupLasso(0.8), "layer": gp.GroupLasso(0.1)}


def _train(opt: torch.optim.Optimizer, model: nn.Module, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_the_optimizer_step_is_torch_then_the_prox():
    """ProxSGD's step equals torch's SGD step followed by prox.apply_(lr) on its own."""
    a, b = _model(), _model()
    opt = gp.ProxSGD(
        a.parameters(), lr=0.1, momentum=0.9, hierarchy=_hierarchy(a), penalties=_penalties()
    )
    sgd = torch.optim.SGD(
        b.parameters(),
        lr=0.1,
        momentum=0.9,
        foreach=opt.defaults["foreach"],
        fused=opt.defaults["fused"],
    )
    prox = gp.HierarchicalProx(_hierarchy(b), _penalties())
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        for model, o in ((a, opt), (b, sgd)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
        prox.apply_(0.1)
    assert_identical(a.state_dict(), b.state_dict())
    assert opt.prox is not None and opt.prox.penalties["unit"].lam == 0.8


def test_group_norms_after_a_step_cost_no_read_and_match_a_fresh_read():
    model = _model()
    opt = gp.ProxSGD(
        model.parameters(), lr=0.2, hierarchy=_hierarchy(model), penalties=_penalties()
    )
    _train(opt, model)
    prox = opt.prox
    atom_sq, level_sq = prox.group_sq_norms()
    fresh_atoms, fresh_levels = group_sq_norms(prox.plan)
    torch.testing.assert_close(atom_sq, fresh_atoms)
    for mine, fresh in zip(level_sq, fresh_levels):
        torch.testing.assert_close(mine, fresh)
        assert torch.equal(mine == 0, fresh == 0)  # exact zeros are exact in both
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # a write: the record no longer holds
    atom_sq, _ = prox.group_sq_norms()
    torch.testing.assert_close(atom_sq, group_sq_norms(prox.plan)[0])


def test_group_norms_are_computed_once_until_a_write(monkeypatch):
    """A controller and the optimizer asking for the group norms after one step share one
    computation; a write to a parameter makes the next call read again."""
    model = _model()
    opt = gp.ProxSGD(
        model.parameters(), lr=0.2, hierarchy=_hierarchy(model), penalties=_penalties()
    )
    _train(opt, model)
    prox = opt.prox
    calls = []
    level_sq_norms = type(prox.plan).level_sq_norms
    monkeypatch.setattr(
        type(prox.plan),
        "level_sq_norms",
        lambda plan, atom_sq: calls.append(1) or level_sq_norms(plan, atom_sq),
    )
    first = prox.group_sq_norms()
    second = prox.group_sq_norms()
    assert len(calls) == 1
    assert first[0] is second[0] and all(a is b for a, b in zip(first[1], second[1]))
    with torch.no_grad():
        model[2].weight.mul_(0.5)
    third = prox.group_sq_norms()  # a fresh read of every tensor
    assert third[0] is not first[0]
    torch.testing.assert_close(third[0], group_sq_norms(prox.plan)[0])
    torch.testing.assert_close(third[1][0], group_sq_norms(prox.plan)[1][0])


def test_freeze_zero_groups_and_state_dict_round_trip():
    model = _model()
    opt = gp.ProxSGD(
        model.parameters(), lr=0.5, hierarchy=_hierarchy(model), penalties=_penalties()
    )
    _train(opt, model, steps=5)
    prox = opt.prox
    held = prox.freeze_zero_groups()
    assert prox.frozen and held == opt.freeze_zero_groups()
    state = prox.state_dict()
    assert state["frozen"].dtype == torch.bool
    other = gp.HierarchicalProx(_hierarchy(model), _penalties())
    other.load_state_dict(state)
    assert other.frozen and torch.equal(other.frozen_mask, prox.frozen_mask)


def test_zero_groups_sets_exact_zeros_and_refuses_a_wrong_mask():
    model = _model()
    prox = gp.HierarchicalProx(_hierarchy(model), _penalties())
    dead = torch.zeros(8, dtype=torch.bool)
    dead[[1, 5]] = True
    prox.zero_groups_("unit", dead)
    assert torch.count_nonzero(model[0].weight[[1, 5]]) == 0
    assert torch.count_nonzero(model[2].weight[:, [1, 5]]) == 0
    assert torch.count_nonzero(model[0].weight[0]) > 0
    with pytest.raises(ValueError, match="bool tensor of 8 entries for level 'unit'"):
        prox.zero_groups_("unit", torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="level 'nope' has no penalty"):
        prox.zero_groups_("nope", dead)


def test_copies_continue_bit_for_bit():
    model = _model()
    opt = gp.ProxSGD(
        model.parameters(), lr=0.2, hierarchy=_hierarchy(model), penalties=_penalties()
    )
    _train(opt, model, steps=2)
    for copied_model, copied in (
        copy.deepcopy((model, opt)),
        pickle.loads(pickle.dumps((model, opt))),
    ):
        assert copied.prox is not opt.prox
        assert copied.prox.hierarchy.tensors[0].param is copied_model[0].weight
        _train(copied, copied_model, steps=2)
    _train(opt, model, steps=2)
    assert_identical(model.state_dict(), copied_model.state_dict())


def test_bad_input_is_refused_with_the_level_named():
    model = _model()
    with pytest.raises(ValueError, match="level 'nope'"):
        gp.HierarchicalProx(_hierarchy(model), {"nope": gp.GroupLasso(1.0)})
    with pytest.raises(TypeError, match=r"must be a group_prox\.Hierarchy"):
        gp.HierarchicalProx(model, _penalties())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not among the optimizer's parameters"):
        gp.HierarchicalProx(_hierarchy(model), _penalties(), [[model[0].weight]])
    assert "HierarchicalProx(3 tensors" in repr(gp.HierarchicalProx(_hierarchy(model)))
