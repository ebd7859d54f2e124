"""The ``expunge`` command line: client calls for every RPC, and serve, train, import,
prune and demo (server extra, imported lazily: the client never loads torch).

``--json`` prints one JSON document per run; exit codes are in ``exit_codes`` (and
``expunge --help``).
"""

from __future__ import annotations

from .exit_codes import (
    BROKEN_PIPE,
    FAILED,
    FAILED_PRECONDITION,
    IN_USE,
    INTERRUPTED,
    INVALID_ARGUMENT,
    NOT_FOUND,
    OK,
    PERMISSION,
    RETRY_LATER,
    USAGE,
)
from .parser import build_parser
from .run import main

# The names the tests and benchmarks have used since the CLI was one module.
EXIT_ERROR = FAILED
EXIT_USAGE = USAGE
EXIT_IN_USE = IN_USE

__all__ = [
    "BROKEN_PIPE",
    "EXIT_ERROR",
    "EXIT_IN_USE",
    "EXIT_USAGE",
    "FAILED",
    "FAILED_PRECONDITION",
    "INTERRUPTED",
    "INVALID_ARGUMENT",
    "IN_USE",
    "NOT_FOUND",
    "OK",
    "PERMISSION",
    "RETRY_LATER",
    "USAGE",
    "build_parser",
    "main",
]
