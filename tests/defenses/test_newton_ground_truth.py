"""The Newton update against exact retraining, on a convex model and on small networks."""

from __future__ import annotations

import copy

import pytest
import torch
from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.certificate import BudgetLedger, make_certificate, noise_constant, noise_scale
from expunge.defenses.evaluate import membership_auc, output_kl
from expunge.defenses.newton import (
    NewtonConfig,
    apply_update,
    newton_cg_update,
    newton_update,
    retained_gradient_from_full,
)
from expunge.defenses.selection import ParameterSelection
from expunge.defenses.training import TrainConfig, train
from sklearn.datasets import load_breast_cancer, load_digits

WEIGHT_DECAY = 1e-2


def _cancer() -> tuple[torch.Tensor, torch.Tensor]:
    raw = load_breast_cancer()
    x = torch.tensor((raw.data - raw.data.mean(0)) / raw.data.std(0))
    return x, torch.tensor(raw.target)


def _fit_logreg(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    model = build_model(ArchitectureSpec("logreg", (30,), 2), 0).double()
    config = TrainConfig(
        epochs=3, learning_rate=0.1, weight_decay=WEIGHT_DECAY, polish_iterations=500
    )
    train(model, x, y, config)
    return model


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(scope="module")
def convex_case() -> dict[str, object]:
    x, y = _cancer()
    forget = torch.arange(0, len(x), 20)  # 29 samples, 5%
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[forget] = False
    return {
        "x": x,
        "y": y,
        "forget": forget,
        "keep": keep,
        "original": _fit_logreg(x, y),
        "retrained": _fit_logreg(x[keep], y[keep]),
    }


def _relative_error(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    return float((_flat(model) - _flat(reference)).norm() / _flat(reference).norm())


def test_logistic_regression_update_matches_the_retrained_optimum(convex_case: dict) -> None:
    c = convex_case
    x, y, forget, keep = c["x"], c["y"], c["forget"], c["keep"]
    baseline = _relative_error(c["original"], c["retrained"])
    for iterations, tolerance in ((1, 5e-3), (2, 1e-3), (3, 1e-4)):
        model = copy.deepcopy(c["original"])
        selection = ParameterSelection.everything(model)
        config = NewtonConfig(damping=0.0, iterations=iterations, hessian_samples=10_000)
        result = newton_update(
            model, selection, x[forget], y[forget], x[keep], y[keep], WEIGHT_DECAY, config
        )
        apply_update(model, selection, result)
        error = _relative_error(model, c["retrained"])
        assert result.accepted and error <= tolerance, (iterations, error, baseline)
        assert result.objective_after < result.objective_before
    assert baseline > 0.03  # doing nothing is far off


def test_batch_deletion_uses_one_over_n_minus_m(convex_case: dict) -> None:
    """Normalising the retained gradient by n - m reaches the retrained optimum; 1/(n - 1) does not."""
    from expunge.defenses.newton import _SliceObjective

    c = convex_case
    x, y, forget, keep = c["x"], c["y"], c["forget"], c["keep"]
    model = c["original"]
    selection = ParameterSelection.everything(model)
    objective = _SliceObjective(model, selection, WEIGHT_DECAY)
    theta = objective.v0
    n, m = len(x), len(forget)
    full = objective.gradient(theta, x, y, 4096)
    forget_sum = (objective.gradient(theta, x[forget], y[forget], 4096) - WEIGHT_DECAY * theta) * m
    hessian = objective.hessian(theta, x[keep], y[keep], "exact", 4096)
    errors = {}
    for label, denominator_m in (("n - m", m), ("n - 1", 1)):
        g = retained_gradient_from_full(full, forget_sum, theta, n, denominator_m, WEIGHT_DECAY)
        updated = _with(model, selection, theta - torch.linalg.solve(hessian, g))
        errors[label] = _relative_error(updated, c["retrained"])
    assert errors["n - m"] < 5e-3 < errors["n - 1"], errors


def _with(
    model: torch.nn.Module, selection: ParameterSelection, theta: torch.Tensor
) -> torch.nn.Module:
    clone = copy.deepcopy(model)
    current = selection.gather(dict(clone.named_parameters())).detach()
    selection.scatter_add_(clone, theta - current)
    return clone


def test_cached_full_gradient_gives_the_same_step(convex_case: dict) -> None:
    c = convex_case
    x, y, forget, keep = c["x"], c["y"], c["forget"], c["keep"]
    model = c["original"]
    selection = ParameterSelection.everything(model)
    config = NewtonConfig(damping=1e-4, hessian_samples=10_000)
    direct = newton_update(
        model, selection, x[forget], y[forget], x[keep], y[keep], WEIGHT_DECAY, config
    )
    # grad_S J on all n samples, measured once (as a server would cache it per version).
    from expunge.defenses.newton import _SliceObjective

    objective = _SliceObjective(model, selection, WEIGHT_DECAY)
    full_gradient = objective.gradient(objective.v0, x, y, 4096)
    cached = newton_update(
        model,
        selection,
        x[forget],
        y[forget],
        x[keep],
        y[keep],
        WEIGHT_DECAY,
        config,
        full_gradient=full_gradient,
    )
    torch.testing.assert_close(direct.delta, cached.delta, rtol=1e-8, atol=1e-10)
    # And the helper formula itself on a hand-made example.
    g = retained_gradient_from_full(
        torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0]), 10, 2, 0.5
    )
    assert torch.allclose(g, torch.tensor([(10 * (1 - 1.5) - 2) / 8 + 1.5]))


