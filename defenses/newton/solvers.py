"""The update entry points: direct damped solve, Newton-CG, block-coordinate Newton.

``newton_update`` solves the damped system on a selection directly: an exact H_S through
one eigendecomposition, a Gauss-Newton H_S through a Cholesky factorisation per damping,
in the sample space when its factor has far fewer rows than S has entries
(``sample_space``); ``newton_cg_update`` uses conjugate gradients on Hessian-vector
products over every parameter; ``block_coordinate_newton`` takes successive direct steps
on blocks. None of them modifies the model: ``apply_update`` / ``apply_block_updates``
write the steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..selection import ParameterSelection
from .config import NewtonConfig, NewtonResult
from .damping import Curvature, Solver, _modelled_offset, _newton_iterations
from .objective import (
    RetainedObjective,
    _evaluation_mode,
    _objective_data,
    _parameters,
    _prepared,
    _subsample,
    _with_step,
    retained_gradient_from_full,
)
from .sample_space import LOW_RANK_SHARE, factor_rows, sample_space_solver

__all__ = [
    "apply_block_updates",
    "apply_update",
    "block_coordinate_newton",
    "newton_cg_update",
    "newton_update",
]


def _residual_all(
    model: nn.Module,
    objective: RetainedObjective,
    v: torch.Tensor,
    selection: ParameterSelection,
    rx: torch.Tensor,
    ry: torch.Tensor,
    weight_decay: float,
    batch_size: int,
    residual_selected: float,
) -> float:
    """|grad J'| over every parameter at the updated point."""
    total = sum(p.numel() for p in objective.params.values())
    if selection.num_parameters == total:
        return residual_selected
    params = objective.full_params(v.detach())
    everything = ParameterSelection({n: torch.arange(p.numel()) for n, p in params.items()})
    whole = RetainedObjective(model, params, everything, weight_decay, batch_size)
    return float(whole.gradient(whole.v0, rx, ry).norm())


def _check_retained(retained_inputs: torch.Tensor) -> None:
    # The forget set may be empty: the step then only corrects non-convergence.
    if len(retained_inputs) == 0:
        raise ValueError("no retained samples: retrain from scratch instead")


def _newton_on_block(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    selection: ParameterSelection,
    fx: torch.Tensor,
    fy: torch.Tensor,
    rx: torch.Tensor,
    ry: torch.Tensor,
    weight_decay: float,
    config: NewtonConfig,
    full_gradient: torch.Tensor | None,
    retained_count: int,
) -> NewtonResult:
    """One block's step; ``retained_count`` is n - m (rx may be a subsample of them)."""
    objective = RetainedObjective(model, params, selection, weight_decay, config.batch_size)
    v0 = objective.v0
    if full_gradient is None:
        g = objective.gradient(v0, rx, ry)
    else:
        if full_gradient.shape != v0.shape:
            raise ValueError(
                f"full_gradient has shape {tuple(full_gradient.shape)}, selection {tuple(v0.shape)}"
            )
        forget_sum = objective.loss_gradient_sum(v0, fx, fy) if len(fx) else torch.zeros_like(v0)
        g = retained_gradient_from_full(
            full_gradient.to(v0), forget_sum, v0, retained_count + len(fx), len(fx), weight_decay
        )
    hx, hy = _subsample(rx, ry, config.hessian_samples, config.seed)
    if (
        config.hessian == "gauss_newton"
        and factor_rows(objective, hx) < LOW_RANK_SHARE * v0.numel()
    ):
        factor = objective.gauss_newton_factor(v0, hx, hy, config.hessian_batch)
        solve, curvature, min_eig, scale = sample_space_solver(factor, weight_decay)
    else:
        h = objective.hessian(v0, hx, hy, config.hessian, config.hessian_batch)
        if config.hessian == "gauss_newton":
            solve, curvature, min_eig, scale = _positive_semidefinite_solver(h)
        else:
            solve, curvature, min_eig, scale = _spectral_solver(h)
    mu = float(config.damping)
    offset = _modelled_offset(objective, g, rx, ry, full_gradient)
    v, before, after, mu, tries, steps, accepted = _newton_iterations(
        objective, g, solve, mu, scale, rx, ry, config, curvature, offset
    )
    residual = float(objective.gradient(v, rx, ry).norm())
    delta = (v - v0).detach()
    return NewtonResult(
        delta=delta,
        damping=mu,
        min_eigenvalue=min_eig,
        objective_before=before,
        objective_after=after,
        step_norm=float(delta.norm()),
        accepted=accepted,
        damping_tries=tries,
        iterations=steps,
        residual_norm_selected=residual,
        residual_norm_all=_residual_all(
            model, objective, v, selection, rx, ry, weight_decay, config.batch_size, residual
        ),
        num_parameters=int(v0.numel()),
    )


