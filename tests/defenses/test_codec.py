"""CODEC and FOCI against a brute-force oracle, and against what the coefficient means."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from expunge.defenses.codec import FociResult, codec, foci


def _tie_keys(n: int, seed: int) -> list[list[float]]:
    """The nearest-neighbour tie-breaking keys exactly as the codec docstring documents them."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, n), generator=generator, dtype=torch.float64).tolist()


def _oracle_nearest(rows: list[list[float]], keys: list[list[float]]) -> list[int]:
    """O(n^2) nearest other row, squared distance summed coordinate by coordinate in order;
    ties go to the smallest key."""
    n = len(rows)
    nearest = []
    for i in range(n):
        best: tuple[float, float] | None = None
        best_j = -1
        for j in range(n):
            if j == i:
                continue
            dist = 0.0
            for a, b in zip(rows[i], rows[j], strict=True):
                dist += (a - b) * (a - b)
            if best is None or (dist, keys[i][j]) < best:
                best, best_j = (dist, keys[i][j]), j
        nearest.append(best_j)
    return nearest


def _oracle_codec(
    y: list[float], z: list[list[float]], x: list[list[float]] | None, seed: int
) -> float:
    """T(y, z) or T(y, z | x) straight from the definitions, in exact integer arithmetic."""
    n = len(y)
    keys = _tie_keys(n, seed)
    r = [sum(1 for b in y if b <= a) for a in y]
    big_l = [sum(1 for b in y if b >= a) for a in y]
    if x is None:
        m = _oracle_nearest(z, keys)
        num = sum(n * min(r[i], r[m[i]]) - big_l[i] ** 2 for i in range(n))
        den = sum(big_l[i] * (n - big_l[i]) for i in range(n))
    else:
        near = _oracle_nearest(x, keys)
        m = _oracle_nearest([xi + zi for xi, zi in zip(x, z, strict=True)], keys)
        num = sum(min(r[i], r[m[i]]) - min(r[i], r[near[i]]) for i in range(n))
        den = sum(r[i] - min(r[i], r[near[i]]) for i in range(n))
    return num / den if den else math.nan


def _oracle_foci(
    y: list[float], columns: list[list[float]], max_selected: int, seed: int
) -> tuple[list[int], list[float]]:
    """FOCI without its stopping rule: argmax over candidates, conditioning on those chosen."""
    selected: list[int] = []
    scores: list[float] = []
    for _ in range(max_selected):
        best, best_j = -math.inf, -1
        for j in range(len(columns[0])):
            if j in selected:
                continue
            z = [[row[j]] for row in columns]
            x = [[row[k] for k in selected] for row in columns] if selected else None
            value = _oracle_codec(y, z, x, seed)
            if value > best:  # strict: the first index wins among equal scores
                best, best_j = value, j
        selected.append(best_j)
        scores.append(best)
    return selected, scores


