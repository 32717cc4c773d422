"""Hugging Face BERT, RoBERTa and ViT: levels, exact compression of heads, neurons, sublayers."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import group_prox as gp  # noqa: E402
from group_prox.compression.report import count_params  # noqa: E402
from group_prox.families.hf_encoder import (  # noqa: E402
    EmptyIntermediate,
    RemovedBertAttention,
    RemovedBertOutput,
    ZeroBranch,
)
from tests.family_helpers import train_steps  # noqa: E402

E, H, HD, FF, LAYERS, VOCAB = 64, 4, 16, 128, 2, 100
F64 = torch.float64
SIZES = dict(hidden_size=E, num_hidden_layers=LAYERS, num_attention_heads=H, intermediate_size=FF)


def _bert(kind: str = "bert", seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=VOCAB, num_labels=3, **SIZES)
        model = transformers.BertForSequenceClassification(config)
    elif kind == "roberta":
        config = transformers.RobertaConfig(vocab_size=VOCAB, **SIZES)
        model = transformers.RobertaModel(config)
    else:
        config = transformers.ViTConfig(image_size=16, patch_size=4, num_labels=3, **SIZES)
        model = transformers.ViTForImageClassification(config)
    model.config._attn_implementation = attn
    return model.to(F64).eval()


def _layers(model):
    base = getattr(model, "bert", None) or getattr(model, "vit", None) or model
    return base.encoder.layer if hasattr(base, "encoder") else base.layers


def _inputs(kind: str):
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        return {"pixel_values": torch.randn(3, 3, 16, 16, generator=g, dtype=F64)}
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _parts(layer):
    """(q, k, v, out projection, fc1, fc2, attention module, norm before attention or None)."""
    if hasattr(layer, "intermediate"):
        a = layer.attention
        return (a.self.query, a.self.key, a.self.value, a.output.dense,
                layer.intermediate.dense, layer.output.dense, a, None)  # fmt: skip
    a = layer.attention
    return (a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.mlp.fc1, layer.mlp.fc2, a,
            layer.layernorm_before)  # fmt: skip


@torch.no_grad()
def _plant(model, pre_norm: bool) -> int:
    """Layer 0: the whole attention sublayer, neurons 0..99. Layer 1: heads 1 and 2, the whole
    MLP sublayer. Returns the number of zeroed parameter scalars."""
    zeroed = 0
    l0, l1 = _layers(model)
    q, k, v, o, fc1, fc2, _, norm = _parts(l0)
    for proj in (q, k, v, o):
        for p in proj.parameters():
            p.zero_()
            zeroed += p.numel()
    if pre_norm:
        for p in norm.parameters():
            p.zero_()
            zeroed += p.numel()
    fc1.weight[:100] = 0
    fc1.bias[:100] = 0
    fc2.weight[:, :100] = 0
    zeroed += 100 * (2 * E + 1)
    q, k, v, o, fc1, fc2, _, _ = _parts(l1)
    rows = slice(HD, 3 * HD)
    for proj in (q, k, v):
        proj.weight[rows] = 0
        proj.bias[rows] = 0
    o.weight[:, rows] = 0
    zeroed += 2 * (4 * HD * E + 3 * HD)
    for proj in (fc1, fc2):
        for p in proj.parameters():
            p.zero_()
            zeroed += p.numel()
    return zeroed


@pytest.mark.parametrize("kind", ["bert", "roberta", "vit"])
def test_groups_per_level(kind):
    model = _bert(kind)
    h = gp.hierarchy.transformer(model)
    base, layer = h.group_names("base_level"), h.group_names("layer")
    assert len(base) == LAYERS * (H + FF)
    assert len(layer) == 2 * LAYERS
    prefix = (
        "vit.layers.0"
        if kind == "vit"
        else ("bert." if kind == "bert" else "") + ("encoder.layer.0")
    )
    assert f"{prefix}.attention.head[3]" in base and f"{prefix}.mlp[127]" in base
    assert f"{prefix}.attention" in layer and f"{prefix}.mlp" in layer
    # Post-norm BERT: LayerNorms are trunk; pre-norm ViT: each norm in its branch's group.
    names = {id(p): n for n, p in model.named_parameters()}
    in_layer = {names[id(t.param)] for t in h.tensors}
    norms = {n for n in in_layer if "layernorm" in n.lower()}
    if kind == "vit":
        assert norms == {f"vit.layers.{i}.layernorm_{w}.{p}" for i in range(LAYERS)
                         for w in ("before", "after") for p in ("weight", "bias")}  # fmt: skip
    else:
        assert norms == set()


@pytest.mark.parametrize(("kind", "attn"), [("bert", "sdpa"), ("bert", "eager"),
                                            ("roberta", "sdpa"), ("vit", "sdpa")])  # fmt: skip
def test_planted_zeros_are_removed_exactly(kind, attn):
    model = _bert(kind, attn=attn)
    zeroed = _plant(model, pre_norm=kind == "vit")
    h = gp.hierarchy.transformer(model)
    inputs = _inputs(kind)
    small = gp.compress(model, h, example_inputs=inputs)
    removed = count_params(model) - count_params(small)
    assert removed >= 0.9 * zeroed
    assert (_out(model, inputs) - _out(small, inputs)).abs().max() <= 1e-10
    l0, l1 = _layers(small)
    if kind == "vit":
        assert isinstance(l0.attention, ZeroBranch) and isinstance(l1.mlp, ZeroBranch)
        assert isinstance(l0.layernorm_before, torch.nn.Identity)
        assert l1.attention.num_attention_heads == 2 and l1.attention.q_proj.out_features == 32
    else:
        assert isinstance(l0.attention, RemovedBertAttention)
        assert isinstance(l1.intermediate, EmptyIntermediate)
        assert isinstance(l1.output, RemovedBertOutput)
        attention = l1.attention.self
        assert (attention.num_attention_heads, attention.all_head_size) == (2, 32)
    assert (l0.mlp.fc1 if kind == "vit" else l0.intermediate.dense).out_features == FF - 100
    # Saved as a plan and a state_dict, loaded into a freshly built (differently seeded) model.
    buf = io.BytesIO()
    gp.save_compressed(small, buf)
    buf.seek(0)
    loaded = gp.load_compressed(lambda: _bert(kind, seed=7, attn=attn), buf).eval()
    assert torch.equal(_out(loaded, inputs), _out(small, inputs))
    # Compressing again finds nothing more and the hierarchy of the small model is valid.
    assert len(gp.compress(small).group_prox_plan) == len(small.group_prox_plan)
    assert (
        len(gp.hierarchy.transformer(small).group_names("base_level")) == 2 + 28
    )  # layer 1 heads, layer 0 neurons


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_branches_with_only_a_bias_keep_it(kind):
    """A sublayer whose heads/neurons are all dead still adds its output bias: kept, exactly."""
    model = _bert(kind)
    with torch.no_grad():
        for layer in _layers(model):
            o, fc2 = _parts(layer)[3], _parts(layer)[5]
            o.weight.zero_()
            fc2.weight.zero_()
            o.bias.normal_()
            fc2.bias.normal_()
    inputs = _inputs(kind)
    small = gp.compress(model, example_inputs=inputs)
    assert (_out(model, inputs) - _out(small, inputs)).abs().max() <= 1e-10
    per_layer = 2 * E + (0 if kind == "vit" else 4 * E)  # two biases (+ two post-norms)
    assert sum(p.numel() for p in _layers(small).parameters()) == LAYERS * per_layer


def test_multiple_rounds_up_with_dead_heads_and_neurons():
    model = _bert("bert")
    with torch.no_grad():
        layer = _layers(model)[0]
        layer.attention.output.dense.weight[:, HD:] = 0  # heads 1..3 dead
        layer.output.dense.weight[:, 5:] = 0  # 5 live neurons
    inputs = _inputs("bert")
    small = gp.compress(model, example_inputs=inputs, multiple=2)
    layer = _layers(small)[0]
    assert layer.attention.self.num_attention_heads == 2
    assert layer.intermediate.dense.out_features == 6
    assert (_out(model, inputs) - _out(small, inputs)).abs().max() <= 1e-10


def test_prox_steps_zero_groups_and_frozen_embeddings_are_left_out():
    model = _bert("bert").train()
    model.bert.embeddings.requires_grad_(False)
    h = gp.hierarchy.transformer(model)
    embeddings = {id(p) for p in model.bert.embeddings.parameters()}
    assert not any(id(t.param) in embeddings for t in h.tensors)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = gp.ProxAdam(params, lr=1e-2, hierarchy=h, penalties={"base_level": gp.GroupLasso(5.0)})
    inputs = _inputs("bert")
    labels = torch.tensor([0, 1, 2])
    train_steps(opt, lambda: model(**inputs, labels=labels).loss, 3)
    report = gp.get_sparsity_report(model, h).levels["base_level"]
    assert report.zero_groups > 0
    model.eval()
    small = gp.compress(model, h, example_inputs=inputs)
    assert count_params(small) < count_params(model)
    assert (_out(model, inputs) - _out(small, inputs)).abs().max() <= 1e-10


def test_subclassed_layer_is_left_alone_with_a_warning():
    from transformers.models.bert.modeling_bert import BertLayer

    class MyLayer(BertLayer):
        pass

    model = _bert("bert")
    config = model.config
    with torch.no_grad():
        _layers(model)[0].output.dense.weight.zero_()
    _layers(model)[1] = MyLayer(config).to(F64)
    with pytest.warns(UserWarning, match="subclasses"):
        small = gp.compress(model)
    assert isinstance(_layers(small)[0].output, RemovedBertOutput)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(gp.hierarchy.transformer(model).group_names("layer")) == 2


def test_decoder_bert_with_a_cache():
    """A removed self-attention of a causal BERT still records its tokens in the cache."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, is_decoder=True, **SIZES)
    model = transformers.BertLMHeadModel(config).to(F64).eval()
    with torch.no_grad():
        l0, l1 = _layers(model)
        for p in (*l0.attention.self.parameters(), *l0.attention.output.dense.parameters()):
            p.zero_()
        l1.attention.output.dense.weight[:, HD:] = 0
    ids = _inputs("bert")["input_ids"]
    small = gp.compress(model, example_inputs={"input_ids": ids})
    assert isinstance(_layers(small)[0].attention, RemovedBertAttention)

    def cached(m):
        with torch.no_grad():
            first = m(input_ids=ids[:, :6], use_cache=True)
            cache = getattr(first, "cache", None) or first.past_key_values
            return m(input_ids=ids[:, 6:], cache=cache, use_cache=True).logits

    assert (cached(model) - cached(small)).abs().max() <= 1e-10
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids[:, :3], **kw), small.generate(ids[:, :3], **kw))
