"""Selection by the Newton step: exact ranking, pools, and forgetting against retraining."""

from __future__ import annotations

import copy

import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.preprocessing import StandardScaler

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.evaluate import gap_closed, output_kl
from expunge.defenses.lcodec import LcodecConfig, select_markov_blanket
from expunge.defenses.newton import (
    NewtonConfig,
    apply_block_updates,
    apply_update,
    block_coordinate_newton,
    newton_cg_update,
    newton_update,
)
from expunge.defenses.selection import ParameterSelection
from expunge.defenses.sparse_selection import (
    CandidatePool,
    EntryCount,
    candidate_pool,
    select_by_newton_direction,
    softmax_gauge,
    top_entries,
)
from expunge.defenses.training import TrainConfig, train

WD = 1e-3


def _tiny() -> torch.nn.Module:
    return build_model(ArchitectureSpec("mlp", (4,), 3, hidden=(5,)), seed=0)


def _flat_positions(model: torch.nn.Module, selection: ParameterSelection) -> set[int]:
    out, start = set(), 0
    for name, p in model.named_parameters():
        if name in selection.indices:
            out |= {start + int(i) for i in selection.indices[name]}
        start += p.numel()
    return out


def test_top_entries_equal_an_explicit_ranking() -> None:
    model = _tiny()
    total = sum(p.numel() for p in model.parameters())
    scores = torch.randn(total, generator=torch.Generator().manual_seed(3))
    chosen = top_entries(model, scores, 7)
    explicit = sorted(range(total), key=lambda i: -abs(float(scores[i])))[:7]
    assert _flat_positions(model, chosen) == set(explicit)
    assert chosen.num_parameters == 7
    for idx in chosen.indices.values():
        assert torch.equal(idx, idx.sort().values)


def test_ties_go_to_the_lower_index_and_candidates_restrict() -> None:
    model = _tiny()
    total = sum(p.numel() for p in model.parameters())
    assert _flat_positions(model, top_entries(model, torch.ones(total), 3)) == {0, 1, 2}
    first_bias = {"1.bias": torch.arange(5)}
    pool = ParameterSelection(first_bias)
    scores = torch.arange(total, dtype=torch.float64)  # later entries score higher
    chosen = top_entries(model, scores, 2, candidates=pool)
    assert set(chosen.indices) == {"1.bias"}
    assert chosen.indices["1.bias"].tolist() == [3, 4]
    # A budget beyond the pool takes the whole pool.
    assert top_entries(model, scores, 100, candidates=pool).num_parameters == 5
    with pytest.raises(ValueError, match="shape"):
        top_entries(model, scores[:-1], 2)


def test_step_coverage_grows_the_count_to_an_explicit_cumulative_share() -> None:
    model = _tiny()
    total = sum(p.numel() for p in model.parameters())
    scores = torch.randn(total, generator=torch.Generator().manual_seed(5))
    mass = sorted((float(v) ** 2 for v in scores), reverse=True)
    for coverage in (0.5, 0.9, 0.99):
        explicit = next(k for k in range(1, total + 1) if sum(mass[:k]) >= coverage * sum(mass))
        grown = top_entries(model, scores, EntryCount(2, step_coverage=coverage))
        assert grown.num_parameters == max(2, explicit)
        assert _flat_positions(model, top_entries(model, scores, explicit)) == _flat_positions(
            model, grown
        )
    # The budget is a floor, the limit a ceiling on the growth, the pool a ceiling on both.
    assert top_entries(model, scores, EntryCount(30, step_coverage=0.1)).num_parameters == 30
    assert top_entries(model, scores, EntryCount(2, 1.0, limit=9)).num_parameters == 9
    pool = ParameterSelection({"1.bias": torch.arange(5)})
    assert top_entries(model, scores, EntryCount(2, 1.0), candidates=pool).num_parameters == 5
    # Coverage 0 keeps exactly the budget.
    assert top_entries(model, scores, EntryCount(4, 0.0)).num_parameters == 4
    for bad in ({"budget": 0}, {"budget": 1, "step_coverage": 1.5}, {"budget": 1, "limit": -1}):
        with pytest.raises(ValueError):
            EntryCount(**bad)  # type: ignore[arg-type]


def test_units_named_are_those_with_a_chosen_entry() -> None:
    model = _tiny()
    total = sum(p.numel() for p in model.parameters())
    scores = torch.zeros(total)
    slices = {
        "0:0": {"1.weight": torch.arange(0, 4), "1.bias": torch.tensor([0])},
        "0:1": {"1.weight": torch.arange(4, 8), "1.bias": torch.tensor([1])},
    }
    scores[5] = 1.0  # 1.weight entry 5 belongs to unit 0:1
    chosen = top_entries(model, scores, 1, unit_slices=slices)
    assert chosen.units == ("0:1",)


def _apply(model: torch.nn.Module, step: torch.Tensor) -> torch.nn.Module:
    updated = copy.deepcopy(model)
    ParameterSelection.everything(updated).scatter_add_(updated, step)
    return updated


