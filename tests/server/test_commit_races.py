"""Races around a forget's commit: redone computations, rollback and the served version."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from expunge.client import Client, FailedPreconditionError
from expunge.server import engine as engine_module
from expunge.server.forget.journal import MAX_REDOS, JobRunner, ProgressReporter, Redo
from expunge.server.state.store import RequestRow, Store


def _runner_with(tmp_path: Path, outcomes: list[str]) -> tuple[JobRunner, Store, list[int]]:
    """A JobRunner whose apply redoes or commits per ``outcomes`` (then always redoes)."""
    store = Store(tmp_path)
    calls: list[int] = []

    def apply(request: RequestRow, reporter: ProgressReporter) -> None:
        calls.append(1)
        outcome = outcomes[len(calls) - 1] if len(calls) <= len(outcomes) else "redo"
        if outcome == "redo":
            raise Redo("the model moved under the computation")
        with store.transaction() as tx:
            tx.set_request_state(request.request_id, "SUCCEEDED", {"ok": True})

    with store.transaction() as tx:
        tx.insert_request("r1", "m", "forget", "0" * 64, {"model": "m"})
    runner = JobRunner(store, apply)
    return runner, store, calls


def _run_until_idle(runner: JobRunner) -> None:
    runner.start()
    try:
        assert runner.wait_idle(30)
    finally:
        runner.stop(10)


def test_a_computation_whose_inputs_moved_is_redone_not_failed(tmp_path: Path) -> None:
    runner, store, calls = _runner_with(tmp_path, ["redo", "redo", "commit"])
    _run_until_idle(runner)
    row = store.request("r1")
    assert row is not None and row.state == "SUCCEEDED"
    assert len(calls) == 3


def test_redoing_forever_ends_aborted_with_nothing_applied(tmp_path: Path) -> None:
    runner, store, calls = _runner_with(tmp_path, [])
    _run_until_idle(runner)
    row = store.request("r1")
    assert row is not None and row.state == "FAILED"
    assert row.error_code == "ABORTED" and "nothing was applied" in (row.error_message or "")
    assert len(calls) == MAX_REDOS + 1


def test_a_commit_while_the_current_version_loads_is_not_cached_over(
    server: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = server.engine  # type: ignore[attr-defined]
    # A version change starts a background re-embed, whose snapshot() would cache the
    # current version concurrently with what this test watches.
    server.forget.index.stop()  # type: ignore[attr-defined]
    engine.forget_snapshot_cache("digits")
    original_load = engine_module.weights_io.load_into

    def load_then_commit(module: object, data: bytes) -> None:
        original_load(module, data)
        # What a forget committing now does once its transaction is done.
        engine.forget_snapshot_cache("digits")

    monkeypatch.setattr(engine_module.weights_io, "load_into", load_then_commit)
    loaded = engine.snapshot("digits")
    assert loaded.version == 1
    monkeypatch.setattr(engine_module.weights_io, "load_into", original_load)
    # The version read before the commit was served to that one call but not cached as
    # current: the next call reads the database again.
    assert "digits" not in engine._current
    again = engine.snapshot("digits")
    assert engine._current["digits"] is again


def test_forgetting_every_remaining_sample_is_refused_up_front(
    client: Client, state_dir: Path
) -> None:
    db = sqlite3.connect(state_dir / "expunge.db")
    owners = [r[0] for r in db.execute("SELECT DISTINCT owner_id FROM samples")]
    one_id = db.execute("SELECT sample_id FROM samples LIMIT 1").fetchone()[0]
    db.close()
    before = client.get_model("digits")
    with pytest.raises(FailedPreconditionError, match=r"remove all \d+ remaining training samples"):
        client.forget("digits", owner_ids=owners, request_id="everything")
    # Every owner but one, each named twice (by owner and by every sample id), still
    # leaves data: accepted (a sample named twice counts once).
    db = sqlite3.connect(state_dir / "expunge.db")
    theirs = [
        r[0] for r in db.execute("SELECT sample_id FROM samples WHERE owner_id != ?", (owners[0],))
    ]
    db.close()
    op = client.forget(
        "digits", owner_ids=owners[1:], sample_ids=theirs, request_id="most", wait=True
    )
    assert op.state == "SUCCEEDED"
    remaining = client.get_model("digits").num_training_samples
    assert 0 < remaining < before.num_training_samples
    # Now the last owner alone is everything left.
    with pytest.raises(FailedPreconditionError, match=f"all {remaining} remaining"):
        client.forget("digits", owner_ids=owners[:1], sample_ids=[one_id], request_id="last")


def test_scan_solvers_holding_the_old_data_are_dropped_at_the_commit(
    client: Client, server: object
) -> None:
    from expunge.server.scan.service import ScanService

    engine = server.engine  # type: ignore[attr-defined]
    scans = ScanService(engine, server.forget, server.forget.index)  # type: ignore[attr-defined]
    scans.confirm._solver("digits")
    assert "digits" in scans.confirm._solvers
    victim = int(engine.training_data("digits").sample_ids[0])
    client.forget("digits", sample_ids=[victim], request_id="solver", wait=True)
    assert "digits" not in scans.confirm._solvers


def test_a_cancel_asked_while_running_survives_a_restart(tmp_path: Path) -> None:
    import threading

    store = Store(tmp_path)
    reached, release = threading.Event(), threading.Event()

    def apply(request: RequestRow, reporter: ProgressReporter) -> None:
        reporter.phase("solving")
        reached.set()
        release.wait(30)  # the process "dies" here: nothing after this is committed
        reporter.phase("committing")

    with store.transaction() as tx:
        tx.insert_request("r1", "m", "forget", "0" * 64, {"model": "m"})
    runner = JobRunner(store, apply)
    runner.start()
    try:
        assert reached.wait(30)
        runner.cancel("r1")
        row = store.request("r1")
        assert row is not None and row.state == "APPLYING"  # too late to cancel at once
        # A restart before the worker reached its next phase: the journal alone decides.
        assert JobRunner(store, apply).recover() == 0
        row = store.request("r1")
        assert row is not None and row.state == "CANCELLED"
        assert "server stopped" in (row.error_message or "")
    finally:
        release.set()
        runner.stop(10)


def test_a_request_id_journalled_concurrently_is_answered_as_a_retry(
    server: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from expunge.server.errors import AlreadyExists
    from expunge.server.forget.computation import UnlearningOptions
    from expunge.server.forget.service import ForgetService

    forget = server.forget  # type: ignore[attr-defined]
    ids = server.engine.training_data("digits").sample_ids  # type: ignore[attr-defined]
    victim, other = int(ids[0]), int(ids[1])
    first = forget.submit("digits", [victim], [], "twice", UnlearningOptions(), "t")
    # The second call checks for the id before the first journals it (as two calls at
    # once do), so its insert meets the first's row.
    real = ForgetService._existing
    calls: list[int] = []

    def late(self: ForgetService, request_id: str, sha: str) -> object:
        calls.append(1)
        return None if len(calls) == 1 else real(self, request_id, sha)

    monkeypatch.setattr(ForgetService, "_existing", late)
    again = forget.submit("digits", [victim], [], "twice", UnlearningOptions(), "t")
    assert again.request_id == first.request_id and len(calls) == 2
    calls.clear()
    with pytest.raises(AlreadyExists, match="different request"):
        forget.submit("digits", [other], [], "twice", UnlearningOptions(), "t")
