"""The Hugging Face decoder family: Llama, Mistral, Qwen2, Qwen3, Gemma (and MoE attentions).

Tiny models built from configs (never downloaded): query heads, kv heads, MLP neurons and whole
sublayers planted as zeros are removed by gp.compress with the same outputs, with and without the
KV cache, and the same greedy generations.
"""

from __future__ import annotations

import io
import re
import warnings

import pytest
import torch
from torch import nn

import group_prox as gp
from group_prox.compression.plan import CompressionPlan, ReplaceOp
from group_prox.compression.report import count_params
from group_prox.families import hf_decoder
from group_prox.families.hf_decoder import HeadGatherLinear, HFZeroAttention, HFZeroMLP
from tests.family_helpers import randomise_, train_steps

transformers = pytest.importorskip("transformers")

HIDDEN, INTER, LAYERS, HEADS, KV, VOCAB = 64, 128, 2, 4, 2, 100
HD = HIDDEN // HEADS
COMMON = dict(
    hidden_size=HIDDEN,
    intermediate_size=INTER,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV,
    vocab_size=VOCAB,
    head_dim=HD,
    pad_token_id=0,
)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v biases, no o_proj bias
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),  # q_norm / k_norm per head
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
}


def _config(arch: str) -> transformers.PretrainedConfig:
    cfg_name, _, extra = ARCHS[arch]
    return getattr(transformers, cfg_name)(**COMMON, **extra)


# Some architectures run eager attention (repeat_kv), the others SDPA (enable_gqa or repeat_kv).
EAGER = {"qwen3", "gemma"}


def _fresh(arch: str) -> nn.Module:
    model = getattr(transformers, ARCHS[arch][1])(_config(arch)).double().eval()
    if arch in EAGER:
        model.config._attn_implementation = "eager"
    return model


@torch.no_grad()
def _model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _fresh(arch)
    return randomise_(model)


def _groups(model: nn.Module) -> dict[str, dict[str, list]]:
    return hf_decoder.levels(model)


@torch.no_grad()
def _zero(members: list) -> int:
    """Zero a group's members; return its number of scalars."""
    n = 0
    for m in members:
        if isinstance(m, torch.Tensor):
            m.zero_()
            n += m.numel()
            continue
        t, dim, idx = m
        ix = [slice(None)] * t.dim()
        ix[dim] = idx
        t[tuple(ix)] = 0
        n += t[tuple(ix)].numel()
    return n


def _zero_groups(model: nn.Module, names: dict[str, list[str]]) -> int:
    """Zero the named groups (by level); the number of distinct scalars zeroed."""
    before = sum(int((p == 0).sum()) for p in model.parameters())
    levels = _groups(model)
    for level, group_names in names.items():
        for g in group_names:
            _zero(levels[level][g])
    return sum(int((p == 0).sum()) for p in model.parameters()) - before


def _inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second sequence
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _logits(model: nn.Module, **kw) -> torch.Tensor:
    return model(**kw).logits


@torch.no_grad()
def _cached_logits(model: nn.Module, ids: torch.Tensor, split: int = 5) -> torch.Tensor:
    """Prefill ``ids[:, :split]``, then one token at a time through the cache."""
    out = model(input_ids=ids[:, :split], use_cache=True)
    logits = [out.logits]
    for t in range(split, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], cache=out.cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference; NaNs (eager attention's fully padded rows) must match."""
    assert a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan())
    return (a - b).nan_to_num(0.0).abs().max().item()


def _check_same(model: nn.Module, small: nn.Module) -> float:
    """Same logits with and without the KV cache, same greedy generation; the max difference."""
    x = _inputs()
    ref, got = _logits(model, **x), _logits(small, **x)
    # Eager attention in float64 can give NaN in a fully masked (padded) row, where the mask's
    # finfo.min plus a negative score overflows to -inf; masked keys then spread it (0 * NaN) to
    # the whole padded sequence. A removed dead sublayer no longer multiplies that NaN by 0, so
    # compare where the original is finite: everywhere else.
    assert ref[0].isfinite().all()
    finite = ref.isfinite()
    diff = (ref[finite] - got[finite]).abs().max().item()
    assert diff <= 1e-10
    ids = x["input_ids"]
    full = _logits(model, input_ids=ids)
    cached_ref, cached = _cached_logits(model, ids), _cached_logits(small, ids)
    assert _max_diff(cached_ref, full) <= 1e-10
    assert _max_diff(cached, full) <= 1e-10
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids[:1], **gen)
        got = small.generate(ids[:1], **gen)
    assert torch.equal(want, got)
    return diff


