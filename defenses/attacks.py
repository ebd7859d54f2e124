"""Seeded training-set attacks with ground truth, for tests and benchmarks (DESIGN 4.8).

Data come from scikit-learn's bundled datasets (no download): digits as images
``(n, 1, 8, 8)`` in ``[0, 1]`` (``load_digits().data / 16``), wine and breast cancer as
tabular rows standardised with the mean and standard deviation of the clean training
split. Each attack splits the data with a seeded permutation into a training set and a
held-out pool, poisons the training set and draws from the pool:

- **targets**: inputs the attack wants misclassified, with their true label and the
  adversarial label the attack wants predicted;
- **clean inputs**: untouched held-out inputs (the negatives a scan must not flag).

Attacks:

- ``backdoor_digits``: ``n_poison`` training images of other classes get a trigger and
  the adversarial label; targets are held-out images of other classes with the trigger.
  ``trigger="patch"`` sets a ``patch_size`` square in the bottom-right corner (blank in
  almost every digit) to ``patch_value``; ``trigger="blend"`` mixes the image with a
  seeded uniform-noise pattern, ``(1 - alpha) x + alpha pattern`` (``blend_pattern``).
- ``targeted_poisoning``: for each target (a held-out input), ``n_poison_per_target``
  near-duplicates ``x_target + noise * N(0, I)`` (clipped to ``[0, 1]`` for digits)
  labelled with the adversarial label are added to the training set at seeded random
  positions. These are label-flipped near-duplicates: the simplest targeted poisoning,
  with the poisons carrying the label the target should receive, as clean-label
  poisons also do.

Every random choice comes from one ``torch.Generator`` seeded by ``config.seed`` (the
blend pattern from a second one, so ``apply_trigger`` can rebuild it alone).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_wine

__all__ = [
    "AttackedDataset",
    "BackdoorConfig",
    "TargetedConfig",
    "apply_trigger",
    "backdoor_digits",
    "blend_pattern",
    "targeted_poisoning",
]

TabularName = Literal["digits", "wine", "breast_cancer"]


@dataclass(frozen=True, eq=False)
class AttackedDataset:
    """A poisoned training set with its ground truth.

    train_x ``(n, *input_shape)``, train_y ``(n,)`` long, poison_mask ``(n,)`` bool,
    poison_target ``(n,)`` long: for a poison, the index of the target it was made for
    (0 for backdoors, whose one trigger serves every target), -1 for clean samples.
    target_x ``(m, *input_shape)``, target_y ``(m,)`` true labels, target_adversarial_y
    ``(m,)`` the labels the attack wants predicted. clean_x ``(c, *input_shape)``,
    clean_y ``(c,)``: untouched held-out inputs.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    poison_mask: torch.Tensor
    poison_target: torch.Tensor
    target_x: torch.Tensor
    target_y: torch.Tensor
    target_adversarial_y: torch.Tensor
    clean_x: torch.Tensor
    clean_y: torch.Tensor
    num_classes: int
    parameters: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_poisons(self) -> int:
        return int(self.poison_mask.sum())


@dataclass(frozen=True)
class BackdoorConfig:
    """A backdoor on digits: which trigger, how many poisons, which labels."""

    trigger: Literal["patch", "blend"] = field(
        default="patch", metadata={"help": "patch (corner square) or blend (noise pattern)"}
    )
    n_train: int = field(default=1200, metadata={"help": "training samples (poisons included)"})
    n_poison: int = field(default=30, metadata={"help": "training samples given the trigger"})
    n_targets: int = field(default=10, metadata={"help": "held-out inputs given the trigger"})
    n_clean: int = field(default=200, metadata={"help": "untouched held-out inputs"})
    adversarial_label: int = field(default=0, metadata={"help": "label the trigger should force"})
    source_label: int | None = field(
        default=None,
        metadata={"help": "class poisons and targets come from (None: any other class)"},
    )
    patch_size: int = field(default=2, metadata={"help": "side of the square patch, pixels"})
    patch_value: float = field(default=1.0, metadata={"help": "intensity of the patch"})
    blend_alpha: float = field(default=0.2, metadata={"help": "weight of the blended pattern"})
    seed: int = field(default=0, metadata={"help": "split, poison choice and blend pattern"})

    def __post_init__(self) -> None:
        if self.trigger not in ("patch", "blend"):
            raise ValueError("trigger must be 'patch' or 'blend'")
        if min(self.n_train, self.n_poison, self.n_targets) < 1 or self.n_clean < 0:
            raise ValueError("n_train, n_poison and n_targets must be positive, n_clean >= 0")
        if not 0 <= self.adversarial_label < 10:
            raise ValueError("adversarial_label must be a digit class 0-9")
        if self.source_label is not None and (
            not 0 <= self.source_label < 10 or self.source_label == self.adversarial_label
        ):
            raise ValueError("source_label must be a digit class other than adversarial_label")
        if not 1 <= self.patch_size <= 8 or not 0.0 < self.blend_alpha <= 1.0:
            raise ValueError("need 1 <= patch_size <= 8 and 0 < blend_alpha <= 1")


