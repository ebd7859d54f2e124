"""The one way a job adds a model version: checked against the version it was computed on."""

from __future__ import annotations

from typing import Any

from .jobs import Redo
from .store import ModelRow, VersionRow, utc_now


def insert_next_version(
    tx: Any,
    row: ModelRow,
    request_id: str,
    weights_blob: str,
    metrics: dict[str, float],
    num_samples: int,
    work: str,
) -> int:
    """Insert version ``row.current_version + 1`` inside ``tx``; its number.

    ``row`` is the model as read before ``work`` (say, "the forget") was computed; if
    its current version moved since (a rollback), the work is computed again (Redo).
    """
    current = tx.execute(
        "SELECT current_version FROM models WHERE name = ?", (row.name,)
    ).fetchone()[0]
    if int(current) != row.current_version:
        raise Redo(
            f"the model moved from version {row.current_version} to {current} while {work} ran"
        )
    new_version = row.current_version + 1
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
        )
    )
    return new_version
