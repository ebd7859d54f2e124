from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from expunge.server.errors import FailedPrecondition
from expunge.server.state.blobs import BlobStore, sha256_hex
from expunge.server.state.store import SCHEMA_VERSION, Store


def test_database_is_wal_with_full_sync_and_versioned_schema(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.query("PRAGMA journal_mode")[0][0] == "wal"
    assert store.query("PRAGMA synchronous")[0][0] == 2  # FULL
    assert store.schema_version == SCHEMA_VERSION
    tables = {r[0] for r in store.query("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"models", "versions", "samples", "requests", "audit", "forgotten"} <= tables
    store.close()
    # Reopening does not re-run migrations.
    again = Store(tmp_path)
    assert again.schema_version == SCHEMA_VERSION
    again.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "expunge.db")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(tmp_path)


def test_blobs_are_content_addressed_and_verified(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    digest = blobs.put(b"weights")
    assert digest == sha256_hex(b"weights") and blobs.get(digest) == b"weights"
    assert blobs.put(b"weights") == digest
    blobs.path(digest).write_bytes(b"tampered")
    with pytest.raises(FailedPrecondition, match="corrupt"):
        blobs.get(digest)


def test_a_half_written_blob_is_never_referenced_and_is_collected(tmp_path: Path) -> None:
    store = Store(tmp_path)
    kept = store.blobs.put(b"kept")
    # A crash mid-write leaves a temp file behind, never a file under a digest name.
    partial = store.blobs.path(sha256_hex(b"x")).parent / ".tmp-crashed"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"half")
    orphan = store.blobs.put(b"orphan")
    assert set(store.blobs.digests()) == {kept, orphan}
    removed = store.blobs.collect_garbage({kept})
    assert removed == 2 and store.blobs.digests() == [kept]
    assert not partial.exists()
    store.close()


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(ZeroDivisionError), store.transaction() as tx:
        tx.audit("admin", "something", "models/x", {})
        _ = 1 / 0
    assert store.audit_events(None, 0, 10) == []
    store.record_audit("admin", "something", "models/x", {"n": 1})
    assert [e.details for e in store.audit_events(None, 0, 10)] == [{"n": 1}]
    store.close()


def test_blob_writes_are_fsynced_before_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("rename"), real_replace(a, b))[1])
    BlobStore(tmp_path).put(b"data")
    assert calls == ["fsync", "rename", "fsync"]  # file, rename, directory


def test_migrating_schema_1_erases_the_unsalted_owner_digests(tmp_path: Path) -> None:
    import hashlib
    import sqlite3

    from expunge.server.state.store.schema import MIGRATIONS

    db = sqlite3.connect(tmp_path / "expunge.db")
    db.executescript(MIGRATIONS[0])
    unsalted = hashlib.sha256(b"u0023").hexdigest()
    db.execute("INSERT INTO forgotten VALUES ('digits', 7, ?, 'r1', 2)", (unsalted,))
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = Store(tmp_path)
    try:
        assert store.schema_version == SCHEMA_VERSION  # migrated through every step
        assert store.query("SELECT owner_sha256 FROM forgotten")[0][0] == ""
        assert store.forgotten_sample_ids("digits") == {7}
    finally:
        store.close()
    assert unsalted.encode() not in (tmp_path / "expunge.db").read_bytes()


def test_migrating_schema_2_adds_sample_keys_and_keeps_integer_ids(tmp_path: Path) -> None:
    import sqlite3

    from expunge.server.state.store.schema import MIGRATIONS

    db = sqlite3.connect(tmp_path / "expunge.db")
    db.executescript(MIGRATIONS[0])
    db.executescript(MIGRATIONS[1])
    db.execute("INSERT INTO samples VALUES ('digits', 3, 'u1', 0)")
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    store = Store(tmp_path)
    try:
        assert store.schema_version == SCHEMA_VERSION  # through 3 to the latest
        assert store.owners_of("digits", [3]) == {3: "u1"}
        assert store.keys_of("digits", [3]) == {}  # a model named by integers has no keys
        assert store.sample_ids_for_keys("digits", ["3"]) == {}
    finally:
        store.close()


