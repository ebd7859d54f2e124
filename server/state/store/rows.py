"""Typed rows of the database, and their reading from SQLite rows."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class ModelRow:
    name: str
    spec: dict[str, Any]
    train_config: dict[str, Any]
    current_version: int
    train_blob: str
    test_blob: str
    checkpoints_blob: str | None
    num_samples: int
    ledger: dict[str, Any]
    created_at: str


@dataclass(frozen=True)
class VersionRow:
    model: str
    version: int
    parent: int
    weights_blob: str
    created_by: str
    created_at: str
    metrics: dict[str, float]
    num_samples: int
    superseded_by_forget: bool
    # Set: the version is kept for the record but not served (why, and what to do).
    held_reason: str | None = None

    @classmethod
    def made_by(
        cls,
        request_id: str,
        model: str,
        version: int,
        parent: int,
        weights_blob: str,
        metrics: dict[str, float],
        num_samples: int,
        held_reason: str | None = None,
    ) -> VersionRow:
        """A new version, made now by ``request_id`` (or "train")."""
        return cls(
            model,
            version,
            parent,
            weights_blob,
            request_id,
            utc_now(),
            metrics,
            num_samples,
            False,
            held_reason,
        )


@dataclass(frozen=True)
class RequestRow:
    request_id: str
    model: str
    kind: str
    payload_sha256: str
    payload: dict[str, Any]
    state: str
    seq: int
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error_code: str | None
    error_message: str | None
    created_at: str
    updated_at: str


@dataclass(frozen=True)
class ArtefactRow:
    """A derived artefact of a model (the gradient index, scan calibration) and its blob."""

    model: str
    kind: str
    blob: str
    version: int  # the model version it was derived from
    meta: dict[str, Any]


@dataclass(frozen=True)
class AuditRow:
    id: int
    time: str
    actor: str
    action: str
    resource: str
    details: dict[str, Any]


def model_row(r: sqlite3.Row) -> ModelRow:
    return ModelRow(
        name=r["name"],
        spec=json.loads(r["spec_json"]),
        train_config=json.loads(r["train_config_json"]),
        current_version=int(r["current_version"]),
        train_blob=r["train_blob"],
        test_blob=r["test_blob"],
        checkpoints_blob=r["checkpoints_blob"],
        num_samples=int(r["num_samples"]),
        ledger=json.loads(r["ledger_json"]),
        created_at=r["created_at"],
    )


def version_row(r: sqlite3.Row) -> VersionRow:
    return VersionRow(
        model=r["model"],
        version=int(r["version"]),
        parent=int(r["parent"]),
        weights_blob=r["weights_blob"],
        created_by=r["created_by"],
        created_at=r["created_at"],
        metrics=json.loads(r["metrics_json"]),
        num_samples=int(r["num_samples"]),
        superseded_by_forget=bool(r["superseded_by_forget"]),
        held_reason=r["held_reason"],
    )


def request_row(r: sqlite3.Row) -> RequestRow:
    return RequestRow(
        request_id=r["request_id"],
        model=r["model"],
        kind=r["kind"],
        payload_sha256=r["payload_sha256"],
        payload=json.loads(r["payload_json"]),
        state=r["state"],
        seq=int(r["seq"]),
        progress=json.loads(r["progress_json"]),
        result=json.loads(r["result_json"]) if r["result_json"] else None,
        error_code=r["error_code"],
        error_message=r["error_message"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
    )
