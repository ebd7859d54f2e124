"""The statements one write transaction may run: every write of the database is here."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from expunge.server.state.identifiers import IdentifierKey
from expunge.server.state.store.commits import JournalEntry
from expunge.server.state.store.rows import ArtefactRow, ModelRow, VersionRow, utc_now
from expunge.server.state.store.schema import FINAL_REQUEST_STATES


class VersionMoved(RuntimeError):
    """The model's current version moved since the work was computed: nothing was written."""


class RequestIdTaken(RuntimeError):
    """The request id is in the journal already (a concurrent submission)."""


class Transaction:
    """The statements one transaction may run; keeps SQL out of the engine."""

    def __init__(self, db: sqlite3.Connection, identifiers: IdentifierKey) -> None:
        self._db = db
        self._identifiers = identifiers

    def migrate(self, script: str, to_version: int) -> None:
        # executescript would COMMIT first; run statement by statement inside the tx.
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)
        self._db.execute(f"PRAGMA user_version={int(to_version)}")

    def add_version(self, row: VersionRow, expected_current: int) -> None:
        """Insert ``row`` if the model is still on ``expected_current`` and ``row.version``
        is the highest number ever assigned plus one; else ``VersionMoved``.

        Never ``current + 1``: after a rollback the current version is not the highest.
        """
        current, highest = self._db.execute(
            "SELECT m.current_version, (SELECT MAX(version) FROM versions WHERE model = m.name) "
            "FROM models m WHERE m.name = ?",
            (row.model,),
        ).fetchone()
        if int(current) != expected_current or int(highest or 0) + 1 != row.version:
            raise VersionMoved(
                f"models/{row.model} moved from version {expected_current} to {current} "
                "while the work ran"
            )
        self.insert_version(row)

    def set_model_data(
        self,
        model: str,
        *,
        current_version: int,
        train_blob: str | None = None,
        num_samples: int | None = None,
        checkpoints_blob: str | None = None,
        ledger: dict[str, Any] | None = None,
    ) -> None:
        """Point the model at a version, and at new data, checkpoints or ledger if given."""
        self._db.execute(
            "UPDATE models SET current_version = ?, train_blob = COALESCE(?, train_blob), "
            "num_samples = COALESCE(?, num_samples), "
            "checkpoints_blob = COALESCE(?, checkpoints_blob), "
            "ledger_json = COALESCE(?, ledger_json) WHERE name = ?",
            (
                current_version,
                train_blob,
                num_samples,
                checkpoints_blob,
                json.dumps(ledger) if ledger is not None else None,
                model,
            ),
        )

    def supersede_versions_before(self, model: str, version: int) -> None:
        """Versions before ``version`` were trained on samples forgotten since."""
        self._db.execute(
            "UPDATE versions SET superseded_by_forget = 1 WHERE model = ? AND version < ?",
            (model, version),
        )

    def forget_samples(
        self, model: str, owner_by_sample: dict[int, str], request_id: str, version: int
    ) -> None:
        """Delete the rows (overwritten: secure_delete) and remember each sample as
        forgotten, its owner by keyed digest only."""
        removed = sorted(owner_by_sample)
        key_digest: dict[int, str] = {}
        # Only a model imported with string sample keys has any to look up (by index).
        keyed_model = self._db.execute(
            "SELECT 1 FROM samples WHERE model = ? AND sample_key IS NOT NULL LIMIT 1", (model,)
        ).fetchone()
        for start in range(0, len(removed), 500):
            chunk = removed[start : start + 500]
            marks = ",".join("?" * len(chunk))
            if keyed_model is not None:
                keyed = self._db.execute(
                    f"SELECT sample_id, sample_key FROM samples WHERE model = ? "
                    f"AND sample_key IS NOT NULL AND sample_id IN ({marks})",
                    (model, *chunk),
                ).fetchall()
                key_digest.update(
                    {int(sid): self._identifiers.digest("sample_key", key) for sid, key in keyed}
                )
            self._db.execute(
                f"DELETE FROM samples WHERE model = ? AND sample_id IN ({marks})",
                (model, *chunk),
            )
        # One digest per owner, not per sample: an owner's forget names thousands of rows.
        owner_digest = {
            owner: self._identifiers.digest("owner", owner)
            for owner in set(owner_by_sample.values())
        }
        self._db.executemany(
            "INSERT INTO forgotten (model, sample_id, owner_sha256, request_id, version, "
            "key_sha256) VALUES (?,?,?,?,?,?)",
            [
                (
                    model,
                    sid,
                    owner_digest[owner_by_sample[sid]],
                    request_id,
                    version,
                    key_digest.get(sid),
                )
                for sid in removed
            ],
        )

    def put_artefact(self, artefact: ArtefactRow) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO artefacts (model, kind, blob, version, meta_json) "
            "VALUES (?,?,?,?,?)",
            (
                artefact.model,
                artefact.kind,
                artefact.blob,
                artefact.version,
                json.dumps(artefact.meta, sort_keys=True),
            ),
        )

    def journal(self, entry: JournalEntry) -> None:
        """The request, PENDING, and its audit event (``RequestIdTaken`` for a known id)."""
        try:
            self.insert_request(
                entry.request_id, entry.model, entry.kind, entry.payload_digest, entry.payload
            )
        except sqlite3.IntegrityError as exc:
            raise RequestIdTaken(entry.request_id) from exc
        self.audit(entry.actor, f"{entry.kind}_requested", f"models/{entry.model}", entry.audit)

    def start_request(self, request_id: str) -> bool:
        """PENDING -> APPLYING; False if it is no longer PENDING (cancelled meanwhile)."""
        return bool(
            self._db.execute(
                "UPDATE requests SET state = 'APPLYING' WHERE request_id = ? AND state = 'PENDING'",
                (request_id,),
            ).rowcount
        )

    def prune_superseded_weights(self) -> int:
        return int(
            self._db.execute(
                "UPDATE versions SET weights_pruned = 1 "
                "WHERE superseded_by_forget = 1 AND weights_pruned = 0"
            ).rowcount
        )

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

    def insert_samples(self, model: str, rows: list[tuple[int, str, int, str | None]]) -> None:
        """(sample id, owner id, label, sample key or None) per training sample."""
        self._db.executemany(
            "INSERT INTO samples (model, sample_id, owner_id, label, sample_key) "
            "VALUES (?,?,?,?,?)",
            [(model, sid, owner, label, key) for sid, owner, label, key in rows],
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
