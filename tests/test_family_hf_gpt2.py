"""Hugging Face GPT-2: levels over Conv1D projections, exact compression with and without cache."""

from __future__ import annotations

import io

import pytest
import torch

transformers = pytest.importorskip("transformers")

import group_prox as gp  # noqa: E402
from group_prox.compression.report import count_params  # noqa: E402
from group_prox.families.hf_encoder import ZeroBranch  # noqa: E402
from group_prox.families.hf_gpt2 import RemovedGPT2Attention  # noqa: E402
from tests.family_helpers import train_steps  # noqa: E402

E, H, HD, LAYERS, VOCAB = 64, 4, 16, 2, 100
FF = 4 * E
F64 = torch.float64

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def _gpt2(seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=E, n_layer=LAYERS, n_head=H, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    model.config._attn_implementation = attn
    return model.to(F64).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as for generation
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _cached(model, ids):
    """Logits of the last 3 tokens, computed with the cache of the first 6."""
    with torch.no_grad():
        first = model(input_ids=ids[:, :6], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        return model(input_ids=ids[:, 6:], cache=cache, use_cache=True).logits


@torch.no_grad()
def _plant(model) -> int:
    """Block 0: the whole attention sublayer (with ln_1), neurons 0..199. Block 1: heads 1 and 2,
    the whole MLP sublayer (with ln_2). Returns the number of zeroed parameter scalars."""
    b0, b1 = model.transformer.h
    zeroed = 0
    for p in (*b0.attn.parameters(), *b0.ln_1.parameters(), *b1.mlp.parameters(),
              *b1.ln_2.parameters()):  # fmt: skip
        p.zero_()
        zeroed += p.numel()
    b0.mlp.c_fc.weight[:, :200] = 0
    b0.mlp.c_fc.bias[:200] = 0
    b0.mlp.c_proj.weight[:200] = 0
    zeroed += 200 * (2 * E + 1)
    attn = b1.attn
    for j in range(3):
        cols = slice(j * E + HD, j * E + 3 * HD)
        attn.c_attn.weight[:, cols] = 0
        attn.c_attn.bias[cols] = 0
    attn.c_proj.weight[HD : 3 * HD] = 0
    zeroed += 2 * (4 * HD * E + 3 * HD)
    return zeroed


def test_groups_per_level():
    model = _gpt2()
    h = gp.hierarchy.transformer(model)
    base, layer = h.group_names("base_level"), h.group_names("layer")
    assert len(base) == LAYERS * (H + FF)
    assert set(layer) == {f"transformer.h.{i}.{s}" for i in range(LAYERS) for s in ("attn", "mlp")}
    assert "transformer.h.1.attn.head[3]" in base and f"transformer.h.1.mlp[{FF - 1}]" in base
    # A head's group: 3 × hd columns of c_attn (q, k, v), their biases, hd rows of c_proj.
    sizes = dict(zip(base, h.group_sizes("base_level"), strict=True))
    assert sizes["transformer.h.0.attn.head[0]"] == 3 * HD * E + 3 * HD + HD * E
    assert sizes["transformer.h.0.mlp[0]"] == 2 * E + 1


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_planted_zeros_are_removed_exactly(attn):
    model = _gpt2(attn=attn)
    zeroed = _plant(model)
    h = gp.hierarchy.transformer(model)
    inputs = _inputs()
    small = gp.compress(model, h, example_inputs=inputs)
    assert count_params(model) - count_params(small) >= 0.9 * zeroed
    b0, b1 = small.transformer.h
    assert isinstance(b0.attn, RemovedGPT2Attention) and isinstance(b0.ln_1, torch.nn.Identity)
    assert isinstance(b1.mlp, ZeroBranch) and isinstance(b1.ln_2, torch.nn.Identity)
    assert (b1.attn.num_heads, b1.attn.split_size, b1.attn.head_dim) == (2, 2 * HD, HD)
    assert b0.mlp.c_fc.nf == b0.mlp.c_proj.nx == FF - 200
    assert (_logits(model, inputs) - _logits(small, inputs)).abs().max() <= 1e-10
    ids = inputs["input_ids"]
    want = _cached(model, ids)
    assert (want - _logits(model, {"input_ids": ids})[:, 6:]).abs().max() <= 1e-10
    assert (want - _cached(small, ids)).abs().max() <= 1e-10
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids[:, :4], **kw), small.generate(ids[:, :4], **kw))
    buf = io.BytesIO()
    gp.save_compressed(small, buf)
    buf.seek(0)
    loaded = gp.load_compressed(lambda: _gpt2(seed=5, attn=attn), buf).eval()
    assert torch.equal(_logits(loaded, inputs), _logits(small, inputs))
    assert torch.equal(_cached(loaded, ids), _cached(small, ids))
    # The small model's hierarchy and a second compression.
    assert len(gp.hierarchy.transformer(small).group_names("base_level")) == 2 + FF - 200
    assert len(gp.compress(small).group_prox_plan) == len(small.group_prox_plan)


