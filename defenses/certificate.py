"""Certificate and budget of an approximate removal (Guo et al. 2020; DESIGN 4.5).

After the Newton step, the gradient residual |grad J'(theta')| on the retained data
measures how far the update is from the retained optimum. For an L2-regularised convex
loss with all parameters updated, Guo et al. bound the residual (eps') and mask it with
Gaussian noise of scale s = c * eps' / eps, c = sqrt(2 ln(1.5 / delta)), which gives
(eps, delta)-certified removal. For non-convex models or partial selections the same
numbers are a diagnostic, not a proof, and the certificate says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .selection import ParameterSelection


def noise_constant(delta: float) -> float:
    """c = sqrt(2 ln(1.5 / delta))."""
    if not 0 < delta < 1:
        raise ValueError("delta must lie in (0, 1)")
    return math.sqrt(2.0 * math.log(1.5 / delta))


def noise_scale(residual_bound: float, epsilon: float, delta: float) -> float:
    """Standard deviation s = c * eps' / eps of the Gaussian noise, eps' the residual bound."""
    if epsilon <= 0:
        raise ValueError("epsilon must be positive")
    return noise_constant(delta) * residual_bound / epsilon


def add_certified_noise(
    model: nn.Module, selection: ParameterSelection, scale: float, seed: int
) -> torch.Tensor:
    """Add N(0, scale^2) to the selected parameters with a seeded generator; return the noise ``(p,)``."""
    generator = torch.Generator().manual_seed(seed)
    first = next(model.parameters())
    noise = (
        torch.randn(selection.num_parameters, generator=generator, dtype=torch.float64).to(
            first.dtype
        )
        * scale
    )
    selection.scatter_add_(model, noise)
    return noise


@dataclass(frozen=True)
class BudgetLedger:
    """Cumulative gradient residual of a model's approximate removals against its budget."""

    budget: float
    used: float = 0.0
    removals: int = 0

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget - self.used)

    @property
    def exhausted(self) -> bool:
        return self.used > self.budget

    def spend(self, residual: float) -> BudgetLedger:
        return replace(self, used=self.used + residual, removals=self.removals + 1)

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "used": self.used, "removals": self.removals}

    @classmethod
    def from_dict(cls, data: dict[str, Any], default_budget: float) -> BudgetLedger:
        return cls(
            float(data.get("budget", default_budget)),
            float(data.get("used", 0.0)),
            int(data.get("removals", 0)),
        )


@dataclass(frozen=True)
class Certificate:
    residual_norm_selected: float
    residual_norm_all: float
    noise_scale: float
    budget_total: float
    budget_used: float
    budget_remaining: float
    budget_exhausted: bool
    convex: bool
    statement: str


def make_certificate(
    residual_norm_selected: float,
    residual_norm_all: float,
    scale: float,
    ledger: BudgetLedger,
    convex: bool,
) -> Certificate:
    """The receipt's certificate, with a plain statement of what it proves."""
    if convex and scale > 0:
        statement = (
            "Convex L2-regularised model with every parameter updated: the residual bound and the "
            f"Gaussian noise (s = {scale:.3g}) certify the removal in the sense of Guo et al. (2020)."
        )
    elif convex:
        statement = (
            "Convex L2-regularised model with every parameter updated; no noise was added, so the "
            f"residual {residual_norm_all:.3g} measures the remaining gap but certifies nothing."
        )
    else:
        statement = (
            "Non-convex model or partial parameter selection: the residual "
            f"{residual_norm_all:.3g} is a diagnostic, not a proof of removal."
        )
    if ledger.exhausted:
        statement += " The removal budget is spent: request an exact retrain."
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
    )
