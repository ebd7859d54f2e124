"""Verifying a deletion (DESIGN 4.6): losses, accuracy, membership inference, output KL."""

from __future__ import annotations

import torch
from torch import nn

from .gradients import sample_loss


def per_sample_losses(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch: int = 1024
) -> torch.Tensor:
    """Cross-entropy of each sample ``(n,)``."""
    with torch.no_grad():
        parts = [
            sample_loss(model(inputs[i : i + batch]), labels[i : i + batch])
            for i in range(0, len(inputs), batch)
        ]
    return torch.cat(parts) if parts else torch.zeros(0)


def auc(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> float:
    """Area under the ROC curve by ranks (ties count one half); NaN if a side is empty."""
    if positive_scores.numel() == 0 or negative_scores.numel() == 0:
        return float("nan")
    scores = torch.cat([positive_scores, negative_scores]).double()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    sorted_scores = scores[order]
    # Average ranks over ties.
    unique, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2
    ranks[order] = average[inverse]
    n_pos = positive_scores.numel()
    n_neg = negative_scores.numel()
    rank_sum = float(ranks[:n_pos].sum())
    del unique
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def membership_auc(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> float:
    """Loss-threshold membership inference: AUC of score = -loss, members positive.

    0.5 means the attacker cannot tell the forgotten samples from held-out ones.
    """
    return auc(-member_losses, -nonmember_losses)


def output_kl(model_a: nn.Module, model_b: nn.Module, inputs: torch.Tensor) -> float:
    """Mean KL(p_a || p_b) of the softmax outputs over ``inputs``."""
    with torch.no_grad():
        log_a = torch.log_softmax(model_a(inputs).double(), dim=1)
        log_b = torch.log_softmax(model_b(inputs).double(), dim=1)
        return float((log_a.exp() * (log_a - log_b)).sum(dim=1).mean())


def parameter_distance(model_a: nn.Module, model_b: nn.Module) -> float:
    """Euclidean distance between two models' parameter vectors."""
    with torch.no_grad():
        return float(
            torch.sqrt(
                sum(
                    ((a.double() - b.double()) ** 2).sum()
                    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True)
                )
            )
        )


def gap_closed(kl_original_to_retrained: float, kl_updated_to_retrained: float) -> float:
    """Share of the original model's KL to the retrained model that the update removed."""
    if kl_original_to_retrained <= 0:
        return float("nan")
    return 1.0 - kl_updated_to_retrained / kl_original_to_retrained
