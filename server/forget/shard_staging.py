"""A forget's new training shard, written while the update computes.

The retained rows are known as soon as the request is resolved to rows, and do not
depend on the update, so the shard without the forgotten rows is streamed to a staged
blob (``BlobStore.stage``) on a thread of the server while the compute process works.
The commit only names it (``adopt``): on a 600 MB shard that took the write, the hash
and the fsync out of the write lock's critical section. A forget that fails or is
cancelled drops it (``discard``); one that dies with the process leaves a temporary file
that the next garbage collection removes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

import numpy as np

from expunge.server.state import weights as weights_io
from expunge.server.state.blobs import BlobStore, StagedBlob


class _Abandoned(Exception):
    """The forget ended before its shard was written: stop writing it."""


class StagedShard:
    """``arrays`` ((n, ...) each) without the rows ``keep`` drops, staged in the background."""

    def __init__(self, blobs: BlobStore, arrays: dict[str, np.ndarray], keep: np.ndarray) -> None:
        self._blobs = blobs
        self._staged: StagedBlob | None = None
        self._error: BaseException | None = None
        self._adopted = False
        self._abandoned = threading.Event()
        self._thread = threading.Thread(
            target=self._write,
            args=(arrays, keep),
            name="expunge-shard-staging",
            daemon=True,  # a stopping server does not wait for it: the file is collected
        )
        self._thread.start()

    def _write(self, arrays: dict[str, np.ndarray], keep: np.ndarray) -> None:
        def produce(sink: Callable[[memoryview], object]) -> None:
            def until_abandoned(piece: memoryview) -> None:
                if self._abandoned.is_set():
                    raise _Abandoned
                sink(piece)

            weights_io.stream_kept_rows(arrays, keep, until_abandoned)

        try:
            self._staged = self._blobs.stage(produce)
        except BaseException as exc:  # re-raised where the commit asks for the shard
            self._error = exc

    def adopt(self) -> str:
        """Wait for the shard and name it in the blob store; return its digest."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._staged is not None
        digest = self._blobs.adopt(self._staged)
        self._adopted = True
        return digest

    def discard(self) -> None:
        """Drop the shard unless it was adopted (the writer stops at its next block)."""
        self._abandoned.set()
        self._thread.join()
        if self._staged is not None and not self._adopted:
            self._blobs.discard(self._staged)

    def __enter__(self) -> StagedShard:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.discard()
