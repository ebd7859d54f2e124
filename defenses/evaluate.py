"""Verifying a deletion (DESIGN 4.6): losses, accuracy, membership inference, gap to retraining.

Doing nothing already keeps test accuracy within a point, so accuracy alone cannot
judge a deletion. The figures that show forgetting are the forget set's loss and the
membership-inference AUC (forgotten vs held-out samples) before and after, and, where a
model retrained without the forget set exists, the output KL to it: ``gap_closed`` is
the share of the original model's KL that the update removed.

Models are evaluated in eval mode (their mode flags are restored afterwards) without
gradients; inputs are cast to each model's parameter dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

from .batching import samples_per_pass
from .gradients import sample_loss

__all__ = [
    "DeletionMetrics",
    "DeletionReport",
    "RetrainGap",
    "SetMeasurement",
    "accuracy",
    "auc",
    "deletion_metrics",
    "deletion_report",
    "gap_closed",
    "inference",
    "losses_and_hits",
    "mean_loss",
    "measure_set",
    "membership_auc",
    "output_kl",
    "parameter_distance",
    "per_sample_losses",
    "retrain_gap",
]


@contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; the modules' modes are restored after."""
    # Eval mode so batch norm neither uses batch statistics nor updates its buffers.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _logits(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Outputs ``(n, C)`` of ``model`` on ``inputs`` ``(n, *shape)``, in batches of at most
    ``batch_size`` and at most ``batching.PASS_BYTES`` of activations."""
    reference = next(model.parameters())
    x = inputs.to(reference.device)
    if x.is_floating_point():
        x = x.to(reference.dtype)
    with inference(model):
        size = samples_per_pass(model, x, batch_size, reference.element_size()) if len(x) else 1
        parts = [model(x[i : i + size]) for i in range(0, len(x), size)]
    if not parts:
        raise ValueError("need at least one input")
    return torch.cat(parts)


def per_sample_losses(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024
) -> torch.Tensor:
    """The training loss of each sample: ``(n, *shape)``, ``(n,)`` -> ``(n,)``; empty in, empty out."""
    if len(inputs) == 0:
        return torch.zeros(0, dtype=next(model.parameters()).dtype)
    logits = _logits(model, inputs, batch_size)
    return sample_loss(model, logits, labels.to(device=logits.device, dtype=torch.long))


def losses_and_hits(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batched pass: each sample's training loss ``(n,)`` and whether the arg-max
    prediction is its label ``(n,)`` bool; empty in, empty out."""
    if len(inputs) == 0:
        empty = torch.zeros(0, dtype=next(model.parameters()).dtype)
        return empty, empty.bool()
    logits = _logits(model, inputs, batch_size)
    targets = labels.to(device=logits.device, dtype=torch.long)
    return sample_loss(model, logits, targets), logits.argmax(dim=1) == targets


def mean_loss(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024
) -> float:
    """Mean cross-entropy over the samples (NaN when there are none)."""
    losses = per_sample_losses(model, inputs, labels, batch_size)
    return float(losses.double().mean()) if losses.numel() else float("nan")


def accuracy(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024
) -> float:
    """Share of samples whose arg-max prediction equals the label (NaN when there are none)."""
    if len(inputs) == 0:
        return float("nan")
    predicted = _logits(model, inputs, batch_size).argmax(dim=1)
    return float((predicted == labels.to(predicted.device)).double().mean())


