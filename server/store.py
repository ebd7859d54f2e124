"""The state store: SQLite (WAL, synchronous=FULL) plus content-addressed blobs.

Everything that must survive a crash is a row here or a blob referenced by one.
Rows that reference blobs are written in the same transaction as the state they
describe, after the blobs are durable (see ``blobs.py``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .blobs import BlobStore
from .identifiers import IdentifierKey
from .state_lock import StateDirectoryLock

SCHEMA_VERSION = 2
# A request in one of these states has ended; its payload keeps no plain identifiers.
FINAL_REQUEST_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")

# Each entry migrates from version i to i + 1; never edit a released one, append.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE models (
        name TEXT PRIMARY KEY,
        spec_json TEXT NOT NULL,
        train_config_json TEXT NOT NULL,
        current_version INTEGER NOT NULL,
        train_blob TEXT NOT NULL,
        test_blob TEXT NOT NULL,
        checkpoints_blob TEXT,
        num_samples INTEGER NOT NULL,
        ledger_json TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL
    );
    CREATE TABLE versions (
        model TEXT NOT NULL REFERENCES models(name),
        version INTEGER NOT NULL,
        parent INTEGER NOT NULL,
        weights_blob TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at TEXT NOT NULL,
        metrics_json TEXT NOT NULL,
        num_samples INTEGER NOT NULL,
        superseded_by_forget INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (model, version)
    );
    CREATE TABLE samples (
        model TEXT NOT NULL REFERENCES models(name),
        sample_id INTEGER NOT NULL,
        owner_id TEXT NOT NULL,
        label INTEGER NOT NULL,
        PRIMARY KEY (model, sample_id)
    );
    CREATE INDEX samples_by_owner ON samples(model, owner_id);
    CREATE TABLE forgotten (
        model TEXT NOT NULL,
        sample_id INTEGER NOT NULL,
        owner_sha256 TEXT NOT NULL,
        request_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        PRIMARY KEY (model, sample_id)
    );
    CREATE INDEX forgotten_by_owner ON forgotten(model, owner_sha256);
    CREATE TABLE requests (
        request_id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        kind TEXT NOT NULL,
        payload_sha256 TEXT NOT NULL,
        payload_json TEXT NOT NULL,
        state TEXT NOT NULL,
        seq INTEGER NOT NULL,
        progress_json TEXT NOT NULL DEFAULT '{}',
        result_json TEXT,
        error_code TEXT,
        error_message TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX requests_by_state ON requests(state, seq);
    CREATE TABLE artefacts (
        model TEXT NOT NULL,
        kind TEXT NOT NULL,
        blob TEXT NOT NULL,
        version INTEGER NOT NULL,
        meta_json TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (model, kind)
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        resource TEXT NOT NULL,
        details_json TEXT NOT NULL
    );
    """,
    # 1 -> 2: a version whose forget cost more accuracy than allowed is kept but not served.
    """
    ALTER TABLE versions ADD COLUMN held_reason TEXT;
    ALTER TABLE versions ADD COLUMN weights_pruned INTEGER NOT NULL DEFAULT 0;
    """,
]


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
class AuditRow:
    id: int
    time: str
    actor: str
    action: str
    resource: str
    details: dict[str, Any]


