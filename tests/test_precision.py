"""Precisions and devices: float32/float64/bfloat16/float16 parameters, float32 master weights
under autocast, ``foreach`` on and off, and CUDA where there is one (skipped otherwise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import group_prox as gp
from tests import reference as ref

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Rounding of one multiplication in the parameter's precision (the scales are exact in float32).
TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prox_matches_the_float64_reference(device, dtype):
    """One prox step on parameters stored in ``dtype`` equals the float64 reference prox of the
    same stored values, up to one rounding in ``dtype``; the zeros are the reference's zeros."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 5).to(device, dtype))
    b = nn.Parameter(torch.randn(8).to(device, dtype))
    v = np.concatenate(
        [w.detach().double().cpu().numpy().ravel(), b.detach().double().cpu().numpy()]
    )
    rows = [[(w, 0, i), (b, 0, i)] for i in range(8)]
    h = gp.Hierarchy({"rows": rows, "all": [[w, b]]})
    pens = {"rows": gp.SparseGroupLasso(0.5, l1_ratio=0.2), "all": gp.GroupLasso(0.1)}
    gp.ProxSGD([w, b], lr=0.5, hierarchy=h, penalties=pens).step()
    assert w.dtype == b.dtype == dtype and w.device.type == device
    sets, _ = ref.group_index_sets(
        [(8, 5), (8,)],
        [[[(0, 0, i), (1, 0, i)] for i in range(8)], [[(0, None, None), (1, None, None)]]],
    )
    want = ref.prox(
        v, sets, [ref.RefPenalty("sgl", 0.5, l1_ratio=0.2), ref.RefPenalty("lasso", 0.1)], 0.5
    )
    got = np.concatenate(
        [w.detach().double().cpu().numpy().ravel(), b.detach().double().cpu().numpy()]
    )
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    assert np.array_equal(got == 0, want == 0)
    assert 0 < (want == 0).mean() < 1


def _model(dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)).to(device, dtype)


def _hierarchy(model: nn.Sequential) -> gp.Hierarchy:
    a, b = model[0], model[2]
    units = [[(a.weight, 0, i), (a.bias, 0, i), (b.weight, 1, i)] for i in range(16)]
    return gp.Hierarchy({"unit": units, "layer": [[a.weight, a.bias, b.weight]]}, names=model)


def _optimizer(kind: str, params, hierarchy: gp.Hierarchy, **kw) -> torch.optim.Optimizer:
    pens = {"unit": gp.GroupLasso(0.15), "layer": gp.GroupLasso(0.02)}
    if kind == "sgd":
        return gp.ProxSGD(params, lr=0.1, momentum=0.9, hierarchy=hierarchy, penalties=pens, **kw)
    pens["unit"].lam = 1.5
    kw.setdefault("eps", 1e-8)
    return gp.ProxAdam(params, lr=1e-2, hierarchy=hierarchy, penalties=pens, **kw)


