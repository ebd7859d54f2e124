"""What a receipt should name: the keyed digests of ids, computed with the state's own key."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from expunge.server.state.identifiers import IdentifierKey


def sample_digests(state_dir: Path, sample_ids: Iterable[int]) -> list[str]:
    key = IdentifierKey(state_dir)
    return sorted(key.digest("sample", int(s)) for s in sample_ids)


def owner_digests(state_dir: Path, owner_ids: Iterable[str]) -> list[str]:
    key = IdentifierKey(state_dir)
    return sorted(key.digest("owner", str(o)) for o in owner_ids)
