"""The forget journal as a state machine over real server processes.

Hypothesis interleaves submissions, retries of used request ids, SIGKILLs (at a random
moment or at a named crash point), restarts and queries; after every step and at the
end it checks that nothing acknowledged is lost, applied twice or half applied, that
forgotten owners never come back, and that the served weights equal a replay of the
acknowledged requests, in order, on a pristine copy of the state.

All torch work stays in the server subprocesses: this process only speaks gRPC and
reads SQLite (torch.func under Hypothesis' recursion limit is flaky on CPython 3.11).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from benchmarks.processes import free_port, serve, wait_serving
from expunge.client import AlreadyExistsError, Client, UnavailableError
from expunge.server.faults import POINTS
from expunge.server.state.consistency import check_state
from expunge.server.state.store import Store
from tests.server.receipts import owner_digests

MODEL = "digits"
POOL_SIZE = 8  # owners the machine may forget; each request names one or two
START_TIMEOUT_S = 120.0
APPLY_TIMEOUT_S = 180.0
LIVE = ("PENDING", "RUNNING", "SUCCEEDED")  # on the wire; APPLYING is RUNNING
# Cheap but real updates (about half the default's time); part of every payload, replay included.
OPTIONS: dict[str, Any] = {
    "parameter_budget": 64,
    "newton_iterations": 1,
    "hessian": "gauss_newton",
}

# Each example starts several servers (a few seconds each, torch import) and runs real
# unlearning updates, so the budget is small and fixed. Shrinking is off: every step costs
# seconds and would run past the timeout; the failing steps are printed as they ran.
MACHINE_SETTINGS = settings(
    max_examples=5,
    stateful_step_count=7,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Submission:
    request_id: str
    owners: tuple[str, ...]
    acknowledged: bool


@contextmanager
def read_only(db: Path) -> Iterator[sqlite3.Connection]:
    """A read-only view of the journal that never checkpoints or changes the files."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as connection:
        yield connection


def pool_owners(state: Path) -> tuple[str, ...]:
    with read_only(state / "expunge.db") as db:
        rows = db.execute(
            "SELECT DISTINCT owner_id FROM samples WHERE model = ? ORDER BY owner_id LIMIT ?",
            (MODEL, POOL_SIZE),
        ).fetchall()
    return tuple(str(r[0]) for r in rows)


def child_pids(pid: int) -> list[int]:
    """The server's children (its compute process and multiprocessing's resource tracker)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def reap(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGKILL children that outlive a killed server, so that no example leaks processes.

    They should die with it; a server SIGKILLed while its compute child is still starting
    leaves that child running, so this cleans up rather than asserts.
    """
    deadline = time.monotonic() + grace_s
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not zombie(p)]
    for p in alive:
        with suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def trained_weights_sha(state: Path) -> str:
    with read_only(state / "expunge.db") as db:
        row = db.execute(
            "SELECT weights_blob FROM versions WHERE model = ? AND version = 1", (MODEL,)
        ).fetchone()
    return str(row[0])


def expected_history(submissions: list[Submission]) -> list[tuple[list[str], int]]:
    """Per request, in journal order: the owners it removes and the version it leaves.

    The model starts at version 1; a request bumps it only if it removes something, and
    one whose owners were all forgotten before is a no-op that leaves the version alone.
    """
    forgotten: set[str] = set()
    version = 1
    history = []
    for submission in submissions:
        removed = sorted(set(submission.owners) - forgotten)
        if removed:
            version += 1
            forgotten |= set(removed)
        history.append((removed, version))
    return history


