"""A model repository: a model trained elsewhere, described by a TOML manifest.

The directory holds ``expunge.toml`` and the files it names, all inside the directory:

    format = "expunge-model-repository-v1"

    [model]
    architecture = "mlp"             # built in, or a factory the server's configuration trusts
    input_shape = [30]
    num_classes = 2
    hidden = [64]                    # the spec's other fields, as in ``ArchitectureSpec``
    weights = "weights.safetensors"

    [objective]
    weight_decay = 1e-3              # lambda of J = mean loss + lambda/2 |theta|^2
    loss = "cross_entropy"           # the default; or a Task a trusted factory returns
    label_smoothing = 0.0            # cross_entropy's, as in torch's

    [data]                           # .npz or .parquet (``datasets.load_parquet``'s columns)
    train = "train.npz"              # features, labels, sample_ids, owner_ids: every row trained on
                                     # (sample_ids: integers, or strings such as UUIDs)
    test = "test.npz"                # optional held-out rows; without: ``WITHOUT_TEST_SET``

    [training]                       # optional: TrainConfig fields; without it, no exact retrain
    epochs = 30
    seed = 0

    [[checkpoints]]                  # optional, in training order; without them, Scan's
    weights = "ckpt/0.safetensors"   # influence reads the final weights only
    learning_rate = 0.05

Code never travels: the architecture is a name, weights are safetensors (pickle refused),
arrays are ``.npz`` read without pickle or Parquet read with pyarrow (the server extra's).
Every error names the file and the field (a Parquet file's: the column).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from expunge.defenses.architectures import ArchitectureSpec
from expunge.defenses.training import Checkpoint, TrainConfig
from expunge.server.errors import ExpungeError, InvalidArgument
from expunge.server.model_factory import build_architecture, loss_task
from expunge.server.state import weights as weights_io
from expunge.server.state.datasets import Dataset, load_npz, load_parquet

MANIFEST = "expunge.toml"
FORMAT = "expunge-model-repository-v1"
# What a manifest's [model] table may say besides the weights: the spec's fields.
SPEC_FIELDS = tuple(f.name for f in fields(ArchitectureSpec))
DATA_SUFFIXES = (".npz", ".parquet")
# Why [data] test cannot be left out: rows the model trained on would flatter every figure
# below, and carving some off the training set would measure on rows it has seen.
# What a repository without [data] test gives up (the import says so; nothing is carved
# from the training rows, whose figures would flatter the model).
WITHOUT_TEST_SET = (
    "no held-out set: test accuracy and loss, each forget's membership-inference AUC and "
    "Scan (whose p-values are calibrated on held-out inputs) are unavailable, and each "
    "forget's accuracy-collapse guard reads the retained training samples instead"
)


@dataclass(frozen=True)
class ModelRepository:
    """A validated repository: everything ``Engine.import_model`` stores."""

    spec: ArchitectureSpec
    weights: bytes  # safetensors of the final model, checked against the architecture
    weight_decay: float
    train: Dataset
    test: Dataset  # empty without [data] test (``WITHOUT_TEST_SET``)
    training: TrainConfig | None  # None: exact retrain is refused
    checkpoints: list[Checkpoint]  # empty: none were imported


def _fail(where: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{where}: {message}")


def _table(manifest: dict[str, Any], name: str, required: bool) -> dict[str, Any]:
    value = manifest.get(name)
    if value is None:
        if required:
            raise _fail(MANIFEST, f"the [{name}] table is missing")
        return {}
    if not isinstance(value, dict):
        raise _fail(MANIFEST, f"{name} must be a table ([{name}])")
    return value


def _inside(root: Path, table: str, key: str, value: object) -> Path:
    """A file the manifest names: a relative path that stays inside the repository."""
    where = f"{MANIFEST} [{table}] {key}"
    if not isinstance(value, str) or not value:
        raise _fail(where, "must be a file name relative to the repository")
    path = (root / value).resolve()
    if not path.is_relative_to(root.resolve()):
        raise _fail(where, f"{value!r} lies outside the repository")
    if not path.is_file():
        raise _fail(where, f"{value!r} does not exist")
    return path


def _spec(model: dict[str, Any]) -> ArchitectureSpec:
    unknown = sorted(set(model) - set(SPEC_FIELDS) - {"weights", "architecture"})
    if unknown:
        raise _fail(f"{MANIFEST} [model]", f"unknown keys {unknown}; known: {SPEC_FIELDS}")
    for key in ("architecture", "input_shape", "num_classes"):
        if key not in model:
            raise _fail(f"{MANIFEST} [model] {key}", "is required")
    values = {k: v for k, v in model.items() if k in SPEC_FIELDS}
    values["name"] = model["architecture"]
    try:
        return ArchitectureSpec.from_dict(values)
    except (TypeError, ValueError, KeyError) as exc:
        raise _fail(f"{MANIFEST} [model]", str(exc)) from exc


def _with_loss(
    spec: ArchitectureSpec, objective: dict[str, Any], trusted: dict[str, str]
) -> ArchitectureSpec:
    """``spec`` with the [objective] loss (and label_smoothing), checked to be built in or
    a trusted factory's ``Task``."""
    loss = objective.get("loss", "cross_entropy")
    smoothing = objective.get("label_smoothing", 0.0)
    if not isinstance(loss, str) or not loss:
        raise _fail(
            f"{MANIFEST} [objective] loss", "must be a name: cross_entropy, or a trusted Task"
        )
    if not isinstance(smoothing, int | float) or isinstance(smoothing, bool):
        raise _fail(f"{MANIFEST} [objective] label_smoothing", "must be a number in [0, 1)")
    try:
        spec = replace(spec, loss=loss, label_smoothing=float(smoothing))
    except ValueError as exc:
        raise _fail(f"{MANIFEST} [objective]", str(exc)) from exc
    try:
        loss_task(spec, trusted)
    except ExpungeError as exc:
        raise _fail(f"{MANIFEST} [objective] loss", exc.message) from exc
    return spec


