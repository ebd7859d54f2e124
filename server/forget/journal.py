"""Long-running operations: one worker applies journalled forget requests in order.

A request is journalled (PENDING, in SQLite with synchronous=FULL) before Forget
answers. The worker moves it to APPLYING, computes the update on a scratch copy,
and commits the new state and SUCCEEDED in one transaction. On start, requests
left APPLYING by a crash are redone from scratch: nothing was committed for them,
and the computation is deterministic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from expunge.server.errors import Cancelled, ExpungeError
from expunge.server.state.store import RequestRow, Store, VersionMoved

log = logging.getLogger("expunge.server.forget.journal")

PENDING, APPLYING, SUCCEEDED, FAILED, CANCELLED = (
    "PENDING",
    "APPLYING",
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
# error_code of an APPLYING request whose cancellation was asked for (becomes CANCELLED).
CANCEL_ASKED = "CANCELLED"


@dataclass(frozen=True)
class Progress:
    phase: str = "queued"
    completed: int = 0
    total: int = 0
    message: str = ""


@dataclass
class _Live:
    progress: Progress = field(default_factory=Progress)
    cancel: threading.Event = field(default_factory=threading.Event)
    version: int = 0  # bumps on every change so watchers know when to send


class ProgressReporter:
    """Handed to the apply function: reports phases and raises if cancellation was asked."""

    def __init__(self, jobs: JobRunner, request_id: str) -> None:
        self._jobs = jobs
        self._request_id = request_id

    def phase(self, name: str, completed: int = 0, total: int = 0, message: str = "") -> None:
        self.check_cancelled()
        self._jobs._set_progress(self._request_id, Progress(name, completed, total, message))

    def check_cancelled(self) -> None:
        # Cancellation first: a request cancelled and then caught by a shutdown ends
        # CANCELLED now rather than being redone at the next start.
        if self._jobs._live(self._request_id).cancel.is_set():
            raise Cancelled("cancelled at the caller's request before commit")
        if self._jobs._stopping.is_set():
            raise ShuttingDown("the server is stopping; the request stays journalled")


class ShuttingDown(Exception):
    """Raised at a phase boundary when the server stops: the request is redone at next start."""


class Redo(Exception):
    """Raised by apply before committing when its inputs changed under it: computed again.

    The store's ``VersionMoved`` (a commit refused because the model moved) is treated alike.
    """


# A request redone this many times in a row (the model kept changing under it) fails
# with ABORTED rather than looping; nothing was applied, and the caller may resubmit.
MAX_REDOS = 5
# How long stopping waits for a worker that is between requests, whatever the grace period.
IDLE_EXIT_S = 2.0


# apply(request, reporter) commits the result itself (inside its final transaction,
# which must also set the request SUCCEEDED) and returns nothing.
ApplyFunction = Callable[[RequestRow, ProgressReporter], None]
# on_ended(kind, state, seconds): a request the worker ran ended SUCCEEDED, FAILED or
# CANCELLED after ``seconds`` from its first start (redos included).
EndedFunction = Callable[[str, str, float], None]


class JobRunner:
    def __init__(
        self, store: Store, apply: ApplyFunction, on_ended: EndedFunction | None = None
    ) -> None:
        self.store = store
        self.apply = apply
        self.on_ended = on_ended
        self._lock = threading.Condition()
        self._live_state: dict[str, _Live] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._idle = threading.Event()
        self._busy = threading.Event()
        self._thread: threading.Thread | None = None
        self._redos: dict[str, int] = {}
        self._first_started: dict[str, float] = {}

    # Lifecycle ---------------------------------------------------------------------

    def recover(self) -> int:
        """Requeue requests a crash left APPLYING; return how many are waiting.

        One whose cancellation was asked for while it ran ends CANCELLED instead.
        """
        with self.store.transaction() as tx:
            tx.requeue_interrupted(CANCEL_ASKED, "cancelled before commit (the server stopped)")
        return len(self.store.requests_in_state(PENDING))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="forget-worker", daemon=True)
        self._thread.start()
        self._wake.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Let the request in progress finish (up to ``timeout``); True once the worker is gone.

        A request still running past the timeout stays APPLYING in the journal and is
        redone from scratch at the next start.
        """
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            # An idle worker leaves within milliseconds of the wake-up; a zero grace period
            # abandons work in progress, not a worker that is merely between requests.
            idle = not self._busy.is_set()
            self._thread.join(None if timeout is None else max(timeout, IDLE_EXIT_S if idle else 0))
            return not self._thread.is_alive()
        return True

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until every journalled request is done (tests and graceful shutdown)."""
        deadline = threading.Event()
        timer = threading.Timer(timeout, deadline.set)
        timer.start()
        try:
            while not deadline.is_set():
                if not self.store.requests_in_state(PENDING, APPLYING):
                    return True
                self._idle.wait(0.05)
            return False
        finally:
            timer.cancel()

    def notify(self) -> None:
        self._wake.set()

    # Worker ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            while not self._stopping.is_set():
                pending = self.store.requests_in_state(PENDING)
                if not pending:
                    break
                self._busy.set()
                try:
                    self._process(pending[0])
                finally:
                    self._busy.clear()
            self._idle.set()

    def _process(self, request: RequestRow) -> None:
        live = self._live(request.request_id)
        if live.cancel.is_set():
            self._finish(request, CANCELLED, ("CANCELLED", "cancelled before it started"))
            return
        with self.store.transaction() as tx:
            started = tx.start_request(request.request_id)
        if not started:  # cancelled between the queue read and here
            self._set_progress(request.request_id, Progress("done"))
            return
        self._first_started.setdefault(request.request_id, time.monotonic())
        self._set_progress(request.request_id, Progress("starting"))
        try:
            self.apply(replace(request, state=APPLYING), ProgressReporter(self, request.request_id))
            self._redos.pop(request.request_id, None)
            self._set_progress(request.request_id, Progress("done"))
            self._ended(request, SUCCEEDED)
        except ShuttingDown:
            return
        except (Redo, VersionMoved) as exc:
            self._redo(request, str(exc))
        except Cancelled as exc:
            self._finish(request, CANCELLED, ("CANCELLED", exc.message))
        except ExpungeError as exc:
            self._finish(request, FAILED, (exc.code, exc.message))
        except Exception:
            if self._stopping.is_set():
                return  # shutting down: leave it APPLYING, to be redone at the next start
            log.exception("forget %s failed", request.request_id)
            self._finish(
                request, FAILED, ("INTERNAL", "the update failed; the server log has details")
            )

    def _redo(self, request: RequestRow, reason: str) -> None:
        request_id = request.request_id
        if self._live(request_id).cancel.is_set():
            self._finish(request, CANCELLED, ("CANCELLED", "cancelled before commit"))
            return
        tries = self._redos.get(request_id, 0) + 1
        if tries > MAX_REDOS:
            self._redos.pop(request_id, None)
            message = f"{reason}; gave up after {MAX_REDOS} tries, nothing was applied"
            self._finish(request, FAILED, ("ABORTED", message))
            return
        self._redos[request_id] = tries
        log.info(
            "request %s computed again (%d): %s",
            request_id,
            tries,
            reason,
            extra={"event": "redo", "operation": f"operations/{request_id}", "tries": tries},
        )
        with self.store.transaction() as tx:
            tx.set_request_state(request_id, PENDING)
        self._set_progress(request_id, Progress("queued", message=reason))

    def _finish(self, request: RequestRow, state: str, error: tuple[str, str] | None) -> None:
        with self.store.transaction() as tx:
            tx.set_request_state(request.request_id, state, error=error)
        self._set_progress(request.request_id, Progress("done"))
        self._ended(request, state)

    def _ended(self, request: RequestRow, state: str) -> None:
        started = self._first_started.pop(request.request_id, None)
        if self.on_ended is not None:
            seconds = 0.0 if started is None else time.monotonic() - started
            self.on_ended(request.kind, state, seconds)

    # Live state for GetOperation / WatchOperation / CancelOperation --------------------

    def _live(self, request_id: str) -> _Live:
        with self._lock:
            return self._live_state.setdefault(request_id, _Live())

    def _touch(self, request_id: str) -> None:
        with self._lock:
            self._live_state.setdefault(request_id, _Live()).version += 1
            self._lock.notify_all()

    def _set_progress(self, request_id: str, progress: Progress) -> None:
        with self._lock:
            live = self._live_state.setdefault(request_id, _Live())
            live.progress = progress
            live.version += 1
            self._lock.notify_all()

    def progress(self, request_id: str) -> tuple[Progress, int]:
        live = self._live(request_id)
        return live.progress, live.version

    def wait_done(self, request_id: str, timeout: float) -> RequestRow | None:
        """Block until the request has ended (or ``timeout``); its row (None if unknown).

        Woken by the worker's progress notifications, not by polling the store.
        """
        deadline = time.monotonic() + timeout
        _, seen = self.progress(request_id)
        while True:
            row = self.store.request(request_id)
            left = deadline - time.monotonic()
            if row is None or row.state in TERMINAL or left <= 0:
                return row
            # A bounded wait: a notification sent between the read and the wait is not lost.
            seen = self.wait_for_change(request_id, seen, min(left, 1.0))

    def wait_for_change(self, request_id: str, seen: int, timeout: float) -> int:
        """Block until the operation changes past ``seen`` or ``timeout``; return the new version."""
        with self._lock:
            live = self._live_state.setdefault(request_id, _Live())
            self._lock.wait_for(lambda: live.version != seen, timeout)
            return live.version

    def cancel(self, request_id: str) -> None:
        """Ask for cancellation: a PENDING request is cancelled at once, an applying one before commit."""
        self._live(request_id).cancel.set()
        with self.store.transaction() as tx:
            tx.cancel_if_pending(request_id, "cancelled before it started")
            # Durable for a running one too: a restart before its next phase must not
            # redo it (recover); the commit clears the mark, a later cancel is too late.
            tx.mark_cancel_asked(request_id, CANCEL_ASKED)
        self._touch(request_id)

    def result(self, request_id: str) -> dict[str, Any] | None:
        row = self.store.request(request_id)
        return row.result if row else None
