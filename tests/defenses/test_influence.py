"""Influence estimators against explicit double loops over plain autograd, in float64."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from sklearn.datasets import load_wine
from torch import nn

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.influence import INFLUENCE_METHODS, InfluenceConfig, influence_scores
from expunge.defenses.training import Checkpoint, TrainConfig, train

RTOL = 1e-9
ATOL = 1e-12
WEIGHT_DECAY = 1e-2


@dataclass(frozen=True)
class Setup:
    model: nn.Module
    checkpoints: list[Checkpoint]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor


def _wine() -> tuple[torch.Tensor, torch.Tensor]:
    raw = load_wine()
    x = torch.tensor(raw.data, dtype=torch.float64)
    x = (x - x.mean(dim=0)) / x.std(dim=0)
    return x, torch.tensor(raw.target)


def _setup(arch: str, polish: int = 0) -> Setup:
    x, y = _wine()
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = order[:30], order[30:34]
    model = build_model(ArchitectureSpec(arch, (13,), 3, hidden=(6,)), seed=0).double()
    config = TrainConfig(
        epochs=4,
        batch_size=8,
        checkpoints=3,
        weight_decay=WEIGHT_DECAY,
        polish_iterations=polish,
        polish_tolerance=1e-10,
    )
    result = train(model, x[train_idx], y[train_idx], config)
    return Setup(result.model, result.checkpoints, x[train_idx], y[train_idx], x[test_idx])


@pytest.fixture(scope="module")
def mlp() -> Setup:
    return _setup("mlp")


@pytest.fixture(scope="module")
def logreg() -> Setup:
    return _setup("logreg")


# --- the oracle: one sample at a time, .backward() ------------------------------------------


def _gradient(model: nn.Module, x: torch.Tensor, y: int) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x.unsqueeze(0)), torch.tensor([y]))
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}  # type: ignore[union-attr]


def _flat(grads: dict[str, torch.Tensor], names: list[str] | None = None) -> torch.Tensor:
    keys = names if names is not None else list(grads)
    return torch.cat([grads[k].reshape(-1) for k in keys])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def _module_layers(model: nn.Module) -> list[list[str]]:
    """Parameter names of each module that owns parameters directly."""
    layers = []
    for prefix, module in model.named_modules():
        own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
        if own:
            layers.append(own)
    return layers


def _oracle_checkpoint_method(s: Setup, method: str) -> torch.Tensor:
    work = copy.deepcopy(s.model)
    labels = s.model(s.test_x).argmax(dim=1).tolist()
    out = torch.zeros(len(labels), len(s.train_y), dtype=torch.float64)
    for checkpoint in s.checkpoints:
        work.load_state_dict(checkpoint.state)
        for j, label in enumerate(labels):
            g_te = _gradient(work, s.test_x[j], label)
            for i in range(len(s.train_y)):
                g_i = _gradient(work, s.train_x[i], int(s.train_y[i]))
                if method == "tracincp":
                    value = float(_flat(g_i) @ _flat(g_te))
                elif method == "gas":
                    value = _cos(_flat(g_i), _flat(g_te))
                else:
                    value = sum(
                        _cos(_flat(g_i, layer), _flat(g_te, layer))
                        for layer in _module_layers(work)
                    )
                out[j, i] += checkpoint.learning_rate * value
    return out


def _oracle_hessian(s: Setup) -> torch.Tensor:
    """Hessian of J = mean loss + (wd/2)|theta|^2, one row per double backward."""
    params = list(s.model.parameters())
    loss = nn.functional.cross_entropy(s.model(s.train_x), s.train_y)
    objective = loss + 0.5 * WEIGHT_DECAY * sum((p * p).sum() for p in params)
    gradient = torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(objective, params, create_graph=True)]
    )
    rows = []
    for k in range(gradient.shape[0]):
        row = torch.autograd.grad(gradient[k], params, retain_graph=True)
        rows.append(torch.cat([r.reshape(-1) for r in row]))
    return torch.stack(rows).detach()


def _oracle_influence_function(s: Setup, damping: float, renormalise: bool) -> torch.Tensor:
    hessian = _oracle_hessian(s) + damping * torch.eye(
        sum(p.numel() for p in s.model.parameters()), dtype=torch.float64
    )
    labels = s.model(s.test_x).argmax(dim=1).tolist()
    out = torch.zeros(len(labels), len(s.train_y), dtype=torch.float64)
    for j, label in enumerate(labels):
        solved = torch.linalg.solve(hessian, _flat(_gradient(s.model, s.test_x[j], label)))
        for i in range(len(s.train_y)):
            g_i = _flat(_gradient(s.model, s.train_x[i], int(s.train_y[i])))
            out[j, i] = _cos(solved, g_i) if renormalise else float(solved @ g_i)
    return out


def _features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input of the last Linear with a 1 appended (its bias), and the logits."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    logits = model(x.unsqueeze(0))
    handle.remove()
    return torch.cat([seen[0].reshape(-1), torch.ones(1, dtype=x.dtype)]).detach(), logits


def _oracle_representer(
    s: Setup, renormalise: bool, labels: list[int] | None = None
) -> torch.Tensor:
    n = len(s.train_y)
    if labels is None:
        labels = s.model(s.test_x).argmax(dim=1).tolist()
    out = torch.zeros(len(labels), n, dtype=torch.float64)
    for i in range(n):
        f_i, logits = _features(s.model, s.train_x[i])
        loss = nn.functional.cross_entropy(logits, s.train_y[i : i + 1])
        (dlogits,) = torch.autograd.grad(loss, logits)
        alpha = -dlogits.reshape(-1) / (WEIGHT_DECAY * n)
        for j, label in enumerate(labels):
            f_te, _ = _features(s.model, s.test_x[j])
            if renormalise:
                out[j, i] = float(torch.sign(alpha[label])) * _cos(f_i, f_te)
            else:
                out[j, i] = float(alpha[label] * (f_i @ f_te))
    return out


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tracincp", "gas", "lgas"])
def test_checkpoint_estimators_equal_the_double_loop(mlp: Setup, method: str) -> None:
    # batch_size 7 splits the 30 training samples into uneven chunks.
    config = InfluenceConfig(batch_size=7)
    got = influence_scores(
        mlp.model, mlp.checkpoints, mlp.train_x, mlp.train_y, mlp.test_x, method, config
    )  # type: ignore[arg-type]
    assert got.dtype == torch.float64 and got.shape == (4, 30)
    torch.testing.assert_close(got, _oracle_checkpoint_method(mlp, method), rtol=RTOL, atol=ATOL)


def test_lgas_differs_from_gas_and_per_parameter_layers_differ_again(mlp: Setup) -> None:
    args = (mlp.model, mlp.checkpoints, mlp.train_x, mlp.train_y, mlp.test_x)
    gas = influence_scores(*args, "gas")
    lgas = influence_scores(*args, "lgas")
    per_tensor = influence_scores(*args, "lgas", InfluenceConfig(layer_grouping="parameter"))
    assert not torch.allclose(gas, lgas) and not torch.allclose(lgas, per_tensor)
    # Each cosine is at most 1: LGAS is bounded by sum_t eta_t * (number of layers).
    bound = sum(c.learning_rate for c in mlp.checkpoints)
    assert lgas.abs().max() <= 2 * bound and per_tensor.abs().max() <= 4 * bound


@pytest.mark.parametrize("method", ["if", "rif"])
def test_influence_functions_equal_the_double_loop(mlp: Setup, method: str) -> None:
    config = InfluenceConfig(weight_decay=WEIGHT_DECAY, damping=0.05, hessian="exact", batch_size=7)
    got = influence_scores(mlp.model, [], mlp.train_x, mlp.train_y, mlp.test_x, method, config)  # type: ignore[arg-type]
    want = _oracle_influence_function(mlp, 0.05, renormalise=method == "rif")
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("method", ["representer", "rrepresenter"])
def test_representer_points_equal_the_double_loop(mlp: Setup, method: str) -> None:
    config = InfluenceConfig(weight_decay=WEIGHT_DECAY, batch_size=7)
    got = influence_scores(mlp.model, [], mlp.train_x, mlp.train_y, mlp.test_x, method, config)  # type: ignore[arg-type]
    want = _oracle_representer(mlp, renormalise=method == "rrepresenter")
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_representer_values_sum_to_the_logits_at_the_optimum() -> None:
    # At a stationary point of J the last layer is exactly sum_i alpha_i (f_i, 1)^T:
    # the representer theorem, and a check that lambda = weight_decay / 2 and the bias
    # column are right.
    s = _setup("mlp", polish=300)
    config = InfluenceConfig(weight_decay=WEIGHT_DECAY)
    with torch.no_grad():
        logits = s.model(s.test_x)
    for c in range(3):
        labels = torch.full((s.test_x.shape[0],), c)
        values = influence_scores(
            s.model, [], s.train_x, s.train_y, s.test_x, "representer", config, labels
        )
        torch.testing.assert_close(values.sum(dim=1), logits[:, c], rtol=1e-4, atol=1e-4)


def test_arnoldi_and_lissa_match_the_exact_inverse_on_logistic_regression(logreg: Setup) -> None:
    args: tuple[Any, ...] = (logreg.model, [], logreg.train_x, logreg.train_y, logreg.test_x)
    base = {"weight_decay": WEIGHT_DECAY, "damping": 0.1}
    exact = influence_scores(*args, "if", InfluenceConfig(hessian="exact", **base))  # type: ignore[arg-type]
    p = sum(q.numel() for q in logreg.model.parameters())
    arnoldi = influence_scores(
        *args,
        "if",
        InfluenceConfig(hessian="arnoldi", arnoldi_iterations=p, arnoldi_top_k=p, **base),  # type: ignore[arg-type]
    )
    torch.testing.assert_close(arnoldi, exact, rtol=1e-7, atol=1e-10)
    # Full-batch LiSSA contracts by 1 - (lambda_min + mu) / scale a step: take the scale
    # and the depth from the true spectrum so the test checks the recursion, not luck.
    eigenvalues = torch.linalg.eigvalsh(_oracle_hessian(logreg))
    scale = 1.1 * (float(eigenvalues.max()) + 0.1)
    rate = 1.0 - (float(eigenvalues.min()) + 0.1) / scale
    depth = math.ceil(math.log(1e-10) / math.log(rate))
    lissa = influence_scores(
        *args,
        "if",
        InfluenceConfig(hessian="lissa", lissa_scale=scale, lissa_depth=depth, **base),  # type: ignore[arg-type]
    )
    torch.testing.assert_close(lissa, exact, rtol=1e-7, atol=1e-10)
    # Minibatch LiSSA is noisy but must still point the same way.
    noisy = influence_scores(
        *args,
        "if",
        InfluenceConfig(
            hessian="lissa",
            lissa_scale=2 * scale,
            lissa_depth=80,
            lissa_batch_size=10,
            lissa_repeats=2,
            **base,  # type: ignore[arg-type]
        ),
    )
    assert torch.corrcoef(torch.stack([noisy.reshape(-1), exact.reshape(-1)]))[0, 1] > 0.95


def test_arnoldi_with_few_eigenpairs_tracks_the_exact_influence(mlp: Setup) -> None:
    args: tuple[Any, ...] = (mlp.model, [], mlp.train_x, mlp.train_y, mlp.test_x)
    base = {"weight_decay": WEIGHT_DECAY, "damping": 0.05}
    exact = influence_scores(*args, "if", InfluenceConfig(hessian="exact", **base))  # type: ignore[arg-type]
    p = sum(q.numel() for q in mlp.model.parameters())
    full = InfluenceConfig(hessian="arnoldi", arnoldi_iterations=p, arnoldi_top_k=p, **base)  # type: ignore[arg-type]
    torch.testing.assert_close(influence_scores(*args, "if", full), exact, rtol=1e-6, atol=1e-9)
    partial = InfluenceConfig(hessian="arnoldi", arnoldi_iterations=40, arnoldi_top_k=20, **base)  # type: ignore[arg-type]
    approx = influence_scores(*args, "if", partial)
    assert torch.isfinite(approx).all()
    assert torch.corrcoef(torch.stack([approx.reshape(-1), exact.reshape(-1)]))[0, 1] > 0.5


def test_renormalised_scores_ignore_the_size_of_a_training_gradient() -> None:
    # A bias-free linear model at theta = 0 predicts uniform probabilities whatever the
    # input, so scaling a training input by c scales its gradient (p - e_y) x^T by c
    # exactly: renormalised estimators must not move, raw ones must scale by c.
    x, y = _wine()
    train_x, train_y, test_x = x[:30], y[:30], x[100:103]
    layer = nn.Linear(13, 3, bias=False).double()
    nn.init.zeros_(layer.weight)
    model = nn.Sequential(layer)
    zero = copy.deepcopy(model.state_dict())
    checkpoints = [Checkpoint(0, 0.1, zero), Checkpoint(10, 0.05, zero)]
    scaled_x = train_x.clone()
    scaled_x[3] *= 7.0
    labels = torch.tensor([0, 1, 2])
    config = InfluenceConfig(weight_decay=WEIGHT_DECAY)
    for method, factor in [
        ("gas", 1.0),
        ("lgas", 1.0),
        ("rrepresenter", 1.0),
        ("tracincp", 7.0),
        ("representer", 7.0),
    ]:
        before = influence_scores(
            model, checkpoints, train_x, train_y, test_x, method, config, labels
        )  # type: ignore[arg-type]
        after = influence_scores(
            model, checkpoints, scaled_x, train_y, test_x, method, config, labels
        )  # type: ignore[arg-type]
        torch.testing.assert_close(after[:, 3], factor * before[:, 3], rtol=1e-12, atol=1e-14)
        keep = torch.arange(30) != 3
        torch.testing.assert_close(after[:, keep], before[:, keep], rtol=1e-12, atol=1e-14)


def test_scores_use_the_final_prediction_and_leave_the_model_alone(mlp: Setup) -> None:
    before = copy.deepcopy(mlp.model.state_dict())
    predicted = mlp.model(mlp.test_x).argmax(dim=1)
    args = (mlp.model, mlp.checkpoints, mlp.train_x, mlp.train_y, mlp.test_x)
    default = influence_scores(*args, "gas")
    explicit = influence_scores(*args, "gas", None, predicted)
    other = influence_scores(*args, "gas", None, (predicted + 1) % 3)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert not torch.allclose(default, other)
    for name, value in mlp.model.state_dict().items():
        assert torch.equal(value, before[name])


def test_parameter_subset_matches_the_oracle_on_that_subset(mlp: Setup) -> None:
    names = ("3.weight", "3.bias")  # the output layer of Flatten, Linear, Tanh, Linear
    got = influence_scores(
        mlp.model,
        mlp.checkpoints,
        mlp.train_x,
        mlp.train_y,
        mlp.test_x,
        "gas",
        InfluenceConfig(param_names=names),
    )
    work = copy.deepcopy(mlp.model)
    labels = mlp.model(mlp.test_x).argmax(dim=1).tolist()
    want = torch.zeros_like(got)
    for checkpoint in mlp.checkpoints:
        work.load_state_dict(checkpoint.state)
        for j, label in enumerate(labels):
            g_te = _flat(_gradient(work, mlp.test_x[j], label), list(names))
            for i in range(30):
                g_i = _flat(_gradient(work, mlp.train_x[i], int(mlp.train_y[i])), list(names))
                want[j, i] += checkpoint.learning_rate * _cos(g_i, g_te)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_bad_arguments_are_refused(mlp: Setup) -> None:
    args = (mlp.model, mlp.checkpoints, mlp.train_x, mlp.train_y, mlp.test_x)
    with pytest.raises(ValueError, match="unknown influence method"):
        influence_scores(*args, "cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="checkpoint"):
        influence_scores(mlp.model, [], mlp.train_x, mlp.train_y, mlp.test_x, "gas")
    with pytest.raises(KeyError):
        influence_scores(*args, "gas", InfluenceConfig(param_names=("nope",)))
    with pytest.raises(ValueError, match="max_exact_parameters"):
        influence_scores(*args, "if", InfluenceConfig(hessian="exact", max_exact_parameters=10))
    with pytest.raises(ValueError):
        InfluenceConfig(hessian="newton")  # type: ignore[arg-type]
    assert set(INFLUENCE_METHODS) == {
        "tracincp",
        "gas",
        "lgas",
        "if",
        "rif",
        "representer",
        "rrepresenter",
    }
