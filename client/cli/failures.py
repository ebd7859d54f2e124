"""What went wrong, as the command line says it: an exit code and one line of text.

Commands raise ``CommandError`` for what they find wrong themselves; ``describe`` also
turns the client's errors, the server's own errors (raised offline by train, import,
prune and demo) and unreadable files into the same form. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

from ..errors import ExpungeError
from . import exit_codes


class CommandError(Exception):
    """A failure the command foresaw: ``exit_code`` from exit_codes, ``message`` one line."""

    def __init__(
        self, message: str, exit_code: int = exit_codes.USAGE, status: str = "", prog: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.status = status or _STATUS_BY_EXIT.get(exit_code, "")
        self.prog = prog  # who says it (``expunge forget``); empty: the command that ran


_STATUS_BY_EXIT = {
    exit_codes.FAILED: "FAILED",
    exit_codes.USAGE: "USAGE",
    exit_codes.NOT_FOUND: "NOT_FOUND",
    exit_codes.IN_USE: "IN_USE",
    exit_codes.INTERRUPTED: "INTERRUPTED",
}


class Failure(NamedTuple):
    exit_code: int
    status: str  # the gRPC status code name, or USAGE, IN_USE, INTERRUPTED
    message: str  # one line


def describe(exc: BaseException) -> Failure | None:
    """The exit code, status and message for a foreseeable failure; None for a bug."""
    if isinstance(exc, CommandError):
        return Failure(exc.exit_code, exc.status, one_line(exc.message))
    if isinstance(exc, ExpungeError):
        name = exc.code.name
        return Failure(exit_codes.for_status(name), name, f"{name}: {one_line(exc.message)}")
    server_error = _server_error_class()
    if server_error is not None and isinstance(exc, server_error):
        name = str(exc.code)  # type: ignore[attr-defined]
        message = one_line(exc.message)  # type: ignore[attr-defined]
        return Failure(exit_codes.for_status(name), name, f"{name}: {message}")
    if isinstance(exc, OSError) and exc.filename is not None:
        return Failure(exit_codes.USAGE, "USAGE", one_line(file_error(exc)))
    if isinstance(exc, KeyboardInterrupt):
        return Failure(exit_codes.INTERRUPTED, "INTERRUPTED", "interrupted")
    return None


def file_error(exc: OSError) -> str:
    """``path: reason`` for a file that could not be read or written."""
    reason = exc.strerror or type(exc).__name__
    return f"{exc.filename}: {reason[:1].lower()}{reason[1:]}"


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of blanks as single spaces."""
    return " ".join(str(text).split())


def _server_error_class() -> type[BaseException] | None:
    # Only a command that ran server code can have raised one; the client never imports
    # the server (or torch) to find out.
    module = sys.modules.get("expunge.server.errors")
    return None if module is None else module.ExpungeError  # type: ignore[no-any-return]
