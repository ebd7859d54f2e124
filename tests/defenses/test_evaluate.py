"""Deletion metrics against independent computations (sklearn, torch.nn.functional)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from torch import nn

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.evaluate import (
    DeletionMetrics,
    accuracy,
    auc,
    deletion_metrics,
    deletion_report,
    gap_closed,
    mean_loss,
    membership_auc,
    output_kl,
    parameter_distance,
    per_sample_losses,
    retrain_gap,
)
from expunge.defenses.training import TrainConfig, train
from expunge.defenses.training import accuracy as training_accuracy


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    raw = load_digits()
    x = torch.tensor(raw.data[:600] / 16.0, dtype=torch.float32)
    y = torch.tensor(raw.target[:600])
    model = build_model(ArchitectureSpec("mlp", (64,), 10), seed=0)
    train(model, x[:400], y[:400], TrainConfig(epochs=8, batch_size=32))
    return model, x, y


def _scores(seed: int, n: int, levels: int) -> torch.Tensor:
    # Few distinct levels, so that ties are common.
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (n,), generator=generator).double()


@pytest.mark.parametrize("seed", range(4))
def test_auc_matches_sklearn_with_ties(seed: int) -> None:
    pos, neg = _scores(seed, 37, 6) + 0.5, _scores(seed + 100, 53, 6)
    expected = roc_auc_score([1] * 37 + [0] * 53, torch.cat([pos, neg]).numpy())
    assert auc(pos, neg) == pytest.approx(expected, abs=1e-12)
    continuous = torch.randn(300, generator=torch.Generator().manual_seed(seed)).double()
    labels = (torch.arange(300) % 3 == 0).long()
    expected = roc_auc_score(labels.numpy(), continuous.numpy())
    assert auc(continuous[labels == 1], continuous[labels == 0]) == pytest.approx(
        expected, abs=1e-12
    )


def test_auc_edge_cases() -> None:
    assert auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auc(torch.ones(5), torch.ones(7)) == 0.5
    assert math.isnan(auc(torch.zeros(0), torch.ones(3)))
    with pytest.raises(ValueError, match="NaN"):
        auc(torch.tensor([float("nan")]), torch.ones(3))


def test_membership_auc_scores_minus_loss_with_members_positive() -> None:
    members = torch.tensor([0.01, 0.2, 0.05, 0.9])
    others = torch.tensor([0.5, 1.2, 0.05, 2.0, 0.3])
    expected = roc_auc_score([1] * 4 + [0] * 5, (-torch.cat([members, others])).numpy())
    assert membership_auc(members, others) == pytest.approx(expected, abs=1e-12)
    assert membership_auc(members, others) > 0.5, "low losses look like members"


def test_losses_and_accuracy_match_torch(digits) -> None:
    model, x, y = digits
    with torch.no_grad():
        logits = model(x)
    losses = per_sample_losses(model, x, y, batch_size=64)
    assert torch.allclose(losses, nn.functional.cross_entropy(logits, y, reduction="none"))
    assert mean_loss(model, x, y) == pytest.approx(float(losses.mean()), rel=1e-6)
    assert accuracy(model, x, y) == pytest.approx(training_accuracy(model, x, y))
    # Inputs are cast to the model's dtype.
    wide = copy.deepcopy(model).double()
    assert torch.allclose(per_sample_losses(wide, x, y).float(), losses, atol=1e-5)
    assert per_sample_losses(model, x[:0], y[:0]).numel() == 0
    assert math.isnan(accuracy(model, x[:0], y[:0])) and math.isnan(mean_loss(model, x[:0], y[:0]))


def test_evaluation_leaves_batch_norm_and_mode_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).train()
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(32, dtype=torch.long)
    stats = model[1].running_mean.clone()
    per_sample_losses(model, x, y)
    accuracy(model, x, y)
    assert torch.equal(model[1].running_mean, stats) and model.training and model[1].training


def test_output_kl_is_zero_for_identical_models_and_matches_kl_div(digits) -> None:
    model, x, _ = digits
    twin = copy.deepcopy(model)
    assert output_kl(model, twin, x) == pytest.approx(0.0, abs=1e-12)
    other = build_model(ArchitectureSpec("mlp", (64,), 10), seed=1)
    kl = output_kl(model, other, x, batch_size=100)
    with torch.no_grad():
        log_a = torch.log_softmax(model(x).double(), dim=1)
        log_b = torch.log_softmax(other(x).double(), dim=1)
    expected = nn.functional.kl_div(log_b, log_a, reduction="batchmean", log_target=True)
    assert kl > 0 and kl == pytest.approx(float(expected), rel=1e-10)
    assert output_kl(other, model, x) != pytest.approx(kl), "KL is not symmetric"


def test_parameter_distance_and_gap_closed(digits) -> None:
    model = digits[0]
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved[3].bias.add_(0.1)  # 10 entries
    assert parameter_distance(model, copy.deepcopy(model)) == 0.0
    assert parameter_distance(model, moved) == pytest.approx(math.sqrt(10 * 0.01), rel=1e-5)
    with pytest.raises(ValueError, match="different parameters"):
        parameter_distance(model, build_model(ArchitectureSpec("logreg", (64,), 10)))
    assert gap_closed(0.04, 0.01) == pytest.approx(0.75)
    assert gap_closed(0.04, 0.0) == 1.0 and gap_closed(0.04, 0.08) == pytest.approx(-1.0)
    assert math.isnan(gap_closed(0.0, 0.01))


def test_deletion_report_gathers_consistent_metrics(digits) -> None:
    model, x, y = digits
    forget, retained, test = slice(0, 40), slice(40, 400), slice(400, 600)
    after = copy.deepcopy(model)
    with torch.no_grad():
        after[3].weight.mul_(0.5)
    report = deletion_report(
        model, after, x[forget], y[forget], x[retained], y[retained], x[test], y[test]
    )
    assert report.before == deletion_metrics(
        model, x[forget], y[forget], x[retained], y[retained], x[test], y[test]
    )
    b = report.before
    assert b.forget_accuracy == pytest.approx(accuracy(model, x[forget], y[forget]))
    assert b.test_loss == pytest.approx(mean_loss(model, x[test], y[test]), rel=1e-6)
    forget_losses = per_sample_losses(model, x[forget], y[forget])
    test_losses = per_sample_losses(model, x[test], y[test])
    assert b.mia_auc == pytest.approx(membership_auc(forget_losses, test_losses))
    assert b.mia_auc > 0.5, "trained-on samples have lower loss than unseen ones"
    assert report.after.forget_loss != b.forget_loss
    assert report.forget_loss_change == pytest.approx(report.after.forget_loss - b.forget_loss)
    assert set(report.to_dict()["after"]) == {f for f in DeletionMetrics.__dataclass_fields__}


def test_retrain_gap_of_a_perfect_update(digits) -> None:
    model, x, y = digits
    retrained = build_model(ArchitectureSpec("mlp", (64,), 10), seed=0)
    train(retrained, x[40:400], y[40:400], TrainConfig(epochs=8, batch_size=32))
    gap = retrain_gap(model, copy.deepcopy(retrained), retrained, x[:40], y[:40], x[400:], y[400:])
    assert gap.kl_original_to_retrained > 0 and gap.kl_updated_to_retrained == pytest.approx(
        0.0, abs=1e-12
    )
    assert gap.gap_closed == pytest.approx(1.0) and gap.parameter_distance_updated == 0.0
    assert gap.forget_accuracy_gap == 0.0 and gap.test_accuracy_gap == 0.0
    assert gap.parameter_distance_original == pytest.approx(parameter_distance(model, retrained))
