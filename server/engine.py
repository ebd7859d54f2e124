"""The operations of the service, free of gRPC: models, versions, prediction, export.

The servicer converts protobuf to these calls and back; the CLI's ``train`` uses
them directly. Forgetting lives in ``forgetting.py`` and scanning in ``scanning.py``.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from expunge.defenses.architectures import ArchitectureSpec
from expunge.defenses.evaluate import SetMeasurement, measure_set
from expunge.defenses.gradients import sample_loss
from expunge.defenses.training import Checkpoint, TrainConfig, train
from expunge.server.device import resolve_device, synchronize
from expunge.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    invalid_field,
)
from expunge.server.foreground import ForegroundWork
from expunge.server.forget.policy import TrainingCost
from expunge.server.model_factory import build_architecture
from expunge.server.settings import Settings
from expunge.server.state import weights as weights_io
from expunge.server.state.datasets import Dataset, train_test_split
from expunge.server.state.repository import ModelRepository
from expunge.server.state.store import ModelRow, RequestRow, Store, VersionRow, utc_now

log = logging.getLogger("expunge.server.engine")

MODEL_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
EXPORT_CHUNK_BYTES = 1 << 20


def parse_model_name(name: str) -> str:
    """Accept ``digits`` or ``models/digits``; return ``digits``."""
    short = name.removeprefix("models/")
    if not MODEL_NAME.match(short):
        raise invalid_field(
            "model",
            f"{name!r} is not a model name: a lowercase letter, then up to 62 lowercase "
            "letters, digits or '-' (e.g. 'digits' or 'models/digits')",
        )
    return short


def parse_version_name(name: str) -> tuple[str, int]:
    """``models/{m}/versions/{v}`` -> (m, v); ``models/{m}`` -> (m, 0) meaning current."""
    match = re.match(r"^(?:models/)?([a-z][a-z0-9-]{0,62})(?:/versions/(\d{1,12}))?$", name)
    if not match:
        raise invalid_field(
            "name", f"{name!r} is not 'models/{{model}}' or 'models/{{model}}/versions/{{n}}'"
        )
    return match.group(1), int(match.group(2) or 0)


def parse_page(page_size: int, page_token: str) -> tuple[int, int]:
    """(page size, last id or version seen) from a list request; tokens are our own ids."""
    if page_size < 0 or page_size > 1000:
        raise invalid_field("page_size", "must lie in [0, 1000] (0: default 100)")
    try:
        after = int(page_token) if page_token else 0
    except ValueError as exc:
        raise invalid_field("page_token", "not a token this server issued") from exc
    if not 0 <= after < 2**63:  # tokens are SQLite row ids or versions
        raise invalid_field("page_token", "not a token this server issued")
    return page_size or 100, after


@dataclass(frozen=True)
class ModelSnapshot:
    """One immutable version, loaded: Predict reads it while a forget builds the next."""

    name: str
    version: int
    spec: ArchitectureSpec
    module: nn.Module
    weights_sha256: str


@dataclass(frozen=True)
class ModelInfo:
    row: ModelRow
    version: VersionRow
    num_training_samples: int
    num_owners: int
    num_checkpoints: int
    forgotten_samples: int


@dataclass(frozen=True)
class Prediction:
    labels: np.ndarray  # (B,) int64
    probabilities: np.ndarray  # (B, C) float32
    version: int


@dataclass(frozen=True)
class TrainingData:
    """The current training shard with owners, as tensors ready for the algorithms."""

    features: torch.Tensor
    labels: torch.Tensor
    sample_ids: np.ndarray
    owner_ids: np.ndarray
    blob: str
    sample_keys: np.ndarray | None = None  # (n,) str: the caller's string ids, if it gave some

    def key_of(self, row: int) -> str:
        """The sample key of ``row``, or "" for a model whose samples have none."""
        return "" if self.sample_keys is None else str(self.sample_keys[row])


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else float("nan")


def _measured_only(metrics: dict[str, float]) -> dict[str, float]:
    """A version's figures without those of a set it does not have (no held-out set: the
    test figures are absent, not NaN)."""
    return {k: v for k, v in metrics.items() if v == v}


def guarded_accuracy(metrics: dict[str, float]) -> tuple[float | None, str]:
    """The accuracy a forget's collapse guard compares, and what it is: the test accuracy,
    or for a model without a held-out set the training (retained) accuracy."""
    if "test_accuracy" in metrics:
        return metrics["test_accuracy"], "test accuracy"
    return metrics.get("train_accuracy"), "training accuracy (the model has no held-out set)"


class Engine:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        # Resolved here so a server configured for CUDA on a machine without it fails at
        # start (DeviceUnavailable); training, forgets, scans and the index compute here.
        self.device = resolve_device(settings.device)
        self._lock = threading.RLock()
        self._snapshots: dict[tuple[str, int], ModelSnapshot] = {}
        # The current version's snapshot per model: Predict's hot path reads no database.
        self._current: dict[str, ModelSnapshot] = {}
        self._data_cache: dict[str, TrainingData] = {}
        # (model, version) -> that version's test-set losses and accuracy, for the "before"
        # of the next forget (versions are immutable; one per model is kept).
        self._test_measured: dict[str, tuple[int, SetMeasurement]] = {}
        self._test_sizes: dict[str, int] = {}  # test shard digest -> its rows
        # Forgets and retrains computing now; background index work yields to them.
        self.foreground = ForegroundWork()
        # Bumped per model whenever its current version changes (forget_snapshot_cache).
        self._generations: dict[str, int] = {}
        self._version_listeners: list[Callable[[str], None]] = []

    # Creating a model ---------------------------------------------------------------

    def create_model(
        self,
        name: str,
        dataset: Dataset,
        spec: ArchitectureSpec,
        config: TrainConfig,
        test_fraction: float = 0.2,
        actor: str = "admin",
        test_set: Dataset | None = None,
    ) -> ModelInfo:
        """Split (unless ``test_set`` is given), train with checkpoints, store as version 1 in one commit."""
        name = parse_model_name(name)
        if self.store.model(name) is not None:
            raise AlreadyExists(f"model {name!r} exists; choose another name")
        if spec.input_shape != dataset.input_shape:
            raise InvalidArgument(
                f"architecture expects inputs {spec.input_shape}, data has {dataset.input_shape}"
            )
        if spec.num_classes < dataset.num_classes:
            raise InvalidArgument(
                f"data has {dataset.num_classes} classes, model {spec.num_classes}"
            )
        if test_set is None:
            train_set, test_set = train_test_split(dataset, test_fraction, config.seed)
        else:
            train_set = dataset
        model = build_architecture(spec, self.settings.trusted_factories, seed=config.seed)
        x, y = torch.from_numpy(train_set.features), torch.from_numpy(train_set.labels)
        result = train(model, x, y, config, device=self.device)
        metrics, tested = self.evaluate(model, x, y, test_set, config.weight_decay)
        # What the forget policy scales to estimate an exact retrain.
        metrics["training_seconds"] = result.seconds
        self._store_new_model(
            name, spec, config.to_dict(), model, result.checkpoints, train_set, test_set,
            metrics, actor, "train", "create_model",
        )  # fmt: skip
        self.keep_test_measurement(name, 1, tested)
        return self.model_info(name)

    def import_model(
        self, name: str, repository: ModelRepository, actor: str = "admin"
    ) -> ModelInfo:
        """Store a model trained elsewhere (``read_repository``) as version 1 in one commit.

        Without a training configuration the exact retrain is refused (``retrainable``);
        without checkpoints, Scan's influence reads the final weights only (stored as the
        one checkpoint, ``checkpoints_imported`` 0).
        """
        name = parse_model_name(name)
        self.refuse_existing(name)
        spec = repository.spec
        model = build_architecture(spec, self.settings.trusted_factories)
        weights_io.load_into(model, repository.weights)
        model.eval()
        train_set, test_set = repository.train, repository.test
        x, y = torch.from_numpy(train_set.features), torch.from_numpy(train_set.labels)
        metrics, tested = self.evaluate(model, x, y, test_set, repository.weight_decay)
        checkpoints = repository.checkpoints or [
            Checkpoint(0, 1.0, {k: v.detach().clone() for k, v in model.state_dict().items()})
        ]
        training = repository.training or TrainConfig(weight_decay=repository.weight_decay)
        if repository.training is not None:  # what the forget policy prices a retrain from
            metrics["training_seconds"] = _timed_training_estimate(
                model, x, y, training, self.device
            )
            metrics["training_seconds_estimated"] = 1.0
        config = {
            **training.to_dict(),
            "imported": True,
            "retrainable": repository.training is not None,
            "checkpoints_imported": len(repository.checkpoints),
        }
        self._store_new_model(
            name, spec, config, model, checkpoints, train_set, test_set, metrics, actor,
            "import", "import_model",
        )  # fmt: skip
        self.keep_test_measurement(name, 1, tested)
        return self.model_info(name)

    def refuse_existing(self, name: str) -> None:
        if self.store.model(name) is not None:
            raise AlreadyExists(f"model {name!r} exists; choose another name")

    def retrainable(self, name: str) -> bool:
        """Whether an exact retrain is possible: a model imported without a training
        configuration has none to retrain with."""
        return bool(self.model_row(name).train_config.get("retrainable", True))

    def require_retrainable(self, name: str, what: str) -> None:
        if not self.retrainable(name):
            raise FailedPrecondition(
                f"{what}: model {name!r} was imported without a [training] configuration, so "
                "it cannot be retrained exactly; forget with an approximate update (selection "
                "auto, all or lcodec_cg), or import it again with its training configuration"
            )

    def _store_new_model(
        self,
        name: str,
        spec: ArchitectureSpec,
        train_config: dict[str, object],
        model: nn.Module,
        checkpoints: list[Checkpoint],
        train_set: Dataset,
        test_set: Dataset,
        metrics: dict[str, float],
        actor: str,
        created_by: str,
        action: str,
    ) -> None:
        """Version 1 of a new model (``created_by``: train or import), its data, checkpoints
        and audit event (``action``), in one commit."""
        blobs = self.store.blobs
        keys = train_set.sample_keys
        weights_blob = blobs.put(weights_io.model_to_bytes(model))
        checkpoints_blob = blobs.put(weights_io.checkpoints_to_bytes(checkpoints))
        train_blob = blobs.put(_shard_bytes(train_set))
        test_blob = blobs.put(_shard_bytes(test_set))
        now = utc_now()
        with self.store.transaction() as tx:
            tx.insert_model(
                ModelRow(
                    name=name,
                    spec=spec.to_dict(),
                    train_config=train_config,
                    current_version=1,
                    train_blob=train_blob,
                    test_blob=test_blob,
                    checkpoints_blob=checkpoints_blob,
                    num_samples=len(train_set),
                    ledger={},
                    created_at=now,
                )
            )
            tx.insert_version(
                VersionRow(
                    name, 1, 0, weights_blob, created_by, now, metrics, len(train_set), False
                )
            )
            tx.insert_samples(
                name,
                [
                    (int(s), str(o), int(lab), None if keys is None else str(keys[i]))
                    for i, (s, o, lab) in enumerate(
                        zip(
                            train_set.sample_ids,
                            train_set.owner_ids,
                            train_set.labels,
                            strict=True,
                        )
                    )
                ],
            )
            tx.audit(
                actor,
                action,
                f"models/{name}",
                {
                    "training_samples": len(train_set),
                    "test_samples": len(test_set),
                    "architecture": spec.name,
                    "checkpoints": len(checkpoints),
                },
            )

    @staticmethod
    def evaluate(
        model: nn.Module, x: torch.Tensor, y: torch.Tensor, test_set: Dataset, weight_decay: float
    ) -> tuple[dict[str, float], SetMeasurement]:
        """A version's metrics: one batched pass over the training data and one over the test
        set (a forget on 60k samples spent 1.6 s of its commit in four full-batch passes);
        with the test-set measurement, which the version's first forget starts from."""
        from expunge.defenses.evaluate import losses_and_hits

        model.eval()
        tx, ty = torch.from_numpy(test_set.features), torch.from_numpy(test_set.labels)
        train_losses, train_hits = losses_and_hits(model, x, y)
        test_losses, test_hits = losses_and_hits(model, tx, ty)
        with torch.no_grad():
            l2 = float(sum((p.double() ** 2).sum() for p in model.parameters()))
        metrics = {
            "train_accuracy": _mean(train_hits),
            "test_accuracy": _mean(test_hits),
            "train_objective": _mean(train_losses) + 0.5 * weight_decay * l2,
            "test_loss": _mean(test_losses),
        }
        tested = SetMeasurement(test_losses.cpu(), metrics["test_accuracy"])
        return _measured_only(metrics), tested

    @staticmethod
    def metrics_of(
        measured: dict[str, float], model: nn.Module, weight_decay: float
    ) -> dict[str, float]:
        """``evaluate``'s figures from a forget's own after-measurement (``deletion_metrics``
        on the same retained subset and test set): the commit then makes no pass of its own."""
        with torch.no_grad():
            l2 = float(sum((p.double() ** 2).sum() for p in model.parameters()))
        return _measured_only(
            {
                "train_accuracy": measured["retained_accuracy"],
                "test_accuracy": measured["test_accuracy"],
                "train_objective": measured["retained_loss"] + 0.5 * weight_decay * l2,
                "test_loss": measured["test_loss"],
            }
        )

    # Reading ---------------------------------------------------------------------------

    def training_cost(self, name: str) -> TrainingCost:
        """The model's last measured training (time and samples), from its version metrics
        (a forget's version inherits its parent's); zero for a model never timed."""
        row = self.model_row(name)
        version = self.store.version(row.name, row.current_version)
        while version is not None:
            seconds = version.metrics.get("training_seconds")
            if seconds is not None and seconds > 0 and version.num_samples > 0:
                return TrainingCost(float(seconds), version.num_samples)
            version = self.store.version(row.name, version.parent) if version.parent else None
        return TrainingCost(0.0, 0)

    def model_row(self, name: str) -> ModelRow:
        row = self.store.model(parse_model_name(name))
        if row is None:
            raise NotFound(
                f"model {name!r} not found; ListModels shows the models this server holds"
            )
        return row

    def version_row(self, name: str, version: int) -> VersionRow:
        row = self.model_row(name)
        number = version or row.current_version
        found = self.store.version(row.name, number)
        if found is None:
            raise NotFound(
                f"version {number} of model {row.name!r} not found; current is {row.current_version}"
            )
        return found

    def model_info(self, name: str) -> ModelInfo:
        row = self.model_row(name)
        return ModelInfo(
            row=row,
            version=self.version_row(row.name, 0),
            num_training_samples=self.store.sample_count(row.name),
            num_owners=self.store.owner_count(row.name),
            num_checkpoints=len(self.checkpoints(row.name)) if row.checkpoints_blob else 0,
            forgotten_samples=self.store.forgotten_count(row.name),
        )

    def list_models(self) -> list[ModelInfo]:
        return [self.model_info(r.name) for r in self.store.models()]

    def list_versions(
        self, name: str, page_size: int, page_token: str
    ) -> tuple[list[VersionRow], str]:
        row = self.model_row(name)
        size, after = parse_page(page_size, page_token)
        rows = self.store.versions(row.name, after, size + 1)
        next_token = str(rows[size - 1].version) if len(rows) > size else ""
        return rows[:size], next_token

    def snapshot(self, name: str, version: int = 0) -> ModelSnapshot:
        """The loaded model of a version (cached; versions are immutable)."""
        generation = 0
        if version == 0:
            with self._lock:
                current = self._current.get(name)
                # A forget or rollback committing while this loads clears the cache; the
                # version read before it must not be cached as current after it.
                generation = self._generations.get(name, 0)
            if current is not None:
                return current
        vrow = self.version_row(name, version)
        key = (vrow.model, vrow.version)
        with self._lock:
            cached = self._snapshots.get(key)
        if cached is not None:
            return self._cached(cached, version == 0, generation)
        row = self.model_row(vrow.model)
        spec = ArchitectureSpec.from_dict(row.spec)
        module = build_architecture(spec, self.settings.trusted_factories, seed=0)
        weights_io.load_into(module, self.store.blobs.get(vrow.weights_blob))
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        snap = ModelSnapshot(vrow.model, vrow.version, spec, module, vrow.weights_blob)
        with self._lock:
            self._snapshots[key] = snap
        return self._cached(snap, version == 0, generation)

    def _cached(self, snap: ModelSnapshot, as_current: bool, generation: int) -> ModelSnapshot:
        """Remember ``snap`` as its model's current version unless that changed since read."""
        if as_current:
            with self._lock:
                if self._generations.get(snap.name, 0) == generation:
                    self._current[snap.name] = snap
        return snap

    def checkpoints(self, name: str) -> list[Checkpoint]:
        row = self.model_row(name)
        if not row.checkpoints_blob:
            return []
        return weights_io.checkpoints_from_bytes(self.store.blobs.get(row.checkpoints_blob))

    def training_data(self, name: str) -> TrainingData:
        row = self.model_row(name)
        with self._lock:
            cached = self._data_cache.get(row.name)
        if cached is not None and cached.blob == row.train_blob:
            return cached
        # Memory-mapped: the data is held once, in the page cache, and the compute process
        # maps the same file (``data_path``) instead of receiving a copy.
        arrays = weights_io.arrays_from_file(self.store.blobs.verified_path(row.train_blob))
        ids = np.asarray(arrays["sample_ids"])
        owners = self.store.owners_of(row.name, ids.tolist())
        keys = self.store.keys_of(row.name, ids.tolist())
        data = TrainingData(
            torch.from_numpy(arrays["features"]),
            torch.from_numpy(arrays["labels"]),
            ids,
            np.array([owners[int(i)] for i in ids], dtype=str),
            row.train_blob,
            np.array([keys[int(i)] for i in ids], dtype=str) if keys else None,
        )
        with self._lock:
            self._data_cache[row.name] = data
        return data

    def test_measurement(self, name: str, version: int) -> SetMeasurement | None:
        """The kept test-set measurement of ``version``, or None when it was not kept."""
        with self._lock:
            kept = self._test_measured.get(name)
        return kept[1] if kept is not None and kept[0] == version else None

    def keep_test_measurement(self, name: str, version: int, measured: SetMeasurement) -> None:
        with self._lock:
            self._test_measured[name] = (version, measured)

    def preload(self) -> None:
        """Load every model's training data and measure its served version on the test set
        (the server starts this in the background): the first forget of a 60k-sample model
        spent 0.11 s of its 1.7 s reading the shard and owners and 0.07 s on the test set.
        Best effort: a store closed meanwhile ends it."""
        try:
            for row in self.store.models():
                self.training_data(row.name)
                snapshot = self.snapshot(row.name)
                if self.test_measurement(row.name, snapshot.version) is None:
                    test = self.test_data(row.name)
                    measured = measure_set(
                        snapshot.module,
                        torch.from_numpy(test.features),
                        torch.from_numpy(test.labels),
                    )
                    self.keep_test_measurement(row.name, snapshot.version, measured)
        except Exception:  # a warm-up: the first forget measures what is missing
            log.debug("preload stopped", exc_info=True)

    def data_path(self, blob: str) -> Path:
        """The file of a data shard, for a process that maps it (already verified)."""
        return self.store.blobs.path(blob)

    def has_test_set(self, name: str) -> bool:
        """Whether the model has held-out rows (one imported without them has none)."""
        blob = self.model_row(name).test_blob
        with self._lock:
            known = self._test_sizes.get(blob)
        if known is None:
            known = len(self.test_data(name).labels)
            with self._lock:
                self._test_sizes[blob] = known
        return known > 0

    def test_data(self, name: str) -> Dataset:
        row = self.model_row(name)
        arrays = weights_io.arrays_from_file(self.store.blobs.verified_path(row.test_blob))
        n = arrays["labels"].shape[0]
        spec = ArchitectureSpec.from_dict(row.spec)
        return Dataset(
            arrays["features"],
            arrays["labels"],
            arrays["sample_ids"],
            np.full(n, "-"),
            spec.num_classes,
        )

    # Serving ---------------------------------------------------------------------------

    def check_inputs(
        self, spec: ArchitectureSpec, inputs: np.ndarray, field: str = "inputs"
    ) -> None:
        """Inputs must be float32 of shape (B, *input_shape) with 1 <= B <= max_batch."""
        if inputs.dtype != np.float32:
            raise invalid_field(
                field,
                f"dtype is {inputs.dtype}; expected float32 of shape (batch, {', '.join(map(str, spec.input_shape))})",
            )
        if tuple(inputs.shape[1:]) != spec.input_shape or inputs.ndim != len(spec.input_shape) + 1:
            raise invalid_field(
                field,
                f"shape is {tuple(inputs.shape)}; expected (batch, {', '.join(map(str, spec.input_shape))})",
            )
        if inputs.shape[0] == 0:
            raise invalid_field(field, "batch is empty; send at least one input")
        if inputs.shape[0] > self.settings.max_batch:
            raise invalid_field(
                field, f"batch of {inputs.shape[0]} exceeds the limit of {self.settings.max_batch}"
            )
        finite = np.isfinite(inputs).reshape(len(inputs), -1).all(axis=1)
        if not finite.all():
            raise invalid_field(
                f"{field}[{int(np.argmin(finite))}]", "contains NaN or infinite values"
            )
        magnitude = np.abs(inputs).reshape(len(inputs), -1).max(axis=1)
        limit = self.settings.max_input_magnitude
        if (magnitude > limit).any():
            row = int(np.argmax(magnitude > limit))
            raise invalid_field(
                f"{field}[{row}]",
                f"holds a value of magnitude {float(magnitude[row]):.3g}, beyond the "
                f"{limit:g} this server accepts (the model's gradients would overflow); "
                "scale the inputs as the training data was scaled",
            )

    def forward_checked(
        self, module: torch.nn.Module, inputs: torch.Tensor, field: str = "inputs"
    ) -> torch.Tensor:
        """Logits ``(B, classes)`` of ``inputs``; an input whose forward pass overflows is
        refused (INVALID_ARGUMENT naming it), so no answer carries NaN."""
        with torch.no_grad():
            logits = module(inputs)
        finite = torch.isfinite(logits).all(dim=1)
        if not bool(finite.all()):
            row = int(torch.argmin(finite.to(torch.int8)))
            raise invalid_field(
                f"{field}[{row}]", "the model's output for this input overflows float32"
            )
        return logits

    def predict(self, name: str, inputs: np.ndarray, version: int = 0) -> Prediction:
        snap = self.snapshot(name, version)
        # The current version may be superseded by a forget committed since the snapshot was
        # read: that answer is as of the call's start. A named old version must be servable.
        self.refuse_unservable(snap.name, snap.version, held_only=not version)
        self.check_inputs(snap.spec, inputs)
        probs = torch.softmax(self.forward_checked(snap.module, torch.from_numpy(inputs)), dim=1)
        return Prediction(
            probs.argmax(dim=1).numpy(), probs.numpy().astype(np.float32), snap.version
        )

    def export(self, name: str, version: int = 0) -> tuple[bytes, VersionRow]:
        vrow = self.version_row(name, version)
        self.refuse_unservable(vrow.model, vrow.version)
        return self.store.blobs.get(vrow.weights_blob), vrow

    def refuse_unservable(self, model: str, version: int, held_only: bool = False) -> None:
        """FAILED_PRECONDITION for a version kept only for the record: trained on samples
        forgotten since, or held because its forget cost too much accuracy."""
        vrow = self.store.version(model, version)
        if vrow is None:
            return
        if vrow.superseded_by_forget and not held_only:
            raise FailedPrecondition(
                f"version {version} of {model!r} was trained on samples forgotten since; "
                "it is kept for the record but cannot be served, exported or restored"
            )
        if vrow.held_reason:
            raise FailedPrecondition(f"version {version} of {model!r} is held: {vrow.held_reason}")

    def rollback(self, name: str, version: int, actor: str) -> ModelInfo:
        vrow = self.version_row(name, version)
        if version == 0:
            raise invalid_field("name", "name a version: models/{model}/versions/{n}")
        # Checked inside the write transaction (the store's lock is reentrant, the read sees
        # it): a forget committing between a check made outside and this update would mark
        # the version superseded, and the rollback would serve a model trained on the
        # samples it removed.
        self.store.rollback(vrow.model, vrow.version, actor, check=self.refuse_unservable)
        self.forget_snapshot_cache(vrow.model)
        return self.model_info(vrow.model)

    def audit(self, model: str, page_size: int, page_token: str) -> tuple[list[Any], str]:
        if model:
            self.model_row(model)
        size, after = parse_page(page_size, page_token)
        rows = self.store.audit_events(parse_model_name(model) if model else None, after, size + 1)
        token = str(rows[size - 1].id) if len(rows) > size else ""
        return rows[:size], token

    def operations(
        self, model: str, states: list[str], page_size: int, page_token: str
    ) -> tuple[list[RequestRow], str]:
        """A page of journalled operations, newest first; the token is the last one's seq."""
        name = parse_model_name(model) if model else None
        if name:
            self.model_row(name)
        size, before = parse_page(page_size, page_token)
        rows = self.store.requests_page(name, states, before, size + 1)
        token = str(rows[size - 1].seq) if len(rows) > size else ""
        return rows[:size], token

    def on_version_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(model)`` whenever a model's current version changes."""
        self._version_listeners.append(listener)

    def forget_snapshot_cache(self, name: str) -> None:
        """The model's current version changed: drop what was derived from the old one."""
        with self._lock:
            self._generations[name] = self._generations.get(name, 0) + 1
            for key in [k for k in self._snapshots if k[0] == name]:
                del self._snapshots[key]
            self._current.pop(name, None)
            self._data_cache.pop(name, None)
        for listener in self._version_listeners:
            listener(name)


