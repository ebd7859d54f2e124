"""The one place that turns domain errors into gRPC statuses (with BadRequest details)."""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from expunge.server.errors import ExpungeError

log = logging.getLogger("expunge.server")

F = TypeVar("F", bound=Callable[..., Any])


def to_status(error: ExpungeError) -> grpc.Status:
    details = []
    if error.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code), message=error.message, details=details
    )
    return rpc_status.to_status(status)


def _internal(context: grpc.ServicerContext, exc: BaseException) -> None:
    incident = uuid.uuid4().hex[:12]
    log.exception(
        "internal error %s",
        incident,
        exc_info=exc,
        extra={"event": "internal_error", "incident": incident},
    )
    context.abort(
        grpc.StatusCode.INTERNAL, f"internal error {incident}; the server log has details"
    )


def handles_errors(method: F) -> F:
    """Wrap a servicer method (unary or server-streaming) so domain errors become statuses."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except ExpungeError as exc:
                context.abort_with_status(to_status(exc))
            except Exception as exc:
                if _is_abort(exc):
                    raise
                _internal(context, exc)

        return streaming  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except ExpungeError as exc:
            context.abort_with_status(to_status(exc))
        except Exception as exc:
            if _is_abort(exc):
                raise
            _internal(context, exc)

    return unary  # type: ignore[return-value]


def _is_abort(exc: BaseException) -> bool:
    # context.abort raises a bare Exception subclass private to grpc; let it through.
    return type(exc).__module__.startswith("grpc")
