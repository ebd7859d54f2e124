"""The Newton update's settings (``NewtonConfig``) and its outcome (``NewtonResult``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

__all__ = ["HESSIAN_MODES", "NewtonConfig", "NewtonResult"]

HESSIAN_MODES = ("exact", "gauss_newton")


@dataclass(frozen=True)
class NewtonConfig:
    """How to take the step; stored beside the receipt."""

    damping: float = field(
        default=1e-3,
        metadata={
            "help": "floor mu0 of the damped spectrum: (|H| + mu I), mu >= mu0; of the "
            "order of the weight decay (DESIGN 4.4)"
        },
    )
    hessian: str = field(
        default="exact",
        metadata={"help": "exact (second derivatives on the slice) or gauss_newton (PSD)"},
    )
    hessian_samples: int = field(
        default=2000,
        metadata={"help": "retained samples (seeded subsample) for H; all when fewer"},
    )
    hessian_batch: int = field(default=256, metadata={"help": "samples per Hessian pass"})
    trust_radius: float = field(
        default=1.0,
        metadata={
            "help": "largest accepted |theta_S' - theta_S| as a multiple of max(|theta_S|, 1): "
            "relative to the slice's norm, and never below trust_radius in absolute terms so "
            "that a near-zero slice (biases) can still move"
        },
    )
    max_damping_increases: int = field(
        default=8, metadata={"help": "Levenberg-Marquardt retries per step, mu *= 10 each"}
    )
    iterations: int = field(
        default=1,
        metadata={
            "help": "Newton steps: > 1 re-evaluates the gradient and reuses the Hessian "
            "(one step underestimates large coherent removals, DESIGN 4.8)"
        },
    )
    cg_iterations: int = field(
        default=100, metadata={"help": "conjugate-gradient iterations of newton_cg_update"}
    )
    batch_size: int = field(default=1024, metadata={"help": "samples per gradient/loss pass"})
    objective_samples: int = field(
        default=0,
        metadata={
            "help": "> 0: J', its gradient and the residuals on a seeded subsample of this "
            "many retained samples (large data: each full pass costs more than the solve); "
            "0: on all of them"
        },
    )
    seed: int = field(default=0, metadata={"help": "seeds the Hessian subsample"})

    def __post_init__(self) -> None:
        if self.hessian not in HESSIAN_MODES:
            raise ValueError(f"hessian must be one of {HESSIAN_MODES}, got {self.hessian!r}")
        if not (math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError("damping must be finite and >= 0")
        if not (math.isfinite(self.trust_radius) and self.trust_radius > 0):
            raise ValueError("trust_radius must be finite and > 0")
        if self.objective_samples < 0:
            raise ValueError("objective_samples must be >= 0 (0: all retained samples)")
        if min(self.hessian_samples, self.hessian_batch, self.batch_size) < 1:
            raise ValueError("hessian_samples, hessian_batch and batch_size must be >= 1")
        if self.max_damping_increases < 0 or self.iterations < 1 or self.cg_iterations < 1:
            raise ValueError("need max_damping_increases >= 0, iterations >= 1, cg_iterations >= 1")

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class NewtonResult:
    """The step on a selection and how it was taken.

    ``delta`` ``(p,)`` is in the selection's ``gather`` order. Residuals are those of J'
    on the (objective) retained data; the objectives are those the steps were judged by:
    J', or, when g came from a given full gradient, J' less the non-convergence slope
    the step assumed away (``_Region``), which starts at the same value. ``accepted`` is
    False when no damping tried gave a step inside the trust region that lowered it;
    ``delta`` then holds the most damped step tried, shrunk into the trust region, and
    the caller decides.
    """

    delta: torch.Tensor
    damping: float  # mu of the last step taken (or, when rejected, the last tried)
    min_eigenvalue: float  # smallest eigenvalue of H_S before damping (NaN: not computed)
    objective_before: float
    objective_after: float
    step_norm: float
    accepted: bool
    damping_tries: int  # damped solves tried over all iterations (>= 1)
    iterations: int  # Newton steps taken (0 when the first was rejected)
    residual_norm_selected: float  # |grad_S J'| at the updated point
    residual_norm_all: float  # |grad J'| over every parameter at the updated point
    num_parameters: int

    def summary(self) -> dict[str, float | int | bool]:
        """Every field but ``delta``, for a receipt."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "delta"}
