"""Certificate and budget of an approximate removal (Guo et al. 2020; DESIGN 4.5).

What is measured. After the Newton step, the gradient residual
r = |grad J'(theta')| of the retained objective J' (mean loss over the retained samples
+ (lambda/2)|theta|^2, as in ``newton``) at the updated parameters, on the selected slice
and on every parameter (``NewtonResult.residual_norm_selected/_all``).

What it proves. When the loss is convex in the parameters (a linear model with
cross-entropy), lambda > 0 and r is taken over every parameter, J' is lambda-strongly
convex and its unique minimiser theta* (the model retraining would give) satisfies

    |theta' - theta*| <= r / lambda                     (``parameter_distance_bound``)

That is a proof, whichever parameters the step changed, provided r was measured on the
whole retained set. For a non-convex model, or a residual taken on a subsample, there is
no such bound: r only says how far theta' is from a stationary point, a diagnostic.

Noise. Guo et al. (Theorem 3) make the removal (epsilon, delta)-certified by Gaussian
noise of standard deviation s = c * eps' / epsilon, c = sqrt(2 ln(1.5 / delta)), where
eps' bounds the distance that the noise must hide. They perturb the training objective
(a term b^T theta), so their eps' bounds the gradient residual of the *summed* loss.
Expunge adds the noise to the parameters instead (DESIGN 4.5), so eps' must bound the
parameter distance to the retrained model: eps' = r / lambda above (the Gaussian
mechanism with sensitivity eps'; c is larger than its sqrt(2 ln(1.25 / delta)), so the
same s is conservative there, for epsilon <= 1). Passing the raw residual r as eps'
under-noises by a factor 1 / lambda.

Budget. Guo et al. fix s once and retrain when the accumulated residual bounds of the
removals since the last retrain exceed the budget eps'_max = s * epsilon / c
(``budget_for_noise``); ``BudgetLedger`` keeps that sum, in the units the noise is
calibrated in (``removal_bound``: r / lambda). Everything here is pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .selection import ParameterSelection

__all__ = [
    "BudgetLedger",
    "Certificate",
    "add_certified_noise",
    "budget_for_noise",
    "certified_noise",
    "make_certificate",
    "noise_constant",
    "noise_scale",
    "noisy_step",
    "parameter_distance_bound",
    "removal_bound",
]


def noise_constant(delta: float) -> float:
    """c = sqrt(2 ln(1.5 / delta)) of Guo et al.'s Theorem 3; delta in (0, 1)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    return math.sqrt(2.0 * math.log(1.5 / delta))


def parameter_distance_bound(residual_norm: float, weight_decay: float) -> float:
    """r / lambda: bound on |theta' - theta*| for a lambda-strongly convex J' (convex case only)."""
    if not weight_decay > 0:
        raise ValueError("the bound needs L2 regularisation: weight_decay > 0")
    if residual_norm < 0:
        raise ValueError("residual_norm must be >= 0")
    return residual_norm / weight_decay


def noise_scale(residual_bound: float, epsilon: float, delta: float) -> float:
    """Standard deviation s = c * eps' / epsilon of the Gaussian noise.

    ``residual_bound`` is eps': for noise on the parameters (``add_certified_noise``),
    a bound on the parameter distance to the retrained model, ``parameter_distance_bound``
    (see the module docstring); for objective perturbation, the summed-loss gradient
    residual.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError("epsilon must be positive and finite")
    if not residual_bound >= 0:
        raise ValueError("residual_bound must be >= 0")
    return noise_constant(delta) * residual_bound / epsilon


def budget_for_noise(scale: float, epsilon: float, delta: float) -> float:
    """The eps' that noise of standard deviation ``scale`` covers: s * epsilon / c."""
    if not (epsilon > 0 and scale >= 0):
        raise ValueError("need epsilon > 0 and scale >= 0")
    return scale * epsilon / noise_constant(delta)


def certified_noise(
    num_parameters: int,
    scale: float,
    seed: int,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """N(0, scale^2 I) of shape ``(num_parameters,)`` from a seeded generator.

    Drawn in float64 on the CPU and then converted, so a seed gives the same noise on
    every device and in every dtype (up to rounding).
    """
    if not scale >= 0:
        raise ValueError("scale must be >= 0")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_parameters, generator=generator, dtype=torch.float64) * scale
    return noise.to(dtype=dtype, device=device)


