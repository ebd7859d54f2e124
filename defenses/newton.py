"""Targeted Newton update on a parameter selection (DESIGN 4.4).

Objective J(theta) = (1/n) sum_i l(z_i; theta) + (lambda/2) |theta|^2. After removing
the forget set F (m samples) the retained objective J' averages over the n - m
retained samples (never 1/(n - 1)). On the selected slice S:

    theta_S <- theta_S - (H_S + mu I)^{-1} grad_S J'(theta)

with H_S the Hessian of J' restricted to S (exact second derivatives or Gauss-Newton,
on a seeded subsample of retained data). The damping mu is floored above the most
negative eigenvalue by ``damping`` and raised Levenberg-Marquardt style until the
retained objective falls and the step stays inside the trust region.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap

from .gradients import sample_loss
from .selection import ParameterSelection


@dataclass(frozen=True)
class NewtonConfig:
    """How to take the step; stored in the receipt."""

    damping: float = field(default=1e-3, metadata={"help": "floor mu0 added above the spectrum"})
    hessian: str = field(default="exact", metadata={"help": "exact or gauss_newton"})
    hessian_samples: int = field(default=2000, metadata={"help": "retained samples for H"})
    hessian_batch: int = field(default=128, metadata={"help": "samples per Hessian batch"})
    trust_radius: float = field(
        default=1.0, metadata={"help": "max |step| as a fraction of max(|theta_S|, 1)"}
    )
    max_damping_increases: int = field(default=8, metadata={"help": "LM: mu *= 10 each time"})
    iterations: int = field(default=1, metadata={"help": "Newton steps reusing H"})
    cg_iterations: int = field(default=100, metadata={"help": "Newton-CG inner iterations"})
    batch_size: int = field(default=1024, metadata={"help": "samples per gradient batch"})
    seed: int = field(default=0, metadata={"help": "seeds the Hessian subsample"})

    def __post_init__(self) -> None:
        if self.hessian not in ("exact", "gauss_newton"):
            raise ValueError("hessian must be 'exact' or 'gauss_newton'")
        if self.damping < 0 or self.trust_radius <= 0 or self.iterations < 1:
            raise ValueError("need damping >= 0, trust_radius > 0, iterations >= 1")


@dataclass(frozen=True)
class NewtonResult:
    """The step and how it was taken. ``delta`` ``(p,)`` is in the selection's order."""

    delta: torch.Tensor
    damping: float
    min_eigenvalue: float
    objective_before: float
    objective_after: float
    step_norm: float
    accepted: bool
    damping_tries: int
    iterations: int
    residual_norm_selected: float
    residual_norm_all: float
    num_parameters: int


