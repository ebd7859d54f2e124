"""The defenses on a CUDA device agree with the CPU; on the CPU a named device changes nothing.

The CUDA tests carry ``gpu`` and skip without CUDA. They use float64 models, so CPU and
CUDA kernels differ only in the order of their roundings (tolerances below); training
in float32 is compared by the server's own tests (tests/server/test_device.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from sklearn.datasets import load_wine
from torch import nn

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.counterfactual import SharedHessianCounterfactual
from expunge.defenses.influence import INFLUENCE_METHODS, InfluenceConfig, influence_scores
from expunge.defenses.newton import NewtonConfig, newton_update
from expunge.defenses.selection import ParameterSelection
from expunge.defenses.training import TrainConfig, train
from expunge.server.state.weights import model_to_bytes

# float64 on both devices: sums taken in another order differ by ~1e-15 relative per
# operation; training (tens of SGD steps, then L-BFGS) and the Newton solves amplify that.
RTOL = 1e-6
ATOL = 1e-8
# Trained weights: the L-BFGS polish may stop one iteration apart on the two devices.
ATOL_TRAINED = 1e-6
# Arnoldi's Ritz vectors come out of an iteration that re-orthogonalises in another order.
RTOL_ARNOLDI = 1e-5
ATOL_ARNOLDI = 1e-7
WEIGHT_DECAY = 1e-2

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _wine() -> tuple[torch.Tensor, torch.Tensor]:
    raw = load_wine()
    x = torch.tensor(raw.data, dtype=torch.float64)
    return (x - x.mean(dim=0)) / x.std(dim=0), torch.tensor(raw.target)


def _config() -> TrainConfig:
    return TrainConfig(
        epochs=4,
        batch_size=16,
        checkpoints=3,
        weight_decay=WEIGHT_DECAY,
        polish_iterations=50,
        polish_tolerance=1e-10,
    )


def _model() -> nn.Module:
    return build_model(ArchitectureSpec("mlp", (13,), 3, hidden=(6,)), seed=0).double()


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, list, torch.Tensor, torch.Tensor]:
    """A float64 MLP trained on the CPU, its checkpoints, and its training data."""
    x, y = _wine()
    result = train(_model(), x[:120], y[:120], _config())
    return result.model, result.checkpoints, x[:120], y[:120]


def _parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])


# --- on the CPU: an explicit device is the default --------------------------------------


def test_training_on_a_named_cpu_changes_no_byte() -> None:
    x, y = _wine()
    default = train(_model(), x[:120], y[:120], _config())
    named = train(_model(), x[:120], y[:120], _config(), device="cpu")
    assert model_to_bytes(named.model) == model_to_bytes(default.model)
    # Tensor by tensor: the checkpoint file's metadata order is not fixed by safetensors.
    for a, b in zip(named.checkpoints, default.checkpoints, strict=True):
        assert (a.step, a.learning_rate, list(a.state)) == (b.step, b.learning_rate, list(b.state))
        assert all(torch.equal(a.state[k], b.state[k]) for k in b.state)


@pytest.mark.parametrize("method", ["gas", "if", "representer"])
def test_influence_on_a_named_cpu_changes_no_value(trained, method: str) -> None:
    model, checkpoints, x, y = trained
    config = InfluenceConfig(weight_decay=WEIGHT_DECAY, hessian="exact")
    default = influence_scores(model, checkpoints, x, y, x[:4], method, config)
    named = influence_scores(model, checkpoints, x, y, x[:4], method, config, device="cpu")
    assert torch.equal(default, named)


# --- on CUDA: the same numbers within RTOL/ATOL -------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_cuda_training_matches_cpu_and_stores_cpu_tensors() -> None:
    x, y = _wine()
    on_cpu = train(_model(), x[:120], y[:120], _config())
    model = _model()
    on_gpu = train(model, x[:120], y[:120], _config(), device="cuda")
    # Handed back where it came from; checkpoints are CPU tensors whatever the device.
    assert next(model.parameters()).device.type == "cpu"
    assert all(t.device.type == "cpu" for c in on_gpu.checkpoints for t in c.state.values())
    torch.testing.assert_close(
        _parameters(on_gpu.model), _parameters(on_cpu.model), rtol=RTOL, atol=ATOL_TRAINED
    )
    for a, b in zip(on_gpu.checkpoints, on_cpu.checkpoints, strict=True):
        assert a.step == b.step and a.learning_rate == b.learning_rate
        for name in b.state:
            torch.testing.assert_close(a.state[name], b.state[name], rtol=RTOL, atol=ATOL)


@pytest.mark.gpu
@needs_cuda
def test_cuda_newton_step_matches_cpu(trained) -> None:
    model, _, x, y = trained
    config = NewtonConfig(iterations=2)
    selection = ParameterSelection.everything(model)
    on_cpu = newton_update(model, selection, x[:6], y[:6], x[6:], y[6:], WEIGHT_DECAY, config)
    gpu_model = copy.deepcopy(model).to("cuda")
    on_gpu = newton_update(
        gpu_model, ParameterSelection.everything(gpu_model), x[:6], y[:6], x[6:], y[6:],
        WEIGHT_DECAY, config,
    )  # fmt: skip
    assert on_gpu.delta.is_cuda
    torch.testing.assert_close(on_gpu.delta.cpu(), on_cpu.delta, rtol=RTOL, atol=ATOL)
    assert on_gpu.accepted == on_cpu.accepted and on_gpu.iterations == on_cpu.iterations
    assert on_gpu.residual_norm_all == pytest.approx(on_cpu.residual_norm_all, rel=1e-4, abs=1e-10)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", INFLUENCE_METHODS)
def test_cuda_influence_scores_match_cpu(trained, method: str) -> None:
    model, checkpoints, x, y = trained
    config = InfluenceConfig(weight_decay=WEIGHT_DECAY, hessian="exact")
    on_cpu = influence_scores(model, checkpoints, x, y, x[:5], method, config)
    on_gpu = influence_scores(model, checkpoints, x, y, x[:5], method, config, device="cuda")
    assert on_gpu.is_cuda and next(model.parameters()).device.type == "cpu"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=RTOL, atol=ATOL)


@pytest.mark.gpu
@needs_cuda
def test_cuda_arnoldi_influence_matches_cpu(trained) -> None:
    model, checkpoints, x, y = trained
    config = InfluenceConfig(weight_decay=WEIGHT_DECAY, hessian="arnoldi", arnoldi_iterations=20)
    on_cpu = influence_scores(model, checkpoints, x, y, x[:5], "if", config)
    on_gpu = influence_scores(model, checkpoints, x, y, x[:5], "if", config, device="cuda")
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=RTOL_ARNOLDI, atol=ATOL_ARNOLDI)


@pytest.mark.gpu
@needs_cuda
def test_cuda_counterfactual_matches_cpu(trained) -> None:
    model, _, x, y = trained
    removed = torch.arange(5)
    on_cpu = SharedHessianCounterfactual(model, x, y, WEIGHT_DECAY).removal_delta(removed)
    solver = SharedHessianCounterfactual(copy.deepcopy(model).to("cuda"), x, y, WEIGHT_DECAY)
    on_gpu = solver.removal_delta(removed)
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=RTOL, atol=ATOL)
    assert solver.probability_drop(x[0], removed) == pytest.approx(
        SharedHessianCounterfactual(model, x, y, WEIGHT_DECAY).probability_drop(x[0], removed),
        abs=1e-8,
    )
