"""Authentication, roles and rate limits: one interceptor that denies by default.

Every RPC of the Expunge service must have a rule in ``METHOD_ROLES``; the table is
checked against the service descriptor when the server starts, so a new RPC cannot
ship without one. Decisions are made before any handler runs, so a refusal never
reveals whether a sample, owner or model exists.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import grpc

from expunge.server.roles import METHOD_ROLES, ROLES, UNAUTHENTICATED_ACTOR, actor_name, role_of
from expunge.server.telemetry.calls import CallObserver, CallTelemetry, ObservedCall
from expunge.v1 import expunge_pb2

SERVICE = expunge_pb2.DESCRIPTOR.services_by_name["Expunge"]

# Calls whose answers reveal training-set membership: rate-limited per token.
MEMBERSHIP_REVEALING = frozenset(
    {"Scan", "Neighbors", "Forget", "GetOperation", "WatchOperation", "ListOperations"}
)
# Standard services anyone on the channel may call.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# The role label of a call refused before a token named one.
UNIDENTIFIED = "unidentified"
# The method label of a call to no method of the service (bounded: clients choose paths).
UNKNOWN_METHOD = "unknown"

_actor = threading.local()


def current_actor() -> str:
    """The caller as the interceptor identified it (role and token digest prefix), or 'local'."""
    return str(getattr(_actor, "name", UNAUTHENTICATED_ACTOR))


def check_rules_cover_service() -> None:
    methods = {m.name for m in SERVICE.methods}
    missing = sorted(methods - set(METHOD_ROLES))
    stale = sorted(set(METHOD_ROLES) - methods)
    if missing or stale:
        raise RuntimeError(
            f"authorization rules out of date: no rule for {missing}, rules for unknown {stale}"
        )


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token bucket per caller: ``rate`` per second with a burst of ``2 * rate``."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, 2 * rate)
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.setdefault(key, _Bucket(self.burst, now))
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens < 1:
                return False
            bucket.tokens -= 1
            return True


class ConcurrencyLimiter:
    """At most ``limit`` service calls at once; beyond, RESOURCE_EXHAUSTED at once instead of a queue."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self._active >= self.limit:
                return False
            self._active += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._active -= 1

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._active


class AuthInterceptor(grpc.ServerInterceptor):
    """Bearer-token authentication with roles; tokens are stored and compared as SHA-256 digests.

    It also bounds the service calls in flight (health and reflection are exempt, so a
    saturated server still answers its health checks), and reports every call it lets
    through or refuses to ``telemetry`` (metrics and the access log) when it ends.
    """

    def __init__(
        self,
        token_roles: dict[str, str],
        rate_per_s: float,
        max_in_flight: int = 1 << 30,
        telemetry: CallTelemetry | None = None,
    ) -> None:
        check_rules_cover_service()
        self.telemetry = telemetry
        self.concurrency = ConcurrencyLimiter(max_in_flight)
        bad = sorted({r for r in token_roles.values() if r not in ROLES})
        if bad:
            raise ValueError(f"unknown roles {bad}; roles are {ROLES}")
        self._digests = [(bytes.fromhex(d), role) for d, role in token_roles.items()]
        self.enabled = bool(self._digests)
        self.limiter = RateLimiter(rate_per_s)

    def _role_of(self, metadata: tuple[tuple[str, Any], ...]) -> tuple[str | None, str]:
        header = next((str(v) for k, v in metadata if k == "authorization"), "")
        if not header.startswith("Bearer "):
            return None, ""
        digest = hashlib.sha256(header[len("Bearer ") :].encode()).digest()
        role = None
        # Compare with every stored digest, in constant time each, without an early exit.
        for stored, stored_role in self._digests:
            if hmac.compare_digest(digest, stored):
                role = stored_role
        return role, digest.hex()[:8]

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        method_path = details.method
        if method_path.startswith(OPEN_SERVICES):
            # Health checks and reflection: counted under their full name, logged at DEBUG.
            opened = UNAUTHENTICATED_ACTOR if not self.enabled else UNIDENTIFIED
            observe = self._observer(method_path.lstrip("/"), opened, quiet=True)
            return _guarded(continuation(details), method_path, None, observe)
        prefix = f"/{SERVICE.full_name}/"
        method = method_path[len(prefix) :] if method_path.startswith(prefix) else None
        label = method if method in METHOD_ROLES else UNKNOWN_METHOD
        if not self.enabled:
            observe = self._observer(label, UNAUTHENTICATED_ACTOR)
            return _guarded(
                continuation(details), method_path, self._slot(UNAUTHENTICATED_ACTOR), observe
            )
        if method is None or method not in METHOD_ROLES:
            return _deny(
                grpc.StatusCode.PERMISSION_DENIED,
                "no rule allows this method",
                self._observer(label, UNIDENTIFIED),
            )
        role, digest = self._role_of(tuple(details.invocation_metadata or ()))
        if role is None:
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown bearer token: send 'authorization: Bearer <token>'",
                self._observer(label, UNIDENTIFIED),
            )
        observe = self._observer(label, role)
        if role != "admin" and role not in METHOD_ROLES[method]:
            allowed = sorted(METHOD_ROLES[method] | {"admin"})
            return _deny(
                grpc.StatusCode.PERMISSION_DENIED,
                f"role '{role}' may not call {method}; it needs one of {allowed}",
                observe,
            )
        actor = actor_name(role, digest)
        if method in MEMBERSHIP_REVEALING and not self.limiter.allow(actor):
            return _deny(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit of {self.limiter.rate:g} membership-revealing calls per second for this token; retry shortly",
                observe,
            )
        return _guarded(continuation(details), method_path, self._slot(actor), observe)

    def _slot(self, actor: str) -> _Slot:
        return _Slot(self.concurrency, actor)

    def _observer(self, method: str, actor: str, quiet: bool = False) -> CallObserver | None:
        """How a call of ``method`` by ``actor`` is observed; None without telemetry."""
        if self.telemetry is None:
            return None
        role = role_of(actor) or actor  # an unauthenticated actor is its own label
        return self.telemetry.observer(method, role, quiet)