def test_sequential_deletions_match_retraining(convex_case: dict) -> None:
    c = convex_case
    x, y = c["x"], c["y"]
    model = copy.deepcopy(c["original"])
    selection = ParameterSelection.everything(model)
    keep = torch.ones(len(x), dtype=torch.bool)
    for chunk in (torch.arange(0, 300, 30), torch.arange(5, 300, 30)):
        forget_now = torch.zeros(len(x), dtype=torch.bool)
        forget_now[chunk] = True
        retained = keep & ~forget_now
        result = newton_update(
            model,
            selection,
            x[forget_now],
            y[forget_now],
            x[retained],
            y[retained],
            WEIGHT_DECAY,
            NewtonConfig(damping=0.0, iterations=3, hessian_samples=10_000),
        )
        apply_update(model, selection, result)
        keep = retained  # n shrinks with every deletion
    retrained = _fit_logreg(x[keep], y[keep])
    assert _relative_error(model, retrained) < 1e-4


def test_newton_cg_matches_the_exact_step(convex_case: dict) -> None:
    c = convex_case
    x, y, forget, keep = c["x"], c["y"], c["forget"], c["keep"]
    config = NewtonConfig(damping=1e-6, hessian_samples=10_000, cg_iterations=200)
    selection = ParameterSelection.everything(c["original"])
    exact = newton_update(
        c["original"], selection, x[forget], y[forget], x[keep], y[keep], WEIGHT_DECAY, config
    )
    _, cg = newton_cg_update(
        c["original"], x[forget], y[forget], x[keep], y[keep], WEIGHT_DECAY, config
    )
    assert float((exact.delta - cg.delta).norm() / exact.delta.norm()) < 1e-4


def test_gauss_newton_hessian_equals_exact_for_logistic_regression(convex_case: dict) -> None:
    """For a linear model the Gauss-Newton matrix is the exact Hessian of cross-entropy."""
    c = convex_case
    x, y, forget, keep = c["x"], c["y"], c["forget"], c["keep"]
    selection = ParameterSelection.everything(c["original"])
    steps = [
        newton_update(
            c["original"],
            selection,
            x[forget],
            y[forget],
            x[keep],
            y[keep],
            WEIGHT_DECAY,
            NewtonConfig(hessian=mode, damping=0.0, hessian_samples=10_000),
        ).delta
        for mode in ("exact", "gauss_newton")
    ]
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-6, atol=1e-9)


def _digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    raw = load_digits()
    return torch.tensor(raw.data[:n] / 16.0, dtype=torch.float64).reshape(
        -1, 1, 8, 8
    ), torch.tensor(raw.target[:n])


