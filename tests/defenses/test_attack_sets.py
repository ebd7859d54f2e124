"""Attack-set evidence against explicit computations on small cases."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from expunge.defenses.attack_sets import (
    CLUSTER_DIMENSIONS,
    AttackSetMember,
    attack_set,
    class_outlier_z,
    class_shapes,
    cluster_members,
    cluster_space,
    combined_p_values,
    conformal_p_values,
    group_direction_z,
    group_outlier_z,
    random_control,
    shared_proponents,
    top_proponents,
    with_cluster,
)
from expunge.defenses.targets import qn_scale


def test_conformal_p_values_count_the_clean_scores_at_or_above() -> None:
    rng = np.random.default_rng(0)
    clean = rng.normal(size=57).round(1)  # ties on purpose
    scores = np.concatenate([rng.normal(size=20).round(1), clean[:5], [100.0, -100.0]])
    expected = [(1 + sum(c >= s for c in clean)) / (len(clean) + 1) for s in scores]
    np.testing.assert_allclose(conformal_p_values(clean, scores), expected)
    assert conformal_p_values(clean, np.array([100.0]))[0] == 1 / 58


def test_combined_p_values_are_uniform_on_exchangeable_clean_inputs() -> None:
    # Under the null the Fisher statistic's conformal p-value is uniform on average over
    # calibration sets (marginal validity): a share alpha of fresh clean inputs reach
    # p <= alpha. One calibration set alone may be off by its own sampling error
    # (sd ~ sqrt(alpha / n)), so 40 are averaged. Measured: 0.045, 0.197, 0.504.
    rng = np.random.default_rng(1)
    rates: dict[float, list[float]] = {0.05: [], 0.2: [], 0.5: []}
    for _ in range(40):
        clean = [rng.normal(size=100), rng.normal(size=100)]
        fresh = [rng.normal(size=500), rng.normal(size=500)]
        p, clean_p = combined_p_values(clean, fresh)
        for alpha, seen in rates.items():
            seen.append(float(np.mean(p <= alpha)))
    for alpha, seen in rates.items():
        assert abs(np.mean(seen) - alpha) <= 0.015
    assert clean_p.shape == (100,) and (clean_p > 0).all() and (clean_p <= 1).all()
    # Evidence on either side lowers the p-value; on both, more.
    both, _ = combined_p_values(clean, [np.array([4.0]), np.array([4.0])])
    one, _ = combined_p_values(clean, [np.array([4.0]), np.array([0.0])])
    assert both[0] < one[0] < 0.5


def test_the_smallest_p_value_rule_is_calibrated_and_ignores_a_blind_side() -> None:
    rng = np.random.default_rng(2)
    rates: dict[float, list[float]] = {0.05: [], 0.2: []}
    for _ in range(40):
        clean = [rng.normal(size=100), rng.normal(size=100)]
        fresh = [rng.normal(size=500), rng.normal(size=500)]
        p, _ = combined_p_values(clean, fresh, "min")
        for alpha, seen in rates.items():
            seen.append(float(np.mean(p <= alpha)))
    for alpha, seen in rates.items():
        assert abs(np.mean(seen) - alpha) <= 0.015
    # Explicitly: the statistic is -log min(p1, p2), calibrated against the clean inputs'
    # leave-one-out statistics.
    clean = [rng.normal(size=30), rng.normal(size=30)]
    inputs = [np.array([0.5, 3.0, -1.0]), np.array([2.5, -0.2, 0.1])]
    p, clean_p = combined_p_values(clean, inputs, "min")
    loo = [
        np.array([(1 + sum(c[j] >= c[i] for j in range(30) if j != i)) / 30 for i in range(30)])
        for c in clean
    ]
    own = [conformal_p_values(c, x) for c, x in zip(clean, inputs, strict=True)]
    clean_stat = -np.log(np.minimum(*loo))
    stat = -np.log(np.minimum(*own))
    np.testing.assert_allclose(p, conformal_p_values(clean_stat, stat))
    np.testing.assert_allclose(clean_p, conformal_p_values(clean_stat, clean_stat))
    # A strong side keeps its strength beside a blind one: the blind side's value does
    # not matter once the strong side's p-value is the smallest.
    strong = np.array([10.0, 10.0])
    blind = np.array([0.0, -3.0])
    p_min, _ = combined_p_values(clean, [strong, blind], "min")
    assert p_min[0] == p_min[1] == 1 / 31
    with pytest.raises(ValueError, match="combination must be one of"):
        combined_p_values(clean, inputs, "mean")


def test_class_outlier_z_is_the_robust_z_of_the_spectral_score_within_each_class() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0] * 30 + [1] * 30)
    x[:4] += torch.tensor([6.0, 0, 0, 0, 0], dtype=torch.float64)  # a planted group in class 0
    z = class_outlier_z(x, labels)
    for label in (0, 1):
        rows = x[labels == label]
        centred = rows - rows.mean(0)
        v = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        spectral = ((centred @ v) ** 2).numpy()
        expected = (spectral - np.median(spectral)) / qn_scale(spectral)
        np.testing.assert_allclose(z[labels == label].numpy(), expected, rtol=1e-10)
    assert z[:4].min() > z[4:30].max()  # the planted group stands out in its class
    assert group_outlier_z(z, torch.arange(4)) == pytest.approx(float(z[:4].median()))


def test_group_direction_z_against_an_explicit_computation() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(80, 4, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0] * 50 + [1] * 30)
    group = torch.tensor([2, 7, 11, 19])
    rows = x[:50].numpy()
    centre = rows.mean(axis=0)
    covariance = np.cov(rows, rowvar=False)
    covariance += np.eye(4) * 1e-6 * np.trace(covariance) / 4
    direction = np.linalg.solve(covariance, x[group].numpy().mean(axis=0) - centre)
    projected = [float((row - centre) @ direction) for row in rows]
    middle = float(np.median(projected))
    mad = float(np.median([abs(p - middle) for p in projected]))
    group_middle = float(np.median([projected[i] for i in group.tolist()]))
    expected = (group_middle - middle) / (1.4826 * mad)
    assert group_direction_z(x, labels, 0, group) == pytest.approx(expected, rel=1e-8)
    shapes = class_shapes(x, labels)
    assert group_direction_z(x, labels, 0, group, shapes) == group_direction_z(x, labels, 0, group)


def test_a_planted_group_stands_apart_where_the_class_has_two_modes() -> None:
    # A class with two clusters far apart along one axis and a group planted off both
    # along another: the spectral score follows the cluster axis and misses the group;
    # the group's own direction finds it, beyond any same-size group of clean members.
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(400, 8, generator=generator, dtype=torch.float64)
    x[:200, 0] += 6.0
    x[200:, 0] -= 6.0
    labels = torch.zeros(400, dtype=torch.long)
    x[:10, 1] += 4.0  # the planted group (within the first cluster)
    planted = torch.arange(10)
    spectral = class_outlier_z(x, labels)
    assert float(spectral[planted].median()) < 1.0
    planted_z = group_direction_z(x, labels, 0, planted)
    clean_groups = [
        group_direction_z(x, labels, 0, torch.randperm(390, generator=generator)[:10] + 10)
        for _ in range(50)
    ]
    assert planted_z > 3.0 > max(clean_groups)


def test_group_direction_z_is_zero_without_a_direction() -> None:
    x = torch.ones(6, 3, dtype=torch.float64)
    labels = torch.zeros(6, dtype=torch.long)
    assert group_direction_z(x, labels, 0, torch.tensor([0, 1])) == 0.0  # group = class mean
    assert group_direction_z(x, labels, 0, torch.zeros(0, dtype=torch.long)) == 0.0
    assert group_direction_z(x[:1], labels[:1], 0, torch.tensor([0])) == 0.0  # one member


def test_top_proponents_are_the_largest_influences_of_the_label() -> None:
    influences = torch.tensor([5.0, 9.0, 1.0, 7.0, 7.0, 3.0])
    labels = torch.tensor([0, 1, 0, 0, 0, 0])
    assert top_proponents(influences, labels, 0, 3).tolist() == [3, 4, 0]  # ties: training order


def test_random_control_matches_the_label_counts_and_avoids_the_set() -> None:
    labels = torch.tensor([0] * 20 + [1] * 20 + [2] * 5)
    removed = torch.tensor([0, 1, 2, 20, 21])
    control = random_control(labels, removed, seed=3)
    assert sorted(labels[control].tolist()) == [0, 0, 0, 1, 1]
    assert not set(control.tolist()) & set(removed.tolist())
    assert torch.equal(control, random_control(labels, removed, seed=3))  # seeded


def test_the_attack_set_is_the_union_of_proponents_that_stand_out() -> None:
    z_a = torch.tensor([5.0, 0.5, 4.0, 0.0, 0.0])
    z_b = torch.tensor([0.0, 0.0, 6.0, 1.0, 0.2])
    outliers = torch.tensor([0.0, 0.0, 0.0, 5.0, 0.1])
    members = attack_set(
        {10: torch.tensor([0, 2, 1]), 11: torch.tensor([2, 3, 4])},
        {10: z_a, 11: z_b},
        outliers,
        min_z=3.5,
    )
    # 1 and 4 are top proponents but stand out on neither side.
    assert [m.index for m in members] == [2, 0, 3]
    two = members[0]
    assert two.targets == (10, 11) and two.best_rank == 1 and two.influence_z == 6.0
    assert "confirmed input(s) 10, 11" in two.reason()
    assert members[2].class_outlier_z == 5.0  # named for the training side alone
    everyone = attack_set({10: torch.tensor([0, 2, 1])}, {10: z_a}, outliers)
    assert [m.index for m in everyone] == [0, 2, 1]


def test_shared_proponents_are_stouffer_combined_per_predicted_label() -> None:
    gen = torch.Generator().manual_seed(4)
    n = 40
    labels = torch.tensor([0] * 20 + [1] * 20)
    z = {t: torch.randn(n, generator=gen, dtype=torch.float64) for t in (3, 5, 8)}
    for t in (3, 5):
        z[t][7] = 2.5  # leaned on by both class-0 inputs: 5 / sqrt(2) = 3.54
    z[8][30] = 9.0  # the only class-1 input: one input never forms a shared group
    predicted = {3: 0, 5: 0, 8: 1}
    shared = shared_proponents(z, predicted, labels, 3.0)
    # Bonferroni over the 20 samples of class 0 at 5%: z >= 2.81, so min_z = 3 decides.
    assert NormalDist().inv_cdf(1 - 0.05 / 20) < 3.0
    explicit = {
        i: float((z[3][i] + z[5][i]) / np.sqrt(2))
        for i in range(20)
        if float((z[3][i] + z[5][i]) / np.sqrt(2)) >= 3.0
    }
    # With a smaller family error the cut rises above min_z: 5% / 20 -> 0.01% / 20.
    strict_cut = NormalDist().inv_cdf(1 - 1e-4 / 20)
    strict = shared_proponents(z, predicted, labels, 3.0, family_error=1e-4)
    assert set(strict) == {i for i, v in explicit.items() if v >= strict_cut}
    assert 7 not in strict and strict_cut > explicit[7]
    assert set(shared) == set(explicit) and 7 in shared and 30 not in shared
    for i, (combined, targets) in shared.items():
        assert combined == pytest.approx(explicit[i]) and targets == (3, 5)
    # They join the attack set beside the top proponents, with the reason said.
    members = attack_set(
        {3: torch.tensor([1]), 5: torch.tensor([2])}, z, torch.zeros(n), -math.inf, shared
    )
    by_index = {m.index: m for m in members}
    assert set(by_index) == {1, 2} | set(shared)
    joined = by_index[7]
    assert joined.targets == (3, 5) and joined.shared_z == pytest.approx(explicit[7])
    assert joined.best_rank == min(int((z[t] > z[t][7]).sum()) + 1 for t in (3, 5))
    assert "combined influence z" in joined.reason()
    plain = next(i for i in (1, 2) if i not in shared)
    assert math.isnan(by_index[plain].shared_z) and "combined" not in by_index[plain].reason()


def _planted(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two classes of 200 in 6 dimensions; 20 members of class 1 share a shift along
    axis 2 (a trigger), the rest are Gaussian."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(400, 6, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0] * 200 + [1] * 200)
    x[200:220, 2] += 8.0
    return x, labels, torch.arange(200, 220)


def test_cluster_members_against_an_explicit_computation() -> None:
    x, labels, planted = _planted(11)
    named = planted[:8]
    space = cluster_space(x, labels)
    joined = cluster_members([space], labels, named, max_rounds=1)
    rows = x[200:].numpy()
    centre = rows.mean(axis=0)
    covariance = np.cov(rows, rowvar=False)
    covariance += np.eye(6) * 1e-6 * np.trace(covariance) / 6
    direction = np.linalg.solve(covariance, x[named].numpy().mean(axis=0) - centre)
    projected = (rows - centre) @ direction
    others = np.ones(200, dtype=bool)
    others[:8] = False
    middle = np.median(projected[others])
    scale = 1.4826 * np.median(np.abs(projected[others] - middle))
    cut = max(3.0, NormalDist().inv_cdf(1 - 0.05 / 200))
    z = (projected - middle) / scale
    expected = {200 + i: float(z[i]) for i in range(8, 200) if z[i] >= cut}
    assert expected.keys() == joined.keys()
    for row, value in expected.items():
        assert joined[row] == pytest.approx(value, rel=1e-9)


def test_cluster_members_complete_a_planted_group_and_nothing_else() -> None:
    x, labels, planted = _planted(12)
    spaces = [cluster_space(x, labels), cluster_space(x * 3.0 + 1.0, labels)]
    joined = cluster_members(spaces, labels, planted[:6])
    assert set(joined) == set(planted[6:].tolist())  # the rest of the group, no clean member
    # A random group of clean members has no direction to complete: the cut is
    # Bonferroni's over the class at 5%, so about 2 of 40 such groups take anyone.
    generator = torch.Generator().manual_seed(0)
    completed = sum(
        bool(cluster_members(spaces, labels, torch.randperm(180, generator=generator)[:10] + 220))
        for _ in range(40)
    )
    assert completed <= 5


def test_cluster_members_need_every_space_and_enough_named_members() -> None:
    x, labels, planted = _planted(13)
    blind = x.clone()
    blind[200:220, 2] -= 8.0  # in this space the group is not planted
    both = [cluster_space(x, labels), cluster_space(blind, labels)]
    assert cluster_members(both, labels, planted[:6]) == {}
    assert cluster_members([both[0]], labels, planted[:2]) == {}  # below min_group
    assert cluster_members([], labels, planted[:6]) == {}


def test_cluster_space_projects_wide_inputs_deterministically() -> None:
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(30, 3, 16, 16, generator=generator)
    labels = torch.tensor([0, 1] * 15)
    first = cluster_space(images, labels, seed=2)
    assert first.features.shape == (30, CLUSTER_DIMENSIONS)
    assert torch.equal(first.features, cluster_space(images, labels, seed=2).features)
    narrow = cluster_space(images[:, :1, :4, :4], labels)
    assert torch.equal(narrow.features, images[:, :1, :4, :4].reshape(30, -1).double())
    assert set(first.shapes) == {0, 1}


def test_with_cluster_appends_the_joined_samples_with_their_reason() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    outlier_z = torch.arange(6, dtype=torch.float64)
    members = [AttackSetMember(2, (7,), 1, 4.0, 2.0), AttackSetMember(3, (8, 7), 2, 3.5, 3.0)]
    out = with_cluster(members, {5: 4.2, 4: 6.0}, labels, outlier_z)
    assert out[:2] == members
    assert [m.index for m in out[2:]] == [4, 5]  # strongest first
    assert out[2].targets == (7, 8) and out[2].best_rank == 0 and out[2].cluster_z == 6.0
    assert "not a top proponent" in out[2].reason() and "6.00" in out[2].reason()
    assert "top-1 proponent" in members[0].reason()