class ForgetJournalMachine(RuleBasedStateMachine):
    """One state directory, at most one server process, a model of what was acknowledged.

    ``pristine`` (the trained state) and ``workspace`` are set on a subclass per test:
    Hypothesis builds one machine per example and function-scoped fixtures do not fit.
    """

    pristine: Path
    workspace: Path

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(dir=self.workspace))
        self.state = self.root / "state"
        shutil.copytree(self.pristine, self.state)
        self.db = self.state / "expunge.db"
        self.pool = pool_owners(self.state)
        self.process: subprocess.Popen[bytes] | None = None
        self.target = ""
        self.submissions: list[Submission] = []  # journal order
        self.gone: set[str] = set()  # owners a SUCCEEDED request named
        self.succeeded: set[str] = set()
        self.last_version = 1

    # Process handling ----------------------------------------------------------------------

    def _start(self, fault: str | None = None) -> bool:
        port = free_port()
        self.target = f"127.0.0.1:{port}"
        self.process = serve(self.state, port, fault)
        return wait_serving(self.target, self.process, timeout=START_TIMEOUT_S)

    def _kill(self) -> None:
        if self.process is not None:
            children = child_pids(self.process.pid)
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(timeout=30)
            reap(children)
        self.process = None

    def _client(self) -> Client:
        return Client(self.target, retries=0, timeout=60.0)

    def _submit(self, client: Client, submission: Submission, owners: list[str]) -> None:
        """Forget ``owners`` under the submission's id; UNAVAILABLE leaves it unacknowledged."""
        try:
            op = client.forget(MODEL, owner_ids=owners, request_id=submission.request_id, **OPTIONS)
        except UnavailableError:
            return
        assert op.name == f"operations/{submission.request_id}"
        assert op.state in LIVE, op
        submission.acknowledged = True

    def _fresh_owners(self) -> list[str]:
        named = {o for s in self.submissions for o in s.owners}
        return [o for o in self.pool if o not in named]

    def _new_submission(self, owners: list[str]) -> Submission:
        submission = Submission(f"req-{len(self.submissions)}", tuple(owners), False)
        self.submissions.append(submission)
        return submission

    def _stop(self) -> None:
        """SIGTERM: drain and exit cleanly; an update still running is redone at the next start."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0
        self.process = None

    def _restart(self) -> None:
        assert self._start(), "the server did not come back"
        # Start redoes the journal before it reports SERVING.
        with read_only(self.db) as db:
            left = db.execute(
                "SELECT request_id, state FROM requests WHERE state IN ('PENDING', 'APPLYING')"
            ).fetchall()
        assert not left, f"requests left unfinished after a restart: {left}"
        # A client whose Forget died with the server retries it with the same id; it was the
        # last one sent before the crash, so journal order stays submission order.
        with self._client() as client:
            for submission in self.submissions:
                if not submission.acknowledged:
                    self._submit(client, submission, list(submission.owners))
                    assert submission.acknowledged, "a retry on a healthy server failed"

    @property
    def up(self) -> bool:
        return self.process is not None

    # Rules -----------------------------------------------------------------------------

    @initialize()
    def start_server(self) -> None:
        assert self._start(), "the server did not start"

    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        """Forget one or two owners; with the server down the call fails and is retried later."""
        owners = data.draw(
            st.lists(st.sampled_from(self.pool), min_size=1, max_size=2, unique=True),
            label="owners",
        )
        with self._client() as client:
            self._submit(client, self._new_submission(owners), owners)
        assert self.submissions[-1].acknowledged == self.up

    # Every rule is enabled whether or not a server runs: Hypothesis' swarm testing switches
    # rules off per example, and a state in which no enabled rule applies wastes the example.

    @precondition(lambda self: any(s.acknowledged for s in self.submissions))
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """Reuse an acknowledged id: the same payload is the same operation, another one is refused."""
        used = data.draw(st.sampled_from([s for s in self.submissions if s.acknowledged]))
        if not self.up:
            with self._client() as client, pytest.raises(UnavailableError):
                client.forget(MODEL, owner_ids=list(used.owners), request_id=used.request_id)
            return
        with self._client() as client:
            if data.draw(st.booleans(), label="same payload"):
                # Order and repeats do not change the payload: the server canonicalises it.
                owners = data.draw(st.permutations(list(used.owners) * 2), label="owners")
                op = client.forget(MODEL, owner_ids=owners, request_id=used.request_id, **OPTIONS)
                assert op.name == f"operations/{used.request_id}"
                assert op.state in LIVE, op
                if used.request_id in self.succeeded:
                    assert op.state == "SUCCEEDED", op
                return
            options = dict(OPTIONS)
            owners = list(used.owners)
            if data.draw(st.booleans(), label="change the options, not the owners"):
                options["parameter_budget"] += 1
            else:
                other = data.draw(st.sampled_from(self.pool), label="toggled owner")
                owners = sorted(set(owners) ^ {other}) or sorted(set(self.pool) - {other})
            with pytest.raises(AlreadyExistsError):
                client.forget(MODEL, owner_ids=owners, request_id=used.request_id, **options)
        with read_only(self.db) as db:
            stored = db.execute(
                "SELECT payload_json FROM requests WHERE request_id = ?", (used.request_id,)
            ).fetchone()[0]
        assert json.loads(stored)["owner_ids"] == sorted(used.owners)

    @rule(point=st.none() | st.sampled_from(POINTS), data=st.data())
    def crash(self, point: str | None, data: st.DataObject) -> None:
        """SIGKILL the server now (idle, mid-update, mid-commit), or at a named crash point.

        For a crash point, start with EXPUNGE_FAULT=point and forget owners nobody named
        yet, so that the point is reached; with none left, the plain kill is all. A server
        that is down is started first to be killed, or, when forgets sent while it was
        down must be retried first (journal order), to retry them.
        """
        if not self.up and (point is None or not all(s.acknowledged for s in self.submissions)):
            self._restart()
        self._kill()
        fresh = self._fresh_owners()
        if point is None or not fresh:
            return
        owners = data.draw(
            st.lists(st.sampled_from(fresh), min_size=1, max_size=2, unique=True), label="owners"
        )
        submission = self._new_submission(owners)
        # Redoing the journal (or building the index, for blob_mid_write) may already die.
        if self._start(point):
            with self._client() as client:
                self._submit(client, submission, owners)
        assert self.process is not None
        code = self.process.wait(timeout=APPLY_TIMEOUT_S)
        assert code == -signal.SIGKILL, f"the server exited with {code}, not at {point}"
        self.process = None

    @rule()
    def restart(self) -> None:
        """Start a crashed server; a running one is stopped gracefully (SIGTERM) first."""
        if self.up:
            self._stop()
        self._restart()

    @rule()
    def query(self) -> None:
        """Every acknowledged request is pending, running or done: over gRPC, or on disk if down."""
        acknowledged = [s for s in self.submissions if s.acknowledged]
        if self.up:
            with self._client() as client:
                states = {
                    s.request_id: client.get_operation(s.request_id).state for s in acknowledged
                }
                version = client.get_model(MODEL).current_version
        else:
            with read_only(self.db) as db:
                wire = {"PENDING": "PENDING", "APPLYING": "RUNNING", "SUCCEEDED": "SUCCEEDED"}
                rows = db.execute("SELECT request_id, state FROM requests").fetchall()
                states = {str(r[0]): wire.get(str(r[1]), str(r[1])) for r in rows}
                version = db.execute(
                    "SELECT current_version FROM models WHERE name = ?", (MODEL,)
                ).fetchone()[0]
        for submission in acknowledged:
            state = states.get(submission.request_id)
            assert state in LIVE, (submission, state)
            if submission.request_id in self.succeeded:
                assert state == "SUCCEEDED", (submission, state)
            if state == "SUCCEEDED":
                self.succeeded.add(submission.request_id)
                self.gone |= set(submission.owners)
        assert self.last_version <= version <= 1 + len(self.submissions)
        self.last_version = version

    # Invariants (read straight from the journal, whether or not a server runs) -----------

    @invariant()
    def forgotten_owners_stay_gone(self) -> None:
        with read_only(self.db) as db:
            present = {
                str(r[0])
                for r in db.execute(
                    "SELECT DISTINCT owner_id FROM samples WHERE model = ?", (MODEL,)
                ).fetchall()
            }
            version = db.execute(
                "SELECT current_version FROM models WHERE name = ?", (MODEL,)
            ).fetchone()[0]
            failed = db.execute(
                "SELECT request_id, state, error_code, error_message FROM requests "
                "WHERE state NOT IN ('PENDING', 'APPLYING', 'SUCCEEDED')"
            ).fetchall()
            journalled = {str(r[0]) for r in db.execute("SELECT request_id FROM requests")}
        # Acknowledged means journalled durably, whatever happened since.
        lost = [s for s in self.submissions if s.acknowledged and s.request_id not in journalled]
        assert not lost, f"acknowledged requests are not in the journal: {lost}"
        assert not present & self.gone, f"forgotten owners came back: {present & self.gone}"
        # Only forgets remove samples, and only the owners they name.
        assert set(self._fresh_owners()) <= present
        assert not failed, f"requests failed: {failed}"
        assert self.last_version <= version <= 1 + len(self.submissions)
        self.last_version = version

    # The end of an example --------------------------------------------------------------

    def teardown(self) -> None:
        try:
            # Hypothesis calls teardown from a ``finally``: after a failed step only clean up,
            # so that the step's error, not a consequence of it, is the one reported.
            if sys.exc_info()[0] is None:
                self._check_final_state()
        finally:
            self._kill()
            shutil.rmtree(self.root, ignore_errors=True)

    def _check_final_state(self) -> None:
        # The replay runs beside the recovered server (two processes, two cores): it answers
        # what an uninterrupted server serves after the same requests, in the same order.
        replay = Replay(self.pristine, self.root / "replay") if self.submissions else None
        try:
            if not self.up:
                self._restart()
            if replay is not None:
                replay.submit(self.submissions)
            served_sha = self._check_recovered()
            if replay is not None:
                assert served_sha == replay.weights_sha()
        finally:
            if replay is not None:
                replay.kill()

    def _check_recovered(self) -> str:
        """Every request SUCCEEDED exactly once and nothing is half applied; the served sha."""
        history = expected_history(self.submissions)
        with self._client() as client:
            for submission, (removed, version) in zip(self.submissions, history, strict=True):
                done = client.wait(submission.request_id, timeout=APPLY_TIMEOUT_S)
                assert done.state == "SUCCEEDED", done
                assert done.receipt is not None
                # Exactly once: the receipt names what this request removed, in journal order.
                assert done.receipt.removed_owner_digests == owner_digests(self.state, removed), (
                    submission,
                    done.receipt,
                )
                assert done.receipt.new_version == version, (submission, done.receipt)
            final_version = history[-1][1] if history else 1
            assert client.get_model(MODEL).current_version == final_version
            versions = client.list_versions(MODEL)
            assert [v.version for v in versions] == list(range(1, final_version + 1))
            assert versions[0].weights_sha256 == trained_weights_sha(self.pristine)
        self._stop()
        store = Store(self.state)
        try:
            assert check_state(store) == []
            assert not store.requests_in_state("PENDING", "APPLYING")
            journal = [
                str(r[0]) for r in store.query("SELECT request_id FROM requests ORDER BY seq")
            ]
            assert journal == [s.request_id for s in self.submissions]
            present = {
                str(r[0])
                for r in store.query(
                    "SELECT DISTINCT owner_id FROM samples WHERE model = ?", (MODEL,)
                )
            }
        finally:
            store.close()
        forgotten = {o for s in self.submissions for o in s.owners}
        assert not present & forgotten
        assert set(self.pool) - forgotten <= present
        return versions[-1].weights_sha256


class Replay:
    """An uninterrupted server on a pristine copy of the state, fed the same requests."""

    def __init__(self, pristine: Path, state: Path) -> None:
        shutil.copytree(pristine, state)
        port = free_port()
        self.target = f"127.0.0.1:{port}"
        self.process = serve(state, port)

    def submit(self, submissions: list[Submission]) -> None:
        assert wait_serving(self.target, self.process, timeout=START_TIMEOUT_S)
        self.request_ids = [s.request_id for s in submissions]
        with Client(self.target, retries=0, timeout=60.0) as client:
            for submission in submissions:
                client.forget(
                    MODEL,
                    owner_ids=list(submission.owners),
                    request_id=submission.request_id,
                    **OPTIONS,
                )

    def weights_sha(self) -> str:
        with Client(self.target, retries=0, timeout=60.0) as client:
            for request_id in self.request_ids:
                done = client.wait(request_id, timeout=APPLY_TIMEOUT_S)
                assert done.state == "SUCCEEDED", done
            return client.list_versions(MODEL)[-1].weights_sha256

    def kill(self) -> None:
        children = child_pids(self.process.pid)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        reap(children)


@pytest.mark.timeout(600)
def test_forget_journal_survives_crashes_and_retries(trained_state: Path, tmp_path: Path) -> None:
    class Machine(ForgetJournalMachine):
        pristine = trained_state
        workspace = tmp_path

    run_state_machine_as_test(Machine, settings=MACHINE_SETTINGS)