def noisy_step(delta: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    """``delta`` ``(p,)`` plus seeded N(0, scale^2 I) noise, as a new tensor."""
    return delta + certified_noise(delta.numel(), scale, seed, delta.dtype, delta.device)


def add_certified_noise(
    model: nn.Module, selection: ParameterSelection, scale: float, seed: int
) -> torch.Tensor:
    """Add seeded N(0, scale^2) noise to the selected parameters in place; return it ``(p,)``."""
    first = next(model.parameters())
    noise = certified_noise(selection.num_parameters, scale, seed, first.dtype, first.device)
    selection.scatter_add_(model, noise)
    return noise


@dataclass(frozen=True)
class BudgetLedger:
    """Cumulative residual bounds of a model's removals since its last exact retrain."""

    budget: float = field(
        metadata={"help": "eps'_max: the accumulated removal_bound the noise covers"}
    )
    used: float = field(default=0.0, metadata={"help": "sum of the removals' removal_bound"})
    removals: int = field(default=0, metadata={"help": "removals since the last retrain"})

    def __post_init__(self) -> None:
        if not self.budget >= 0 or not self.used >= 0 or self.removals < 0:
            raise ValueError("budget, used and removals must be >= 0 (and not NaN)")

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget - self.used)

    @property
    def exhausted(self) -> bool:
        """True once the spent residual exceeds the budget: time for an exact retrain."""
        return self.used > self.budget

    def spend(self, residual: float) -> BudgetLedger:
        """A new ledger with one more removal of residual bound ``residual``.

        A NaN residual (a step that diverged) counts as infinite: nothing is known, so
        the budget is spent.
        """
        if residual < 0:
            raise ValueError(f"a residual is a norm, >= 0; got {residual}")
        cost = math.inf if math.isnan(residual) else float(residual)
        return replace(self, used=self.used + cost, removals=self.removals + 1)

    def reset(self) -> BudgetLedger:
        """The ledger after an exact retrain: nothing spent."""
        return replace(self, used=0.0, removals=0)

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "used": self.used, "removals": self.removals}

    @classmethod
    def from_dict(cls, data: dict[str, Any], default_budget: float) -> BudgetLedger:
        """Read a stored ledger; an empty dict is a fresh ledger with ``default_budget``."""
        return cls(
            float(data.get("budget", default_budget)),
            float(data.get("used", 0.0)),
            int(data.get("removals", 0)),
        )


@dataclass(frozen=True)
class Certificate:
    """What a removal's receipt may claim. Field names follow the proto ``Certificate``."""

    residual_norm_selected: float
    residual_norm_all: float
    noise_scale: float
    budget_total: float
    budget_used: float
    budget_remaining: float
    budget_exhausted: bool
    convex: bool
    statement: str
    proof: bool = False  # the bound is a proof (convex, L2, residual on the full retained set)

    @property
    def exhausted(self) -> bool:
        return self.budget_exhausted


def removal_bound(residual_norm: float, weight_decay: float) -> float:
    """eps' of one removal: what the noise is calibrated to and what the ledger spends.

    r / lambda (the distance to the retrained optimum) when lambda > 0; the raw residual
    r when there is no L2 term (then nothing is proved, and r is the only scale known).
    """
    if weight_decay > 0:
        return parameter_distance_bound(residual_norm, weight_decay)
    return residual_norm


def make_certificate(
    residual_norm_selected: float,
    residual_norm_all: float,
    scale: float,
    ledger: BudgetLedger,
    convex: bool,
    *,
    full_retained_set: bool = True,
    weight_decay: float | None = None,
) -> Certificate:
    """The receipt's certificate with a plain statement of what it proves.

    The bound |theta' - theta*| <= r / lambda needs three premises: the loss is convex in
    the parameters (``convex``, e.g. logistic regression), the objective has an L2 term
    (``weight_decay`` > 0; None means the caller vouches for it), and r, the gradient
    residual over every parameter, was measured on the whole retained set
    (``full_retained_set``; a subsample's residual bounds nothing). Which parameters the
    step changed does not matter: strong convexity bounds the distance from any point.
    With all three it is a proof; otherwise a diagnostic. ``ledger`` is the ledger
    *after* this removal was spent, in the units of ``removal_bound``.
    """
    l2 = weight_decay is None or weight_decay > 0
    proof = convex and full_retained_set and l2
    r = residual_norm_all
    if proof:
        bound = (
            f" (|theta' - theta*| <= {r / weight_decay:.3g})" if weight_decay is not None else ""
        )
        statement = (
            "The bound is a proof: the model is convex and L2-regularised and the gradient "
            f"residual {r:.3g} over every parameter, measured on the whole retained set, "
            f"bounds the distance to the model retraining would give{bound}."
        )
        if ledger.exhausted:
            statement += (
                " The removal budget is spent, so the noise no longer covers the accumulated "
                "bound: request an exact retrain."
            )
        elif scale > 0:
            statement += (
                f" With Gaussian noise of scale {scale:.3g} the removal is certified in the "
                f"sense of Guo et al. (2020) ({ledger.remaining:.3g} of the budget "
                f"{ledger.budget:.3g} left)."
            )
        else:
            statement += " No noise was added, so it is not an (epsilon, delta) certificate."
    else:
        reasons = []
        if not convex:
            reasons.append("the model is not convex in its parameters")
        if not full_retained_set:
            reasons.append("the residual was measured on a subsample of the retained data")
        if not l2:
            reasons.append("the objective has no L2 regularisation")
        statement = (
            f"The bound is only a diagnostic, not a proof: {' and '.join(reasons)}, so the "
            f"gradient residual {r:.3g} says how far the update is from a stationary point "
            "of the retained objective, not how far it is from retraining."
        )
        if ledger.exhausted:
            statement += " The removal budget is spent: an exact retrain is advised."
    return Certificate(
        residual_norm_selected=residual_norm_selected,
        residual_norm_all=residual_norm_all,
        noise_scale=scale,
        budget_total=ledger.budget,
        budget_used=ledger.used,
        budget_remaining=ledger.remaining,
        budget_exhausted=ledger.exhausted,
        convex=convex,
        statement=statement,
        proof=proof,
    )
