"""The state store: SQLite (WAL, synchronous=FULL) plus content-addressed blobs.

Everything that must survive a crash is a row here or a blob referenced by one.
Rows that reference blobs are written in the same transaction as the state they
describe, after the blobs are durable (see ``blobs.py``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from expunge.server.state.blobs import BlobStore
from expunge.server.state.identifiers import IdentifierKey
from expunge.server.state.state_lock import StateDirectoryLock
from expunge.server.state.store.commits import ForgetCommit, JournalEntry, RetrainCommit
from expunge.server.state.store.rows import (
    ArtefactRow,
    AuditRow,
    ModelRow,
    RequestRow,
    VersionRow,
    model_row,
    request_row,
    version_row,
)
from expunge.server.state.store.schema import MIGRATIONS, SCHEMA_VERSION
from expunge.server.state.store.transaction import Transaction


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
                with self.transaction() as tx:
                    tx.migrate(MIGRATIONS[version], version + 1)

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One atomic, durable unit of change (BEGIN IMMEDIATE ... COMMIT)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._db, self.identifiers)
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
        return model_row(rows[0]) if rows else None

    def models(self) -> list[ModelRow]:
        return [model_row(r) for r in self.query("SELECT * FROM models ORDER BY name")]

    def version(self, model: str, version: int) -> VersionRow | None:
        rows = self.query(
            "SELECT * FROM versions WHERE model = ? AND version = ?", (model, version)
        )
        return version_row(rows[0]) if rows else None

    def versions(self, model: str, after: int = 0, limit: int = 1000) -> list[VersionRow]:
        rows = self.query(
            "SELECT * FROM versions WHERE model = ? AND version > ? ORDER BY version LIMIT ?",
            (model, after, limit),
        )
        return [version_row(r) for r in rows]

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
        rows = self._chunked(
            "SELECT sample_id, owner_id FROM samples WHERE model = ? AND sample_id IN ({marks})",
            model,
            sample_ids,
        )
        return {int(r[0]): str(r[1]) for r in rows}

    def _chunked(self, sql: str, model: str, values: list[Any]) -> list[sqlite3.Row]:
        """``sql`` (``{marks}``: one chunk's placeholders) over ``values`` 500 at a time."""
        rows: list[sqlite3.Row] = []
        for start in range(0, len(values), 500):
            chunk = values[start : start + 500]
            rows += self.query(sql.format(marks=",".join("?" * len(chunk))), (model, *chunk))
        return rows

    def keys_of(self, model: str, sample_ids: list[int]) -> dict[int, str]:
        """The sample keys of those of ``sample_ids`` that have one (a keyed repository)."""
        rows = self._chunked(
            "SELECT sample_id, sample_key FROM samples WHERE model = ? "
            "AND sample_key IS NOT NULL AND sample_id IN ({marks})",
            model,
            sample_ids,
        )
        return {int(r[0]): str(r[1]) for r in rows}

    def sample_ids_for_keys(self, model: str, keys: list[str]) -> dict[str, int]:
        """The sample id of each of ``keys`` that ``model`` holds or has forgotten."""
        held = self._chunked(
            "SELECT sample_key, sample_id FROM samples WHERE model = ? AND sample_key IN ({marks})",
            model,
            keys,
        )
        found = {str(r[0]): int(r[1]) for r in held}
        by_digest = {self.identifiers.digest("sample_key", k): k for k in keys if k not in found}
        forgotten = self._chunked(
            "SELECT key_sha256, sample_id FROM forgotten WHERE model = ? "
            "AND key_sha256 IN ({marks})",
            model,
            list(by_digest),
        )
        found.update({by_digest[str(r[0])]: int(r[1]) for r in forgotten})
        return found

    def sample_ids(self, model: str) -> list[int]:
        """Every present sample id of ``model``, ascending."""
        rows = self.query(
            "SELECT sample_id FROM samples WHERE model = ? ORDER BY sample_id", (model,)
        )
        return [int(r[0]) for r in rows]

    def owner_ids(self, model: str) -> list[str]:
        """Every owner with a present sample in ``model``, sorted."""
        rows = self.query(
            "SELECT DISTINCT owner_id FROM samples WHERE model = ? ORDER BY owner_id", (model,)
        )
        return [str(r[0]) for r in rows]

    def present_sample_ids(self, model: str, sample_ids: list[int]) -> set[int]:
        """Those of ``sample_ids`` that ``model`` still holds."""
        return self._in_chunks(
            "SELECT sample_id FROM samples WHERE model = ? AND sample_id IN ({marks})",
            model,
            sample_ids,
        )

    def known_sample_ids(self, model: str, sample_ids: list[int]) -> set[int]:
        """Those of ``sample_ids`` that ``model`` holds or has forgotten."""
        return self._in_chunks(
            "SELECT sample_id FROM samples WHERE model = ? AND sample_id IN ({marks}) "
            "UNION SELECT sample_id FROM forgotten WHERE model = ? AND sample_id IN ({marks})",
            model,
            sample_ids,
            twice=True,
        )

    def _in_chunks(
        self, sql: str, model: str, sample_ids: list[int], twice: bool = False
    ) -> set[int]:
        found: set[int] = set()
        for start in range(0, len(sample_ids), 500):
            chunk = list(sample_ids[start : start + 500])
            params = (model, *chunk) * (2 if twice else 1)
            rows = self.query(sql.format(marks=",".join("?" * len(chunk))), params)
            found |= {int(r[0]) for r in rows}
        return found

    def owner_sample_count(self, model: str, owner_id: str) -> int:
        """How many samples ``owner_id`` has in ``model`` (counted on the owner index alone:
        fetching a large owner's ids took 0.2 s for 24k samples)."""
        rows = self.query(
            "SELECT COUNT(*) FROM samples WHERE model = ? AND owner_id = ?", (model, owner_id)
        )
        return int(rows[0][0])

    def owner_known(self, model: str, owner_id: str) -> bool:
        """The owner has samples in ``model``, or had some that were forgotten."""
        if self.query(
            "SELECT 1 FROM samples WHERE model = ? AND owner_id = ? LIMIT 1", (model, owner_id)
        ):
            return True
        digest = self.identifiers.digest("owner", owner_id)
        return bool(
            self.query(
                "SELECT 1 FROM forgotten WHERE model = ? AND owner_sha256 = ? LIMIT 1",
                (model, digest),
            )
        )

    def forgotten_sample_ids(self, model: str, request_id: str | None = None) -> set[int]:
        """Samples ``model`` has forgotten (by ``request_id`` alone, when given)."""
        if request_id is None:
            rows = self.query("SELECT sample_id FROM forgotten WHERE model = ?", (model,))
        else:
            rows = self.query(
                "SELECT sample_id FROM forgotten WHERE model = ? AND request_id = ?",
                (model, request_id),
            )
        return {int(r[0]) for r in rows}

    def artefact(self, model: str, kind: str) -> ArtefactRow | None:
        rows = self.query(
            "SELECT blob, version, meta_json FROM artefacts WHERE model = ? AND kind = ?",
            (model, kind),
        )
        if not rows:
            return None
        return ArtefactRow(model, kind, str(rows[0][0]), int(rows[0][1]), json.loads(rows[0][2]))

    def put_artefact(self, artefact: ArtefactRow) -> None:
        """Record (or replace) a derived artefact whose blob is already durable."""
        with self.transaction() as tx:
            tx.put_artefact(artefact)

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
                pruned = tx.prune_superseded_weights()
            self.blobs.collect_garbage(self.referenced_blobs())
        return int(pruned)

    # The commits: every write of a forget, a retrain and a rollback in one place each ----

    def commit_forget(self, commit: ForgetCommit) -> None:
        """Apply a computed forget in one transaction: the new version, the model's data
        and ledger, the purge of the rows, the index, the receipt and the audit.

        Raises ``VersionMoved`` (nothing written) if the model changed since ``commit``
        was computed; the blobs it names must be durable already.
        """
        with self.transaction() as tx:
            tx.add_version(commit.version, expected_current=commit.version.parent)
            tx.set_model_data(
                commit.version.model,
                current_version=commit.version.version,
                train_blob=commit.train_blob,
                num_samples=commit.version.num_samples,
                checkpoints_blob=commit.checkpoints_blob,
                ledger=commit.ledger,
            )
            tx.supersede_versions_before(commit.version.model, commit.version.version)
            tx.forget_samples(
                commit.version.model,
                commit.removed_owner_by_sample,
                commit.version.created_by,
                commit.version.version,
            )
            if commit.index_artefact is not None:
                tx.put_artefact(commit.index_artefact)
            tx.set_request_state(commit.version.created_by, "SUCCEEDED", commit.receipt)
            tx.audit(commit.actor, "forget", f"models/{commit.version.model}", commit.audit)
            if commit.then_journal is not None:
                tx.journal(commit.then_journal)

    def commit_retrain(self, commit: RetrainCommit) -> None:
        """Apply an exact retrain in one transaction (``VersionMoved`` as for a forget)."""
        model = commit.version.model
        with self.transaction() as tx:
            tx.add_version(commit.version, expected_current=commit.version.parent)
            tx.set_model_data(
                model,
                current_version=commit.version.version,
                checkpoints_blob=commit.checkpoints_blob,
                ledger=commit.ledger,
            )
            tx.set_request_state(commit.version.created_by, "SUCCEEDED", commit.receipt)
            tx.audit(commit.actor, "retrain", f"models/{model}", commit.audit)

    def commit_nothing_to_forget(
        self, model: str, request_id: str, result: dict[str, Any], actor: str, audit: dict[str, Any]
    ) -> None:
        """A forget whose every id had been forgotten before: it succeeds, changing nothing."""
        with self.transaction() as tx:
            tx.set_request_state(request_id, "SUCCEEDED", result)
            tx.audit(actor, "forget", f"models/{model}", audit)

    def journal(self, entry: JournalEntry) -> None:
        """Journal a request durably (``RequestIdTaken`` if its id is in the journal)."""
        with self.transaction() as tx:
            tx.journal(entry)

    def rollback(
        self, model: str, version: int, actor: str, check: Callable[[str, int], None]
    ) -> None:
        """Make ``version`` current; ``check(model, version)`` runs inside the transaction,
        so a forget committing between a check made outside and this write cannot slip in."""
        with self.transaction() as tx:
            check(model, version)
            tx.set_model_data(model, current_version=version)
            tx.audit(actor, "rollback", f"models/{model}", {"version": version})

    # Requests (the journal) -----------------------------------------------------------

    def request(self, request_id: str) -> RequestRow | None:
        rows = self.query("SELECT * FROM requests WHERE request_id = ?", (request_id,))
        return request_row(rows[0]) if rows else None

    def requests_in_state(self, *states: str) -> list[RequestRow]:
        marks = ",".join("?" * len(states))
        rows = self.query(f"SELECT * FROM requests WHERE state IN ({marks}) ORDER BY seq", states)
        return [request_row(r) for r in rows]

    def request_count(self, *states: str) -> int:
        """How many requests are in one of ``states`` (the metrics' queue depth)."""
        marks = ",".join("?" * len(states))
        query = f"SELECT COUNT(*) FROM requests WHERE state IN ({marks})"
        return int(self.query(query, states)[0][0])

    def requests_page(
        self, model: str | None, states: Sequence[str], before_seq: int, limit: int
    ) -> list[RequestRow]:
        """Requests newest first, with ``seq < before_seq`` (0: from the newest)."""
        clauses: list[str] = []
        params: list[Any] = []
        if model:
            clauses.append("model = ?")
            params.append(model)
        if states:
            clauses.append(f"state IN ({','.join('?' * len(states))})")
            params.extend(states)
        if before_seq:
            clauses.append("seq < ?")
            params.append(before_seq)
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        rows = self.query(
            f"SELECT * FROM requests {where}ORDER BY seq DESC LIMIT ?", (*params, limit)
        )
        return [request_row(r) for r in rows]

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
