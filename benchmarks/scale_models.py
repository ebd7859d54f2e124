"""Architectures the scale benchmark trains outside Expunge and serves as trusted factories.

The server builds them from its configuration (``trusted_factories``: name ->
``benchmarks.scale_models:<function>``), never from anything a caller sends.
"""

from __future__ import annotations

import torch
from torch import nn

from expunge.defenses.architectures import ArchitectureSpec, BasicBlock


def cifar_cnn(spec: ArchitectureSpec, seed: int = 0) -> nn.Module:
    """Two 3x3 convolutions, then a wide dense layer: 532k parameters on 3x32x32 inputs,
    most of them cheap to compute (the dense layer), so an epoch over 50k images fits
    this machine's two cores."""
    torch.manual_seed(seed)
    channels = spec.input_shape[0]
    side = spec.input_shape[1] // 4
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * side * side, 256),
        nn.ReLU(),
        nn.Linear(256, spec.num_classes),
    )


class ResNet18(nn.Module):
    """The standard ResNet-18 (He et al. 2016; torchvision's layout: 7x7 stride-2 stem,
    max pool, four stages of two basic blocks, 64-512 channels): 11.2M parameters with
    ten classes. On 32x32 inputs its last stage sees 1x1 maps, so an epoch over 5,000
    images fits two cores."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = (64, 128, 256, 512)
        stages = []
        inputs = 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(BasicBlock(inputs, width, stride), BasicBlock(width, width, 1))
            )
            inputs = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(spec: ArchitectureSpec, seed: int = 0) -> nn.Module:
    """A standard ResNet-18 for ``spec`` (channels first)."""
    torch.manual_seed(seed)
    return ResNet18(spec.input_shape[0], spec.num_classes)
