"""A model repository received over the wire (ImportModel), written to a scratch directory.

Only data files are accepted (the manifest, safetensors, .npz, .parquet) under plain relative paths;
each file arrives in order, and the whole upload is bounded. Nothing here is executed or
unpickled: ``read_repository`` validates the contents once the upload is complete.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from expunge.server.errors import ResourceExhausted, invalid_field

UPLOADS = "uploads"  # under the state directory: scratch space of uploads in progress
SUFFIXES = (".toml", ".safetensors", ".npz", ".parquet")
MAX_FILES = 1024
MAX_DEPTH = 4
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def clear_uploads(parent: Path) -> None:
    """Remove uploads a stopped server left unfinished (none is ever resumed)."""
    shutil.rmtree(parent, ignore_errors=True)


def _relative(path: str) -> PurePosixPath:
    """A safe relative path: plain parts (no '..', no leading '/'), a data file's suffix."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or len(pure.parts) > MAX_DEPTH:
        raise invalid_field("path", f"{path!r} is not a relative path of at most {MAX_DEPTH} parts")
    if not all(_PART.match(part) for part in pure.parts):
        raise invalid_field(
            "path", f"{path!r}: each part must be letters, digits, '.', '_' or '-' (no '..')"
        )
    if pure.suffix not in SUFFIXES:
        raise invalid_field("path", f"{path!r}: only {SUFFIXES} files are accepted")
    return pure


class RepositoryUpload:
    """Pieces of files written under a fresh directory of ``parent``; ``close`` removes it."""

    def __init__(self, parent: Path, max_bytes: int) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="import-", dir=parent))
        self.max_bytes = max_bytes
        self.received = 0
        self._sizes: dict[PurePosixPath, int] = {}

    def add(self, path: str, offset: int, data: bytes) -> None:
        relative = _relative(path)
        size = self._sizes.get(relative, 0)
        if offset != size:
            raise invalid_field(
                "offset", f"{path}: piece at offset {offset}, but {size} bytes were sent so far"
            )
        if relative not in self._sizes and len(self._sizes) >= MAX_FILES:
            raise invalid_field("path", f"at most {MAX_FILES} files per repository")
        self.received += len(data)
        if self.received > self.max_bytes:
            raise ResourceExhausted(
                f"the upload exceeds the server's limit of {self.max_bytes} bytes "
                "(max_import_bytes); import it with 'expunge import --state-dir' on the server"
            )
        target = self.root.joinpath(*relative.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("ab") as handle:
            handle.write(data)
        self._sizes[relative] = size + len(data)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
