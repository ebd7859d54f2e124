"""Training data as arrays: import from ``.npz`` with validation, and built-in demos.

A data set is features ``(n, *input_shape)`` float32, labels ``(n,)`` int64 in
``[0, num_classes)``, unique int64 sample ids, and an owner id per sample. The
built-in loaders use data shipped with scikit-learn and give seeded synthetic
owners of 1 to 20 samples each, so nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expunge.server.errors import InvalidArgument, invalid_field

BUILTIN_DATASETS = ("digits", "breast_cancer", "wine")


@dataclass(frozen=True)
class Dataset:
    features: np.ndarray  # (n, *input_shape) float32
    labels: np.ndarray  # (n,) int64
    sample_ids: np.ndarray  # (n,) int64, unique
    owner_ids: np.ndarray  # (n,) str
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.features.shape[1:])

    def subset(self, rows: np.ndarray) -> Dataset:
        return Dataset(
            self.features[rows],
            self.labels[rows],
            self.sample_ids[rows],
            self.owner_ids[rows],
            self.num_classes,
        )


def validate(
    features: np.ndarray,
    labels: np.ndarray,
    sample_ids: np.ndarray,
    owner_ids: np.ndarray,
    num_classes: int | None = None,
) -> Dataset:
    """Check shapes, dtypes, label range, id uniqueness and owners; return a Dataset."""
    if features.ndim < 2 or features.shape[0] == 0:
        raise invalid_field(
            "features", f"expected (n, *input_shape) with n > 0, got {features.shape}"
        )
    n = features.shape[0]
    if not np.issubdtype(features.dtype, np.floating):
        raise invalid_field("features", f"expected a floating dtype, got {features.dtype}")
    if not np.isfinite(features).all():
        raise invalid_field("features", "contains NaN or infinite values")
    for name, arr in (("labels", labels), ("sample_ids", sample_ids), ("owner_ids", owner_ids)):
        if arr.shape != (n,):
            raise invalid_field(name, f"expected shape ({n},) to match features, got {arr.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise invalid_field("labels", f"expected an integer dtype, got {labels.dtype}")
    if not np.issubdtype(sample_ids.dtype, np.integer):
        raise invalid_field("sample_ids", f"expected an integer dtype, got {sample_ids.dtype}")
    classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if labels.min() < 0 or labels.max() >= classes:
        raise invalid_field(
            "labels", f"labels must lie in [0, {classes}); got [{labels.min()}, {labels.max()}]"
        )
    if classes < 2:
        raise invalid_field("labels", "need at least two classes")
    unique, counts = np.unique(sample_ids, return_counts=True)
    if (counts > 1).any():
        dup = unique[counts > 1][:5].tolist()
        raise invalid_field("sample_ids", f"duplicate sample ids, e.g. {dup}")
    owners = owner_ids.astype(str)
    missing = np.flatnonzero(np.char.str_len(owners) == 0)
    if missing.size:
        ids = sample_ids[missing[:5]].tolist()
        raise invalid_field(
            "owner_ids", f"{missing.size} samples have no owner, e.g. sample ids {ids}"
        )
    return Dataset(
        features.astype(np.float32),
        labels.astype(np.int64),
        sample_ids.astype(np.int64),
        owners,
        classes,
    )


def load_npz(path: Path) -> Dataset:
    """Load ``features``, ``labels``, ``sample_ids``, ``owner_ids`` from an ``.npz`` (no pickle)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [
                k for k in ("features", "labels", "sample_ids", "owner_ids") if k not in data
            ]
            if missing:
                raise InvalidArgument(f"the .npz lacks arrays {missing}")
            arrays = {k: data[k] for k in ("features", "labels", "sample_ids", "owner_ids")}
    except ValueError as exc:  # object arrays would need pickle: refused
        raise InvalidArgument(
            "the .npz holds object arrays, which need pickle and are refused; store owner ids as strings"
        ) from exc
    return validate(**arrays)


def synthetic_owners(n: int, seed: int, max_per_owner: int = 20) -> np.ndarray:
    """Owner ids for n samples: a seeded shuffle cut into groups of 1..max_per_owner."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    owners = np.empty(n, dtype=object)
    start, k = 0, 0
    while start < n:
        size = int(rng.integers(1, max_per_owner + 1))
        owners[order[start : start + size]] = f"u{k:04d}"
        start += size
        k += 1
    return owners.astype(str)


def builtin(name: str, seed: int = 0) -> Dataset:
    """A scikit-learn data set with seeded synthetic owners; digits as (1, 8, 8) images in [0, 1]."""
    from sklearn import datasets as sk

    if name == "digits":
        raw = sk.load_digits()
        features = (raw.data / 16.0).reshape(-1, 1, 8, 8)
    elif name == "breast_cancer":
        raw = sk.load_breast_cancer()
        features = (raw.data - raw.data.mean(0)) / raw.data.std(0)
    elif name == "wine":
        raw = sk.load_wine()
        features = (raw.data - raw.data.mean(0)) / raw.data.std(0)
    else:
        raise invalid_field(
            "dataset", f"unknown built-in data set {name!r}; choose from {BUILTIN_DATASETS}"
        )
    n = features.shape[0]
    return validate(
        features.astype(np.float32),
        raw.target.astype(np.int64),
        np.arange(n, dtype=np.int64),
        synthetic_owners(n, seed),
    )


def train_test_split(dataset: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Seeded split; the held-out part evaluates models and serves as MIA non-members."""
    if not 0 < test_fraction < 1:
        raise invalid_field("test_fraction", "must lie strictly between 0 and 1")
    order = np.random.default_rng(seed).permutation(len(dataset))
    cut = round(len(dataset) * (1 - test_fraction))
    return dataset.subset(np.sort(order[:cut])), dataset.subset(np.sort(order[cut:]))