@dataclass(frozen=True)
class TargetedConfig:
    """Targeted poisoning with label-flipped near-duplicates of chosen held-out inputs."""

    dataset: TabularName = field(
        default="digits", metadata={"help": "digits (images), wine or breast_cancer (tabular)"}
    )
    n_train: int | None = field(
        default=None, metadata={"help": "clean training samples (None: two thirds of the data)"}
    )
    n_targets: int = field(default=1, metadata={"help": "held-out inputs attacked"})
    n_poison_per_target: int = field(default=10, metadata={"help": "near-duplicates per target"})
    noise: float = field(
        default=0.05,
        metadata={"help": "std of the perturbation: pixels in [0, 1] or standardised units"},
    )
    adversarial_label: int | None = field(
        default=None, metadata={"help": "label wanted (None: a seeded label != the true one)"}
    )
    n_clean: int = field(default=50, metadata={"help": "untouched held-out inputs"})
    seed: int = field(default=0, metadata={"help": "split, targets, labels, noise, positions"})

    def __post_init__(self) -> None:
        if self.dataset not in ("digits", "wine", "breast_cancer"):
            raise ValueError("dataset must be digits, wine or breast_cancer")
        if self.n_targets < 1 or self.n_poison_per_target < 1 or self.n_clean < 0:
            raise ValueError("need n_targets >= 1, n_poison_per_target >= 1, n_clean >= 0")
        if self.noise < 0:
            raise ValueError("noise must be non-negative")
        if self.n_train is not None and self.n_train < 1:
            raise ValueError("n_train must be positive")


