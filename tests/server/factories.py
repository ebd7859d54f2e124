"""A trusted model factory, named in a test server's configuration."""

from __future__ import annotations

from torch import nn

from expunge.defenses.architectures import ArchitectureSpec


def tiny_linear(spec: ArchitectureSpec, seed: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, spec.num_classes))