class Store:
    """SQLite database and blob directory under one state directory.

    Opening a store takes the directory's writer lock before reading anything, so a second
    process (server, ``expunge train``, a script) is refused at once with
    ``StateDirectoryInUse``; ``close`` gives it back.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._writer = StateDirectoryLock(self.root)
        try:
            self._open()
        except BaseException:
            self._writer.release()
            raise

    def _open(self) -> None:
        self.blobs = BlobStore(self.root / "blobs")
        self._lock = threading.RLock()
        # Held from writing a blob until a committed row references it, and by garbage
        # collection, so a blob in flight is never collected.
        self.write_lock = threading.RLock()
        self._db = sqlite3.connect(
            self.root / "expunge.db", check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # Deleted rows (forgotten owners' ids) are overwritten with zeros, not left in free
        # pages for a reader of the file to find.
        self._db.execute("PRAGMA secure_delete=ON")
        self.identifiers = IdentifierKey(self.root)
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
        self._writer.release()

    def checkpoint_wal(self) -> None:
        """Copy the WAL into the database and truncate it: old page images (a journalled
        request's payload before it was scrubbed) do not outlive the commit that ended them."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _migrate(self) -> None:
        with self._lock:
            current = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"state directory has schema {current}, newer than this server's "
                    f"{SCHEMA_VERSION}; upgrade Expunge"
                )
            for version in range(current, SCHEMA_VERSION):
                with self.transaction() as db:
                    db.executescript_in_tx(MIGRATIONS[version])
                    db.execute(f"PRAGMA user_version={version + 1}")

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def transaction(self) -> Iterator[_Tx]:
        """One atomic, durable unit of change (BEGIN IMMEDIATE ... COMMIT)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _Tx(self._db, self.identifiers)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, params).fetchall())

    # Models and versions -------------------------------------------------------------

    def model(self, name: str) -> ModelRow | None:
        rows = self.query("SELECT * FROM models WHERE name = ?", (name,))
        return _model_row(rows[0]) if rows else None

    def models(self) -> list[ModelRow]:
        return [_model_row(r) for r in self.query("SELECT * FROM models ORDER BY name")]

    def version(self, model: str, version: int) -> VersionRow | None:
        rows = self.query(
            "SELECT * FROM versions WHERE model = ? AND version = ?", (model, version)
        )
        return _version_row(rows[0]) if rows else None

    def versions(self, model: str, after: int = 0, limit: int = 1000) -> list[VersionRow]:
        rows = self.query(
            "SELECT * FROM versions WHERE model = ? AND version > ? ORDER BY version LIMIT ?",
            (model, after, limit),
        )
        return [_version_row(r) for r in rows]

    def next_version(self, model: str) -> int:
        """The number the model's next version gets: the highest ever assigned plus one."""
        rows = self.query("SELECT MAX(version) FROM versions WHERE model = ?", (model,))
        return int(rows[0][0] or 0) + 1

    def sample_count(self, model: str) -> int:
        return int(self.query("SELECT COUNT(*) FROM samples WHERE model = ?", (model,))[0][0])

    def owner_count(self, model: str) -> int:
        rows = self.query("SELECT COUNT(DISTINCT owner_id) FROM samples WHERE model = ?", (model,))
        return int(rows[0][0])

    def forgotten_count(self, model: str) -> int:
        return int(self.query("SELECT COUNT(*) FROM forgotten WHERE model = ?", (model,))[0][0])

    def owners_of(self, model: str, sample_ids: list[int]) -> dict[int, str]:
        found: dict[int, str] = {}
        for start in range(0, len(sample_ids), 500):
            chunk = sample_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.query(
                f"SELECT sample_id, owner_id FROM samples WHERE model = ? AND sample_id IN ({marks})",
                (model, *chunk),
            ):
                found[int(row[0])] = str(row[1])
        return found

    def referenced_blobs(self) -> set[str]:
        refs: set[str] = set()
        for sql in (
            "SELECT train_blob FROM models",
            "SELECT test_blob FROM models",
            "SELECT checkpoints_blob FROM models WHERE checkpoints_blob IS NOT NULL",
            "SELECT weights_blob FROM versions WHERE weights_pruned = 0",
            "SELECT blob FROM artefacts",
        ):
            refs |= {str(r[0]) for r in self.query(sql)}
        return refs

    def prune_superseded_weights(self) -> int:
        """Let the weights of versions trained on forgotten samples be collected; how many.

        The rows stay (number, parent, weights hash, who made them): the record of what was
        served. Such versions can no longer be served, exported or restored anyway.
        """
        with self.write_lock:
            with self.transaction() as tx:
                pruned = tx.execute(
                    "UPDATE versions SET weights_pruned = 1 "
                    "WHERE superseded_by_forget = 1 AND weights_pruned = 0"
                ).rowcount
            self.blobs.collect_garbage(self.referenced_blobs())
        return int(pruned)

    # Requests (the journal) -----------------------------------------------------------

    def request(self, request_id: str) -> RequestRow | None:
        rows = self.query("SELECT * FROM requests WHERE request_id = ?", (request_id,))
        return _request_row(rows[0]) if rows else None

    def requests_in_state(self, *states: str) -> list[RequestRow]:
        marks = ",".join("?" * len(states))
        rows = self.query(f"SELECT * FROM requests WHERE state IN ({marks}) ORDER BY seq", states)
        return [_request_row(r) for r in rows]

    # Audit ------------------------------------------------------------------------------

    def audit_events(self, model: str | None, after_id: int, limit: int) -> list[AuditRow]:
        if model:
            rows = self.query(
                "SELECT * FROM audit WHERE id > ? AND (resource = ? OR resource LIKE ?) "
                "ORDER BY id LIMIT ?",
                (after_id, f"models/{model}", f"models/{model}/%", limit),
            )
        else:
            rows = self.query(
                "SELECT * FROM audit WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
            )
        return [
            AuditRow(
                int(r["id"]),
                r["time"],
                r["actor"],
                r["action"],
                r["resource"],
                json.loads(r["details_json"]),
            )
            for r in rows
        ]

    def record_audit(self, actor: str, action: str, resource: str, details: dict[str, Any]) -> None:
        with self.transaction() as tx:
            tx.audit(actor, action, resource, details)


