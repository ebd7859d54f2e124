"""The client's exceptions: each carries the gRPC status code and the server's message."""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field (``inputs[3]``, ``options.selection``) and what is wrong with it."""

    field: str
    description: str


class ExpungeError(Exception):
    """A call failed; ``code`` is the gRPC status code, ``message`` the server's explanation."""

    def __init__(
        self, code: grpc.StatusCode, message: str, violations: tuple[FieldViolation, ...] = ()
    ):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.violations = violations


class InvalidArgumentError(ExpungeError):
    pass


class NotFoundError(ExpungeError):
    pass


class AlreadyExistsError(ExpungeError):
    pass


class FailedPreconditionError(ExpungeError):
    pass


class ResourceExhaustedError(ExpungeError):
    pass


class PermissionDeniedError(ExpungeError):
    pass


class UnauthenticatedError(ExpungeError):
    pass


class UnavailableError(ExpungeError):
    pass


class UnimplementedError(ExpungeError):
    pass


class DeadlineExceededError(ExpungeError):
    pass


class AbortedError(ExpungeError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[ExpungeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.ABORTED: AbortedError,
}


def from_rpc_error(error: grpc.RpcError) -> ExpungeError:
    """Wrap a grpc.RpcError, unpacking BadRequest field violations when present.

    Works for the blocking client's errors and for grpc.aio's ``AioRpcError`` alike: both
    carry the code, details and the trailing metadata the rich status travels in.
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    violations: tuple[FieldViolation, ...] = ()
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    violations += tuple(
                        FieldViolation(v.field, v.description) for v in bad.field_violations
                    )
    except (ImportError, ValueError, AttributeError):
        pass
    return _BY_CODE.get(code, ExpungeError)(code, message or "", violations)