def _timed_training_estimate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    device: torch.device,
    steps: int = 3,
) -> float:
    """An imported model's retrain time, never measured here: ``steps`` timed SGD steps of
    the configuration's batch size on a copy (after one untimed warm-up) on ``device``,
    where a retrain would run, scaled to its epochs over ``x``. The L-BFGS polish, when
    configured, is not included."""
    scratch = copy.deepcopy(model).to(device).train()
    optimiser = torch.optim.SGD(
        scratch.parameters(), lr=config.learning_rate, momentum=config.momentum
    )
    batch = min(config.batch_size, len(x))
    elapsed = 0.0
    for step in range(steps + 1):
        started = time.perf_counter()
        rows = slice((step * batch) % max(len(x) - batch, 1), None)
        xb, yb = x[rows][:batch].to(device), y[rows][:batch].to(device)
        optimiser.zero_grad()
        sample_loss(scratch, scratch(xb), yb).mean().backward()
        optimiser.step()
        synchronize(device)
        if step:
            elapsed += time.perf_counter() - started
    return config.epochs * len(x) * elapsed / (steps * batch)


def _shard_bytes(dataset: Dataset) -> bytes:
    return weights_io.arrays_to_bytes(
        {"features": dataset.features, "labels": dataset.labels, "sample_ids": dataset.sample_ids}
    )
