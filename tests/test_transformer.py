"""gp.hierarchy.transformer on torch.nn transformers: structure, zero = removed, training."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import group_prox as gp
from group_prox.hierarchy.transformer import transformer

E, H, HD, FF = 16, 4, 4, 32  # d_model, heads, head dim, feed-forward width
F64 = torch.float64


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random values everywhere, so zero biases and unit LayerNorms cannot hide a wrong group."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def _num_zeros(module: nn.Module) -> int:
    return sum(int(p.eq(0).sum()) for p in module.parameters())


def _zero_names(model: nn.Module, h: gp.Hierarchy, level: str) -> list[str]:
    return gp.get_sparsity_report(model, h).levels[level].zero_group_names


def _encoder(batch_first: bool, norm_first: bool, **kw) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        E, H, FF, dropout=0.0, batch_first=batch_first, norm_first=norm_first, **kw
    )
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


@contextlib.contextmanager
def _count_calls(monkeypatch, name: str):
    """Count calls of ``torch.<name>``, to know whether torch took its inference fast path."""
    calls = []
    orig = getattr(torch, name)
    monkeypatch.setattr(torch, name, lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    yield calls
    monkeypatch.setattr(torch, name, orig)


def _run(mode: str, fn):
    """``fn()`` in train mode, eval mode, or eval mode under no_grad (torch's fast path)."""
    with torch.no_grad() if mode == "no_grad" else contextlib.nullcontext():
        return fn()


# ----------------------------------------------------------------------------------- structure
ATTN_SIZE = 4 * E * E + 4 * E  # in_proj weight + bias, out_proj weight + bias
MLP_SIZE = 2 * E * FF + FF + E
HEAD_SIZE = 3 * HD * E + 3 * HD + E * HD
NEURON_SIZE = 2 * E + 1


@pytest.mark.parametrize(
    ("batch_first", "norm_first", "bias"),
    [(True, False, True), (False, True, True), (True, True, False)],
)
def test_encoder_structure(batch_first, norm_first, bias):
    model = _encoder(batch_first, norm_first, bias=bias)
    h = transformer(model)
    assert h.level_names == ("base_level", "layer")
    assert h.group_names("layer") == (
        "layers.0.self_attn",
        "layers.0.mlp",
        "layers.1.self_attn",
        "layers.1.mlp",
    )
    names = h.group_names("base_level")
    assert len(names) == 2 * (H + FF)
    assert names[: H + 1] == (
        *(f"layers.0.self_attn.head[{i}]" for i in range(H)),
        "layers.0.mlp[0]",
    )
    assert names[-1] == f"layers.1.mlp[{FF - 1}]"
    sizes = dict(zip(names, h.group_sizes("base_level")))
    norm = 2 * E if bias else E
    if bias:
        assert sizes["layers.1.self_attn.head[2]"] == HEAD_SIZE
        assert sizes["layers.0.mlp[7]"] == NEURON_SIZE
        attn, mlp = ATTN_SIZE, MLP_SIZE
    else:
        assert sizes["layers.1.self_attn.head[2]"] == 3 * HD * E + E * HD
        assert sizes["layers.0.mlp[7]"] == 2 * E
        attn, mlp = 4 * E * E, 2 * E * FF
    extra = norm if norm_first else 0
    assert h.group_sizes("layer") == [attn + extra, mlp + extra] * 2
    # Heads cover the attention but out_proj.bias; neurons cover the MLP but linear2.bias.
    assert H * sizes["layers.0.self_attn.head[0]"] + (E if bias else 0) == attn
    assert FF * sizes["layers.0.mlp[0]"] + (E if bias else 0) == mlp
    grouped = {lay.name for lay in h.tensors}
    assert ("layers.0.norm1.weight" in grouped) == norm_first
    assert ("layers.1.norm2.weight" in grouped) == norm_first


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_transformer_encoder_decoder_structure():
    model = nn.Transformer(
        E, H, 1, 2, dim_feedforward=FF, dropout=0.0, norm_first=True, batch_first=True
    )  # one encoder layer, two decoder layers
    h = transformer(model)
    assert h.group_names("layer") == (
        "encoder.layers.0.self_attn",
        "encoder.layers.0.mlp",
        *(
            f"decoder.layers.{i}.{s}"
            for i in range(2)
            for s in ("self_attn", "multihead_attn", "mlp")
        ),
    )
    attn, mlp = ATTN_SIZE + 2 * E, MLP_SIZE + 2 * E  # pre-norm: each branch has its LayerNorm
    assert h.group_sizes("layer") == [attn, mlp] + [attn, attn, mlp] * 2
    names = h.group_names("base_level")
    assert len(names) == 5 * H + 3 * FF
    assert "decoder.layers.1.multihead_attn.head[3]" in names
    assert "decoder.layers.0.mlp[31]" in names
    grouped = {lay.name for lay in h.tensors}
    # norm2 feeds the decoder's cross-attention, norm3 its MLP; the stacks' final norms are trunk.
    assert "encoder.norm.weight" not in grouped and "decoder.norm.weight" not in grouped
    layer_of = dict(zip(h.group_names("layer"), h.groups("layer")))
    dec = model.decoder.layers[0]

    def holds(group, p):
        return any(t.data_ptr() == p.data_ptr() for t in layer_of[group])

    assert holds("decoder.layers.0.self_attn", dec.norm1.weight)
    assert holds("decoder.layers.0.multihead_attn", dec.norm2.weight)
    assert holds("decoder.layers.0.mlp", dec.norm3.bias)
    assert not holds("decoder.layers.0.mlp", dec.norm2.bias)


def test_separate_projections_and_bias_kv_structure():
    model = nn.ModuleDict(
        {
            "attn": nn.MultiheadAttention(E, H, kdim=8, vdim=12, add_bias_kv=True),
            "fc": nn.Linear(E, 2),
        }
    )
    h = transformer(model)
    assert h.group_names("base_level") == tuple(f"attn.head[{i}]" for i in range(H))
    assert h.group_names("layer") == ("attn",)
    head = HD * E + HD * 8 + HD * 12 + 3 * HD + 2 * HD + E * HD
    assert h.group_sizes("base_level") == [head] * H
    attn = model["attn"]
    assert h.group_sizes("layer") == [sum(p.numel() for p in attn.parameters())]
    assert H * head + E == h.group_sizes("layer")[0]  # all but out_proj.bias
    assert "fc.weight" not in {lay.name for lay in h.tensors}
    shapes = [tuple(t.shape) for t in h.groups("base_level")[1]]
    # q, k, v rows; the three in_proj_bias slices; bias_k, bias_v channels; out_proj columns
    assert shapes == [(HD, E), (HD, 8), (HD, 12), *[(HD,)] * 3, (1, 1, HD), (1, 1, HD), (E, HD)]
    # The model itself being an attention: its layer group needs a name.
    h_root = transformer(attn)
    assert h_root.group_names("layer") == ("attention",)
    assert h_root.group_names("base_level")[0] == "head[0]"


def test_shared_modules_are_grouped_once():
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, norm_first=True)
    h = transformer(nn.ModuleList([layer, layer]))
    assert h.group_names("layer") == ("0.self_attn", "0.mlp")
    # Two layers sharing one attention: it is grouped once, under the first layer.
    a, b = (nn.TransformerEncoderLayer(E, H, FF, dropout=0.0) for _ in range(2))
    b.self_attn = a.self_attn
    h = transformer(nn.ModuleList([a, b]))
    assert h.group_names("layer") == ("0.self_attn", "0.mlp", "1.mlp")
    assert h.num_groups("base_level") == H + 2 * FF
    # Sharing only part of a sublayer cannot give disjoint groups.
    b = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0)
    b.linear1 = a.linear1
    with pytest.raises(
        ValueError, match=r"linear1.weight is shared by the sublayers '0.mlp' and '1.mlp'"
    ):
        transformer(nn.ModuleList([a, b]))


