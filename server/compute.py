"""Forget computations in a child process, so the server process keeps answering.

A forget's selection and Newton solve run for seconds of mostly Python-driven torch
work. In the server process that work shares the GIL with the RPC threads: measured
on 2 cores, a Forget acknowledgement's SQLite commit waited 5-20 ms for the GIL while a
forget was being applied (p99 of the acknowledgement 16.6 ms against 5.7 ms with the
worker idle). One long-lived child process (spawned, so no forked OpenMP or gRPC state)
does the computation instead: the weights go in and out as safetensors bytes, progress
phases come back over a queue, and nothing in the child touches the store: the parent
alone commits, so a crash of either process leaves the journal to redo the request.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import queue
import signal
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import torch

from . import weights as weights_io
from .unlearning import PhaseReporter, UnlearningOutcome, unlearn

_progress_queue: Any = None  # the child's end of the progress queue
PR_SET_PDEATHSIG = 1


def _initialise(threads: int, progress: Any) -> None:
    global _progress_queue
    _die_with_parent()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    _progress_queue = progress


def _die_with_parent() -> None:
    # A SIGKILLed server must not leave its child computing a result nobody will read.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the child exits at its next read
        pass


class _QueueReporter:
    def __init__(self, job: str) -> None:
        self.job = job

    def phase(self, name: str, completed: int = 0, total: int = 0, message: str = "") -> None:
        _progress_queue.put((self.job, name, completed, total, message))


@dataclass(frozen=True)
class UnlearningJob:
    """Everything ``unlearn`` needs, in a form that crosses a process boundary."""

    job: str
    spec: dict[str, Any]
    trusted_factories: dict[str, str]
    weights: bytes  # safetensors
    arrays: dict[str, Any]  # tensors forget_x/y, retained_x/y, test_x/y
    arguments: dict[str, Any]  # the other keyword arguments of ``unlearn``


def run_unlearning(job: UnlearningJob) -> tuple[UnlearningOutcome, bytes]:
    """Rebuild the model, run ``unlearn`` on it, return the outcome and the new weights."""
    from expunge.defenses.architectures import ArchitectureSpec

    from .model_factory import build_architecture

    spec = ArchitectureSpec.from_dict(job.spec)
    model = build_architecture(spec, job.trusted_factories, seed=0)
    weights_io.load_into(model, job.weights)
    for p in model.parameters():
        p.requires_grad_(True)
    reporter = _QueueReporter(job.job) if _progress_queue is not None else None
    outcome = unlearn(model=model, spec=spec, reporter=reporter, **job.arrays, **job.arguments)
    return outcome, weights_io.model_to_bytes(model)


class ComputeProcess:
    """One spawned worker process, started on first use, for ``run_unlearning``."""

    def __init__(self, torch_threads: int) -> None:
        self._threads = torch_threads
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._progress: Any = None

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("spawn")
                self._progress = context.Queue()
                self._pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=context,
                    initializer=_initialise,
                    initargs=(self._threads, self._progress),
                )
            return self._pool

    def unlearn(
        self, job: UnlearningJob, reporter: PhaseReporter
    ) -> tuple[UnlearningOutcome, bytes]:
        """Run the job in the child; its phases are reported here as they happen."""
        future: Future[tuple[UnlearningOutcome, bytes]] = self._executor().submit(
            run_unlearning, job
        )
        while True:
            try:
                name, phase, completed, total, message = self._progress.get(timeout=0.05)
            except queue.Empty:
                if future.done():
                    break
                continue
            if name == job.job:
                reporter.phase(phase, completed, total, message)
        try:
            return future.result()
        except BrokenProcessPool:
            self.close()  # the child died (killed, out of memory): start a new one next time
            raise

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