def _roundtrip(arch: str, small: nn.Module, fresh=None) -> None:
    """``small`` saved and loaded into a fresh ``arch`` (``fresh(arch)``, default ``_fresh``)
    gives the same logits, with and without the cache."""
    fresh = fresh or _fresh
    buf = io.BytesIO()
    gp.save_compressed(small, buf)
    buf.seek(0)
    loaded = gp.load_compressed(lambda: fresh(arch), buf).eval()
    x = _inputs()
    assert _max_diff(_logits(small, **x), _logits(loaded, **x)) == 0
    ids = x["input_ids"]
    assert _max_diff(_cached_logits(small, ids), _cached_logits(loaded, ids)) == 0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_group_counts(arch):
    model = _model(arch)
    h = gp.hierarchy.transformer(model)
    assert h.num_groups("base_level") == LAYERS * (HEADS + INTER)
    assert h.num_groups("kv_head") == LAYERS * KV
    assert h.num_groups("layer") == 2 * LAYERS
    assert h.num_groups("whole_layer") == LAYERS
    names = h.group_names("base_level")
    assert "model.layers.1.self_attn.head[3]" in names and "model.layers.0.mlp[127]" in names
    assert set(h.group_names("layer")) == {
        f"model.layers.{i}.{s}" for i in range(LAYERS) for s in ("self_attn", "mlp")
    }
    if arch == "qwen3":  # q_norm / k_norm are shared by the heads: in the sublayer only
        attn = model.model.layers[0].self_attn
        levels = _groups(model)
        head_tensors = {id(m[0]) for m in levels["base_level"]["model.layers.0.self_attn.head[0]"]}
        assert id(attn.q_norm.weight) not in head_tensors
        assert any(p is attn.q_norm.weight for p in levels["layer"]["model.layers.0.self_attn"])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_dead_query_heads_and_neurons_are_removed(arch):
    model = _model(arch)
    zeroed = _zero_groups(
        model,
        {
            "base_level": [
                # layer 0 loses one head of kv head 0 only: unequal heads per kv head
                "model.layers.0.self_attn.head[0]",
                # layer 1 loses one head of each kv head: still grouped, 1 head per kv head
                "model.layers.1.self_attn.head[0]",
                "model.layers.1.self_attn.head[3]",
                *(f"model.layers.0.mlp[{i}]" for i in range(0, INTER, 2)),
                *(f"model.layers.1.mlp[{i}]" for i in range(5, 100)),
            ]
        },
    )
    small = gp.compress(model)
    removed = count_params(model) - count_params(small)
    assert removed >= 0.9 * zeroed
    a0, a1 = small.model.layers[0].self_attn, small.model.layers[1].self_attn
    assert isinstance(a0.k_proj, HeadGatherLinear) and a0.num_key_value_groups == 1
    assert a0.q_proj.out_features == 3 * HD and a0.k_proj.weight.shape[0] == KV * HD
    assert type(a1.k_proj) is nn.Linear and a1.num_key_value_groups == 1
    assert a1.q_proj.out_features == 2 * HD
    assert small.model.layers[0].mlp.down_proj.in_features == INTER // 2
    assert small.model.layers[1].mlp.gate_proj.out_features == INTER - 95
    _check_same(model, small)
    _roundtrip(arch, small)
    # The state_dict keys are the original model's, less none.
    assert set(small.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
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
    assert a0.k_proj.out_features == HD and a0.q_proj.out_features == 2 * HD
    assert a0.num_key_value_groups == 2 and type(a0.k_proj) is nn.Linear
    assert a1.q_proj.out_features == HD and a1.num_key_value_groups == 1
    _check_same(model, small)
    _roundtrip(arch, small)

    # Whole sublayers: layer 0's attention, layer 1's MLP.
    model = _model(arch, seed=3)
    zeroed = _zero_groups(model, {"layer": ["model.layers.0.self_attn", "model.layers.1.mlp"]})
    small = gp.compress(model)
    assert isinstance(small.model.layers[0].self_attn, HFZeroAttention)
    assert isinstance(small.model.layers[1].mlp, HFZeroMLP)
    assert count_params(model) - count_params(small) >= 0.9 * zeroed
    _check_same(model, small)
    _roundtrip(arch, small)
    # Compressing again finds nothing more and composes.
    again = gp.compress(small)
    assert count_params(again) == count_params(small)
    assert len(again.group_prox_plan) == len(small.group_prox_plan)


def test_compressing_twice_composes():
    model = _model("llama")
    _zero_groups(model, {"base_level": ["model.layers.0.self_attn.head[1]"]})
    small = gp.compress(model)
    assert isinstance(small.model.layers[0].self_attn.k_proj, HeadGatherLinear)
    _zero_groups(small, {"base_level": ["model.layers.0.self_attn.head[2]"]})  # was head 3
    ref = _model("llama")
    _zero_groups(
        ref,
        {"base_level": ["model.layers.0.self_attn.head[1]", "model.layers.0.self_attn.head[3]"]},
    )
    smaller = gp.compress(small)
    a = smaller.model.layers[0].self_attn
    assert a.q_proj.out_features == 2 * HD and a.num_key_value_groups == 1
    assert type(a.k_proj) is nn.Linear  # heads 0 and 2 read kv heads 0 and 1: grouped again
    _check_same(ref, smaller)
    _roundtrip("llama", smaller)


def test_multiple_keeps_dead_heads_and_neurons():
    model = _model("qwen2")
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
    a = small.model.layers[0].self_attn
    assert a.q_proj.out_features == HEADS * HD  # 3 live heads rounded up to 4
    assert small.model.layers[0].mlp.up_proj.out_features == 124
    _check_same(model, small)


def test_prox_training_zeroes_groups_and_compresses():
    torch.manual_seed(0)
    model = _fresh("llama").train()  # the library's small initialisation
    h = gp.hierarchy.transformer(model)
    opt = gp.ProxAdam(
        model.parameters(),
        lr=1e-2,
        hierarchy=h,
        penalties={"base_level": gp.GroupLasso(0.7), "kv_head": gp.GroupLasso(0.7)},
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (4, 12), generator=g)
    train_steps(opt, lambda: model(input_ids=ids, labels=ids).loss, 5)
    model.eval()
    report = gp.get_sparsity_report(model, h)
    assert report.levels["base_level"].zero_groups > 0
    small = gp.compress(model, h)
    assert count_params(small) < count_params(model)
    _check_same(model, small)


def test_frozen_parameters_are_left_out():
    model = _model("qwen3")
    model.model.embed_tokens.weight.requires_grad_(False)
    for p in model.model.layers[1].parameters():
        p.requires_grad_(False)
    h = gp.hierarchy.transformer(model)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert not any(id(p) in frozen for p in h.params)
    assert h.num_groups("base_level") == HEADS + INTER
    assert h.num_groups("kv_head") == KV
    assert h.num_groups("layer") == 2 and h.num_groups("whole_layer") == 1


def _attention(h: gp.Hierarchy, level: str) -> list[str]:
    """The groups of ``level`` in attention sublayers (the fused-experts family adds the MoE's)."""
    return [n for n in h.group_names(level) if ".self_attn" in n]


def test_moe_decoder_gets_attention_groups_from_this_family():
    cfg = transformers.MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager"
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).double().eval()
    h = gp.hierarchy.transformer(model)
    assert len(_attention(h, "base_level")) == LAYERS * HEADS
    assert h.num_groups("kv_head") == LAYERS * KV
    assert set(_attention(h, "layer")) == {f"model.layers.{i}.self_attn" for i in range(LAYERS)}
    assert "whole_layer" not in h.level_names
    _zero_groups(model, {"base_level": ["model.layers.1.self_attn.head[2]"]})
    small = gp.compress(model)
    assert small.model.layers[1].self_attn.q_proj.out_features == (HEADS - 1) * HD
    x = _inputs()
    assert _max_diff(_logits(model, **x), _logits(small, **x)) <= 1e-10