# ------------------------------------------------------------------------- zero means removed
@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
@pytest.mark.parametrize(
    ("batch_first", "norm_first"), [(True, False), (True, True), (False, True)]
)
def test_zero_neuron_equals_narrower_layer(monkeypatch, batch_first, norm_first, mode):
    kw = dict(dropout=0.0, batch_first=batch_first, norm_first=norm_first, dtype=F64)
    big = _randomize(nn.TransformerEncoderLayer(E, H, FF, **kw))
    small = nn.TransformerEncoderLayer(E, H, FF - 1, **kw)
    i = 5
    keep = [j for j in range(FF) if j != i]
    state = big.state_dict()
    state["linear1.weight"] = state["linear1.weight"][keep]
    state["linear1.bias"] = state["linear1.bias"][keep]
    state["linear2.weight"] = state["linear2.weight"][:, keep]
    small.load_state_dict(state)
    with torch.no_grad():
        big.linear1.weight[i] = 0
        big.linear1.bias[i] = 0
        big.linear2.weight[:, i] = 0
    h = transformer(big)
    assert _zero_names(big, h, "base_level") == [f"mlp[{i}]"]
    assert _num_zeros(big) == NEURON_SIZE  # the group is exactly what was zeroed
    assert _zero_names(big, h, "layer") == []

    for m in (big, small):
        m.train(mode == "train")
    x = torch.randn(3, 6, E, dtype=F64)
    if not batch_first:
        x = x.transpose(0, 1)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, -2:] = True
    with _count_calls(monkeypatch, "_transformer_encoder_layer_fwd") as fast:
        out = _run(
            mode, lambda: (big(x, src_key_padding_mask=pad), small(x, src_key_padding_mask=pad))
        )
    assert len(fast) == (2 if mode == "no_grad" and batch_first else 0)
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-12)


