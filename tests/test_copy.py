"""``copy.deepcopy`` and ``pickle`` of the optimizers and of ``SparsityTarget``: a copy taken
mid-run continues bit for bit as the original, refers to the copied parameters, and what cannot
be copied is refused at the call with a ``TypeError`` that says what to do instead."""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import group_prox as gp

from .identical import assert_identical

STOP_AT = 4  # the copy is taken here; training goes on to TOTAL
TOTAL = 10


def module_level_weight(size: int) -> float:
    """A callable group weight that pickle can pickle (by name)."""
    return math.sqrt(size) + 1.0


def _penalties(kind: str, optimizer: str) -> dict[str, gp.Penalty]:
    """Penalties of each kind, strong enough that groups become zero around the copy."""
    sgd = optimizer == "sgd"
    if kind == "lasso":
        return {
            "unit": gp.GroupLasso(0.2 if sgd else 0.05),
            "layer": gp.SparseGroupLasso(0.001 if sgd else 0.01, l1_ratio=0.3),
        }
    if kind == "l1_decay":
        return {"unit": gp.L1(0.01), "layer": gp.GroupDecay(0.05)}
    if kind == "l0_global":
        return {
            "unit": gp.GroupL0(0.1 if sgd else 0.02),
            "global": gp.GroupLasso(0.05 if sgd else 0.01),
        }
    if kind == "callable_weight":
        return {"unit": gp.GroupLasso(0.2, weight=module_level_weight)}
    if kind == "target":  # λ set by a SparsityTarget
        return {"unit": gp.GroupLasso(0.0), "layer": gp.GroupLasso(0.0)}
    raise AssertionError(kind)


