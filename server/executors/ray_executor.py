"""The index build's embedding on Ray actors (issue #21), driven from a child process.

Per build the embedder's arguments go once into the object store; each actor rebuilds
the embedder from them and maps the training shard by path, so no features pass through
the server. Ranges are the local executor's, so the blocks are the same bytes. At most
``IN_FLIGHT_PER_WORKER`` ranges per actor are handed out ahead: a paused background
build (a forget computing) leaves the cluster idle within a range or two, and a stop
abandons only what is in flight.

Ray restarts a lost actor and retries its tasks (``ray_task_retries``). Once that is
spent, or the cluster or the driver process is gone, the build fails with
``Unavailable`` and commits nothing; the next build starts a new driver (and, for
``ray_address = "local"``, a new cluster).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from expunge.server.errors import FailedPrecondition, Unavailable
from expunge.server.executors.base import EmbeddedRows, EmbeddingJob
from expunge.server.executors.ray_cluster import RayOptions, probe
from expunge.server.executors.ray_driver import driver_main
from expunge.server.executors.spec import EmbedderSpec

log = logging.getLogger("expunge.server.executors")
IN_FLIGHT_PER_WORKER = 2
# The driver imports torch and Ray before it connects: on top of the connect timeout.
IMPORT_S = 60.0
STOP_S = 30.0
LIVENESS_S = 1.0  # how often a waiting build checks that the driver still runs


class RayExecutor:
    """Embeds ranges on ``options.workers`` actors (one CPU each) of a Ray cluster."""

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._link: _DriverLink | None = None

    def prepare(self) -> None:
        """Start the driver, connect and start the actors now, not at the first build."""
        self._driver()

    @property
    def driver_pid(self) -> int | None:
        """The driver process's id, while one runs."""
        link = self._link
        return link.process.pid if link is not None and link.alive else None

    def worker_pids(self) -> list[int]:
        """The actors' process ids (a restarted actor has a new one)."""
        return self._driver().pids()

    def embed(
        self,
        job: EmbeddingJob,
        ranges: Sequence[tuple[int, int]],
        before_each: Callable[[], object],
    ) -> Iterator[EmbeddedRows]:
        if job.stored is None:
            raise ValueError("the Ray executor embeds stored shards only (job.stored is None)")
        link = self._driver()
        build = link.open(job.stored.spec, job.stored.path, job.which)
        try:
            todo = deque(ranges)
            in_flight = 0
            while todo or in_flight:
                while todo and in_flight < IN_FLIGHT_PER_WORKER * link.workers:
                    before_each()
                    start, stop = todo.popleft()
                    link.send(("range", build, start, stop))
                    in_flight += 1
                start, stop, block = link.next_block(build)
                in_flight -= 1
                yield EmbeddedRows(start, stop, torch.from_numpy(block))
        finally:
            link.close_build(build)

    def close(self) -> None:
        """Stop the driver; it shuts down the Ray it started (the local cluster with it)."""
        with self._lock:
            link, self._link = self._link, None
        if link is not None:
            link.stop()

    def _driver(self) -> _DriverLink:
        with self._lock:
            if self._link is None or not self._link.alive:
                if self._link is not None:
                    self._link.stop()
                    self._link = None
                if not self.options.local:
                    probe(self.options.address, self.options.connect_timeout_s)
                self._link = _DriverLink(self.options)
            return self._link


