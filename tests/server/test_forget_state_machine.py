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

import shutil
import signal
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

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
from expunge.server.consistency import check_state
from expunge.server.faults import POINTS
from expunge.server.store import Store

MODEL = "digits"
POOL_SIZE = 8  # owners the machine may forget; each request names one or two
START_TIMEOUT_S = 120.0
APPLY_TIMEOUT_S = 180.0
LIVE = ("PENDING", "RUNNING", "SUCCEEDED")  # on the wire; APPLYING is RUNNING

# Each example starts several servers (a few seconds each, torch import) and runs real
# unlearning updates, so the budget is small and fixed. Shrinking is off: every step costs
# seconds and would run past the timeout; the failing steps are printed as they ran.
MACHINE_SETTINGS = settings(
    max_examples=4,
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
    """One state directory, at most one server process, a model of what was acknowledged."""

    def __init__(self, pristine: Path, workspace: Path) -> None:
        super().__init__()
        self.pristine = pristine
        self.root = Path(tempfile.mkdtemp(dir=workspace))
        self.state = self.root / "state"
        shutil.copytree(pristine, self.state)
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
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(timeout=30)
        self.process = None

    def _client(self) -> Client:
        return Client(self.target, retries=0, timeout=60.0)

    def _submit(self, client: Client, submission: Submission, owners: list[str]) -> None:
        """Forget ``owners`` under the submission's id; UNAVAILABLE leaves it unacknowledged."""
        try:
            op = client.forget(MODEL, owner_ids=owners, request_id=submission.request_id)
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

    def _restart(self) -> None:
        assert self._start(), "the server did not come back after a crash"
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

    @precondition(lambda self: self.up)
    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        owners = data.draw(
            st.lists(st.sampled_from(self.pool), min_size=1, max_size=2, unique=True),
            label="owners",
        )
        with self._client() as client:
            self._submit(client, self._new_submission(owners), owners)
        assert self.submissions[-1].acknowledged, "a healthy server refused a forget"

    @precondition(lambda self: self.up and any(s.acknowledged for s in self.submissions))
    @rule(data=st.data())
    def retry_same_payload(self, data: st.DataObject) -> None:
        used = data.draw(st.sampled_from([s for s in self.submissions if s.acknowledged]))
        # Order and repeats do not change the payload: the server canonicalises it.
        owners = data.draw(st.permutations(list(used.owners) * 2), label="owners")
        with self._client() as client:
            op = client.forget(MODEL, owner_ids=owners, request_id=used.request_id)
        assert op.name == f"operations/{used.request_id}"
        assert op.state in LIVE, op
        if used.request_id in self.succeeded:
            assert op.state == "SUCCEEDED", op

    @precondition(lambda self: self.up and any(s.acknowledged for s in self.submissions))
    @rule(data=st.data())
    def retry_different_payload(self, data: st.DataObject) -> None:
        used = data.draw(st.sampled_from([s for s in self.submissions if s.acknowledged]))
        other = data.draw(st.sampled_from(self.pool), label="toggled owner")
        owners = sorted(set(used.owners) ^ {other}) or sorted({*used.owners, *self.pool} - {other})
        assert set(owners) != set(used.owners)
        with self._client() as client, pytest.raises(AlreadyExistsError):
            client.forget(MODEL, owner_ids=owners, request_id=used.request_id)
        with read_only(self.db) as db:
            count = db.execute(
                "SELECT COUNT(*) FROM requests WHERE request_id = ?", (used.request_id,)
            ).fetchone()[0]
        assert count == 1

    @precondition(lambda self: self.up)
    @rule()
    def sigkill(self) -> None:
        """Kill the server wherever it is: idle, mid-update or mid-commit."""
        self._kill()

    @precondition(lambda self: self.up and self._fresh_owners())
    @rule(point=st.sampled_from(POINTS), data=st.data())
    def sigkill_at_crash_point(self, point: str, data: st.DataObject) -> None:
        """Restart with EXPUNGE_FAULT=point and forget fresh owners, so the point is reached."""
        owners = data.draw(
            st.lists(st.sampled_from(self._fresh_owners()), min_size=1, max_size=2, unique=True),
            label="owners",
        )
        self._kill()
        submission = self._new_submission(owners)
        # Redoing the journal (or building the index, for blob_mid_write) may already die.
        if self._start(point):
            with self._client() as client:
                self._submit(client, submission, owners)
        assert self.process is not None
        code = self.process.wait(timeout=APPLY_TIMEOUT_S)
        assert code == -signal.SIGKILL, f"the server exited with {code}, not at {point}"
        self.process = None

    @precondition(lambda self: not self.up)
    @rule()
    def restart(self) -> None:
        self._restart()

    @precondition(lambda self: self.up)
    @rule()
    def query(self) -> None:
        with self._client() as client:
            for submission in self.submissions:
                op = client.get_operation(submission.request_id)
                assert op.state in LIVE, op
                if submission.request_id in self.succeeded:
                    assert op.state == "SUCCEEDED", op
                if op.state == "SUCCEEDED":
                    self.succeeded.add(submission.request_id)
                    self.gone |= set(submission.owners)
            version = client.get_model(MODEL).current_version
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
        assert not present & self.gone, f"forgotten owners came back: {present & self.gone}"
        # Only forgets remove samples, and only the owners they name.
        assert set(self._fresh_owners()) <= present
        assert not failed, f"requests failed: {failed}"
        assert self.last_version <= version <= 1 + len(self.submissions)
        self.last_version = version

    # The end of an example --------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.submissions:
                self._check_final_state()
        finally:
            self._kill()
            shutil.rmtree(self.root, ignore_errors=True)

    def _check_final_state(self) -> None:
        if not self.up:
            self._restart()
        history = expected_history(self.submissions)
        with self._client() as client:
            for submission, (removed, version) in zip(self.submissions, history, strict=True):
                done = client.wait(submission.request_id, timeout=APPLY_TIMEOUT_S)
                assert done.state == "SUCCEEDED", done
                assert done.receipt is not None
                # Exactly once: the receipt names what this request removed, in journal order.
                assert done.receipt.removed_owner_ids == removed, (submission, done.receipt)
                assert done.receipt.new_version == version, (submission, done.receipt)
            final_version = history[-1][1]
            assert client.get_model(MODEL).current_version == final_version
            versions = client.list_versions(MODEL)
            assert [v.version for v in versions] == list(range(1, final_version + 1))
            served_sha = versions[-1].weights_sha256
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0
        self.process = None
        store = Store(self.state)
        try:
            assert check_state(store) == []
            assert not store.requests_in_state("PENDING", "APPLYING")
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
        assert served_sha == self._replay_sha()

    def _replay_sha(self) -> str:
        """The weights an uninterrupted server serves after the same acknowledged requests."""
        replay = self.root / "replay"
        shutil.copytree(self.pristine, replay)
        port = free_port()
        target = f"127.0.0.1:{port}"
        process = serve(replay, port)
        try:
            assert wait_serving(target, process, timeout=START_TIMEOUT_S)
            with Client(target, retries=0, timeout=60.0) as client:
                for submission in self.submissions:
                    client.forget(
                        MODEL,
                        owner_ids=list(submission.owners),
                        request_id=submission.request_id,
                        wait=True,
                        wait_timeout=APPLY_TIMEOUT_S,
                    )
                return client.list_versions(MODEL)[-1].weights_sha256
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


@pytest.mark.timeout(600)
def test_forget_journal_survives_crashes_and_retries(trained_state: Path, tmp_path: Path) -> None:
    run_state_machine_as_test(
        lambda: ForgetJournalMachine(trained_state, tmp_path), settings=MACHINE_SETTINGS
    )
