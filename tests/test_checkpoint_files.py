"""Adversarial checkpoints: foreign, truncated, bit-flipped, of other kinds, options or versions.

Each case damages a good state dict (of an optimizer or a SparsityTarget) and must be refused with
the named exception and message, leaving every object exactly as it was."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import group_prox as gp

from .identical import assert_identical


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _hierarchy(m: nn.Sequential) -> gp.Hierarchy:
    units = {
        f"u{i}": [(m[0].weight, 0, i), (m[0].bias, 0, i), (m[2].weight, 1, i)] for i in range(8)
    }
    hidden = [m[0].weight, m[0].bias, m[2].weight]
    return gp.Hierarchy({"unit": units, "block": {"hidden": hidden}}, names=m)


def _penalties(kind: str) -> dict[str, gp.Penalty]:
    unit = gp.SparseGroupLasso(0.02, 0.3) if kind == "sgl" else gp.GroupLasso(0.02)
    return {"unit": unit, "block": gp.GroupLasso(0.01)}


def _trained(kind: str = "adam", pen: str = "lasso", freeze: bool = False) -> Any:
    m = _model()
    h = _hierarchy(m)
    if kind == "adam":
        opt = gp.ProxAdam(m.parameters(), lr=0.05, hierarchy=h, penalties=_penalties(pen))
    else:
        opt = gp.ProxSGD(
            m.parameters(), lr=0.1, momentum=0.9, hierarchy=h, penalties=_penalties(pen)
        )
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(5, 6, generator=g)).square().mean().backward()
        opt.step()
    if freeze:
        opt.freeze_zero_groups()
    return m, opt


def _flip_bit(t: torch.Tensor, index: int = 0) -> None:
    """Flip the lowest bit of one byte of ``t``'s storage, in place."""
    raw = t.reshape(-1).view(torch.uint8)
    raw[min(index, raw.numel() - 1)] ^= 1


def _first_state(sd: dict[str, Any]) -> dict[str, Any]:
    return next(iter(sd["state"].values()))


def _snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    state = copy.deepcopy(opt.state_dict())
    return {
        "state": state,
        "params": [p.detach().clone() for g in opt.param_groups for p in g["params"]],
        "lams": {lv: (p.lam, getattr(p, "l1_ratio", None)) for lv, p in opt.penalties.items()},
        "frozen": opt.frozen,
        "skipped": opt.skipped_steps,
    }


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def damage(sd: dict[str, Any]) -> None:
        node = sd
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return damage


def _delete(*path: Any) -> Callable[[dict[str, Any]], None]:
    def damage(sd: dict[str, Any]) -> None:
        node = sd
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return damage


def _drop_state_buffer(name: str) -> Callable[[dict[str, Any]], None]:
    def damage(sd: dict[str, Any]) -> None:
        del _first_state(sd)[name]

    return damage


def _flip(name: str) -> Callable[[dict[str, Any]], None]:
    def damage(sd: dict[str, Any]) -> None:
        _flip_bit(_first_state(sd)[name], 5)

    return damage


def _flip_frozen(sd: dict[str, Any]) -> None:
    sd["group_prox"]["frozen"][0] = ~sd["group_prox"]["frozen"][0]


def _other_kind(sd: dict[str, Any]) -> None:
    other = _trained("sgd" if "betas" in sd["param_groups"][0] else "adam")[1].state_dict()
    sd.clear()
    sd.update(other)


def _torch_of_other_kind(sd: dict[str, Any]) -> None:
    m = _model()
    adam = "betas" in sd["param_groups"][0]
    opt = (
        torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        if adam
        else torch.optim.AdamW(m.parameters())
    )
    m(torch.randn(2, 6)).sum().backward()
    opt.step()
    sd.clear()
    sd.update(opt.state_dict())


def _target_state(sd: dict[str, Any]) -> None:
    sd.clear()
    sd.update(_target()[1].state_dict())