def _spectral_solver(h: torch.Tensor) -> tuple[Solver, Curvature, float, float]:
    """(solve, curvature, smallest eigenvalue, spectral scale) of a symmetric H that may be
    indefinite. One eigendecomposition solves (|H| + mu I) step = -g for every mu
    Levenberg-Marquardt tries, O(p^2) each: |H| takes each eigenvalue's magnitude
    (saddle-free Newton). The curvature of the ratio test's model is H's own."""
    eigenvalues, eigenvectors = torch.linalg.eigh(h)
    magnitudes = eigenvalues.abs()

    def solve(gradient: torch.Tensor, mu: float) -> torch.Tensor:
        return -(eigenvectors @ ((eigenvectors.T @ gradient) / (magnitudes + mu)))

    def curvature(step: torch.Tensor) -> float:
        coordinates = (eigenvectors.T @ step).double()
        return float((eigenvalues.double() * coordinates * coordinates).sum())

    return solve, curvature, float(eigenvalues[0]), float(magnitudes.max())


def _positive_semidefinite_solver(h: torch.Tensor) -> tuple[Solver, Curvature, float, float]:
    """The same for a Gauss-Newton H, PSD by construction (plus the weight decay on its
    diagonal): |H| = H, so each mu is one Cholesky factorisation,
    about 8x cheaper than the eigendecomposition (p = 1,898: 0.06 s against 0.46 s on one
    thread), and a factorisation that fails (singular in floating point) returns None so
    that Levenberg-Marquardt raises mu. The smallest eigenvalue is not computed (NaN);
    the scale is the largest diagonal entry."""
    factors: dict[float, torch.Tensor | None] = {}
    identity = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)

    def solve(gradient: torch.Tensor, mu: float) -> torch.Tensor | None:
        if mu not in factors:
            factor, info = torch.linalg.cholesky_ex(h + mu * identity)
            factors[mu] = factor if int(info) == 0 else None
        factor = factors[mu]
        if factor is None:
            return None
        return -torch.cholesky_solve(gradient.unsqueeze(1), factor).squeeze(1)

    def curvature(step: torch.Tensor) -> float:
        return float(step.double() @ (h @ step).double())

    return solve, curvature, math.nan, float(h.diagonal().abs().max())


def newton_update(
    model: nn.Module,
    selection: ParameterSelection,
    forget_inputs: torch.Tensor,
    forget_labels: torch.Tensor,
    retained_inputs: torch.Tensor,
    retained_labels: torch.Tensor,
    weight_decay: float,
    config: NewtonConfig | None = None,
    full_gradient: torch.Tensor | None = None,
) -> NewtonResult:
    """The damped Newton step on ``selection`` towards the optimum of the retained objective.

    forget ``(m, *shape)``/``(m,)``; retained ``(n - m, *shape)``/``(n - m,)`` (the data
    that remains after this deletion, so n is whatever it is now). ``full_gradient``
    ``(p,)``: grad_S J over all n = (n - m) + m samples at the current parameters, if
    cached (``objective_gradient``); g is then formed from it and the forget set alone.
    J' for acceptance, ``objective_before/after`` and the residuals are evaluated on the
    full retained data, not on the Hessian subsample. The model is evaluated in eval mode
    and is not modified: ``apply_update`` writes the step.
    """
    config = config or NewtonConfig()
    _check_retained(retained_inputs)
    with _evaluation_mode(model):
        params = _parameters(model)
        fx, fy = _prepared(params, forget_inputs, forget_labels)
        rx, ry = _objective_data(*_prepared(params, retained_inputs, retained_labels), config)
        return _newton_on_block(
            model,
            params,
            selection,
            fx,
            fy,
            rx,
            ry,
            weight_decay,
            config,
            full_gradient,
            len(retained_inputs),
        )


def apply_update(model: nn.Module, selection: ParameterSelection, result: NewtonResult) -> None:
    """Add ``result.delta`` to the model's selected parameters, in place."""
    if result.num_parameters != selection.num_parameters:
        raise ValueError(
            f"result is for {result.num_parameters} parameters, selection has "
            f"{selection.num_parameters}"
        )
    selection.scatter_add_(model, result.delta)