def _build(
    optimizer: str, penalties: str, *, compiled: bool = False, frozen: bool = False
) -> dict[str, Any]:
    """A small MLP, its two-level hierarchy (hidden units, the first layer), an optimizer and,
    for ``penalties="target"``, a SparsityTarget whose freeze falls after the copy. ``frozen``:
    three units start at zero and the zero pattern is frozen at step 1, before the copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    a, b = model[0], model[2]
    if frozen:
        with torch.no_grad():
            a.weight[:3] = 0
            a.bias[:3] = 0
            b.weight[:, :3] = 0
    units = [[(a.weight, 0, i), (a.bias, 0, i), (b.weight, 1, i)] for i in range(8)]
    h = gp.Hierarchy({"unit": units, "layer": [[a.weight, a.bias, b.weight]]}, names=model)
    pens = _penalties(penalties, optimizer)
    if optimizer == "sgd":
        opt: gp.ProxSGD | gp.ProxAdam = gp.ProxSGD(
            model.parameters(), lr=0.2, momentum=0.9, hierarchy=h, penalties=pens,
            compiled=compiled,
        )  # fmt: skip
    else:
        opt = gp.ProxAdam(
            model.parameters(), lr=2e-2, hierarchy=h, penalties=pens,
            prox_metric="preconditioner",
        )  # fmt: skip
    run: dict[str, Any] = {"model": model, "opt": opt}
    if penalties == "target":
        run["target"] = gp.SparsityTarget(
            opt, {"unit": 0.5}, warmup_steps=1, reach_step=5, freeze_step=7
        )
    run["frozen"] = frozen
    return run


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _train(run: dict[str, Any], start: int, stop: int) -> None:
    model, opt, target = run["model"], run["opt"], run.get("target")
    for step in range(start, stop):
        x, y = _batch(step)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if target is not None:
            target.step()
        if run["frozen"] and step == 1:
            opt.freeze_zero_groups()


def _snapshot(run: dict[str, Any]) -> dict[str, Any]:
    """Everything a run holds, cloned (state_dict holds the live buffers)."""
    objs = {k: run[k] for k in ("model", "opt", "target") if k in run}
    return copy.deepcopy({k: obj.state_dict() for k, obj in objs.items()})


def _rebind(model: nn.Module, params: list[torch.Tensor]) -> None:
    """Make ``params`` (an optimizer copy's, in ``model.parameters()`` order) the model's."""
    named = list(model.named_parameters())
    assert len(named) == len(params)
    for (name, _), p in zip(named, params):
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = p  # type: ignore[index]


def _round_trip(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


def _copy_run(run: dict[str, Any], how: str) -> dict[str, Any]:
    """The run copied by ``how``: ``deepcopy`` or ``pickle`` of the optimizer (with its target)
    alone, whose parameters a copy of the model is then rebound to, or of model and optimizer
    together."""
    copier: Callable[[Any], Any] = copy.deepcopy if how.startswith("deepcopy") else _round_trip
    names = [k for k in ("model", "opt", "target") if k in run]
    if how.endswith("with_model"):
        copied = dict(zip(names, copier(tuple(run[k] for k in names))))
    else:
        copied = dict(zip(names[1:], copier(tuple(run[k] for k in names[1:]))))
        copied["model"] = copy.deepcopy(run["model"])
        _rebind(copied["model"], copied["opt"].param_groups[0]["params"])
    copied["frozen"] = run["frozen"]
    return copied


def _check_bound(run: dict[str, Any], original: dict[str, Any]) -> None:
    """Every tensor the copy's optimizer (and target) refers to is one of its model's, none of
    the original's; the plan and the target share the copy's objects."""
    opt, orig = run["opt"], original["opt"]
    own = {id(p) for p in run["model"].parameters()}
    theirs = {id(p) for p in original["model"].parameters()}
    plan = opt.prox.plan
    assert plan.hierarchy is opt.hierarchy and plan.tensors == opt.hierarchy.tensors
    refs = [lay.param for lay in opt.hierarchy.tensors]
    refs += [p for g in opt.param_groups for p in g["params"]] + list(opt.state)
    assert all(id(p) in own and id(p) not in theirs for p in refs)
    assert [pen for _, pen in plan.penalties] == [opt.penalties[lv] for lv, _ in plan.penalties]
    assert all(opt.penalties[lv] is not orig.penalties[lv] for lv in opt.penalties)
    assert type(opt.penalties) is type(orig.penalties)  # still read-only
    assert opt.frozen == orig.frozen
    target = run.get("target")
    if target is not None:
        assert target.optimizer is opt and target._plan is plan
        assert target is not original["target"]


CASES = [
    ("sgd", "lasso", False),
    ("sgd", "l1_decay", False),
    ("sgd", "l0_global", True),
    ("sgd", "callable_weight", False),
    ("sgd", "target", False),
    ("adam", "lasso", True),
    ("adam", "l0_global", False),
    ("adam", "target", False),
]
HOWS = ["deepcopy", "deepcopy_with_model", "pickle", "pickle_with_model"]


def _check_copy_continues(run: dict[str, Any], copied_run: dict[str, Any]) -> None:
    at_copy = _snapshot(run)
    assert_identical(_snapshot(copied_run), at_copy, "at the copy")
    _check_bound(copied_run, run)
    _train(copied_run, STOP_AT, TOTAL)
    assert_identical(_snapshot(run), at_copy, "the original after the copy trained")
    _train(run, STOP_AT, TOTAL)
    assert_identical(_snapshot(copied_run), _snapshot(run), "after training both")


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize(("optimizer", "penalties", "frozen"), CASES)
def test_a_copy_continues_bit_for_bit(optimizer, penalties, frozen, how):
    run = _build(optimizer, penalties, frozen=frozen)
    _train(run, 0, STOP_AT)
    assert run["opt"].frozen == frozen
    copied = _copy_run(run, how)
    _check_copy_continues(run, copied)
    if penalties == "target":  # the copies went through the freeze, with real zeros
        assert run["opt"].frozen and run["target"].phase == "frozen"
    if frozen or penalties != "l1_decay":  # the prox made groups zero (or held them there)
        assert bool((run["model"][0].weight == 0).all(dim=1).any())


@pytest.mark.parametrize("how", ["deepcopy_with_model", "pickle_with_model"])
def test_a_copy_of_a_compiled_prox_sgd_compiles_its_own_update(how):
    run = _build("sgd", "lasso", compiled=True)
    _train(run, 0, STOP_AT)
    assert run["opt"]._compiled_update._compiled  # the compiled path ran
    copied = _copy_run(run, how)
    assert not copied["opt"]._compiled_update._compiled
    _check_copy_continues(run, copied)
    assert copied["opt"]._compiled_update._compiled


def test_torch_load_state_dict_still_works_after_setstate():
    """torch's load_state_dict calls __setstate__ with its own keys only."""
    run = _build("adam", "lasso", frozen=True)
    _train(run, 0, STOP_AT)
    fresh = _build("adam", "lasso")
    fresh["opt"].load_state_dict(run["opt"].state_dict())
    fresh["model"].load_state_dict(run["model"].state_dict())
    fresh["frozen"] = True
    assert fresh["opt"].penalties is not run["opt"].penalties
    assert_identical(_snapshot(fresh), _snapshot(run))


def test_an_optimizer_without_hierarchy_is_copied():
    model = nn.Linear(3, 2)
    opt = gp.ProxSGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    for copier in (copy.deepcopy, _round_trip):
        model2, opt2 = copier((model, opt))
        assert opt2.hierarchy is None and dict(opt2.penalties) == {}
        model2(torch.randn(4, 3)).sum().backward()
        opt2.step()


def test_a_hierarchy_given_as_generators_is_copied():
    """Levels and groups may be any iterables; the hierarchy keeps them as lists, so that
    copies and with_level (the "global" penalty) still see every group."""
    model = nn.Linear(4, 5)
    h = gp.Hierarchy(
        {"unit": ((m for m in ((model.weight, 0, i), (model.bias, 0, i))) for i in range(5))},
        names=model,
    )
    opt = gp.ProxSGD(
        model.parameters(), lr=0.1, hierarchy=h,
        penalties={"unit": gp.GroupLasso(0.1), "global": gp.GroupLasso(0.1)},
    )  # fmt: skip
    assert opt.hierarchy.num_groups("unit") == 5
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.hierarchy.num_groups("unit") == 5
    assert [lay.param for lay in opt2.hierarchy.tensors] == [model2.weight, model2.bias]


# ------------------------------------------------------------------------------- refusals
def test_a_lambda_weight_is_deep_copied_but_refused_by_pickle():
    run = _build("sgd", "lasso")
    run["opt"].penalties["unit"].weight = lambda n: n**0.5
    _train(run, 0, STOP_AT)
    copied = _copy_run(run, "deepcopy_with_model")
    assert copied["opt"].penalties["unit"].weight is run["opt"].penalties["unit"].weight
    _check_copy_continues(run, copied)
    for obj in (run["opt"], (run["model"], run["opt"]), run["opt"].penalties["unit"]):
        with pytest.raises(TypeError, match=r"GroupLasso: its weight.*<lambda>.*state_dict\(\)"):
            pickle.dumps(obj)
    # copy.copy of the penalty keeps its weight as it is
    assert copy.copy(run["opt"].penalties["unit"]).weight is run["opt"].penalties["unit"].weight


def test_a_local_function_weight_is_refused_by_pickle_with_a_target():
    def local_weight(n: int) -> float:
        return float(n)

    run = _build("sgd", "target")
    run["opt"].penalties["unit"].weight = local_weight
    with pytest.raises(TypeError, match=r"local_weight.*cannot be pickled.*module level"):
        pickle.dumps((run["model"], run["opt"], run["target"]))


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)
def test_sharded_parameters_are_refused():
    """A one-rank gloo group in this process, DTensor parameters: deepcopy and pickle refuse the
    optimizer (and its plan) and point to torch.distributed.checkpoint."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        weight = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        h = gp.Hierarchy({"unit": [[(weight, 0, i)] for i in range(4)]}, names={"w": weight})
        opt = gp.ProxSGD([weight], lr=0.1, hierarchy=h, penalties={"unit": gp.GroupLasso(0.1)})
        for copier in (copy.deepcopy, _round_trip):
            with pytest.raises(TypeError, match=r"ProxSGD.*'w'.*sharded.*distributed\.checkpoint"):
                copier(opt)
        with pytest.raises(TypeError, match=r"ProxPlan.*sharded"):
            copy.deepcopy(opt.prox.plan)
    finally:
        dist.destroy_process_group()
