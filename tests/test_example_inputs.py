"""example_inputs as users hold them: a tensor, a tuple, a list, or a dict of keyword inputs,
wherever the package runs a model (auto hierarchies, compress, compression_report)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import group_prox as gp
from group_prox.inputs import batch_size, like_model, run_model, tensors_of

pytest.importorskip("torch_pruning")


class KeywordNet(nn.Module):
    """Takes its inputs by keyword, as Hugging Face models do; of no family the package knows."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.act = nn.GELU()
        self.head = nn.Linear(16, 3)

    def forward(self, pixel_values: torch.Tensor, bias: torch.Tensor | None = None) -> dict:
        h = self.act(self.embed(pixel_values))
        logits = self.head(h)
        return {"logits": logits if bias is None else logits + bias}


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 12)
        self.b = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) * y


def _zero_units(linear: nn.Linear, consumer: nn.Linear, units: list[int]) -> None:
    with torch.no_grad():
        linear.weight[units] = 0
        linear.bias[units] = 0
        consumer.weight[:, units] = 0


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_a_dict_of_keyword_inputs_traces_compresses_and_reports():
    torch.manual_seed(0)
    model = KeywordNet()
    inputs = {"pixel_values": torch.randn(5, 6, generator=_g()), "bias": torch.randn(3)}
    h = gp.hierarchy.auto(model, inputs)
    _zero_units(model.embed, model.head, [1, 4, 5, 9])
    small = gp.compress(model, h, example_inputs=inputs)
    assert small.embed.out_features == 12 and small.head.in_features == 12
    with torch.no_grad():
        assert torch.allclose(model(**inputs)["logits"], small(**inputs)["logits"], atol=1e-6)
    report = gp.compression_report(model, small, inputs, runs=1, warmup=0)
    assert report.batch_size == 5 and report.params_after < report.params_before
    # The hierarchy recorded the dict: compress traces it again without being given inputs.
    assert gp.compress(model, h).embed.out_features == 12


@pytest.mark.parametrize("kind", [tuple, list])
def test_a_tuple_or_list_is_passed_as_positional_inputs(kind):
    torch.manual_seed(0)
    model = TwoInputs()
    inputs = kind([torch.randn(3, 4, generator=_g()), torch.randn(3, 2, generator=_g(1))])
    h = gp.hierarchy.auto(model, inputs)
    _zero_units(model.a, model.b, [0, 2, 3])
    small = gp.compress(model, h, example_inputs=inputs)
    assert small.a.out_features == 9
    assert gp.compression_report(model, small, inputs, runs=1, warmup=0).batch_size == 3


def test_a_tensor_of_batch_size_one_is_never_unbatched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(1, 4, generator=_g())
    h = gp.hierarchy.auto(model, x)
    _zero_units(model[0], model[2], [1, 2])
    small = gp.compress(model, h, example_inputs=x)
    assert small[0].out_features == 6
    assert gp.compression_report(model, small, x, runs=1, warmup=0).batch_size == 1


def test_a_dict_with_keys_that_are_not_names_is_refused():
    model = KeywordNet()
    bad = {0: torch.randn(2, 6)}
    for call in (
        lambda: gp.compress(model, example_inputs=bad),
        lambda: gp.hierarchy.auto(model, bad),
        lambda: gp.compression_report(model, model, bad),
    ):
        with pytest.raises(TypeError, match=r"keys must be str; got the key 0"):
            call()


def test_the_helpers_treat_every_kind_alike():
    def f(*args, **kwargs):
        return args, kwargs

    x = torch.zeros(2, 3)
    assert run_model(f, x) == ((x,), {})
    assert run_model(f, [x, 1]) == ((x, 1), {})
    assert run_model(f, {"a": x}) == ((), {"a": x})
    assert [t.shape for t in tensors_of({"a": [x, (x[0], "s")], "b": None})] == [(2, 3), (3,)]
    assert batch_size({"ids": torch.zeros(7, 2, dtype=torch.long)}) == 7
    assert batch_size(torch.tensor(3.0)) == 1
    model = nn.Linear(3, 1).double()
    moved = like_model({"x": x, "ids": torch.zeros(2, dtype=torch.long)}, model)
    assert moved["x"].dtype == torch.float64 and moved["ids"].dtype == torch.long
