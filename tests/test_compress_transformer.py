"""Compression of torch.nn transformers: dead heads, MLP neurons and whole sublayers go, exactly."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import group_prox as gp
from group_prox.compression.report import count_params
from group_prox.compression.transformer import (
    CompressedTransformerDecoderLayer,
    CompressedTransformerEncoderLayer,
    PrunedMultiheadAttention,
    dead_heads,
)

from .test_transformer import _randomize

E, H, HD, FF = 16, 4, 4, 32  # d_model, heads, head dim, feed-forward width
B, L, S = 3, 7, 6  # batch, target length, source length

# torch warns about its own nested-tensor fast path; nothing here is about that.
pytestmark = pytest.mark.filterwarnings("ignore:.*nested.tensor.*:UserWarning")


@torch.no_grad()
def _zero_head(mha: nn.MultiheadAttention, h: int, how: str = "all") -> None:
    """Zero head ``h`` as the head group does (``how="all"``), or only its ``out_proj`` columns
    (``"out"``), or only its values (``"values"``: v rows, v bias, ``bias_v``)."""
    rows = slice(h * HD, (h + 1) * HD)
    if how in ("all", "out"):
        mha.out_proj.weight[:, rows] = 0
    if how == "out":
        return
    for j in (2,) if how == "values" else (0, 1, 2):
        r = slice(j * E + h * HD, j * E + (h + 1) * HD)
        if mha.in_proj_weight is not None:
            mha.in_proj_weight[r] = 0
        else:
            (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)[j][rows] = 0
        if mha.in_proj_bias is not None:
            mha.in_proj_bias[r] = 0
    for b in (mha.bias_v,) if how == "values" else (mha.bias_k, mha.bias_v):
        if b is not None:
            b[..., rows] = 0


@torch.no_grad()
def _zero_neurons(layer: nn.Module, idx: list[int]) -> None:
    layer.linear1.weight[idx] = 0
    layer.linear1.bias[idx] = 0
    layer.linear2.weight[:, idx] = 0


@torch.no_grad()
def _zero_module(module: nn.Module) -> None:
    for p in module.parameters():
        p.zero_()


@torch.no_grad()
def _zero_mlp(layer: nn.Module) -> None:
    for p in (*layer.linear1.parameters(), *layer.linear2.parameters()):
        p.zero_()


def _make_sparse_encoder(encoder: nn.TransformerEncoder) -> nn.TransformerEncoder:
    """Layer 0: no self-attention at all, 10 dead neurons. Layer 1: head 1 dead (out_proj
    columns only), no MLP at all. Layer 2: heads 0 (whole group) and 2 (values only) dead,
    neurons 5..20 dead."""
    l0, l1, l2 = encoder.layers
    _zero_module(l0.self_attn)
    _zero_neurons(l0, list(range(10)))
    _zero_head(l1.self_attn, 1, "out")
    _zero_mlp(l1)
    _zero_head(l2.self_attn, 0)
    _zero_head(l2.self_attn, 2, "values")
    _zero_neurons(l2, list(range(5, 21)))
    return encoder


def _encoder(batch_first: bool, norm_first: bool, seed: int = 0, **kw) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        E, H, FF, dropout=0.1, batch_first=batch_first, norm_first=norm_first, **kw
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ..."
        enc = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(E))
    return _randomize(enc, seed)


def _seq(batch_first: bool, length: int, dim: int = E, dtype=torch.float32) -> torch.Tensor:
    shape = (B, length, dim) if batch_first else (length, B, dim)
    return torch.randn(shape, dtype=dtype)


def _padding(length: int) -> torch.Tensor:
    kpm = torch.zeros(B, length, dtype=torch.bool)
    kpm[0, length - 2 :] = True
    kpm[2, length - 1 :] = True
    return kpm


def _random_mask(*shape: int) -> torch.Tensor:
    """A random bool mask that never masks a whole row (a fully masked row gives NaN in some of
    torch's paths and 0 in others, in the original model alone)."""
    mask = torch.rand(shape) < 0.3
    mask[..., 0] = False
    return mask


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _assert_close(want, got, rtol=1e-5, atol=1e-6) -> None:
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=rtol, atol=atol), (got - want).abs().max().item()


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_encoder_loses_heads_neurons_and_sublayers_exactly(batch_first, norm_first, monkeypatch):
    model = _make_sparse_encoder(_encoder(batch_first, norm_first)).eval()
    x = _seq(batch_first, L)
    small = gp.compress(model, gp.hierarchy.transformer(model), example_inputs=x)

    l0, l1, l2 = small.layers
    assert all(isinstance(m, CompressedTransformerEncoderLayer) for m in small.layers)
    assert l0.removed == ("self_attn",) and l1.removed == ("mlp",) and l2.removed == ()
    assert l0.linear1.out_features == FF - 10 and l2.linear2.in_features == FF - 16
    assert l1.self_attn.kept_heads == (0, 2, 3) and l2.self_attn.kept_heads == (1, 3)
    assert l0.self_attn.num_heads == 0 and l1.linear1.out_features == 0
    # Pre-norm: the norm feeding a removed branch goes; post-norm: it stays (it is on the trunk).
    assert (l0.norm1 is None) == norm_first and (l1.norm2 is None) == norm_first

    # Count the nested-tensor path: nn.TransformerEncoder takes it for a post-norm batch-first
    # stack in inference with a padding mask, and hands our layers a nested tensor.
    nested_calls = []
    original = CompressedTransformerEncoderLayer._forward_nested
    monkeypatch.setattr(
        CompressedTransformerEncoderLayer,
        "_forward_nested",
        lambda self, *a: nested_calls.append(1) or original(self, *a),
    )
    kpm, causal = _padding(L), nn.Transformer.generate_square_subsequent_mask(L)
    masks = [
        {},
        {"src_key_padding_mask": kpm},
        {"mask": causal, "is_causal": True},
        {"mask": causal, "src_key_padding_mask": kpm.float().masked_fill(kpm, -1e9)},
        {"mask": _random_mask(B * H, L, L)},  # per-head masks: the kept heads' are used
    ]
    for kw in masks:
        with torch.no_grad():
            _assert_close(model(x, **kw), small(x, **kw))
        _assert_close(model(x, **kw).detach(), small(x, **kw).detach())  # no fast paths
    assert bool(nested_calls) == (batch_first and not norm_first)


