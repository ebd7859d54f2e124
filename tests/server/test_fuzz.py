"""A short fuzz run over every RPC: no crash, never UNKNOWN or INTERNAL (the long run is a benchmark)."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_messages import SERVICE, request_strategy

BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


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

    @settings(
        max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
    )
    @given(request=request_strategy(descriptor), _=st.just(None))
    def one(request: object, _: None) -> None:
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

    try:
        one()
    finally:
        channel.close()
    assert seen, "no request was sent"
