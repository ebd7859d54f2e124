"""Server settings: layering and the checks that fail at start rather than at first use."""

from __future__ import annotations

import pytest

from expunge.server.settings import load_settings


def test_environment_overrides_defaults_and_is_coerced() -> None:
    settings = load_settings(
        env={
            "EXPUNGE_FORGET_RANKING_HESSIAN_SAMPLES": "256",
            "EXPUNGE_FORGET_HESSIAN_SAMPLES": "2048",
        }
    )
    assert settings.forget_ranking_hessian_samples == 256
    assert settings.forget_hessian_samples == 2048
    assert load_settings(env={}).forget_ranking_cg_iterations == 0


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("forget_hessian_samples", 0, "forget_hessian_samples must be >= 1"),
        ("forget_objective_samples", -1, "forget_objective_samples must be >= 0"),
        ("forget_ranking_hessian_samples", -5, "forget_ranking_hessian_samples must be >= 0"),
        ("forget_ranking_cg_iterations", -1, "forget_ranking_cg_iterations must be >= 0"),
        ("forget_newton_iterations", -1, "forget_newton_iterations must be >= 0"),
        (
            "forget_ranking_newton_iterations",
            -2,
            "forget_ranking_newton_iterations must be >= 0",
        ),
    ],
)
def test_bad_forget_sampling_is_refused_at_load(name: str, value: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_settings(env={}, **{name: value})


def test_step_coverage_above_one_is_refused_and_negative_means_the_default() -> None:
    from expunge.defenses.recipe import STEP_COVERAGE
    from expunge.server.forget.computation import UnlearningOptions, recipe_for

    with pytest.raises(ValueError, match="forget_step_coverage must be at most 1"):
        load_settings(env={}, forget_step_coverage=1.5)
    default = load_settings(env={}).forget_step_coverage
    assert recipe_for(UnlearningOptions(), 0, step_coverage=default).step_coverage == STEP_COVERAGE
    assert recipe_for(UnlearningOptions(), 0, step_coverage=0.0).step_coverage == 0.0


def test_unknown_setting_is_named() -> None:
    with pytest.raises(ValueError, match="unknown settings: \\['forget_hessian'\\]"):
        load_settings(env={}, forget_hessian=3)


def test_scan_training_evidence_is_checked_and_reaches_the_scan_key() -> None:
    from expunge.server.scan.settings import ScanSettings

    with pytest.raises(ValueError, match="scan_training_evidence must be"):
        load_settings(env={}, scan_training_evidence="spectrum")
    assert load_settings(env={}).scan_training_evidence == "spectral"
    with pytest.raises(ValueError, match="training_evidence must be one of"):
        ScanSettings(training_evidence="spectrum")