class _Tx:
    """The statements one transaction may run; keeps SQL out of the engine."""

    def __init__(self, db: sqlite3.Connection, identifiers: IdentifierKey) -> None:
        self._db = db
        self._identifiers = identifiers

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def executescript_in_tx(self, script: str) -> None:
        # executescript would COMMIT first; run statement by statement inside the tx.
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)

    def audit(self, actor: str, action: str, resource: str, details: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT INTO audit (time, actor, action, resource, details_json) VALUES (?,?,?,?,?)",
            (utc_now(), actor, action, resource, json.dumps(details, sort_keys=True)),
        )

    def insert_model(self, row: ModelRow) -> None:
        self._db.execute(
            "INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                row.name,
                json.dumps(row.spec),
                json.dumps(row.train_config),
                row.current_version,
                row.train_blob,
                row.test_blob,
                row.checkpoints_blob,
                row.num_samples,
                json.dumps(row.ledger),
                row.created_at,
            ),
        )

    def insert_version(self, row: VersionRow) -> None:
        self._db.execute(
            "INSERT INTO versions (model, version, parent, weights_blob, created_by, created_at,"
            " metrics_json, num_samples, superseded_by_forget, held_reason)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                row.model,
                row.version,
                row.parent,
                row.weights_blob,
                row.created_by,
                row.created_at,
                json.dumps(row.metrics),
                row.num_samples,
                int(row.superseded_by_forget),
                row.held_reason,
            ),
        )

    def insert_samples(self, model: str, rows: list[tuple[int, str, int]]) -> None:
        self._db.executemany(
            "INSERT INTO samples (model, sample_id, owner_id, label) VALUES (?,?,?,?)",
            [(model, sid, owner, label) for sid, owner, label in rows],
        )

    def set_request_state(
        self,
        request_id: str,
        state: str,
        result: dict[str, Any] | None = None,
        error: tuple[str, str] | None = None,
    ) -> None:
        self._db.execute(
            "UPDATE requests SET state = ?, result_json = COALESCE(?, result_json), "
            "error_code = ?, error_message = ?, updated_at = ? WHERE request_id = ?",
            (
                state,
                json.dumps(result) if result is not None else None,
                error[0] if error else None,
                error[1] if error else None,
                utc_now(),
                request_id,
            ),
        )
        if state in FINAL_REQUEST_STATES:
            self._scrub_payload(request_id)

    def _scrub_payload(self, request_id: str) -> None:
        """The ids were needed to do the work; once it is over only their digests stay."""
        row = self._db.execute(
            "SELECT payload_json FROM requests WHERE request_id = ?", (request_id,)
        ).fetchone()
        if row is not None:
            scrubbed = self._identifiers.without_identifiers(json.loads(row[0]))
            self._db.execute(
                "UPDATE requests SET payload_json = ? WHERE request_id = ?",
                (json.dumps(scrubbed, sort_keys=True), request_id),
            )

    def cancel_if_pending(self, request_id: str, message: str) -> None:
        """CANCELLED at once if the request has not started; a running one is only marked
        (``mark_cancel_asked``), since it may be past the point of no return."""
        cursor = self._db.execute(
            "UPDATE requests SET state = 'CANCELLED', error_code = 'CANCELLED', "
            "error_message = ?, updated_at = ? WHERE request_id = ? AND state = 'PENDING'",
            (message, utc_now(), request_id),
        )
        if cursor.rowcount:
            self._scrub_payload(request_id)

    def mark_cancel_asked(self, request_id: str, mark: str) -> None:
        self._db.execute(
            "UPDATE requests SET error_code = ? WHERE request_id = ? AND state = 'APPLYING'",
            (mark, request_id),
        )

    def requeue_interrupted(self, cancel_mark: str, message: str) -> None:
        """After a crash: APPLYING requests whose cancellation was asked end CANCELLED; the
        rest go back to PENDING, to be redone from scratch."""
        cancelled = [
            str(r[0])
            for r in self._db.execute(
                "SELECT request_id FROM requests WHERE state = 'APPLYING' AND error_code = ?",
                (cancel_mark,),
            )
        ]
        for request_id in cancelled:
            self.set_request_state(request_id, "CANCELLED", error=(cancel_mark, message))
        self._db.execute("UPDATE requests SET state = 'PENDING' WHERE state = 'APPLYING'")

    def insert_request(
        self, request_id: str, model: str, kind: str, payload_sha256: str, payload: dict[str, Any]
    ) -> None:
        seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM requests").fetchone()[0]
        now = utc_now()
        self._db.execute(
            "INSERT INTO requests (request_id, model, kind, payload_sha256, payload_json, state,"
            " seq, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                request_id,
                model,
                kind,
                payload_sha256,
                json.dumps(payload, sort_keys=True),
                "PENDING",
                seq,
                now,
                now,
            ),
        )


def _model_row(r: sqlite3.Row) -> ModelRow:
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


def _version_row(r: sqlite3.Row) -> VersionRow:
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


def _request_row(r: sqlite3.Row) -> RequestRow:
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
