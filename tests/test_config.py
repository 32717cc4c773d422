"""gp.from_config: every example of the earlier project's documents loads, maps exactly, trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import group_prox as gp

from .seed_like import SeedLikeResNet

# Section 3 of config-language.ru.md, verbatim.
GLOBAL_DECAY_AND_FILTER_LASSO = {
    "type": "hierarchical",
    "children": [
        {"type": "global", "norm": "L2", "lambda": 0.01},
        {
            "type": "layerwise",
            "groups": "base_level",
            "norm": "L1",
            "inner_norm": "L2",
            "lambda": 0.002,
        },
    ],
}
LAYER_SPARSITY = {
    "type": "layerwise",
    "groups": "layer",
    "norm": "L1",
    "inner_norm": "L2",
    "lambda": 0.005,
}
SMOOTH_DECAY_FILTERS = {
    "type": "layerwise",
    "groups": "base_level",
    "norm": "L2",
    "inner_norm": "L2",
    "lambda": 1e-4,
}
L0_FILTERS = {
    "type": "layerwise",
    "groups": "base_level",
    "norm": "L1",
    "inner_norm": "L0",
    "lambda": 0.03,
}
COMPLEX_HIERARCHY = {
    "type": "hierarchical",
    "groups": "blocks",
    "children": [
        {"type": "layerwise", "groups": "layer", "norm": "L1", "inner_norm": "L2", "lambda": 0.01},
        {
            "type": "hierarchical",
            "groups": "layer",
            "children": [
                {
                    "type": "layerwise",
                    "groups": "base_level",
                    "norm": "L2",
                    "inner_norm": "L2",
                    "lambda": 1e-4,
                }
            ],
        },
    ],
}
# The earlier project's README: a dict tree whose children have no type, and a list of nodes.
README_TREE = {
    "type": "hierarchical",
    "children": [
        {"groups": "base_level", "norm": "L2", "lambda": 0.001},
        {"groups": "layer", "norm": "L1", "lambda": 0.01},
    ],
}
README_LIST = [
    {"groups": ["base_level"], "norm": "L1", "lambda": 0.001},
    {"groups": ["layer"], "norm": "L2", "lambda": 0.01},
]
# Section 2's patterns.
L1_WEIGHTS = {
    "type": "layerwise",
    "groups": "base_level",
    "norm": "sum",
    "inner_norm": "L1",
    "lambda": 1e-3,
}

EXAMPLES = {
    "3.1": GLOBAL_DECAY_AND_FILTER_LASSO,
    "3.2": LAYER_SPARSITY,
    "3.3": SMOOTH_DECAY_FILTERS,
    "3.4": L0_FILTERS,
    "3.5": COMPLEX_HIERARCHY,
    "readme-tree": README_TREE,
    "readme-list": README_LIST,
    "l1": L1_WEIGHTS,
}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SeedLikeResNet()


def _summary(penalties):
    out = {}
    for level, pen in penalties.items():
        out[level] = (type(pen).__name__, pytest.approx(pen.lam), pen.weight)
    return out


def test_examples_map_to_the_exact_penalties(model):
    h = gp.hierarchy.from_module_tags(model)
    expect = {
        "3.1": {"base_level": ("GroupLasso", 0.002, 1.0), "global": ("GroupDecay", 0.02, 1.0)},
        "3.2": {"layer": ("GroupLasso", 0.005, 1.0)},
        "3.3": {"base_level": ("GroupDecay", 2e-4, 1.0)},
        "3.4": {"base_level": ("GroupL0", 0.03, "size")},
        "3.5": {"base_level": ("GroupDecay", 2e-4, 1.0), "layer": ("GroupLasso", 0.01, 1.0)},
        "readme-tree": {
            "base_level": ("GroupDecay", 0.002, 1.0),
            "layer": ("GroupLasso", 0.01, 1.0),
        },
        "readme-list": {
            "base_level": ("GroupLasso", 0.001, 1.0),
            "layer": ("GroupDecay", 0.02, 1.0),
        },
        "l1": {"base_level": ("L1", 1e-3, 1.0)},
    }
    for key, config in EXAMPLES.items():
        got = gp.from_config(config, h)
        assert _summary(got) == {
            lv: (c, pytest.approx(lam), w) for lv, (c, lam, w) in expect[key].items()
        }, key


def test_container_restricts_its_children(model):
    h = gp.hierarchy.from_module_tags(model)
    pens = gp.from_config(COMPLEX_HIERARCHY, h)
    assert pens["layer"].groups is None  # every layer lies in a block
    inside = pens["base_level"].groups
    assert "layers.0.0.conv1[0]" in inside and "layers.1.1.conv2[3]" in inside
    assert "conv1[0]" not in inside and "layers.1.0.shortcut.0[0]" not in inside
    # The restriction holds in the optimizer: a huge decay leaves the stem alone.
    stem = model.conv1.module.weight.detach().clone()
    pens["base_level"].lam = 1e9
    gp.ProxSGD(model.parameters(), lr=1.0, hierarchy=h, penalties=pens).step()
    assert torch.equal(model.conv1.module.weight, stem)
    assert model.layers[0][0].conv1.module.weight.abs().max() < 1e-6


@pytest.mark.parametrize("key", list(EXAMPLES))
def test_every_example_trains(model, key):
    h = gp.hierarchy.from_module_tags(model)
    opt = gp.ProxSGD(
        model.parameters(),
        lr=0.05,
        momentum=0.9,
        hierarchy=h,
        penalties=gp.from_config(EXAMPLES[key], h),
    )
    torch.manual_seed(1)
    x = torch.randn(32, 3, 8, 8)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long()
    first = None
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert math.isfinite(opt.penalty_value())
    assert loss.item() < first


def test_global_penalty_is_one_group_over_the_hierarchy(model):
    h = gp.hierarchy.from_module_tags(model)
    pens = gp.from_config({"type": "global", "norm": "L1", "inner_norm": "L2", "lambda": 1e9}, h)
    assert list(pens) == ["global"] and isinstance(pens["global"], gp.GroupLasso)
    opt = gp.ProxSGD(model.parameters(), lr=1.0, hierarchy=h, penalties=pens)
    assert opt.hierarchy.level_names[-1] == "global" and opt.hierarchy.num_groups("global") == 1
    opt.step()
    assert all((p == 0).all() for p in h.params)


def test_l1_and_group_lasso_on_one_level_combine(model):
    h = gp.hierarchy.from_module_tags(model)
    pens = gp.from_config(
        [
            {"groups": "layer", "norm": "sum", "inner_norm": "L1", "lambda": 0.1},
            {"groups": "layer", "norm": "L1", "lambda": 0.3},
            {"groups": "layer", "norm": "L1", "lambda": 0.1},
        ],
        h,
    )
    pen = pens["layer"]
    assert isinstance(pen, gp.SparseGroupLasso)
    assert pen.lam == pytest.approx(0.5) and pen.l1_ratio == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        (
            {"type": "layerwise", "groups": "layer", "lamda": 0.1},
            ValueError,
            r"unknown key\(s\) \['lamda'\]",
        ),
        ({"type": "groupwise"}, ValueError, r"type 'groupwise' is not one of \['global'"),
        ({"groups": "layer", "norm": "L3", "lambda": 1}, ValueError, "norm 'L3' is not one of"),
        ({"groups": "layer", "inner_norm": "Linf", "lambda": 1}, ValueError, "inner_norm 'Linf'"),
        (
            {"groups": "layer", "norm": "L2", "inner_norm": "L1", "lambda": 1},
            ValueError,
            "has no exact proximal",
        ),
        (
            {"groups": "layer", "norm": "L1", "inner_norm": "none", "lambda": 1},
            ValueError,
            "contribute nothing",
        ),
        (
            {"groups": "filters", "lambda": 1},
            ValueError,
            r"groups 'filters' is not a level of the hierarchy",
        ),
        ({"groups": "layer", "lambda": -1}, ValueError, "lambda must be finite and >= 0"),
        ({"groups": "layer", "lambda": "0.1"}, TypeError, "lambda must be a number"),
        ({"type": "hierarchical", "lambda": 0.1, "children": []}, ValueError, "penalises nothing"),
        (
            {"type": "layerwise", "groups": "layer", "children": [{}]},
            ValueError,
            "children are allowed only",
        ),
        (
            {
                "type": "hierarchical",
                "groups": "layer",
                "children": [{"groups": "block", "lambda": 1}],
            },
            ValueError,
            "coarser than the container's level 'layer'",
        ),
        (
            {"type": "global", "groups": "layer", "norm": "L1", "lambda": 1},
            ValueError,
            "one norm of all of them",
        ),
        (
            [
                {"groups": "layer", "norm": "L1", "lambda": 1},
                {"groups": "layer", "norm": "L2", "lambda": 1},
            ],
            ValueError,
            "has no exact prox here; only equal kinds",
        ),
        (["layer"], TypeError, r"config\[0\]: a config node must be a dict"),
    ],
)
def test_bad_configs_are_rejected_with_the_node_quoted(model, config, error, match):
    h = gp.hierarchy.from_module_tags(model)
    with pytest.raises(error, match=match):
        gp.from_config(config, h)


def test_error_quotes_the_node_path(model):
    h = gp.hierarchy.from_module_tags(model)
    bad = {"type": "hierarchical", "children": [LAYER_SPARSITY, {"groups": "layer", "norm": "max"}]}
    with pytest.raises(
        ValueError, match=r"config\.children\[1\] = \{'groups': 'layer', 'norm': 'max'\}"
    ):
        gp.from_config(bad, h)


def test_resnet_builder_hierarchy_works_too():
    from torchvision.models import resnet18

    h = gp.hierarchy.resnet(resnet18(num_classes=10))
    pens = gp.from_config(README_TREE, h)
    assert set(pens) == {"base_level", "layer"}
    with pytest.raises(ValueError, match="not a level of the hierarchy; its levels are"):
        gp.from_config(COMPLEX_HIERARCHY, h)