def _reference_attention(mha, query, key, value, heads, attn_mask=None, key_padding_mask=None):
    """Multi-head attention in plain torch over ``heads`` only; batch-first inputs, bool masks
    (True: not attended)."""
    e, hd = mha.embed_dim, mha.head_dim
    if mha.in_proj_weight is not None:
        wq, wk, wv = mha.in_proj_weight.split(e)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.split(e)
    q, k, v = query @ wq.T + bq, key @ wk.T + bk, value @ wv.T + bv
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    masked = torch.zeros(b, lq, lk, dtype=torch.bool)
    if attn_mask is not None:
        masked = masked | attn_mask
    if key_padding_mask is not None:
        masked = masked | key_padding_mask[:, None, :]
    if mha.bias_k is not None:  # one more key/value, never masked
        k = torch.cat([k, mha.bias_k.expand(b, 1, e)], 1)
        v = torch.cat([v, mha.bias_v.expand(b, 1, e)], 1)
        masked = F.pad(masked, (0, 1))
    out = mha.out_proj.bias.expand(b, lq, e)
    for h in heads:
        r = slice(h * hd, (h + 1) * hd)
        scores = q[..., r] @ k[..., r].transpose(1, 2) / math.sqrt(hd)
        weights = scores.masked_fill(masked, -math.inf).softmax(-1)
        out = out + (weights @ v[..., r]) @ mha.out_proj.weight[:, r].T
    return out


ATTENTION_CASES = {
    # fused projections, self-attention, padded keys: torch's fast path under no_grad
    "fused_padding": dict(kw={"batch_first": True}, kdim=E, vdim=E, lk=6, causal=False, pad=True),
    # fused projections, sequence-first, causal mask
    "fused_causal": dict(kw={}, kdim=E, vdim=E, lk=6, causal=True, pad=False),
    # separate q/k/v projections, bias_k/bias_v, cross-attention with both masks
    "separate_bias_kv": dict(
        kw={"kdim": 8, "vdim": 12, "add_bias_kv": True},
        kdim=8,
        vdim=12,
        lk=7,
        causal=True,
        pad=True,
    ),
}


