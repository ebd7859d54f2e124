"""Damping, the trust region and the acceptance rule of the Newton steps.

mu starts at ``damping`` (the solvers solve (|H_S| + mu I) step = -g); Levenberg-Marquardt
then multiplies it by 10 while the step leaves the trust region or fails the ratio test,
and divides it by 10 (down to where it started) after each accepted step.
``_newton_iterations`` runs the damped steps for any solver of (|H| + mu I) step = -g.

The ratio test is the standard trust-region rule: a step s is accepted when the actual
decrease J(v) - J(v + s) is at least ``ACCEPT_RATIO`` of the decrease the quadratic model
predicts, -(g . s + s^T H s / 2), both in float64. An absolute tolerance on J would accept
anything in float32: a one-sample forget on 23k samples predicts a decrease of 1e-9
against a rounding tolerance of 2e-6, so the reversed step passed it (issue 17).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .config import NewtonConfig
from .objective import RetainedObjective

# (gradient (p,), mu) -> the step solving (|H| + mu I) step = -gradient, or None.
Solver = Callable[[torch.Tensor, float], torch.Tensor | None]
# step (p,) -> step^T H step, the quadratic model's curvature term (H undamped).
Curvature = Callable[[torch.Tensor], float]

# Accept a step when it achieves this share of the predicted decrease (Nocedal & Wright's
# eta in Algorithm 4.1 is in [0, 1/4); 0.1 refuses steps the model badly misjudges).
ACCEPT_RATIO = 0.1


class _Search(NamedTuple):
    step: torch.Tensor  # empty when no damping gave a finite step
    value: float
    damping: float
    tries: int
    accepted: bool


class _Steps(NamedTuple):
    v: torch.Tensor
    before: float
    after: float
    damping: float
    tries: int
    steps: int
    accepted: bool


class _Region(NamedTuple):
    """Where steps are judged: the modelled J' on the retained data, the trust region around v0.

    ``curvature`` gives s^T H s for the ratio test's predicted decrease.

    ``offset`` (or None): grad J'(v0) minus the gradient the step was formed from. When g
    comes from a full-data gradient taken as given (zero for a model assumed converged),
    the step models J~(v) = J'(v) - offset . (v - v0), whose gradient at v0 is that g; the
    iterations and the acceptance test then follow J~ too. Judging them by J' itself would
    chase the non-convergence the first step assumed away: on a CNN trained on 60k
    samples the steps were rejected into heavy damping (BENCHMARKS.md, forget).
    """

    objective: RetainedObjective
    x: torch.Tensor
    y: torch.Tensor
    v0: torch.Tensor
    radius: float
    curvature: Curvature
    offset: torch.Tensor | None

    def value(self, v: torch.Tensor) -> float:
        value = self.objective.value(v, self.x, self.y)
        if self.offset is None:
            return value
        return value - float(self.offset.double() @ (v - self.v0).double())

    def gradient(self, v: torch.Tensor) -> torch.Tensor:
        g = self.objective.gradient(v, self.x, self.y)
        return g if self.offset is None else g - self.offset


def _raise_damping(mu: float, scale: float) -> float:
    # Tenfold, starting from a scale-aware floor when mu is zero (damping=0 allowed).
    return 10.0 * mu if mu > 0 else max(1e-8 * scale, torch.finfo(torch.float64).tiny)


def _damped_search(
    region: _Region,
    solve: Solver,
    gradient: torch.Tensor,
    base: torch.Tensor,
    baseline: float,
    mu: float,
    increases: int,
    scale: float,
) -> _Search:
    """Levenberg-Marquardt from ``base``: raise mu until the step stays in the region and J' falls."""
    last: torch.Tensor | None = None
    tries = 0
    for attempt in range(increases + 1):
        if attempt:
            mu = _raise_damping(mu, scale)
        tries += 1
        step = solve(gradient, mu)
        if step is None or not bool(torch.isfinite(step).all()):
            continue
        last = step
        if float((base + step - region.v0).norm()) > region.radius:
            continue
        value = region.value(base + step)
        if _passes_ratio_test(baseline - value, _predicted_decrease(region, gradient, step)):
            return _Search(step, value, mu, tries, True)
    return _Search(last if last is not None else torch.empty(0), math.nan, mu, tries, False)


def _predicted_decrease(region: _Region, gradient: torch.Tensor, step: torch.Tensor) -> float:
    """-(g . s + s^T H s / 2) of the quadratic model, in float64."""
    linear = float(gradient.double() @ step.double())
    return -(linear + 0.5 * region.curvature(step))


def _passes_ratio_test(actual: float, predicted: float) -> bool:
    """The trust-region rule; a zero step (nothing to remove, converged) is accepted as is."""
    if predicted <= 0.0:
        return actual >= 0.0 and predicted == 0.0
    return actual >= ACCEPT_RATIO * predicted


def _shrunk(step: torch.Tensor, radius: float) -> torch.Tensor:
    norm = float(step.norm())
    return step if norm <= radius else step * (radius / norm)


def _newton_iterations(
    objective: RetainedObjective,
    gradient: torch.Tensor,
    solve: Solver,
    mu: float,
    scale: float,
    rx: torch.Tensor,
    ry: torch.Tensor,
    config: NewtonConfig,
    curvature: Curvature,
    offset: torch.Tensor | None = None,
) -> _Steps:
    """Damped Newton steps from v0 with LM on each; the first step's verdict is ``accepted``.

    ``offset``: see ``_Region``; ``before``/``after`` are values of the objective judged.
    """
    v0 = objective.v0
    before = objective.value(v0, rx, ry)
    region = _Region(
        objective,
        rx,
        ry,
        v0,
        radius=config.trust_radius * max(float(v0.norm()), 1.0),
        curvature=curvature,
        offset=offset,
    )
    v, current, tries, steps, accepted = v0, before, 0, 0, False
    g = gradient
    floor = used = mu
    for k in range(config.iterations):
        if k:
            g = region.gradient(v)
        search = _damped_search(
            region, solve, g, v, current, mu, config.max_damping_increases, scale
        )
        tries += search.tries
        used = search.damping
        if search.accepted:
            v, current, steps = v + search.step, search.value, steps + 1
            accepted = accepted or k == 0
            # Levenberg-Marquardt lowers mu again after a success: one rejection would
            # otherwise damp every later iteration (a breast-cancer MLP ended at 10x the
            # floor, 4x further from the retrain after 8 Gauss-Newton iterations).
            mu = max(floor, used / 10.0)
            continue
        if k == 0 and search.step.numel():
            # Never skip silently: hand back the most damped step, inside the region,
            # flagged as not accepted.
            v = v0 + _shrunk(search.step, region.radius)
            current = region.value(v)
        break
    # The damping reported is that of the last step tried (accepted or not).
    return _Steps(v, before, current, used, tries, steps, accepted)


def _modelled_offset(
    objective: RetainedObjective,
    g: torch.Tensor,
    rx: torch.Tensor,
    ry: torch.Tensor,
    full_gradient: torch.Tensor | None,
) -> torch.Tensor | None:
    """grad J'(v0) - g when g came from a given full gradient (see ``_Region``), else None."""
    if full_gradient is None:
        return None
    return (objective.gradient(objective.v0, rx, ry) - g).detach()