@pytest.mark.parametrize(("batch_first", "norm_first"), [(True, False), (False, True)])
def test_transformer_decoder_layers_are_compressed(batch_first, norm_first):
    model = _randomize(
        nn.Transformer(E, H, 2, 2, FF, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
    ).eval()
    d0, d1 = model.decoder.layers
    _zero_module(d0.multihead_attn)  # the whole cross-attention
    _zero_neurons(d0, [1, 4, 9])
    _zero_head(d1.self_attn, 3)
    _zero_head(d1.multihead_attn, 0, "out")
    _zero_mlp(d1)
    _zero_head(model.encoder.layers[1].self_attn, 2)
    src, tgt = _seq(batch_first, S), _seq(batch_first, L)
    small = gp.compress(model, example_inputs=(src, tgt))

    s0, s1 = small.decoder.layers
    assert isinstance(s0, CompressedTransformerDecoderLayer) and s0.removed == ("multihead_attn",)
    assert s1.removed == ("mlp",) and s1.multihead_attn.kept_heads == (1, 2, 3)
    assert s0.linear1.out_features == FF - 3 and s1.self_attn.num_heads == 3
    assert isinstance(small.encoder.layers[0], nn.TransformerEncoderLayer)  # nothing dead there

    tgt_mask = nn.Transformer.generate_square_subsequent_mask(L)
    cases = [
        {},
        {"tgt_mask": tgt_mask, "tgt_is_causal": True},
        {
            "src_key_padding_mask": _padding(S),
            "memory_key_padding_mask": _padding(S),
            "tgt_key_padding_mask": _padding(L),
            "tgt_mask": tgt_mask.isinf(),
            "memory_mask": _random_mask(L, S),
        },
    ]
    for kw in cases:
        with torch.no_grad():
            _assert_close(model(src, tgt, **kw), small(src, tgt, **kw))


def test_float64_equivalence_is_tight():
    model = _make_sparse_encoder(_encoder(False, True, seed=1)).double().eval()
    x = _seq(False, L, dtype=torch.float64)
    small = gp.compress(model, example_inputs=x)  # checks at rtol 1e-9, atol 1e-12
    with torch.no_grad():
        _assert_close(model(x), small(x), rtol=1e-12, atol=1e-13)


class _Attend(nn.Module):
    """A model around a standalone attention, returning its output and weights."""

    def __init__(self, **kw) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, **kw)

    def forward(self, q, k, v, **kw):
        return self.attn(q, k, v, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"kdim": 6, "vdim": 10},
        {"add_bias_kv": True},
        {"add_zero_attn": True, "batch_first": True},
        {"bias": False, "kdim": 5, "batch_first": True},
    ],
    ids=["kdim_vdim", "bias_kv", "zero_attn", "no_bias"],
)
def test_standalone_attention_keeps_only_live_heads(kw):
    model = _randomize(_Attend(**kw)).eval()
    _zero_head(model.attn, 1, "out")
    _zero_head(model.attn, 2)
    bf = kw.get("batch_first", False)
    q, k, v = _seq(bf, L), _seq(bf, S, kw.get("kdim", E)), _seq(bf, S, kw.get("vdim", E))
    small = gp.compress(model)
    attn = small.attn
    assert isinstance(attn, PrunedMultiheadAttention) and attn.kept_heads == (0, 3)
    assert attn.out_proj.in_features == 2 * HD
    if "kdim" in kw:
        assert attn.in_proj_weight is None and attn.k_proj_weight.shape == (2 * HD, kw["kdim"])
    else:
        assert attn.in_proj_weight.shape == (3 * 2 * HD, E)

    kpm = _padding(S)
    cases = [
        {},
        {"key_padding_mask": kpm, "need_weights": False},
        {"attn_mask": _random_mask(B * H, L, S)},
        {"attn_mask": torch.randn(B * H, L, S), "key_padding_mask": kpm.float() * -1e4},
        {"attn_mask": torch.randn(L, S), "need_weights": False},
    ]
    for c in cases:
        with torch.no_grad():
            (want, _), (got, _) = model(q, k, v, **c), small(q, k, v, **c)
        _assert_close(want, got)
    # Per-head weights are the kept heads' weights of the original attention.
    with torch.no_grad():
        _, w_all = model(q, k, v, average_attn_weights=False)
        _, w_kept = small(q, k, v, average_attn_weights=False)
        _, w_mean = small(q, k, v)
    _assert_close(w_all[:, [0, 3]], w_kept)
    _assert_close(w_all[:, [0, 3]].mean(1), w_mean)
    # Unbatched inputs.
    one = (lambda t: t[0]) if bf else (lambda t: t[:, 0])
    with torch.no_grad():
        _assert_close(model(one(q), one(k), one(v))[0], small(one(q), one(k), one(v))[0])


