"""Certificate: the constants, the seeded noise, the ledger, and what the statement claims."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
from sklearn.datasets import load_wine
from sklearn.preprocessing import StandardScaler

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.certificate import (
    BudgetLedger,
    add_certified_noise,
    budget_for_noise,
    certified_noise,
    make_certificate,
    noise_constant,
    noise_scale,
    noisy_step,
    parameter_distance_bound,
)
from expunge.defenses.newton import NewtonConfig, newton_update
from expunge.defenses.selection import ParameterSelection
from expunge.defenses.training import TrainConfig, objective, train

PROTO_CERTIFICATE_FIELDS = {
    "residual_norm_selected",
    "residual_norm_all",
    "noise_scale",
    "budget_total",
    "budget_used",
    "budget_remaining",
    "budget_exhausted",
    "convex",
    "statement",
}


def test_noise_constant_is_sqrt_two_log_three_halves_over_delta() -> None:
    # delta = 1.5 e^{-k^2/2} gives c = k exactly.
    for k in (1.0, 2.0, 4.0):
        assert noise_constant(1.5 * math.exp(-(k**2) / 2)) == pytest.approx(k, rel=1e-12)
    assert noise_constant(1e-5) == pytest.approx(math.sqrt(2 * math.log(1.5e5)), rel=1e-15)
    for bad in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(ValueError, match="delta"):
            noise_constant(bad)


def test_noise_scale_and_budget_are_inverse() -> None:
    delta = 1.5 * math.exp(-2.0)  # c = 2
    assert noise_scale(0.3, epsilon=0.5, delta=delta) == pytest.approx(2 * 0.3 / 0.5)
    s = noise_scale(0.07, epsilon=0.1, delta=1e-4)
    assert budget_for_noise(s, epsilon=0.1, delta=1e-4) == pytest.approx(0.07, rel=1e-12)
    assert parameter_distance_bound(2e-6, weight_decay=1e-3) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="epsilon"):
        noise_scale(0.1, epsilon=0.0, delta=0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        parameter_distance_bound(0.1, weight_decay=0.0)


def test_noise_is_seeded_and_has_the_requested_scale() -> None:
    a = certified_noise(200_000, 0.3, seed=5)
    assert torch.equal(a, certified_noise(200_000, 0.3, seed=5))
    assert not torch.equal(a, certified_noise(200_000, 0.3, seed=6))
    assert float(a.std()) == pytest.approx(0.3, rel=0.01) and abs(float(a.mean())) < 0.005
    # Same draw whatever the dtype it is delivered in.
    single = certified_noise(200_000, 0.3, seed=5, dtype=torch.float32)
    assert single.dtype == torch.float32 and torch.allclose(single.double(), a, atol=1e-6)
    assert torch.equal(certified_noise(10, 0.0, seed=1), torch.zeros(10, dtype=torch.float64))
    step = torch.arange(5, dtype=torch.float64)
    assert torch.equal(noisy_step(step, 0.2, seed=3), step + certified_noise(5, 0.2, seed=3))


def test_add_certified_noise_touches_only_the_selection() -> None:
    model = build_model(ArchitectureSpec("mlp", (4,), 3, hidden=(5,)), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    selection = ParameterSelection({"1.bias": torch.tensor([0, 4]), "3.weight": torch.tensor([7])})
    noise = add_certified_noise(model, selection, 0.5, seed=11)
    assert torch.equal(noise, certified_noise(3, 0.5, seed=11, dtype=torch.float32))
    after = model.state_dict()
    assert torch.equal(after["1.bias"][[0, 4]], before["1.bias"][[0, 4]] + noise[:2])
    assert torch.equal(
        after["3.weight"].reshape(-1)[7], before["3.weight"].reshape(-1)[7] + noise[2]
    )
    changed = sum(int((after[k] != before[k]).sum()) for k in before)
    assert changed == 3


def test_ledger_arithmetic_and_exhaustion() -> None:
    fresh = BudgetLedger(budget=1.0)
    one = fresh.spend(0.3).spend(0.4)
    assert fresh.used == 0.0 and fresh.removals == 0, "spend returns a new ledger"
    assert one.used == pytest.approx(0.7) and one.removals == 2
    assert one.remaining == pytest.approx(0.3) and not one.exhausted
    assert not BudgetLedger(1.0, used=1.0).exhausted, "exactly at the budget is still covered"
    over = one.spend(0.5)
    assert over.exhausted and over.remaining == 0.0 and over.used == pytest.approx(1.2)
    assert BudgetLedger(1.0).spend(float("nan")).exhausted, "an unknown residual spends it all"
    assert over.reset() == BudgetLedger(1.0)
    assert BudgetLedger.from_dict(over.to_dict(), default_budget=9.0) == over
    assert BudgetLedger.from_dict({}, default_budget=2.5) == BudgetLedger(2.5)
    with pytest.raises(ValueError, match="residual"):
        fresh.spend(-0.1)
    with pytest.raises(ValueError):
        BudgetLedger(budget=-1.0)


def _statement(convex: bool, **kwargs: object) -> tuple[str, bool]:
    ledger = BudgetLedger(1.0).spend(0.2)
    cert = make_certificate(0.01, 0.02, kwargs.pop("scale", 0.0), ledger, convex, **kwargs)  # type: ignore[arg-type]
    return cert.statement, cert.proof


def test_statement_says_proof_only_when_every_premise_holds() -> None:
    text, proof = _statement(convex=False)
    assert proof is False and "diagnostic" in text and "not convex" in text
    text, proof = _statement(convex=True, full_retained_set=False)
    assert proof is False and "diagnostic" in text and "subsample" in text
    text, proof = _statement(convex=True, weight_decay=0.0)
    assert proof is False and "diagnostic" in text and "L2" in text
    text, proof = _statement(convex=True, weight_decay=1e-2)
    assert proof is True and "proof" in text and "diagnostic" not in text
    assert "not an (epsilon, delta) certificate" in text and "<= 2)" in text  # 0.02 / 1e-2
    text, proof = _statement(convex=True, scale=0.5)
    assert proof is True and "certified" in text and "0.5" in text


def test_certificate_copies_the_ledger_and_flags_exhaustion() -> None:
    spent = BudgetLedger(0.1).spend(0.25)
    cert = make_certificate(0.2, 0.25, 0.0, spent, convex=False)
    assert cert.budget_exhausted and cert.exhausted and "retrain" in cert.statement
    assert (cert.budget_total, cert.budget_used, cert.budget_remaining) == (0.1, 0.25, 0.0)
    convex = make_certificate(0.2, 0.25, 0.3, spent, convex=True)
    assert "retrain" in convex.statement and "certified in the sense" not in convex.statement
    # The receipt converts the certificate to the proto message by field name.
    assert set(asdict(cert)) >= PROTO_CERTIFICATE_FIELDS


def test_residual_over_weight_decay_bounds_the_distance_to_retraining() -> None:
    """The proof of the convex case, checked: |theta' - theta*| <= r / lambda."""
    raw = load_wine()
    x = torch.tensor(StandardScaler().fit_transform(raw.data))
    y = torch.tensor(raw.target)
    wd = 1e-2
    spec = ArchitectureSpec("logreg", (13,), 3)
    config = TrainConfig(epochs=2, batch_size=32, weight_decay=wd, polish_iterations=500)
    keep = torch.arange(20, len(x))

    def fit(xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.nn.Module, float]:
        model = build_model(spec, seed=0).double()
        train(model, xs, ys, config)
        model.zero_grad()
        objective(model, xs, ys, wd).backward()
        residual = float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())
        return model, residual

    model, _ = fit(x, y)
    retrained, retrained_residual = fit(x[keep], y[keep])
    selection = ParameterSelection.everything(model)
    result = newton_update(
        model, selection, x[:20], y[:20], x[keep], y[keep], wd, NewtonConfig(damping=0.0)
    )
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) + result.delta
    star = torch.cat([p.detach().reshape(-1) for p in retrained.parameters()])
    distance = float((theta - star).norm())
    # The polished retrain is itself within retrained_residual / lambda of the optimum.
    bound = parameter_distance_bound(result.residual_norm_all + retrained_residual, wd)
    assert distance <= bound
    assert distance > 0.01 * bound, "and the bound is not vacuous"
    cert = make_certificate(
        result.residual_norm_selected, result.residual_norm_all, 0.0, BudgetLedger(1.0),
        convex=True, weight_decay=wd,
    )  # fmt: skip
    assert cert.proof
