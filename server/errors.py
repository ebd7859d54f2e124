"""Domain errors and their one mapping to gRPC status codes.

The engine raises these; only the servicer layer turns them into statuses (with
structured ``BadRequest`` field violations), so messages never carry file paths
or internals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A status travels in HTTP/2 trailers, which clients cap (grpcio: 8 KiB of metadata). A
# caller's string echoed whole (a 100,000-character model name) would make the client fail
# on metadata size and never see the real status; no word of ours comes near this long.
QUOTE_LIMIT = 64
_LONG_WORD = re.compile(rf"\S{{{QUOTE_LIMIT + 32},}}")
MESSAGE_LIMIT = 1024


def bounded(text: str) -> str:
    """``text`` with every over-long word (a caller's string) cut to a prefix, and at most
    ``MESSAGE_LIMIT`` characters in all."""

    def cut(word: re.Match[str]) -> str:
        whole = word.group(0)
        return f"{whole[:QUOTE_LIMIT]}…(+{len(whole) - QUOTE_LIMIT} characters)"

    text = _LONG_WORD.sub(cut, text)
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "field", bounded(self.field))
        object.__setattr__(self, "description", bounded(self.description))


class ExpungeError(Exception):
    """Base class: ``code`` names the gRPC status the servicer answers with.

    Messages are bounded (``bounded``) so no caller-supplied string is echoed whole.
    """

    code = "INTERNAL"

    def __init__(self, message: str, violations: tuple[FieldViolation, ...] = ()) -> None:
        message = bounded(message)
        super().__init__(message)
        self.message = message
        self.violations = violations


class InvalidArgument(ExpungeError):
    code = "INVALID_ARGUMENT"


class NotFound(ExpungeError):
    code = "NOT_FOUND"


class AlreadyExists(ExpungeError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ExpungeError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ExpungeError):
    code = "RESOURCE_EXHAUSTED"


class PermissionDenied(ExpungeError):
    code = "PERMISSION_DENIED"


class Unauthenticated(ExpungeError):
    code = "UNAUTHENTICATED"


class Unimplemented(ExpungeError):
    code = "UNIMPLEMENTED"


class Aborted(ExpungeError):
    """A concurrent change (a forget committed mid-scan) made the answer inconsistent: retry."""

    code = "ABORTED"


class Cancelled(ExpungeError):
    code = "CANCELLED"


class Unavailable(ExpungeError):
    """A service the answer depends on (the Ray cluster of the index build) cannot be
    reached now; the same call may succeed later."""

    code = "UNAVAILABLE"


def invalid_field(field: str, description: str) -> InvalidArgument:
    """An INVALID_ARGUMENT naming one field, with the field violation attached."""
    return InvalidArgument(f"{field}: {description}", (FieldViolation(field, description),))