def test_attention_with_no_live_head_outputs_its_bias():
    model = _randomize(_Attend(batch_first=True)).eval()
    for h in range(H):
        _zero_head(model.attn, h, "out")  # out_proj.bias stays: the attention cannot go
    q, kv = _seq(True, L), _seq(True, S)
    # (not example_inputs=: the model returns attention weights, which are the kept heads' only)
    small = gp.compress(model)
    assert small.attn.num_heads == 0 and count_params(small) == E
    with torch.no_grad():
        out, w = small(q, kv, kv)
        _assert_close(model(q, kv, kv)[0], out)
    _assert_close(model.attn.out_proj.bias.detach().expand(B, L, E), out)
    assert w.shape == (B, L, S) and not w.any()


def test_parameter_count_drops_as_expected():
    model = _make_sparse_encoder(_encoder(True, True)).eval()
    head = 3 * (HD * E + HD) + E * HD  # q/k/v rows with biases, out_proj columns
    neuron = E + 1 + E  # linear1 row and bias, linear2 column
    norm = 2 * E
    attention = H * head  # what goes with a whole attention: its out_proj bias (zeros) stays
    mlp = FF * neuron  # likewise linear2's bias
    removed = (
        (attention + norm + 10 * neuron)  # layer 0: self-attention (and pre-norm norm1)
        + (head + mlp + norm)  # layer 1: one head, the MLP and norm2
        + (2 * head + 16 * neuron)  # layer 2
    )
    small = gp.compress(model)
    assert count_params(small) == count_params(model) - removed