def test_bias_only_branches_and_multiple():
    model = _gpt2()
    with torch.no_grad():
        b0, b1 = model.transformer.h
        b0.attn.c_proj.weight.zero_()  # no live head, but a bias
        b0.attn.c_proj.bias.normal_()
        b0.mlp.c_proj.weight.zero_()
        b0.mlp.c_proj.bias.normal_()
        b1.attn.c_proj.weight[HD:] = 0  # one live head
        b1.mlp.c_proj.weight[5:] = 0  # five live neurons
    inputs = _inputs()
    small = gp.compress(model, example_inputs=inputs, multiple=2)
    b0, b1 = small.transformer.h
    assert isinstance(b0.attn, RemovedGPT2Attention) and b0.attn.has_bias
    assert isinstance(b0.mlp, ZeroBranch)
    assert b1.attn.num_heads == 2 and b1.mlp.c_fc.nf == 6
    assert (_logits(model, inputs) - _logits(small, inputs)).abs().max() <= 1e-10
    ids = inputs["input_ids"]
    assert (_cached(model, ids) - _cached(small, ids)).abs().max() <= 1e-10


def test_prox_steps_zero_groups_and_frozen_embeddings_are_left_out():
    model = _gpt2().train()
    model.transformer.wte.requires_grad_(False)
    model.transformer.wpe.requires_grad_(False)
    h = gp.hierarchy.transformer(model)
    frozen = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    assert not any(id(t.param) in frozen for t in h.tensors)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = gp.ProxAdam(params, lr=1e-2, hierarchy=h, penalties={"base_level": gp.GroupLasso(5.0)})
    inputs = _inputs()
    train_steps(opt, lambda: model(**inputs, labels=inputs["input_ids"]).loss, 3)
    assert gp.get_sparsity_report(model, h).levels["base_level"].zero_groups > 0
    model.eval()
    small = gp.compress(model, h, example_inputs=inputs)
    assert count_params(small) < count_params(model)
    assert (_logits(model, inputs) - _logits(small, inputs)).abs().max() <= 1e-10


def test_bad_plan_arguments_name_the_operation():
    model = _gpt2()
    plan = gp.compression.CompressionPlan.from_dict(
        {"format": "group_prox.compression_plan/1",
         "ops": [{"op": "replace", "module": "transformer.h.0.attn",
                  "kind": "gpt2_attention_heads", "args": {"keep": [1, 9]}}]}
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"gpt2_attention_heads.*\[0, 4\)"):
        plan.apply(model)
    plan = gp.compression.CompressionPlan.from_dict(
        {"format": "group_prox.compression_plan/1",
         "ops": [{"op": "replace", "module": "transformer.h.0.mlp",
                  "kind": "gpt2_attention_heads", "args": {"keep": [0]}}]}
    )  # fmt: skip
    with pytest.raises(TypeError, match="expected a GPT2Attention"):
        plan.apply(model)
