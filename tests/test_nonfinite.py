"""Non-finite gradients and parameters: refused or skipped before anything changes, and
torch.amp.GradScaler's overflow handling, fused or not."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import group_prox as gp

from .identical import assert_identical

OPTIMIZERS = {
    "sgd": lambda params, **kw: gp.ProxSGD(params, lr=0.05, momentum=0.9, **kw),
    "adam": lambda params, **kw: gp.ProxAdam(params, lr=0.01, **kw),
}


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _hierarchy(model: nn.Sequential) -> gp.Hierarchy:
    first, second = model[0], model[2]
    units = [[(first.weight, 0, i), (first.bias, 0, i), (second.weight, 1, i)] for i in range(8)]
    return gp.Hierarchy(
        {"unit": units, "layer": [[first.weight, first.bias, second.weight]]}, names=model
    )


def _optimizer(name: str, model: nn.Sequential, **kw) -> torch.optim.Optimizer:
    penalties = {"unit": gp.GroupLasso(0.5), "layer": gp.GroupLasso(0.1)}
    return OPTIMIZERS[name](
        model.parameters(), hierarchy=_hierarchy(model), penalties=penalties, **kw
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _backward(model: nn.Module, step: int, scale: float = 1.0) -> None:
    x, y = _batch(step)
    (nn.functional.cross_entropy(model(x), y) * scale).backward()


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    """Parameters, buffers and optimizer state, less the count of skipped steps."""
    state = copy.deepcopy(opt.state_dict())
    state["group_prox"].pop("skipped_steps")
    return copy.deepcopy(model.state_dict()), state


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("where", ["grad", "param"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_raise_names_the_tensor_and_changes_nothing(name, where, value):
    model = _model()
    opt = _optimizer(name, model)
    for step in range(2):  # momentum / Adam state exists
        opt.zero_grad()
        _backward(model, step)
        opt.step()
    opt.zero_grad()
    _backward(model, 2)
    target = model[2].weight
    with torch.no_grad():
        (target.grad if where == "grad" else target)[1, 4] = value
    before = _snapshot(model, opt)
    grads = [p.grad.clone() for p in model.parameters()]
    word = "NaN" if value != value else "infinite"
    what = "gradient of '2.weight'" if where == "grad" else "parameter '2.weight'"
    with pytest.raises(
        FloatingPointError, match=rf"{what} holds {word} values.*Nothing was changed"
    ):
        opt.step()
    assert_identical(before, _snapshot(model, opt), equal_nan=True)
    for g, p in zip(grads, model.parameters()):
        assert_identical(g, p.grad, equal_nan=True)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_parameters_the_prox_read_are_not_read_again_until_written(name):
    """The look for non-finite values leaves out the parameters that the last prox found finite,
    until something writes them (a write under no_grad, load_state_dict, torch.nn.init)."""
    model = _model()
    opt = _optimizer(name, model)
    _backward(model, 0)
    opt.step()
    params = list(model.parameters())

    def unread() -> list[int]:
        return [id(p) for p in opt.prox.unread(params)]

    assert unread() == [id(model[2].bias)]  # the only parameter outside the hierarchy
    with torch.no_grad():
        model[0].bias[0] = 1.0
    assert unread() == [id(model[0].bias), id(model[2].bias)]
    model.load_state_dict(model.state_dict())
    assert unread() == [id(p) for p in params]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_write_through_data_is_still_caught_by_the_prox(name):
    """In-place writes through ``.data`` bypass version counters, so the look before the step
    misses them; the prox's own check after the update still refuses to spread the NaN."""
    model = _model()
    opt = _optimizer(name, model)
    _backward(model, 0)
    opt.step()
    opt.zero_grad()
    _backward(model, 1)
    model[2].weight.data[1, 4] = float("nan")
    with pytest.raises(FloatingPointError, match=r"made parameter '2\.weight' NaN"):
        opt.step()


def test_unnamed_parameters_are_named_by_their_place():
    w = nn.Parameter(torch.ones(3, 2))
    opt = gp.ProxSGD([{"params": [nn.Parameter(torch.ones(2))]}, {"params": [w]}], lr=0.1)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    w.grad = torch.full_like(w, float("nan"))
    with pytest.raises(FloatingPointError, match=r"param_groups\[1\]\['params'\]\[0\] \(shape"):
        opt.step()


