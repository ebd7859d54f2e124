from __future__ import annotations

import itertools

import torch
from sklearn.datasets import load_digits

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.training import TrainConfig, accuracy, train
from expunge.server.state.weights import model_to_bytes


def _digits(n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    raw = load_digits()
    x = torch.tensor(raw.data[:n] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x, torch.tensor(raw.target[:n])


def test_training_is_deterministic_to_the_byte() -> None:
    x, y = _digits()
    config = TrainConfig(epochs=3, seed=7)
    spec = ArchitectureSpec("mlp", (1, 8, 8), 10)
    a = train(build_model(spec, 7), x, y, config)
    b = train(build_model(spec, 7), x, y, config)
    assert model_to_bytes(a.model) == model_to_bytes(b.model)
    c = train(build_model(spec, 8), x, y, TrainConfig(epochs=3, seed=8))
    assert model_to_bytes(a.model) != model_to_bytes(c.model)


def test_checkpoints_follow_the_trajectory_with_their_learning_rates() -> None:
    x, y = _digits()
    config = TrainConfig(
        epochs=4, batch_size=50, checkpoints=8, schedule="cosine", learning_rate=0.1
    )
    result = train(build_model(ArchitectureSpec("mlp", (1, 8, 8), 10), 0), x, y, config)
    steps = [c.step for c in result.checkpoints]
    assert len(steps) == 8 and steps == sorted(steps) and steps[0] == 0
    rates = [c.learning_rate for c in result.checkpoints]
    assert rates[0] == 0.1 and all(a > b for a, b in itertools.pairwise(rates))
    # Checkpoints are copies, not references to the live parameters.
    first = result.checkpoints[0].state["1.weight"]
    assert not torch.equal(first, result.model.state_dict()["1.weight"])


def test_every_builtin_architecture_learns_digits() -> None:
    x, y = _digits(600)
    for name in ("logreg", "mlp", "cnn", "resnet"):
        model = build_model(ArchitectureSpec(name, (1, 8, 8), 10), 0)
        train(model, x[:500], y[:500], TrainConfig(epochs=6, batch_size=16, learning_rate=0.05))
        assert accuracy(model, x[500:], y[500:]) > 0.5, name
