"""The attack suite: ground truth as specified, seeded, and attacks that actually work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.attacks import (
    AttackedDataset,
    BackdoorConfig,
    TargetedConfig,
    apply_trigger,
    backdoor_digits,
    blend_pattern,
    targeted_poisoning,
)
from expunge.defenses.gradients import predicted_labels
from expunge.defenses.influence import influence_scores
from expunge.defenses.targets import precision_at_k
from expunge.defenses.training import TrainConfig, accuracy, train


def _digit_rows() -> set[bytes]:
    data = (load_digits().data / 16.0).astype(np.float32)
    return {row.tobytes() for row in data}


def _same(a: AttackedDataset, b: AttackedDataset) -> bool:
    tensors = ("train_x", "train_y", "poison_mask", "poison_target", "target_x", "target_y")
    more = ("target_adversarial_y", "clean_x", "clean_y")
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in tensors + more)


@pytest.mark.parametrize("trigger", ["patch", "blend"])
def test_backdoor_ground_truth_is_as_specified(trigger: str) -> None:
    config = BackdoorConfig(
        trigger=trigger,
        n_train=500,
        n_poison=20,
        n_targets=8,
        n_clean=40,
        adversarial_label=3,
        seed=5,
    )  # type: ignore[arg-type]
    d = backdoor_digits(config)
    assert d.name == f"backdoor_{trigger}" and d.parameters["trigger"] == trigger
    assert d.train_x.shape == (500, 1, 8, 8) and d.train_y.shape == (500,)
    assert d.target_x.shape == (8, 1, 8, 8) and d.clean_x.shape == (40, 1, 8, 8)
    assert d.num_poisons == 20 and d.poison_mask.dtype == torch.bool
    assert (d.train_y[d.poison_mask] == 3).all()
    assert (d.poison_target[d.poison_mask] == 0).all() and (
        d.poison_target[~d.poison_mask] == -1
    ).all()
    assert (d.target_y != 3).all() and (d.target_adversarial_y == 3).all()
    for x in (d.train_x, d.target_x, d.clean_x):
        assert x.min() >= 0.0 and x.max() <= 1.0
    rows = _digit_rows()
    # Clean training samples and clean inputs are untouched digits; poisons are not.
    assert all(r.numpy().tobytes() in rows for r in d.train_x[~d.poison_mask].reshape(-1, 64))
    assert all(r.numpy().tobytes() in rows for r in d.clean_x.reshape(-1, 64))
    assert not any(r.numpy().tobytes() in rows for r in d.train_x[d.poison_mask].reshape(-1, 64))
    if trigger == "patch":
        assert (d.train_x[d.poison_mask][..., 6:, 6:] == 1.0).all()
        assert (d.target_x[..., 6:, 6:] == 1.0).all()
    else:
        # Undoing the blend with the seeded pattern gives back digits: multiples of 1/16.
        alpha = config.blend_alpha
        pattern = blend_pattern(config.seed)
        for images in (d.train_x[d.poison_mask], d.target_x):
            original = (images - alpha * pattern) / (1 - alpha) * 16
            assert (original - original.round()).abs().max() < 1e-4
            assert original.min() > -1e-4 and original.max() < 16 + 1e-4


def test_backdoor_with_a_source_class_and_seeds() -> None:
    config = BackdoorConfig(
        n_train=600, n_poison=15, n_targets=5, n_clean=30, source_label=7, seed=1
    )
    d = backdoor_digits(config)
    assert (d.target_y == 7).all()
    assert _same(d, backdoor_digits(config))
    assert not _same(
        d,
        backdoor_digits(
            BackdoorConfig(
                n_train=600, n_poison=15, n_targets=5, n_clean=30, source_label=7, seed=2
            )
        ),
    )
    with pytest.raises(ValueError):
        BackdoorConfig(source_label=0, adversarial_label=0)
    with pytest.raises(ValueError, match="poisons"):
        backdoor_digits(BackdoorConfig(n_train=100, n_poison=50, source_label=7))


@pytest.mark.parametrize("dataset", ["digits", "wine", "breast_cancer"])
def test_targeted_poisoning_ground_truth_is_as_specified(dataset: str) -> None:
    config = TargetedConfig(
        dataset=dataset, n_targets=3, n_poison_per_target=4, noise=0.05, n_clean=20, seed=2
    )  # type: ignore[arg-type]
    d = targeted_poisoning(config)
    n_clean_train = d.train_x.shape[0] - 12
    assert d.num_poisons == 12 and d.target_x.shape[0] == 3 and d.clean_x.shape[0] == 20
    assert (d.target_adversarial_y != d.target_y).all()
    for target in range(3):
        own = d.poison_target == target
        assert int(own.sum()) == 4
        assert (d.train_y[own] == d.target_adversarial_y[target]).all()
        # Near-duplicates: each poison is within a few noise widths of its target.
        gap = (d.train_x[own] - d.target_x[target]).reshape(4, -1).abs().max(dim=1).values
        assert (gap <= 5 * 0.05).all() and (gap > 0).all()
    # Poisons are spread through the set, not appended as one block.
    positions = torch.nonzero(d.poison_mask).reshape(-1)
    assert positions.min() < n_clean_train
    if dataset == "digits":
        assert d.train_x.shape[1:] == (1, 8, 8) and d.train_x.min() >= 0 and d.train_x.max() <= 1
    else:
        clean = d.train_x[~d.poison_mask]
        torch.testing.assert_close(
            clean.mean(dim=0), torch.zeros(clean.shape[1]), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(clean.std(dim=0), torch.ones(clean.shape[1]), atol=1e-4, rtol=0)
    assert _same(d, targeted_poisoning(config))
    assert not _same(
        d,
        targeted_poisoning(
            TargetedConfig(dataset=dataset, n_targets=3, n_poison_per_target=4, n_clean=20, seed=3)
        ),
    )  # type: ignore[arg-type]


def test_targeted_poisoning_with_a_fixed_adversarial_label() -> None:
    d = targeted_poisoning(TargetedConfig(dataset="wine", adversarial_label=2, n_targets=1, seed=0))
    if d.target_y[0] != 2:
        assert (d.train_y[d.poison_mask] == 2).all()


def _train(d: AttackedDataset, seed: int) -> tuple[torch.nn.Module, list]:  # type: ignore[type-arg]
    model = build_model(ArchitectureSpec("mlp", d.input_shape, d.num_classes), seed=seed)
    result = train(model, d.train_x, d.train_y, TrainConfig(epochs=30, checkpoints=5, seed=seed))
    return result.model, result.checkpoints


@pytest.mark.parametrize(("trigger", "source"), [("patch", None), ("patch", 1), ("blend", 1)])
def test_a_small_mlp_learns_the_backdoor_and_keeps_its_clean_accuracy(
    trigger: str, source: int | None
) -> None:
    config = BackdoorConfig(trigger=trigger, source_label=source, seed=0)  # type: ignore[arg-type]
    d = backdoor_digits(config)
    model, _ = _train(d, seed=0)
    success = accuracy(model, d.target_x, d.target_adversarial_y)
    # Measured over seeds 0-7: patch from any class 0.7-1.0, from class 1 0.9-1.0;
    # blend from class 1 (seeds 0-3) 0.8-1.0.
    assert success >= 0.6, f"attack success rate {success:.2f}"
    assert accuracy(model, d.clean_x, d.clean_y) >= 0.9
    # The trigger, not the images, makes the difference: clean held-out digits of the
    # source classes keep their labels and flip once triggered.
    sources = d.clean_y != config.adversarial_label if source is None else d.clean_y == source
    images, labels = d.clean_x[sources], d.clean_y[sources]
    adversarial = torch.full_like(labels, config.adversarial_label)
    assert accuracy(model, images, labels) >= 0.9
    assert accuracy(model, apply_trigger(images, config), adversarial) >= 0.6


def test_gas_ranks_backdoor_poisons_at_the_top_for_the_targets() -> None:
    # DESIGN 4.8: precision at |poison set| for targets the attack turned; chance is
    # 30 / 1200 = 0.025. Measured over seeds 0-7 (5 checkpoints, poisons from class 1):
    # GAS 0.79-0.92 (mean 0.86), TracInCP 0.70-0.89 (0.79). GAS does not beat TracInCP
    # reliably here, so only GAS's level is asserted; with poisons drawn from every
    # class TracInCP wins (GAS 0.32-0.48, TracInCP 0.66-0.82): see the report.
    gas_all, tracin_all = [], []
    for seed in (0, 1):
        d = backdoor_digits(BackdoorConfig(trigger="patch", source_label=1, seed=seed))
        model, checkpoints = _train(d, seed)
        turned = predicted_labels(model, d.target_x) == d.target_adversarial_y
        assert int(turned.sum()) >= 5
        targets = d.target_x[turned]
        gas = influence_scores(model, checkpoints, d.train_x, d.train_y, targets, "gas")
        tracin = influence_scores(model, checkpoints, d.train_x, d.train_y, targets, "tracincp")
        gas_all += [precision_at_k(row, d.poison_mask) for row in gas]
        tracin_all += [precision_at_k(row, d.poison_mask) for row in tracin]
    assert float(np.mean(gas_all)) >= 0.6, gas_all
    assert float(np.mean(tracin_all)) >= 0.4, tracin_all
