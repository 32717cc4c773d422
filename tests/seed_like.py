"""A small ResNet tagged the way the earlier project tagged its models, for migration tests.

Layers are wrapped in modules that keep their tags in ``_param_groups`` and the layer in
``.module``; models expose ``get_param_groups()``, a tree of groups with ``.module`` (a module, or
a list of modules and groups) and ``.groups`` (tags).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class TagGroup:
    module: Any
    groups: list[str]
    name: str = ""


class Tagged(nn.Module):
    def __init__(self, module: nn.Module, groups: list[str]) -> None:
        super().__init__()
        self.module = module
        self._param_groups = groups

    def forward(self, x):
        return self.module(x)


def conv(cin, cout, k, tags, stride=1):
    return Tagged(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), tags)


def leaf_groups(module: nn.Module) -> list[TagGroup]:
    if isinstance(module, Tagged):
        return [TagGroup(module, module._param_groups)]
    if isinstance(module, nn.Sequential):
        return [g for child in module for g in leaf_groups(child)]
    if hasattr(module, "get_param_groups"):
        return module.get_param_groups()
    return []


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv(cin, cout, 3, ["base_level"], stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv(cout, cout, 3, ["base_level"])
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                conv(cin, cout, 1, ["shortcut", "base_level"], stride), nn.BatchNorm2d(cout)
            )

    def branch(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))

    def forward(self, x):
        return torch.relu(self.branch(x) + self.shortcut(x))

    def get_param_groups(self) -> list[TagGroup]:
        layer = TagGroup([self.conv1, self.conv2], ["layer"])
        return [TagGroup([*leaf_groups(self.shortcut), layer], ["block"], "ResNetBlock")]


class SeedLikeResNet(nn.Module):
    def __init__(self, widths=(8, 16), blocks=(2, 2), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = conv(3, widths[0], 3, ["base_level", "heels"])
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers.append(
                nn.Sequential(
                    *(Block(cin if k == 0 else w, w, stride if k == 0 else 1) for k in range(n))
                )
            )
            cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = Tagged(nn.Linear(cin, num_classes), ["head"])

    def forward(self, x):
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))

    def get_param_groups(self) -> list[TagGroup]:
        return [g for child in self.children() for g in leaf_groups(child)]