def test_save_and_load_round_trip():
    model = _make_sparse_encoder(_encoder(True, False)).eval()
    small = gp.compress(model)
    buf = io.BytesIO()
    gp.save_compressed(small, buf)
    buf.seek(0)
    loaded = gp.load_compressed(lambda: _encoder(True, False, seed=7), buf)
    loaded.eval()
    x, kpm = _seq(True, L), _padding(L)
    with torch.no_grad():
        for kw in ({}, {"src_key_padding_mask": kpm}):
            assert torch.equal(small(x, **kw), loaded(x, **kw))
    assert [type(m) for m in loaded.layers] == [type(m) for m in small.layers]


def test_compressed_decoder_runs_under_compile_and_export():
    model = _randomize(nn.Transformer(E, H, 1, 2, FF, dropout=0.0, batch_first=True)).eval()
    _zero_module(model.decoder.layers[0].multihead_attn)
    _zero_head(model.decoder.layers[1].self_attn, 2)
    _zero_head(model.encoder.layers[0].self_attn, 0)
    _zero_neurons(model.decoder.layers[1], [0, 3])
    src, tgt = _seq(True, S), _seq(True, L)
    small = gp.compress(model, example_inputs=(src, tgt))
    with torch.no_grad():
        want = model(src, tgt)
        compiled = torch.compile(small, backend="aot_eager", fullgraph=True)
        _assert_close(want, compiled(src, tgt))
    exported = torch.export.export(small, (src, tgt))
    with torch.no_grad():
        _assert_close(want, exported.module()(src, tgt))


def test_training_step_on_the_compressed_model():
    model = _make_sparse_encoder(_encoder(False, False))
    small = gp.compress(model).train()
    x = _seq(False, L)
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    loss = small(x, src_key_padding_mask=_padding(L)).pow(2).mean()
    loss.backward()
    kept = small.layers[2].self_attn
    assert kept.in_proj_weight.grad is not None and kept.in_proj_weight.grad.any()
    assert small.layers[0].linear2.weight.grad is not None
    assert small.layers[0].self_attn.in_proj_weight.numel() == 0  # removed: never called
    opt.step()
    with torch.no_grad():  # dropout in training mode on the pruned attention
        kept.train()
        out, w = kept(x, x, x, need_weights=True)
        assert out.isfinite().all() and w.shape == (B, L, L)


def test_nothing_dead_means_nothing_changes():
    model = _randomize(nn.Transformer(E, H, 1, 1, FF, dropout=0.0)).eval()
    small = gp.compress(model)
    assert len(small.group_prox_plan) == 0
    assert count_params(small) == count_params(model)
    assert type(small.decoder.layers[0]) is nn.TransformerDecoderLayer


def test_groups_zeroed_by_prox_adam_are_removed():
    torch.manual_seed(0)
    model = _encoder(True, True, seed=3)
    # Small groups, which a moderate λ zeroes in a few steps: head 1 and neurons 0..7 of every
    # layer, and the whole MLP sublayer (with its LayerNorm) of layer 1.
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.in_proj_weight.view(3, H, HD, E)[:, 1] *= 0.01
            layer.self_attn.in_proj_bias.view(3, H, HD)[:, 1] *= 0.01
            layer.self_attn.out_proj.weight[:, HD : 2 * HD] *= 0.01
            layer.linear1.weight[:8] *= 0.01
            layer.linear1.bias[:8] *= 0.01
            layer.linear2.weight[:, :8] *= 0.01
        l1 = model.layers[1]
        for p in (*l1.linear1.parameters(), *l1.linear2.parameters(), *l1.norm2.parameters()):
            p *= 0.01
    h = gp.hierarchy.transformer(model)
    opt = gp.ProxAdam(
        model.parameters(),
        lr=1e-2,
        hierarchy=h,
        penalties={"base_level": gp.GroupLasso(1.0), "layer": gp.GroupLasso(1.0)},
    )
    x = _seq(True, L)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    model.eval()
    assert gp.get_sparsity_report(model, h).levels["layer"].zero_group_names == ["layers.1.mlp"]
    small = gp.compress(model, h, example_inputs=x)
    assert [m.removed for m in small.layers] == [(), ("mlp",), ()]
    assert all(m.self_attn.kept_heads == (0, 2, 3) for m in small.layers)
    assert small.layers[0].linear1.out_features == FF - 8
    with torch.no_grad():
        _assert_close(
            model(x, src_key_padding_mask=_padding(L)), small(x, src_key_padding_mask=_padding(L))
        )


