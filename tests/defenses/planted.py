"""A network whose loss depends on known hidden units: ground truth for L-CODEC tests."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn


def planted_network(seed: int, width: int, relevant: Sequence[int]) -> nn.Module:
    """12 -> ``width`` (tanh) -> ``len(relevant)`` network whose logit c reads only hidden
    unit ``relevant[c]``."""
    generator = torch.Generator().manual_seed(seed)
    hidden, out = nn.Linear(12, width), nn.Linear(width, len(relevant))
    with torch.no_grad():
        # Random (correlated) hidden directions: the irrelevant units do carry
        # information about the input, just none about the loss beyond the relevant ones.
        hidden.weight.copy_(torch.randn(width, 12, generator=generator) / 12**0.5)
        hidden.bias.zero_()
        out.weight.zero_()
        out.bias.zero_()
        for c, r in enumerate(relevant):
            out.weight[c, r] = 2.0
    model = nn.Sequential(OrderedDict([("hidden", hidden), ("act", nn.Tanh()), ("out", out)]))
    return model.eval()