def test_the_softmax_gauge_keeps_every_softmax_and_zeroes_the_median_class() -> None:
    torch.manual_seed(0)
    model = build_model(ArchitectureSpec("mlp", (4,), 5, hidden=(6,)), seed=0).double()
    total = sum(p.numel() for p in model.parameters())
    step = torch.randn(total, dtype=torch.float64)
    gauged = softmax_gauge(model, step, "3")
    x = torch.randn(50, 4, dtype=torch.float64)
    raw_probs = torch.softmax(_apply(model, step)(x), dim=1)
    gauged_probs = torch.softmax(_apply(model, gauged)(x), dim=1)
    assert torch.allclose(raw_probs, gauged_probs, atol=1e-12)
    hidden = 4 * 6 + 6  # the hidden layer's entries come first and are left alone
    assert torch.equal(gauged[:hidden], step[:hidden])
    weight = gauged[hidden : hidden + 5 * 6].view(5, 6)
    bias = gauged[hidden + 5 * 6 :]
    # Five classes: the median class of every input is zero, and it is the median.
    assert ((weight == 0).sum(dim=0) >= 1).all() and (bias == 0).sum() >= 1
    raw_weight = step[hidden : hidden + 5 * 6].view(5, 6)
    assert torch.allclose(weight - raw_weight, (weight - raw_weight)[:1].expand(5, 6))
    with pytest.raises(ValueError, match="not a Linear"):
        softmax_gauge(model, step, "2")


def test_the_pool_grows_in_foci_order_until_it_holds_the_step() -> None:
    digits = load_digits()
    x = torch.tensor(digits.data[:200] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[:200])
    model = build_model(ArchitectureSpec("mlp", (64,), 10, hidden=(16,)), seed=0)
    total = sum(p.numel() for p in model.parameters())
    lcodec = LcodecConfig(parameter_budget=200, always_include_output_layer=False, seed=0)
    blanket = select_markov_blanket(model, x[:20], y[:20], lcodec)
    first = blanket.selection
    assert 0 < first.num_parameters <= 200
    # All the step's mass on one unit outside the first block: the pool takes every
    # ranked unit up to and including it, in FOCI order, and stops there.
    outside = next(u for u in blanket.ranked_units if u not in first.units)
    scores = torch.zeros(total)
    scores[_sorted_flat(model, blanket.unit_map.selection([outside]))] = 1.0
    grown = candidate_pool(model, scores, CandidatePool(blanket, 0.95))
    position = blanket.ranked_units.index(outside)
    expected = list(first.units) + [
        u for u in blanket.ranked_units[: position + 1] if u not in first.units
    ]
    assert grown.units == tuple(expected)
    # Coverage 0 keeps the first block; a step the first block already holds adds nothing.
    assert candidate_pool(model, scores, CandidatePool(blanket, 0.0)).units == first.units
    inside = torch.zeros(total)
    inside[_sorted_flat(model, first)] = 1.0
    assert candidate_pool(model, inside, CandidatePool(blanket, 1.0)).units == first.units
    with pytest.raises(ValueError, match="coverage"):
        CandidatePool(blanket, 1.5)


def _sorted_flat(model: torch.nn.Module, selection: ParameterSelection) -> list[int]:
    return sorted(_flat_positions(model, selection))


@pytest.fixture(scope="module")
def cancer_forget() -> dict[str, object]:
    """Breast-cancer logistic regression at its optimum, a 5% forget set, and its retrain."""
    raw = load_breast_cancer()
    x = torch.tensor(StandardScaler().fit_transform(raw.data))
    y = torch.tensor(raw.target)
    spec = ArchitectureSpec("logreg", (30,), 2)
    config = TrainConfig(epochs=20, batch_size=64, weight_decay=WD, polish_iterations=300, seed=0)
    return _forget_case(spec, config, x, y, forget=28, seed=3)


def test_ranking_in_the_softmax_gauge_spends_no_budget_on_copies(cancer_forget) -> None:
    c = cancer_forget
    model = c["model"]
    config = NewtonConfig(iterations=3)
    args = (model, c["fx"], c["fy"], c["rx"], c["ry"], WD, 15, config)
    raw = select_by_newton_direction(*args, assume_converged=True).selection
    gauged = select_by_newton_direction(*args, logits_layer="1", assume_converged=True)
    weight_raw = raw.indices.get("1.weight", torch.empty(0, dtype=torch.long))
    weight_gauged = gauged.selection.indices.get("1.weight", torch.empty(0, dtype=torch.long))
    features = lambda idx: (idx % 30).tolist()  # noqa: E731 - row-major (2, 30)
    # Two classes: the raw step is +d / -d on the two rows, so the ranking takes features
    # in pairs; in the gauge one row is zero and every chosen feature is a new one.
    assert len(set(features(weight_raw))) < len(features(weight_raw))
    assert len(set(features(weight_gauged))) == len(features(weight_gauged))
    gap_raw, gap_gauged = _gap(c, raw, config), _gap(c, gauged.selection, config)
    assert gap_gauged > gap_raw + 0.1
    assert gap_gauged > 0.7