# --------------------------------------------------------------------------- Newton-CG


class _ShiftedKrylov:
    """Every damped system (H + mu I) x = b from one Lanczos run of ``iterations``
    Hessian-vector products (multi-shift CG).

    The Krylov space of H + mu I from b is the same for every mu, so the CG iterate for
    each mu is Q^T (T + mu I)^{-1} |b| e1, with Q the Lanczos basis and T the tridiagonal
    projection of H on it. Levenberg-Marquardt, which raises mu tenfold after a refused
    step, then pays O(k^2) per try instead of k more Hessian-vector products: on the
    CIFAR-shaped CNN's ranking step that was 2.75 s of a 14.5 s forget. CG's refusal of
    non-positive curvature is T + mu I not positive definite (CG's pivots are those of its
    LDL^T factors). The basis is fully reorthogonalised (k is small), and a run that
    reaches an invariant subspace stops there (CG's early exit)."""

    def __init__(
        self,
        hvp: Callable[[torch.Tensor], torch.Tensor],
        b: torch.Tensor,
        iterations: int,
        rtol: float,
    ) -> None:
        self.b = b
        self.norm = float(b.norm())
        basis: list[torch.Tensor] = []
        alphas: list[float] = []
        betas: list[float] = []
        if self.norm > 0:
            q = b / self.norm
            previous, beta = torch.zeros_like(b), 0.0
            for _ in range(iterations):
                basis.append(q)
                w = hvp(q)
                alpha = float(q @ w)
                w = w - alpha * q - beta * previous
                stacked = torch.stack(basis)
                w = w - stacked.T @ (stacked @ w)  # full reorthogonalisation
                alphas.append(alpha)
                beta = float(w.norm())
                if beta <= rtol * max(abs(alpha), 1.0):
                    break
                betas.append(beta)
                previous, q = q, w / beta
        m = len(alphas)
        self.basis = torch.stack(basis[:m]) if m else b.new_zeros(0, b.numel())
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        off = torch.tensor(betas[: max(m - 1, 0)], dtype=torch.float64)
        if m > 1:
            t += torch.diag(off, 1) + torch.diag(off, -1)
        self.t = t
        self.smallest = float(torch.linalg.eigvalsh(t)[0]) if m else math.inf

    def solve(self, mu: float) -> torch.Tensor | None:
        if self.norm == 0:
            return torch.zeros_like(self.b)
        if self.smallest + mu <= 0:
            return None
        rhs = torch.zeros(self.t.shape[0], dtype=torch.float64)
        rhs[0] = self.norm
        y = torch.linalg.solve(self.t + mu * torch.eye(self.t.shape[0], dtype=torch.float64), rhs)
        return self.basis.T @ y.to(self.basis)

    def curvature(self, step: torch.Tensor) -> float | None:
        """step^T H step = y^T T y for a step in the basis' span (None otherwise)."""
        y = (self.basis @ step).double()
        inside = float((self.basis.T @ y.to(self.basis) - step).norm())
        if inside > 1e-6 * max(float(step.norm()), 1e-30):
            return None
        return float(y @ (self.t @ y))