def _sample(n: int, d: int, seed: int, ties: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if ties:
        # A coarse integer grid: repeated values and equidistant neighbours galore.
        return torch.randint(0, 3, (n, d), generator=generator).double()
    return torch.randn((n, d), generator=generator, dtype=torch.float64)


def _rows(t: torch.Tensor) -> list[list[float]]:
    return t.reshape(t.shape[0], -1).tolist()


@pytest.mark.parametrize("n", [2, 9, 40])
@pytest.mark.parametrize("y_ties", [False, True])
@pytest.mark.parametrize("z_ties", [False, True])
@pytest.mark.parametrize("dx", [0, 1, 2])
def test_codec_equals_brute_force(n: int, y_ties: bool, z_ties: bool, dx: int) -> None:
    seed = 100 * n + 10 * dx + 2 * y_ties + z_ties
    y = _sample(n, 1, seed, y_ties)[:, 0]
    z = _sample(n, 2, seed + 1, z_ties)
    x = _sample(n, dx, seed + 2, z_ties) if dx else None
    for tie_seed in (0, 7):
        got = codec(y, z, x, seed=tie_seed)
        want = _oracle_codec(y.tolist(), _rows(z), _rows(x) if x is not None else None, tie_seed)
        assert got == want or (math.isnan(got) and math.isnan(want)), (tie_seed, got, want)


def test_codec_accepts_one_dimensional_predictors_and_any_float_dtype() -> None:
    y, z, x = _sample(30, 3, 0, ties=False).T
    assert codec(y, z) == codec(y.float().double(), z.unsqueeze(1))
    assert codec(y, z, x, seed=3) == codec(y, z.unsqueeze(1), x.unsqueeze(1), seed=3)
    assert codec(y.float(), z.float()) == codec(y.float().double(), z.float().double())


def test_seed_only_matters_when_neighbours_tie() -> None:
    y = _sample(60, 1, 1, ties=False)[:, 0]
    continuous = _sample(60, 1, 2, ties=False)
    assert len({codec(y, continuous, seed=s) for s in range(5)}) == 1
    grid = _sample(60, 1, 2, ties=True)
    values = [codec(y, grid, seed=s) for s in range(5)]
    assert len(set(values)) > 1
    assert values == [codec(y, grid, seed=s) for s in range(5)]


def test_codec_is_near_zero_for_independent_variables() -> None:
    y, z1, z2 = _sample(2000, 3, 3, ties=False).T
    assert abs(codec(y, z1)) < 0.06
    assert abs(codec(y, torch.stack([z1, z2], dim=1))) < 0.06


def test_codec_is_near_one_for_noiseless_functions() -> None:
    z = _sample(2000, 2, 4, ties=False)
    assert codec(torch.sin(3 * z[:, 0]), z[:, 0]) > 0.98
    assert codec(z[:, 0] * z[:, 1], z) > 0.93
    # A discrete response: counting ties in the ranks is what lets T reach 1 here.
    assert codec((z[:, 0] > 0).double(), z[:, 0]) > 0.98


def test_conditional_codec_vanishes_when_y_depends_on_x_alone() -> None:
    x, z, noise = _sample(2000, 3, 5, ties=False).T
    y = torch.sin(2 * x) + 0.3 * noise
    assert abs(codec(y, z, x)) < 0.1
    assert codec(y, x, z) > 0.5  # the other way round, x carries everything
    assert codec(x * z, z, x) > 0.9  # noiseless in (x, z): z completes x


def test_codec_is_nan_where_undefined_and_rejects_bad_shapes() -> None:
    z = _sample(10, 1, 6, ties=False)
    assert math.isnan(codec(torch.ones(10), z))
    with pytest.raises(ValueError):
        codec(torch.ones(1), z[:1])
    with pytest.raises(ValueError):
        codec(torch.zeros(10), z[:9])
    with pytest.raises(ValueError):
        codec(torch.zeros(10, 2), z)


@pytest.mark.parametrize("ties", [False, True])
def test_foci_order_equals_brute_force(ties: bool) -> None:
    n, p = 24, 6
    columns = _sample(n, p, 11, ties)
    y = columns[:, 0] + columns[:, 1] * columns[:, 2] + 0.5 * _sample(n, 1, 12, False)[:, 0]
    result = foci(
        y, columns, max_selected=p, seed=3, stop_when_nonpositive=False, standardize=False
    )
    selected, scores = _oracle_foci(y.tolist(), _rows(columns), p, seed=3)
    assert list(result.selected) == selected
    assert list(result.scores) == scores


def test_foci_chunking_does_not_change_the_answer() -> None:
    columns = _sample(50, 9, 13, ties=True)
    y = columns[:, 3] - columns[:, 5] + 0.2 * _sample(50, 1, 14, False)[:, 0]
    runs = [
        foci(y, columns, 9, seed=1, stop_when_nonpositive=False, chunk_size=c) for c in (1, 4, None)
    ]
    assert runs[0] == runs[1] == runs[2]


def test_foci_recovers_the_relevant_variables_and_stops() -> None:
    x = _sample(1000, 10, 15, ties=False)
    noise = _sample(1000, 1, 16, ties=False)[:, 0]
    y = x[:, 0] * x[:, 1] + torch.sin(x[:, 2]) + 0.1 * noise
    result = foci(y, x, max_selected=10)
    assert isinstance(result, FociResult)
    assert sorted(result.selected) == [0, 1, 2]
    assert result.stopped_by_rule and result.kept_by_rule == 3
    assert all(s > 0 for s in result.scores)


def test_running_past_the_rule_extends_the_same_order() -> None:
    x = _sample(300, 8, 17, ties=False)
    y = torch.exp(x[:, 4]) + x[:, 6] + 0.1 * _sample(300, 1, 18, ties=False)[:, 0]
    ruled = foci(y, x, max_selected=8)
    full = foci(y, x, max_selected=8, stop_when_nonpositive=False)
    assert not full.stopped_by_rule and len(full.selected) == 8
    assert sorted(full.selected) == list(range(8))
    assert full.kept_by_rule == ruled.kept_by_rule == len(ruled.selected)
    assert full.selected[: ruled.kept_by_rule] == ruled.selected
    assert full.scores[: ruled.kept_by_rule] == ruled.scores
    assert full.scores[ruled.kept_by_rule] <= 0


def test_foci_standardization_ignores_column_units() -> None:
    columns = _sample(80, 5, 19, ties=False)
    y = columns[:, 1] + columns[:, 3] ** 2
    # Powers of two rescale exactly, so the standardized columns are identical bits.
    scaled = columns * torch.tensor([2.0**k for k in (-6, 0, 9, 3, -2)], dtype=torch.float64)
    plain = foci(y, columns, 5, stop_when_nonpositive=False)
    assert foci(y, scaled, 5, stop_when_nonpositive=False) == plain
    # Without standardization the column with the widest spread dominates the distances.
    assert foci(y, scaled, 5, stop_when_nonpositive=False, standardize=False) != plain


def test_foci_when_nothing_explains_y() -> None:
    generator = np.random.default_rng(20)
    x = torch.tensor(generator.normal(size=(1000, 6)))
    y = torch.tensor(generator.normal(size=1000))
    result = foci(y, x, max_selected=6)
    # Sampling noise can admit a column or two, but only with a T of the order of
    # the estimator's spread (sd about 0.02 here), and the rule still ends the run.
    assert result.stopped_by_rule and len(result.selected) < 6
    assert all(s < 0.08 for s in result.scores)
    assert len(result.selected) == result.kept_by_rule


def test_foci_validates_its_inputs() -> None:
    x = _sample(20, 3, 21, ties=False)
    with pytest.raises(ValueError, match="constant"):
        foci(torch.ones(20), x, 2)
    with pytest.raises(ValueError):
        foci(x[:, 0], x, 4)
    with pytest.raises(ValueError):
        foci(x[:, 0], x[:10], 2)
    assert foci(x[:, 0], x, 0) == FociResult((), (), False, 0)


@pytest.mark.parametrize("neighbours", [1, 2, 5])
@pytest.mark.parametrize("ties", [False, True])
def test_pruned_conditional_steps_equal_brute_force(
    neighbours: int, ties: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Conditional steps searched from each row's few nearest samples under the chosen set
    (most rows then need the whole-row fallback on a tie grid) pick exactly the oracle's."""
    from expunge.defenses import codec as codec_module

    monkeypatch.setattr(codec_module, "_PRUNE_NEIGHBOURS", neighbours)
    n, p = 24, 6
    columns = _sample(n, p, 21 + neighbours, ties)
    y = columns[:, 0] - columns[:, 4] * columns[:, 2] + 0.5 * _sample(n, 1, 22, False)[:, 0]
    result = foci(
        y, columns, max_selected=p, seed=5, stop_when_nonpositive=False, standardize=False
    )
    selected, scores = _oracle_foci(y.tolist(), _rows(columns), p, seed=5)
    assert list(result.selected) == selected
    assert list(result.scores) == scores


@pytest.mark.parametrize("ties", [False, True])
def test_pruned_scores_are_bit_identical_to_whole_rows(
    ties: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At L-CODEC's sizes (hundreds of copies, many units) the pruned search returns the
    very scores the whole-row search does, conditioned on a few chosen columns."""
    from expunge.defenses import codec as codec_module
    from expunge.defenses.codec import codec_scores

    n = 300
    columns = _sample(n, 40, 31, ties)
    y = columns[:, 1] + columns[:, 7] * columns[:, 9] + 0.3 * _sample(n, 1, 32, False)[:, 0]
    given = columns[:, [1, 7]]
    pruned = codec_scores(y, columns, seed=2, given=given)
    monkeypatch.setattr(codec_module, "_PRUNE_NEIGHBOURS", n)  # whole rows
    whole = codec_scores(y, columns, seed=2, given=given)
    assert torch.equal(pruned, whole)
