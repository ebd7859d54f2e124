"""Each RPC counted, timed and written to the access log once, when it ends.

The interceptor makes a ``CallObserver`` for every call it hands a handler for (the
call has *arrived*), and opens an ``ObservedCall`` around the handler body (streams
included, and calls it refuses); on exit that reads the call's final status code from
the context and reports to the metrics and to the ``expunge.access`` logger. Access
records carry the method, code, latency, role, request id, peer and (for a new
operation) its name: never a request's contents.

A call can arrive and never run: grpcio answers RESOURCE_EXHAUSTED itself, after the
interceptor, once its own concurrency limit (the server's threads) is reached, and runs
no handler for a client that went away before its request was read. Such a call is
counted as arrived only; there is no access record for it.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from expunge.server.telemetry.metrics import ServerMetrics
from expunge.v1 import expunge_pb2

access_logger = logging.getLogger("expunge.access")
REQUEST_ID_HEADER = "x-request-id"
# A client's request id is logged only if it is short and plain (no spaces or newlines).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
# Ids this process gives calls that came without one: unique across restarts by the prefix.
_PROCESS_PREFIX = uuid.uuid4().hex[:12]
_CALLS = itertools.count(1)  # next() on a count is atomic under the GIL


class CallTelemetry:
    """What every call reports to: the server's metrics and the access log."""

    def __init__(self, metrics: ServerMetrics | None, access_log: bool = True) -> None:
        self.metrics = metrics
        self.access_log = access_log

    def observer(self, method: str, role: str, quiet: bool = False) -> CallObserver:
        """For one call of ``method`` (the metrics' label) by ``role``; ``quiet``: its
        access record is DEBUG (health checks, reflection), not INFO."""
        return CallObserver(self, method, role, quiet)

    def ended(self, call: ObservedCall, code: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.rpc_ended(call.method, code, seconds)
        level = logging.DEBUG if call.quiet else logging.INFO
        if not self.access_log or not access_logger.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "event": "rpc",
            "method": call.method,
            "code": code,
            "latency_ms": round(1000 * seconds, 3),
            "role": call.role,
            "request_id": request_id_of(call.context),
            "peer": call.context.peer(),
        }
        if call.operation:
            fields["operation"] = call.operation
        access_logger.log(level, "%s %s %.1f ms", call.method, code, 1000 * seconds, extra=fields)


@dataclass(frozen=True)
class CallObserver:
    """One call's labels, from its arrival (``arrived``) to its handler (called with the
    handler's context: an ``ObservedCall`` to run the body in)."""

    telemetry: CallTelemetry
    method: str
    role: str
    quiet: bool

    def arrived(self) -> None:
        if self.telemetry.metrics is not None:
            self.telemetry.metrics.rpc_arrived(self.method)

    def __call__(self, context: grpc.ServicerContext) -> ObservedCall:
        return ObservedCall(self.telemetry, context, self.method, self.role, self.quiet)


class ObservedCall:
    """A context manager around one handler body; ``answered`` notes its response."""

    def __init__(
        self,
        telemetry: CallTelemetry,
        context: grpc.ServicerContext,
        method: str,
        role: str,
        quiet: bool,
    ) -> None:
        self.telemetry = telemetry
        self.context = context
        self.method = method
        self.role = role
        self.quiet = quiet
        self.operation = ""
        self._started = 0.0

    def __enter__(self) -> ObservedCall:
        self._started = time.perf_counter()
        return self

    def answered(self, response: Any) -> None:
        if isinstance(response, expunge_pb2.Operation):
            self.operation = response.name

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        seconds = time.perf_counter() - self._started
        self.telemetry.ended(self, final_code(self.context, error), seconds)


def final_code(context: grpc.ServicerContext, error: BaseException | None) -> str:
    """The status the call ends with, as grpcio will send it, by name (``OK``, ``NOT_FOUND``).

    An abort (``handles_errors``, the interceptor's refusals) sets the code on the context
    before it raises. A body that ends without one ended OK, unless the client had gone
    (cancelled, or its deadline passed; a stream closed by grpcio after the client broke
    off gets ``GeneratorExit``); any other exception grpcio answers UNKNOWN.
    """
    code = context.code()  # type: ignore[attr-defined]
    if code is not None:
        return str(getattr(code, "name", code))
    if isinstance(error, GeneratorExit) or not context.is_active():
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "OK" if error is None else "UNKNOWN"


def request_id_of(context: grpc.ServicerContext) -> str:
    """The client's ``x-request-id`` when it sent a plain one, else a new id: this
    process's random prefix and a counter (a uuid4 per call cost 3% of the server's time
    under load, in os.urandom)."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return f"{_PROCESS_PREFIX}-{next(_CALLS):x}"