class _DriverLink:
    """One driver process and its pipe; a reader thread hands each build its messages."""

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        context = multiprocessing.get_context("spawn")  # no forked torch or gRPC state
        self.conn, theirs = context.Pipe(duplex=True)
        self.process = context.Process(
            target=driver_main,
            args=(theirs, os.getpid(), options),
            name="expunge-ray-driver",
            daemon=True,
        )
        self.process.start()
        theirs.close()
        self._sending = threading.Lock()
        self._guard = threading.Lock()
        self._inboxes: dict[Any, queue.SimpleQueue[tuple[Any, ...]]] = {}
        self._ids = itertools.count(1)
        self._lost: str | None = None
        self.workers = self._handshake(options.start_timeout_s + IMPORT_S)
        threading.Thread(target=self._read, name="ray-driver-reader", daemon=True).start()
        log.info(
            "embedding on %d Ray actors (%s)",
            self.workers,
            options.where,
            extra={"event": "ray_connected", "address": options.address, "workers": self.workers},
        )

    @property
    def alive(self) -> bool:
        return self._lost is None and self.process.is_alive()

    def _handshake(self, timeout: float) -> int:
        try:
            if not self.conn.poll(timeout):
                raise Unavailable(f"{self.options.where} did not answer within {timeout:.0f} s")
            kind, detail = self.conn.recv()
        except (EOFError, OSError) as exc:
            self.stop()
            raise Unavailable(f"the Ray driver for {self.options.where} ended at start") from exc
        except Unavailable:
            self.stop()
            raise
        if kind != "ready":
            self.stop()
            raise Unavailable(str(detail))
        return int(detail)

    def send(self, message: tuple[Any, ...]) -> None:
        try:
            with self._sending:
                self.conn.send(message)
        except (OSError, ValueError) as exc:  # the driver is gone: its pipe is closed
            raise self._unavailable() from exc

    def open(self, spec: EmbedderSpec, path: str, which: tuple[int, ...] | None) -> int:
        build = next(self._ids)
        with self._guard:
            self._inboxes[build] = queue.SimpleQueue()
        self.send(("open", build, spec, path, which))
        return build

    def next_block(self, build: int) -> tuple[int, int, Any]:
        """The next finished range of ``build``: ``(start, stop, array)``."""
        message = self._receive(build)
        if message[0] == "block":
            return message[2], message[3], message[4]
        kind, detail = message[2], message[3]
        if kind == "shard":
            raise FailedPrecondition(
                f"the workers of {self.options.where} cannot read the training shard at "
                f"{detail}: they need the state directory at the same path (a shared file "
                "system)"
            )
        if kind == "unavailable":
            raise Unavailable(
                f"{self.options.where} lost the embedding workers ({detail}); the index keeps "
                "its previous state"
            )
        raise RuntimeError(f"embedding on {self.options.where} failed: {detail}")

    def close_build(self, build: int) -> None:
        with self._guard:
            self._inboxes.pop(build, None)
        if self.alive:
            with contextlib.suppress(Unavailable):  # gone: nothing of the build runs then
                self.send(("close", build))

    def pids(self) -> list[int]:
        request = ("pids", next(self._ids))
        with self._guard:
            self._inboxes[request] = queue.SimpleQueue()
        try:
            self.send(request)
            message = self._receive(request)
        finally:
            with self._guard:
                self._inboxes.pop(request, None)
        if message[2] is None:
            raise self._unavailable()
        return list(message[2])

    def _receive(self, key: Any) -> tuple[Any, ...]:
        with self._guard:
            inbox = self._inboxes[key]
        while True:
            try:
                message = inbox.get(timeout=LIVENESS_S)
            except queue.Empty:
                if not self.process.is_alive():
                    self._lost = self._lost or "the Ray driver process ended"
                    raise self._unavailable() from None
                continue
            if message[0] == "lost":
                raise self._unavailable()
            return message

    def _read(self) -> None:
        """Hand each message to its build's inbox; when the pipe closes, tell every one."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            key = message[1] if message[0] != "pids" else ("pids", message[1])
            with self._guard:
                inbox = self._inboxes.get(key)
            if inbox is not None:  # else a closed build's late range
                inbox.put(message)
        if self._lost is None:  # not our stop(): the driver died (Ray ends it with its cluster)
            self._lost = "the Ray driver process ended"
            self._end_group()
            log.warning(
                "the Ray driver for %s ended unasked",
                self.options.where,
                extra={"event": "ray_driver_lost", "address": self.options.address},
            )
        with self._guard:
            inboxes = list(self._inboxes.values())
        for inbox in inboxes:
            inbox.put(("lost",))

    def _unavailable(self) -> Unavailable:
        return Unavailable(
            f"{self.options.where} is lost ({self._lost or 'its driver process ended'}); "
            "the index keeps its previous state"
        )

    def stop(self) -> None:
        """Ask the driver to shut Ray down and end; kill it if it does not."""
        self._lost = self._lost or "stopped"
        if self.process.is_alive():
            try:
                with self._sending:
                    self.conn.send(("stop",))
            except (OSError, ValueError):
                pass
            self.process.join(STOP_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._end_group()
        self.conn.close()

    def _end_group(self) -> None:
        """Kill whatever the driver started and left behind (its process group)."""
        if self.process.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
