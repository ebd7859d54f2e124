"""Training data as arrays: import from ``.npz`` or Parquet with validation, and built-in demos.

A data set is features ``(n, *input_shape)`` float32, labels ``(n,)`` int64 in
``[0, num_classes)``, unique int64 sample ids, and an owner id per sample. The
built-in loaders use data shipped with scikit-learn and give seeded synthetic
owners of 1 to 20 samples each, so nothing is downloaded.

A Parquet file (read with pyarrow, the server extra's; never pickle) has one row per
sample and the columns ``sample_id`` (integer, at most int64), ``owner_id`` (string),
``label`` (integer) and the features, in one of two layouts:

* a ``features`` column of lists (``list``, ``large_list`` or ``fixed_size_list``) of
  floats, each row ``prod(input_shape)`` values flattened in row-major order and reshaped
  to ``input_shape``; other columns are then ignored;
* without a ``features`` column, every column but the three above is one feature, in the
  file's column order; they must be floating point and number ``prod(input_shape)``.

Nulls are refused. Loader errors name the column; the caller names the file.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from expunge.server.errors import FailedPrecondition, InvalidArgument, invalid_field

if TYPE_CHECKING:
    from types import ModuleType

BUILTIN_DATASETS = ("digits", "breast_cancer", "wine")
# A Parquet file's columns besides the features, each with the array ``validate`` names.
PARQUET_COLUMNS = {"sample_id": "sample_ids", "owner_id": "owner_ids", "label": "labels"}
# Rows decoded at a time, so the file's arrays never exist whole beside the result's.
PARQUET_BATCH_ROWS = 65_536
# A string sample id's longest form (a UUID is 36; a path-like key may be longer).
MAX_SAMPLE_KEY_CHARS = 256


@dataclass(frozen=True)
class Dataset:
    features: np.ndarray  # (n, *input_shape) float32
    labels: np.ndarray  # (n,) int64
    sample_ids: np.ndarray  # (n,) int64, unique
    owner_ids: np.ndarray  # (n,) str
    num_classes: int
    # (n,) str, unique: the caller's own string ids (UUIDs), when it named samples so; the
    # server then numbers them 0..n-1 (``sample_ids``) and answers to both.
    sample_keys: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def empty(cls, input_shape: tuple[int, ...], num_classes: int) -> Dataset:
        """No rows: a model imported without a held-out set has this as its test set."""
        return cls(
            np.zeros((0, *input_shape), dtype=np.float32),
            np.zeros(0, dtype=np.int64),
            np.zeros(0, dtype=np.int64),
            np.zeros(0, dtype=str),
            num_classes,
        )

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
            None if self.sample_keys is None else self.sample_keys[rows],
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
    keys = None
    if sample_ids.dtype.kind in "US":
        keys = _sample_keys(sample_ids)
        sample_ids = np.arange(n, dtype=np.int64)
    elif not np.issubdtype(sample_ids.dtype, np.integer):
        raise invalid_field(
            "sample_ids", f"expected integers or strings (e.g. UUIDs), got {sample_ids.dtype}"
        )
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
        keys,
    )


def _sample_keys(values: np.ndarray) -> np.ndarray:
    """String sample ids, checked: non-empty, at most ``MAX_SAMPLE_KEY_CHARS``, unique."""
    keys = values.astype(str)
    lengths = np.char.str_len(keys)
    if (lengths == 0).any():
        rows = np.flatnonzero(lengths == 0)[:5].tolist()
        raise invalid_field("sample_ids", f"empty string sample ids at rows {rows}")
    if (lengths > MAX_SAMPLE_KEY_CHARS).any():
        row = int(np.argmax(lengths > MAX_SAMPLE_KEY_CHARS))
        raise invalid_field(
            "sample_ids",
            f"string sample ids are at most {MAX_SAMPLE_KEY_CHARS} characters; row {row} has "
            f"{int(lengths[row])}",
        )
    unique, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        raise invalid_field(
            "sample_ids", f"duplicate sample ids, e.g. {unique[counts > 1][:5].tolist()}"
        )
    return keys


def load_npz(path: Path) -> Dataset:
    """Load ``features``, ``labels``, ``sample_ids``, ``owner_ids`` from an ``.npz`` (no pickle)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [
                k for k in ("features", "labels", "sample_ids", "owner_ids") if k not in data
            ]
            if missing:
                raise InvalidArgument(
                    f"the .npz lacks arrays {missing} (it has {sorted(data.files)})"
                )
            arrays = {k: data[k] for k in ("features", "labels", "sample_ids", "owner_ids")}
    except FileNotFoundError as exc:
        raise InvalidArgument("no such file") from exc
    except ValueError as exc:  # object arrays, or a file that is no archive, need pickle
        if "Object arrays" not in str(exc):
            raise InvalidArgument("not an .npz archive (numpy.savez writes one)") from exc
        raise InvalidArgument(
            "the .npz holds object arrays, which need pickle and are refused; store owner ids as strings"
        ) from exc
    except (OSError, zipfile.BadZipFile) as exc:
        raise InvalidArgument(f"not a readable .npz file ({exc})") from exc
    return validate(**arrays)


