"""The contract every registered model family keeps, tested the same way for each.

Zero some groups of its finest level with the optimizer, then ``compress``: the outputs stay the
same, most of the zeroed groups' parameters are gone, the file round-trips through
``save_compressed``/``load_compressed``, and the compressed model trains again with a hierarchy
from the same builder. A family registered without an example here fails
:func:`test_every_registered_family_has_an_example`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import group_prox as gp
from group_prox.families import families
from group_prox.inputs import run_model, tensors_of


@dataclass(frozen=True)
class Example:
    build: Callable[[], nn.Module]  # a fresh model, same weights each call
    inputs: Callable[[], Any]
    # which base_level groups to zero: those a zero removes exactly (a channel of a residual
    # stream, written by several layers, is removed only when dead in all of them)
    pick: Callable[[gp.Hierarchy], list[str]]
    needs: str | None = None  # an optional library the example needs


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return fn().double().eval()

    return build


def _every_other(prefix_filter: Callable[[str], bool]) -> Callable[[gp.Hierarchy], list[str]]:
    def pick(h: gp.Hierarchy) -> list[str]:
        names = [n for n in h.group_names("base_level") if prefix_filter(n)]
        return names[::2]

    return pick


def _resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)


def _torch_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _moe() -> nn.Module:
    from examples.moe import MoEClassifier

    return MoEClassifier(6, 8, 3, num_experts=4, fused=False)


def _images() -> torch.Tensor:
    return torch.randn(
        2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )


def _tokens(d: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(3, 5, d, generator=torch.Generator().manual_seed(1)).double()


def _bert() -> nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3, attn_implementation="eager",
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16, attn_implementation="eager"
    )
    return transformers.GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager",
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _mixtral() -> nn.Module:
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=50, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        experts_implementation="eager",
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config)


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from . import test_family_timm

        return getattr(test_family_timm, name)()

    return build


def _torchvision_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
        num_classes=5,
    )  # fmt: skip


def _bart() -> nn.Module:
    import transformers

    config = transformers.BartConfig(
        vocab_size=50, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
        max_position_embeddings=32, attn_implementation="eager",
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config)


def _seq2seq_ids() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(3, 50, (2, 7), generator=g),
        "decoder_input_ids": torch.randint(3, 50, (2, 5), generator=g),
    }


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))}


EXAMPLES: dict[str, Example] = {
    "torchvision-resnet": Example(
        _seeded(_resnet), _images, _every_other(lambda n: ".conv1[" in n and "layer" in n)
    ),
    "torch-transformer": Example(
        _seeded(_torch_encoder), _tokens(16), _every_other(lambda n: True)
    ),
    "experts": Example(_seeded(_moe), _tokens(6), _every_other(lambda n: True)),
    "hf-encoder": Example(_seeded(_bert), _ids, _every_other(lambda n: True), "transformers"),
    "hf-decoder": Example(_seeded(_llama), _ids, _every_other(lambda n: True), "transformers"),
    "hf-fused-experts": Example(
        _seeded(_mixtral), _ids, _every_other(lambda n: "experts" in n), "transformers"
    ),
    "timm-resnet": Example(
        _seeded(_timm("small_resnet")),
        _images,
        _every_other(lambda n: ".conv1[" in n and "layer" in n),
        "timm",
    ),
    "timm-vit": Example(_seeded(_timm("small_vit")), _images, _every_other(lambda n: True), "timm"),
    "timm-convnext": Example(
        _seeded(_timm("small_convnext")), _images, _every_other(lambda n: True), "timm"
    ),
    "torchvision-vit": Example(_seeded(_torchvision_vit), _images, _every_other(lambda n: True)),
    "hf-seq2seq": Example(
        _seeded(_bart), _seq2seq_ids, _every_other(lambda n: True), "transformers"
    ),
    "hf-gpt2": Example(_seeded(_gpt2), _ids, _every_other(lambda n: True), "transformers"),
}

BUILDERS = {"resnet": gp.hierarchy.resnet, "transformer": gp.hierarchy.transformer}


def _builder(family: str) -> Callable[[nn.Module], gp.Hierarchy]:
    kind = next(f.builder for f in families() if f.name == family)
    return BUILDERS.get(kind) or getattr(gp.hierarchy, kind)


def test_every_registered_family_has_an_example():
    missing = [f.name for f in families() if f.name not in EXAMPLES]
    assert not missing, f"add an Example for {missing} to tests/test_families.py"


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _zero(model: nn.Module, h: gp.Hierarchy, names: list[str]) -> int:
    """Zero the groups ``names`` of base_level by one proximal step with a huge λ on them alone;
    returns the number of parameters they hold."""
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = gp.ProxSGD(
        params, lr=1.0, hierarchy=h, penalties={"base_level": gp.GroupLasso(1e12, groups=names)}
    )
    opt.step()
    sizes = dict(zip(h.group_names("base_level"), h.group_sizes("base_level"), strict=True))
    return sum(sizes[n] for n in names)


def _outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.detach() for t in tensors_of(run_model(model.eval(), inputs))]


@pytest.mark.parametrize("family", sorted(EXAMPLES))
def test_a_family_compresses_its_zero_groups_exactly_and_trains_again(family):
    example = EXAMPLES[family]
    if example.needs:
        pytest.importorskip(example.needs)
    build = _builder(family)
    model = example.build()
    h = build(model)
    picked = example.pick(h)
    assert picked, family
    zeroed = _zero(model, h, picked)
    report = gp.get_sparsity_report(model, h)
    assert report.levels["base_level"].zero_groups >= len(picked)

    inputs = example.inputs()
    small = gp.compress(model, h, example_inputs=inputs)
    for want, got in zip(_outputs(model, inputs), _outputs(small, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    removed = _params(model) - _params(small)
    assert removed >= 0.9 * zeroed, (family, removed, zeroed)

    buf = io.BytesIO()
    gp.save_compressed(small, buf)
    loaded = gp.load_compressed(example.build, io.BytesIO(buf.getvalue()))
    for want, got in zip(_outputs(small, inputs), _outputs(loaded, inputs), strict=True):
        assert torch.equal(want, got)

    again = build(loaded.train())
    opt = gp.ProxAdam(
        loaded.parameters(), lr=1e-2, hierarchy=again, penalties={"base_level": gp.GroupLasso(1.0)}
    )
    for _ in range(3):
        opt.zero_grad()
        loss = sum(t.float().square().mean() for t in tensors_of(run_model(loaded, inputs)))
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
