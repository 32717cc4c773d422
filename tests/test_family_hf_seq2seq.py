"""The Hugging Face encoder-decoder family: T5 (also gated, v1.1 style) and BART.

Tiny models built from configs (never downloaded): heads of self- and cross-attentions, FF neurons
and whole sublayers planted as zeros are removed by gp.compress with the same outputs, with and
without the KV cache, and the same greedy generations.
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
from group_prox.families import hf_seq2seq
from group_prox.families.hf_seq2seq import (
    BartRemovedAttention,
    BiasOnlyLinear,
    EmptyLinear,
    T5PrunedAttention,
    T5RemovedAttention,
    T5RemovedFF,
)
from tests.family_helpers import randomise_, train_steps

transformers = pytest.importorskip("transformers")

D, FF, HEADS, LAYERS, VOCAB = 32, 64, 4, 2, 100
HD = D // HEADS
ARCHS = ("bart", "t5", "t5-gated")


def _config(arch: str) -> transformers.PretrainedConfig:
    if arch == "bart":
        return transformers.BartConfig(
            d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS, encoder_ffn_dim=FF, decoder_ffn_dim=FF,
            vocab_size=VOCAB, max_position_embeddings=64,
        )  # fmt: skip
    extra = {"feed_forward_proj": "gated-gelu"} if arch == "t5-gated" else {}
    return transformers.T5Config(
        d_model=D, d_ff=FF, d_kv=HD, num_heads=HEADS, num_layers=LAYERS,
        num_decoder_layers=LAYERS, vocab_size=VOCAB, decoder_start_token_id=0, **extra,
    )  # fmt: skip


def _fresh(arch: str) -> nn.Module:
    cls = (
        transformers.BartForConditionalGeneration
        if arch == "bart"
        else transformers.T5ForConditionalGeneration
    )
    return cls(_config(arch)).double().eval()


@torch.no_grad()
def _model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _fresh(arch)
    return randomise_(model)


# Group names: (attention of encoder layer i, self-attention / cross-attention of decoder layer i,
# FF neuron prefix of encoder / decoder layer i), and the sublayer groups.
def _enc_attn(arch: str, i: int) -> str:
    return f"model.encoder.layers.{i}.self_attn" if arch == "bart" else f"encoder.block.{i}.layer.0"


def _dec_self(arch: str, i: int) -> str:
    return f"model.decoder.layers.{i}.self_attn" if arch == "bart" else f"decoder.block.{i}.layer.0"


def _dec_cross(arch: str, i: int) -> str:
    if arch == "bart":
        return f"model.decoder.layers.{i}.encoder_attn"
    return f"decoder.block.{i}.layer.1"


def _ff(arch: str, stack: str, i: int) -> str:
    if arch == "bart":
        return f"model.{stack}.layers.{i}.mlp"
    return f"{stack}.block.{i}.layer.{1 if stack == 'encoder' else 2}"


def _head(arch: str, sublayer: str, h: int) -> str:
    if arch == "bart":
        return f"{sublayer}.head[{h}]"
    inner = "EncDecAttention" if sublayer.endswith("layer.1") and "decoder" in sublayer else (
        "SelfAttention"
    )  # fmt: skip
    return f"{sublayer}.{inner}.head[{h}]"


def _neuron(arch: str, sublayer: str, i: int) -> str:
    return f"{sublayer}[{i}]" if arch == "bart" else f"{sublayer}.DenseReluDense[{i}]"


@torch.no_grad()
def _zero(members: list) -> None:
    for m in members:
        if isinstance(m, torch.Tensor):
            m.zero_()
            continue
        t, dim, idx = m
        ix = [slice(None)] * t.dim()
        ix[dim] = idx
        t[tuple(ix)] = 0


def _zero_groups(model: nn.Module, names: dict[str, list[str]]) -> int:
    """Zero the named groups (by level); the number of distinct scalars zeroed."""
    before = sum(int((p == 0).sum()) for p in model.parameters())
    levels = hf_seq2seq.levels(model)
    for level, group_names in names.items():
        for g in group_names:
            _zero(levels[level][g])
    return sum(int((p == 0).sum()) for p in model.parameters()) - before


def _inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in the second sequence
    dec = torch.randint(3, VOCAB, (2, 6), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}


@torch.no_grad()
def _logits(model: nn.Module, **kw) -> torch.Tensor:
    return model(**kw).logits


@torch.no_grad()
def _cached_logits(model: nn.Module, x: dict[str, torch.Tensor], split: int = 3) -> torch.Tensor:
    """Encode once; decode ``dec[:, :split]``, then one token at a time through the cache."""
    mask, dec = x["attention_mask"], x["decoder_input_ids"]
    enc = model.get_encoder()(input_ids=x["input_ids"], attention_mask=mask)
    kw = dict(encoder_outputs=enc, attention_mask=mask, use_cache=True)
    out = model(decoder_input_ids=dec[:, :split], **kw)
    assert type(out.cache).__name__ == "EncoderDecoderCache"
    logits = [out.logits]
    for t in range(split, dec.shape[1]):
        out = model(decoder_input_ids=dec[:, t : t + 1], cache=out.cache, **kw)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.isfinite().all()
    return (a - b).abs().max().item()


def _check_same(model: nn.Module, small: nn.Module) -> float:
    """Same logits with and without the KV cache, same greedy generation; the max difference."""
    x = _inputs()
    ref = _logits(model, **x)
    diff = _max_diff(ref, _logits(small, **x))
    assert diff <= 1e-10
    assert _max_diff(_cached_logits(small, x), ref) <= 1e-10
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        want = model.generate(x["input_ids"], attention_mask=x["attention_mask"], **gen)
        got = small.generate(x["input_ids"], attention_mask=x["attention_mask"], **gen)
    assert want.shape[1] == 9 and torch.equal(want, got)
    return diff


def _roundtrip(arch: str, small: nn.Module) -> None:
    buf = io.BytesIO()
    gp.save_compressed(small, buf)
    buf.seek(0)
    loaded = gp.load_compressed(lambda: _fresh(arch), buf).eval()
    x = _inputs()
    assert _max_diff(_logits(small, **x), _logits(loaded, **x)) == 0
    assert _max_diff(_cached_logits(small, x), _cached_logits(loaded, x)) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_group_counts(arch):
    model = _model(arch)
    x = _inputs()  # the cached decoding of the original gives its logits (what _check_same uses)
    assert _max_diff(_cached_logits(model, x), _logits(model, **x)) <= 1e-10
    h = gp.hierarchy.transformer(model)
    # encoder layers: a self-attention and a FF; decoder layers: self-, cross-attention and a FF
    assert h.num_groups("base_level") == LAYERS * (HEADS + FF) + LAYERS * (2 * HEADS + FF)
    assert h.num_groups("layer") == LAYERS * 2 + LAYERS * 3
    assert set(h.level_names) == {"base_level", "layer"}
    subs = {
        *(_enc_attn(arch, i) for i in range(LAYERS)),
        *(_dec_self(arch, i) for i in range(LAYERS)),
        *(_dec_cross(arch, i) for i in range(LAYERS)),
        *(_ff(arch, s, i) for s in ("encoder", "decoder") for i in range(LAYERS)),
    }
    assert set(h.group_names("layer")) == subs
    names = set(h.group_names("base_level"))
    assert _head(arch, _dec_cross(arch, 1), 3) in names
    assert _neuron(arch, _ff(arch, "decoder", 0), FF - 1) in names
    levels = hf_seq2seq.levels(model)
    if arch == "bart":  # post-norm: the LayerNorms are trunk
        layer = model.model.encoder.layers[0]
        grouped = {id(t) for g in levels["layer"].values() for t in g}
        assert id(layer.self_attn_layer_norm.weight) not in grouped
        assert id(layer.self_attn.out_proj.bias) in grouped
    else:  # pre-norm: the norm is in its sublayer; the relative position bias in no group
        sub = model.encoder.block[0].layer[0]
        group = {id(t) for t in levels["layer"][_enc_attn(arch, 0)]}
        assert id(sub.layer_norm.weight) in group
        rel = sub.SelfAttention.relative_attention_bias.weight
        assert all(
            id(m if isinstance(m, torch.Tensor) else m[0]) != id(rel)
            for lv in levels.values()
            for g in lv.values()
            for m in g
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_dead_heads_and_neurons_are_removed(arch):
    model = _model(arch)
    heads = {  # different heads in different layers, so the layers of a stack keep different ones
        _enc_attn(arch, 0): [0],
        _enc_attn(arch, 1): [1, 3],
        _dec_self(arch, 0): [2],
        _dec_self(arch, 1): [0, 1, 3],
        _dec_cross(arch, 0): [0, 1],
        _dec_cross(arch, 1): [3],
    }
    groups = [_head(arch, s, h) for s, hs in heads.items() for h in hs]
    groups += [_neuron(arch, _ff(arch, "encoder", 0), i) for i in range(0, FF, 2)]
    groups += [_neuron(arch, _ff(arch, "decoder", 1), i) for i in range(5, 50)]
    zeroed = _zero_groups(model, {"base_level": groups})
    small = gp.compress(model)
    assert count_params(model) - count_params(small) >= 0.9 * zeroed
    if arch == "bart":
        a = small.model.decoder.layers[1].self_attn
        assert a.q_proj.out_features == HD and a.num_heads == 1
        assert small.model.encoder.layers[0].fc1.out_features == FF // 2
        assert small.model.decoder.layers[1].fc2.in_features == FF - 45
    else:
        enc0 = small.encoder.block[0].layer[0].SelfAttention
        assert isinstance(enc0, T5PrunedAttention) and enc0.heads == (1, 2, 3)
        assert enc0.relative_attention_bias.weight.shape[1] == HEADS  # the stack's bias: whole
        assert small.encoder.block[1].layer[0].SelfAttention.heads == (0, 2)
        assert small.decoder.block[1].layer[0].SelfAttention.heads == (2,)
        assert small.decoder.block[0].layer[1].EncDecAttention.q.out_features == 2 * HD
        dense = small.decoder.block[1].layer[2].DenseReluDense
        assert dense.wo.in_features == FF - 45
    _check_same(model, small)
    _roundtrip(arch, small)
    assert set(small.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("arch", ARCHS)
def test_dead_sublayers_are_removed(arch):
    model = _model(arch, seed=3)
    layers = [
        _enc_attn(arch, 0),  # T5: holds the encoder's relative position bias
        _dec_self(arch, 0),  # the decoder's, and the cache length generate reads
        _dec_cross(arch, 1),
        _ff(arch, "encoder", 1),
        _ff(arch, "decoder", 0),
    ]
    zeroed = _zero_groups(model, {"layer": layers})
    small = gp.compress(model)
    assert count_params(model) - count_params(small) >= 0.9 * zeroed
    if arch == "bart":
        assert isinstance(small.model.encoder.layers[0].self_attn, BartRemovedAttention)
        assert isinstance(small.model.decoder.layers[1].encoder_attn, BartRemovedAttention)
        assert isinstance(small.model.encoder.layers[1].fc1, EmptyLinear)
        assert isinstance(small.model.decoder.layers[0].fc2, BiasOnlyLinear)
    else:
        attn = small.encoder.block[0].layer[0].SelfAttention
        assert isinstance(attn, T5RemovedAttention)
        assert hasattr(attn, "relative_attention_bias")
        assert isinstance(small.decoder.block[1].layer[1].EncDecAttention, T5RemovedAttention)
        assert isinstance(small.decoder.block[0].layer[0].layer_norm, nn.Identity)
        assert isinstance(small.encoder.block[1].layer[1].DenseReluDense, T5RemovedFF)
    _check_same(model, small)
    _roundtrip(arch, small)
    again = gp.compress(small)  # nothing more to remove: the same
    assert count_params(again) == count_params(small)
    assert len(again.group_prox_plan) == len(small.group_prox_plan)
    x = _inputs()
    assert _max_diff(_logits(again, **x), _logits(model, **x)) <= 1e-10


def test_bart_sublayers_with_live_biases_output_them():
    model = _model("bart", seed=4)
    sub = _dec_self("bart", 1)
    groups = [_head("bart", sub, h) for h in range(HEADS)]
    groups += [_neuron("bart", _ff("bart", "encoder", 0), i) for i in range(FF)]
    _zero_groups(model, {"base_level": groups})  # the output biases stay
    small = gp.compress(model)
    attn = small.model.decoder.layers[1].self_attn
    assert isinstance(attn, BartRemovedAttention) and attn.has_bias
    fc2 = small.model.encoder.layers[0].fc2
    assert isinstance(fc2, BiasOnlyLinear) and fc2.bias is not None
    _check_same(model, small)
    _roundtrip("bart", small)


def test_t5_compressing_twice_composes():
    model = _model("t5")
    _zero_groups(model, {"base_level": [_head("t5", _enc_attn("t5", 0), 1)]})
    small = gp.compress(model)
    _zero_groups(small, {"base_level": [_head("t5", _enc_attn("t5", 0), 2)]})  # was head 3
    ref = _model("t5")
    _zero_groups(ref, {"base_level": [_head("t5", _enc_attn("t5", 0), h) for h in (1, 3)]})
    smaller = gp.compress(small)
    assert smaller.encoder.block[0].layer[0].SelfAttention.heads == (0, 2)
    _check_same(ref, smaller)
    _roundtrip("t5", smaller)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_multiple_keeps_dead_heads_and_neurons(arch):
    model = _model(arch)
    sub, ff = _dec_self(arch, 0), _ff(arch, "decoder", 0)
    groups = [_head(arch, sub, 0), *(_neuron(arch, ff, i) for i in range(7))]
    _zero_groups(model, {"base_level": groups})
    small = gp.compress(model, multiple=4)
    if arch == "bart":
        assert small.model.decoder.layers[0].self_attn.q_proj.out_features == D
        assert small.model.decoder.layers[0].fc1.out_features == 60
    else:
        assert small.decoder.block[0].layer[0].SelfAttention.q.out_features == D
        assert small.decoder.block[0].layer[2].DenseReluDense.wi.out_features == 60
    _check_same(model, small)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_prox_training_zeroes_groups_and_compresses(arch):
    torch.manual_seed(0)
    model = _fresh(arch).train()
    h = gp.hierarchy.transformer(model)
    opt = gp.ProxAdam(
        model.parameters(),
        lr=1e-2,
        hierarchy=h,
        penalties={"base_level": gp.GroupLasso(0.7 if arch == "bart" else 20.0)},
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 10), generator=g)
    train_steps(opt, lambda: model(input_ids=ids, labels=ids).loss, 4)
    model.eval()
    report = gp.get_sparsity_report(model, h)
    assert report.levels["base_level"].zero_groups > 0
    small = gp.compress(model, h)
    assert count_params(small) < count_params(model)
    _check_same(model, small)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_frozen_parameters_are_left_out(arch):
    model = _model(arch)
    model.get_input_embeddings().weight.requires_grad_(False)
    stack = model.model.encoder.layers if arch == "bart" else model.encoder.block
    for p in stack[1].parameters():
        p.requires_grad_(False)
    h = gp.hierarchy.transformer(model)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert not any(id(p) in frozen for p in h.params)
    assert h.num_groups("base_level") == (HEADS + FF) + LAYERS * (2 * HEADS + FF)
    assert h.num_groups("layer") == 2 + LAYERS * 3


def test_bad_plan_args_name_the_operation():
    model = _model("t5")
    where = "encoder.block.0.layer.0.SelfAttention"
    for args in ({"heads": [0, 5]}, {"heads": [1, 0]}, {"heads": []}, {"heads": [0, 1]}, {}):
        with pytest.raises(ValueError, match=re.escape(where)):
            CompressionPlan.of([ReplaceOp(where, "hf_seq2seq_t5_heads", args)]).apply(model)
    with pytest.raises(TypeError, match=re.escape("encoder.block.0.layer.1")):
        CompressionPlan.of(
            [ReplaceOp("encoder.block.0.layer.1", "hf_seq2seq_t5_removed_attention", {})]
        ).apply(model)
    bart = _model("bart")
    where = "model.encoder.layers.0.self_attn"
    for args in ({"heads": 2}, {"heads": True}, {"bias": 1}):
        with pytest.raises(ValueError, match=re.escape(where)):
            CompressionPlan.of([ReplaceOp(where, "hf_seq2seq_bart_heads", args)]).apply(bart)


def test_unknown_sublayers_are_left_alone_with_a_warning():
    model = _model("bart")
    model.model.decoder.layers[1].encoder_attn = nn.Identity()
    with pytest.warns(UserWarning, match=r"decoder\.layers\.1\.encoder_attn.*left alone"):
        h = gp.hierarchy.transformer(model)
    assert h.num_groups("layer") == 2 * 2 + 2 * 3 - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ops = hf_seq2seq.plan(model)
    assert all(".encoder_attn" not in op.module for op in ops)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_eager_attention_gives_the_same_outputs(arch):
    model = _model(arch)
    model.config._attn_implementation = "eager"
    groups = [_head(arch, _enc_attn(arch, 0), 1), _head(arch, _enc_attn(arch, 1), 2)]
    groups += [_head(arch, _dec_self(arch, 0), 0), _head(arch, _dec_cross(arch, 1), 3)]
    _zero_groups(model, {"base_level": groups})
    small = gp.compress(model)
    x = _inputs()
    ref = _logits(model, **x)
    assert _max_diff(_logits(small, **x), ref) <= 1e-10
    assert _max_diff(_cached_logits(small, x), ref) <= 1e-10
