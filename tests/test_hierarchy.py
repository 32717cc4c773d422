"""Hierarchy construction and validation; penalty argument validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import group_prox as gp

from .strategies import random_trees, to_hierarchy


def _params():
    torch.manual_seed(0)
    return (
        nn.Parameter(torch.randn(4, 3)),
        nn.Parameter(torch.randn(4)),
        nn.Parameter(torch.randn(2, 5)),
    )


@settings(max_examples=50, deadline=None)
@given(tree=random_trees())
def test_random_trees_are_accepted(tree):
    params = [nn.Parameter(torch.randn(s)) for s in tree.shapes]
    h = to_hierarchy(tree, params)
    assert list(h.level_names) == [f"level{k}" for k in range(len(tree.levels))]
    for k, groups in enumerate(tree.levels):
        assert h.num_groups(f"level{k}") == len(groups)


def test_group_names_sizes_and_views():
    w, b, _ = _params()
    h = gp.Hierarchy(
        {
            "base_level": {
                "f0": [(w, 0, 0), (b, 0, 0)],
                "f1": [(w, 0, slice(1, 3)), (b, 0, slice(1, 3))],
            },
            "layer": [[w, b]],
            "empty": [],
        },
        names={"lin.weight": w, "lin.bias": b},
    )
    assert h.group_names("base_level") == ("f0", "f1")
    assert h.group_names("layer") == ("layer[0]",)
    assert h.group_sizes("base_level") == [4, 8]
    assert h.num_groups("empty") == 0
    views = h.groups("base_level")
    assert torch.equal(views[1][0], w.detach()[1:3])
    assert [lay.name for lay in h.tensors] == ["lin.weight", "lin.bias"]
    assert "base_level: 2 groups" in repr(h)


def test_negative_dim_and_index_are_normalised():
    w, _, _ = _params()
    h = gp.Hierarchy({"cols": [[(w, -1, -1)], [(w, 1, 0)]]})
    assert h.tensors[0].dims == (1,) and h.group_sizes("cols") == [4, 4]


@pytest.mark.parametrize(
    ("levels", "error", "match"),
    [
        (lambda w, b, u: [[w]], TypeError, "ordered mapping"),
        (
            lambda w, b, u: {"a": [[(w, 2, 0)]]},
            ValueError,
            r"level 'a', group 'a\[0\]', member 0: dim 2 is out of range",
        ),
        (lambda w, b, u: {"a": [[(w, 0, 4)]]}, ValueError, "index 4 is out of range"),
        (lambda w, b, u: {"a": [[(w, 0, slice(5, 9))]]}, ValueError, "selects nothing"),
        (lambda w, b, u: {"a": [[(w, 0, 1.5)]]}, TypeError, "index must be an int or a slice"),
        (lambda w, b, u: {"a": [[(w, "0", 1)]]}, TypeError, "dim must be an int"),
        (lambda w, b, u: {"a": [[w[0]]]}, ValueError, "is a view or a computed tensor"),
        (
            lambda w, b, u: {
                "a": [[nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)]]
            },
            ValueError,
            "floating point",
        ),
        (lambda w, b, u: {"a": [[nn.Parameter(torch.zeros(0))]]}, ValueError, "has no elements"),
        (lambda w, b, u: {"a": [[]]}, ValueError, r"group 'a\[0\]' is empty"),
        (lambda w, b, u: {"a": [w]}, TypeError, "a group must be a list of members"),
        (lambda w, b, u: {"a": [["w"]]}, TypeError, "a member is a parameter"),
        (lambda w, b, u: {"a": [[(w, 0, 0), (w, 0, slice(0, 2))]]}, ValueError, "members overlap"),
        (
            lambda w, b, u: {"a": {"g": [(w, 0, 0)], "h": [w]}},
            ValueError,
            "groups 'g' and 'h' overlap",
        ),
        (
            lambda w, b, u: {"a": [[(w, 0, 0)]], "b": [[(w, 1, 0)]]},
            ValueError,
            "'a\\[0\\]' of level 'a' overlaps 'b\\[0\\]' of level 'b' without being contained",
        ),
        (
            lambda w, b, u: {
                "fine": {"f": [(w, 0, 0), (w, 0, 1)]},
                "coarse": {"c": [(w, 0, 1), (w, 0, 2)]},
            },
            ValueError,
            "'f' of level 'fine' overlaps 'c' of level 'coarse' without being contained",
        ),
        (
            lambda w, b, u: {"fine": {"f": [w, b]}, "coarse": {"c": [b]}},
            ValueError,
            "'c' of level 'coarse' lies inside group 'f' of the finer level 'fine'",
        ),
        (
            lambda w, b, u: {"fine": {"f": [w, b]}, "coarse": {"c": [w], "d": [b, u]}},
            ValueError,
            "overlaps 'c', 'd'",
        ),
        (lambda w, b, u: {"a": [[(w, (0, 1), 0)]]}, TypeError, "index must be a tuple of as many"),
        (lambda w, b, u: {"a": [[(w, (0, -2), (0, 1))]]}, ValueError, r"dim 0 is given twice"),
        (lambda w, b, u: {"a": [[(w, (0, 1), (0, 3))]]}, ValueError, "index 3 is out of range"),
        (lambda w, b, u: {"": [[w]]}, TypeError, "non-empty strings"),
        (lambda w, b, u: {"a": 3}, TypeError, "expected a list of groups"),
    ],
)
def test_validation_errors(levels, error, match):
    w, b, u = _params()
    with pytest.raises(error, match=match):
        gp.Hierarchy(levels(w, b, u))


def test_members_along_several_dims():
    # A fused expert weight [experts, d_in, hidden]: units (e, :, j) nested in experts (e).
    w = nn.Parameter(torch.randn(3, 4, 5))
    units = {f"e{e}[{j}]": [(w, (0, -1), (e, j))] for e in range(3) for j in range(5)}
    experts = {f"e{e}": [(w, 0, e)] for e in range(3)}
    h = gp.Hierarchy({"unit": units, "expert": experts})
    assert h.tensors[0].dims == (0, 2) and h.num_atoms == 15
    assert h.group_sizes("unit") == [4] * 15 and h.group_sizes("expert") == [20] * 3
    assert torch.equal(h.groups("unit")[7][0].squeeze(), w.detach()[1, :, 2])
    assert list(h.atom_group("expert")) == [e for e in range(3) for _ in range(5)]
    with pytest.raises(ValueError, match="overlaps"):
        gp.Hierarchy({"unit": units, "d_in": [[(w, 1, i)] for i in range(4)]})


def test_names_type_is_checked():
    w, _, _ = _params()
    with pytest.raises(TypeError, match="names must be"):
        gp.Hierarchy({"a": [[w]]}, names=[w])


def test_equal_groups_on_two_levels_are_allowed():
    w, b, _ = _params()
    gp.Hierarchy({"fine": [[w, b]], "coarse": [[w, b]]})


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_penalty_lambda_validation(bad):
    for cls in (gp.GroupLasso, gp.L1, gp.GroupDecay, gp.GroupL0):
        with pytest.raises(ValueError, match="lam must be finite and >= 0"):
            cls(bad)
    pen = gp.GroupLasso(1.0)
    with pytest.raises(ValueError):
        pen.lam = bad
    assert pen.lam == 1.0


def test_penalty_argument_types():
    with pytest.raises(TypeError, match="lam must be a real number"):
        gp.GroupLasso("0.1")
    with pytest.raises(ValueError, match=r"l1_ratio must be in \[0, 1\]"):
        gp.SparseGroupLasso(0.1, l1_ratio=1.5)
    with pytest.raises(TypeError, match="weight must be"):
        gp.GroupLasso(0.1, weight="sqrt")
    with pytest.raises(ValueError, match="numeric weight"):
        gp.GroupLasso(0.1, weight=-2.0)


def test_penalty_values():
    x = torch.tensor([3.0, -4.0])
    y = torch.tensor([0.0, 0.0, 0.0])
    groups = [[x], [y]]
    assert gp.GroupLasso(2.0).value(groups).item() == pytest.approx(2.0 * math.sqrt(2) * 5.0)
    assert gp.GroupLasso(2.0, weight=lambda n: 1.0).value(groups).item() == pytest.approx(10.0)
    assert gp.L1(0.5).value(groups).item() == pytest.approx(3.5)
    assert gp.SparseGroupLasso(1.0, 0.25).value(groups).item() == pytest.approx(
        0.25 * 7 + 0.75 * math.sqrt(2) * 5
    )
    assert gp.GroupDecay(0.1).value(groups).item() == pytest.approx(0.05 * 25)
    assert gp.GroupL0(1.0).value(groups).item() == pytest.approx(2.0)
    assert repr(gp.SparseGroupLasso(0.1, 0.3)) == "SparseGroupLasso(lam=0.1, l1_ratio=0.3)"
