"""Forget settings that scale with the data: the profile is chosen from the cost model."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from expunge.client import Client
from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.server.forget.computation import UnlearningOptions, recipe_for
from expunge.server.forget.policy import PolicySettings, TrainingCost
from expunge.server.forget.profile import LARGE_DATA, choose_profile
from expunge.server.main import start
from expunge.server.settings import Settings, load_settings

MLP = ArchitectureSpec("mlp", (32,), 6, hidden=(64,))


def _choose(
    retained: int,
    selection: str = "all",
    setting: str = "auto",
    newton_iterations: int = 0,
    hessian: str = "exact",
    retrainable: bool = True,
) -> tuple[object, object]:
    options = UnlearningOptions(
        selection=selection, newton_iterations=newton_iterations, hessian=hessian
    )
    recipe = recipe_for(options, seed=0, hessian_samples=2000)
    # A model that trained 60 epochs over 240,000 samples in 65 s (the held-out large case).
    cost = TrainingCost(65.0, 240_000)
    return choose_profile(
        setting, 60.0, build_model(MLP), recipe, newton_iterations, hessian,
        retained, retained + 1_000, cost, 60, PolicySettings(), retrainable,
    )  # fmt: skip


def test_large_data_is_taken_when_the_standard_update_would_exceed_the_target() -> None:
    small, why_small = _choose(2_000)
    assert why_small.profile == "standard" and "fewer than the 10240" in why_small.reason
    assert small.objective_samples == 0 and small.hessian == "exact"
    large, why_large = _choose(216_000)
    # 16.3 s, within 60 s but not a tenth of the 58.5 s retrain.
    assert why_large.profile == "large_data" and "beyond the smaller of" in why_large.reason
    _, unretrainable = _choose(216_000, retrainable=False)
    assert unretrainable.profile == "standard" and "no exact retrain" in unretrainable.reason
    assert large.objective_samples == LARGE_DATA["objective_samples"]
    assert large.hessian_samples == LARGE_DATA["hessian_samples"]
    assert (large.hessian, large.newton_iterations) == ("gauss_newton", 1)
    # What the request asked for explicitly is kept.
    kept, _ = _choose(216_000, newton_iterations=4, hessian="gauss_newton")
    assert kept.newton_iterations == 4
    # The same inputs give the same profile: nothing is timed.
    assert _choose(216_000) == (large, why_large)


def test_an_exact_retrain_uses_no_profile_and_settings_can_fix_one() -> None:
    _, retrain = _choose(216_000, selection="retrain")
    assert retrain.profile == "standard" and "retrain" in retrain.reason
    # auto on a small model retrains; without a training configuration it cannot.
    _, auto = _choose(2_000, selection="auto")
    assert auto.reason == "auto takes the exact retrain"
    # auto where the retrain is beyond its threshold: the profile is chosen for the
    # approximate path auto weighs, so that path may become the cheaper one.
    recipe, large_auto = _choose(216_000, selection="auto")
    assert large_auto.profile == "large_data" and recipe.objective_samples == 512
    _, fixed = _choose(2_000, setting="large_data")
    assert fixed.profile == "large_data" and "forget_profile" in fixed.reason
    _, standard = _choose(216_000, setting="standard")
    assert standard.profile == "standard"
    with pytest.raises(ValueError, match="forget_profile must be"):
        load_settings(env={}, forget_profile="huge")
    with pytest.raises(ValueError, match="forget_auto_target_s"):
        load_settings(env={}, forget_auto_target_s=0)


def test_the_receipt_names_the_profile_and_the_counts_it_used(state_dir: Path) -> None:
    db = sqlite3.connect(state_dir / "expunge.db")
    owners = [r[0] for r in db.execute("SELECT DISTINCT owner_id FROM samples ORDER BY 1 LIMIT 2")]
    db.close()
    for setting, owner in zip(("auto", "large_data"), owners, strict=True):
        running = start(
            Settings(state_dir=state_dir, port=0, build_index=False, forget_profile=setting)
        )
        try:
            with Client(running.target, timeout=600) as client:
                op = client.forget(
                    "digits", owner_ids=[owner], selection="all", wait=True, request_id=setting
                )
                assert op.receipt is not None
                policy, method = op.receipt.policy, op.receipt.method
                if setting == "auto":  # 1,438 samples: the standard profile
                    assert policy.profile == "standard" and "fewer than" in policy.profile_reason
                    assert method.objective_samples == 0 and method.hessian == "exact"
                    continue
                assert policy.profile == "large_data", (policy, op.receipt.note)
                assert "forget_profile" in policy.profile_reason
                assert (method.objective_samples, method.hessian_samples) == (512, 256)
                assert method.hessian == "gauss_newton" and method.newton_iterations == 1
                statement = op.receipt.certificate.statement
                assert "only a diagnostic" in statement and "subsample" in statement
        finally:
            running.stop(0)
