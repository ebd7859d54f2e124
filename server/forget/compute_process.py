"""Forget computations in a child process, so the server process keeps answering.

A forget's selection and Newton solve run for seconds of mostly Python-driven torch
work. In the server process that work shares the GIL with the RPC threads (under load on
2 cores a Forget acknowledgement's p99 was 31.6 ms with the computation in a thread and
14.8 ms with it in this child; BENCHMARKS.md). One long-lived child process (spawned, so
no forked OpenMP or gRPC state) does the computation instead: the weights go in and out
as safetensors bytes, progress phases come back over the same pipe, and nothing in the
child touches the store: the parent alone commits, so a crash of either process leaves
the journal to redo the request. A computation whose result will not be used (cancelled,
server stopping) is ended by killing the child; the next forget starts a fresh one.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from expunge.server.forget.computation import PhaseReporter, UnlearningOutcome, unlearn
from expunge.server.state import weights as weights_io

PR_SET_PDEATHSIG = 1
POLL_S = 0.05


class ComputeProcessDied(RuntimeError):
    """The child ended without an answer (killed, out of memory); the request is redone."""


@dataclass(frozen=True)
class ForgetData:
    """The forget's data by reference: the stored shards' files and the forgotten rows.

    Each process maps the files (``weights_io.arrays_from_file``), so the data crosses no
    pipe and the page cache holds it once for the server and its compute process; only
    the forget and retained rows are copied, where they are computed on.
    """

    train_path: str  # the training shard the forget reads (verified by the server)
    test_path: str
    forget_rows: np.ndarray  # int64 positions in the training shard

    def arrays(self) -> dict[str, Any]:
        """``unlearn``'s forget_x/y, retained_x/y and test_x/y."""
        train = weights_io.arrays_from_file(Path(self.train_path))
        test = weights_io.arrays_from_file(Path(self.test_path))
        mask = np.zeros(len(train["labels"]), dtype=bool)
        mask[self.forget_rows] = True
        features, labels = train["features"], np.asarray(train["labels"])
        return {
            "forget_x": torch.from_numpy(np.ascontiguousarray(features[mask])),
            "forget_y": torch.from_numpy(labels[mask]),
            "retained_x": torch.from_numpy(weights_io.kept_rows(features, ~mask)),
            "retained_y": torch.from_numpy(labels[~mask]),
            "test_x": torch.from_numpy(test["features"]),
            "test_y": torch.from_numpy(np.asarray(test["labels"])),
        }


@dataclass(frozen=True)
class UnlearningJob:
    """Everything ``unlearn`` needs, in a form that crosses a process boundary."""

    job: str
    spec: dict[str, Any]
    trusted_factories: dict[str, str]
    weights: bytes  # safetensors
    data: ForgetData
    arrays: dict[str, Any]  # other tensor arguments (the kept test measurement)
    arguments: dict[str, Any]  # the other keyword arguments of ``unlearn``


def run_unlearning(
    job: UnlearningJob, reporter: PhaseReporter | None = None
) -> tuple[UnlearningOutcome, bytes]:
    """Rebuild the model, run ``unlearn`` on it, return the outcome and the new weights."""
    from expunge.defenses.architectures import ArchitectureSpec
    from expunge.server.model_factory import build_architecture

    spec = ArchitectureSpec.from_dict(job.spec)
    model = build_architecture(spec, job.trusted_factories, seed=0)
    weights_io.load_into(model, job.weights)
    for p in model.parameters():
        p.requires_grad_(True)
    arrays = {**job.data.arrays(), **job.arrays}
    outcome = unlearn(model=model, spec=spec, reporter=reporter, **arrays, **job.arguments)
    return outcome, weights_io.model_to_bytes(model)


def _die_with_parent(parent: int) -> None:
    # A SIGKILLed server must not leave its child computing a result nobody will read.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the child exits at its next read
        pass
    if os.getppid() != parent:  # the parent died before the request above was made
        os._exit(0)


class _PipeReporter:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def phase(self, name: str, completed: int = 0, total: int = 0, message: str = "") -> None:
        self.conn.send(("progress", (name, completed, total, message)))


