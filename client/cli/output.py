"""What a command prints: one JSON document with ``--json``, else lines of text.

A command returns an ``Outcome``; ``emit`` prints it on stdout. Errors and progress
never go to stdout, so with ``--json`` stdout holds exactly one JSON document.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, TextIO

import numpy as np

from . import exit_codes


@dataclass(frozen=True)
class Outcome:
    """``document``: what ``--json`` prints; ``lines``: the text otherwise; ``notes``:
    remarks for stderr either way; ``error``: one line for stderr when ``exit_code`` is
    not 0."""

    document: Any
    lines: Sequence[str] = ()
    exit_code: int = exit_codes.OK
    error: str = ""
    status: str = ""  # with ``error``: the operation's state, for the record
    notes: Sequence[str] = ()


@dataclass(frozen=True)
class RawBytes:
    """Binary output (``export --output -``): written to stdout as they are."""

    data: bytes = field(repr=False)


def jsonable(value: Any) -> Any:
    """``value`` as JSON types: dataclasses as dicts, numpy arrays and tuples as lists, and
    non-finite floats as null (strict JSON has no NaN)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    return value


def emit(outcome: Outcome, as_json: bool, stream: TextIO | None = None) -> None:
    """Print ``outcome`` on stdout: its document as JSON, or its lines."""
    out = stream or sys.stdout
    if isinstance(outcome.document, RawBytes):
        out.flush()
        out.buffer.write(outcome.document.data)
    elif as_json:
        out.write(json.dumps(jsonable(outcome.document), sort_keys=True, allow_nan=False) + "\n")
    else:
        for line in outcome.lines:
            out.write(line + "\n")
    out.flush()


def error_document(command: str, status: str, exit_code: int, message: str) -> dict[str, Any]:
    """The JSON object ``--json`` prints on stdout for a failure (stderr has the line too)."""
    return {
        "error": {
            "command": command,
            "status": status,
            "exit_code": exit_code,
            "message": message,
        }
    }


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Aligned columns under a header row, two spaces apart, no trailing blanks."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