@dataclass(frozen=True)
class _Slot:
    """A place among the calls in flight, taken and given back around the handler's body."""

    limiter: ConcurrencyLimiter
    actor: str

    @contextmanager
    def held(self, context: grpc.ServicerContext) -> Iterator[None]:
        if not self.limiter.acquire():
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server is at its limit of {self.limiter.limit} calls in flight; retry with backoff",
            )
        _actor.name = self.actor
        try:
            yield
        finally:
            _actor.name = UNAUTHENTICATED_ACTOR
            self.limiter.release()


def _deny(
    code: grpc.StatusCode, message: str, observe: CallObserver | None = None
) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        with _observed(observe, context):
            context.abort(code, message)

    if observe is not None:
        observe.arrived()

    # No deserializer: the body is never parsed for a call that is refused anyway.
    return grpc.unary_unary_rpc_method_handler(abort)


@dataclass(frozen=True)
class _Malformed:
    """What the deserializer hands on for bytes that are not a valid request message."""

    reason: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """grpcio answers INTERNAL when a deserializer raises; ours marks the request instead."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Malformed(type(exc).__name__)

    return parse


def _refuse_malformed(request: Any, context: grpc.ServicerContext, method: str) -> None:
    if isinstance(request, _Malformed):
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request body is not a valid message for {method} ({request.reason}); "
            "send it with the generated client of expunge.v1",
        )


def _observed(
    observe: CallObserver | None, context: grpc.ServicerContext
) -> AbstractContextManager[ObservedCall | None]:
    return observe(context) if observe is not None else nullcontext()


def _guarded(
    handler: Any, method: str, slot: _Slot | None, observe: CallObserver | None = None
) -> Any:
    """The handler with malformed bodies answered INVALID_ARGUMENT and, with ``slot``, its
    body run while holding a place among the calls in flight; with ``observe``, the body
    (a stream's whole iteration) is observed once, whichever way it ends.

    The place is taken inside the behaviour, which grpcio runs only once the request has
    been read, so a call that ends earlier (unparsable, oversize, cancelled, past its
    deadline) never holds one; the ``finally`` that gives it back runs for every way the
    body can end.
    """
    if handler is None:
        return None  # no such method: grpcio answers UNIMPLEMENTED, unobserved
    if observe is not None:
        observe.arrived()

    def held(context: grpc.ServicerContext) -> AbstractContextManager[None]:
        return slot.held(context) if slot is not None else nullcontext()

    def unary_request(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            with _observed(observe, context) as call:
                _refuse_malformed(request, context, method)
                with held(context):
                    response = behavior(request, context)
                if call is not None:
                    call.answered(response)
                return response

        return run

    def unary_request_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with _observed(observe, context):
                _refuse_malformed(request, context, method)
                with held(context):
                    yield from behavior(request, context)

        return run

    def checked_requests(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            _refuse_malformed(request, context, method)
            yield request

    def stream_request(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def run(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            with _observed(observe, context) as call:
                with held(context):
                    response = behavior(checked_requests(requests, context), context)
                if call is not None:
                    call.answered(response)
                return response

        return run

    def stream_request_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def run(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            with _observed(observe, context), held(context):
                yield from behavior(checked_requests(requests, context), context)

        return run

    changes: dict[str, Any] = {"request_deserializer": _tolerant(handler.request_deserializer)}
    if handler.unary_unary:
        changes["unary_unary"] = unary_request(handler.unary_unary)
    elif handler.unary_stream:
        changes["unary_stream"] = unary_request_stream(handler.unary_stream)
    elif handler.stream_unary:
        changes["stream_unary"] = stream_request(handler.stream_unary)
    elif handler.stream_stream:
        changes["stream_stream"] = stream_request_stream(handler.stream_stream)
    return handler._replace(**changes)
