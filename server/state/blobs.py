"""Content-addressed blob files, written atomically.

A blob is written to a temporary file in the same directory, fsynced, renamed to
its SHA-256 name and the directory fsynced; only then may a database transaction
reference it. A crash mid-write leaves at most an unreferenced temp file, which
``collect_garbage`` removes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from expunge.server.errors import FailedPrecondition
from expunge.server.faults import crash_point

_HEX = set("0123456789abcdef")


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

    def put_file(self, write: Callable[[Path], None]) -> str:
        """Store the file ``write(path)`` creates, hashed by streaming it, never held in
        memory whole (a forget's training shard); return its digest (idempotent)."""
        staging = self.root / "tmp"
        staging.mkdir(exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=staging)
        os.close(fd)
        tmp = Path(name)
        try:
            write(tmp)
            crash_point("blob_mid_write")
            hasher = hashlib.sha256()
            with tmp.open("rb") as handle:
                for piece in iter(lambda: handle.read(1 << 22), b""):
                    hasher.update(piece)
                os.fsync(handle.fileno())
            digest = hasher.hexdigest()
            target = self.path(digest)
            if target.exists():
                tmp.unlink()
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)
                fsync_directory(target.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._verified.add(digest)
        return digest

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