def test_named_parameters_given_to_the_optimizer_are_used():
    model = _model()
    opt = gp.ProxAdam(model.named_parameters(), lr=0.01)
    _backward(model, 0)
    model[0].bias.grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"gradient of '0\.bias'"):
        opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_skip_skips_the_whole_step_and_counts_it(name):
    """A run with a poisoned step skipped equals the same run without that batch."""
    skipping, reference = _model(), _model()
    opt = _optimizer(name, skipping, nonfinite="skip")
    ref_opt = _optimizer(name, reference)
    for step in range(6):
        opt.zero_grad()
        _backward(skipping, step)
        if step == 3:
            skipping[0].weight.grad[2, 1] = float("nan")
        opt.step()
        if step != 3:
            ref_opt.zero_grad()
            _backward(reference, step)
            ref_opt.step()
    assert opt.skipped_steps == 1
    for p, q in zip(skipping.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert opt.state_dict()["group_prox"]["skipped_steps"] == 1
    fresh = _optimizer(name, _model(), nonfinite="skip")
    fresh.load_state_dict(opt.state_dict())
    assert fresh.skipped_steps == 1


def test_skip_with_a_closure_returns_the_loss():
    model = _model()
    opt = _optimizer("sgd", model, nonfinite="skip")
    before = copy.deepcopy(model.state_dict())

    def closure():
        opt.zero_grad()
        x, y = _batch(0)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        model[2].bias.grad[0] = float("inf")
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss) and opt.skipped_steps == 1
    assert_identical(before, model.state_dict(), equal_nan=True)


def test_ignore_does_not_look():
    model = _model()
    opt = _optimizer("sgd", model, nonfinite="ignore")
    _backward(model, 0)
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert model[0].weight.isnan().any() and opt.skipped_steps == 0


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        gp.ProxSGD(_model().parameters(), lr=0.1, nonfinite="warn")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_skips_overflowing_steps(name, fused):
    """GradScaler: unscale, inf check, step skipped, scale lowered; finite steps equal the run
    without a scaler (power-of-two scales unscale exactly)."""
    scaled, plain = _model(), _model()
    opt = _optimizer(name, scaled, fused=fused)
    ref = _optimizer(name, plain, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for step in range(5):
        opt.zero_grad()
        x, y = _batch(step)
        scaler.scale(nn.functional.cross_entropy(scaled(x), y)).backward()
        if step == 2:
            scaled[2].weight.grad[0, 0] = float("inf")
            before = _snapshot(scaled, opt)
        scaler.step(opt)
        scaler.update()
        if step == 2:
            assert_identical(before, _snapshot(scaled, opt), equal_nan=True)
            assert scaler.get_scale() == 2.0**9
            continue
        ref.zero_grad()
        _backward(plain, step)
        ref.step()
    # A fused step is driven through found_inf and counted; otherwise the scaler never calls step.
    assert opt.skipped_steps == (1 if fused else 0)
    for p, q in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_grad_scaler_with_unscale_for_clipping():
    model = _model()
    opt = _optimizer("adam", model, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(3):
        opt.zero_grad()
        x, y = _batch(step)
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_an_update_that_overflows_does_not_spread(nonfinite):
    """Finite inputs, but the update overflows float16: the prox refuses to scale any group, so
    the infinities stay where the update put them instead of spreading to the whole tree."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3).half())
    h = gp.Hierarchy({"rows": [[(w, 0, i)] for i in range(4)], "all": [[w]]}, names={"w": w})
    opt = gp.ProxSGD(
        [w], lr=1e3, hierarchy=h, penalties={"rows": gp.GroupLasso(0.1), "all": gp.GroupLasso(0.1)},
        nonfinite=nonfinite,
    )  # fmt: skip
    w.grad = torch.zeros_like(w)
    w.grad[1, 2] = 1e3  # lr·grad = 1e6 overflows float16
    with pytest.raises(FloatingPointError, match=r"SGD update made parameter 'w' NaN or infinite"):
        opt.step()
    assert torch.isinf(w[1, 2]) and torch.isfinite(w).sum() == w.numel() - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_first_nonfinite_tells_an_overflowing_reduction_from_an_infinity(dtype):
    """The look's fast reduction (a dot product, a sum or a norm) overflows on large finite values;
    those are not taken for infinities, and a NaN or an infinity is found in every layout."""
    from group_prox.optim._nonfinite import first_nonfinite

    big = torch.finfo(dtype).max / 2
    tensors = [
        torch.full((64,), big, dtype=dtype),
        torch.full((8, 8), big, dtype=dtype).t(),  # not contiguous
        torch.ones(3, 5, dtype=dtype),
        torch.empty(0, dtype=dtype),
    ]
    assert first_nonfinite(tensors) is None
    for i in range(3):
        for bad in (float("nan"), float("inf"), -float("inf")):
            spoiled = [t.clone() for t in tensors]
            spoiled[i][(0,) * spoiled[i].dim()] = bad
            assert first_nonfinite(spoiled) == i