class _SliceObjective:
    """J' as a function of the selected vector v, everything else held fixed."""

    def __init__(
        self, model: nn.Module, selection: ParameterSelection, weight_decay: float
    ) -> None:
        self.model = model
        self.selection = selection
        self.weight_decay = weight_decay
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.names = selection.names
        self.v0 = selection.gather(self.params)
        # |theta|^2 of the parameters outside S is a constant: it does not move the optimum.
        self.sizes = [int(selection.indices[n].numel()) for n in self.names]

    def full_params(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        params = dict(self.params)
        for name, part in zip(self.names, torch.split(v, self.sizes), strict=True):
            flat = self.params[name].reshape(-1)
            params[name] = flat.index_put((self.selection.indices[name],), part).reshape(
                self.params[name].shape
            )
        return params

    def logits(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (self.full_params(v), self.buffers), (x,))

    def loss_sum(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sample_loss(self.logits(v, x), y).sum()

    def regulariser(self, v: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.weight_decay * (v * v).sum()

    def value(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
        """J'(v) over all of (x, y) (the parameters outside S contribute a constant)."""
        with torch.no_grad():
            total = sum(
                float(self.loss_sum(v, x[i : i + batch], y[i : i + batch]))
                for i in range(0, len(x), batch)
            )
            return total / max(len(x), 1) + float(self.regulariser(v))

    def gradient(
        self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """grad_S J'(v) ``(p,)`` over all of (x, y)."""
        total = torch.zeros_like(v)
        for i in range(0, len(x), batch):
            w = v.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.loss_sum(w, x[i : i + batch], y[i : i + batch]), w)
            total += g
        return total / max(len(x), 1) + self.weight_decay * v.detach()

    def hessian(
        self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mode: str, batch: int
    ) -> torch.Tensor:
        """H_S ``(p, p)`` of J' on (x, y): exact second derivatives or Gauss-Newton."""
        p = v.numel()
        h = torch.zeros(p, p, dtype=v.dtype)
        for i in range(0, len(x), batch):
            xb, yb = x[i : i + batch], y[i : i + batch]
            if mode == "exact":
                grad_fn: Callable[[torch.Tensor], torch.Tensor] = torch.func.grad(
                    lambda w, xb=xb, yb=yb: self.loss_sum(w, xb, yb)
                )
                h += torch.func.jacfwd(grad_fn)(v)
            else:

                def one(w: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
                    return self.logits(w, xi.unsqueeze(0)).squeeze(0)

                jac = vmap(jacrev(one), in_dims=(None, 0))(v, xb)  # (B, C, p)
                probs = torch.softmax(self.logits(v, xb), dim=1).detach()  # (B, C)
                # d2 CE / d logits2 = diag(p) - p p^T
                pj = probs.unsqueeze(2) * jac  # (B, C, p)
                h += torch.einsum("bcp,bcq->pq", jac, pj) - torch.einsum(
                    "bp,bq->pq", pj.sum(1), pj.sum(1)
                )
        h /= max(len(x), 1)
        h += self.weight_decay * torch.eye(p, dtype=v.dtype)
        return 0.5 * (h + h.T)


def retained_gradient_from_full(
    full_gradient: torch.Tensor,
    forget_gradient_sum: torch.Tensor,
    theta: torch.Tensor,
    n: int,
    m: int,
    weight_decay: float,
) -> torch.Tensor:
    """grad J' from the cached full-data grad J and the forget set's summed loss gradients.

    grad J' = (n (grad J - lambda theta) - sum_F grad l) / (n - m) + lambda theta. All ``(p,)``.
    """
    return (n * (full_gradient - weight_decay * theta) - forget_gradient_sum) / (
        n - m
    ) + weight_decay * theta


def _subsample(
    x: torch.Tensor, y: torch.Tensor, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if len(x) <= size:
        return x, y
    rows = (
        torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size].sort().values
    )
    return x[rows], y[rows]


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

    forget ``(m, *shape)``/``(m,)``; retained ``(n - m, *shape)``/``(n - m,)``.
    ``full_gradient`` ``(p,)``: grad_S J on all n samples at the current parameters, if
    cached; then g is formed from it and the forget set alone (same value, cheaper).
    The model is not modified: ``apply_update`` does that.
    """
    config = config or NewtonConfig()
    model.eval()
    objective = _SliceObjective(model, selection, weight_decay)
    v0 = objective.v0
    rx, ry = (
        retained_inputs.to(v0.dtype) if retained_inputs.is_floating_point() else retained_inputs,
        retained_labels,
    )
    batch = config.batch_size
    if full_gradient is not None:
        n = len(retained_inputs) + len(forget_inputs)
        forget_sum = (
            objective.gradient(v0, forget_inputs, forget_labels, batch) - weight_decay * v0
        ) * len(forget_inputs)
        g = retained_gradient_from_full(
            full_gradient, forget_sum, v0, n, len(forget_inputs), weight_decay
        )
    else:
        g = objective.gradient(v0, rx, ry, batch)
    hx, hy = _subsample(rx, ry, config.hessian_samples, config.seed)
    h = objective.hessian(v0, hx, hy, config.hessian, config.hessian_batch)
    eigenvalues, eigenvectors = torch.linalg.eigh(h)
    min_eig = float(eigenvalues[0])
    mu = config.damping + max(0.0, -min_eig)
    before = objective.value(v0, rx, ry, batch)
    radius = config.trust_radius * max(float(v0.norm()), 1.0)

    def solve(gradient: torch.Tensor, damping: float) -> torch.Tensor:
        return -(eigenvectors @ ((eigenvectors.T @ gradient) / (eigenvalues + damping)))

    tries = 0
    accepted = False
    v = v0
    after = before
    for tries in range(config.max_damping_increases + 1):  # noqa: B007 - read after the loop
        step = solve(g, mu)
        candidate = v0 + step
        value = objective.value(candidate, rx, ry, batch)
        if float(step.norm()) <= radius and value <= before + 1e-12 * abs(before):
            v, after, accepted = candidate, value, True
            break
        mu *= 10.0
    if not accepted:
        # Never skip: take the most damped step if it is inside the trust region.
        step = solve(g, mu)
        if float(step.norm()) <= radius:
            v = v0 + step
            after = objective.value(v, rx, ry, batch)
    iterations = 1
    for _ in range(config.iterations - 1):
        g_next = objective.gradient(v, rx, ry, batch)
        candidate = v + solve(g_next, mu)
        value = objective.value(candidate, rx, ry, batch)
        if value > after or float((candidate - v0).norm()) > radius:
            break
        v, after = candidate, value
        iterations += 1
    residual_selected = float(objective.gradient(v, rx, ry, batch).norm())
    residual_all = _full_residual(model, selection, objective, v, rx, ry, weight_decay, batch)
    delta = (v - v0).detach()
    return NewtonResult(
        delta=delta,
        damping=mu,
        min_eigenvalue=min_eig,
        objective_before=before,
        objective_after=after,
        step_norm=float(delta.norm()),
        accepted=accepted,
        damping_tries=tries + 1,
        iterations=iterations,
        residual_norm_selected=residual_selected,
        residual_norm_all=residual_all,
        num_parameters=int(v0.numel()),
    )


def _full_residual(
    model: nn.Module,
    selection: ParameterSelection,
    objective: _SliceObjective,
    v: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weight_decay: float,
    batch: int,
) -> float:
    """|grad J'| over all parameters at the updated point."""
    everything = ParameterSelection.everything(model)
    full = _SliceObjective(model, everything, weight_decay)
    theta = everything.gather(objective.full_params(v))
    return float(full.gradient(theta, x, y, batch).norm())


def apply_update(model: nn.Module, selection: ParameterSelection, result: NewtonResult) -> None:
    """Write the step into the model's selected parameters, in place."""
    selection.scatter_add_(model, result.delta)


def newton_cg_update(
    model: nn.Module,
    forget_inputs: torch.Tensor,
    forget_labels: torch.Tensor,
    retained_inputs: torch.Tensor,
    retained_labels: torch.Tensor,
    weight_decay: float,
    config: NewtonConfig | None = None,
) -> tuple[ParameterSelection, NewtonResult]:
    """Newton-CG over all parameters with Hessian-vector products (no p x p matrix).

    Solves (H + mu I) delta = -g by conjugate gradients, mu = ``config.damping``,
    raising mu tenfold while the retained objective does not fall.
    """
    config = config or NewtonConfig()
    model.eval()
    selection = ParameterSelection.everything(model)
    objective = _SliceObjective(model, selection, weight_decay)
    v0 = objective.v0
    batch = config.batch_size
    g = objective.gradient(v0, retained_inputs, retained_labels, batch)
    hx, hy = _subsample(retained_inputs, retained_labels, config.hessian_samples, config.seed)

    def grad_sub(w: torch.Tensor) -> torch.Tensor:
        return torch.func.grad(
            lambda u: objective.loss_sum(u, hx, hy) / len(hx) + objective.regulariser(u)
        )(w)

    def hvp(vec: torch.Tensor) -> torch.Tensor:
        return jvp(grad_sub, (v0,), (vec,))[1]

    before = objective.value(v0, retained_inputs, retained_labels, batch)
    radius = config.trust_radius * max(float(v0.norm()), 1.0)
    mu = config.damping
    accepted = False
    step = torch.zeros_like(v0)
    after = before
    tries = 0
    for tries in range(config.max_damping_increases + 1):  # noqa: B007 - read after the loop
        step = _conjugate_gradient(lambda s, mu=mu: hvp(s) + mu * s, -g, config.cg_iterations)
        value = objective.value(v0 + step, retained_inputs, retained_labels, batch)
        if float(step.norm()) <= radius and value <= before + 1e-12 * abs(before):
            accepted, after = True, value
            break
        mu *= 10.0
    if not accepted:
        step = torch.zeros_like(v0)
    v = v0 + step
    residual = float(objective.gradient(v, retained_inputs, retained_labels, batch).norm())
    return selection, NewtonResult(
        delta=step.detach(),
        damping=mu,
        min_eigenvalue=float("nan"),
        objective_before=before,
        objective_after=after,
        step_norm=float(step.norm()),
        accepted=accepted,
        damping_tries=tries + 1,
        iterations=1,
        residual_norm_selected=residual,
        residual_norm_all=residual,
        num_parameters=int(v0.numel()),
    )


def _conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    iterations: int,
    tol: float = 1e-10,
) -> torch.Tensor:
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = float(r @ r)
    for _ in range(iterations):
        ap = matvec(p)
        denom = float(p @ ap)
        if denom <= 0:
            break  # negative curvature despite damping: stop with the current iterate
        alpha = rs / denom
        x += alpha * p
        r -= alpha * ap
        rs_new = float(r @ r)
        if rs_new <= tol * tol * float(b @ b):
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def block_coordinate_newton(
    model: nn.Module,
    blocks: list[ParameterSelection],
    forget_inputs: torch.Tensor,
    forget_labels: torch.Tensor,
    retained_inputs: torch.Tensor,
    retained_labels: torch.Tensor,
    weight_decay: float,
    config: NewtonConfig | None = None,
) -> list[NewtonResult]:
    """Successive Newton steps on each block in turn (Gauss-Seidel), applied in place."""
    results = []
    for block in blocks:
        result = newton_update(
            model,
            block,
            forget_inputs,
            forget_labels,
            retained_inputs,
            retained_labels,
            weight_decay,
            config,
        )
        apply_update(model, block, result)
        results.append(result)
    return results