def _batches(n: int, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(32, 10, generator=g)
        out.append((x.to(device), (x[:, :3].argmax(1)).to(device)))
    return out


def _train(model, opt, batches, dtype=None, scaler=None) -> None:
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        x = x.to(dtype or x.dtype)
        if scaler is None:
            F.cross_entropy(model(x).float(), y).backward()
            opt.step()
        else:
            scaler.scale(F.cross_entropy(model(x).float(), y)).backward()
            scaler.step(opt)
            scaler.update()


def _zero_units(model: nn.Sequential) -> torch.Tensor:
    return (model[0].weight == 0).all(dim=1).cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_in_half_precision(device, kind, dtype):
    """Parameters and optimizer state kept in 16 bits: the run stays finite, the zeros are exact
    and whole units, and the zero pattern is that of the float32 run (up to a unit at the edge;
    Adam's moments in float16 are too coarse for that: users keep float32 master weights)."""
    batches = _batches(12, device)
    model = _model(dtype, device)
    # Adam's default eps (1e-8) is 0 in float16: a zero group's 0/0 would be NaN.
    kw = {"eps": 1e-4} if kind == "adam" and dtype == torch.float16 else {}
    opt = _optimizer(kind, model.parameters(), _hierarchy(model), **kw)
    if kw:  # float16 moments underflow and make larger steps: a larger λ zeroes some units
        opt.penalties["unit"].lam = 2.0
    _train(model, opt, batches, dtype)
    full = _model(torch.float32, device)
    full_opt = _optimizer(kind, full.parameters(), _hierarchy(full), **kw)
    _train(full, full_opt, batches)
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    zero = _zero_units(model)
    assert zero.any() and torch.equal(zero, (model[0].bias == 0).cpu() & zero)
    assert opt.get_sparsity_report().levels["unit"].zero_groups == int(zero.sum())
    if not (kind == "adam" and dtype == torch.float16):
        assert (zero != _zero_units(full)).sum() <= 1
    assert not zero.all()


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_on_and_off_agree(kind, dtype):
    runs = {}
    for foreach in (False, True):
        model = _model(dtype)
        opt = _optimizer(kind, model.parameters(), _hierarchy(model), foreach=foreach)
        _train(model, opt, _batches(8), dtype)
        runs[foreach] = model
    for p, q in zip(runs[False].parameters(), runs[True].parameters()):
        torch.testing.assert_close(p, q, rtol=TOL[dtype], atol=TOL[dtype])
        assert torch.equal(p == 0, q == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_float32_master_weights_under_autocast(device, amp_dtype):
    """The usual mixed precision: float32 parameters (the master weights) and optimizer state,
    16-bit compute under autocast, a GradScaler for float16 (fused Adam takes the scale itself)."""
    model = _model(torch.float32, device)
    opt = _optimizer("adam", model.parameters(), _hierarchy(model), fused=True)
    scaler = torch.amp.GradScaler(device) if amp_dtype == torch.float16 else None
    with torch.autocast(device, dtype=amp_dtype):
        _train(model, opt, _batches(12, device), scaler=scaler)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert _zero_units(model).any() and opt.skipped_steps == 0


def test_explicit_master_copy_keeps_zeros_exact_in_the_model():
    """A bfloat16 model trained through a float32 master copy held by the optimizer: the groups
    the prox zeroes in the master are exactly zero in the model after the copy back."""
    model = _model(torch.bfloat16)
    master = _model(torch.float32)
    master.load_state_dict(model.state_dict())
    opt = _optimizer("sgd", master.parameters(), _hierarchy(master))
    for x, y in _batches(12):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.bfloat16()).float(), y).backward()
        for m, p in zip(master.parameters(), model.parameters()):
            m.grad = p.grad.float()
        opt.step()
        with torch.no_grad():
            for m, p in zip(master.parameters(), model.parameters()):
                p.copy_(m)
    zero = _zero_units(master)
    assert zero.any() and torch.equal(zero, _zero_units(model))
    assert (model[2].weight[:, zero] == 0).all()


@CUDA
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_cuda_matches_cpu(kind):
    batches = _batches(8)
    runs = {}
    for device in ("cpu", "cuda"):
        model = _model(torch.float64, device)
        opt = _optimizer(kind, model.parameters(), _hierarchy(model))
        _train(model, opt, [(x.to(device), y.to(device)) for x, y in batches])
        runs[device] = model
    for p, q in zip(runs["cpu"].parameters(), runs["cuda"].parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-9, atol=1e-12)
        assert torch.equal(p == 0, q.cpu() == 0)


def test_adam_refuses_an_eps_that_is_zero_in_float16():
    model = _model(torch.float16)
    with pytest.raises(
        ValueError, match=r"param group 0 holds float16 .*eps=1e-08 is 0 in float16"
    ):
        gp.ProxAdam(model.parameters(), lr=1e-3)
    gp.ProxAdam(model.parameters(), lr=1e-3, eps=1e-4)
