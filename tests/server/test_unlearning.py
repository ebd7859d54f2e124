"""The forget computation's parameter choice and Newton iterations (server/unlearning.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.newton import newton_update
from expunge.defenses.recipe import ForgetRecipe
from expunge.defenses.training import TrainConfig, train
from expunge.server.forget.computation import (
    SilentReporter,
    choose_parameters,
)

WD = 1e-3


@pytest.fixture(scope="module")
def digits_case() -> dict[str, torch.Tensor | torch.nn.Module]:
    digits = load_digits()
    x = torch.tensor(digits.data[:600] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[:600])
    model = build_model(ArchitectureSpec("mlp", (64,), 10, hidden=(16,)), 0)
    train(model, x, y, TrainConfig(epochs=8, weight_decay=WD, polish_iterations=50, seed=0))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    return {
        "model": model,
        "fx": x[order[:30]],
        "fy": y[order[:30]],
        "rx": x[order[30:]],
        "ry": y[order[30:]],
    }


def _choose(case: dict, iterations: int) -> dict[str, list[int]]:
    recipe = ForgetRecipe(newton_iterations=iterations, hessian_samples=570)
    chosen = choose_parameters(
        case["model"],
        recipe,
        case["fx"],
        case["fy"],
        case["rx"],
        case["ry"],
        WD,
        SilentReporter(),
    ).selection
    return {name: idx.tolist() for name, idx in chosen.indices.items()}


def test_the_ranking_step_does_not_follow_the_update_iterations(digits_case) -> None:
    # A ranking direction converged as far as the update (8 iterations) picked entries
    # that ended further from the retrained model; the ranking keeps its own count.
    assert ForgetRecipe().ranking_newton_iterations == 3
    assert _choose(digits_case, 1) == _choose(digits_case, 8) == _choose(digits_case, 3)


def test_more_newton_iterations_converge_the_restricted_problem(digits_case) -> None:
    c = digits_case
    recipe = ForgetRecipe(hessian_samples=570)
    config = recipe.newton_config()
    selection = choose_parameters(
        c["model"], recipe, c["fx"], c["fy"], c["rx"], c["ry"], WD, SilentReporter()
    ).selection
    zero = torch.zeros(selection.num_parameters)
    results = {}
    for iterations in (1, recipe.newton_iterations):
        results[iterations] = newton_update(
            c["model"],
            selection,
            c["fx"],
            c["fy"],
            c["rx"],
            c["ry"],
            WD,
            replace(config, iterations=iterations),
            zero,
        )
    one, default = results[1], results[recipe.newton_iterations]
    assert one.accepted and default.accepted and default.iterations > 1
    # The same first step, then further down the modelled retained objective.
    assert default.objective_before == one.objective_before
    assert default.objective_after < one.objective_after < one.objective_before
    assert default.step_norm > one.step_norm


def test_the_ranking_samples_its_own_hessian(digits_case) -> None:
    # The large-data profile builds the update's Hessian on many samples (cheap,
    # built once) and ranks with Hessian-vector products on few (paid per CG
    # iteration): the selection follows the ranking's count alone.
    c = digits_case
    args = (c["fx"], c["fy"], c["rx"], c["ry"], WD, SilentReporter())

    def chosen(recipe: ForgetRecipe) -> dict[str, list[int]]:
        selection = choose_parameters(c["model"], recipe, *args).selection
        return {name: idx.tolist() for name, idx in selection.indices.items()}

    # The budget exactly (no growth past it): a selection grown to 99% of the step holds
    # nearly every entry of this MLP whatever the ranking.
    default = chosen(ForgetRecipe(hessian_samples=570, step_coverage=0.0))
    assert (
        chosen(ForgetRecipe(hessian_samples=64, ranking_hessian_samples=570, step_coverage=0.0))
        == default
    )
    assert (
        chosen(ForgetRecipe(hessian_samples=570, ranking_hessian_samples=64, step_coverage=0.0))
        != default
    )


@pytest.mark.parametrize("selection", ["lcodec_cg", "cg"])
def test_binary_classifiers_are_ranked_in_the_softmax_gauge(selection: str) -> None:
    # Two classes: the raw step is +d / -d on the two rows of the logits layer; ranked
    # raw, the budget went to both copies of each feature. The server ranks in the gauge.
    raw = load_breast_cancer()
    x = torch.tensor((raw.data - raw.data.mean(0)) / raw.data.std(0), dtype=torch.float32)
    y = torch.tensor(raw.target)
    model = build_model(ArchitectureSpec("logreg", (30,), 2), 0)
    train(model, x, y, TrainConfig(epochs=10, weight_decay=WD, polish_iterations=100, seed=0))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    forget, keep = order[:28], order[28:]
    chosen = choose_parameters(
        model,
        ForgetRecipe(
            selection=selection, parameter_budget=15, hessian_samples=2000, step_coverage=0.0
        ),
        x[forget],
        y[forget],
        x[keep],
        y[keep],
        WD,
        SilentReporter(),
    )
    # cg ranks every parameter; the L-CODEC pool of a logistic regression grows to both
    # of its units (each row carries half of the step's mass in the gauge).
    assert chosen.candidates == 62
    assert chosen.selection.num_parameters == 15
    features = (
        chosen.selection.indices.get("1.weight", torch.empty(0, dtype=torch.long)) % 30
    ).tolist()
    assert len(features) >= 10
    assert len(set(features)) == len(features)
