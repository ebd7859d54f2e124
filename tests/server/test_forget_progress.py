"""A forget seen from the client while it runs and after: progress, cancellation, receipts.

Every test drives the real gRPC server on 127.0.0.1 through the real client. Where a
test needs the worker at a known point (a stream that must see every phase, a cancel
that must land mid-computation), it wraps the server's ``JobRunner._set_progress`` so
the worker waits there; the computation itself is untouched.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.rpc import code_pb2

from expunge.client import Client, NotFoundError
from expunge.client.types import DeletionMetrics, Operation
from expunge.defenses.certificate import noise_scale, parameter_distance_bound
from expunge.server.forget.journal import Progress
from tests.server.receipts import sample_digests

# What the worker reports for a forget with the default selection (lcodec_cg), phase by
# phase: unlearn() measures the model first, so "verifying" comes before "selecting" too.
PHASES = ["starting", "verifying", "selecting", "solving", "verifying", "committing", "done"]
# How long the worker waits for a watcher to see a report (a round trip takes milliseconds;
# after one miss it stops waiting, so a broken stream fails in seconds, not minutes), and
# how long it may be held for a cancel.
ACK_TIMEOUT_S = 10.0
HOLD_TIMEOUT_S = 60.0

Key = tuple[str, int, int, str]


def _owner_with_samples(state_dir: Path, minimum: int = 3, skip: int = 0) -> tuple[str, list[int]]:
    """The ``skip``-th owner (by id) holding at least ``minimum`` samples, and their ids."""
    db = sqlite3.connect(state_dir / "expunge.db")
    owner = db.execute(
        "SELECT owner_id FROM samples GROUP BY owner_id HAVING COUNT(*) >= ? "
        "ORDER BY owner_id LIMIT 1 OFFSET ?",
        (minimum, skip),
    ).fetchone()[0]
    ids = [r[0] for r in db.execute("SELECT sample_id FROM samples WHERE owner_id = ?", (owner,))]
    db.close()
    return owner, sorted(ids)


def _key(op: Operation) -> Key:
    return (op.phase, op.completed, op.total, op.message)


def _collapse(phases: list[str]) -> list[str]:
    """Phases with consecutive repeats merged and the leading 'queued' dropped."""
    out: list[str] = []
    for phase in phases:
        if (out and out[-1] == phase) or (not out and phase == "queued"):
            continue
        out.append(phase)
    return out


def _is_subsequence(seen: list[str], full: list[str]) -> bool:
    remaining = iter(full)
    return all(any(p == q for q in remaining) for p in seen)


class Lockstep:
    """Holds the worker at each progress report until every named watcher has seen it.

    A WatchOperation stream sends the latest state when it changes, so a phase shorter
    than one round trip (the final "verifying" lasts a few milliseconds) can be replaced
    by the next before it is sent. Holding the worker makes every report observable, so
    the test can demand all of them without being flaky.
    """

    def __init__(self, jobs: Any, watchers: tuple[str, ...], monkeypatch: pytest.MonkeyPatch):
        self._original: Callable[[str, Progress], None] = jobs._set_progress
        self._cond = threading.Condition()
        self.reported: list[Key] = []
        self.seen: dict[str, list[Key]] = {w: [] for w in watchers}
        self.unacknowledged: list[Key] = []
        monkeypatch.setattr(jobs, "_set_progress", self._set_progress)

    def _set_progress(self, request_id: str, progress: Progress) -> None:
        self._original(request_id, progress)
        key = (progress.phase, progress.completed, progress.total, progress.message)
        with self._cond:
            self.reported.append(key)
            if progress.phase == "done":
                return  # set after the row is terminal: the watchers end on the row's "done"
            if self.unacknowledged:
                return  # already failed: let the forget finish
            count = self.reported.count(key)
            if not self._cond.wait_for(
                lambda: all(s.count(key) >= count for s in self.seen.values()), ACK_TIMEOUT_S
            ):
                self.unacknowledged.append(key)

    def saw(self, watcher: str, op: Operation) -> None:
        with self._cond:
            self.seen[watcher].append(_key(op))
            self._cond.notify_all()


class HoldAt:
    """Holds the worker once, right after it reports ``phase``, until ``release`` is set."""

    def __init__(self, jobs: Any, phase: str, monkeypatch: pytest.MonkeyPatch):
        self._original: Callable[[str, Progress], None] = jobs._set_progress
        self.phase = phase
        self.reached = threading.Event()
        self.release = threading.Event()
        monkeypatch.setattr(jobs, "_set_progress", self._set_progress)

    def _set_progress(self, request_id: str, progress: Progress) -> None:
        self._original(request_id, progress)
        if progress.phase == self.phase and not self.reached.is_set():
            self.reached.set()
            self.release.wait(HOLD_TIMEOUT_S)


def _assert_metrics_sane(m: DeletionMetrics) -> None:
    assert math.isfinite(m.forget_loss) and m.forget_loss >= 0
    for value in (m.forget_accuracy, m.retained_accuracy, m.test_accuracy, m.mia_auc):
        assert 0.0 <= value <= 1.0


def test_progress_streams_every_phase_to_every_watcher(
    client: Client, server: Any, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, _ = _owner_with_samples(state_dir)
    gate = Lockstep(server.forget.jobs, ("forget", "watch"), monkeypatch)
    streamed: list[Operation] = []
    watched: list[Operation] = []
    errors: list[BaseException] = []

    def second_watcher() -> None:
        # A separate client follows the same operation by name with WatchOperation.
        try:
            with Client(server.target, timeout=60.0, retries=1) as other:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        other.get_operation("progress")
                        break
                    except NotFoundError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.01)
                for op in other.watch_operation("progress", timeout=120):
                    watched.append(op)
                    gate.saw("watch", op)
                    if op.done:
                        break
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def on_progress(op: Operation) -> None:
        streamed.append(op)
        gate.saw("forget", op)

    thread = threading.Thread(target=second_watcher)
    thread.start()
    try:
        op = client.forget(
            "digits",
            owner_ids=[owner],
            request_id="progress",
            selection="lcodec_cg",
            wait=True,
            on_progress=on_progress,
        )
    finally:
        thread.join(120)
    assert not errors and not thread.is_alive()
    assert op.state == "SUCCEEDED" and op.receipt is not None
    receipt = op.receipt
    # Every report reached both streams (no report waited out the gate's timeout).
    assert gate.unacknowledged == []
    assert _collapse([k[0] for k in gate.reported]) == PHASES
    for ops in (streamed, watched):
        assert _collapse([o.phase for o in ops]) == PHASES
        # The stream forwards each report as it was made, message and counters included.
        running = [_key(o) for o in ops if not o.done and o.phase != "queued"]
        assert running == [k for k in gate.reported if k[0] != "done"]
        # Not done: running, or still queued when a stream's first snapshot beat the worker
        # (the compute process, started with the server, may still be importing then).
        assert all(
            o.receipt is None
            and (o.state == "RUNNING" or (o.state == "PENDING" and o.phase == "queued"))
            for o in ops
            if not o.done
        ), [(o.state, o.phase) for o in ops if not o.done]
        assert ops[-1].done and ops[-1].state == "SUCCEEDED"
        assert ops[-1].receipt == receipt
    solving = [o for o in streamed if o.phase == "solving"]
    assert solving and all(o.total == receipt.parameters_updated for o in solving)
    assert all(0 <= o.completed <= o.total for o in solving)
    # The counter moves: from nothing solved to the whole selection once the step is taken.
    assert (solving[0].completed, solving[-1].completed) == (0, solving[-1].total)
    assert "Newton steps taken" in solving[-1].message
    # The commit is reported as a bare phase: no counters, no message.
    assert [_key(o) for o in streamed if o.phase == "committing"] == [("committing", 0, 0, "")]
    messages = [o.message for o in streamed if o.phase == "verifying"]
    assert len(messages) == 3 and "before" in messages[0] and "after" in messages[2]
    assert "retained gradient" in messages[1]


def test_cancelling_a_running_forget_leaves_the_model_untouched(
    client: Client, server: Any, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, ids = _owner_with_samples(state_dir)
    # The worker stops right after reporting "solving", so the cancel lands while the
    # request is APPLYING and the computation (in the compute process) is under way.
    hold = HoldAt(server.forget.jobs, "solving", monkeypatch)
    try:
        client.forget("digits", owner_ids=[owner], request_id="cancel-me", selection="lcodec_cg")
        assert hold.reached.wait(120), "the forget never reached the solving phase"
        running = client.get_operation("cancel-me")
        assert (running.state, running.phase, running.done) == ("RUNNING", "solving", False)
        assert server.engine.store.request("cancel-me").state == "APPLYING"
        answer = client.cancel_operation("cancel-me")
        # A running request is cancelled before its commit, not at once.
        assert answer.state == "RUNNING" and not answer.done
    finally:
        hold.release.set()
    final = client.wait("cancel-me", timeout=120)
    assert (final.state, final.done, final.phase) == ("CANCELLED", True, "done")
    assert final.receipt is None
    assert final.error_code == str(code_pb2.CANCELLED) and "cancel" in final.error_message
    # Nothing was committed: same version, same samples, nothing forgotten or audited.
    model = client.get_model("digits")
    assert (model.current_version, model.forgotten_samples) == (1, 0)
    assert [v.version for v in client.list_versions("digits")] == [1]
    data = server.engine.training_data("digits")
    assert set(ids) <= set(data.sample_ids.tolist())
    assert owner in set(data.owner_ids.tolist())
    assert not [e for e in client.audit("digits") if e.action == "forget"]
    # The cancel killed the compute process; the next forget starts a fresh one and works.
    again = client.forget("digits", owner_ids=[owner], request_id="after-cancel", wait=True)
    assert again.state == "SUCCEEDED" and again.receipt is not None
    assert (again.receipt.parent_version, again.receipt.new_version) == (1, 2)
    assert again.receipt.removed_sample_digests == sample_digests(state_dir, ids)


def test_receipts_report_metrics_noise_and_the_budget(
    client: Client, server: Any, state_dir: Path
) -> None:
    first_owner, _ = _owner_with_samples(state_dir, skip=0)
    second_owner, _ = _owner_with_samples(state_dir, skip=1)
    phases: list[str] = []
    started = time.perf_counter()
    first = client.forget(
        "digits",
        owner_ids=[first_owner],
        request_id="plain",
        selection="lcodec_cg",
        wait=True,
        on_progress=lambda o: phases.append(o.phase),
    )
    first_wall = time.perf_counter() - started
    second = client.forget(
        "digits",
        owner_ids=[second_owner],
        request_id="noisy",
        selection="lcodec_cg",
        epsilon=1.0,
        delta=1e-5,
        wait=True,
    )
    assert first.receipt is not None and second.receipt is not None
    r1, r2 = first.receipt, second.receipt
    assert (r1.new_version, r2.parent_version, r2.new_version) == (2, 2, 3)
    # Without pacing the stream may merge short phases, but never reorders them.
    assert _collapse(phases)[-1] == "done" and _is_subsequence(_collapse(phases), PHASES)
    for r in (r1, r2):
        _assert_metrics_sane(r.before)
        _assert_metrics_sane(r.after)
        assert r.units_selected > 0 and 0 < r.parameters_updated <= r.parameters_total
        assert r.seconds > 0
        # The flag says exactly whether test accuracy fell by more than one point.
        drop = r.before.test_accuracy - r.after.test_accuracy
        assert r.accuracy_cost_flagged == (drop > 0.01)
    assert r1.seconds <= first_wall
    # Forgetting an owner makes the model worse on that owner's samples.
    assert r1.after.forget_loss > r1.before.forget_loss
    # Noise only when epsilon is given, at the scale its (epsilon, delta) calls for.
    c1, c2 = r1.certificate, r2.certificate
    assert c1.noise_scale == 0.0
    weight_decay = float(server.engine.model_row("digits").train_config["weight_decay"])
    bound = parameter_distance_bound(c2.residual_norm_all, weight_decay)
    assert c2.noise_scale > 0
    assert c2.noise_scale == pytest.approx(noise_scale(bound, 1.0, 1e-5), rel=1e-6)
    # One ledger across forgets: each spends its residual; used + remaining is the total.
    assert c1.budget_total == c2.budget_total == server.engine.settings.forget_budget
    # The ledger spends r / lambda (weight decay 1e-3), the quantity the noise is calibrated to.
    assert c1.budget_used == pytest.approx(c1.residual_norm_all / 1e-3)
    assert c2.budget_used == pytest.approx(c1.budget_used + c2.residual_norm_all / 1e-3)
    assert c2.budget_used > c1.budget_used
    for c in (c1, c2):
        assert not c.budget_exhausted
        assert c.budget_used + c.budget_remaining == pytest.approx(c.budget_total)


def test_a_forget_that_costs_accuracy_is_applied_and_flagged(state_dir: Path) -> None:
    from expunge.server.main import start
    from expunge.server.settings import Settings

    # Forgetting every class-0 training sample takes the model's knowledge of the class
    # with it (measured: 10.6 points of test accuracy), past the one-point flag. The server
    # serves such an update ("serve"), so what is flagged is also what is served.
    server = start(
        Settings(state_dir=state_dir, port=0, build_index=False, on_accuracy_collapse="serve")
    )
    try:
        _check_costly_forget_is_applied_and_flagged(server)
    finally:
        server.stop(grace=1.0)


def _check_costly_forget_is_applied_and_flagged(server: Any) -> None:
    client = Client(server.target, timeout=120)
    data = server.engine.training_data("digits")
    zeros = data.sample_ids[data.labels.numpy() == 0]
    ids = sorted(int(i) for i in zeros)
    op = client.forget(
        "digits", sample_ids=ids, request_id="costly", selection="lcodec_cg", wait=True
    )
    assert op.state == "SUCCEEDED" and op.receipt is not None
    receipt = op.receipt
    assert receipt.before.test_accuracy - receipt.after.test_accuracy > 0.01
    assert receipt.accuracy_cost_flagged
    assert "test accuracy" in receipt.note and "applied" in receipt.note
    # Applied, not skipped: a new version without the samples is what the server serves.
    assert (receipt.parent_version, receipt.new_version) == (1, 2)
    assert receipt.removed_sample_digests == sample_digests(server.engine.store.root, ids)
    assert client.get_model("digits").current_version == 2
    remaining = set(server.engine.training_data("digits").sample_ids.tolist())
    assert not set(ids) & remaining
    test = server.engine.test_data("digits")
    served = client.predict("digits", test.features)
    assert served.version == 2
    accuracy = float(np.mean(served.labels == test.labels))
    assert accuracy == pytest.approx(receipt.after.test_accuracy, abs=1e-9)
    client.close()
