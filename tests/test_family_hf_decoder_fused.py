"""The Hugging Face decoder family on fused projections (Phi-3) and Gemma-2/Gemma-3 layers.

Phi-3 fuses q/k/v into ``qkv_proj`` (query rows, then key rows, then value rows) and the gate and
up projections into ``gate_up_proj`` (gate rows, then up rows); its attention splits ``qkv_proj``
at ``config.num_attention_heads * head_dim``, so a compressed one is a FusedQKVAttention carrying
its own head counts. Gemma-2/Gemma-3 close each branch with a post-norm (``(1 + w) · x / rms(x)``,
zero for a zero branch), softcap the attention scores (Gemma-2) and alternate sliding-window and
full layers. Tiny models built from configs (never downloaded).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import group_prox as gp
from group_prox.compression.plan import CompressionPlan, ReplaceOp
from group_prox.compression.report import count_params
from group_prox.families import hf_decoder
from group_prox.families.hf_decoder import FusedQKVAttention, HFZeroAttention, HFZeroMLP
from tests.family_helpers import randomise_, train_steps

transformers = pytest.importorskip("transformers")

from .test_family_hf_decoder import (  # noqa: E402
    _check_same,
    _zero_groups,
)
from .test_family_hf_decoder import _roundtrip as decoder_roundtrip  # noqa: E402

HIDDEN, INTER, LAYERS, HEADS, KV, VOCAB = 64, 128, 2, 4, 2, 100
HD = HIDDEN // HEADS
COMMON = dict(
    hidden_size=HIDDEN,
    intermediate_size=INTER,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV,
    vocab_size=VOCAB,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Gemma: a sliding window shorter than the test sequences, layer 0 sliding, layer 1 full.
GEMMA = dict(head_dim=HD, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
ARCHS = {
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**GEMMA, "attn_logit_softcapping": 50.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA),
}


def _fresh(arch: str) -> nn.Module:
    cfg_name, model_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**COMMON, **extra)
    model = getattr(transformers, model_name)(cfg).double().eval()
    model.config._attn_implementation = "eager"  # SDPA has no softcapping
    return model


@torch.no_grad()
def _model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _fresh(arch)
    return randomise_(model)


def _roundtrip(arch: str, small: nn.Module) -> None:
    decoder_roundtrip(arch, small, _fresh)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_group_counts(arch):
    model = _model(arch)
    h = gp.hierarchy.transformer(model)
    assert h.num_groups("base_level") == LAYERS * (HEADS + INTER)
    assert h.num_groups("kv_head") == LAYERS * KV
    assert set(h.group_names("layer")) == {
        f"model.layers.{i}.{s}" for i in range(LAYERS) for s in ("self_attn", "mlp")
    }
    assert h.num_groups("whole_layer") == LAYERS
    levels = hf_decoder.levels(model)
    layer = model.model.layers[0]
    if arch == "phi3":
        # Query head 1: rows 16:32 of qkv_proj; kv head 1: key rows 80:96, value rows 112:128.
        w = layer.self_attn.qkv_proj.weight
        head = levels["base_level"]["model.layers.0.self_attn.head[1]"]
        assert [(m[0] is w, m[2]) for m in head[:1]] == [(True, slice(HD, 2 * HD))]
        kv = levels["kv_head"]["model.layers.0.self_attn.kv_head[1]"]
        q_end = HEADS * HD
        assert [m[2] for m in kv[:2]] == [
            slice(q_end + HD, q_end + 2 * HD),
            slice(q_end + (KV + 1) * HD, q_end + (KV + 2) * HD),
        ]
        # Neuron 5: gate row 5 and up row INTER + 5 of gate_up_proj, column 5 of down_proj.
        neuron = levels["base_level"]["model.layers.0.mlp[5]"]
        assert [m[2] for m in neuron] == [slice(5, 6), slice(INTER + 5, INTER + 6), slice(5, 6)]
    else:  # the post-norms close their branch: in its sublayer group
        attn = {id(p) for p in levels["layer"]["model.layers.0.self_attn"]}
        mlp = {id(p) for p in levels["layer"]["model.layers.0.mlp"]}
        assert id(layer.post_attention_layernorm.weight) in attn
        assert id(layer.pre_feedforward_layernorm.weight) in mlp
        assert id(layer.post_feedforward_layernorm.weight) in mlp


@pytest.mark.parametrize("arch", list(ARCHS))
def test_dead_query_heads_and_neurons_are_removed(arch):
    model = _model(arch)
    zeroed = _zero_groups(
        model,
        {
            "base_level": [
                "model.layers.0.self_attn.head[0]",  # unequal heads per kv head: gathered
                "model.layers.1.self_attn.head[0]",  # one head of each kv head: grouped
                "model.layers.1.self_attn.head[3]",
                *(f"model.layers.0.mlp[{i}]" for i in range(0, INTER, 2)),
                *(f"model.layers.1.mlp[{i}]" for i in range(5, 100)),
            ]
        },
    )
    small = gp.compress(model)
    assert count_params(model) - count_params(small) >= 0.9 * zeroed
    a0, a1 = small.model.layers[0].self_attn, small.model.layers[1].self_attn
    m0, m1 = small.model.layers[0].mlp, small.model.layers[1].mlp
    if arch == "phi3":
        assert isinstance(a0, FusedQKVAttention) and a0.gathered
        assert (a0.num_heads, a0.num_key_value_heads, a0.num_key_value_groups) == (3, KV, 1)
        assert a0.qkv_proj.out_features == (3 + 2 * KV) * HD
        assert not a1.gathered and (a1.num_heads, a1.num_key_value_groups) == (2, 1)
        assert m0.gate_up_proj.out_features == INTER and m0.down_proj.in_features == INTER // 2
        assert m1.gate_up_proj.out_features == 2 * (INTER - 95)
    else:
        assert a0.q_proj.out_features == 3 * HD and a1.q_proj.out_features == 2 * HD
        assert m0.down_proj.in_features == INTER // 2 and m1.up_proj.out_features == INTER - 95
    diff = _check_same(model, small)
    print(f"{arch}: removed {count_params(model) - count_params(small)} of {zeroed}, diff {diff}")
    _roundtrip(arch, small)
    assert set(small.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_dead_kv_heads_and_sublayers_are_removed(arch):
    model = _model(arch)
    zeroed = _zero_groups(
        model,
        {
            "kv_head": [
                "model.layers.0.self_attn.kv_head[1]",
                "model.layers.1.self_attn.kv_head[0]",
            ],
            "base_level": ["model.layers.1.self_attn.head[3]"],
        },
    )
    small = gp.compress(model)
    assert count_params(model) - count_params(small) >= 0.9 * zeroed
    a0, a1 = small.model.layers[0].self_attn, small.model.layers[1].self_attn
    if arch == "phi3":
        assert (a0.num_heads, a0.num_key_value_heads, a0.num_key_value_groups) == (2, 1, 2)
        assert a0.qkv_proj.out_features == 4 * HD and a0.o_proj.in_features == 2 * HD
        assert (a1.num_heads, a1.num_key_value_heads, a1.num_key_value_groups) == (1, 1, 1)
    else:
        assert a0.k_proj.out_features == HD and a0.num_key_value_groups == 2
        assert a1.q_proj.out_features == HD
    _check_same(model, small)
    _roundtrip(arch, small)

    # Whole sublayers: layer 0's attention, layer 1's MLP.
    model = _model(arch, seed=3)
    zeroed = _zero_groups(model, {"layer": ["model.layers.0.self_attn", "model.layers.1.mlp"]})
    if arch != "phi3":  # a zero Gemma norm weight scales by 1 + 0: the branch is dead anyway
        assert model.model.layers[0].post_attention_layernorm.weight.abs().sum() == 0
    small = gp.compress(model)
    assert isinstance(small.model.layers[0].self_attn, HFZeroAttention)
    assert isinstance(small.model.layers[1].mlp, HFZeroMLP)
    # The norms of a removed branch stay (their output is unused, or zero after a zero branch).
    assert count_params(model) - count_params(small) >= 0.9 * zeroed - 4 * HIDDEN
    _check_same(model, small)
    _roundtrip(arch, small)
    again = gp.compress(small)
    assert count_params(again) == count_params(small)


def test_phi3_compressing_twice_composes():
    model = _model("phi3")
    _zero_groups(model, {"base_level": ["model.layers.0.self_attn.head[1]"]})
    small = gp.compress(model)
    assert small.model.layers[0].self_attn.gathered
    _zero_groups(small, {"base_level": ["model.layers.0.self_attn.head[2]"]})  # was head 3
    ref = _model("phi3")
    _zero_groups(
        ref,
        {"base_level": ["model.layers.0.self_attn.head[1]", "model.layers.0.self_attn.head[3]"]},
    )
    smaller = gp.compress(small)
    a = smaller.model.layers[0].self_attn
    assert (a.num_heads, a.num_key_value_heads, a.num_key_value_groups) == (2, 2, 1)
    assert not a.gathered  # heads 0 and 2 read kv heads 0 and 1: grouped again
    _check_same(ref, smaller)
    _roundtrip("phi3", smaller)


def test_phi3_multiple_keeps_dead_heads_and_neurons():
    model = _model("phi3")
    _zero_groups(
        model,
        {
            "base_level": [
                "model.layers.0.self_attn.head[0]",
                *(f"model.layers.0.mlp[{i}]" for i in range(7)),
            ]
        },
    )
    small = gp.compress(model, multiple=4)
    assert isinstance(small.model.layers[0].self_attn, nn.Module)
    assert small.model.layers[0].self_attn.o_proj.in_features == HEADS * HD
    assert small.model.layers[0].mlp.gate_up_proj.out_features == 2 * 124
    _check_same(model, small)


@pytest.mark.parametrize("arch", ["phi3", "gemma2"])
def test_prox_training_zeroes_groups_and_compresses(arch):
    torch.manual_seed(0)
    model = _fresh(arch).train()
    model.model.embed_tokens.weight.requires_grad_(False)
    h = gp.hierarchy.transformer(model)
    assert not any(p is model.model.embed_tokens.weight for p in h.params)
    opt = gp.ProxAdam(
        model.parameters(),
        lr=1e-2,
        hierarchy=h,
        penalties={"base_level": gp.GroupLasso(0.7), "kv_head": gp.GroupLasso(0.7)},
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 12), generator=g)
    train_steps(opt, lambda: model(input_ids=ids, labels=ids).loss, 5)
    model.eval()
    assert gp.get_sparsity_report(model, h).levels["base_level"].zero_groups > 0
    small = gp.compress(model, h)
    assert count_params(small) < count_params(model)
    _check_same(model, small)


def test_frozen_parameters_are_left_out():
    model = _model("phi3")
    for p in model.model.layers[1].parameters():
        p.requires_grad_(False)
    h = gp.hierarchy.transformer(model)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert not any(id(p) in frozen for p in h.params)
    assert h.num_groups("base_level") == HEADS + INTER and h.num_groups("kv_head") == KV
    assert h.num_groups("layer") == 2 and h.num_groups("whole_layer") == 1


def test_phi3_bad_plan_args_name_the_operation():
    model = _model("phi3")
    where = "model.layers.0.self_attn"
    kind = "hf_decoder_fused_attention_heads"
    for args in (
        {"q_heads": [0, 5], "kv_heads": [0]},
        {"q_heads": [2], "kv_heads": [0]},  # head 2 reads kv head 1
        {"q_heads": [0]},
    ):
        with pytest.raises(ValueError, match=re.escape(where)):
            CompressionPlan.of([ReplaceOp(where, kind, args)]).apply(model)
    with pytest.raises(TypeError, match=re.escape("model.layers.0.mlp")):
        CompressionPlan.of([ReplaceOp("model.layers.0.mlp", kind, {})]).apply(model)
    # The unfused kind refuses a fused attention, and the other way round.
    with pytest.raises(TypeError, match="hf_decoder_attention_heads"):
        args = {"q_heads": [0], "kv_heads": [0]}
        CompressionPlan.of([ReplaceOp(where, "hf_decoder_attention_heads", args)]).apply(model)
    with pytest.raises(TypeError, match=kind):
        llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
        CompressionPlan.of([ReplaceOp(where, kind, {"q_heads": [0], "kv_heads": [0]})]).apply(llama)


def test_phi3_unexpected_layout_is_left_alone_with_a_warning():
    model = _model("phi3")
    model.model.layers[1].self_attn.num_key_value_heads = 3  # no longer fits qkv_proj
    with pytest.warns(UserWarning, match=r"model\.layers\.1\.self_attn.*left alone"):
        h = gp.hierarchy.transformer(model)
    assert h.num_groups("kv_head") == KV
    with pytest.warns(UserWarning, match="left alone"):
        ops = hf_decoder.plan(model)
    assert all(not op.module.startswith("model.layers.1.self_attn") for op in ops)