def _pyarrow_parquet() -> ModuleType:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise FailedPrecondition(
            "reading Parquet needs pyarrow, which this server lacks; install expunge[server] "
            "(or pip install 'pyarrow>=15'), or store the data as .npz"
        ) from exc
    return pq


def _one_column(schema: Any, name: str) -> Any:
    """The field ``name`` of an Arrow schema: present once."""
    found = schema.get_all_field_indices(name)
    if not found:
        raise InvalidArgument(f"column {name!r} is missing")
    if len(found) > 1:
        raise InvalidArgument(f"column {name!r} appears {len(found)} times")
    return schema.field(found[0])


def _parquet_layout(schema: Any, size: int) -> list[str]:
    """The feature columns of a Parquet schema (``["features"]``, or one per value), checked
    against ``size`` = ``prod(input_shape)`` values per row."""
    import pyarrow as pa

    sample_id = _one_column(schema, "sample_id").type
    if pa.types.is_dictionary(sample_id):
        sample_id = sample_id.value_type
    textual = pa.types.is_string(sample_id) or pa.types.is_large_string(sample_id)
    if not textual and (not pa.types.is_integer(sample_id) or pa.types.is_uint64(sample_id)):
        raise InvalidArgument(
            f"column 'sample_id' must be int64 or narrower, or strings (e.g. UUIDs); got "
            f"{sample_id}"
        )
    label = _one_column(schema, "label").type
    if not pa.types.is_integer(label):
        raise InvalidArgument(f"column 'label' must be an integer type, got {label}")
    owner = _one_column(schema, "owner_id").type
    if pa.types.is_dictionary(owner):
        owner = owner.value_type
    if not (pa.types.is_string(owner) or pa.types.is_large_string(owner)):
        raise InvalidArgument(f"column 'owner_id' must be a string type, got {owner}")
    if "features" in schema.names:
        kind = _one_column(schema, "features").type
        lists = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
        if not any(is_list(kind) for is_list in lists):
            raise InvalidArgument(
                f"column 'features' must be a list of floats (each row flattened, row-major), "
                f"got {kind}"
            )
        if not pa.types.is_floating(kind.value_type):
            raise InvalidArgument(
                f"column 'features' must hold floating-point values, got {kind.value_type}"
            )
        if pa.types.is_fixed_size_list(kind) and kind.list_size != size:
            raise InvalidArgument(
                f"column 'features' holds {kind.list_size} values per row; "
                f"the input shape needs {size}"
            )
        return ["features"]
    columns = [name for name in schema.names if name not in PARQUET_COLUMNS]
    if len(columns) != size:
        shown = ", ".join(repr(c) for c in columns[:8]) + (", …" if len(columns) > 8 else "")
        raise InvalidArgument(
            f"column 'features' is missing, and the {len(columns)} other columns "
            f"({shown or 'none'}) are not the {size} feature columns the input shape needs"
        )
    for name in columns:
        kind = _one_column(schema, name).type
        if not pa.types.is_floating(kind):
            raise InvalidArgument(f"column {name!r} (a feature) must be floating point, got {kind}")
    return columns


