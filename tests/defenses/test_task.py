"""The loss protocol: built-in cross-entropy (label smoothing) and a custom Task, against
autograd and against exact retraining."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn
from torch.func import functional_call

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.newton import NewtonConfig, newton_update
from expunge.defenses.newton.objective import RetainedObjective, _parameters
from expunge.defenses.selection import ParameterSelection
from expunge.defenses.task import CrossEntropy, Task, attach_task, task_of
from tests.server.losses import SquaredLogits

WD = 1e-2


def _autograd_derivatives(task: Task, z: torch.Tensor, y: torch.Tensor) -> tuple:
    grads, hessians = [], []
    for zi, yi in zip(z, y, strict=True):

        def one(v: torch.Tensor, label: torch.Tensor = yi) -> torch.Tensor:
            return task.sample_loss(v.unsqueeze(0), label.unsqueeze(0)).squeeze(0)

        grads.append(torch.autograd.functional.jacobian(one, zi))
        hessians.append(torch.autograd.functional.hessian(one, zi))
    return torch.stack(grads), torch.stack(hessians)


@pytest.mark.parametrize(
    "task", [CrossEntropy(), CrossEntropy(0.1), SquaredLogits()], ids=["ce", "ce-ls", "custom"]
)
def test_logit_derivatives_match_autograd(task: Task) -> None:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (7,), generator=generator)
    gradient, hessian = _autograd_derivatives(task, z, y)
    torch.testing.assert_close(task.logit_gradient(z, y), gradient)
    torch.testing.assert_close(task.logit_hessian(z, y), hessian)


def test_label_smoothing_is_torchs() -> None:
    z, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    expected = nn.functional.cross_entropy(z, y, reduction="none", label_smoothing=0.2)
    torch.testing.assert_close(CrossEntropy(0.2).sample_loss(z, y), expected)
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropy(1.0)


def test_a_built_model_carries_its_spec_loss() -> None:
    spec = ArchitectureSpec("mlp", (4,), 3, loss="cross_entropy", label_smoothing=0.1)
    model = build_model(spec)
    assert task_of(model) == CrossEntropy(0.1)
    assert task_of(nn.Linear(2, 2)) == CrossEntropy()  # nothing attached: the default
    assert ArchitectureSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="not built in"):
        build_model(ArchitectureSpec("mlp", (4,), 3, loss="focal"))


def test_gauss_newton_uses_the_tasks_curvature() -> None:
    """GN = sum_z J_z^T M_z J_z / n + lambda I with M the task's logit Hessian (here I)."""
    torch.manual_seed(0)
    model = attach_task(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)), SquaredLogits())
    model = model.double().eval()
    x, y = torch.randn(6, 3).double(), torch.randint(0, 4, (6,))
    selection = ParameterSelection.everything(model)
    objective = RetainedObjective(model, _parameters(model), selection, WD, 64)
    hessian = objective.hessian(objective.v0, x, y, "gauss_newton", 4)
    jacobian = torch.autograd.functional.jacobian(lambda v: objective.logits(v, x), objective.v0)
    expected = torch.einsum("bcp,bcq->pq", jacobian, jacobian) / len(x)
    expected.diagonal().add_(WD)
    torch.testing.assert_close(hessian, expected)


def _cancer() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    return x[:200], torch.tensor(data.target[:200])


def _optimum(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The exact minimiser of the model's J (plain Newton; logistic regression is small)."""
    task = task_of(model)
    v = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    shapes = [(n, p.shape) for n, p in model.named_parameters()]

    def j(w: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in shapes:
            size = int(torch.tensor(shape).prod())
            params[name] = w[offset : offset + size].reshape(shape)
            offset += size
        loss = task.sample_loss(functional_call(model, params, (x,)), y).mean()
        return loss + 0.5 * WD * (w * w).sum()

    for _ in range(40):
        g = torch.autograd.functional.jacobian(j, v)
        if float(g.norm()) < 1e-12:
            break
        v = v - torch.linalg.solve(torch.autograd.functional.hessian(j, v), g)
    assert float(g.norm()) < 1e-12
    return v


@pytest.mark.parametrize("task", [CrossEntropy(0.1), SquaredLogits()], ids=["ce-ls", "custom"])
def test_newton_removal_reaches_the_retrained_optimum_under_the_tasks_loss(task: Task) -> None:
    """On a convex model the Newton steps land on retraining without the forget set: the
    update optimises the model's own loss, not cross-entropy."""
    x, y = _cancer()
    model = attach_task(build_model(ArchitectureSpec("logreg", (30,), 2)).double(), task)
    torch.nn.utils.vector_to_parameters(_optimum(model, x, y), model.parameters())
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[:15] = False
    retrained = _optimum(model, x[keep], y[keep])
    before = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    result = newton_update(
        model,
        ParameterSelection.everything(model),
        x[~keep],
        y[~keep],
        x[keep],
        y[keep],
        WD,
        NewtonConfig(damping=0.0, iterations=5),
    )
    after = before + result.delta
    gap_before = float((before - retrained).norm())
    assert gap_before > 1e-3
    assert float((after - retrained).norm()) < 1e-6 * max(1.0, float(retrained.norm()))