def auc(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> float:
    """Exact ROC AUC ``P(s+ > s-) + P(s+ = s-)/2`` via average ranks (Mann-Whitney U).

    Scores ``(n_pos,)`` and ``(n_neg,)``; NaN when a side is empty. NaN scores are an
    error (a NaN loss would otherwise rank arbitrarily).
    """
    n_pos, n_neg = positive_scores.numel(), negative_scores.numel()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Each side to the CPU first: one may come from a model on a GPU, the other be kept.
    scores = torch.cat([positive_scores.reshape(-1).cpu(), negative_scores.reshape(-1).cpu()])
    scores = scores.double()
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")
    sorted_scores, order = torch.sort(scores, stable=True)
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    # Tied scores share the average of the 1-based ranks they span.
    last_rank = counts.cumsum(0).double()
    average = last_rank - (counts.double() - 1.0) / 2.0
    ranks = torch.empty_like(scores)
    ranks[order] = torch.repeat_interleave(average, counts)
    u = float(ranks[:n_pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def membership_auc(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> float:
    """Loss-threshold membership inference: AUC of the score -loss with members positive.

    Members are the forgotten samples, non-members held-out ones; 0.5 means an attacker
    thresholding the loss cannot tell them apart, above 0.5 that the model still fits
    the forgotten samples better than unseen ones.
    """
    return auc(-member_losses, -nonmember_losses)


def output_kl(
    model_a: nn.Module, model_b: nn.Module, inputs: torch.Tensor, batch_size: int = 1024
) -> float:
    """Mean over ``inputs`` ``(n, *shape)`` of KL(p_a || p_b) between the softmax outputs."""
    log_a = torch.log_softmax(_logits(model_a, inputs, batch_size).double(), dim=1)
    log_b = torch.log_softmax(_logits(model_b, inputs, batch_size).double(), dim=1).to(log_a)
    return float((log_a.exp() * (log_a - log_b)).sum(dim=1).mean())


def parameter_distance(model_a: nn.Module, model_b: nn.Module) -> float:
    """Euclidean distance between two models' parameter vectors (same names and shapes)."""
    a, b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    if list(a) != list(b):
        raise ValueError("the models have different parameters")
    with torch.no_grad():
        total = sum(
            (float(((a[n].double() - b[n].double().to(a[n].device)) ** 2).sum()) for n in a),
            0.0,
        )
    return total**0.5


def gap_closed(kl_original_to_retrained: float, kl_updated_to_retrained: float) -> float:
    """1 - updated / original: the share of the original model's KL to retraining removed.

    1 is a perfect match to the retrained model, 0 no progress, < 0 worse than before;
    NaN when the original already matched (nothing to close).
    """
    if not kl_original_to_retrained > 0:
        return float("nan")
    return 1.0 - kl_updated_to_retrained / kl_original_to_retrained


@dataclass(frozen=True)
class DeletionMetrics:
    """One model measured on the forget, retained and test sets (proto ``DeletionMetrics``+)."""

    forget_loss: float
    forget_accuracy: float
    retained_loss: float
    retained_accuracy: float
    test_loss: float
    test_accuracy: float
    mia_auc: float  # forget (members) vs test (non-members), loss threshold

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class SetMeasurement(NamedTuple):
    """One model on one set: per-sample losses ``(k,)`` and accuracy (NaN when empty)."""

    losses: torch.Tensor
    accuracy: float


def measure_set(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024
) -> SetMeasurement:
    """``model``'s losses and accuracy on ``inputs`` ``(k, *shape)``, ``labels`` ``(k,)``."""
    if len(inputs) == 0:
        return SetMeasurement(torch.zeros(0), float("nan"))
    logits = _logits(model, inputs, batch_size)
    labels = labels.to(device=logits.device, dtype=torch.long)
    correct = float((logits.argmax(dim=1) == labels).double().mean())
    return SetMeasurement(sample_loss(model, logits, labels), correct)


def deletion_metrics(
    model: nn.Module,
    forget_inputs: torch.Tensor,
    forget_labels: torch.Tensor,
    retained_inputs: torch.Tensor,
    retained_labels: torch.Tensor,
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    batch_size: int = 1024,
    test_measured: SetMeasurement | None = None,
) -> DeletionMetrics:
    """Measure ``model``; inputs ``(k, *shape)`` with labels ``(k,)`` for each set.

    ``test_measured``: the model's test measurement when already known (the test set is the
    largest of the three; a served version's is kept), else measured here."""
    forget_losses, forget_acc = measure_set(model, forget_inputs, forget_labels, batch_size)
    retained_losses, retained_acc = measure_set(model, retained_inputs, retained_labels, batch_size)
    test_losses, test_acc = test_measured or measure_set(
        model, test_inputs, test_labels, batch_size
    )

    def mean(t: torch.Tensor) -> float:
        return float(t.double().mean()) if t.numel() else float("nan")

    return DeletionMetrics(
        forget_loss=mean(forget_losses),
        forget_accuracy=forget_acc,
        retained_loss=mean(retained_losses),
        retained_accuracy=retained_acc,
        test_loss=mean(test_losses),
        test_accuracy=test_acc,
        mia_auc=membership_auc(forget_losses, test_losses),
    )


@dataclass(frozen=True)
class DeletionReport:
    """The same measurements before and after a deletion."""

    before: DeletionMetrics
    after: DeletionMetrics

    @property
    def forget_loss_change(self) -> float:
        return self.after.forget_loss - self.before.forget_loss

    @property
    def test_accuracy_change(self) -> float:
        return self.after.test_accuracy - self.before.test_accuracy

    @property
    def mia_auc_change(self) -> float:
        return self.after.mia_auc - self.before.mia_auc

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {"before": self.before.to_dict(), "after": self.after.to_dict()}


def deletion_report(
    model_before: nn.Module,
    model_after: nn.Module,
    forget_inputs: torch.Tensor,
    forget_labels: torch.Tensor,
    retained_inputs: torch.Tensor,
    retained_labels: torch.Tensor,
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    batch_size: int = 1024,
) -> DeletionReport:
    """Measure both models on the same sets (shapes as in ``deletion_metrics``)."""
    sets = (
        forget_inputs,
        forget_labels,
        retained_inputs,
        retained_labels,
        test_inputs,
        test_labels,
    )
    return DeletionReport(
        before=deletion_metrics(model_before, *sets, batch_size=batch_size),
        after=deletion_metrics(model_after, *sets, batch_size=batch_size),
    )


@dataclass(frozen=True)
class RetrainGap:
    """How close an updated model came to one retrained without the forget set."""

    kl_original_to_retrained: float  # mean forget-set KL(original || retrained)
    kl_updated_to_retrained: float  # mean forget-set KL(updated || retrained)
    gap_closed: float
    parameter_distance_original: float
    parameter_distance_updated: float
    forget_accuracy_gap: float  # updated - retrained
    test_accuracy_gap: float  # updated - retrained

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def retrain_gap(
    original: nn.Module,
    updated: nn.Module,
    retrained: nn.Module,
    forget_inputs: torch.Tensor,
    forget_labels: torch.Tensor,
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    batch_size: int = 1024,
) -> RetrainGap:
    """Compare original and updated models with the retrained one on the forget set.

    forget ``(m, *shape)``/``(m,)``, test ``(t, *shape)``/``(t,)``. The parameter
    distances only mean something when the retrained model started from the same
    initialisation (non-convex models have many equivalent optima).
    """
    kl_original = output_kl(original, retrained, forget_inputs, batch_size)
    kl_updated = output_kl(updated, retrained, forget_inputs, batch_size)
    return RetrainGap(
        kl_original_to_retrained=kl_original,
        kl_updated_to_retrained=kl_updated,
        gap_closed=gap_closed(kl_original, kl_updated),
        parameter_distance_original=parameter_distance(original, retrained),
        parameter_distance_updated=parameter_distance(updated, retrained),
        forget_accuracy_gap=accuracy(updated, forget_inputs, forget_labels, batch_size)
        - accuracy(retrained, forget_inputs, forget_labels, batch_size),
        test_accuracy_gap=accuracy(updated, test_inputs, test_labels, batch_size)
        - accuracy(retrained, test_inputs, test_labels, batch_size),
    )
