"""Held-out attacks for the scan benchmark: procedures the scan's defaults never saw.

The development attacks (``expunge.defenses.attacks``: a 2x2 bottom-right patch or a
blended noise pattern on digits, label-flipped near-duplicates for targeted poisoning)
are where the scan's defaults may be chosen. These are made differently, and nothing is
chosen on them (DESIGN 7):

- ``shape_backdoor``: a digits backdoor whose trigger is a shape at another place (a
  3x3 plus sign in the top-left corner, or a 5-pixel vertical line on the left edge),
  poisons drawn from one source class;
- ``tabular_backdoor``: a backdoor on standardised tabular rows (breast cancer, or a
  ``make_classification`` task): three chosen features set to an out-of-range value,
  poisons drawn from one source class.

``tabular_backdoor`` also makes the one *development* tabular attack, on other data
(``blobs``: ``make_blobs``, three classes of two Gaussian blobs each, 16 features) with
a two-feature trigger: the procedure is shared, the data and the trigger are not.

Each returns an ``AttackedDataset`` with the same ground truth as the development attacks.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits, make_blobs, make_classification

from expunge.defenses.attacks import AttackedDataset

Shape = Literal["cross", "line"]


def stamp(images: torch.Tensor, shape: Shape, value: float = 1.0) -> torch.Tensor:
    """Digits ``(n, 1, 8, 8)`` with the shape drawn on; a new tensor."""
    out = images.clone()
    if shape == "cross":  # a plus sign centred at (1, 1)
        out[..., 1, 0:3] = value
        out[..., 0:3, 1] = value
    else:  # a vertical line on the left edge, rows 1-5
        out[..., 1:6, 0] = value
    return out


def _split(n: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return order[:n_train], order[n_train:]


def _assemble(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    train: np.ndarray,
    pool: np.ndarray,
    trigger: object,
    source: int,
    adversarial: int,
    n_poison: int,
    n_targets: int,
    n_clean: int,
    seed: int,
    parameters: dict[str, object],
) -> AttackedDataset:
    rng = np.random.default_rng(seed + 1)
    train_x, train_y = x[train].clone(), y[train].clone()
    candidates = np.flatnonzero(train_y.numpy() == source)
    poisons = np.sort(rng.choice(candidates, size=n_poison, replace=False))
    train_x[poisons] = trigger(train_x[poisons])  # type: ignore[operator]
    train_y[poisons] = adversarial
    mask = torch.zeros(len(train), dtype=torch.bool)
    mask[poisons] = True
    pool_y = y[pool].numpy()
    targets = rng.choice(np.flatnonzero(pool_y == source), size=n_targets, replace=False)
    rest = np.setdiff1d(np.arange(len(pool)), targets)
    clean = np.sort(rng.choice(rest, size=min(n_clean, len(rest)), replace=False))
    return AttackedDataset(
        name=name,
        train_x=train_x,
        train_y=train_y,
        poison_mask=mask,
        poison_target=torch.where(mask, 0, -1),
        target_x=trigger(x[pool[targets]]),  # type: ignore[operator]
        target_y=y[pool[targets]].clone(),
        target_adversarial_y=torch.full((n_targets,), adversarial),
        clean_x=x[pool[clean]].clone(),
        clean_y=y[pool[clean]].clone(),
        num_classes=int(y.max()) + 1,
        parameters=parameters,
    )


def shape_backdoor(
    shape: Shape,
    source: int,
    adversarial: int,
    seed: int,
    n_train: int = 1200,
    n_poison: int = 30,
    n_targets: int = 10,
    n_clean: int = 260,
) -> AttackedDataset:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    train, pool = _split(len(y), n_train, seed)
    return _assemble(
        f"shape_{shape}",
        x,
        y,
        train,
        pool,
        lambda images: stamp(images, shape),
        source,
        adversarial,
        n_poison,
        n_targets,
        n_clean,
        seed,
        {"shape": shape, "source": source, "adversarial": adversarial, "seed": seed},
    )


def _tabular(dataset: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if dataset == "breast_cancer":
        raw = load_breast_cancer()
        return torch.tensor(raw.data, dtype=torch.float64), torch.tensor(raw.target)
    if dataset == "blobs":  # the development tabular data: 3 classes of 2 Gaussian blobs each
        features, blob = make_blobs(
            n_samples=3000, n_features=16, centers=6, cluster_std=2.0, random_state=seed + 200
        )
        return torch.tensor(features), torch.tensor(blob % 3)
    features, labels = make_classification(
        n_samples=3000,
        n_features=20,
        n_informative=8,
        n_redundant=4,
        n_classes=4,
        class_sep=1.2,
        random_state=seed + 100,
    )
    return torch.tensor(features), torch.tensor(labels)


def tabular_backdoor(
    dataset: Literal["breast_cancer", "synthetic", "blobs"],
    features: tuple[int, ...],
    value: float,
    source: int,
    adversarial: int,
    seed: int,
    n_poison: int = 20,
    n_targets: int = 10,
    n_clean: int = 260,
) -> AttackedDataset:
    """Rows standardised on the clean training split; the trigger sets ``features`` to
    ``value`` (in standard deviations)."""
    x, y = _tabular(dataset, seed)
    n_train = (2 * len(y)) // 3 if dataset == "breast_cancer" else 2000
    train, pool = _split(len(y), n_train, seed)
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-8)
    x = ((x - mean) / std).to(torch.float32)

    def trigger(rows: torch.Tensor) -> torch.Tensor:
        out = rows.clone()
        out[:, list(features)] = value
        return out

    return _assemble(
        f"tabular_{dataset}",
        x,
        y,
        train,
        pool,
        trigger,
        source,
        adversarial,
        n_poison,
        n_targets,
        n_clean,
        seed,
        {"dataset": dataset, "features": features, "value": value, "seed": seed},
    )
