"""The training loss as a small protocol: what every algorithm asks of the objective.

J(theta) = (1/n) sum_i l(f(x_i; theta), y_i) + (lambda/2) |theta|^2 with integer class
labels y. Cross-entropy is the default; label smoothing is built in; any other loss is a
``Task`` that a server's configuration trusts (``trusted_factories``, as architectures
are), in the spirit of kronfluence's ``Task``. What the algorithms need of it:

- ``sample_loss``: l per sample (training, J, per-sample gradients, L-CODEC, the
  membership-inference figures);
- ``logit_hessian``: d^2 l / d logits^2 per sample, PSD, for the Gauss-Newton Hessian
  (for a loss convex in the logits it is the exact Hessian of l in the logits);
- ``logit_gradient``: d l / d logits per sample (Scan's trailing-layer Hessian);
- ``shift_invariant``: l depends on the logits only through their softmax, so adding
  the same number to every class's logit changes nothing (the softmax gauge of
  ``sparse_selection``);
- ``convex_in_logits``: with a linear model, J is then convex (the exact Newton step is
  the retrain's optimum, DESIGN 4.4).

A model carries its task (``attach_task``; the server attaches the one its stored spec
names whenever it builds the model), so every function handed the model computes the
same objective; a model without one is trained under cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "CROSS_ENTROPY",
    "CrossEntropy",
    "Task",
    "attach_task",
    "builtin_task",
    "task_of",
]

_ATTRIBUTE = "expunge_task"


@runtime_checkable
class Task(Protocol):
    """A classification loss over logits ``(B, C)`` and integer labels ``(B,)``."""

    @property
    def name(self) -> str: ...

    @property
    def shift_invariant(self) -> bool: ...

    @property
    def convex_in_logits(self) -> bool: ...

    def sample_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` losses; differentiable in ``logits``, and traceable by ``torch.func.vmap``
        (per-sample gradients): no ``.item()``, no branching on values (``one_hot`` is
        such a branch; compare ``labels`` with ``arange(C)`` instead)."""
        ...

    def logit_gradient(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(B, C)``: d l / d logits per sample."""
        ...

    def logit_hessian(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(B, C, C)``: d^2 l / d logits^2 per sample, symmetric PSD."""
        ...


@dataclass(frozen=True)
class CrossEntropy:
    """Cross-entropy against the label smoothed towards uniform by ``label_smoothing``:
    q = (1 - eps) onehot(y) + eps / C, l = -sum_c q_c log softmax(z)_c."""

    label_smoothing: float = 0.0
    shift_invariant: bool = True
    convex_in_logits: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")

    @property
    def name(self) -> str:
        if self.label_smoothing:
            return f"cross_entropy(label_smoothing={self.label_smoothing:g})"
        return "cross_entropy"

    def sample_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(
            logits, labels, reduction="none", label_smoothing=self.label_smoothing
        )

    def logit_gradient(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype)
        if self.label_smoothing:
            target = (1.0 - self.label_smoothing) * target + self.label_smoothing / logits.shape[1]
        return torch.softmax(logits, dim=1) - target

    def logit_hessian(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The targets sum to one, so smoothing leaves diag(p) - p p^T unchanged.
        probs = torch.softmax(logits, dim=1)
        return torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)


CROSS_ENTROPY = CrossEntropy()


class AutogradTask:
    """Derivatives of a custom ``sample_loss`` by autograd: what a trusted task may inherit.

    ``logit_hessian`` is projected onto the PSD cone (negative eigenvalues dropped): the
    Gauss-Newton Hessian must stay PSD for a loss that is not convex in the logits."""

    name = "custom"
    shift_invariant = False
    convex_in_logits = False

    def sample_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logit_gradient(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Samples are independent: the gradient of the summed losses holds each one's own.
        with torch.enable_grad():
            z = logits.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self.sample_loss(z, labels).sum(), z)
        return gradient

    def logit_hessian(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Row c of every sample's Hessian is one backward pass of the summed c-th gradients.
        with torch.enable_grad():
            z = logits.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(
                self.sample_loss(z, labels).sum(), z, create_graph=True
            )
            if not gradient.requires_grad:  # linear in the logits: no curvature
                return torch.zeros(*z.shape, z.shape[1], dtype=z.dtype, device=z.device)
            rows = [
                torch.autograd.grad(gradient[:, c].sum(), z, retain_graph=True)[0]
                for c in range(z.shape[1])
            ]
        blocks = torch.stack(rows, dim=1)  # (B, C, C)
        blocks = 0.5 * (blocks + blocks.transpose(1, 2))
        values, vectors = torch.linalg.eigh(blocks)
        return (vectors * values.clamp(min=0).unsqueeze(1)) @ vectors.transpose(1, 2)


def builtin_task(loss: str, label_smoothing: float = 0.0) -> Task | None:
    """The built-in task ``loss`` names (None: not built in)."""
    if loss == "cross_entropy":
        return CrossEntropy(label_smoothing)
    return None


def attach_task(model: nn.Module, task: Task) -> nn.Module:
    """Make ``task`` the loss every algorithm computes for ``model``; returns the model."""
    object.__setattr__(model, _ATTRIBUTE, task)
    return model


def task_of(model: nn.Module) -> Task:
    """The loss ``model`` was trained under (cross-entropy unless one was attached)."""
    task = getattr(model, _ATTRIBUTE, None)
    return task if task is not None else CROSS_ENTROPY
