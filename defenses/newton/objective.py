"""The training objective J (and J', the same on the retained data) on a parameter selection.

J(theta) = (1/n) sum_i l(z_i; theta) + (lambda/2) |theta|^2 as a function of the selected
entries v; its value, gradient, Hessian (exact or Gauss-Newton) and Hessian-vector
products; grad J' from a cached full-data gradient; and the data preparation the update
shares (dtype/device, seeded subsamples, out-of-place steps on a parameter dict).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

from ..batching import activation_floats, samples_per_pass
from ..gradients import sample_loss
from ..selection import ParameterSelection
from ..task import task_of
from .config import NewtonConfig
from .jacobian import selected_logit_jacobian

__all__ = ["RetainedObjective", "objective_gradient", "retained_gradient_from_full"]

# Activation floats in one vmapped forward-over-reverse pass of the exact Hessian (tangent
# directions x samples x the model's activation floats per sample; every tangent carries
# its own copy of the activations): about 32 MiB in float32, whatever the model. The choice
# was measured (figures in BENCHMARKS.md): passes sized by samples alone were much slower
# on the digits CNN, whose samples carry many activation floats, and right for the digits
# MLP, whose samples carry few: what the cache holds is floats, not samples. Same Hessian
# either way.
_HESSIAN_PASS_FLOATS = 1 << 23


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
        return sample_loss(self.model, self.logits(v, x), y).sum()

    def _batches(self, n: int, size: int) -> Iterator[slice]:
        return (slice(i, i + size) for i in range(0, n, size))

    def value(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        """J(v) on (x, y), including the fixed parameters' share of the L2 term.

        Evaluated in float64 throughout (parameters, buffers, inputs): the ratio test
        compares differences of J far below float32's resolution of J itself.
        """
        with torch.no_grad():
            params = {k: _wide(t) for k, t in self.full_params(v).items()}
            buffers = {k: _wide(t) for k, t in self.buffers.items()}
            total = torch.zeros((), dtype=torch.float64, device=v.device)
            size = samples_per_pass(self.model, x, self.batch_size, bytes_per_float=8)
            for s in self._batches(len(x), size):
                logits = functional_call(self.model, (params, buffers), (_wide(x[s]),))
                total += sample_loss(self.model, logits, y[s]).sum()
            sq = sum(float((p**2).sum()) for p in params.values())
        return float(total) / len(x) + 0.5 * self.weight_decay * sq

    def loss_gradient_sum(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """sum_i grad_S l(z_i) ``(p,)`` (no regulariser)."""
        gradient_of = grad(self.loss_sum)
        total = torch.zeros_like(v)
        size = samples_per_pass(self.model, x, self.batch_size, v.element_size())
        for s in self._batches(len(x), size):
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
                self._add_gauss_newton(h, v, xb, yb)
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
        return activation_floats(self.model, example)

    def _add_gauss_newton(
        self, h: torch.Tensor, v: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor
    ) -> None:
        # GN: J_z^T M_z J_z per sample, J_z = d logits / d v, M_z the loss's PSD Hessian in
        # the logits (cross-entropy: diag(p) - p p^T); PSD by design.
        jac, logits = self._logit_jacobian(v, xb)
        curvature = task_of(self.model).logit_hessian(logits, yb).to(jac.dtype)  # (B, C, C)
        weighted = torch.bmm(curvature, jac)  # (B, C, p)
        p = jac.shape[-1]
        h += jac.reshape(-1, p).T @ weighted.reshape(-1, p)

    def gauss_newton_factor(
        self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """F ``(r, p)`` with the Gauss-Newton H_S of J on (x, y) equal to F^T F + lambda I.

        Each sample contributes the rows L_z^T J_z / sqrt(n), L_z L_z^T = M_z (the
        loss's Hessian in the logits), less the directions in which every sample's M_z
        vanishes (cross-entropy's uniform shift): r is at most n times the outputs. When
        r < p the solver works in this r-dimensional space (``solvers``).
        """
        v = v.detach()
        roots, jacobians = [], []
        for s in self._batches(len(x), batch):
            jac, logits = self._logit_jacobian(v, x[s])
            curvature = task_of(self.model).logit_hessian(logits, y[s]).to(jac.dtype)
            eigenvalues, eigenvectors = torch.linalg.eigh(curvature)  # ascending, (B, C)
            roots.append((eigenvalues.clamp_min(0.0), eigenvectors))
            jacobians.append(jac)
        eigenvalues = torch.cat([e for e, _ in roots])
        # A direction is dropped only where it is null for every sample, to the rounding
        # of the largest curvature (eigh's own error): H changes by less than float32's
        # resolution of its entries.
        floor = eigenvalues.shape[1] * torch.finfo(eigenvalues.dtype).eps * eigenvalues.max()
        null = (eigenvalues <= floor).all(dim=0)
        dropped = int(null.to(torch.int64).cumprod(0).sum())  # leading null directions
        rows = []
        for (values, vectors), jac in zip(roots, jacobians, strict=True):
            root = vectors[:, :, dropped:] * values[:, None, dropped:].sqrt()  # (B, C, k)
            rows.append(torch.bmm(root.transpose(1, 2), jac).reshape(-1, jac.shape[-1]))
        return torch.cat(rows) / math.sqrt(len(x))

    def _logit_jacobian(
        self, v: torch.Tensor, xb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """d logits / d v ``(B, C, p)`` and the logits ``(B, C)`` on one batch."""
        direct = selected_logit_jacobian(
            self.model, lambda w: self.logits(w, xb), v, self.names, self.indices, xb
        )
        if direct is not None:
            jac, logits = direct  # (B, C, p), (B, C)
        else:

            def logits_one(w: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
                return self.logits(w, xi.unsqueeze(0)).squeeze(0)

            jac = vmap(jacrev(logits_one), in_dims=(None, 0))(v, xb)
            with torch.no_grad():
                logits = self.logits(v, xb)
        return jac, logits

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


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Floating tensors in float64 (integer ones, e.g. batch-norm counters, as they are)."""
    return t.double() if t.is_floating_point() else t


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