def test_migrating_schema_3_keeps_only_keyed_rows_in_the_key_indexes(tmp_path: Path) -> None:
    import sqlite3

    from expunge.server.state.store.schema import MIGRATIONS

    db = sqlite3.connect(tmp_path / "expunge.db")
    for script in MIGRATIONS[:3]:
        db.executescript(script)
    db.execute("INSERT INTO samples VALUES ('keyed', 1, 'u1', 0, 'a-uuid')")
    db.execute("INSERT INTO samples VALUES ('plain', 1, 'u1', 0, NULL)")
    db.execute("PRAGMA user_version=3")
    db.commit()
    db.close()
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "expunge.db")
    try:
        sql = dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"))
        assert "WHERE sample_key IS NOT NULL" in sql["samples_by_key"]
        assert "WHERE key_sha256 IS NOT NULL" in sql["forgotten_by_key"]
        # Keys stay unique per model, NULLs are many, and lookups by key use the index.
        db.execute("INSERT INTO samples VALUES ('plain', 2, 'u1', 0, NULL)")
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("INSERT INTO samples VALUES ('keyed', 2, 'u2', 0, 'a-uuid')")
        for query in (
            "SELECT sample_id FROM samples WHERE model = 'keyed' AND sample_key IN ('a-uuid')",
            "SELECT sample_id FROM forgotten WHERE model = 'keyed' AND key_sha256 IN ('x')",
        ):
            plan = " ".join(str(row[-1]) for row in db.execute(f"EXPLAIN QUERY PLAN {query}"))
            assert "_by_key" in plan, plan
    finally:
        db.close()


def test_a_staged_blob_has_the_digest_of_its_bytes_and_survives_collection_until_named(
    tmp_path: Path,
) -> None:
    """``stage`` (a forget's shard, streamed, never one buffer) names the same bytes as
    ``put``; garbage collection spares it while staged; ``adopt`` names it."""
    import numpy as np

    from expunge.server.state import weights as weights_io

    arrays = {"features": np.arange(12, dtype=np.float32).reshape(3, 4), "labels": np.arange(3)}
    keep = np.ones(3, dtype=bool)
    blobs = BlobStore(tmp_path)
    staged = blobs.stage(lambda sink: weights_io.stream_kept_rows(arrays, keep, sink))
    assert staged.path.exists() and blobs.digests() == []
    blobs.collect_garbage([])  # a commit of another model, while this one is staged
    assert staged.path.exists()
    named = blobs.adopt(staged)
    assert named == staged.digest == blobs.put(weights_io.arrays_to_bytes(arrays))
    assert blobs.get(named) == weights_io.arrays_to_bytes(arrays)
    assert blobs.digests() == [named] and not staged.path.exists()
    # Staged again, the same bytes: adopting keeps the existing blob and drops the copy.
    again = blobs.stage(lambda sink: weights_io.stream_kept_rows(arrays, keep, sink))
    assert blobs.adopt(again) == named and not again.path.exists()
    # Discarded, nothing is left.
    dropped = blobs.stage(lambda sink: sink(memoryview(b"never named")))
    blobs.discard(dropped)
    assert not dropped.path.exists() and blobs.digests() == [named]
    # A writer that fails leaves nothing staged.
    with pytest.raises(RuntimeError):
        blobs.stage(_failing_writer)
    assert list((tmp_path / "tmp").iterdir()) == []
    # Written or hashed once, it is not hashed again when mapped: a later corruption on disk
    # is caught by the next process that maps it.
    assert BlobStore(tmp_path).verified_path(named) == blobs.path(named)
    blobs.path(named).write_bytes(b"corrupt")
    from expunge.server.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="corrupt"):
        BlobStore(tmp_path).verified_path(named)
    # A crash before the rename leaves only a temp file, which garbage collection removes.
    stray = tmp_path / "tmp" / ".tmp-crashed"
    stray.write_bytes(b"half a shard")
    blobs.collect_garbage([named])
    assert not stray.exists() and blobs.digests() == [named]


def _failing_writer(sink: object) -> None:
    raise RuntimeError("the data could not be read")
