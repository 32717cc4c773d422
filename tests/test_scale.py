"""Hierarchies and plans built on the meta device, then bound to the materialised model; group
tables (levels given as arrays)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import group_prox as gp
from group_prox.hierarchy import GroupTable, Part

transformers = pytest.importorskip("transformers")


def _llama() -> object:
    return transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=40,
    )


def _qwen2_moe() -> object:
    return transformers.Qwen2MoeConfig(
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=12,
        shared_expert_intermediate_size=20,
        num_experts=6,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=40,
    )


def _model(config: object, meta: bool) -> nn.Module:
    cls = (
        transformers.LlamaForCausalLM
        if isinstance(config, transformers.LlamaConfig)
        else transformers.Qwen2MoeForCausalLM
    )
    if meta:
        with torch.device("meta"):
            return cls(config)
    torch.manual_seed(0)
    return cls(config)


def _layout(h: gp.Hierarchy) -> list[tuple]:
    return [(lay.name, tuple(lay.param.shape), lay.dims, lay.offset) for lay in h.tensors]


@pytest.mark.parametrize("config", [_llama, _qwen2_moe])
def test_meta_build_equals_the_real_build(config):
    meta = gp.hierarchy.transformer(_model(config(), meta=True))
    real = gp.hierarchy.transformer(_model(config(), meta=False))
    assert meta.signature() == real.signature()
    assert _layout(meta) == _layout(real)
    for level in real.level_names:
        assert meta.group_names(level) == real.group_names(level)
        assert meta.group_sizes(level) == real.group_sizes(level)
    assert all(lay.param.is_meta for lay in meta.tensors)


@pytest.mark.parametrize("config", [_llama, _qwen2_moe])
def test_tables_build_the_hierarchy_of_their_groups_one_by_one(config):
    """A table's groups written out member by member (as builders wrote them before tables) give
    the same hierarchy, atom for atom."""
    model = _model(config(), meta=False)
    h = gp.hierarchy.transformer(model)
    levels = gp.families.registry.levels_for(model, "transformer", "test")
    assert any(isinstance(groups, GroupTable) for groups in levels.values())
    plain = {level: {name: groups[name] for name in groups} for level, groups in levels.items()}
    one_by_one = gp.Hierarchy(plain, names=model)
    assert one_by_one.signature() == h.signature()
    assert _layout(one_by_one) == _layout(h)
    for level in h.level_names:
        for mine, theirs in zip(h.groups(level)[:50], one_by_one.groups(level)[:50]):
            assert [torch.equal(a, b) for a, b in zip(mine, theirs)] == [True] * len(mine)


def _penalties() -> dict[str, gp.GroupLasso]:
    return {
        "base_level": gp.GroupLasso(0.05),
        "kv_head": gp.GroupLasso(0.02),
        "layer": gp.GroupLasso(0.01),
    }


@pytest.mark.parametrize("config", [_llama, _qwen2_moe])
def test_bound_hierarchy_and_prox_step_like_direct_ones(config):
    meta_model = _model(config(), meta=True)
    h_meta = gp.hierarchy.transformer(meta_model)
    prox_meta = gp.HierarchicalProx(h_meta, _penalties(), allow_meta=True)

    models = [_model(config(), meta=False) for _ in range(4)]
    for m in models:
        for p in m.parameters():
            p.grad = torch.full_like(p, 1e-2)
    direct_h = gp.hierarchy.transformer(models[0])
    bound_h = h_meta.bind(models[1])
    assert bound_h.signature() == direct_h.signature()
    assert [lay.param for lay in bound_h.tensors] == [
        dict(models[1].named_parameters())[lay.name] for lay in h_meta.tensors
    ]
    opts = [
        gp.ProxSGD(m.parameters(), lr=0.5, momentum=0.9, hierarchy=h, penalties=_penalties())
        for m, h in ((models[0], direct_h), (models[1], bound_h))
    ]
    for opt in opts:
        opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)

    # The prox bound from the meta plan applies exactly as one built on the real model.
    direct = gp.HierarchicalProx(gp.hierarchy.transformer(models[2]), _penalties())
    bound = prox_meta.bind(models[3])
    assert bound.plan.levels[0].atom_group is prox_meta.plan.levels[0].atom_group  # shared
    direct.apply_(0.5)
    bound.apply_(0.5)
    zeros = 0
    for a, b in zip(models[2].parameters(), models[3].parameters()):
        assert torch.equal(a, b)
        zeros += int((a == 0).sum())
    assert zeros > 0, "the penalties should zero some groups"
    assert all(lay.param.is_meta for lay in h_meta.tensors), "binding leaves the meta ones alone"


def test_bind_refuses_other_names_shapes_and_meta_and_changes_nothing():
    meta_model = _model(_llama(), meta=True)
    h = gp.hierarchy.transformer(meta_model)
    prox = gp.HierarchicalProx(h, _penalties(), allow_meta=True)
    before = [lay.param for lay in h.tensors]
    real = dict(_model(_llama(), meta=False).named_parameters())
    name = "model.layers.1.mlp.up_proj.weight"

    missing = {k: v for k, v in real.items() if k != name}
    with pytest.raises(ValueError, match=rf"no parameter named '{name}'"):
        h.bind(missing)
    wrong = {**real, name: nn.Parameter(torch.zeros(3, 4))}
    with pytest.raises(ValueError, match=rf"'{name}' has shape \(3, 4\), the hierarchy's has"):
        prox.bind(wrong)
    with pytest.raises(ValueError, match=rf"'{name}' is on the meta device"):
        h.bind({**real, name: dict(meta_model.named_parameters())[name]})
    with pytest.raises(ValueError, match="given for both"):
        h.bind({**real, name: real["model.layers.0.mlp.up_proj.weight"]})
    with pytest.raises(TypeError, match=r"nn\.Module or a mapping"):
        h.bind([1, 2])
    assert [lay.param for lay in h.tensors] == before
    assert [lay.param for lay in prox.plan.tensors] == before


def test_meta_parameters_are_refused_for_stepping():
    meta_model = _model(_llama(), meta=True)
    h = gp.hierarchy.transformer(meta_model)
    with pytest.raises(ValueError, match=r"is on the meta device.*to_empty"):
        gp.ProxSGD(meta_model.parameters(), lr=0.1, hierarchy=h, penalties=_penalties())
    with pytest.raises(ValueError, match=r"is on the meta device.*to_empty"):
        gp.HierarchicalProx(h, _penalties())
    prox = gp.HierarchicalProx(h, _penalties(), allow_meta=True)
    with pytest.raises(ValueError, match=r"on the meta device.*prox\.bind\(model\)"):
        prox.apply_(0.1)
    with pytest.raises(ValueError, match=r"on the meta device"):
        prox.check()


def test_group_table_checks_and_writes_members_like_hand_written_groups():
    w = nn.Parameter(torch.randn(6, 4))
    e = nn.Parameter(torch.randn(3, 5, 2))
    rows = np.arange(3) * 2
    table = GroupTable(
        ["r0", "r1", "r2"],
        [
            Part(w, (0,), rows, (2,)),
            Part(e, (0, 1), np.stack([np.arange(3), [4, 0, 2]], 1), (1, 1), ints=True),
        ],
    )
    assert table["r1"] == [(w, 0, slice(2, 4)), (e, (0, 1), (1, 0))]
    assert list(table) == ["r0", "r1", "r2"] and len(table) == 3
    h = gp.Hierarchy({"rows": table, "all": GroupTable.concat([{"all": [w, e]}])})
    ref = gp.Hierarchy({"rows": dict(table), "all": {"all": [w, e]}})
    assert h.signature() == ref.signature() and h.group_sizes("rows") == [8 + 2] * 3
    # copies keep working (the optimizer's deepcopy, with_level)
    assert copy.deepcopy(h).signature() == h.signature()
    assert h.with_level("top", [[w, e]]).num_groups("top") == 1

    with pytest.raises(ValueError, match=r"level 'x', group 'b', member 0: indices 5:7 are out"):
        gp.Hierarchy({"x": GroupTable(["a", "b"], [Part(w, (0,), [0, 5], (2,))])})
    with pytest.raises(ValueError, match=r"level 'x': two groups are named 'a'"):
        gp.Hierarchy(
            {
                "x": GroupTable.concat(
                    [{"a": [(w, 0, 0)]}, GroupTable(["a"], [Part(w, (0,), [1], (1,))])]
                )
            }
        )
    with pytest.raises(ValueError, match=r"groups 'a' and 'b' overlap"):
        gp.Hierarchy({"x": GroupTable(["a", "b"], [Part(w, (0,), [0, 1], (2,))])})
    with pytest.raises(ValueError, match="one per group and dim"):
        GroupTable(["a", "b"], [Part(w, (0,), [0], (1,))])
