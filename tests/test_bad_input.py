"""Bad input at every public entry point: a clear TypeError (wrong type) or ValueError (wrong
value) that names the offending level, group, parameter or argument, raised before anything is
modified."""

from __future__ import annotations

import copy
import io
import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import group_prox as gp

from .strategies import random_trees, to_hierarchy

FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PENALTIES = (gp.GroupLasso, gp.SparseGroupLasso, gp.L1, gp.GroupDecay, gp.GroupL0)
OPTIMIZERS = {"sgd": gp.ProxSGD, "adam": gp.ProxAdam}

# Not a real number: each must be refused with a TypeError wherever a λ, lr or fraction goes.
NOT_REAL = st.sampled_from(
    [
        None,
        "0.1",
        b"1",
        [0.1],
        (0.1,),
        {"lam": 0.1},
        1j,
        True,
        False,
        np.bool_(True),
        object(),
        torch.ones(2),
        torch.tensor(True),
        torch.tensor(1 + 1j),
    ]
)
# A real number that is not a valid λ (or lr): negative, NaN or infinite, as a float, an int, a
# numpy scalar or a 0-dim tensor.
_BAD_FLOATS = st.one_of(
    st.floats(max_value=-1e-300, allow_nan=False),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
BAD_REAL = st.one_of(
    _BAD_FLOATS,
    st.integers(max_value=-1),
    _BAD_FLOATS.map(np.float64),
    _BAD_FLOATS.map(lambda x: torch.tensor(x, dtype=torch.float64)),
)
GOOD_LAM = st.floats(0.0, 10.0)
NAMES = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8)


# ------------------------------------------------------------------------------------ helpers
def _is_real(value: Any) -> bool:
    """Whether ``value`` is a real number, or a 0-dim real tensor (BAD_REAL, not NOT_REAL)."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and value.dtype not in (
            torch.bool,
            torch.complex64,
            torch.complex128,
        )
    return isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _hierarchy(model: nn.Sequential) -> gp.Hierarchy:
    lin = model[0]
    rows = {f"row{i}": [(lin.weight, 0, i), (lin.bias, 0, i)] for i in range(6)}
    return gp.Hierarchy({"row": rows, "layer": {"first": [lin.weight, lin.bias]}}, names=model)


def _penalties() -> dict[str, gp.Penalty]:
    return {"row": gp.SparseGroupLasso(0.05, 0.3), "layer": gp.GroupLasso(0.02)}


def _optimizer(kind: str, model: nn.Sequential | None = None, **kw: Any):
    model = _model() if model is None else model
    h = _hierarchy(model)
    # Two param groups with one lr, so that messages must name the right one.
    groups = [
        {"params": list(model[0].parameters())},
        {"params": list(model[2].parameters())},
    ]
    extra = {"momentum": 0.9} if kind == "sgd" else {}
    opt = OPTIMIZERS[kind](
        groups, lr=0.05, hierarchy=h, penalties=kw.pop("penalties", _penalties()), **extra, **kw
    )
    return model, opt


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(8, 4, generator=g)
        model(x).square().mean().backward()
        opt.step()


def _grads(model: nn.Module) -> None:
    """Fresh gradients, so that a step that ran would change the parameters."""
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)


def _same(a: Any, b: Any) -> bool:
    """Equal bit for bit (tensors, NaN floats included), recursively."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        return torch.equal(*(t.detach().reshape(-1).contiguous().view(torch.uint8) for t in (a, b)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if type(a) is object:  # a deep copy of a bare object() is another one
        return type(b) is object
    return a == b


class Snapshot:
    """Parameters, optimizer state dict and penalties' λ (raw, even if forced past the setter),
    to compare bit for bit after a refused call."""

    def __init__(self, model: nn.Module, opt: Any = None, penalties: Any = None) -> None:
        self.model, self.opt = model, opt
        if penalties is None:
            penalties = {} if opt is None else opt.penalties
        self.penalties = {lv: p for lv, p in penalties.items() if isinstance(p, gp.Penalty)}
        self.taken = self._take()

    def _take(self) -> tuple:
        return (
            [p.detach().clone() for p in self.model.parameters()],
            None if self.opt is None else copy.deepcopy(self.opt.state_dict()),
            {lv: (pen._lam, getattr(pen, "_l1_ratio", None)) for lv, pen in self.penalties.items()},
        )

    def unchanged(self) -> bool:
        return _same(self.taken, self._take())


# ---------------------------------------------------------------------------------- Hierarchy
@FEW
@given(levels=st.sampled_from([None, [], [[]], "row", 3, torch.ones(2), (("a", []),)]))
def test_hierarchy_levels_of_the_wrong_type(levels):
    with pytest.raises(TypeError, match="levels must be an ordered mapping"):
        gp.Hierarchy(levels)


@SOME
@given(
    level=NAMES,
    spec=st.sampled_from(["level", 3, None, torch.ones(3), 2.5]),
)
def test_hierarchy_level_spec_of_the_wrong_type_names_the_level(level, spec):
    with pytest.raises(TypeError, match=f"level {level!r}: expected a list of groups"):
        gp.Hierarchy({level: spec})


@SOME
@given(
    group=NAMES,
    bad_group=st.sampled_from(["w", 3, None, nn.Parameter(torch.ones(2)), 1.5]),
    bad_member=st.sampled_from(["w", 3, None, 1.5, [nn.Parameter(torch.ones(2))], (1, 0, 0)]),
)
def test_hierarchy_group_and_member_of_the_wrong_type_name_them(group, bad_group, bad_member):
    w = nn.Parameter(torch.ones(3, 2))
    with pytest.raises(
        TypeError, match=rf"level 'lv', group {group!r}: a group must be a list of members"
    ):
        gp.Hierarchy({"lv": {group: bad_group}})
    with pytest.raises(TypeError, match=rf"level 'lv', group {group!r}, member 1: "):
        gp.Hierarchy({"lv": {group: [(w, 0, 0), bad_member]}})


@SOME
@given(
    make=st.sampled_from(
        [
            ("empty", lambda: nn.Parameter(torch.empty(0, 3)), "has no elements"),
            ("int", lambda: torch.zeros(3, dtype=torch.long), "floating point"),
            ("bool", lambda: torch.zeros(3, dtype=torch.bool), "floating point"),
            ("view", lambda: nn.Parameter(torch.ones(3, 2))[0], "is a view or a computed"),
            ("computed", lambda: nn.Parameter(torch.ones(3)) * 2, "is a view or a computed"),
            ("transposed", lambda: nn.Parameter(torch.ones(3, 2)).t(), "is a view or a computed"),
        ]
    ),
    group=NAMES,
)
def test_hierarchy_refuses_tensors_that_are_not_parameters(make, group):
    _, tensor, match = make
    with pytest.raises(ValueError, match=rf"level 'a', group {group!r}, member 0: .*{match}"):
        gp.Hierarchy({"a": {group: [tensor()]}})


