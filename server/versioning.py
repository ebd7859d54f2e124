"""The one way a job adds a model version: checked against the version it was computed on."""

from __future__ import annotations

from typing import Any

from .jobs import Redo
from .store import ModelRow, VersionRow, utc_now


def insert_next_version(
    tx: Any,
    row: ModelRow,
    new_version: int,
    request_id: str,
    weights_blob: str,
    metrics: dict[str, float],
    num_samples: int,
    work: str,
    held_reason: str | None = None,
) -> None:
    """Insert ``new_version`` (from ``Store.next_version``) with parent ``row.current_version``.

    Version numbers are the highest ever assigned plus one, never ``current + 1``: after a
    rollback the current version is not the highest, and ``current + 1`` exists. ``row`` is
    the model as read before ``work`` (say, "the forget") was computed; if its current
    version moved since (a rollback), or another version was added, the work is computed
    again (Redo).
    """
    current, highest = tx.execute(
        "SELECT m.current_version, (SELECT MAX(version) FROM versions WHERE model = m.name) "
        "FROM models m WHERE m.name = ?",
        (row.name,),
    ).fetchone()
    if int(current) != row.current_version or int(highest) + 1 != new_version:
        raise Redo(
            f"the model moved from version {row.current_version} to {current} while {work} ran"
        )
    tx.insert_version(
        VersionRow(
            row.name,
            new_version,
            row.current_version,
            weights_blob,
            request_id,
            utc_now(),
            metrics,
            num_samples,
            False,
            held_reason,
        )
    )