@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_zero_head_equals_attention_without_it(monkeypatch, case, mode):
    c = ATTENTION_CASES[case]
    mha = _randomize(nn.MultiheadAttention(E, H, dropout=0.0, dtype=F64, **c["kw"]), seed=1)
    mha.train(mode == "train")
    gen = torch.Generator().manual_seed(2)
    lq = 6
    query = torch.randn(3, lq, E, generator=gen, dtype=F64)
    if c["kdim"] == E and c["lk"] == lq:
        key = value = query  # self-attention
    else:
        key = torch.randn(3, c["lk"], c["kdim"], generator=gen, dtype=F64)
        value = torch.randn(3, c["lk"], c["vdim"], generator=gen, dtype=F64)
    masks = {}
    if c["causal"]:
        masks["attn_mask"] = torch.ones(lq, c["lk"], dtype=torch.bool).triu(1)
    if c["pad"]:
        masks["key_padding_mask"] = torch.zeros(3, c["lk"], dtype=torch.bool)
        masks["key_padding_mask"][1, -3:] = True

    def forward():
        if mha.batch_first:
            return mha(query, key, value, need_weights=False, **masks)[0]
        args = (t.transpose(0, 1) for t in (query, key, value))
        return mha(*args, need_weights=False, **masks)[0].transpose(0, 1)

    # The reference is torch's attention when all heads are kept...
    with torch.no_grad():
        ref = _reference_attention(mha, query, key, value, range(H), **masks)
    torch.testing.assert_close(_run(mode, forward), ref, rtol=1e-12, atol=1e-12)

    dead = 2
    r = slice(dead * HD, (dead + 1) * HD)
    with torch.no_grad():
        if mha.in_proj_weight is not None:
            for j in range(3):
                mha.in_proj_weight[j * E + r.start : j * E + r.stop] = 0
        else:
            for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight):
                w[r] = 0
        for j in range(3):
            mha.in_proj_bias[j * E + r.start : j * E + r.stop] = 0
        if mha.bias_k is not None:
            mha.bias_k[..., r] = 0
            mha.bias_v[..., r] = 0
        mha.out_proj.weight[:, r] = 0
    h = transformer(mha)
    assert _zero_names(mha, h, "base_level") == [f"head[{dead}]"]
    assert _num_zeros(mha) == h.group_sizes("base_level")[dead]

    # ...and the head-less reference once the head's group is zero.
    with torch.no_grad():
        ref = _reference_attention(mha, query, key, value, [0, 1, 3], **masks)
    with _count_calls(monkeypatch, "_native_multi_head_attention") as fast:
        out = _run(mode, forward)
    assert len(fast) == (1 if mode == "no_grad" and case == "fused_padding" else 0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["train", "no_grad"])
@pytest.mark.parametrize("norm_first", [True, False])
def test_zero_layer_groups_leave_the_shortcut(monkeypatch, norm_first, mode):
    kw = dict(dropout=0.0, batch_first=True, norm_first=norm_first, dtype=F64)
    layer = _randomize(nn.TransformerEncoderLayer(E, H, FF, **kw))
    h = transformer(layer)
    opt = gp.ProxSGD(
        layer.parameters(), lr=1.0, hierarchy=h, penalties={"layer": gp.GroupLasso(1e6)}
    )
    opt.step()  # no gradients: the prox alone zeroes both branches
    assert _zero_names(layer, h, "layer") == ["self_attn", "mlp"]
    assert gp.get_sparsity_report(layer, h).levels["base_level"].zero_groups == H + FF
    layer.train(mode == "train")
    x = torch.randn(3, 5, E, dtype=F64)
    with _count_calls(monkeypatch, "_transformer_encoder_layer_fwd") as fast:
        out = _run(mode, lambda: layer(x))
    assert len(fast) == int(mode == "no_grad")
    if norm_first:
        torch.testing.assert_close(out, x, rtol=0, atol=0)  # x + 0 + 0
    else:
        assert layer.norm1.weight.ne(0).all()  # post-norm LayerNorms are not in any group
        with torch.no_grad():
            expected = layer.norm2(layer.norm1(x))
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm_first", [True, False])
def test_zero_cross_attention_group_skips_that_sublayer(norm_first):
    kw = dict(dropout=0.0, batch_first=True, norm_first=norm_first, dtype=F64)
    layer = _randomize(nn.TransformerDecoderLayer(E, H, FF, **kw))
    with torch.no_grad():
        for p in layer.multihead_attn.parameters():
            p.zero_()
        if norm_first:
            layer.norm2.weight.zero_()
            layer.norm2.bias.zero_()
    h = transformer(layer)
    assert _zero_names(layer, h, "layer") == ["multihead_attn"]
    assert _zero_names(layer, h, "base_level") == [f"multihead_attn.head[{i}]" for i in range(H)]
    assert _num_zeros(layer) == h.group_sizes("layer")[1]
    tgt, memory = torch.randn(2, 5, E, dtype=F64), torch.randn(2, 7, E, dtype=F64)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=F64)

    def sa(y):
        return layer.self_attn(y, y, y, attn_mask=causal, need_weights=False)[0]

    def ff(y):
        return layer.linear2(F.relu(layer.linear1(y)))

    with torch.no_grad():
        if norm_first:
            x = tgt + sa(layer.norm1(tgt))
            expected = x + ff(layer.norm3(x))
        else:
            x = layer.norm2(layer.norm1(tgt + sa(tgt)))  # norm2(x + 0): no cross-attention
            expected = layer.norm3(x + ff(x))
        out = layer(tgt, memory, tgt_mask=causal)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------------- training
