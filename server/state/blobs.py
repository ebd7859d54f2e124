"""Content-addressed blob files, written atomically.

A blob is written to a temporary file in the same directory, fsynced, renamed to
its SHA-256 name and the directory fsynced; only then may a database transaction
reference it. A crash mid-write leaves at most an unreferenced temp file, which
``collect_garbage`` removes. A large blob may be staged first (``stage``: written and
fsynced under a temporary name in ``tmp/`` while other work runs) and named later
(``adopt``); collection spares what this process has staged.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from expunge.server.errors import FailedPrecondition
from expunge.server.faults import crash_point

_HEX = set("0123456789abcdef")
STAGING_DIR = "tmp"


@dataclass(frozen=True)
class StagedBlob:
    """A file written and fsynced under a temporary name, with the digest of its bytes."""

    path: Path
    digest: str


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """Immutable files named by their SHA-256 under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Blobs this process wrote or has hashed: ``verified_path`` need not hash them again
        # (a forget's new 600 MB shard was hashed once to be named, again to be mapped).
        self._verified: set[str] = set()
        # Files ``stage`` is writing or has written and not yet adopted or discarded.
        self._staged: set[str] = set()  # their names in STAGING_DIR
        self._staging_lock = threading.Lock()

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or not set(digest) <= _HEX:
            raise ValueError("not a SHA-256 digest")
        return self.root / digest[:2] / digest[2:]

    def put(self, data: bytes) -> str:
        """Store ``data`` durably; return its digest (idempotent)."""
        digest = sha256_hex(data)
        target = self.path(digest)
        if target.exists():
            return digest
        self._write(target, data)
        self._verified.add(digest)
        return digest

    def stage(self, produce: Callable[[Callable[[memoryview], object]], None]) -> StagedBlob:
        """Write the bytes ``produce(sink)`` streams to a temporary file, hashing them as
        they pass (never held whole, never read back), and fsync it. Nothing references it
        until ``adopt`` names it; ``discard`` drops it. Garbage collection spares it while
        it is staged (a forget stages its shard beside the computation, outside the lock)."""
        staging = self.root / STAGING_DIR
        staging.mkdir(exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=staging)
        tmp = Path(name)
        with self._staging_lock:
            self._staged.add(tmp.name)
        hasher = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as handle:

                def sink(piece: memoryview) -> None:
                    hasher.update(piece)
                    handle.write(piece)

                produce(sink)
                crash_point("blob_mid_write")
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            self.discard(StagedBlob(tmp, ""))
            raise
        return StagedBlob(tmp, hasher.hexdigest())

    def adopt(self, staged: StagedBlob) -> str:
        """Name a staged file by its digest, durably; return the digest (idempotent: an
        existing blob of the same bytes is kept and the staged copy dropped)."""
        target = self.path(staged.digest)
        if target.exists():
            staged.path.unlink(missing_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged.path, target)
            fsync_directory(target.parent)
        with self._staging_lock:
            self._staged.discard(staged.path.name)
        self._verified.add(staged.digest)
        return staged.digest

    def discard(self, staged: StagedBlob) -> None:
        """Drop a staged file that will not be adopted."""
        staged.path.unlink(missing_ok=True)
        with self._staging_lock:
            self._staged.discard(staged.path.name)

    def _write(self, target: Path, data: bytes) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                crash_point("blob_mid_write")
                handle.write(data[len(data) // 2 :])
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_directory(target.parent)

    def get(self, digest: str, verify: bool = True) -> bytes:
        """Read a blob; with ``verify`` a corrupted file is refused, never used."""
        data = self.path(digest).read_bytes()
        if verify and sha256_hex(data) != digest:
            raise FailedPrecondition(
                f"stored artefact {digest[:12]} is corrupt (hash mismatch); restore it from backup"
            )
        return data

    def verified_path(self, digest: str) -> Path:
        """The blob's file, its hash checked by streaming it (never held whole): for a
        caller that memory-maps it instead of reading it."""
        path = self.path(digest)
        if digest in self._verified:
            return path
        hasher = hashlib.sha256()
        with path.open("rb") as handle:
            for piece in iter(lambda: handle.read(1 << 22), b""):
                hasher.update(piece)
        if hasher.hexdigest() != digest:
            raise FailedPrecondition(
                f"stored artefact {digest[:12]} is corrupt (hash mismatch); restore it from backup"
            )
        self._verified.add(digest)
        return path

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def digests(self) -> list[str]:
        found = []
        for sub in self.root.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                found += [sub.name + f.name for f in sub.iterdir() if not f.name.startswith(".")]
        return found

    def collect_garbage(self, referenced: Iterable[str]) -> int:
        """Delete blobs no row references and stray temp files; return how many went."""
        keep = set(referenced)
        removed = 0
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                with self._staging_lock:
                    if sub.name == STAGING_DIR and f.name in self._staged:
                        continue
                if f.name.startswith(".tmp-") or (sub.name + f.name) not in keep:
                    f.unlink(missing_ok=True)
                    removed += 1
        return removed


def fsync_directory(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
