"""Q_n, target scores, thresholds and metrics against hand computations and brute force."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from expunge.defenses.targets import (
    QN_CONSISTENCY,
    average_precision,
    calibrate_threshold,
    calibrated_surprise,
    counterfactual_drop,
    decide_target,
    implicated_samples,
    influence_z_scores,
    precision_at_k,
    qn_scale,
    reference_statistics,
    target_score,
)


def _brute_qn_raw(values: np.ndarray) -> float:
    n = len(values)
    h = n // 2 + 1
    k = h * (h - 1) // 2
    distances = sorted(abs(a - b) for a, b in itertools.combinations(values.tolist(), 2))
    return distances[k - 1]


def test_qn_consistency_constant_is_the_normal_quartile_of_pairwise_distances() -> None:
    constant = QN_CONSISTENCY
    assert constant == pytest.approx(2.21914, abs=1e-5)
    # The paper prints 2.2219, 0.12% above the exact constant.
    assert constant == pytest.approx(2.2219, rel=2e-3)


def test_qn_on_hand_computed_examples() -> None:
    # 1..5: distances 1 (x4), 2 (x3), 3 (x2), 4; h = 3, k = 3 -> the 3rd smallest is 1.
    assert qn_scale([1, 2, 3, 4, 5], constant=1.0, finite_sample_correction=False) == 1.0
    assert qn_scale([5, 3, 1, 4, 2]) == pytest.approx(QN_CONSISTENCY * 0.844)
    # 0, 1, 3, 7, 15, 31: distances 1 2 3 4 6 7 8 12 14 15 16 24 28 30 31; h = 4, k = 6 -> 7.
    assert qn_scale([0, 1, 3, 7, 15, 31], constant=1.0, finite_sample_correction=False) == 7.0
    assert qn_scale([0, 1, 3, 7, 15, 31]) == pytest.approx(QN_CONSISTENCY * 0.611 * 7.0)
    # Two values: h = 2, k = 1, the only distance.
    assert qn_scale([3.0, -1.0], constant=1.0, finite_sample_correction=False) == 4.0
    # Large n: the correction is n / (n + 1.4) (odd) or n / (n + 3.8) (even).
    x = np.arange(11, dtype=float)
    assert qn_scale(x) == pytest.approx(QN_CONSISTENCY * 11 / 12.4 * _brute_qn_raw(x))
    x = np.arange(12, dtype=float)
    assert qn_scale(x) == pytest.approx(QN_CONSISTENCY * 12 / 15.8 * _brute_qn_raw(x))


@pytest.mark.parametrize("n", [2, 3, 4, 7, 10, 31, 64, 257])
def test_qn_selection_equals_brute_force_on_small_samples(n: int) -> None:
    generator = np.random.default_rng(n)
    for values in (generator.normal(size=n), generator.integers(0, 4, size=n).astype(float)):
        assert qn_scale(values, constant=1.0, finite_sample_correction=False) == _brute_qn_raw(
            values
        )


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(1).standard_cauchy(1500),  # heavy tails: many selection rounds
        np.random.default_rng(2).integers(0, 6, size=2000).astype(float),  # massive ties
        np.random.default_rng(3).normal(size=1201) * 1e-6 + 1e6,  # large offset, tiny spread
    ],
)
def test_qn_selection_equals_full_partition_beyond_the_gather_size(values: np.ndarray) -> None:
    # Over 65,536 pairs, so the pivot rounds run before the final gather.
    n = len(values)
    h = n // 2 + 1
    k = h * (h - 1) // 2
    i, j = np.triu_indices(n, k=1)
    distances = np.abs(values[i] - values[j])
    want = float(np.partition(distances, k - 1)[k - 1])
    assert qn_scale(values, constant=1.0, finite_sample_correction=False) == want


def test_qn_of_a_large_normal_sample_is_about_its_standard_deviation() -> None:
    values = torch.randn(40_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = time.perf_counter()
    scale = qn_scale(values)
    elapsed = time.perf_counter() - start
    # Q_n's asymptotic efficiency is 82%: its standard error is ~0.6% of sigma here.
    assert scale == pytest.approx(1.0, abs=0.02)
    assert qn_scale(3.0 * values - 7.0) == pytest.approx(3.0 * scale, rel=1e-12)
    assert elapsed < 5.0


def test_qn_refuses_too_few_or_non_finite_values() -> None:
    with pytest.raises(ValueError):
        qn_scale([1.0])
    with pytest.raises(ValueError):
        qn_scale([1.0, math.nan, 2.0])


def _toy() -> tuple[torch.Tensor, torch.Tensor]:
    """60 samples: label 1 holds 0..39 plus three planted outliers; label 0 is far away."""
    influence = torch.cat(
        [
            torch.arange(40, dtype=torch.float64),
            torch.tensor([100.0, 90.0, 80.0]),
            torch.full((17,), 500.0),
        ]
    )
    labels = torch.cat([torch.ones(43, dtype=torch.long), torch.zeros(17, dtype=torch.long)])
    return influence, labels


def test_target_score_uses_the_predicted_label_only() -> None:
    influence, labels = _toy()
    same = influence[:43].numpy()
    median, scale = float(np.median(same)), qn_scale(same)
    result = target_score(influence, labels, predicted_label=1, k=2)
    assert result.kth_influence == 90.0  # 500s belong to label 0 and are ignored
    assert result.median == median and result.scale == scale
    assert result.score == pytest.approx((90.0 - median) / scale)
    # Fewer same-label samples than k: the smallest stands for I_(k).
    assert target_score(influence, labels, 1, k=1000).kth_influence == 0.0


def test_reference_pool_is_a_seeded_subsample() -> None:
    generator = torch.Generator().manual_seed(0)
    influence = torch.randn(5000, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 2, (5000,), generator=generator)
    full = reference_statistics(influence, labels, 1)
    a = reference_statistics(influence, labels, 1, max_pool=500, seed=3)
    b = reference_statistics(influence, labels, 1, max_pool=500, seed=3)
    c = reference_statistics(influence, labels, 1, max_pool=500, seed=4)
    assert a == b and a != c and a != full
    assert a[1] == pytest.approx(full[1], rel=0.2)
    # I_(k) comes from every same-label sample, never from the subsample alone.
    small = target_score(influence, labels, 1, k=1, max_pool=500, seed=3)
    assert small.kth_influence == float(influence[labels == 1].max())


def test_z_scores_and_implicated_samples() -> None:
    influence, labels = _toy()
    median, scale = reference_statistics(influence, labels, 1)
    z = influence_z_scores(influence, labels, 1)
    torch.testing.assert_close(z, (influence - median) / scale)
    implicated = implicated_samples(influence, labels, 1, cutoff=3.0)
    # The planted outliers, in order of z; label-0 samples (z ~ 25) are not implicated.
    assert implicated.indices.tolist() == [40, 41, 42]
    torch.testing.assert_close(implicated.z, z[[40, 41, 42]])
    torch.testing.assert_close(implicated.influence, influence[[40, 41, 42]])
    assert implicated_samples(influence, labels, 1, cutoff=3.0, limit=2).indices.tolist() == [
        40,
        41,
    ]
    assert implicated_samples(influence, labels, 1, cutoff=1e9).indices.numel() == 0


def test_zero_scale_gives_infinite_scores_off_the_median() -> None:
    influence = torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0])
    labels = torch.zeros(5, dtype=torch.long)
    assert target_score(influence, labels, 0, k=1).score == math.inf
    assert target_score(influence, labels, 0, k=2).score == 0.0


def test_calibrate_threshold_is_the_tightest_inclusive_threshold() -> None:
    scores = np.arange(1.0, 101.0)
    assert calibrate_threshold(scores, 0.05) == 96.0  # flags 96..100: exactly 5%
    assert calibrate_threshold(scores, 0.0) == np.nextafter(100.0, np.inf)
    assert calibrate_threshold(scores, 1.0) == 1.0
    # A tie across the boundary cannot be split: flag fewer, never more.
    tied = np.array([1.0, 2.0, 3.0, 3.0])
    assert calibrate_threshold(tied, 0.25) == np.nextafter(3.0, np.inf)
    generator = np.random.default_rng(0)
    for _ in range(50):
        clean = generator.integers(0, 20, size=int(generator.integers(1, 60))).astype(float)
        rate = float(generator.uniform(0, 0.5))
        threshold = calibrate_threshold(torch.from_numpy(clean), rate)
        flagged = int((clean >= threshold).sum())
        assert flagged <= math.floor(rate * len(clean) + 1e-9)
        # Tightest: any lower observed score would flag too many.
        lower = clean[clean < threshold]
        if lower.size:
            assert int((clean >= lower.max()).sum()) > math.floor(rate * len(clean) + 1e-9)
    with pytest.raises(ValueError):
        calibrate_threshold([1.0, math.nan], 0.1)


def test_decision_runs_the_counterfactual_only_past_the_filter() -> None:
    calls: list[int] = []

    def counterfactual() -> float:
        calls.append(1)
        return float(counterfactual_drop(0.9, 0.3))

    low = decide_target(1.0, 2.0, counterfactual, drop_threshold=0.5)
    assert not low.flagged and not low.passed_filter and low.drop is None and not calls
    high = decide_target(2.0, 2.0, counterfactual, drop_threshold=0.5)
    assert high.flagged and high.passed_filter and high.drop == pytest.approx(0.6) and calls == [1]
    weak = decide_target(3.0, 2.0, 0.1, drop_threshold=0.5)
    assert weak.passed_filter and not weak.flagged
    assert not decide_target(math.nan, 2.0, 1.0, 0.5).passed_filter
    torch.testing.assert_close(
        counterfactual_drop(torch.tensor([0.9, 0.5]), torch.tensor([0.2, 0.6])),
        torch.tensor([0.7, -0.1]),
    )


def test_average_precision_equals_sklearn_with_and_without_ties() -> None:
    generator = np.random.default_rng(0)
    for trial in range(30):
        n = int(generator.integers(2, 80))
        labels = generator.random(n) < 0.3
        labels[int(generator.integers(0, n))] = True
        scores = (
            generator.normal(size=n)
            if trial % 2
            else generator.integers(0, 4, size=n).astype(float)
        )
        want = average_precision_score(labels, scores)
        assert average_precision(
            torch.from_numpy(labels), torch.from_numpy(scores)
        ) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError):
        average_precision([False, False], [0.1, 0.2])


def test_precision_at_k() -> None:
    scores = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2])
    relevant = torch.tensor([True, False, False, True, True])
    assert precision_at_k(scores, relevant) == pytest.approx(2 / 3)  # top 3: 0, 2, 3
    assert precision_at_k(scores, relevant, k=1) == 1.0


def test_calibrated_surprise_is_minus_log_of_the_clean_tail_share() -> None:
    rng = np.random.default_rng(0)
    clean = rng.normal(size=200)
    scores = np.array([-10.0, -0.5, 0.0, 0.7, 2.0, 4.0, 50.0])
    tiny = calibrated_surprise(clean, scores[:5], bandwidth=1e-6)
    explicit = np.array([(clean >= s).mean() for s in scores[:5]])
    assert np.allclose(np.exp(-tiny), explicit, atol=1e-9)  # a tiny bandwidth: plain tail share
    smooth = calibrated_surprise(clean, scores)
    assert np.all(np.diff(smooth) > 0)  # strictly increasing, also far past every clean score
    assert np.isfinite(smooth).all() and smooth.min() >= 0
    # Estimators on different scales become comparable: scaling changes nothing.
    assert np.allclose(calibrated_surprise(100 * clean, 100 * scores), smooth)
    with pytest.raises(ValueError):
        calibrated_surprise([], scores)