def newton_cg_update(
    model: nn.Module,
    forget_inputs: torch.Tensor,
    forget_labels: torch.Tensor,
    retained_inputs: torch.Tensor,
    retained_labels: torch.Tensor,
    weight_decay: float,
    config: NewtonConfig | None = None,
    full_gradient: torch.Tensor | None = None,
) -> NewtonResult:
    """Newton-CG over every parameter with Hessian-vector products (no p x p matrix).

    Solves (H + mu I) delta = -g by at most ``config.cg_iterations`` conjugate-gradient
    steps (stopping early at a relative residual of 1e-10), H the exact Hessian of J' on
    the seeded subsample via forward-over-reverse products, mu starting at
    ``config.damping`` and raised tenfold (Levenberg-Marquardt) on negative curvature, a
    step outside the trust region or one that does not lower J'. The smallest eigenvalue
    is not computed (NaN). ``delta`` is in ``ParameterSelection.everything(model)`` order;
    apply it with that selection. Shapes as in ``newton_update``. The model is not modified.
    """
    config = config or NewtonConfig()
    _check_retained(retained_inputs)
    selection = ParameterSelection.everything(model)
    with _evaluation_mode(model):
        params = _parameters(model)
        fx, fy = _prepared(params, forget_inputs, forget_labels)
        rx, ry = _objective_data(*_prepared(params, retained_inputs, retained_labels), config)
        objective = RetainedObjective(model, params, selection, weight_decay, config.batch_size)
        v0 = objective.v0
        if full_gradient is None:
            g = objective.gradient(v0, rx, ry)
        else:
            forget_sum = (
                objective.loss_gradient_sum(v0, fx, fy) if len(fx) else torch.zeros_like(v0)
            )
            g = retained_gradient_from_full(
                full_gradient.to(v0),
                forget_sum,
                v0,
                len(retained_inputs) + len(fx),
                len(fx),
                weight_decay,
            )
        hx, hy = _subsample(rx, ry, config.hessian_samples, config.seed)
        hvp = objective.hvp(v0, hx, hy, config.hessian_batch)

        # One Krylov basis per gradient: the damping tries of an iteration share it.
        krylov: list[tuple[torch.Tensor, _ShiftedKrylov]] = []

        def shifted(gradient: torch.Tensor) -> _ShiftedKrylov:
            if not krylov or krylov[-1][0] is not gradient:
                krylov[:] = [
                    (gradient, _ShiftedKrylov(hvp, -gradient, config.cg_iterations, 1e-10))
                ]
            return krylov[-1][1]

        def solve(gradient: torch.Tensor, mu: float) -> torch.Tensor | None:
            return shifted(gradient).solve(mu)

        def curvature(step: torch.Tensor) -> float:
            known = krylov[-1][1].curvature(step) if krylov else None
            return known if known is not None else float(step.double() @ hvp(step).double())

        scale = 1.0
        if config.damping == 0:
            # A scale for the first nonzero mu: the Rayleigh quotient of H along g.
            g_unit = g / g.norm().clamp_min(torch.finfo(g.dtype).tiny)
            scale = abs(float(g_unit @ hvp(g_unit)))
        offset = _modelled_offset(objective, g, rx, ry, full_gradient)
        v, before, after, mu, tries, steps, accepted = _newton_iterations(
            objective,
            g,
            solve,
            float(config.damping),
            scale,
            rx,
            ry,
            config,
            curvature,
            offset,
        )
        residual = float(objective.gradient(v, rx, ry).norm())
    delta = (v - v0).detach()
    return NewtonResult(
        delta=delta,
        damping=mu,
        min_eigenvalue=math.nan,
        objective_before=before,
        objective_after=after,
        step_norm=float(delta.norm()),
        accepted=accepted,
        damping_tries=tries,
        iterations=steps,
        residual_norm_selected=residual,
        residual_norm_all=residual,
        num_parameters=int(v0.numel()),
    )


# --------------------------------------------------------------------------- blocks


def block_coordinate_newton(
    model: nn.Module,
    blocks: Sequence[ParameterSelection],
    forget_inputs: torch.Tensor,
    forget_labels: torch.Tensor,
    retained_inputs: torch.Tensor,
    retained_labels: torch.Tensor,
    weight_decay: float,
    config: NewtonConfig | None = None,
) -> list[NewtonResult]:
    """Successive Newton steps on each block in order (Gauss-Seidel), one result per block.

    Block k's gradient and Hessian are taken at the point left by blocks 0..k-1 (held in
    a private parameter dict: the model is not modified). Its residual_norm_all is that
    after block k, so the last one is the residual of the whole sweep. Repeat a block in
    ``blocks`` for several sweeps. Apply with ``apply_block_updates``. Shapes as in
    ``newton_update``; no cached full gradient, as it would be stale after block 0.
    """
    config = config or NewtonConfig()
    _check_retained(retained_inputs)
    results: list[NewtonResult] = []
    with _evaluation_mode(model):
        params = _parameters(model)
        fx, fy = _prepared(params, forget_inputs, forget_labels)
        rx, ry = _objective_data(*_prepared(params, retained_inputs, retained_labels), config)
        for block in blocks:
            result = _newton_on_block(
                model,
                params,
                block,
                fx,
                fy,
                rx,
                ry,
                weight_decay,
                config,
                None,
                len(retained_inputs),
            )
            params = _with_step(params, block, result.delta)
            results.append(result)
    return results


def apply_block_updates(
    model: nn.Module, blocks: Sequence[ParameterSelection], results: Sequence[NewtonResult]
) -> None:
    """Apply the per-block steps of ``block_coordinate_newton`` in order, in place."""
    if len(blocks) != len(results):
        raise ValueError(f"{len(blocks)} blocks but {len(results)} results")
    for block, result in zip(blocks, results, strict=True):
        apply_update(model, block, result)
