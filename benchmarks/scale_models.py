"""Architectures the scale benchmark trains outside Expunge and serves as trusted factories.

The server builds them from its configuration (``trusted_factories``: name ->
``benchmarks.scale_models:<function>``), never from anything a caller sends.
"""

from __future__ import annotations

import torch
from torch import nn

from expunge.defenses.architectures import ArchitectureSpec


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
