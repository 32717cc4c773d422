"""The hf-fused-experts family: transformers' fused MoE experts (Mixtral, Qwen2-MoE, Qwen3-MoE)."""

from __future__ import annotations

import io

import pytest
import torch

transformers = pytest.importorskip("transformers")

import group_prox as gp  # noqa: E402
from group_prox.compression import CompressionPlan, ReplaceOp  # noqa: E402
from group_prox.families import hf_moe  # noqa: E402
from tests.family_helpers import train_steps  # noqa: E402

H, I_MIX, I_MOE, I_SHARED, E, VOCAB = 32, 64, 16, 48, 4, 100


def _model(kind: str, seed: int = 0, dtype=torch.float64, impl: str = "eager"):
    torch.manual_seed(seed)
    common = dict(
        hidden_size=H,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        num_experts_per_tok=2,
        experts_implementation=impl,
    )
    if kind == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=I_MIX, num_local_experts=E, **common)
        model = transformers.MixtralForCausalLM(config)
    elif kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            intermediate_size=64,
            moe_intermediate_size=I_MOE,
            shared_expert_intermediate_size=I_SHARED,
            num_experts=E,
            **common,
        )
        model = transformers.Qwen2MoeForCausalLM(config)
    else:
        config = transformers.Qwen3MoeConfig(
            intermediate_size=64, moe_intermediate_size=I_MOE, num_experts=E, **common
        )
        model = transformers.Qwen3MoeForCausalLM(config)
    return model.to(dtype).eval()


def _hidden(kind: str) -> int:
    return I_MIX if kind == "mixtral" else I_MOE


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


KINDS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def _mlp(h: gp.Hierarchy, level: str) -> tuple[str, ...]:
    """The groups of ``level`` in the MoE sublayers (the decoder family adds attention groups)."""
    return tuple(n for n in h.group_names(level) if ".self_attn" not in n)


@pytest.mark.parametrize("kind", KINDS)
def test_groups_per_level(kind):
    model = _model(kind)
    h = gp.hierarchy.transformer(model)
    shared = I_SHARED if kind == "qwen2_moe" else 0
    assert len(_mlp(h, "base_level")) == 2 * (E * _hidden(kind) + shared)
    assert h.num_groups("expert") == 2 * E
    assert _mlp(h, "layer") == ("model.layers.0.mlp", "model.layers.1.mlp")
    names = h.group_names("base_level")
    assert "model.layers.1.mlp.experts.3[0]" in names
    if shared:
        assert f"model.layers.0.mlp.shared_expert[{I_SHARED - 1}]" in names
    # A hidden unit is its gate row, its up row and its down column: 3·H entries (one model
    # feature per expert, the old reading of the fused tensors, would have been 2·2I + I).
    sizes = dict(zip(names, h.group_sizes("base_level"), strict=True))
    assert sizes["model.layers.0.mlp.experts.2[5]"] == 3 * H
    # The sublayer: router, experts (and shared expert with its gate) and the pre-norm.
    block = model.model.layers[0].mlp
    norm = model.model.layers[0].post_attention_layernorm
    layer_size = dict(zip(h.group_names("layer"), h.group_sizes("layer"), strict=True))
    assert layer_size["model.layers.0.mlp"] == _numel(block) + norm.weight.numel()


def test_moe_builder_groups_hidden_units_not_model_features():
    """hierarchy.moe used to read gate_up_proj [E, 2I, H] as [E, d_in, d_hidden]: one group per
    model feature (H per expert) instead of per hidden unit (I per expert)."""
    model = _model("mixtral")
    h = gp.hierarchy.moe(model)
    assert h.num_groups("base_level") == 2 * E * I_MIX
    assert h.num_groups("block") == 2 * E
    t = gp.hierarchy.transformer(model)
    assert set(h.group_names("base_level")) == set(_mlp(t, "base_level"))
    # The group covers exactly rows j and I + j of gate_up_proj[e] and column j of down_proj[e].
    experts = model.model.layers[0].mlp.experts
    ex = gp.Hierarchy({"u": {"g": hf_moe.expert_groups("x", experts)[0]["x.1[3]"]}})
    before = {n: p.detach().clone() for n, p in experts.named_parameters()}
    opt = gp.ProxSGD(
        experts.parameters(), lr=1.0, hierarchy=ex, penalties={"u": gp.GroupLasso(1e9)}
    )
    opt.step()
    zero_up = (experts.gate_up_proj != before["gate_up_proj"]).nonzero().tolist()
    assert sorted({(e, r) for e, r, _ in zero_up}) == [(1, 3), (1, I_MIX + 3)]
    zero_down = (experts.down_proj != before["down_proj"]).nonzero().tolist()
    assert sorted({(e, c) for e, _, c in zero_down}) == [(1, 3)]


