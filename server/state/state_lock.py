"""One writer per state directory: an exclusive ``flock`` held for the writer's whole life.

Two servers on one directory each committed a forget and the later version silently
reverted the other's update (DESIGN.md section 3). The kernel drops a ``flock`` when its
holder dies, SIGKILL included, so a lock file left behind never blocks the next start;
the pid written into it only names the holder in the refusal.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE_NAME = "expunge.lock"


class StateDirectoryInUse(RuntimeError):
    """Another live process holds the state directory."""

    def __init__(self, state_dir: Path, holder_pid: int | None) -> None:
        holder = f"process {holder_pid}" if holder_pid else "another process"
        super().__init__(
            f"state directory {state_dir} is in use by {holder}; one process writes a state "
            "directory at a time: stop it, or use another --state-dir"
        )
        self.state_dir = state_dir
        self.holder_pid = holder_pid


class StateDirectoryLock:
    """Takes the lock at construction (or raises ``StateDirectoryInUse``); ``release`` ends it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_FILE_NAME
        # O_CLOEXEC (Python's default) keeps the compute child from inheriting the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StateDirectoryInUse(Path(state_dir), holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Idempotent. The file stays: removing it would race with a process opening it."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