@SOME
@given(
    rows=st.integers(2, 6),
    data=st.data(),
)
def test_hierarchy_dims_and_indices_out_of_range(rows, data):
    w = nn.Parameter(torch.ones(rows, 3))
    member, err, match = data.draw(
        st.sampled_from(
            [
                ((w, 2, 0), ValueError, "dim 2 is out of range"),
                ((w, -3, 0), ValueError, "dim -3 is out of range"),
                ((w, 0, rows), ValueError, f"index {rows} is out of range"),
                ((w, 0, -rows - 1), ValueError, "is out of range"),
                ((w, 0, slice(rows, rows + 2)), ValueError, "selects nothing"),
                ((w, 0, 0.5), TypeError, "index must be an int or a slice"),
                ((w, 0, True), TypeError, "index must be an int or a slice"),
                ((w, 0.0, 0), TypeError, "dim must be an int"),
                ((w, True, 0), TypeError, "dim must be an int"),
                ((w, (0, 1), 0), TypeError, "index must be a tuple of as many"),
                ((w, (0, 0), (0, 1)), ValueError, "dim 0 is given twice"),
            ]
        )
    )
    with pytest.raises(err, match=rf"level 'a', group 'g', member 0: .*{match}"):
        gp.Hierarchy({"a": {"g": [member]}})


def test_hierarchy_accepts_numpy_integers_as_dims_and_indices():
    w = nn.Parameter(torch.ones(4, 3))
    h = gp.Hierarchy({"a": [[(w, np.int64(0), np.int32(i))] for i in range(4)]})
    assert h.group_sizes("a") == [3] * 4


@SOME
@given(sizes=st.lists(st.integers(1, 3), min_size=2, max_size=4), data=st.data())
def test_hierarchy_levels_that_are_not_a_tree(sizes, data):
    """A coarse group that cuts across the groups of a finer level, and levels listed coarsest
    first, are refused with both groups and levels named."""
    n = sum(sizes)
    w = nn.Parameter(torch.randn(n, 2))
    bounds = [int(b) for b in np.cumsum([0, *sizes])]
    fine = {f"f{k}": [(w, 0, slice(a, b))] for k, (a, b) in enumerate(itertools.pairwise(bounds))}
    # A cut inside some fine group (not on one of its boundaries).
    inner = [c for c in range(1, n) if c not in bounds]
    if inner:
        cut = data.draw(st.sampled_from(inner))
        coarse = {"left": [(w, 0, slice(0, cut))], "right": [(w, 0, slice(cut, n))]}
        owner = next(f"f{k}" for k in range(len(sizes)) if bounds[k] < cut < bounds[k + 1])
        with pytest.raises(
            ValueError,
            match=rf"group {owner!r} of level 'fine' overlaps 'left', 'right' of level 'coarse' "
            "without being contained",
        ):
            gp.Hierarchy({"fine": fine, "coarse": coarse})
    # Coarsest first: the whole weight listed before its rows.
    with pytest.raises(
        ValueError,
        match=r"groups 'f0', 'f1'.* of level 'rows' lie inside group 'all' of the finer level "
        r"'whole'.*List the levels finest first",
    ):
        gp.Hierarchy({"whole": {"all": [w]}, "rows": fine})


@SOME
@given(
    names=st.lists(NAMES, min_size=2, max_size=4, unique=True),
    data=st.data(),
)
def test_hierarchy_overlapping_groups_of_one_level_are_named(names, data):
    w = nn.Parameter(torch.randn(len(names), 3))
    groups = {name: [(w, 0, i)] for i, name in enumerate(names)}
    i, j = data.draw(st.lists(st.integers(0, len(names) - 1), min_size=2, max_size=2, unique=True))
    groups[names[j]] = [*groups[names[j]], (w, 0, i)]
    first, second = sorted((i, j))
    with pytest.raises(
        ValueError,
        match=rf"level 'a': groups {names[first]!r} and {names[second]!r} overlap",
    ):
        gp.Hierarchy({"a": groups})


@FEW
@given(names=st.sampled_from([[], "model", 3, (1, 2)]))
def test_hierarchy_names_of_the_wrong_type(names):
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match=r"names must be an nn\.Module, a mapping"):
        gp.Hierarchy({"a": [[w]]}, names=names)


@SOME
@given(tree=random_trees(max_tensors=3, max_levels=3))
def test_hierarchy_with_levels_in_the_wrong_order(tree):
    """Reversing a valid tree's levels gives a valid tree only if no group strictly contains a
    group of another level; otherwise the message says to list the levels finest first."""
    params = [nn.Parameter(torch.randn(s)) for s in tree.shapes]
    to_hierarchy(tree, params)  # the forward order is accepted
    reversed_levels = {
        f"level{k}": [
            [params[t] if d is None else (params[t], d, i) for t, d, i in g] for g in groups
        ]
        for k, groups in reversed(list(enumerate(tree.levels)))
    }
    try:
        gp.Hierarchy(reversed_levels)
    except ValueError as e:
        assert "List the levels finest first" in str(e)
        assert "of the finer level 'level" in str(e)


# ------------------------------------------------------------------------------------ builders
BUILDERS = {
    "resnet": gp.hierarchy.resnet,
    "transformer": gp.hierarchy.transformer,
    "moe": gp.hierarchy.moe,
    "from_module_tags": gp.hierarchy.from_module_tags,
}