def _plant(model, kind: str, dead_layer: int | None = None) -> int:
    """Zero: expert 1 of every layer, the even hidden units of every expert, shared neurons ≥ 5;
    and all of layer ``dead_layer``'s MoE sublayer. Returns the parameters zeroed in groups."""
    zeroed = 0
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            block, ex = layer.mlp, layer.mlp.experts
            n_hidden = ex.down_proj.shape[2]
            if i == dead_layer:
                for p in block.parameters():
                    p.zero_()
                layer.post_attention_layernorm.weight.zero_()
                zeroed += _numel(block) + H
                continue
            ex.gate_up_proj[1] = 0
            ex.down_proj[1] = 0
            zeroed += ex.gate_up_proj[1].numel() + ex.down_proj[1].numel()
            even = torch.arange(0, n_hidden, 2)
            ex.down_proj[:, :, even] = 0
            ex.gate_up_proj[:, even] = 0
            ex.gate_up_proj[:, n_hidden + even] = 0
            zeroed += (E - 1) * len(even) * 3 * H
            if hasattr(block, "shared_expert"):
                s = block.shared_expert
                s.down_proj.weight[:, 5:] = 0
                s.gate_proj.weight[5:] = 0
                s.up_proj.weight[5:] = 0
                zeroed += (I_SHARED - 5) * 3 * H
    return zeroed


def _assert_same(a, b, x, atol=1e-10):
    with torch.no_grad():
        ya, yb = a(x).logits, b(x).logits
        assert (ya - yb).abs().max().item() <= atol
        # With a KV cache: prefix, then one token at a time.
        ca = a(x[:, :5], use_cache=True)
        cb = b(x[:, :5], use_cache=True)
        for t in range(5, x.shape[1]):
            ca = a(x[:, t : t + 1], cache=ca.past_key_values, use_cache=True)
            cb = b(x[:, t : t + 1], cache=cb.past_key_values, use_cache=True)
            assert (ca.logits - cb.logits).abs().max().item() <= atol
            assert (ca.logits - ya[:, t : t + 1]).abs().max().item() <= 1e-8


@pytest.mark.parametrize("kind", KINDS)
def test_planted_zeros_are_removed_with_the_same_outputs(kind):
    model = _model(kind)
    zeroed = _plant(model, kind, dead_layer=1)
    x = _tokens()
    small = gp.compress(model, example_inputs=x)
    removed = _numel(model) - _numel(small)
    assert removed >= 0.9 * zeroed
    ex0 = small.model.layers[0].mlp.experts
    assert ex0.num_experts == E - 1 and ex0.gate_up_proj.shape[:2] == (E - 1, _hidden(kind))
    ex1 = small.model.layers[1].mlp.experts
    assert ex1.gate_up_proj.shape[:2] == (1, 2)  # the dead sublayer: one expert of one unit
    if kind == "qwen2_moe":
        assert small.model.layers[0].mlp.shared_expert.down_proj.in_features == 5
    assert small.model.layers[0].mlp.gate.weight.shape == (E, H)  # the router is untouched
    _assert_same(model, small, x)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(x, **gen), small.generate(x, **gen))
    # Every experts implementation sees the remapped routing.
    for impl in ("batched_mm",):
        model.set_experts_implementation(impl)
        small.set_experts_implementation(impl)
        _assert_same(model, small, x)


def test_float32_grouped_mm_and_multiple():
    model = _model("mixtral", dtype=torch.float32, impl="grouped_mm")
    _plant(model, "mixtral")
    x = _tokens()
    small = gp.compress(model, example_inputs=x, multiple=8)
    assert small.model.layers[0].mlp.experts.gate_up_proj.shape[1] == 2 * 32
    with torch.no_grad():
        y, z = model(x).logits, small(x).logits
    assert ((y - z).abs().max() / y.abs().max()).item() <= 1e-5