@pytest.fixture(scope="module")
def digits_forget() -> dict[str, object]:
    """A polished digits MLP, a 5% forget set, and the model retrained without it."""
    digits = load_digits()
    x = torch.tensor(digits.data[:1000] / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target[:1000])
    spec = ArchitectureSpec("mlp", (64,), 10, hidden=(32,))
    config = TrainConfig(epochs=10, batch_size=32, weight_decay=WD, polish_iterations=300, seed=0)
    return _forget_case(spec, config, x, y, forget=50, seed=7)


def _forget_case(
    spec: ArchitectureSpec,
    config: TrainConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    forget: int,
    seed: int,
) -> dict[str, object]:
    """A model trained on everything, a seeded forget set, and the model retrained without it."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    forget_rows, keep = order[:forget], order[forget:]
    original = build_model(spec, 0).double()
    train(original, x, y, config)
    retrained = build_model(spec, 0).double()
    train(retrained, x[keep], y[keep], config)
    return {
        "model": original,
        "retrained": retrained,
        "fx": x[forget_rows],
        "fy": y[forget_rows],
        "rx": x[keep],
        "ry": y[keep],
    }


def _gap(case: dict, selection: ParameterSelection, config: NewtonConfig) -> float:
    model, fx, fy = case["model"], case["fx"], case["fy"]
    zero = torch.zeros(selection.num_parameters, dtype=torch.float64)
    result = newton_update(model, selection, fx, fy, case["rx"], case["ry"], WD, config, zero)
    updated = copy.deepcopy(model)
    apply_update(updated, selection, result)
    before = output_kl(model, case["retrained"], fx)
    return gap_closed(before, output_kl(updated, case["retrained"], fx))


def test_direction_is_the_newton_cg_step_and_the_selection_its_largest_entries(
    digits_forget,
) -> None:
    c = digits_forget
    config = NewtonConfig(iterations=1)
    chosen = select_by_newton_direction(
        c["model"], c["fx"], c["fy"], c["rx"], c["ry"], WD, 600, config, assume_converged=True
    )
    zero = torch.zeros(sum(p.numel() for p in c["model"].parameters()), dtype=torch.float64)
    cg = newton_cg_update(c["model"], c["fx"], c["fy"], c["rx"], c["ry"], WD, config, zero)
    assert torch.equal(chosen.direction.delta, cg.delta)
    expected = set(torch.topk(cg.delta.abs(), 600).indices.tolist())
    assert _flat_positions(c["model"], chosen.selection) == expected


def test_newton_ranked_entries_forget_more_than_lcodec_units_at_the_same_budget(
    digits_forget,
) -> None:
    c = digits_forget
    model = c["model"]
    total = sum(p.numel() for p in model.parameters())
    budget = total // 4
    config = NewtonConfig(iterations=3)
    units = select_markov_blanket(
        model,
        c["fx"],
        c["fy"],
        LcodecConfig(parameter_budget=budget, always_include_output_layer=False, seed=0),
    ).selection
    sparse = select_by_newton_direction(
        model, c["fx"], c["fy"], c["rx"], c["ry"], WD, budget, config, assume_converged=True
    ).selection
    assert sparse.num_parameters == budget >= units.num_parameters
    gap_units, gap_sparse = _gap(c, units, config), _gap(c, sparse, config)
    # Measured on this case: L-CODEC units 0.48, Newton-ranked entries 0.90.
    assert gap_sparse > gap_units + 0.2
    assert gap_sparse > 0.7


def test_successive_lcodec_blocks_forget_more_than_the_first_alone(digits_forget) -> None:
    c = digits_forget
    model = c["model"]
    total = sum(p.numel() for p in model.parameters())
    lcodec = LcodecConfig(parameter_budget=total // 10, always_include_output_layer=False, seed=0)
    blocks = select_markov_blanket(model, c["fx"], c["fy"], lcodec).blocks(3)
    assert len(blocks) == 3
    flat = [_flat_positions(model, b) for b in blocks]
    assert not (flat[0] & flat[1] or flat[0] & flat[2] or flat[1] & flat[2])
    config = NewtonConfig(iterations=3)
    results = block_coordinate_newton(model, blocks, c["fx"], c["fy"], c["rx"], c["ry"], WD, config)
    updated = copy.deepcopy(model)
    apply_block_updates(updated, blocks, results)
    before = output_kl(model, c["retrained"], c["fx"])
    gap_blocks = gap_closed(before, output_kl(updated, c["retrained"], c["fx"]))
    gap_first = _gap(c, blocks[0], config)
    # Measured: the first block (10% of the parameters) 0.19, three blocks 0.50.
    assert gap_blocks > gap_first + 0.1
