"""CIFAR ResNets (the CIFAR-style ResNets of He et al. as used by RepDistiller / CRD): ``resnet8 ... resnet110``,
``resnet8x4``, ``resnet32x4``; input ``(B, 3, 32, 32)``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdray.errors import ConfigError
from kdray.models.registry import MODELS


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU-3x3 conv-BN, plus a (1x1 conv + BN when the shape changes) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class CifarResNet(nn.Module):
    """Depth 6n+2: 3x3 stem conv, three stages of n BasicBlocks (strides 1, 2, 2), global pool, fc."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError("kwargs.depth", depth, "6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)")
        n = (depth - 2) // 6
        stem, w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._stage(stem, w1, n, stride=1)
        self.layer2 = self._stage(w1, w2, n, stride=2)
        self.layer3 = self._stage(w2, w3, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _register_resnet(name: str, depth: int, widths: tuple[int, int, int, int]) -> None:
    def factory(num_classes: int) -> nn.Module:
        return CifarResNet(depth, widths, num_classes)

    factory.__name__ = name
    factory.__qualname__ = name
    factory.__doc__ = f"CIFAR ResNet, depth {depth}, stem/stage widths {widths}."
    MODELS.register(name)(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register_resnet(f"resnet{_depth}", _depth, (16, 16, 32, 64))
# RepDistiller's "x4" variants: 32-channel stem, stages 64/128/256 (resnet8x4 ~1.2M, resnet32x4 ~7.4M params)
_register_resnet("resnet8x4", 8, (32, 64, 128, 256))
_register_resnet("resnet32x4", 32, (32, 64, 128, 256))