def test_save_load_round_trip_and_compressing_twice():
    model = _model("qwen2_moe")
    _plant(model, "qwen2_moe")
    x = _tokens()
    small = gp.compress(model, example_inputs=x)
    with torch.no_grad():  # one more expert dies: compressing again composes the index maps
        small.model.layers[0].mlp.experts.down_proj[0] = 0
        expected = small(x).logits
    smaller = gp.compress(small, example_inputs=x)
    assert smaller.model.layers[0].mlp.experts.num_experts == E - 2
    buf = io.BytesIO()
    gp.save_compressed(smaller, buf)
    buf.seek(0)
    loaded = gp.load_compressed(lambda: _model("qwen2_moe", seed=7), buf).eval()
    with torch.no_grad():
        assert (loaded(x).logits - expected).abs().max().item() <= 1e-10
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_prox_training_zeroes_groups_then_compress():
    model = _model("qwen2_moe").train()
    h = gp.hierarchy.transformer(model)
    opt = gp.ProxAdam(
        model.parameters(),
        lr=1e-2,
        hierarchy=h,
        penalties={"base_level": gp.GroupLasso(5.0), "expert": gp.GroupLasso(5.0)},
    )
    x = _tokens()
    train_steps(opt, lambda: model(x, labels=x).loss, 3)
    model.eval()
    report = gp.get_sparsity_report(model, h)
    assert report.levels["base_level"].zero_group_names
    small = gp.compress(model, h, example_inputs=x)
    assert _numel(small) < _numel(model)
    _assert_same(model, small, x)


def test_frozen_parameters_are_left_out():
    model = _model("mixtral")
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].mlp.requires_grad_(False)
    model.model.layers[0].post_attention_layernorm.requires_grad_(False)
    h = gp.hierarchy.transformer(model)
    assert len(_mlp(h, "base_level")) == E * I_MIX
    assert h.num_groups("expert") == E
    assert _mlp(h, "layer") == ("model.layers.1.mlp",)
    assert all(p.requires_grad for p in h.params)
    frozen = gp.hierarchy.transformer(model, include_frozen=True)
    assert len(_mlp(frozen, "base_level")) == 2 * E * I_MIX


def test_layout_variants_and_bad_layouts():
    experts = _model("mixtral").model.layers[0].mlp.experts
    lay = hf_moe.experts_layout(experts)
    assert (lay.gated, lay.transposed, lay.concatenated, lay.hidden) == (True, False, True, I_MIX)
    assert lay.up_rows(3) == [3, I_MIX + 3]
    # A module of the same names outside transformers: transposition read off the shapes.
    plain = torch.nn.Module()
    plain.gate_up_proj = torch.nn.Parameter(torch.zeros(E, H, 2 * 8))
    plain.down_proj = torch.nn.Parameter(torch.zeros(E, 8, H))
    assert hf_moe.experts_layout(plain).transposed
    plain.down_proj = torch.nn.Parameter(torch.zeros(E, 7, H))
    with pytest.raises(ValueError, match="neither"):
        hf_moe.experts_layout(plain)
    holder = torch.nn.Module()
    holder.experts = plain
    with pytest.raises(ValueError, match="fused experts 'experts'"):
        gp.hierarchy.moe(holder)
    with pytest.warns(UserWarning, match="left uncompressed"):
        gp.compress(holder)


def test_gpt_oss_transposed_interleaved_experts_with_biases():
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        hidden_size=H,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        num_local_experts=E,
        num_experts_per_tok=2,
        experts_implementation="eager",
        layer_types=["full_attention"] * 2,
    )
    model = transformers.GptOssForCausalLM(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    h = gp.hierarchy.transformer(model)
    assert (h.num_groups("base_level"), h.num_groups("expert")) == (2 * E * 16, 2 * E)
    lay = hf_moe.experts_layout(model.model.layers[0].mlp.experts)
    assert (lay.transposed, lay.concatenated, lay.up_bias) == (True, False, "gate_up_proj_bias")
    assert lay.up_rows(3) == [6, 7]
    x = _tokens()
    with torch.no_grad():
        for layer in model.model.layers:
            ex = layer.mlp.experts
            ex.down_proj[2] = 0
            ex.down_proj_bias[2] = 0
            ex.down_proj[:, ::2, :] = 0
    small = gp.compress(model, example_inputs=x)
    ex = small.model.layers[0].mlp.experts
    assert ex.gate_up_proj.shape == (E - 1, H, 16) and ex.down_proj.shape == (E - 1, 8, H)
    _assert_same(model, small, x)


def test_plans_for_another_architecture_are_refused():
    model = _model("mixtral")
    experts = "model.layers.0.mlp.experts"
    bad = [
        ReplaceOp(experts, "hf_experts_keep", {"keep": [0, 1], "num_experts": E + 1}),
        ReplaceOp(experts, "hf_experts_keep", {"keep": [1, 0], "num_experts": E}),
        ReplaceOp(experts, "hf_experts_hidden", {"keep": [I_MIX]}),
        ReplaceOp(experts, "hf_experts_hidden", {"keep": [0], "dims": {}}),
        ReplaceOp("model.layers.0.mlp.gate", "hf_experts_hidden", {"keep": [0]}),
    ]
    for op in bad:
        with pytest.raises(ValueError):
            CompressionPlan.of([op]).apply(model)