def _preload() -> None:
    """Import what a forget computation uses, so the first forget pays no import time."""
    import expunge.defenses.batchnorm
    import expunge.defenses.certificate
    import expunge.defenses.evaluate
    import expunge.defenses.lcodec
    import expunge.defenses.newton
    import expunge.defenses.sparse_selection
    import expunge.server.model_factory  # noqa: F401

    # torch.func imports torch._dynamo on its first transform: 1.45 s on this machine,
    # which the first forget paid (most of the expensive case's 2.5 s; BENCHMARKS.md).
    torch.func.grad(lambda w: (w * w).sum())(torch.ones(2))
    torch.func.vmap(torch.func.grad(lambda w: (w * w).sum()))(torch.ones(2, 2))
    # Forward mode (Hessian-vector products, the Jacobian's check) scripts torch's jvp
    # decompositions on its first use: 0.3-0.5 s that the first forget paid (py-spy).
    torch.func.jvp(lambda w: (w * w).sum(), (torch.ones(2),), (torch.ones(2),))


def _child_main(conn: Connection, parent: int, threads: int) -> None:
    _die_with_parent(parent)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    _preload()
    conn.send(("ready", None))  # a message, not a multiprocessing.Event: no semaphores to leak
    reporter = _PipeReporter(conn)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("done", run_unlearning(job, reporter)))
        except Exception as exc:  # the parent re-raises it in the worker thread
            conn.send(("error", exc))


class ComputeProcess:
    """One spawned child process for ``run_unlearning``: started with the server (``start``),
    restarted on the next use after it was killed."""

    def __init__(self, torch_threads: int) -> None:
        self._threads = torch_threads
        self._lock = threading.Lock()
        self._child: tuple[Any, Connection] | None = None
        self._ready = False  # the child's "ready" message was read
        self._reading = threading.Lock()  # one reader of the child's pipe at a time

    def start(self) -> None:
        """Spawn the child now (it imports torch and the algorithms while the server starts),
        so the first forget does not wait for it."""
        self._start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the child has imported what a forget needs; False on timeout."""
        with self._lock:
            child = self._child
        if child is None:
            return False
        with self._reading:
            if not self._ready and child[1].poll(timeout):
                kind, _ = child[1].recv()
                self._ready = kind == "ready"
            return self._ready

    def _start(self) -> tuple[Any, Connection]:
        with self._lock:
            if self._child is None or not self._child[0].is_alive():
                context = multiprocessing.get_context("spawn")
                ours, theirs = context.Pipe(duplex=True)
                self._ready = False
                process = context.Process(
                    target=_child_main,
                    args=(theirs, os.getpid(), self._threads),
                    name="expunge-compute",
                    daemon=True,
                )
                process.start()
                theirs.close()
                self._child = (process, ours)
            return self._child

    def unlearn(
        self, job: UnlearningJob, reporter: PhaseReporter
    ) -> tuple[UnlearningOutcome, bytes]:
        """Run the job in the child; its phases are reported here as they happen.

        If ``reporter`` raises (cancelled, stopping), the child is killed: its result
        would never be used, and the next job must not queue behind it.
        """
        process, conn = self._start()
        self._reading.acquire()
        try:
            conn.send(job)
            while True:
                if not conn.poll(POLL_S):
                    if not process.is_alive():
                        raise ComputeProcessDied("the compute process ended without an answer")
                    check = getattr(reporter, "check_cancelled", None)
                    if check is not None:
                        check()  # raises when cancelled or the server is stopping
                    continue
                kind, payload = conn.recv()
                if kind == "ready":  # the child's start-up message, if nobody waited for it
                    self._ready = True
                elif kind == "progress":
                    reporter.phase(*payload)
                elif kind == "done":
                    return payload  # type: ignore[no-any-return]
                else:
                    failure: Exception = payload
                    break
        except (EOFError, OSError) as exc:
            self.close()
            raise ComputeProcessDied(f"the compute process is gone: {exc}") from exc
        except BaseException:
            self.close()
            raise
        finally:
            self._reading.release()
        raise failure  # the computation itself failed; the child stays for the next job

    def close(self) -> None:
        """Kill the child (if any) and wait for it; safe to call more than once."""
        with self._lock:
            child, self._child = self._child, None
        if child is None:
            return
        process, conn = child
        if process.is_alive():
            process.kill()
        process.join(5)
        conn.close()
