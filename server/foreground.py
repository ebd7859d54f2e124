"""Work a caller waits for, which background work yields to.

On a machine of a few cores, the gradient index's background re-embedding after a forget
competes with the next forget for the same cores: on the CIFAR-shaped CNN (two cores) a
1% forget that takes 21 s alone took 139 s beside the re-embedding of the previous one
(BENCHMARKS.md, scale). So a forget or retrain marks its computation as foreground work,
and the background embedding pauses between shards while any runs, unless a caller is
itself waiting for that embedding (a scan): then pausing would only delay the caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# How often a paused background task rechecks whether it may go on (or must stop).
_RECHECK_S = 0.2


class ForegroundWork:
    """A count of foreground computations; background work waits while it is above zero."""

    def __init__(self) -> None:
        self._running = 0
        self._changed = threading.Condition()

    @contextmanager
    def running(self) -> Iterator[None]:
        """Mark the block as foreground work."""
        with self._changed:
            self._running += 1
        try:
            yield
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify_all()

    @property
    def busy(self) -> bool:
        with self._changed:
            return self._running > 0

    def yield_to(
        self, stopping: threading.Event | None = None, unless: Callable[[], bool] | None = None
    ) -> float:
        """Wait while foreground work runs; return early once ``stopping`` is set or
        ``unless()`` holds. Returns the seconds waited (0.0: it did not wait)."""
        started = time.monotonic()
        waited = False
        with self._changed:
            while self._running > 0:
                if stopping is not None and stopping.is_set():
                    break
                if unless is not None and unless():
                    break
                self._changed.wait(_RECHECK_S)
                waited = True
        return time.monotonic() - started if waited else 0.0
