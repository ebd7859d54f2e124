"""Keyed identifier digests against the HMAC-SHA-256 definition they must keep."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from expunge.server.state.identifiers import SECRET_FILE_NAME, IdentifierKey


def test_digests_are_hmac_sha256_of_domain_and_value_under_the_state_secret(
    tmp_path: Path,
) -> None:
    # Digests are stored at rest: a faster computation must give the same bytes.
    key = IdentifierKey(tmp_path)
    secret = (tmp_path / SECRET_FILE_NAME).read_bytes()
    for domain, value in (("owner", "u0023"), ("sample", 17), ("owner", "ü-ä"), ("payload", "")):
        expected = hmac.new(secret, f"{domain}\0{value}".encode(), hashlib.sha256).hexdigest()
        assert key.digest(domain, value) == expected
    # Repeated and interleaved calls do not share state, and a reopened key agrees.
    assert key.digest("owner", "u1") == key.digest("owner", "u1") != key.digest("sample", "u1")
    assert IdentifierKey(tmp_path).digest("owner", "u1") == key.digest("owner", "u1")
