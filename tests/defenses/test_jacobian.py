"""The direct per-sample logit Jacobian on a selection, against vmap(jacrev) (ground truth)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from expunge.defenses.newton.jacobian import selected_logit_jacobian
from expunge.defenses.newton.objective import RetainedObjective, _parameters
from expunge.defenses.selection import ParameterSelection


def _selection(model: nn.Module, share: float, seed: int) -> ParameterSelection:
    """A seeded random share of every parameter's entries (biases included)."""
    generator = torch.Generator().manual_seed(seed)
    indices = {}
    for name, p in model.named_parameters():
        keep = torch.rand(p.numel(), generator=generator) < share
        indices[name] = torch.nonzero(keep).flatten()
    return ParameterSelection(indices)


def _reference(objective: RetainedObjective, x: torch.Tensor) -> torch.Tensor:
    def logits_one(w: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        return objective.logits(w, xi.unsqueeze(0)).squeeze(0)

    return vmap(jacrev(logits_one), in_dims=(None, 0))(objective.v0, x)


def _direct(
    model: nn.Module, selection: ParameterSelection, x: torch.Tensor
) -> tuple[RetainedObjective, tuple[torch.Tensor, torch.Tensor] | None]:
    objective = RetainedObjective(model, _parameters(model), selection, 1e-3, 64)
    found = selected_logit_jacobian(
        model, lambda w: objective.logits(w, x), objective.v0, objective.names,
        objective.indices, x,
    )  # fmt: skip
    return objective, found


class _SequenceHead(nn.Module):
    """A Linear applied at every position of a sequence, then pooled: positions summed."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(x.view(len(x), 5, 4))).mean(dim=1))


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    )
    mlp = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 4))
    return {"cnn": (cnn, (2, 6, 6)), "mlp": (mlp, (7,)), "sequence": (_SequenceHead(), (20,))}


@pytest.mark.parametrize("name", ["cnn", "mlp", "sequence"])
def test_matches_jacrev_on_linear_and_convolution_layers(name: str) -> None:
    model, shape = _models()[name]
    model = model.double().eval()
    x = torch.randn(11, *shape, generator=torch.Generator().manual_seed(1)).double()
    selection = _selection(model, 0.4, seed=2)
    objective, found = _direct(model, selection, x)
    assert found is not None, "the direct form applies to Linear and Conv2d"
    jacobian, logits = found
    torch.testing.assert_close(jacobian, _reference(objective, x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits, objective.logits(objective.v0, x))


def test_gauss_newton_hessian_unchanged_by_the_direct_form() -> None:
    """The GN Hessian the Newton step uses equals J^T (diag p - p p^T) J from jacrev."""
    model, shape = _models()["cnn"]
    model = model.double().eval()
    x = torch.randn(9, *shape, generator=torch.Generator().manual_seed(3)).double()
    selection = _selection(model, 0.5, seed=4)
    objective, _ = _direct(model, selection, x)
    hessian = objective.hessian(objective.v0, x, torch.zeros(9).long(), "gauss_newton", 4)
    torch.testing.assert_close(hessian, _gauss_newton(objective, x), rtol=1e-9, atol=1e-12)


def _gauss_newton(objective: RetainedObjective, x: torch.Tensor) -> torch.Tensor:
    """J^T (diag p - p p^T) J / n + lambda I with J from jacrev (the ground truth)."""
    jacobian = _reference(objective, x)
    probs = torch.softmax(objective.logits(objective.v0, x), dim=1)
    curvature = torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)
    expected = torch.einsum("bcp,bcd,bdq->pq", jacobian, curvature, jacobian) / len(x)
    expected.diagonal().add_(objective.weight_decay)
    return expected


class _UsesWeightOutsideCall(nn.Module):
    """Reads its layer's weight directly as well as calling the layer: the hooks would
    miss the second use, so the direct form must decline."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x @ self.fc.weight.T


class _CallsTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.fc(x)))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize(
    "model",
    [
        _UsesWeightOutsideCall(),
        _CallsTwice(),
        _Tied(),
        nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)),
    ],
    ids=["weight-outside-call", "called-twice", "tied", "layer-norm"],
)
def test_declines_where_it_cannot_vouch_and_the_hessian_still_holds(model: nn.Module) -> None:
    model = model.double().eval()
    x = torch.randn(6, 4 if isinstance(model, _UsesWeightOutsideCall) else 3).double()
    selection = ParameterSelection.everything(model)
    objective, found = _direct(model, selection, x)
    assert found is None
    # The generic path serves the Hessian instead.
    hessian = objective.hessian(objective.v0, x, torch.zeros(6).long(), "gauss_newton", 6)
    torch.testing.assert_close(hessian, _gauss_newton(objective, x), rtol=1e-9, atol=1e-12)


def test_float32_model_on_the_direct_path() -> None:
    """The agreement check's float32 tolerance admits an exact float32 Jacobian."""
    model, shape = _models()["cnn"]
    model.eval()
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(5))
    objective, found = _direct(model, _selection(model, 0.3, seed=6), x)
    assert found is not None
    torch.testing.assert_close(found[0], _reference(objective, x), rtol=1e-4, atol=1e-5)


def test_functional_call_is_what_the_hooks_observe() -> None:
    """The hooks read the inputs functional_call feeds the modules (not the module's own
    stored parameters): a selection evaluated at moved entries still matches jacrev."""
    model, shape = _models()["mlp"]
    model = model.double().eval()
    x = torch.randn(5, *shape).double()
    selection = _selection(model, 0.6, seed=7)
    objective = RetainedObjective(model, _parameters(model), selection, 0.0, 64)
    moved = objective.v0 + 0.3
    found = selected_logit_jacobian(
        model, lambda w: objective.logits(w, x), moved, objective.names, objective.indices, x
    )
    assert found is not None

    def logits_one(w: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        return objective.logits(w, xi.unsqueeze(0)).squeeze(0)

    expected = vmap(jacrev(logits_one), in_dims=(None, 0))(moved, x)
    torch.testing.assert_close(found[0], expected, rtol=1e-10, atol=1e-12)
    params = {**_parameters(model)}
    torch.testing.assert_close(
        found[1], functional_call(model, objective.full_params(moved), (x,)).detach()
    )
    assert all(torch.equal(params[n], p.detach()) for n, p in model.named_parameters())
