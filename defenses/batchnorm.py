"""Batch-norm running statistics recomputed from data (after training and after a forget).

Running statistics are an exponential average over the training batches, so after a
forget they still carry the forgotten samples. Recomputing them as the cumulative
average over the retained data (momentum ``None``) removes that, and makes the
statistics a function of the data and the weights alone: the eval-mode objective the
Newton step and the L-BFGS polish optimise is then the full-batch limit of the
train-mode objective SGD optimised (DESIGN 4.4).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["has_batchnorm", "recompute_batchnorm_statistics"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _NORMS) for m in model.modules())


def recompute_batchnorm_statistics(
    model: nn.Module, inputs: torch.Tensor, batch_size: int = 512
) -> bool:
    """Reset every batch norm's running statistics to their average over ``inputs``.

    inputs ``(n, *shape)``. Each batch's statistics enter with weight 1/batches (the
    cumulative average, equal batch sizes but the last); the model's modes and momenta are
    restored. Returns whether the model had any batch norm. Parameters are not changed.
    """
    norms = [m for m in model.modules() if isinstance(m, _NORMS)]
    if not norms or len(inputs) == 0:
        return bool(norms)
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                model(inputs[start : start + batch_size])
    finally:
        for module, training in modes:
            module.training = training
        for norm, momentum in momenta:
            norm.momentum = momentum
    return True
