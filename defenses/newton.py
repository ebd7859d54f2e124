"""Targeted Newton update on a parameter selection (DESIGN 4.4).

Training objective J(theta) = (1/n) sum_i l(z_i; theta) + (lambda/2) |theta|^2, with
l the cross-entropy and lambda the training weight decay. Removing the forget set F
(m samples) leaves the retained objective J', the same expression averaged over the
n - m retained samples (never 1/(n - 1)). On the selected slice S:

    theta_S <- theta_S + delta,    (H_S + mu I) delta = -grad_S J'(theta)

- grad_S J' is computed exactly on the retained data, so the term left by a training
  run that did not converge is included; a cached full-data gradient may stand in for
  the pass over the retained data (``retained_gradient_from_full``).
- H_S is the Hessian of J' restricted to S (exact second derivatives or Gauss-Newton)
  on a seeded subsample of the retained data.
- mu starts at ``damping + max(0, -min eig H_S)``: the spectrum is floored at
  ``damping`` above zero, not "just enough for Cholesky" (DESIGN 4.4 measured an
  exploding step with a floor of 1e-6 on a digits MLP). Levenberg-Marquardt then
  multiplies mu by 10 while the step leaves the trust region or J' does not fall.

Nothing here modifies the model: every function returns the step; ``apply_update``
writes it. The parameters outside S are held fixed. Deletions are sequential by
construction: the caller passes the data retained *now*, so n is decremented each time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

from .gradients import sample_loss
from .selection import ParameterSelection

__all__ = [
    "HESSIAN_MODES",
    "NewtonConfig",
    "NewtonResult",
    "apply_block_updates",
    "apply_update",
    "block_coordinate_newton",
    "newton_cg_update",
    "newton_update",
    "objective_gradient",
    "retained_gradient_from_full",
]

HESSIAN_MODES = ("exact", "gauss_newton")

# Activation floats in one vmapped forward-over-reverse pass of the exact Hessian (tangent
# directions x samples x the model's activation floats per sample; every tangent carries
# its own copy of the activations): about 32 MiB in float32, whatever the model. Passes
# sized by samples alone (2^16 tangent-samples) ran 3.7x slower on the digits CNN (1,802
# activation floats per sample; fastest at 2^12-2^13) and were right for the digits MLP
# (138 floats): what the cache holds is floats, not samples. Same Hessian either way.
_HESSIAN_PASS_FLOATS = 1 << 23


@dataclass(frozen=True)
class NewtonConfig:
    """How to take the step; stored beside the receipt."""

    damping: float = field(
        default=1e-3,
        metadata={
            "help": "floor mu0 of the damped spectrum: mu = mu0 + max(0, -min eig H); of the "
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


# --------------------------------------------------------------------------- objective


@contextmanager
def _evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate in eval mode (no batch-norm statistics updates), restoring every flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    # Detached views are enough: steps are formed out of place, never written back here.
    return {name: p.detach() for name, p in model.named_parameters()}


class RetainedObjective:
    """J on fixed data as a function of the selected vector v ``(p,)``; the rest is fixed."""

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, torch.Tensor],
        selection: ParameterSelection,
        weight_decay: float,
        batch_size: int,
    ) -> None:
        self.model = model
        self.params = params
        self.buffers = {name: b.detach() for name, b in model.named_buffers()}
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        unknown = [n for n in selection.names if n not in params]
        if unknown:
            raise KeyError(f"selection names unknown parameters: {unknown}")
        self.names = selection.names
        self.indices = [selection.indices[n].to(params[n].device) for n in self.names]
        self.sizes = [int(idx.numel()) for idx in self.indices]
        self.v0 = selection.gather(params)
        self._floats_per_sample: int | None = None

    def full_params(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every parameter, with the selected entries taken from ``v`` (differentiable)."""
        out = dict(self.params)
        for name, idx, part in zip(
            self.names, self.indices, torch.split(v, self.sizes), strict=True
        ):
            base = self.params[name]
            if idx.numel() == base.numel():
                # Indices are sorted and unique, so a full-size selection is the identity.
                out[name] = part.reshape(base.shape)
            else:
                out[name] = base.reshape(-1).index_put((idx,), part).reshape(base.shape)
        return out

    def logits(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (self.full_params(v), self.buffers), (x,))

    def loss_sum(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sample_loss(self.logits(v, x), y).sum()

    def _batches(self, n: int, size: int) -> Iterator[slice]:
        return (slice(i, i + size) for i in range(0, n, size))

    def value(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        """J(v) on (x, y), including the fixed parameters' share of the L2 term."""
        with torch.no_grad():
            # Accumulate in float64: acceptance compares values that differ by little.
            total = sum(
                (
                    self.loss_sum(v, x[s], y[s]).double()
                    for s in self._batches(len(x), self.batch_size)
                ),
                torch.zeros((), dtype=torch.float64),
            )
            sq = sum(float((p.double() ** 2).sum()) for p in self.full_params(v).values())
        return float(total) / len(x) + 0.5 * self.weight_decay * sq

    def loss_gradient_sum(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """sum_i grad_S l(z_i) ``(p,)`` (no regulariser)."""
        gradient_of = grad(self.loss_sum)
        total = torch.zeros_like(v)
        for s in self._batches(len(x), self.batch_size):
            total += gradient_of(v.detach(), x[s], y[s])
        return total

    def gradient(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """grad_S J on (x, y) ``(p,)``."""
        return self.loss_gradient_sum(v, x, y) / len(x) + self.weight_decay * v.detach()

    def hessian(
        self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mode: str, batch: int
    ) -> torch.Tensor:
        """H_S of J on (x, y) ``(p, p)``, symmetric; exact or Gauss-Newton."""
        p = v.numel()
        v = v.detach()
        h = torch.zeros(p, p, dtype=v.dtype, device=v.device)
        for s in self._batches(len(x), batch):
            xb, yb = x[s], y[s]
            if mode == "exact":
                self._add_exact_hessian(h, v, xb, yb)
            else:
                self._add_gauss_newton(h, v, xb)
        h /= len(x)
        h.diagonal().add_(self.weight_decay)
        return 0.5 * (h + h.T)

    def _add_exact_hessian(
        self, h: torch.Tensor, v: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor
    ) -> None:
        # Columns of H as Hessian-vector products (forward over reverse) along basis
        # vectors, a chunk of directions at a time to bound memory.
        p = v.numel()
        gradient_of = grad(lambda w: self.loss_sum(w, xb, yb))

        def column(direction: torch.Tensor) -> torch.Tensor:
            return jvp(gradient_of, (v,), (direction,))[1]

        per_tangent = max(len(xb) * self.activation_floats(xb[:1]), 1)
        chunk = max(1, min(p, _HESSIAN_PASS_FLOATS // per_tangent))
        for start in range(0, p, chunk):
            stop = min(p, start + chunk)
            basis = torch.zeros(stop - start, p, dtype=v.dtype, device=v.device)
            basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            h[start:stop] += vmap(column)(basis)

    def activation_floats(self, example: torch.Tensor) -> int:
        """Floats one sample's forward pass produces (inputs and every leaf module's outputs)."""
        if self._floats_per_sample is None:
            total = int(example[:1].numel())

            def count(module: nn.Module, inputs: object, output: object) -> None:
                nonlocal total
                outputs = output if isinstance(output, (tuple, list)) else (output,)
                total += sum(int(o.numel()) for o in outputs if isinstance(o, torch.Tensor))

            leaves = [m for m in self.model.modules() if next(m.children(), None) is None]
            hooks = [m.register_forward_hook(count) for m in leaves]
            try:
                with torch.no_grad():
                    self.logits(self.v0, example[:1])
            finally:
                for hook in hooks:
                    hook.remove()
            self._floats_per_sample = total
        return self._floats_per_sample

    def _add_gauss_newton(self, h: torch.Tensor, v: torch.Tensor, xb: torch.Tensor) -> None:
        # GN: J_z^T (diag(p) - p p^T) J_z per sample, J_z = d logits / d v; PSD by design.
        def logits_one(w: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
            return self.logits(w, xi.unsqueeze(0)).squeeze(0)

        jac = vmap(jacrev(logits_one), in_dims=(None, 0))(v, xb)  # (B, C, p)
        with torch.no_grad():
            probs = torch.softmax(self.logits(v, xb), dim=1)  # (B, C)
        weighted = probs.unsqueeze(2) * jac  # (B, C, p)
        mixed = weighted.sum(dim=1)  # (B, p): sum_c p_c J_c
        flat_jac = jac.reshape(-1, jac.shape[-1])
        h += flat_jac.T @ weighted.reshape(-1, jac.shape[-1]) - mixed.T @ mixed

    def hvp(
        self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch: int
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """Hessian-vector product of J on (x, y) at v: ``(p,) -> (p,)``, no matrix."""
        v = v.detach()
        gradients = [
            grad(lambda w, xb=x[s], yb=y[s]: self.loss_sum(w, xb, yb))
            for s in self._batches(len(x), batch)
        ]

        def product(direction: torch.Tensor) -> torch.Tensor:
            total = torch.zeros_like(v)
            for gradient_of in gradients:
                total += jvp(gradient_of, (v,), (direction,))[1]
            return total / len(x) + self.weight_decay * direction

        return product


def _prepared(
    params: dict[str, torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in the parameters' dtype and device (integer inputs kept), labels as long."""
    reference = next(iter(params.values()))
    if len(inputs) != len(labels):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
    x = inputs.to(reference.device)
    if x.is_floating_point():
        x = x.to(reference.dtype)
    return x, labels.to(device=reference.device, dtype=torch.long)


def _objective_data(
    x: torch.Tensor, y: torch.Tensor, config: NewtonConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The retained samples J' is evaluated on (all, or the configured subsample)."""
    if not config.objective_samples:
        return x, y
    return _subsample(x, y, config.objective_samples, config.seed + 1)


def _subsample(
    x: torch.Tensor, y: torch.Tensor, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if len(x) <= size:
        return x, y
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(x), generator=generator)[:size].sort().values.to(x.device)
    return x[rows], y[rows]


def _with_step(
    params: dict[str, torch.Tensor], selection: ParameterSelection, delta: torch.Tensor
) -> dict[str, torch.Tensor]:
    """New parameter dict with ``delta`` ``(p,)`` added to the selected entries (out of place)."""
    out = dict(params)
    offset = 0
    for name in selection.names:
        idx = selection.indices[name].to(params[name].device)
        flat = params[name].reshape(-1).clone()
        flat[idx] += delta[offset : offset + idx.numel()].to(flat.dtype)
        out[name] = flat.reshape(params[name].shape)
        offset += idx.numel()
    if offset != delta.numel():
        raise ValueError(f"delta has {delta.numel()} entries, selection has {offset}")
    return out


# --------------------------------------------------------------------------- public maths


def retained_gradient_from_full(
    full_gradient: torch.Tensor,
    forget_gradient_sum: torch.Tensor,
    theta: torch.Tensor,
    n: int,
    m: int,
    weight_decay: float,
) -> torch.Tensor:
    """grad J' from the full-data grad J and the forget set's summed loss gradients.

    grad J' = (n (grad J - lambda theta) - sum_F grad l) / (n - m) + lambda theta, all
    ``(p,)`` on the same slice; n counts the samples ``full_gradient`` was taken over.
    """
    if not 0 <= m < n:
        raise ValueError(f"need 0 <= m < n, got m={m}, n={n}")
    loss_sum = n * (full_gradient - weight_decay * theta)
    return (loss_sum - forget_gradient_sum) / (n - m) + weight_decay * theta


def objective_gradient(
    model: nn.Module,
    selection: ParameterSelection,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    weight_decay: float,
    batch_size: int = 1024,
) -> torch.Tensor:
    """grad_S J on (inputs ``(n, *shape)``, labels ``(n,)``) at the model's parameters ``(p,)``.

    Cache it on the full training set to pass as ``full_gradient`` later.
    """
    with _evaluation_mode(model):
        params = _parameters(model)
        objective = RetainedObjective(model, params, selection, weight_decay, batch_size)
        x, y = _prepared(params, inputs, labels)
        if len(x) == 0:
            raise ValueError("need at least one sample")
        return objective.gradient(objective.v0, x, y)


# --------------------------------------------------------------------------- the damped step


# (gradient (p,), mu) -> the step solving (H + mu I) step = -gradient, or None.
Solver = Callable[[torch.Tensor, float], torch.Tensor | None]


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
    tolerance: float
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
        if value <= baseline + region.tolerance:
            return _Search(step, value, mu, tries, True)
    return _Search(last if last is not None else torch.empty(0), math.nan, mu, tries, False)


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
        # Steps whose effect on J' is within rounding of J' count as not raising it.
        tolerance=16.0 * torch.finfo(v0.dtype).eps * max(abs(before), 1.0),
        offset=offset,
    )
    v, current, tries, steps, accepted = v0, before, 0, 0, False
    g = gradient
    for k in range(config.iterations):
        if k:
            g = region.gradient(v)
        search = _damped_search(
            region, solve, g, v, current, mu, config.max_damping_increases, scale
        )
        tries += search.tries
        mu = search.damping
        if search.accepted:
            v, current, steps = v + search.step, search.value, steps + 1
            accepted = accepted or k == 0
            continue
        if k == 0 and search.step.numel():
            # Never skip silently: hand back the most damped step, inside the region,
            # flagged as not accepted.
            v = v0 + _shrunk(search.step, region.radius)
            current = region.value(v)
        break
    return _Steps(v, before, current, mu, tries, steps, accepted)


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
    h = objective.hessian(v0, hx, hy, config.hessian, config.hessian_batch)
    # One eigendecomposition gives the smallest eigenvalue and solves for every mu that
    # Levenberg-Marquardt and the extra iterations try, O(p^2) each.
    eigenvalues, eigenvectors = torch.linalg.eigh(h)
    min_eig = float(eigenvalues[0])

    def solve(gradient: torch.Tensor, mu: float) -> torch.Tensor:
        return -(eigenvectors @ ((eigenvectors.T @ gradient) / (eigenvalues + mu)))

    mu = float(config.damping) + max(0.0, -min_eig)
    scale = float(eigenvalues.abs().max())
    offset = _modelled_offset(objective, g, rx, ry, full_gradient)
    v, before, after, mu, tries, steps, accepted = _newton_iterations(
        objective, g, solve, mu, scale, rx, ry, config, offset
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


def _conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    iterations: int,
    rtol: float,
) -> torch.Tensor | None:
    """Solve A x = b for symmetric A; None when A shows non-positive curvature."""
    x = torch.zeros_like(b)
    r = b.clone()
    d = r.clone()
    rs = float(r @ r)
    stop = (rtol**2) * rs
    for _ in range(iterations):
        if rs <= stop:
            break
        ad = matvec(d)
        curvature = float(d @ ad)
        if curvature <= 0:
            # The damping does not make the system positive definite: the "solution"
            # would point uphill, so ask Levenberg-Marquardt for more damping.
            return None
        alpha = rs / curvature
        x += alpha * d
        r -= alpha * ad
        rs_new = float(r @ r)
        d = r + (rs_new / rs) * d
        rs = rs_new
    return x


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

        def solve(gradient: torch.Tensor, mu: float) -> torch.Tensor | None:
            return _conjugate_gradient(
                lambda d: hvp(d) + mu * d, -gradient, config.cg_iterations, 1e-10
            )

        scale = 1.0
        if config.damping == 0:
            # A scale for the first nonzero mu: the Rayleigh quotient of H along g.
            g_unit = g / g.norm().clamp_min(torch.finfo(g.dtype).tiny)
            scale = abs(float(g_unit @ hvp(g_unit)))
        offset = _modelled_offset(objective, g, rx, ry, full_gradient)
        v, before, after, mu, tries, steps, accepted = _newton_iterations(
            objective, g, solve, float(config.damping), scale, rx, ry, config, offset
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