# (id, optimizer kind, penalty, freeze, damage, exception, message regex)
OPTIMIZER_CASES = [
    ("adam-into-sgd", "sgd", "lasso", False, _other_kind, ValueError, r"no .*'momentum'.*ProxSGD"),
    ("sgd-into-adam", "adam", "lasso", False, _other_kind, ValueError, r"no .*'betas'.*ProxAdam"),
    ("torch-adamw-into-sgd", "sgd", "lasso", False, _torch_of_other_kind, ValueError, "ProxSGD"),
    ("torch-sgd-into-adam", "adam", "lasso", False, _torch_of_other_kind, ValueError, "ProxAdam"),
    ("target-state", "adam", "lasso", False, _target_state, ValueError, r"no 'state'"),
    (
        "recorded-kind",
        "adam",
        "lasso",
        False,
        _set(("group_prox", "optimizer"), "ProxSGD"),
        ValueError,
        r"saved by a 'ProxSGD'",
    ),
    (
        "newer-format",
        "adam",
        "lasso",
        False,
        _set(("group_prox", "format"), "group_prox.optimizer/9"),
        ValueError,
        r"format 'group_prox.optimizer/9'",
    ),
    (
        "no-param-groups",
        "adam",
        "lasso",
        False,
        _delete("param_groups"),
        ValueError,
        "param_groups",
    ),
    (
        "param-group-missing",
        "sgd",
        "lasso",
        False,
        lambda sd: sd["param_groups"].pop(),
        ValueError,
        r"0 param group",
    ),
    (
        "buffer-missing",
        "adam",
        "lasso",
        False,
        _drop_state_buffer("exp_avg_sq"),
        ValueError,
        r"has no 'exp_avg_sq'",
    ),
    (
        "foreign-buffer",
        "sgd",
        "lasso",
        False,
        lambda sd: _first_state(sd).update(exp_avg=torch.zeros(8, 6)),
        ValueError,
        r"holds 'exp_avg'",
    ),
    (
        "flip-momentum",
        "sgd",
        "lasso",
        False,
        _flip("momentum_buffer"),
        ValueError,
        r"'momentum_buffer' of parameter 0\.weight does not match the checksum",
    ),
    (
        "flip-exp-avg",
        "adam",
        "lasso",
        False,
        _flip("exp_avg"),
        ValueError,
        r"'exp_avg' of parameter 0\.weight does not match",
    ),
    ("flip-step", "adam", "lasso", False, _flip("step"), ValueError, r"'step' .* checksum"),
    ("flip-frozen", "sgd", "lasso", True, _flip_frozen, ValueError, r"frozen zero pattern"),
    (
        "checksums-removed",
        "adam",
        "lasso",
        False,
        _delete("group_prox", "checksums"),
        TypeError,
        r"checksums must be a dict",
    ),
    (
        "checksum-missing",
        "adam",
        "lasso",
        False,
        lambda sd: sd["group_prox"]["checksums"].popitem(),
        ValueError,
        r"edited or damaged",
    ),
    (
        "penalty-kind",
        "adam",
        "lasso",
        False,
        _set(("group_prox", "penalties", "unit", "kind"), "L1"),
        ValueError,
        r"'L1' penalty",
    ),
    (
        "penalty-weight",
        "adam",
        "lasso",
        False,
        _set(("group_prox", "penalties", "unit", "weight"), "size"),
        ValueError,
        r"weight='size'",
    ),
    (
        "penalty-groups",
        "adam",
        "lasso",
        False,
        _set(("group_prox", "penalties", "unit", "groups"), ["u0"]),
        ValueError,
        r"groups=\['u0'\]",
    ),
    (
        "penalty-lam",
        "adam",
        "lasso",
        False,
        _set(("group_prox", "penalties", "unit", "lam"), -1.0),
        ValueError,
        r"lam must be finite",
    ),
    (
        "l1-ratio",
        "sgd",
        "sgl",
        False,
        _set(("group_prox", "penalties", "unit", "l1_ratio"), 1.5),
        ValueError,
        r"l1_ratio",
    ),
    (
        "penalised-levels",
        "adam",
        "lasso",
        False,
        _delete("group_prox", "penalties", "block"),
        ValueError,
        r"penalises levels",
    ),
    (
        "hierarchy",
        "adam",
        "lasso",
        False,
        _set(("group_prox", "hierarchy", "groups"), [7, 1]),
        ValueError,
        r"another hierarchy",
    ),
    (
        "not-a-dict",
        "sgd",
        "lasso",
        False,
        lambda sd: sd.__setitem__("state", [1, 2]),
        TypeError,
        r"'state' must be a dict",
    ),
]


