"""The Gauss-Newton step solved in the sample space, when the data has fewer rows than the
model has parameters.

A Gauss-Newton H on n samples of C outputs is F^T F + lambda I with F of r <= n C rows
(``RetainedObjective.gauss_newton_factor``). When r is well below p, Woodbury's identity

    (F^T F + d I)^{-1} g = (g - F^T (F F^T + d I)^{-1} F g) / d,    d = lambda + mu,

solves each damping mu with an r x r system, and the p x p matrix is never formed. The
correction cancels most of g / d in the directions the data constrains, so the r x r
system must be solved to float64 accuracy: float32's rounding of F F^T would be magnified
by up to |F| / sqrt(d) beyond the dense float32 path's. It is solved by mixed-precision
iterative refinement (LAPACK's dsgesv): F F^T formed and factored in float32, the
residual of each correction computed in float64 from F itself (two r x p products, no
float64 Gram matrix). Where float32 cannot resolve the system (d tiny against |F|^2,
refinement stalls), the float64 Gram matrix is formed and factored instead.
"""

from __future__ import annotations

import math

import torch

from .damping import Curvature, Solver
from .objective import RetainedObjective

__all__ = ["LOW_RANK_SHARE", "factor_rows", "sample_space_solver"]

# The sample space is taken when the factor has fewer rows than this share of the
# parameters: on one thread with three dampings, float64 Gram matrices and factorisations
# of r x r cost as much as the float32 p x p path at r = 0.7 p (p = 2,000: 0.21 s each;
# at r = 0.4 p 0.06 s against 0.22 s). Refinement only makes the sample space cheaper.
LOW_RANK_SHARE = 0.7
# Refinement stops when the float64 residual is this small against the right-hand side
# (float64's own floor is about 1e-16 times the system's condition number).
_REFINED = 1e-10
_MAX_REFINEMENTS = 8


def factor_rows(objective: RetainedObjective, x: torch.Tensor) -> int:
    """The most rows the Gauss-Newton factor of ``x`` can have: samples times outputs."""
    with torch.no_grad():
        outputs = objective.logits(objective.v0, x[:1]).reshape(1, -1).shape[1]
    return len(x) * outputs


class _SampleSpaceSystem:
    """(F F^T + d I) y = b for each d, to float64 accuracy (module docstring)."""

    def __init__(self, f: torch.Tensor) -> None:
        self.narrow = f.float()
        self.wide = f.double()
        self.gram = self.narrow @ self.narrow.T
        self._wide_gram: torch.Tensor | None = None
        self._factors: dict[tuple[str, float], torch.Tensor | None] = {}

    def product(self, y: torch.Tensor, d: float) -> torch.Tensor:
        """(F F^T + d I) y in float64, from F."""
        return self.wide @ (self.wide.T @ y) + d * y

    def solve(self, b: torch.Tensor, d: float) -> torch.Tensor | None:
        """y in float64, or None when F F^T + d I is singular in float64 too."""
        factor = self._factor("float32", d)
        if factor is not None:
            y = torch.zeros_like(b)
            residual = b
            previous = math.inf
            scale = float(b.norm())
            for _ in range(_MAX_REFINEMENTS):
                y = (
                    y
                    + torch.cholesky_solve(residual.float().unsqueeze(1), factor)
                    .squeeze(1)
                    .double()
                )
                residual = b - self.product(y, d)
                size = float(residual.norm())
                if size <= _REFINED * scale:
                    return y
                if size >= 0.5 * previous:  # stalled: float32 cannot resolve this system
                    break
                previous = size
        wide = self._factor("float64", d)
        if wide is None:
            return None
        return torch.cholesky_solve(b.unsqueeze(1), wide).squeeze(1)

    def _factor(self, precision: str, d: float) -> torch.Tensor | None:
        key = (precision, d)
        if key not in self._factors:
            if precision == "float32":
                matrix = self.gram
            else:
                if self._wide_gram is None:
                    self._wide_gram = self.wide @ self.wide.T
                matrix = self._wide_gram
            shifted = matrix + d * torch.eye(len(matrix), dtype=matrix.dtype, device=matrix.device)
            factor, info = torch.linalg.cholesky_ex(shifted)
            self._factors[key] = factor if int(info) == 0 else None
        return self._factors[key]


def sample_space_solver(
    f: torch.Tensor, weight_decay: float
) -> tuple[Solver, Curvature, float, float]:
    """(solve, curvature, smallest eigenvalue, scale) of H = F^T F + ``weight_decay`` I, as
    the dense Gauss-Newton solver's (``solvers``), through the r x r system.

    d = 0 (no weight decay, no damping) leaves H singular (rank r < p): None, so
    Levenberg-Marquardt raises mu, as the dense factorisation's failure would.
    """
    system = _SampleSpaceSystem(f)

    def solve(gradient: torch.Tensor, mu: float) -> torch.Tensor | None:
        d = weight_decay + mu
        if d <= 0:
            return None
        g = gradient.double()
        inner = system.solve(system.wide @ g, d)
        if inner is None:
            return None
        return (-(g - system.wide.T @ inner) / d).to(gradient.dtype)

    def curvature(step: torch.Tensor) -> float:
        s = step.double()
        return float((system.wide @ s).square().sum() + weight_decay * s.square().sum())

    diagonal = f.square().sum(dim=0) + weight_decay
    return solve, curvature, math.nan, float(diagonal.abs().max())