def _load(name: TabularName) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Features ``(N, *shape)`` float32, labels ``(N,)`` long, class count."""
    if name == "digits":
        raw = load_digits()
        x = torch.tensor(raw.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    else:
        raw = load_wine() if name == "wine" else load_breast_cancer()
        x = torch.tensor(np.asarray(raw.data), dtype=torch.float32)
    y = torch.tensor(np.asarray(raw.target), dtype=torch.long)
    return x, y, int(y.max()) + 1


def _split(
    n_total: int, n_train: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 < n_train < n_total:
        raise ValueError(f"n_train must lie between 1 and {n_total - 1}, got {n_train}")
    order = torch.randperm(n_total, generator=generator)
    return order[:n_train], order[n_train:]


def _pick(
    candidates: torch.Tensor, count: int, generator: torch.Generator, what: str
) -> torch.Tensor:
    if candidates.numel() < count:
        raise ValueError(f"asked for {count} {what} but only {candidates.numel()} are available")
    return candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]


def _frozen(config: BackdoorConfig | TargetedConfig) -> Mapping[str, object]:
    return MappingProxyType(dict(asdict(config)))


def blend_pattern(seed: int) -> torch.Tensor:
    """The blended trigger ``(1, 8, 8)``: uniform noise from its own generator seeded ``seed``."""
    return torch.rand((1, 8, 8), generator=torch.Generator().manual_seed(seed))


def apply_trigger(images: torch.Tensor, config: BackdoorConfig) -> torch.Tensor:
    """The trigger of ``config`` applied to digits ``(n, 1, 8, 8)`` in ``[0, 1]``; a new tensor.

    Public so that benchmarks can trigger further inputs (attack success rate on any
    held-out set) exactly as the attack did.
    """
    if config.trigger == "patch":
        out = images.clone()
        out[..., 8 - config.patch_size :, 8 - config.patch_size :] = config.patch_value
        return out
    return (1.0 - config.blend_alpha) * images + config.blend_alpha * blend_pattern(config.seed)


def backdoor_digits(config: BackdoorConfig | None = None) -> AttackedDataset:
    """A backdoored digits training set (``(n_train, 1, 8, 8)``) with triggered targets."""
    config = config or BackdoorConfig()
    generator = torch.Generator().manual_seed(config.seed)
    x, y, num_classes = _load("digits")
    train_idx, pool_idx = _split(x.shape[0], config.n_train, generator)

    def trigger(images: torch.Tensor) -> torch.Tensor:
        return apply_trigger(images, config)

    def eligible(labels: torch.Tensor) -> torch.Tensor:
        if config.source_label is None:
            return labels != config.adversarial_label
        return labels == config.source_label

    train_x, train_y = x[train_idx].clone(), y[train_idx].clone()
    poisons = _pick(
        torch.nonzero(eligible(train_y)).reshape(-1), config.n_poison, generator, "poisons"
    )
    train_x[poisons] = trigger(train_x[poisons])
    train_y[poisons] = config.adversarial_label
    poison_mask = torch.zeros(config.n_train, dtype=torch.bool)
    poison_mask[poisons] = True

    pool_y = y[pool_idx]
    targets = _pick(
        torch.nonzero(eligible(pool_y)).reshape(-1), config.n_targets, generator, "targets"
    )
    rest = torch.ones(pool_idx.numel(), dtype=torch.bool)
    rest[targets] = False
    clean = _pick(torch.nonzero(rest).reshape(-1), config.n_clean, generator, "clean inputs")
    return AttackedDataset(
        name=f"backdoor_{config.trigger}",
        train_x=train_x,
        train_y=train_y,
        poison_mask=poison_mask,
        poison_target=torch.where(poison_mask, 0, -1),
        target_x=trigger(x[pool_idx[targets]]),
        target_y=pool_y[targets].clone(),
        target_adversarial_y=torch.full((config.n_targets,), config.adversarial_label),
        clean_x=x[pool_idx[clean]].clone(),
        clean_y=pool_y[clean].clone(),
        num_classes=num_classes,
        parameters=_frozen(config),
    )


def targeted_poisoning(config: TargetedConfig | None = None) -> AttackedDataset:
    """Near-duplicates of each target with its adversarial label, added to the training set.

    The training set holds ``n_train + n_targets * n_poison_per_target`` samples.
    """
    config = config or TargetedConfig()
    generator = torch.Generator().manual_seed(config.seed)
    x, y, num_classes = _load(config.dataset)
    n_train = config.n_train if config.n_train is not None else (2 * x.shape[0]) // 3
    train_idx, pool_idx = _split(x.shape[0], n_train, generator)
    if config.dataset != "digits":
        # Standardise with the clean training split's statistics only, as a defender
        # who never sees the held-out data would.
        mean, std = x[train_idx].mean(dim=0), x[train_idx].std(dim=0).clamp_min(1e-8)
        x = (x - mean) / std
    targets = _pick(torch.arange(pool_idx.numel()), config.n_targets, generator, "targets")
    rest = torch.ones(pool_idx.numel(), dtype=torch.bool)
    rest[targets] = False
    clean = _pick(torch.nonzero(rest).reshape(-1), config.n_clean, generator, "clean inputs")
    target_x, target_y = x[pool_idx[targets]], y[pool_idx[targets]]
    if config.adversarial_label is None:
        # A uniformly drawn label among the other classes: shift the true one by 1..C-1.
        shift = torch.randint(1, num_classes, (config.n_targets,), generator=generator)
        adversarial = (target_y + shift) % num_classes
    else:
        if not 0 <= config.adversarial_label < num_classes:
            raise ValueError(f"adversarial_label must lie in [0, {num_classes})")
        if (target_y == config.adversarial_label).any():
            raise ValueError("a target already has the adversarial label; choose another seed")
        adversarial = torch.full((config.n_targets,), config.adversarial_label)

    per = config.n_poison_per_target
    noise = torch.randn((config.n_targets * per, *x.shape[1:]), generator=generator)
    poison_x = target_x.repeat_interleave(per, dim=0) + config.noise * noise
    if config.dataset == "digits":
        poison_x = poison_x.clamp(0.0, 1.0)
    poison_y = adversarial.repeat_interleave(per)
    owner = torch.arange(config.n_targets).repeat_interleave(per)

    all_x = torch.cat([x[train_idx], poison_x])
    all_y = torch.cat([y[train_idx], poison_y])
    all_owner = torch.cat([torch.full((n_train,), -1), owner])
    # Seeded positions: poisons must not sit in one block at the end of the set.
    order = torch.randperm(all_x.shape[0], generator=generator)
    return AttackedDataset(
        name=f"targeted_{config.dataset}",
        train_x=all_x[order],
        train_y=all_y[order],
        poison_mask=all_owner[order] >= 0,
        poison_target=all_owner[order],
        target_x=target_x.clone(),
        target_y=target_y.clone(),
        target_adversarial_y=adversarial,
        clean_x=x[pool_idx[clean]].clone(),
        clean_y=y[pool_idx[clean]].clone(),
        num_classes=num_classes,
        parameters=_frozen(config),
    )
