"""Targeted Newton update on a parameter selection (DESIGN 4.4).

Training objective J(theta) = (1/n) sum_i l(z_i; theta) + (lambda/2) |theta|^2, with
l the cross-entropy and lambda the training weight decay. Removing the forget set F
(m samples) leaves the retained objective J', the same expression averaged over the
n - m retained samples (never 1/(n - 1)). On the selected slice S:

    theta_S <- theta_S + delta,    (|H_S| + mu I) delta = -grad_S J'(theta)

- grad_S J' is computed exactly on the retained data, so the term left by a training
  run that did not converge is included; a cached full-data gradient may stand in for
  the pass over the retained data (``retained_gradient_from_full``).
- H_S is the Hessian of J' restricted to S (exact second derivatives or Gauss-Newton)
  on a seeded subsample of the retained data.
- |H_S| is H_S with its eigenvalues replaced by their magnitudes (saddle-free Newton,
  Dauphin et al. 2014): a direction of negative curvature is descended at the scale of
  its own curvature. The former rule lifted the whole spectrum by -min eig H_S, which
  on a non-convex MLP (min eig -0.075) damped every direction of small positive
  curvature, where the forgotten samples' memorisation sits, twentyfold (BENCHMARKS.md,
  forget). A convex H_S is unchanged (|H_S| = H_S). A Gauss-Newton H_S is PSD already.
- mu starts at ``damping``: the spectrum is floored at ``damping`` above zero, not
  "just enough for Cholesky" (DESIGN 4.4 measured an exploding step with a floor of 1e-6
  on a digits MLP). Levenberg-Marquardt then multiplies mu by 10 while the step leaves
  the trust region or J' does not fall, and divides it by 10 after an accepted step.

Nothing here modifies the model: every function returns the step; ``apply_update``
writes it. The parameters outside S are held fixed. Deletions are sequential by
construction: the caller passes the data retained *now*, so n is decremented each time.

Modules: ``config`` (``NewtonConfig``, ``NewtonResult``), ``objective`` (J and J', their
gradients, Hessian and Hessian-vector products on a selection), ``damping``
(Levenberg-Marquardt, trust region and acceptance), ``sample_space`` (a Gauss-Newton
H_S = F^T F + lambda I solved through F's r x r Gram matrix when r is well below the
selection's size), ``solvers`` (direct damped solve, Newton-CG, block-coordinate Newton,
``apply_update``).
"""

from .config import HESSIAN_MODES, NewtonConfig, NewtonResult
from .objective import (
    _HESSIAN_PASS_FLOATS as _HESSIAN_PASS_FLOATS,
)
from .objective import (
    RetainedObjective,
    objective_gradient,
    retained_gradient_from_full,
)
from .solvers import (
    apply_block_updates,
    apply_update,
    block_coordinate_newton,
    newton_cg_update,
    newton_update,
)

__all__ = [
    "HESSIAN_MODES",
    "NewtonConfig",
    "NewtonResult",
    "RetainedObjective",
    "apply_block_updates",
    "apply_update",
    "block_coordinate_newton",
    "newton_cg_update",
    "newton_update",
    "objective_gradient",
    "retained_gradient_from_full",
]
