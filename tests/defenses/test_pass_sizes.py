"""Passes sized by activations: the rule, and that batching changes no result."""

from __future__ import annotations

import torch

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.batching import PASS_BYTES, activation_floats, samples_per_pass
from expunge.defenses.evaluate import measure_set


def _cnn() -> torch.nn.Module:
    return build_model(ArchitectureSpec("cnn", (1, 16, 16), 10, channels=8), seed=0)


def test_a_pass_holds_about_the_byte_budget_of_activations_and_never_more_than_asked() -> None:
    cnn = _cnn().train()
    x = torch.rand(4, 1, 16, 16)
    floats = activation_floats(cnn, x)
    assert floats > 8 * 16 * 16  # the first convolution's output alone
    assert cnn.training, "measured in eval mode, the model's mode restored"
    assert samples_per_pass(cnn, x, 1 << 20) == PASS_BYTES // (4 * floats)
    assert samples_per_pass(cnn, x, 1 << 20, bytes_per_float=8) == PASS_BYTES // (8 * floats)
    assert samples_per_pass(cnn, x, 7) == 7  # the caller's largest batch bounds it
    # A tabular MLP's activations are few: the caller's batch is taken whole.
    mlp = build_model(ArchitectureSpec("mlp", (32,), 6, hidden=(64,)), seed=0)
    assert samples_per_pass(mlp, torch.rand(2, 32), 1024) == 1024


def test_measurements_do_not_depend_on_the_pass_size() -> None:
    cnn = build_model(ArchitectureSpec("cnn", (3, 32, 32), 10, channels=32), seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(300, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (300,), generator=generator)
    assert samples_per_pass(cnn, x, 1024) < 300, "the premise: several passes"
    split = measure_set(cnn, x, y)
    with torch.no_grad():
        whole = torch.nn.functional.cross_entropy(cnn(x), y, reduction="none")
    assert split.accuracy == float((cnn(x).argmax(1) == y).double().mean())
    assert torch.allclose(split.losses, whole, rtol=1e-5, atol=1e-6)
