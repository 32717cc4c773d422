"""Adversarial compressed-model files: foreign, truncated, bit-flipped, edited plans, other models.

Every refusal is a ``ValueError`` raised before the model passed to :func:`group_prox.
load_compressed` is changed: the instance keeps its architecture and its weights.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock, ResNet

import group_prox as gp
from group_prox.compression.api import _plan_checksum
from tests.identical import assert_identical


def _architecture(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


@pytest.fixture(scope="module")
def saved() -> tuple[nn.Module, bytes]:
    model = _architecture().eval()
    with torch.no_grad():
        conv, bn = model.layer1[0].conv1, model.layer1[0].bn1
        conv.weight[:40] = 0
        bn.weight[:40] = 0
        bn.bias[:40] = 0
        for p in (model.layer3[0].bn2.weight, model.layer3[0].bn2.bias):
            p[:100] = 0
    small = gp.compress(model)
    buf = io.BytesIO()
    gp.save_compressed(small, buf)
    return small, buf.getvalue()


def _contents(raw: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(raw), weights_only=True)


def _save(data: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(data, buf)
    return buf.getvalue()


def _resealed(data: dict[str, Any]) -> bytes:
    """``data`` saved with checksums recomputed: what a plan edited by hand and re-saved with
    this package's checksums looks like, so that only the plan's own checks can refuse it."""
    data["checksums"]["plan"] = _plan_checksum(data["plan"])
    return _save(data)


def _edit(change: Callable[[dict[str, Any]], Any], *, reseal: bool = False) -> Callable:
    def damage(raw: bytes) -> bytes:
        data = _contents(raw)
        change(data)
        return _resealed(data) if reseal else _save(data)

    return damage


def _first_slice(data: dict[str, Any]) -> dict[str, Any]:
    return next(op for op in data["plan"]["ops"] if op["op"] == "slice")


def _set_slice(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        _first_slice(data)[key] = value

    return change


def _append_op(op: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return lambda data: data["plan"]["ops"].append(op)


def _flip_file_bit(raw: bytes) -> bytes:
    """Flip one bit inside the stored bytes of the fc weight."""
    weight = _contents(raw)["state_dict"]["fc.weight"]
    needle = weight.reshape(-1).view(torch.uint8).numpy().tobytes()[:64]
    at = raw.find(needle)
    assert at >= 0
    damaged = bytearray(raw)
    damaged[at + 9] ^= 0x04
    return bytes(damaged)


def _flip_tensor(data: dict[str, Any]) -> None:
    data["state_dict"]["layer1.0.bn1.running_var"].view(torch.uint8)[0] ^= 1


def _delete(*keys: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        for key in keys:
            target = data
            *path, last = key.split("/")
            for k in path:
                target = target[k]
            del target[last]

    return change


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        target = data
        *path, last = key.split("/")
        for k in path:
            target = target[k]
        target[last] = value

    return change


# (case, damage(raw bytes) -> bytes, error pattern)
FILES = [
    ("foreign-dict", lambda raw: _save({"x": torch.zeros(1)}), "not written by save_compressed"),
    ("foreign-list", lambda raw: _save([1, 2]), "not written by save_compressed"),
    ("other-version", _edit(_set("format", "group_prox.compressed/9")), r"reads .*compressed/2"),
    ("not-a-torch-file", lambda raw: b"\x00garbage" * 64, "cannot be read"),
    ("pickled-module", lambda raw: _save(nn.Linear(2, 2)), "cannot be read"),
    ("truncated-head", lambda raw: raw[:100], "cannot be read"),
    ("truncated-half", lambda raw: raw[: len(raw) // 2], "cannot be read"),
    ("truncated-tail", lambda raw: raw[:-30], "cannot be read"),
    ("bit-in-file", _flip_file_bit, r"'fc\.weight' does not match the checksum"),
    ("bit-in-tensor", _edit(_flip_tensor), r"'layer1\.0\.bn1\.running_var' does not match"),
    ("plan-edited", _edit(_set_slice("keep", [0, 1])), "plan does not match the checksum"),
    ("no-plan", _edit(_delete("plan")), "has no 'plan'"),
    ("no-state-dict", _edit(_delete("state_dict")), "has no 'state_dict'"),
    ("no-checksums", _edit(_delete("checksums")), "has no 'checksums'"),
    ("unknown-key", _edit(_set("extra", 1)), "unknown keys 'extra'"),
    ("checksums-odd", _edit(_set("checksums/plan", "1")), "checksums are not"),
    ("tensor-added", _edit(_set("state_dict/x", torch.zeros(2))), r"do not match \(\['x'\]\)"),
    ("tensor-removed", _edit(_delete("state_dict/fc.bias")), r"do not match \(\['fc\.bias'\]\)"),
    # Plans edited and re-saved with matching checksums: only exact types can refuse them.
    ("keep-str", _edit(_set_slice("keep", "0123"), reseal=True), r"'keep' must be a list of int"),
    ("keep-floats", _edit(_set_slice("keep", [0.0, 1.5]), reseal=True), "list of int indices"),
    ("keep-bools", _edit(_set_slice("keep", [False, True]), reseal=True), "list of int indices"),
    ("keep-unsorted", _edit(_set_slice("keep", [3, 1]), reseal=True), "increasing"),
    ("keep-negative", _edit(_set_slice("keep", [-1, 0]), reseal=True), "increasing indices >= 0"),
    ("module-int", _edit(_set_slice("module", 3), reseal=True), "'module' must be a str"),
    ("side-odd", _edit(_set_slice("side", "up"), reseal=True), "'side' must be 'out' or 'in'"),
    ("op-extra-key", _edit(_set_slice("stride", 2), reseal=True), "unknown keys 'stride'"),
    ("op-missing-key", _edit(lambda d: _first_slice(d).pop("keep"), reseal=True), "missing keys"),
    ("op-unknown", _edit(_append_op({"op": "drop"}), reseal=True), "unknown plan operation"),
    ("ops-not-list", _edit(_set("plan/ops", "slice"), reseal=True), "'ops' must be a list"),
    (
        "args-not-plain",
        _edit(
            _append_op({"op": "replace", "module": "fc", "kind": "x", "args": {"k": b"1"}}),
            reseal=True,
        ),
        "must be plain data",
    ),
    (
        "kind-unknown",
        _edit(_append_op({"op": "replace", "module": "fc", "kind": "nope"}), reseal=True),
        r"operation \d+ \(replace of 'fc' by kind 'nope'\).*unknown replacement kind",
    ),
    (
        "args-missing",
        _edit(
            _append_op({"op": "replace", "module": "layer2.0.conv1", "kind": "attention_heads"}),
            reseal=True,
        ),
        "its args have no key 'keep'",
    ),
    (
        "module-absent",
        _edit(
            _append_op({"op": "slice", "module": "layer9", "side": "in", "keep": [0]}), reseal=True
        ),
        "does not have",
    ),
    (
        "late-op-fails",  # the ops before it would have sliced the instance
        _edit(
            _append_op({"op": "slice", "module": "fc", "side": "in", "keep": [999]}), reseal=True
        ),
        r"operation \d+ \(slice of 'fc', side 'in'\).*\[0, 512\)",
    ),
]


def _instance_state(model: nn.Module) -> dict[str, Any]:
    return {"repr": repr(model), "state": copy.deepcopy(model.state_dict())}


@pytest.mark.parametrize(("case", "damage", "match"), FILES, ids=[c[0] for c in FILES])
def test_a_damaged_or_foreign_file_is_refused_and_the_instance_is_untouched(
    saved, case, damage, match
):
    _, raw = saved
    model = _architecture()
    before = _instance_state(model)
    with pytest.raises(ValueError, match=match):
        gp.load_compressed(model, io.BytesIO(damage(raw)))
    assert_identical(before, _instance_state(model), case)


@pytest.mark.parametrize(
    ("case", "build", "match"),
    [
        ("other-class-count", lambda: _architecture(7), r"fc\.weight: \(10, 512\) in the file"),
        ("other-depth", lambda: ResNet(BasicBlock, [2, 1, 1, 1]), r"missing \[.layer1\.1"),
        ("resnet18", lambda: resnet18(num_classes=10), "missing"),
        ("other-model", lambda: nn.Sequential(nn.Linear(2, 2)), "does not have"),
    ],
)
def test_a_file_for_another_architecture_leaves_the_instance_as_it_was(saved, case, build, match):
    _, raw = saved
    model = build()
    before = _instance_state(model)
    with pytest.raises(ValueError, match=match):
        gp.load_compressed(model, io.BytesIO(raw))
    assert_identical(before, _instance_state(model), case)


def _same_outputs(a: nn.Module, b: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_a_good_file_loads_into_an_instance_and_from_a_builder(saved):
    small, raw = saved
    for target in (_architecture(), _architecture):
        loaded = gp.load_compressed(target, io.BytesIO(raw))
        _same_outputs(small, loaded)
        assert loaded.group_prox_plan == small.group_prox_plan
        assert isinstance(loaded.layer1[0].conv1, nn.Conv2d)
        assert loaded.layer1[0].conv1.out_channels == 24


def test_files_of_the_first_format_without_checksums_still_load(saved):
    small, raw = saved
    data = _contents(raw)
    data["format"] = "group_prox.compressed/1"
    del data["checksums"]
    data["plan"]["format"] = "group_prox.compression_plan/1"
    _same_outputs(small, gp.load_compressed(_architecture, io.BytesIO(_save(data))))


def test_the_file_records_its_version_and_checksums(saved):
    _, raw = saved
    data = _contents(raw)
    assert data["format"] == "group_prox.compressed/2"
    assert set(data["checksums"]) == {"plan", "tensors"}
    assert set(data["checksums"]["tensors"]) == set(data["state_dict"])


def test_a_file_on_disk_is_named_in_the_message(saved, tmp_path):
    _, raw = saved
    path = tmp_path / "small.pt"
    path.write_bytes(raw[:200])
    with pytest.raises(ValueError, match=r"'.*small\.pt' cannot be read"):
        gp.load_compressed(_architecture, path)
    with pytest.raises(FileNotFoundError):
        gp.load_compressed(_architecture, tmp_path / "absent.pt")
