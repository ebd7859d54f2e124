"""Forget settings that scale with the data: the standard profile, or the large-data one.

The standard profile evaluates J' on every retained sample and takes up to eight damped
Newton steps with an exact Hessian on 2,000 samples: right for thousands of samples, but
its passes over the retained data grow with n (a CIFAR-shaped CNN's default forget ran for
over 14 minutes). The large-data profile evaluates J' on 512 retained samples, builds a
Gauss-Newton Hessian on 256, and takes one Newton step and one short ranking iteration; it
was chosen on the development expensive case (60k-sample CNN; BENCHMARKS.md, forget),
where every count tried left the removal within the retrain-vs-retrain noise.

``auto`` (the default) takes the large-data profile when the retained set is large
(``LARGE_DATA_MIN_SAMPLES``: J' on 512 samples is then at most 5% of it; below that the
subsample would save little and cost accuracy) and the path the request will take,
priced with the standard profile by the same cost model as the ``auto`` path policy,
would miss either bound: ``target_s``, or the policy's share of the exact retrain's
estimate (an approximate update that is not ten times faster than retraining does not pay
for itself). The choice depends only on the model, the data size and the recorded
training time, so the same request on the same version always gets the same profile (and
the same bytes). What a request asks for explicitly (Newton iterations, a Hessian other
than the default) is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from expunge.server.forget.policy import (
    RETRAIN_OVERHEAD_S,
    CostEstimates,
    PolicySettings,
    TrainingCost,
    choose_path,
    estimate_costs,
)

if TYPE_CHECKING:
    from torch import nn

    from expunge.defenses.recipe import ForgetRecipe

PROFILES = ("auto", "standard", "large_data")
# The large-data profile (chosen on the development expensive case; module docstring).
LARGE_DATA = {
    "hessian_samples": 256,
    "objective_samples": 512,
    "ranking_hessian_samples": 256,
    "ranking_cg_iterations": 5,
    "ranking_newton_iterations": 1,
}
LARGE_DATA_NEWTON_ITERATIONS = 1
LARGE_DATA_MIN_SAMPLES = 20 * LARGE_DATA["objective_samples"]
LARGE_DATA_HESSIAN = "gauss_newton"


@dataclass(frozen=True)
class ProfileChoice:
    profile: str  # standard or large_data
    reason: str

    def receipt(self) -> dict[str, Any]:
        return {"profile": self.profile, "profile_reason": self.reason}


def large_data(recipe: ForgetRecipe, newton_iterations: int, hessian: str) -> ForgetRecipe:
    """``recipe`` with the large-data counts; a request's own Newton iterations and
    non-default Hessian (``newton_iterations`` > 0, ``hessian`` != "exact") are kept."""
    return replace(
        recipe,
        hessian_samples=LARGE_DATA["hessian_samples"],
        objective_samples=LARGE_DATA["objective_samples"],
        ranking_hessian_samples=LARGE_DATA["ranking_hessian_samples"],
        ranking_cg_iterations=LARGE_DATA["ranking_cg_iterations"],
        ranking_newton_iterations=LARGE_DATA["ranking_newton_iterations"],
        newton_iterations=newton_iterations or LARGE_DATA_NEWTON_ITERATIONS,
        hessian=LARGE_DATA_HESSIAN if hessian == "exact" else hessian,
    )


def _approximate_estimate(path: str, estimates: CostEstimates) -> float:
    return estimates.newton_all_s if path == "all" else estimates.targeted_s


def choose_profile(
    setting: str,
    target_s: float,
    model: nn.Module,
    recipe: ForgetRecipe,
    requested_newton_iterations: int,
    requested_hessian: str,
    retained: int,
    evaluated: int,
    cost: TrainingCost,
    epochs: int,
    policy: PolicySettings,
    retrainable: bool = True,
) -> tuple[ForgetRecipe, ProfileChoice]:
    """The recipe to run and why (module docstring); ``setting``: one of ``PROFILES``."""
    if setting not in PROFILES:
        raise ValueError(f"forget_profile must be one of {PROFILES}")
    large = large_data(recipe, requested_newton_iterations, requested_hessian)
    if setting == "standard":
        return recipe, ProfileChoice("standard", "set by the server (forget_profile)")
    if setting == "large_data":
        return large, ProfileChoice("large_data", "set by the server (forget_profile)")
    if recipe.selection == "retrain":
        return recipe, ProfileChoice("standard", "an exact retrain uses no profile")
    unit_s = cost.unit_s(epochs)
    retrain_s = cost.retrain_estimate_s(retained, epochs) if retrainable else math.inf
    estimates = estimate_costs(model, recipe, retained, evaluated, unit_s, retrain_s)
    path = recipe.selection
    if path == "auto":
        if retrain_s + RETRAIN_OVERHEAD_S <= policy.retrain_below_s:
            return recipe, ProfileChoice("standard", "auto takes the exact retrain")
        # The approximate path auto weighs against the retrain: with the profile chosen
        # here it may become the cheaper one (a CIFAR-shaped CNN's targeted update was
        # priced at 362 s with the standard counts, so auto retrained for 136 s).
        path = choose_path("auto", estimates, policy, retrainable=False).path
    seconds = _approximate_estimate(path, estimates)
    if retained < LARGE_DATA_MIN_SAMPLES:
        return recipe, ProfileChoice(
            "standard",
            f"{retained} retained samples, fewer than the {LARGE_DATA_MIN_SAMPLES} the "
            "large-data profile subsamples",
        )
    bound = min(target_s, policy.approximate_time_share * retrain_s)
    within = f"{path} with the standard profile is estimated at {seconds:.3g} s"
    limits = (
        f"the smaller of the {target_s:g} s target and {policy.approximate_time_share:g} of "
        "the retrain's estimate"
        if math.isfinite(retrain_s)
        else f"the {target_s:g} s target (no exact retrain to compare with)"
    )
    if seconds <= bound:
        return recipe, ProfileChoice("standard", f"{within}, within {limits}")
    return large, ProfileChoice(
        "large_data",
        f"{within}, beyond {limits} ({bound:.3g} s): J' on "
        f"{LARGE_DATA['objective_samples']} retained samples, a Gauss-Newton Hessian on "
        f"{LARGE_DATA['hessian_samples']}, one Newton step",
    )