@pytest.mark.parametrize(
    ("kind", "pen", "freeze", "damage", "error", "match"),
    [case[1:] for case in OPTIMIZER_CASES],
    ids=[case[0] for case in OPTIMIZER_CASES],
)
def test_a_damaged_optimizer_checkpoint_is_refused_and_changes_nothing(
    kind, pen, freeze, damage, error, match
):
    _, opt = _trained(kind, pen, freeze)
    saved = copy.deepcopy(opt.state_dict())
    damage(saved)
    before = _snapshot(opt)
    with pytest.raises(error, match=match):
        opt.load_state_dict(saved)
    assert_identical(before, _snapshot(opt))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_good_checkpoints_load(kind):
    """Our own (through a file, weights_only), one written before formats were recorded, and
    torch's own optimizer of the same kind."""
    _, opt = _trained(kind, freeze=True)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    _, fresh = _trained(kind)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert fresh.frozen
    assert_identical(_snapshot(opt)["state"], _snapshot(fresh)["state"])

    legacy = copy.deepcopy(opt.state_dict())
    for key in ("format", "optimizer", "checksums"):
        del legacy["group_prox"][key]
    for pen in legacy["group_prox"]["penalties"].values():
        for key in ("kind", "weight", "groups"):
            del pen[key]
    _, old = _trained(kind)
    old.load_state_dict(legacy)
    assert old.frozen

    m = _model()
    plain = (
        torch.optim.AdamW(m.parameters(), lr=0.05)
        if kind == "adam"
        else torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    )
    m(torch.randn(2, 6)).sum().backward()
    plain.step()
    _, mine = _trained(kind)
    mine.load_state_dict(plain.state_dict())


def test_a_bit_flipped_in_a_saved_file_is_refused():
    _, opt = _trained("adam")
    sd = opt.state_dict()
    marker = _first_state(sd)["exp_avg"]
    buf = io.BytesIO()
    torch.save(sd, buf)
    raw = bytearray(buf.getvalue())
    needle = marker.reshape(-1).view(torch.uint8).numpy().tobytes()
    at = raw.find(needle)
    assert at >= 0
    raw[at + 3] ^= 0x10
    damaged = torch.load(io.BytesIO(bytes(raw)), weights_only=True)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter 0\.weight .* checksum"):
        opt.load_state_dict(damaged)
    assert_identical(before, _snapshot(opt))


def test_a_state_dict_changed_after_it_was_taken_says_so():
    m, opt = _trained("sgd")
    sd = opt.state_dict()  # live buffers, as torch's
    m(torch.randn(2, 6)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="changed after state_dict"):
        opt.load_state_dict(sd)


# ------------------------------------------------------------------------- SparsityTarget
def _target() -> tuple[Any, gp.SparsityTarget]:
    m = _model()
    opt = gp.ProxSGD(
        m.parameters(), lr=0.1, momentum=0.9, hierarchy=_hierarchy(m),
        penalties={"unit": gp.GroupLasso(0.0)},
    )  # fmt: skip
    target = gp.SparsityTarget(opt, {"unit": 0.5}, warmup_steps=1, reach_step=6)
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        opt.zero_grad()
        m(torch.randn(5, 6, generator=g)).square().mean().backward()
        opt.step()
        target.step()
    return opt, target


def _flip_target(key: str) -> Callable[[dict[str, Any]], None]:
    def damage(sd: dict[str, Any]) -> None:
        t = sd[key]["unit"]
        if t.dtype == torch.bool:
            t[0] = ~t[0]
        else:
            _flip_bit(t, 2)

    return damage


def _optimizer_state(sd: dict[str, Any]) -> None:
    sd.clear()
    sd.update(_trained("sgd")[1].state_dict())


TARGET_CASES = [
    ("optimizer-state", _optimizer_state, ValueError, r"not a SparsityTarget state"),
    (
        "flip-previous",
        _flip_target("previous"),
        ValueError,
        r"'previous/unit' does not match the checksum",
    ),
    (
        "flip-penalised",
        _flip_target("penalised"),
        ValueError,
        r"'penalised/unit' does not match the checksum",
    ),
    ("newer-format", _set(("format",), "group_prox.sparsity_target/7"), ValueError, r"format"),
    ("checksums-removed", _delete("checksums"), ValueError, r"no 'checksums'"),
    ("truncated", _delete("multiplier"), ValueError, r"no 'multiplier'"),
    ("other-settings", _set(("settings", "reach_step"), 99), ValueError, r"saved with"),
]


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [case[1:] for case in TARGET_CASES],
    ids=[case[0] for case in TARGET_CASES],
)
def test_a_damaged_target_state_is_refused_and_changes_nothing(damage, error, match):
    _, target = _target()
    saved = copy.deepcopy(target.state_dict())
    damage(saved)
    before = copy.deepcopy(target.state_dict())
    lam = target.optimizer.penalties["unit"].lam
    with pytest.raises(error, match=match):
        target.load_state_dict(saved)
    assert_identical(before, target.state_dict())
    assert target.optimizer.penalties["unit"].lam == lam


def test_a_target_state_loads_through_a_file():
    _, target = _target()
    buf = io.BytesIO()
    torch.save(target.state_dict(), buf)
    _, fresh = _target()
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert_identical(target.state_dict(), fresh.state_dict())