def test_multiple_rounds_widths_up_with_dead_units():
    model = _make_sparse_encoder(_encoder(True, False)).eval()
    x = _seq(True, L)
    small = gp.compress(model, multiple=4, example_inputs=x)
    assert small.layers[0].linear1.out_features == 24  # 22 live → 24
    # 3 live heads → all 4 kept (the layer still goes for its MLP); 2 live → 4: neurons only.
    assert type(small.layers[1].self_attn) is nn.MultiheadAttention
    assert type(small.layers[2]) is nn.TransformerEncoderLayer
    assert small.layers[2].linear1.out_features == 16
    small2 = gp.compress(model, multiple=2, example_inputs=x)
    assert small2.layers[1].self_attn.num_heads == 4 and small2.layers[2].self_attn.num_heads == 2


def test_compressing_twice_composes_the_plans():
    model = _make_sparse_encoder(_encoder(False, True)).eval()
    x = _seq(False, L)
    small = gp.compress(model)
    _zero_head(model.layers[2].self_attn, 3)  # later training kills one more head and the MLP
    _zero_mlp(model.layers[2])
    kept = small.layers[2].self_attn
    with torch.no_grad():
        kept.out_proj.weight[:, HD:] = 0  # head 3 is the second kept head
        small.layers[2].linear2.weight.zero_()
        small.layers[2].linear2.bias.zero_()
    smaller = gp.compress(small, example_inputs=x)
    assert smaller.layers[2].removed == ("mlp",) and smaller.layers[2].self_attn.kept_heads == (1,)
    assert len(smaller.group_prox_plan) > len(small.group_prox_plan)
    buf = io.BytesIO()
    gp.save_compressed(smaller, buf)
    buf.seek(0)
    loaded = gp.load_compressed(lambda: _encoder(False, True, seed=5), buf).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), smaller(x))
        _assert_close(model(x), smaller(x))


def test_shared_and_overridden_modules_are_left_alone():
    class Custom(nn.TransformerEncoderLayer):
        def forward(self, src, *args, **kwargs):
            return super().forward(src, *args, **kwargs) * 2

    shared = _randomize(nn.TransformerEncoderLayer(E, H, FF, dropout=0.0))
    model = nn.Sequential(shared, shared, _randomize(Custom(E, H, FF, dropout=0.0))).eval()
    for layer in (shared, model[2]):
        _zero_head(layer.self_attn, 0)
        _zero_neurons(layer, [1, 2])
    small = gp.compress(model, example_inputs=_seq(False, L))
    assert len(small.group_prox_plan) == 0


def test_dead_head_criteria():
    mha = _randomize(nn.MultiheadAttention(E, H, add_bias_kv=True))
    _zero_head(mha, 0, "out")
    _zero_head(mha, 1, "values")
    with torch.no_grad():  # zero queries and keys: uniform attention, but the head still adds
        mha.in_proj_weight[: 2 * E].view(2, H, HD, E)[:, 2] = 0
        mha.in_proj_bias[: 2 * E].view(2, H, HD)[:, 2] = 0
    assert dead_heads(mha).tolist() == [True, True, False, False]
    with torch.no_grad():
        mha.bias_v[..., HD : 2 * HD] = 1.0  # the appended bias value of head 1 is not 0
    assert dead_heads(mha).tolist() == [True, False, False, False]


def test_a_model_that_is_a_layer_only_loses_neurons():
    layer = _randomize(nn.TransformerEncoderLayer(E, H, FF, batch_first=True)).eval()
    _zero_head(layer.self_attn, 1)
    _zero_neurons(layer, [0, 5])
    x = _seq(True, L)
    small = gp.compress(layer, example_inputs=x)  # the fused inference path runs here
    assert type(small) is nn.TransformerEncoderLayer and small.linear1.out_features == FF - 2
    assert type(small.self_attn) is nn.MultiheadAttention


def test_pruned_attention_reports_bad_masks_by_name():
    model = _randomize(_Attend()).eval()
    _zero_head(model.attn, 0)
    small = gp.compress(model)
    q = _seq(False, L)
    with pytest.raises(RuntimeError, match=r"PrunedMultiheadAttention: the 3-D attn_mask"):
        small(q, q, q, attn_mask=torch.zeros(B * 3, L, L))
    with pytest.raises(RuntimeError, match="is_causal=True needs attn_mask"):
        small(q, q, q, is_causal=True)
