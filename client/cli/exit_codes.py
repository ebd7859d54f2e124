"""The ``expunge`` command's exit codes: one table, cited by ``--help`` and the README.

A failed call maps by its gRPC status code name, whether the client raised it
(``expunge.client.errors``) or the server's engine raised it offline
(``expunge.server.errors``, whose classes carry the same names).
"""

from __future__ import annotations

import textwrap
from typing import NamedTuple


class ExitCode(NamedTuple):
    code: int
    name: str
    meaning: str


OK = 0
FAILED = 1
USAGE = 2
IN_USE = 3
NOT_FOUND = 4
INVALID_ARGUMENT = 5
FAILED_PRECONDITION = 6
PERMISSION = 7
RETRY_LATER = 8
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command
BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports `yes | head`

TABLE: tuple[ExitCode, ...] = (
    ExitCode(OK, "ok", "done (for an operation: it SUCCEEDED, or --no-wait accepted it)"),
    ExitCode(
        FAILED,
        "failed",
        "the operation ran and failed (FAILED or CANCELLED), or the server failed "
        "unexpectedly (INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED, CANCELLED)",
    ),
    ExitCode(
        USAGE,
        "usage",
        "bad command line, local file or field (.npz, --config, directory), bad setting "
        "(EXPUNGE_*), ambiguous model, or the server extra missing",
    ),
    ExitCode(IN_USE, "in use", "the state directory or the port is held by another process"),
    ExitCode(NOT_FOUND, "not found", "no such model, version, operation, sample or owner"),
    ExitCode(
        INVALID_ARGUMENT,
        "invalid argument",
        "the server (or, offline, its engine) refused a value (INVALID_ARGUMENT)",
    ),
    ExitCode(
        FAILED_PRECONDITION,
        "failed precondition",
        "the state does not allow it (FAILED_PRECONDITION; ALREADY_EXISTS: a name taken, "
        "a request id reused for another request)",
    ),
    ExitCode(PERMISSION, "permission", "PERMISSION_DENIED or UNAUTHENTICATED (check --token)"),
    ExitCode(
        RETRY_LATER,
        "retry later",
        "UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED or ABORTED; health NOT_SERVING; "
        "stopped following an operation that goes on (resume: expunge operations watch NAME)",
    ),
    ExitCode(
        INTERRUPTED,
        "interrupted",
        "Ctrl-C (an operation being followed goes on on the server)",
    ),
    ExitCode(BROKEN_PIPE, "broken pipe", "the reader closed stdout (e.g. | head); quietly"),
)

# gRPC status code names -> exit code; names not listed exit FAILED.
BY_STATUS: dict[str, int] = {
    "NOT_FOUND": NOT_FOUND,
    "INVALID_ARGUMENT": INVALID_ARGUMENT,
    "OUT_OF_RANGE": INVALID_ARGUMENT,
    "FAILED_PRECONDITION": FAILED_PRECONDITION,
    "ALREADY_EXISTS": FAILED_PRECONDITION,
    "PERMISSION_DENIED": PERMISSION,
    "UNAUTHENTICATED": PERMISSION,
    "UNAVAILABLE": RETRY_LATER,
    "DEADLINE_EXCEEDED": RETRY_LATER,
    "RESOURCE_EXHAUSTED": RETRY_LATER,
    "ABORTED": RETRY_LATER,
}


def for_status(name: str) -> int:
    """The exit code of a call that failed with the gRPC status code ``name``."""
    return BY_STATUS.get(name, FAILED)


def help_epilog() -> str:
    """The exit-code table as ``expunge --help`` prints it."""
    rows = [
        textwrap.fill(
            f"{e.name}: {e.meaning}",
            width=88,
            initial_indent=f"  {e.code:>3}  ",
            subsequent_indent=" " * 7,
        )
        for e in TABLE
    ]
    return "exit codes:\n" + "\n".join(rows)
