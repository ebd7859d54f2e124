"""A loss a test server trusts (``trusted_factories``): squared error on the logits."""

from __future__ import annotations

import torch

from expunge.defenses.task import AutogradTask


class SquaredLogits(AutogradTask):
    name = "squared_logits"
    convex_in_logits = True

    def sample_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # No one_hot: it branches on the data, which per-sample gradients (vmap) refuse.
        classes = torch.arange(logits.shape[1], device=logits.device)
        target = (classes == labels.unsqueeze(1)).to(logits.dtype)
        return 0.5 * ((logits - target) ** 2).sum(dim=1)


def squared_logits() -> SquaredLogits:
    return SquaredLogits()


def not_a_task() -> object:
    return object()
