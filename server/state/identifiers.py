"""Identifiers at rest: owner and sample ids are kept only as keyed digests once used.

A forgotten owner must not be recoverable from the state directory. An unsalted SHA-256 of
``u0023`` falls to a dictionary of ``u0000``..``u9999`` in milliseconds, so digests are
HMAC-SHA-256 under a secret created at the directory's first start (mode 0600). The same
secret makes a digest repeatable, so a receipt still proves which request it answers and
"already forgotten" can still be answered, without naming anyone.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from expunge.server.state.blobs import fsync_directory

SECRET_FILE_NAME = "secret.key"
SECRET_BYTES = 32
# Payload keys that hold identifiers, and the digest domain of each.
IDENTIFIER_FIELDS = {"owner_ids": "owner", "sample_ids": "sample"}


class IdentifierKey:
    """The state directory's HMAC key; ``digest`` names an identifier without revealing it."""

    def __init__(self, state_dir: Path) -> None:
        # Keyed once: each digest copies this state instead of re-deriving the key pads
        # (a forget of 24k samples digests each of them; half of that time was key setup).
        self._keyed = hmac.new(
            _load_or_create(Path(state_dir) / SECRET_FILE_NAME), None, hashlib.sha256
        )

    def digest(self, domain: str, value: str | int) -> str:
        """Hex HMAC-SHA-256 of ``value`` in ``domain`` (an owner and a sample never collide)."""
        mac = self._keyed.copy()
        mac.update(f"{domain}\0{value}".encode())
        return mac.hexdigest()

    def payload_digest(self, payload: dict[str, Any]) -> str:
        """What a request id's idempotency covers: the canonical JSON of its payload, keyed."""
        return self.digest("payload", json.dumps(payload, sort_keys=True))

    def without_identifiers(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload`` with every identifier list replaced by the list of its digests."""
        scrubbed = dict(payload)
        for field, domain in IDENTIFIER_FIELDS.items():
            if field in scrubbed:
                values = scrubbed.pop(field)
                scrubbed[f"{domain}_digests"] = [self.digest(domain, v) for v in values]
        return scrubbed


def _load_or_create(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != SECRET_BYTES:
            raise RuntimeError(
                f"{path} is damaged ({len(key)} bytes, expected {SECRET_BYTES}); restore it "
                "from a backup of the state directory"
            ) from None
        return key
    key = secrets.token_bytes(SECRET_BYTES)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(path.parent)
    return key
