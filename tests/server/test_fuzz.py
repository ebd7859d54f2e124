"""A short fuzz run over every RPC: no crash, never UNKNOWN or INTERNAL, one access-log
record per request (the long run is a benchmark)."""

from __future__ import annotations

import io
import json
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_messages import SERVICE, request_strategy
from expunge.server.telemetry.logs import configure_logging, flush_logging, reset_logging

BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
# A stream the client broke off ends on the server at its next message or check (a watch
# checks every second): its access record may come a little after the client moved on.
LATE_RECORDS_S = 15.0


def access_records(log: io.StringIO, method: str) -> int:
    """Access records of ``method`` so far; every line must be one JSON object."""
    flush_logging()
    entries = [json.loads(line) for line in log.getvalue().splitlines()]
    return sum(e["logger"] == "expunge.access" and e["method"] == method for e in entries)


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_fuzzed_requests_get_clear_statuses(server: object, method: str) -> None:
    descriptor = SERVICE.methods_by_name[method]
    channel = grpc.insecure_channel(server.target)  # type: ignore[attr-defined]
    path = f"/{SERVICE.full_name}/{method}"
    if descriptor.server_streaming:
        call = channel.unary_stream(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b,
        )
    else:
        call = channel.unary_unary(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b,
        )
    seen: list[grpc.StatusCode] = []
    sent = 0

    @settings(
        max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
    )
    @given(request=request_strategy(descriptor), _=st.just(None))
    def one(request: object, _: None) -> None:
        nonlocal sent
        sent += 1
        try:
            if descriptor.server_streaming:
                for _item in call(request, timeout=20):
                    break
            else:
                call(request, timeout=20)
            seen.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            seen.append(code)
            assert code not in BAD, f"{method} answered {code}: {exc.details()}"  # type: ignore[attr-defined]

    log = io.StringIO()
    configure_logging("INFO", "json", log)
    try:
        try:
            one()
        finally:
            channel.close()
        deadline = time.monotonic() + LATE_RECORDS_S
        while access_records(log, method) < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        assert access_records(log, method) == sent, f"{method}: {sent} requests"
    finally:
        reset_logging()
    assert seen, "no request was sent"
