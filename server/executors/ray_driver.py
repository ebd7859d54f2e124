"""The Ray driver: a child process of the server that alone connects to Ray.

Ray ends a driver process whose raylet or GCS is lost (killing the in-process cluster's
raylet ended the whole server, exit status 1, when the driver was the server itself).
Here that ends this child instead; the server sees its pipe close and fails the builds
in flight with ``Unavailable``, and the next build starts a new driver.

Messages, as tuples, over one duplex pipe. From the server: ``("open", build, spec,
path, which)``, ``("range", build, start, stop)``, ``("close", build)``, ``("pids",
request)``, ``("stop",)``. To the server: ``("ready", workers)`` or ``("unavailable",
message)`` once, then ``("block", build, start, stop, array)``, ``("failed", build,
kind, message)`` with kind ``unavailable``, ``shard`` or ``error``, and ``("pids",
request, pids)``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from expunge.server.executors.ray_cluster import RayOptions, import_ray, init_arguments

# How long the loop waits for a finished range before it reads the pipe again.
WAIT_S = 0.01
IDLE_POLL_S = 0.2


@dataclass
class _Build:
    spec_box: list[Any]  # [ObjectRef of the EmbedderSpec]: put once per build
    digest: str
    path: str
    which: tuple[int, ...] | None
    pending: set[Any] = field(default_factory=set)


def driver_main(conn: Connection, parent: int, options: RayOptions) -> None:
    """The child's entry point: connect, start the actors, then serve the pipe."""
    # A process group of its own: the server ends everything the driver started (the
    # local cluster's processes, its agents) with one signal should the driver die.
    os.setpgid(0, 0)
    try:
        ray = import_ray(options.local)
        from expunge.server.executors.worker import EmbeddingWorker

        ray.init(**init_arguments(options))
        driver = _Driver(ray, EmbeddingWorker, options, conn, parent)
        workers = driver.start_actors()
    except BaseException as exc:
        conn.send(("unavailable", f"cannot reach {options.where}: {exc}"))
        return
    conn.send(("ready", workers))
    try:
        driver.serve()
    finally:
        ray.shutdown()


class _Driver:
    def __init__(
        self, ray: Any, worker: type, options: RayOptions, conn: Connection, parent: int
    ) -> None:
        self.ray = ray
        self.options = options
        self.conn = conn
        self.parent = parent
        self.actor_class = ray.remote(
            num_cpus=1,
            max_restarts=options.task_retries,
            max_task_retries=options.task_retries,
        )(worker)
        self.actors: list[Any] = []
        self.builds: dict[int, _Build] = {}
        self.tasks: dict[Any, tuple[int, int, int, int]] = {}  # ref -> build, start, stop, actor

    def start_actors(self) -> int:
        """Start the actors and wait until each answers (they import torch)."""
        count = self.options.workers or max(1, int(self.ray.cluster_resources().get("CPU", 1)))
        self.actors = [self.actor_class.remote() for _ in range(count)]
        self.ray.get([actor.pid.remote() for actor in self.actors])
        return count

    def serve(self) -> None:
        """Until the server says stop or is gone (its end of the pipe closes), or the
        cluster fails beyond the actors."""
        while os.getppid() == self.parent:
            if self.conn.poll(0 if self.tasks else IDLE_POLL_S):
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    return
                if message[0] == "stop":
                    return
                self._handle(message)
                continue
            if self.tasks:
                ready, _ = self.ray.wait(list(self.tasks), num_returns=1, timeout=WAIT_S)
                if ready and not self._finish(ready[0]):
                    return

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "open":
            _, build, spec, path, which = message
            if not self.actors:
                self.start_actors()
            self.builds[build] = _Build([self.ray.put(spec)], spec.digest, path, which)
        elif kind == "range":
            _, build, start, stop = message
            self._submit(build, start, stop)
        elif kind == "close":
            self._close(message[1])
        elif kind == "pids":
            self.conn.send(("pids", message[1], self._pids()))

    def _submit(self, build: int, start: int, stop: int) -> None:
        job = self.builds.get(build)
        if job is None:
            return
        busy = [0] * len(self.actors)
        for _, _, _, actor in self.tasks.values():
            busy[actor] += 1
        actor = busy.index(min(busy))
        ref = self.actors[actor].embed.remote(
            job.spec_box, job.digest, job.path, start, stop, job.which
        )
        self.tasks[ref] = (build, start, stop, actor)
        job.pending.add(ref)

    def _finish(self, ref: Any) -> bool:
        """Send the range's block or its failure; False when this driver must end."""
        from expunge.server.executors.worker import ShardUnreadable

        build, start, stop, _ = self.tasks.pop(ref)
        job = self.builds.get(build)
        if job is not None:
            job.pending.discard(ref)
        exceptions = self.ray.exceptions
        try:
            block = self.ray.get(ref)
        except exceptions.RayTaskError as exc:
            unreadable = isinstance(exc.cause, ShardUnreadable)
            kind, said = ("shard", str(exc.cause)) if unreadable else ("error", str(exc))
            self.conn.send(("failed", build, kind, said))
            return True
        except exceptions.RayError as exc:
            # Every open build fails: its other ranges ran on the same actors or cluster.
            for other in list(self.builds):
                self.conn.send(("failed", other, "unavailable", type(exc).__name__))
                self._close(other)
            self.actors = []  # restarts spent: the next build starts fresh actors
            return isinstance(exc, exceptions.RayActorError)
        if job is not None:
            self.conn.send(("block", build, start, stop, block))
        return True

    def _close(self, build: int) -> None:
        job = self.builds.pop(build, None)
        for ref in job.pending if job is not None else ():
            self.tasks.pop(ref, None)
            with contextlib.suppress(Exception):  # it may have finished meanwhile
                self.ray.cancel(ref)

    def _pids(self) -> list[int] | None:
        try:
            return list(self.ray.get([actor.pid.remote() for actor in self.actors]))
        except self.ray.exceptions.RayError:
            return None