def test_damping_is_raised_when_a_step_would_not_lower_the_objective() -> None:
    """On a tanh MLP far from its optimum the minimal damping overshoots; LM raises it and records it."""
    x, y = _digits(300)
    model = build_model(ArchitectureSpec("mlp", (1, 8, 8), 10, hidden=(16,)), 0).double()
    train(model, x, y, TrainConfig(epochs=2, learning_rate=0.05, weight_decay=1e-3))
    selection = ParameterSelection.everything(model)
    config = NewtonConfig(damping=1e-8, trust_radius=0.05, hessian_samples=300)
    result = newton_update(model, selection, x[:15], y[:15], x[15:], y[15:], 1e-3, config)
    assert result.damping_tries > 1 and result.damping > 1e-8
    assert result.accepted and result.objective_after <= result.objective_before
    assert result.step_norm <= 0.05 * max(
        float(selection.gather(dict(model.named_parameters())).detach().norm()), 1.0
    )
    # The reported smallest eigenvalue is the explicit Hessian's.
    from expunge.defenses.newton import _SliceObjective

    objective = _SliceObjective(model, selection, 1e-3)
    explicit = torch.autograd.functional.hessian(
        lambda v: objective.loss_sum(v, x[15:], y[15:]) / len(x[15:]) + objective.regulariser(v),
        objective.v0,
    )
    assert abs(float(torch.linalg.eigvalsh(explicit)[0]) - result.min_eigenvalue) < 1e-8


@pytest.mark.parametrize("seed", [0, 1])
def test_mlp_update_on_a_selection_moves_towards_retraining(seed: int) -> None:
    x, y = _digits(600)
    spec = ArchitectureSpec("mlp", (1, 8, 8), 10, hidden=(16,))
    config = TrainConfig(
        epochs=20, learning_rate=0.05, weight_decay=1e-3, seed=seed, polish_iterations=200
    )
    original = build_model(spec, seed).double()
    train(original, x, y, config)
    forget = torch.zeros(len(x), dtype=torch.bool)
    forget[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:30]] = True
    retrained = build_model(spec, seed).double()
    train(retrained, x[~forget], y[~forget], config)
    model = copy.deepcopy(original)
    selection = ParameterSelection.everything(model)
    result = newton_update(
        model,
        selection,
        x[forget],
        y[forget],
        x[~forget],
        y[~forget],
        1e-3,
        NewtonConfig(damping=1e-3, hessian_samples=600),
    )
    apply_update(model, selection, result)
    before = output_kl(original, retrained, x[forget])
    after = output_kl(model, retrained, x[forget])
    assert after < before, (before, after)


def test_certificate_noise_and_ledger() -> None:
    assert noise_constant(0.01) == pytest.approx((2 * torch.log(torch.tensor(150.0))).sqrt().item())
    assert noise_scale(0.2, 1.0, 0.01) == pytest.approx(noise_constant(0.01) * 0.2)
    ledger = BudgetLedger(budget=1.0).spend(0.4).spend(0.4)
    assert (
        ledger.used == pytest.approx(0.8)
        and ledger.remaining == pytest.approx(0.2)
        and not ledger.exhausted
    )
    spent = ledger.spend(0.3)
    assert spent.exhausted and spent.removals == 3
    diagnostic = make_certificate(0.1, 0.2, 0.0, spent, convex=False)
    assert "diagnostic" in diagnostic.statement and "retrain" in diagnostic.statement
    proof = make_certificate(0.1, 0.2, 0.5, BudgetLedger(1.0), convex=True)
    assert "certify" in proof.statement and proof.noise_scale == 0.5


def test_membership_auc_matches_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    generator = torch.Generator().manual_seed(0)
    members = torch.rand(50, generator=generator).round(decimals=1)
    others = torch.rand(70, generator=generator).round(decimals=1) + 0.1
    expected = roc_auc_score([1] * 50 + [0] * 70, torch.cat([-members, -others]).numpy())
    assert membership_auc(members, others) == pytest.approx(expected)