class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, E)
        self.encoder = _encoder(batch_first=True, norm_first=True)
        self.fc = nn.Linear(E, 2)

    def forward(self, x):
        return self.fc(self.encoder(self.embed(x)).mean(1))


def _train(penalties: dict[str, gp.GroupLasso], steps: int = 40):
    torch.manual_seed(0)
    x = torch.randn(128, 6, 8)
    y = (x[:, :, 0].mean(1) + 0.5 * x[:, 0, 1] > 0).long()
    model = _Classifier()
    h = transformer(model)
    opt = gp.ProxAdam(model.parameters(), lr=1e-2, hierarchy=h, penalties=penalties)
    first = None
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    return model, h, first, loss.item()


def test_training_zeroes_heads_and_neurons():
    model, h, first, last = _train({"base_level": gp.GroupLasso(0.8)})
    assert last < first
    report = gp.get_sparsity_report(model, h).levels["base_level"]
    assert report.zero_groups > 0
    dead_heads = [n for n in report.zero_group_names if ".head[" in n]
    dead_neurons = [n for n in report.zero_group_names if ".mlp[" in n]
    assert dead_heads and dead_neurons
    for name in dead_heads:
        layer, head = name.split(".self_attn.head[")
        attn = model.get_submodule(layer).self_attn
        r = slice(int(head[:-1]) * HD, (int(head[:-1]) + 1) * HD)
        w = attn.in_proj_weight.view(3, E, E)[:, r]
        assert w.eq(0).all() and attn.in_proj_bias.view(3, E)[:, r].eq(0).all()
        assert attn.out_proj.weight[:, r].eq(0).all() and attn.out_proj.bias.ne(0).any()
    for name in dead_neurons:
        layer, i = name.split(".mlp[")
        mod, i = model.get_submodule(layer), int(i[:-1])
        assert mod.linear1.weight[i].eq(0).all() and mod.linear1.bias[i] == 0
        assert mod.linear2.weight[:, i].eq(0).all()
    assert gp.get_sparsity_report(model, h).levels["layer"].zero_groups == 0


def test_training_zeroes_whole_sublayers():
    model, h, _, _ = _train({"layer": gp.GroupLasso(0.8)})
    report = gp.get_sparsity_report(model, h).levels["layer"]
    assert report.zero_groups >= 1
    for name in report.zero_group_names:
        parent, _, sub = name.rpartition(".")
        layer = model.get_submodule(parent)
        if sub == "self_attn":
            mods = [layer.self_attn, layer.norm1]
        else:
            mods = [layer.linear1, layer.linear2, layer.norm2]
        assert all(p.eq(0).all() for m in mods for p in m.parameters())
    assert model.fc.weight.ne(0).any()


# ---------------------------------------------------------------------------------- errors
def test_not_a_module():
    with pytest.raises(TypeError, match=r"expected an nn\.Module, got dict"):
        transformer({"w": torch.zeros(3)})


def test_no_transformer_layers():
    with pytest.raises(ValueError, match=r"holds none of torch\.nn transformer layers"):
        transformer(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))


def test_replaced_sublayer():
    layer = nn.TransformerEncoderLayer(E, H, FF)
    layer.linear1 = nn.Identity()
    with pytest.raises(ValueError, match=r"linear1/linear2 are not two nn\.Linear"):
        transformer(layer)
