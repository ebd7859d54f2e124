"""Domain errors and their one mapping to gRPC status codes.

The engine raises these; only the servicer layer turns them into statuses (with
structured ``BadRequest`` field violations), so messages never carry file paths
or internals.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ExpungeError(Exception):
    """Base class: ``code`` names the gRPC status the servicer answers with."""

    code = "INTERNAL"

    def __init__(self, message: str, violations: tuple[FieldViolation, ...] = ()) -> None:
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


def invalid_field(field: str, description: str) -> InvalidArgument:
    """An INVALID_ARGUMENT naming one field, with the field violation attached."""
    return InvalidArgument(f"{field}: {description}", (FieldViolation(field, description),))