def test_qwen2_moe_dense_layers_keep_their_mlp_groups():
    cfg = transformers.Qwen2MoeConfig(
        **COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        mlp_only_layers=[0],
        experts_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(cfg).double().eval()
    h = gp.hierarchy.transformer(model)
    dense = [n for n in h.group_names("base_level") if n.startswith("model.layers.0.mlp[")]
    assert len(_attention(h, "base_level")) == LAYERS * HEADS and len(dense) == INTER
    assert set(h.group_names("layer")) == {
        "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn",
        "model.layers.1.mlp",  # the MoE sublayer, from the fused-experts family
    }  # fmt: skip
    _zero_groups(model, {"base_level": [f"model.layers.0.mlp[{i}]" for i in range(20)]})
    small = gp.compress(model)
    assert small.model.layers[0].mlp.down_proj.in_features == INTER - 20
    x = _inputs()
    assert _max_diff(_logits(model, **x), _logits(small, **x)) <= 1e-10


def test_bad_plan_args_name_the_operation():
    model = _model("llama")
    where = "model.layers.0.self_attn"
    for args in (
        {"q_heads": [0, 5], "kv_heads": [0]},
        {"q_heads": [2], "kv_heads": [0]},  # head 2 reads kv head 1
        {"q_heads": [1, 0], "kv_heads": [0]},
        {"q_heads": [0]},
    ):
        with pytest.raises(ValueError, match=re.escape(where)):
            CompressionPlan.of([ReplaceOp(where, "hf_decoder_attention_heads", args)]).apply(model)
    with pytest.raises(ValueError, match="no args"):
        CompressionPlan.of([ReplaceOp(where, "hf_zero_attention", {"x": 1})]).apply(model)
    with pytest.raises(TypeError, match=re.escape("model.layers.0.mlp")):
        CompressionPlan.of([ReplaceOp("model.layers.0.mlp", "hf_zero_attention", {})]).apply(model)


def test_unknown_sublayers_are_left_alone_with_a_warning():
    model = _model("llama")
    model.model.layers[1].self_attn = nn.Identity()
    with pytest.warns(UserWarning, match=r"model\.layers\.1\.self_attn.*left alone"):
        h = gp.hierarchy.transformer(model)
    assert h.num_groups("kv_head") == KV
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert all(
            not op.module.startswith("model.layers.1.self_attn") for op in hf_decoder.plan(model)
        )