def _dataset(root: Path, key: str, value: object, spec: ArchitectureSpec) -> Dataset:
    path = _inside(root, "data", key, value)
    suffix = Path(str(value)).suffix  # as the manifest names it: a link's target may differ
    if suffix not in DATA_SUFFIXES:
        raise _fail(f"{MANIFEST} [data] {key}", f"{value!r}: only {DATA_SUFFIXES} files are read")
    parquet = suffix == ".parquet"
    try:
        data = load_parquet(path, spec.input_shape) if parquet else load_npz(path)
    except ExpungeError as exc:  # same status (a server without pyarrow is no bad argument)
        raise type(exc)(f"{path.name} ([data] {key}): {exc.message}") from exc
    if data.num_classes > spec.num_classes:
        reach = "column 'label' reaches" if parquet else "labels reach"
        raise _fail(
            f"{path.name} ([data] {key})",
            f"{reach} class {data.num_classes - 1}; the model has {spec.num_classes} classes",
        )
    return replace(data, num_classes=spec.num_classes)


def _weights(path: Path, spec: ArchitectureSpec, trusted: dict[str, str], where: str) -> bytes:
    data = path.read_bytes()
    try:
        weights_io.load_into(build_architecture(spec, trusted), data)
    except ExpungeError as exc:
        raise _fail(f"{path.name} ({where})", exc.message) from exc
    return data


def _training(table: dict[str, Any], weight_decay: float) -> TrainConfig | None:
    if not table:
        return None
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise _fail(f"{MANIFEST} [training]", f"unknown keys {unknown}; known: {sorted(known)}")
    if "weight_decay" in table and float(table["weight_decay"]) != weight_decay:
        raise _fail(
            f"{MANIFEST} [training] weight_decay",
            "differs from [objective] weight_decay: the retrain must optimise the same J",
        )
    try:
        return TrainConfig(**{**table, "weight_decay": weight_decay})
    except (TypeError, ValueError) as exc:
        raise _fail(f"{MANIFEST} [training]", str(exc)) from exc


def _checkpoints(
    root: Path, entries: object, spec: ArchitectureSpec, trusted: dict[str, str]
) -> list[Checkpoint]:
    if entries is None:
        return []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise _fail(MANIFEST, "checkpoints must be an array of tables ([[checkpoints]])")
    result = []
    for i, entry in enumerate(entries):
        where = f"checkpoints[{i}]"
        rate = entry.get("learning_rate")
        if not isinstance(rate, int | float) or not rate > 0:
            raise _fail(f"{MANIFEST} [{where}] learning_rate", "must be a number > 0")
        path = _inside(root, where, "weights", entry.get("weights"))
        state = weights_io.parse_state(_weights(path, spec, trusted, where))
        result.append(Checkpoint(int(entry.get("step", i)), float(rate), state))
    return result


def read_repository(directory: Path, trusted_factories: dict[str, str]) -> ModelRepository:
    """Parse and validate a repository; INVALID_ARGUMENT naming the file and field if not."""
    root = Path(directory)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise InvalidArgument(f"{root}: no {MANIFEST} manifest in this directory")
    try:
        manifest = tomllib.loads(manifest_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise _fail(MANIFEST, f"not valid TOML: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise _fail(f"{MANIFEST} format", f"must be {FORMAT!r}")
    model = _table(manifest, "model", required=True)
    objective = _table(manifest, "objective", required=True)
    decay = objective.get("weight_decay")
    if not isinstance(decay, int | float) or decay < 0:
        raise _fail(f"{MANIFEST} [objective] weight_decay", "must be a number >= 0")
    spec = _with_loss(_spec(model), objective, trusted_factories)
    weights = _weights(
        _inside(root, "model", "weights", model.get("weights")),
        spec,
        trusted_factories,
        "[model] weights",
    )
    data = _table(manifest, "data", required=True)
    if "train" not in data:
        raise _fail(f"{MANIFEST} [data] train", "is required: every row the model trained on")
    train = _dataset(root, "train", data["train"], spec)
    test = (
        _dataset(root, "test", data["test"], spec)
        if "test" in data
        else Dataset.empty(spec.input_shape, spec.num_classes)
    )
    if test.sample_keys is not None:  # numbered after the training rows, never beside them
        test = replace(test, sample_ids=np.arange(len(train), len(train) + len(test)))
    for name, part in (("train", train), ("test", test)):
        if part.input_shape != spec.input_shape:
            raise _fail(
                f"{MANIFEST} [data] {name}",
                f"inputs of shape {part.input_shape}; the model expects {spec.input_shape}",
            )
    return ModelRepository(
        spec=spec,
        weights=weights,
        weight_decay=float(decay),
        train=train,
        test=test,
        training=_training(_table(manifest, "training", required=False), float(decay)),
        checkpoints=_checkpoints(root, manifest.get("checkpoints"), spec, trusted_factories),
    )