def _feature_rows(column: Any, size: int, first_row: int) -> np.ndarray:
    """A batch's ``features`` list column as ``(k, size)`` values, every list ``size`` long."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not pa.types.is_fixed_size_list(column.type):
        lengths = pc.list_value_length(column).to_numpy()
        wrong = np.flatnonzero(lengths != size)
        if wrong.size:
            row = int(wrong[0])
            raise InvalidArgument(
                f"column 'features' holds {lengths[row]} values in row {first_row + row} "
                f"({wrong.size} rows differ); the input shape needs {size}"
            )
    values = column.flatten()
    if values.null_count:
        raise InvalidArgument(f"column 'features' has {values.null_count} null values")
    return np.asarray(values.to_numpy(zero_copy_only=False)).reshape(len(column), size)


def _id_column(column: Any, pa: Any) -> np.ndarray:
    """An id column as numpy: integers as they are, strings (dictionary-encoded or not) as str."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.to_numpy(zero_copy_only=False).astype(str)
    return column.to_numpy(zero_copy_only=False)


def load_parquet(path: Path, input_shape: tuple[int, ...]) -> Dataset:
    """Load a Parquet file (the module's layouts) into features ``(n, *input_shape)``.

    Decoded a batch of rows at a time into preallocated arrays; errors name the column.
    FAILED_PRECONDITION when pyarrow is not installed (it is the server extra's)."""
    pq = _pyarrow_parquet()
    import pyarrow as pa

    size = math.prod(input_shape)
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InvalidArgument(f"not a readable Parquet file: {exc}") from exc
    with parquet:
        feature_columns = _parquet_layout(parquet.schema_arrow, size)
        n = parquet.metadata.num_rows
        features = np.empty((n, size), dtype=np.float32)
        labels = np.empty(n, dtype=np.int64)
        ids: list[np.ndarray] = []
        owners: list[np.ndarray] = []
        start = 0
        batches = parquet.iter_batches(
            batch_size=PARQUET_BATCH_ROWS, columns=[*PARQUET_COLUMNS, *feature_columns]
        )
        try:
            for batch in batches:
                stop = start + batch.num_rows
                for name in batch.schema.names:
                    nulls = batch.column(name).null_count
                    if nulls:
                        raise InvalidArgument(f"column {name!r} has {nulls} null values")
                labels[start:stop] = batch.column("label").to_numpy()
                ids.append(_id_column(batch.column("sample_id"), pa))
                owners.append(_id_column(batch.column("owner_id"), pa).astype(str))
                if feature_columns == ["features"]:
                    features[start:stop] = _feature_rows(batch.column("features"), size, start)
                else:
                    for j, name in enumerate(feature_columns):
                        features[start:stop, j] = batch.column(name).to_numpy()
                start = stop
        except (pa.ArrowException, OSError) as exc:
            raise InvalidArgument(f"not a readable Parquet file: {exc}") from exc
    owner_ids = np.concatenate(owners) if owners else np.empty(0, dtype=str)
    sample_ids = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
    feature_name = "column 'features'" if feature_columns == ["features"] else "feature columns"
    try:
        return validate(features.reshape(n, *input_shape), labels, sample_ids, owner_ids)
    except InvalidArgument as exc:  # name the file's column, not the array it became
        if not exc.violations:
            raise
        field = exc.violations[0].field
        column = {v: f"column {k!r}" for k, v in PARQUET_COLUMNS.items()}.get(field, feature_name)
        raise InvalidArgument(f"{column}: {exc.violations[0].description}") from exc


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