@SOME
@given(
    name=st.sampled_from(sorted(BUILDERS)),
    bad=st.sampled_from([None, "resnet18", 3, [nn.Linear(2, 2)], nn.Linear(2, 2).weight]),
)
def test_builders_refuse_what_is_not_a_module(name, bad):
    with pytest.raises(TypeError, match=rf"{name}\(\): expected an nn.Module, got"):
        BUILDERS[name](bad)


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("model", [nn.Sequential(), nn.Linear(3, 2)], ids=["empty", "linear"])
def test_builders_on_models_they_do_not_recognise(name, model):
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"{name}\(\): .*Hierarchy\(\.\.\.\)"):
        BUILDERS[name](model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_moe_down_must_be_a_name():
    with pytest.raises(TypeError, match="down must be the name"):
        gp.hierarchy.moe(nn.Linear(2, 2), down=1)


def test_auto_wrong_types_and_unknown_ignored_layers():
    pytest.importorskip("torch_pruning")
    model = _model()
    x = torch.randn(1, 4)
    with pytest.raises(TypeError, match=r"auto\(\): expected an nn.Module"):
        gp.hierarchy.auto("model", x)
    with pytest.raises(TypeError, match="ignored_layers must be a list"):
        gp.hierarchy.auto(model, x, ignored_layers=3)
    with pytest.raises(TypeError, match="ignored_layers holds modules or module names, got int"):
        gp.hierarchy.auto(model, x, ignored_layers=[3])
    with pytest.raises(ValueError, match="ignored_layers names 'nope'"):
        gp.hierarchy.auto(model, x, ignored_layers=["nope"])
    # One name alone is one layer, not a list of one-letter names.
    alone, listed = (
        gp.hierarchy.auto(model, x, ignored_layers=ig).signature() for ig in ("0", ["0"])
    )
    assert alone == listed


# ----------------------------------------------------------------------------------- penalties
@SOME
@given(
    cls=st.sampled_from(PENALTIES),
    case=st.one_of(
        NOT_REAL.map(lambda bad: (bad, TypeError, "lam must be a real number")),
        BAD_REAL.map(lambda bad: (bad, ValueError, "lam must be finite and >= 0")),
    ),
)
def test_penalty_lam_of_the_wrong_type_or_value(cls, case):
    """A wrong type is a TypeError, a negative, NaN or infinite number a ValueError; the setter
    keeps the old value."""
    bad, error, words = case
    with pytest.raises(error, match=rf"{cls.__name__}: {words}"):
        cls(bad)
    pen = cls(0.5)
    with pytest.raises(error, match=words):
        pen.lam = bad
    assert pen.lam == 0.5


@SOME
@given(
    cls=st.sampled_from(PENALTIES),
    lam=GOOD_LAM,
    wrap=st.sampled_from(
        [
            float,
            np.float32,
            np.float64,
            lambda x: torch.tensor(x),
            lambda x: torch.tensor(x, dtype=torch.float64),
            lambda x: torch.tensor(x, requires_grad=True),
        ]
    ),
)
def test_penalty_lam_as_numpy_scalar_or_0dim_tensor(cls, lam, wrap):
    value = wrap(lam)
    pen = cls(value)
    assert type(pen.lam) is float
    assert pen.lam == pytest.approx(lam, rel=1e-6, abs=1e-30)
    pen.lam = wrap(lam / 2)
    assert type(pen.lam) is float


@SOME
@given(
    bad=st.one_of(NOT_REAL, st.floats().filter(lambda x: not 0 <= x <= 1)),
)
def test_sparse_group_lasso_l1_ratio(bad):
    err = ValueError if isinstance(bad, float) else TypeError
    with pytest.raises(err, match="SparseGroupLasso: l1_ratio must"):
        gp.SparseGroupLasso(0.1, bad)
    pen = gp.SparseGroupLasso(0.1, 0.25)
    with pytest.raises(err, match="l1_ratio must"):
        pen.l1_ratio = bad
    assert pen.l1_ratio == 0.25


@SOME
@given(
    cls=st.sampled_from([gp.GroupLasso, gp.SparseGroupLasso, gp.GroupL0]),
    bad=st.sampled_from(
        [
            ("sqrt", TypeError, "weight must be"),
            (None, TypeError, "weight must be"),
            (True, TypeError, "weight must be"),
            (np.array([1.0, 2.0]), TypeError, "weight must be"),
            (torch.ones(2), TypeError, "weight must be"),
            (-1.0, ValueError, "a numeric weight must be finite"),
            (math.nan, ValueError, "a numeric weight must be finite"),
            (math.inf, ValueError, "a numeric weight must be finite"),
        ]
    ),
)
def test_penalty_weight(cls, bad):
    weight, err, match = bad
    with pytest.raises(err, match=rf"{cls.__name__}: {match}"):
        cls(0.1, weight=weight)


@SOME
@given(
    cls=st.sampled_from(PENALTIES),
    bad=st.sampled_from(["row0", 3, [1, 2], ["a", None], object()]),
)
def test_penalty_groups(cls, bad):
    with pytest.raises(TypeError, match=rf"{cls.__name__}: groups must"):
        cls(0.1, groups=bad)


@SOME
@given(
    state=st.sampled_from(
        [
            ("garbage", TypeError, "expected a mapping"),
            ({}, ValueError, "has no 'lam'"),
            ({"lam": -1.0}, ValueError, "lam must be finite"),
            ({"lam": "1"}, TypeError, "lam must be a real number"),
            ({"lam": 0.2, "l1_ratio": 2.0}, ValueError, r"l1_ratio must be in \[0, 1\]"),
            ({"lam": 0.2, "l1_ratio": None}, TypeError, "l1_ratio must be a real number"),
        ]
    )
)
def test_penalty_load_state_dict_is_all_or_nothing(state):
    bad, err, match = state
    pen = gp.SparseGroupLasso(0.5, 0.25)
    with pytest.raises(err, match=match):
        pen.load_state_dict(bad)
    assert (pen.lam, pen.l1_ratio) == (0.5, 0.25)


# ------------------------------------------------------------------ optimizer construction
def _bad_construction(model: nn.Sequential) -> list[tuple[str, dict, type, str]]:
    h = _hierarchy(model)
    other = _hierarchy(_model(1))
    w = model[0].weight
    return [
        (
            "hierarchy str",
            dict(hierarchy="resnet"),
            TypeError,
            "hierarchy must be a group_prox.Hierarchy",
        ),
        (
            "hierarchy model",
            dict(hierarchy=model),
            TypeError,
            "hierarchy must be a group_prox.Hierarchy",
        ),
        (
            "penalties list",
            dict(hierarchy=h, penalties=[("row", gp.L1(0.1))]),
            TypeError,
            "penalties must be a mapping",
        ),
        (
            "penalties list, no hierarchy",
            dict(penalties=[gp.L1(0.1)]),
            TypeError,
            "penalties must be a mapping",
        ),
        (
            "penalty float",
            dict(hierarchy=h, penalties={"row": 0.1}),
            TypeError,
            "penalty for level 'row' must be a group_prox penalty",
        ),
        (
            "penalty class",
            dict(hierarchy=h, penalties={"row": gp.L1}),
            TypeError,
            "penalty for level 'row' must be a group_prox penalty",
        ),
        (
            "no hierarchy",
            dict(penalties={"row": gp.L1(0.1)}),
            ValueError,
            r"penalties were given for levels \['row'\] without a hierarchy",
        ),
        (
            "unknown group",
            dict(hierarchy=h, penalties={"row": gp.L1(0.1, groups=["row1", "row6"])}),
            ValueError,
            "level 'row' names groups it does not have: 'row6'",
        ),
        (
            "other model",
            dict(hierarchy=other),
            ValueError,
            r"not among the optimizer's parameters: 0\.weight, 0\.bias",
        ),
        (
            "global on an empty hierarchy",
            dict(hierarchy=gp.Hierarchy({}), penalties={"global": gp.L1(0.1)}),
            ValueError,
            r"penalties\['global'\] acts on one group holding every parameter of the "
            "hierarchy, but the hierarchy holds none",
        ),
        (
            "bad weights",
            dict(hierarchy=h, penalties={"layer": gp.GroupLasso(0.1, weight=lambda n: -1.0)}),
            ValueError,
            "weights of the penalty for level 'layer' cannot be computed",
        ),
        (
            "a part of the model",
            dict(hierarchy=gp.Hierarchy({"a": [[(w, 0, 0)]]}), penalties={"b": gp.L1(0.1)}),
            ValueError,
            r"penalties names level 'b', which the hierarchy does not have; its levels are \['a'\]",
        ),
    ]


@SOME
@given(kind=st.sampled_from(sorted(OPTIMIZERS)), lr=st.floats(1e-4, 1.0), data=st.data())
def test_optimizer_construction_errors_name_what_to_change(kind, lr, data):
    model = _model()
    name, kwargs, err, match = data.draw(st.sampled_from(_bad_construction(model)))
    pens = kwargs.get("penalties")
    snap = Snapshot(model, penalties=pens if isinstance(pens, dict) else {})
    with pytest.raises(err, match=match):
        OPTIMIZERS[kind](model.parameters(), lr=lr, **kwargs)
    assert snap.unchanged(), name


@SOME
@given(
    kind=st.sampled_from(sorted(OPTIMIZERS)),
    level=NAMES.filter(lambda s: s not in ("row", "layer", "global")),
)
def test_optimizer_unknown_level_in_penalties(kind, level):
    model = _model()
    with pytest.raises(
        ValueError,
        match=rf"penalties names level {level!r}, which the hierarchy does not have; its levels are \['row', 'layer'\]",
    ):
        OPTIMIZERS[kind](
            model.parameters(), hierarchy=_hierarchy(model), penalties={level: gp.L1(0.1)}
        )


@SOME
@given(kind=st.sampled_from(sorted(OPTIMIZERS)), lr=st.sampled_from([math.nan, math.inf]))
def test_optimizer_construction_refuses_nan_or_infinite_lr(kind, lr):
    model = _model()
    for kw in ({}, dict(hierarchy=_hierarchy(model), penalties=_penalties())):
        # torch itself refuses some of these first, with its own message.
        with pytest.raises(ValueError, match=r"param group 0 has lr=|Invalid learning rate"):
            OPTIMIZERS[kind](model.parameters(), lr=lr, **kw)


@FEW
@given(metric=st.sampled_from(["newton", "LR", "", None, 1, ["lr"]]))
def test_prox_adam_metric(metric):
    error = ValueError if isinstance(metric, str) else TypeError
    with pytest.raises(error, match="prox_metric must be one of"):
        gp.ProxAdam(_model().parameters(), prox_metric=metric)


def test_global_penalty_on_a_hierarchy_with_a_global_level_is_that_level():
    model = _model()
    h = _hierarchy(model).with_level("global", [[model[0].weight, model[0].bias]])
    opt = gp.ProxSGD(model.parameters(), lr=0.1, hierarchy=h, penalties={"global": gp.L1(0.1)})
    assert opt.hierarchy is h


def test_parameters_without_grad_in_the_hierarchy_are_accepted_and_shrunk():
    """As documented: a tensor in the optimizer and in a penalised group is shrunk even if it
    requires no grad (leave it out of the hierarchy to freeze it)."""
    model = _model()
    model[0].requires_grad_(False)
    opt = gp.ProxSGD(
        model.parameters(),
        lr=1.0,
        hierarchy=_hierarchy(model),
        penalties={"layer": gp.GroupLasso(100.0)},
    )
    opt.step()
    assert not model[0].weight.any() and not model[0].bias.any()


def test_zero_size_tensor_outside_the_hierarchy_is_left_to_torch():
    model = _model()
    empty = nn.Parameter(torch.empty(0, 3))
    opt = gp.ProxSGD(
        [*model.parameters(), empty], lr=0.1, hierarchy=_hierarchy(model), penalties=_penalties()
    )
    _train(model, opt)
    with pytest.raises(ValueError, match="has no elements"):
        gp.Hierarchy({"a": [[empty]]})


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_empty_hierarchy_steps_as_torch_but_cannot_be_targeted(kind):
    model = _model()
    ref = copy.deepcopy(model)
    h = gp.Hierarchy({"a": []})
    opt = OPTIMIZERS[kind](model.parameters(), lr=0.1, hierarchy=h, penalties={"a": gp.L1(1.0)})
    ref_opt = (torch.optim.SGD if kind == "sgd" else torch.optim.AdamW)(
        ref.parameters(), lr=0.1, fused=True
    )
    _train(model, opt)
    _train(ref, ref_opt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    with pytest.raises(ValueError, match="the optimizer's hierarchy holds no parameter"):
        gp.SparsityTarget(opt, {"a": 0.5}, reach_step=5)


def test_empty_hierarchy_with_the_preconditioner_metric_steps_as_adamw():
    model = _model()
    ref = copy.deepcopy(model)
    opt = gp.ProxAdam(
        model.parameters(), lr=0.1, hierarchy=gp.Hierarchy({"a": []}),
        penalties={"a": gp.GroupLasso(1.0)}, prox_metric="preconditioner",
    )  # fmt: skip
    _train(model, opt)
    _train(ref, torch.optim.AdamW(ref.parameters(), lr=0.1, fused=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_empty_model():
    with pytest.raises(ValueError, match="empty parameter list"):
        gp.ProxSGD(nn.Sequential().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"resnet\(\): the model holds none of"):
        gp.hierarchy.resnet(nn.Sequential())
    report = gp.get_sparsity_report(nn.Sequential(), gp.Hierarchy({}))
    assert report.total_params == 0 and report.zero_fraction == 0.0


# --------------------------------------------------------------------------------------- step
@SOME
@given(
    kind=st.sampled_from(sorted(OPTIMIZERS)),
    group=st.integers(0, 1),
    bad=st.one_of(BAD_REAL, NOT_REAL),
)
def test_step_refuses_a_bad_lr_and_changes_nothing(kind, group, bad):
    model, opt = _optimizer(kind)
    _train(model, opt)
    _grads(model)
    opt.param_groups[group]["lr"] = bad
    snap = Snapshot(model, opt)
    err = ValueError if _is_real(bad) else TypeError
    with pytest.raises(
        err, match=rf"param group {group} has .*set optimizer.param_groups\[{group}\]\['lr'\]"
    ):
        opt.step()
    assert snap.unchanged()
    opt.param_groups[group]["lr"] = 0.05
    opt.step()
    assert not snap.unchanged()


@SOME
@given(kind=st.sampled_from(sorted(OPTIMIZERS)), lr=st.floats(0.0, 1.0), data=st.data())
def test_scheduler_splitting_a_tree_is_refused_before_the_step(kind, lr, data):
    model = _model()
    lin = model[0]
    h = _hierarchy(model)
    opt = OPTIMIZERS[kind](
        [{"params": [lin.weight]}, {"params": [lin.bias]}, {"params": list(model[2].parameters())}],
        lr=0.05,
        hierarchy=h,
        penalties={"layer": gp.GroupLasso(0.1)},
    )
    other = data.draw(st.floats(0.0, 1.0).filter(lambda x: x != lr))
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr, other
    _grads(model)
    snap = Snapshot(model, opt)
    with pytest.raises(
        ValueError, match=r"spans param groups \[0, 1\] whose learning rates differ"
    ):
        opt.step()
    assert snap.unchanged()


@SOME
@given(
    kind=st.sampled_from(sorted(OPTIMIZERS)),
    level=st.sampled_from(["row", "layer"]),
    bad=st.one_of(BAD_REAL, NOT_REAL),
)
def test_step_refuses_a_lam_forced_past_its_setter(kind, level, bad):
    model, opt = _optimizer(kind)
    _train(model, opt)
    _grads(model)
    opt.penalties[level]._lam = bad  # what the setter would have refused
    snap = Snapshot(model, opt)
    with pytest.raises(
        ValueError if _is_real(bad) else TypeError,
        match=rf"the penalty of level {level!r} holds an invalid value .*lam",
    ):
        opt.step()
    assert snap.unchanged()


@FEW
@given(kind=st.sampled_from(sorted(OPTIMIZERS)), bad=st.sampled_from([-0.5, 1.5, math.nan, "0.5"]))
def test_step_refuses_an_l1_ratio_forced_past_its_setter(kind, bad):
    model, opt = _optimizer(kind)
    _grads(model)
    opt.penalties["row"]._l1_ratio = bad
    snap = Snapshot(model, opt)
    with pytest.raises(
        ValueError if _is_real(bad) else TypeError,
        match=r"level 'row' holds an invalid value .*l1_ratio",
    ):
        opt.step()
    assert snap.unchanged()


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_step_refuses_a_parameter_resized_after_construction(kind):
    model, opt = _optimizer(kind)
    _train(model, opt)
    with torch.no_grad():
        model[0].bias.data = torch.zeros(7)
    model[0].bias.grad = None
    snap = Snapshot(model, opt)
    with pytest.raises(
        ValueError, match=r"parameter 0\.bias of the hierarchy was resized from \(6,\) to \(7,\)"
    ):
        opt.step()
    assert snap.unchanged()


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_lam_as_tensor_from_a_scheduler_trains(kind):
    model, opt = _optimizer(kind)
    opt.penalties["layer"].lam = torch.tensor(0.03)
    _train(model, opt)
    assert opt.penalties["layer"].lam == pytest.approx(0.03)
    assert isinstance(opt.state_dict()["group_prox"]["penalties"]["layer"]["lam"], float)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_without_hierarchy(kind):
    model = _model()
    opt = OPTIMIZERS[kind](model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no hierarchy"):
        opt.freeze_zero_groups()
    with pytest.raises(ValueError, match="without a hierarchy: nothing to report"):
        opt.get_sparsity_report()
    with pytest.raises(ValueError, match="the optimizer has no hierarchy= to target"):
        gp.SparsityTarget(opt, {"row": 0.5}, reach_step=5)
    _grads(model)
    opt.param_groups[0]["lr"] = math.nan
    snap = Snapshot(model, opt)
    with pytest.raises(ValueError, match="param group 0 has lr=nan"):
        opt.step()
    assert snap.unchanged()


# ---------------------------------------------------------------------------- load_state_dict
def _corruptions(kind: str) -> list[tuple[str, Callable[[dict], Any], type, str]]:
    def set_in(path: tuple, value: Any) -> Callable[[dict], dict]:
        def go(sd: dict) -> dict:
            node = sd
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            return sd

        return go

    def drop(path: tuple) -> Callable[[dict], dict]:
        def go(sd: dict) -> dict:
            node = sd
            for key in path[:-1]:
                node = node[key]
            del node[path[-1]]
            return sd

        return go

    def reshape_state(sd: dict) -> dict:
        entry = sd["state"][0]
        key = "momentum_buffer" if kind == "sgd" else "exp_avg"
        entry[key] = torch.zeros(5, 4)
        return sd

    def other_hierarchy(sd: dict) -> dict:
        sd["group_prox"]["hierarchy"] = _hierarchy(_model()).with_level("x", []).signature()
        return sd

    cases = [
        (
            "not a dict",
            lambda sd: "checkpoint.pt",
            TypeError,
            "expected the dict returned by optimizer.state_dict",
        ),
        ("a list", lambda sd: list(sd.items()), TypeError, "expected the dict"),
        ("no state", drop(("state",)), ValueError, "the state dict has no 'state'"),
        ("no param_groups", drop(("param_groups",)), ValueError, "has no 'param_groups'"),
        ("state not a dict", set_in(("state",), [1, 2]), TypeError, "'state' must be a dict"),
        (
            "groups not a list",
            set_in(("param_groups",), "groups"),
            TypeError,
            "'param_groups' must be a list",
        ),
        (
            "one group too few",
            lambda sd: {**sd, "param_groups": sd["param_groups"][:1]},
            ValueError,
            r"has 1 param group\(s\), this optimizer 2",
        ),
        (
            "a param too many",
            lambda sd: (sd["param_groups"][1]["params"].append(99), sd)[1],
            ValueError,
            "param group 1 of the checkpoint holds 3 parameters, this optimizer's 2",
        ),
        (
            "no lr",
            drop(("param_groups", 1, "lr")),
            ValueError,
            "param group 1 of the checkpoint has no 'lr'",
        ),
        (
            "nan lr",
            set_in(("param_groups", 0, "lr"), math.nan),
            ValueError,
            "the checkpoint's param group 0 has lr=nan",
        ),
        (
            "negative lr",
            set_in(("param_groups", 1, "lr"), -0.1),
            ValueError,
            "the checkpoint's param group 1 has lr=-0.1",
        ),
        (
            "str lr",
            set_in(("param_groups", 1, "lr"), "0.1"),
            TypeError,
            "the checkpoint's param group 1 has lr='0.1'",
        ),
        (
            "state of another shape",
            reshape_state,
            ValueError,
            r"of parameter 0\.weight has shape \(5, 4\), the parameter \(6, 4\)",
        ),
        (
            "state entry not a dict",
            set_in(("state", 0), 3),
            TypeError,
            r"the state of parameter 0\.weight must be a dict",
        ),
        (
            "prox entry garbage",
            set_in(("group_prox",), "x"),
            TypeError,
            "'group_prox' entry must be a dict",
        ),
        ("other hierarchy", other_hierarchy, ValueError, "saved with another hierarchy"),
        (
            "garbage hierarchy",
            set_in(("group_prox", "hierarchy"), [1, 2]),
            ValueError,
            "another hierarchy .*unreadable",
        ),
        (
            "penalties garbage",
            set_in(("group_prox", "penalties"), 0.1),
            TypeError,
            "penalties must be a dict",
        ),
        (
            "other levels",
            set_in(("group_prox", "penalties"), {"row": {"lam": 0.1}}),
            ValueError,
            r"penalises levels \['row'\], this optimizer \['layer', 'row'\]",
        ),
        (
            "negative lam",
            set_in(("group_prox", "penalties", "layer", "lam"), -1.0),
            ValueError,
            "penalty for level 'layer' is invalid: .*lam must be finite",
        ),
        (
            "str lam",
            set_in(("group_prox", "penalties", "row", "lam"), "big"),
            TypeError,
            "penalty for level 'row' is invalid: .*lam must be a real number",
        ),
        (
            "no lam",
            drop(("group_prox", "penalties", "row", "lam")),
            ValueError,
            "penalty for level 'row' is invalid: .*no 'lam'",
        ),
        (
            "bad l1_ratio",
            set_in(("group_prox", "penalties", "row", "l1_ratio"), 3.0),
            ValueError,
            "level 'row' is invalid: .*l1_ratio",
        ),
        (
            "frozen of another size",
            set_in(("group_prox", "frozen"), torch.ones(3, dtype=torch.bool)),
            ValueError,
            "frozen zero pattern must be a bool tensor of 12 entries",
        ),
        (
            "frozen garbage",
            set_in(("group_prox", "frozen"), [1, 0]),
            TypeError,
            "frozen zero pattern .*got list",
        ),
        (
            "skipped steps",
            set_in(("group_prox", "skipped_steps"), -3),
            ValueError,
            "skipped_steps must be an int >= 0",
        ),
        (
            "skipped steps garbage",
            set_in(("group_prox", "skipped_steps"), "3"),
            TypeError,
            "skipped_steps must be an int, got '3'",
        ),
    ]
    if kind == "adam":
        cases.append(
            (
                "prox_metric",
                set_in(("group_prox", "prox_metric"), "newton"),
                ValueError,
                "prox_metric must be one of",
            )
        )
    return cases


@MANY
@given(kind=st.sampled_from(sorted(OPTIMIZERS)), data=st.data(), frozen=st.booleans())
def test_load_state_dict_refuses_bad_checkpoints_and_changes_nothing(kind, data, frozen):
    model, opt = _optimizer(kind)
    _train(model, opt)
    good = copy.deepcopy(opt.state_dict())
    # The optimizer moves on, so that loading even part of the checkpoint would show.
    opt.penalties["row"].lam = 0.07
    if frozen:
        opt.freeze_zero_groups()
    _train(model, opt, 1)
    name, corrupt, err, match = data.draw(st.sampled_from(_corruptions(kind)))
    bad = corrupt(copy.deepcopy(good))
    snap = Snapshot(model, opt)
    with pytest.raises(err, match=match):
        opt.load_state_dict(bad)
    assert snap.unchanged(), name
    assert opt.frozen == frozen
    opt.load_state_dict(good)  # a good one still loads
    assert opt.penalties["row"].lam == 0.05


# ------------------------------------------------------------------------------ SparsityTarget
def _target_optimizer(penalties: dict | None = None):
    model = _model()
    pens = (
        {"row": gp.GroupLasso(0.0), "layer": gp.GroupLasso(0.0)} if penalties is None else penalties
    )
    return model, gp.ProxSGD(
        model.parameters(), lr=0.1, hierarchy=_hierarchy(model), penalties=pens
    )


@SOME
@given(
    frac=st.one_of(
        st.floats(allow_nan=True).filter(lambda x: not 0 <= x < 1),
        st.integers().filter(lambda x: x not in (0,)),
        st.floats(min_value=1.0, max_value=1.0).map(np.float64),
    ),
    level=st.sampled_from(["row", "layer"]),
)
def test_target_fraction_outside_0_1(frac, level):
    model, opt = _target_optimizer()
    snap = Snapshot(model, opt)
    with pytest.raises(
        ValueError, match=rf"the target of level {level!r} must be a fraction in \[0, 1\)"
    ):
        gp.SparsityTarget(opt, {level: frac}, reach_step=5)
    assert snap.unchanged()


@SOME
@given(frac=NOT_REAL, level=st.sampled_from(["row", "layer"]))
def test_target_fraction_of_the_wrong_type(frac, level):
    model, opt = _target_optimizer()
    snap = Snapshot(model, opt)
    with pytest.raises(TypeError, match=rf"the target of level {level!r} must be a number"):
        gp.SparsityTarget(opt, {level: frac}, reach_step=5)
    assert snap.unchanged()


@SOME
@given(level=NAMES.filter(lambda s: s not in ("row", "layer")))
def test_target_unknown_level(level):
    model, opt = _target_optimizer()
    snap = Snapshot(model, opt)
    with pytest.raises(
        ValueError,
        match=rf"target level {level!r} is not a level of the hierarchy; its levels are \['row', 'layer'\]",
    ):
        gp.SparsityTarget(opt, {"row": 0.5, level: 0.5}, reach_step=5)
    assert snap.unchanged()


@SOME
@given(
    pen=st.sampled_from(
        [None, gp.L1, gp.GroupDecay, gp.GroupL0, lambda lam: gp.SparseGroupLasso(lam, 1.0)]
    ),
    lam=GOOD_LAM,
)
def test_target_level_without_a_group_lasso(pen, lam):
    pens = {"row": gp.GroupLasso(0.0)}
    if pen is not None:
        pens["layer"] = pen(lam)
    model, opt = _target_optimizer(pens)
    snap = Snapshot(model, opt)
    with pytest.raises(
        ValueError, match=r"level 'layer' needs a GroupLasso, SparseGroupLasso, GroupMCP"
    ):
        gp.SparsityTarget(opt, {"row": 0.5, "layer": 0.5}, reach_step=5)
    assert snap.unchanged()


@FEW
@given(targets=st.sampled_from([{}, [("row", 0.5)], "row", 0.5]))
def test_target_targets_of_the_wrong_type(targets):
    _, opt = _target_optimizer()
    with pytest.raises(TypeError, match="targets must be a non-empty mapping"):
        gp.SparsityTarget(opt, targets, reach_step=5)


@FEW
@given(
    kwargs=st.sampled_from(
        [{}, {"params": 0.5, "flops": 0.5}, {"targets": {"row": 0.5}, "params": 0.5}]
    )
)
def test_target_needs_exactly_one_kind_of_target(kwargs):
    model, opt = _target_optimizer()
    snap = Snapshot(model, opt)
    with pytest.raises(ValueError, match="give exactly one target"):
        gp.SparsityTarget(opt, reach_step=5, model=model, **kwargs)
    assert snap.unchanged()


@FEW
@given(opt=st.sampled_from([None, "sgd", torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)]))
def test_target_optimizer_of_the_wrong_type(opt):
    with pytest.raises(TypeError, match=r"optimizer must be a group_prox\.ProxSGD or ProxAdam"):
        gp.SparsityTarget(opt, {"row": 0.5}, reach_step=5)


@SOME
@given(warmup=st.integers(0, 50), back=st.integers(0, 50))
def test_target_reach_step_not_after_warmup(warmup, back):
    model, opt = _target_optimizer()
    snap = Snapshot(model, opt)
    reach = warmup - back
    with pytest.raises(ValueError, match=rf"reach_step must be at least {warmup + 1}, got {reach}"):
        gp.SparsityTarget(opt, {"row": 0.5}, warmup_steps=warmup, reach_step=reach)
    assert snap.unchanged()


@SOME
@given(
    case=st.sampled_from(
        [
            (dict(warmup_steps=-1), ValueError, "warmup_steps must be at least 0"),
            (dict(freeze_step=9), ValueError, "freeze_step must be at least 10"),
            (dict(reach_step=10.0), TypeError, "reach_step must be an int"),
            (dict(reach_step=True), TypeError, "reach_step must be an int"),
            (dict(reach_step="10"), TypeError, "reach_step must be an int"),
            (dict(warmup_steps=None), TypeError, "warmup_steps must be an int"),
            (dict(update_every=0), ValueError, "update_every must be at least 1"),
            (dict(lookahead=-1), ValueError, "lookahead must be at least 0"),
            (dict(gain=0.0), ValueError, "gain must be positive and finite"),
            (dict(gain=math.nan), ValueError, "gain must be positive and finite"),
            (dict(gain="2"), TypeError, "gain must be a real number"),
            (dict(max_change=math.inf), ValueError, "max_change must be positive and finite"),
            (dict(max_change=-1), ValueError, "max_change must be positive"),
            (dict(spread=1.5), ValueError, r"spread must be a fraction in \[0, 1\]"),
            (dict(spread=math.nan), ValueError, r"spread must be a fraction in \[0, 1\]"),
            (dict(spread=None), TypeError, "spread must be a real number"),
            (dict(spread=0.5), ValueError, "spread shares zeros between layers"),
            (dict(selection="magnitude"), ValueError, "selection must be one of"),
            (dict(ramp="exp"), ValueError, "ramp must be one of"),
            (dict(ramp=None), TypeError, "ramp must be one of"),
            (dict(snap=1), TypeError, "snap must be True or False"),
            (dict(snap="no"), TypeError, "snap must be True or False"),
        ]
    )
)
def test_target_bad_settings(case):
    kwargs, err, match = case
    model, opt = _target_optimizer()
    opt.penalties["row"].lam = 0.3  # a target overwrites λ only once everything is checked
    snap = Snapshot(model, opt)
    with pytest.raises(err, match=f"SparsityTarget: {match}"):
        gp.SparsityTarget(opt, {"row": 0.5}, **{"reach_step": 10, **kwargs})
    assert snap.unchanged()


def test_target_accepts_numpy_numbers():
    _, opt = _target_optimizer()
    t = gp.SparsityTarget(
        opt, {"row": np.float32(0.5)}, reach_step=np.int64(10), gain=np.float64(2.0)
    )
    assert t.reach_step == 10 and type(t.reach_step) is int


def _target_corruptions() -> list[tuple[str, Callable[[dict], Any], type, str]]:
    def set_key(key: str, value: Any) -> Callable[[dict], dict]:
        return lambda sd: {**sd, key: value}

    def set_level(key: str, level: str, value: Any) -> Callable[[dict], dict]:
        return lambda sd: {**sd, key: {**sd[key], level: value}}

    return [
        (
            "not a dict",
            lambda sd: None,
            TypeError,
            "expected the dict returned by SparsityTarget.state_dict",
        ),
        (
            "no multiplier",
            lambda sd: {k: v for k, v in sd.items() if k != "multiplier"},
            ValueError,
            "the state has no 'multiplier'",
        ),
        (
            "no settings",
            lambda sd: {k: v for k, v in sd.items() if k != "settings"},
            ValueError,
            "has no 'settings'",
        ),
        (
            "other settings",
            lambda sd: {**sd, "settings": {**sd["settings"], "reach_step": 99}},
            ValueError,
            "same settings",
        ),
        (
            "another format",
            set_key("format", "group_prox.sparsity_target/2"),
            ValueError,
            "restart the target's schedule",
        ),
        ("negative step", set_key("step_count", -1), ValueError, "step_count must be at least 0"),
        ("float step", set_key("step_count", 2.5), TypeError, "step_count must be an int"),
        (
            "multiplier garbage",
            set_key("multiplier", [0.1]),
            TypeError,
            "multiplier must be a dict",
        ),
        (
            "multiplier of another level",
            set_key("multiplier", {"layer": 0.1}),
            ValueError,
            r"multiplier is given for \['layer'\], this controller targets \['row'\]",
        ),
        (
            "negative multiplier",
            set_level("multiplier", "row", -0.5),
            ValueError,
            "multiplier of 'row': lam must be finite",
        ),
        (
            "str multiplier",
            set_level("multiplier", "row", "0.5"),
            TypeError,
            "multiplier of 'row': lam must be a real number",
        ),
        (
            "measured",
            set_level("measured", "row", 1.5),
            ValueError,
            r"measured of 'row' must be a fraction in \[0, 1\]",
        ),
        (
            "forecast garbage",
            set_level("forecast", "row", None),
            TypeError,
            "forecast of 'row' must be a real number, got None",
        ),
        (
            "previous norms of another size",
            set_level("previous", "row", torch.zeros(4)),
            ValueError,
            "previous norms of level 'row' must be a float tensor of 6 entries",
        ),
        (
            "penalised of another size",
            set_level("penalised", "row", torch.zeros(4, dtype=torch.bool)),
            ValueError,
            "penalised groups of level 'row' must be a bool tensor of 6 entries",
        ),
        (
            "penalised garbage",
            set_level("penalised", "row", [True] * 6),
            ValueError,
            "penalised groups of level 'row' .*got list",
        ),
        (
            "damaged norms",
            lambda sd: {**sd, "previous": {"row": sd["previous"]["row"] + 1.0}},
            ValueError,
            "does not match the checksum",
        ),
        (
            "a uniform selection it lacks",
            set_level("uniform", "selected/row", torch.zeros(6, dtype=torch.bool)),
            ValueError,
            "uniform selection this target lacks",
        ),
        ("negative eta_ref", set_key("eta_ref", -1.0), ValueError, "eta_ref must be a number >= 0"),
    ]


@SOME
@given(data=st.data())
def test_target_load_state_dict_refuses_bad_checkpoints_and_changes_nothing(data):
    model, opt = _target_optimizer()
    target = gp.SparsityTarget(opt, {"row": 0.5}, reach_step=6)
    for _ in range(3):
        _train(model, opt, 1)
        target.step()
    good = copy.deepcopy(target.state_dict())
    for _ in range(2):
        _train(model, opt, 1)
        target.step()
    name, corrupt, err, match = data.draw(st.sampled_from(_target_corruptions()))
    bad = corrupt(copy.deepcopy(good))
    before = copy.deepcopy(target.state_dict())
    weights = [lp.weights.clone() for lp in opt.prox.plan.levels]
    snap = Snapshot(model, opt)
    with pytest.raises(err, match=match):
        target.load_state_dict(bad)
    assert _same(before, target.state_dict()), name
    assert all(torch.equal(a, lp.weights) for a, lp in zip(weights, opt.prox.plan.levels))
    assert snap.unchanged()
    target.load_state_dict(good)
    assert target.step_count == 3


# ------------------------------------------------------------------------------ from_config
@SOME
@given(
    lam=st.one_of(BAD_REAL.filter(lambda v: not isinstance(v, torch.Tensor)), NOT_REAL),
    level=st.sampled_from(["row", "layer"]),
)
def test_from_config_bad_lambda(lam, level):
    h = _hierarchy(_model())
    err, match = (
        (ValueError, "lambda must be finite and >= 0")
        if _is_real(lam)
        else (TypeError, "lambda must be a number")
    )
    with pytest.raises(err, match=rf"config = .*'groups': {level!r}.*: {match}"):
        gp.from_config({"groups": level, "norm": "L1", "lambda": lam}, h)


@SOME
@given(
    level=NAMES.filter(lambda s: s not in ("row", "layer", "block", "blocks")),
    in_list=st.booleans(),
)
def test_from_config_unknown_level(level, in_list):
    h = _hierarchy(_model())
    groups = ["row", level] if in_list else level
    with pytest.raises(
        ValueError,
        match=rf"groups {level!r} is not a level of the hierarchy; its levels are \['row', 'layer'\]",
    ):
        gp.from_config({"groups": groups, "lambda": 0.1}, h)


@FEW
@given(
    case=st.sampled_from(
        [
            (None, TypeError, "config: a config node must be a dict"),
            (3, TypeError, "config: a config node must be a dict"),
            ("row", TypeError, "a config node must be a dict"),
            ([None], TypeError, r"config\[0\]: a config node must be a dict"),
            ({"groups": [], "lambda": 0.1}, ValueError, "groups is an empty list"),
            (
                {"groups": {"row": 1}, "lambda": 0.1},
                TypeError,
                "groups must be None, a level name or a list",
            ),
            (
                {"groups": ["row", 3], "lambda": 0.1},
                TypeError,
                "groups must be None, a level name or a list",
            ),
            (
                {"type": "hierarchical", "children": "row"},
                TypeError,
                "children must be a list of nodes",
            ),
            ({"type": 3}, ValueError, "type 3 is not one of"),
            ({"norm": None, "lambda": 1}, ValueError, "norm None is not one of"),
        ]
    )
)
def test_from_config_bad_nodes(case):
    config, err, match = case
    with pytest.raises(err, match=match):
        gp.from_config(config, _hierarchy(_model()))


@FEW
@given(h=st.sampled_from([None, "row", {"row": []}, nn.Linear(2, 2)]))
def test_from_config_hierarchy_of_the_wrong_type(h):
    with pytest.raises(TypeError, match=r"hierarchy must be a group_prox\.Hierarchy"):
        gp.from_config({"lambda": 0.1}, h)


def test_from_config_on_a_hierarchy_without_levels():
    with pytest.raises(ValueError, match="the hierarchy has no levels"):
        gp.from_config({"lambda": 0.1}, gp.Hierarchy({}))


# ----------------------------------------------------------------------------------- report
@FEW
@given(bad=st.sampled_from([None, "model", [nn.Linear(2, 2)], nn.Linear(2, 2).weight]))
def test_get_sparsity_report_wrong_types(bad):
    model = _model()
    h = _hierarchy(model)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        gp.get_sparsity_report(bad, h)
    with pytest.raises(TypeError, match=r"hierarchy must be a group_prox\.Hierarchy"):
        gp.get_sparsity_report(model, bad)


def test_get_sparsity_report_of_another_models_hierarchy():
    model, other = _model(), _model(1)
    with pytest.raises(ValueError, match=r"not parameters of model: 0\.weight, 0\.bias"):
        gp.get_sparsity_report(model, _hierarchy(other))


# ------------------------------------------------------------------------------ compression
@FEW
@given(
    case=st.sampled_from(
        [
            (dict(multiple="2"), TypeError, "multiple must be a positive int, got str"),
            (dict(multiple=2.0), TypeError, "multiple must be a positive int, got float"),
            (dict(multiple=True), TypeError, "multiple must be a positive int, got bool"),
            (dict(multiple=0), ValueError, "multiple must be a positive int, got 0"),
            (dict(multiple=-8), ValueError, "multiple must be a positive int, got -8"),
            (dict(hierarchy="h"), TypeError, "hierarchy must be a group_prox.Hierarchy or None"),
            ("other", ValueError, r"parameter '0\.weight' is not a parameter of this model"),
        ]
    )
)
def test_compress_bad_arguments_leave_the_model_alone(case):
    kwargs, err, match = case
    model = _model()
    if kwargs == "other":
        kwargs = dict(hierarchy=_hierarchy(_model(1)))
    snap = Snapshot(model)
    with pytest.raises(err, match=f"compress\\(\\): .*{match}"):
        gp.compress(model, **kwargs)
    assert snap.unchanged()
    assert not hasattr(model, "group_prox_plan")


@FEW
@given(bad=st.sampled_from([None, "model", 3, [nn.Linear(2, 2)]]))
def test_compress_and_save_compressed_refuse_what_is_not_a_module(bad):
    with pytest.raises(TypeError, match=r"compress\(\): expected an nn\.Module"):
        gp.compress(bad)
    with pytest.raises(TypeError, match=r"save_compressed\(\): expected the nn\.Module"):
        gp.save_compressed(bad, io.BytesIO())


def test_save_compressed_of_a_model_not_compressed():
    buf = io.BytesIO()
    with pytest.raises(ValueError, match="the model has no group_prox_plan"):
        gp.save_compressed(_model(), buf)
    assert buf.getvalue() == b""


@FEW
@given(bad=st.sampled_from([None, 3, "resnet18", [nn.Linear(2, 2)]]))
def test_load_compressed_model_fn_is_checked_before_the_file_is_read(bad):
    with pytest.raises(TypeError, match="model_fn must build the original architecture"):
        gp.load_compressed(bad, "/nonexistent/file.pt")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"x": torch.zeros(1)}, "was not written by save_compressed"),
        ([1, 2], "was not written by save_compressed"),
        ({"format": "group_prox.compressed/1", "plan": {}}, "has no 'state_dict'"),
    ],
)
def test_load_compressed_of_other_files(data, match):
    buf = io.BytesIO()
    torch.save(data, buf)
    buf.seek(0)
    model = _model()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=match):
        gp.load_compressed(model, buf)
    assert snap.unchanged()
