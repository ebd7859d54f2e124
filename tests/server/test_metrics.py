"""Prometheus metrics through a real server and client: counts, latencies, operations, gauges."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import prometheus_client
import pytest
from sklearn.datasets import load_digits

from benchmarks.load import scrape
from expunge.client import (
    Client,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from expunge.server.edge.interceptors import token_digest
from expunge.server.main import PortInUse, RunningServer, start
from expunge.server.settings import Settings

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
INDEX_STATES = ("ABSENT", "BUILDING", "READY", "STALE")


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a labelled series not yet created (a counter never moved)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def digits_inputs(n: int) -> np.ndarray:
    """``(n, 1, 8, 8)`` digits scaled to [0, 1], as the model was trained on."""
    return (load_digits().data[:n] / 16).astype(np.float32).reshape(n, 1, 8, 8)


def wait_index_ready(client: Client, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.get_model("digits").index.state != "READY":
        assert time.monotonic() < deadline, "index never became READY"
        time.sleep(0.1)


@pytest.fixture
def metered(state_dir: Path) -> Iterator[RunningServer]:
    running = start(Settings(state_dir=state_dir, port=0, metrics_port=0))
    yield running
    running.stop(grace=0.5)


def test_calls_a_forget_and_the_index_move_the_metrics(metered: RunningServer) -> None:
    assert metered.metrics_port is not None and metered.metrics_port > 0
    assert metered.metrics_url == f"http://127.0.0.1:{metered.metrics_port}/metrics"
    owner = str(metered.engine.training_data("digits").owner_ids[0])
    with Client(metered.target, timeout=60.0, retries=0) as client:
        wait_index_ready(client)  # GetModel calls, counted below as at least one
        samples = scrape(metered.metrics_url)
        assert value(samples, "expunge_index_state", model="digits", state="READY") == 1
        for other in set(INDEX_STATES) - {"READY"}:
            assert value(samples, "expunge_index_state", model="digits", state=other) == 0
        assert value(samples, "expunge_index_size", model="digits") == len(
            metered.engine.training_data("digits").labels
        )
        before_get = value(samples, "expunge_rpc_requests_total", method="GetModel", code="OK")
        assert before_get >= 1

        client.list_models()
        client.predict("digits", digits_inputs(4))
        with pytest.raises(NotFoundError):
            client.get_model("no-such-model")
        op = client.forget("digits", owner_ids=[owner], wait=True)
        assert op.state == "SUCCEEDED"
        samples = scrape(metered.metrics_url)

    def requests(method: str, code: str) -> float:
        return value(samples, "expunge_rpc_requests_total", method=method, code=code)

    assert requests("ListModels", "OK") == 1
    assert value(samples, "expunge_rpc_arrived_total", method="ListModels") == 1
    assert requests("Predict", "OK") == 1
    assert requests("GetModel", "NOT_FOUND") == 1
    assert requests("GetModel", "OK") == before_get
    assert requests("Forget", "OK") == 1
    assert requests("GetOperation", "OK") >= 1  # the client's wait
    assert value(samples, "expunge_rpc_latency_seconds_count", method="Predict") == 1
    assert value(samples, "expunge_rpc_latency_seconds_count", method="ListModels") == 1
    assert value(samples, "expunge_rpc_latency_seconds_bucket", method="Predict", le="+Inf") == 1
    assert value(samples, "expunge_rpc_latency_seconds_sum", method="Predict") > 0
    assert (
        value(
            samples,
            "expunge_operation_duration_seconds_count",
            kind="forget",
            outcome="succeeded",
        )
        == 1
    )
    assert value(samples, "expunge_forget_queue_depth") == 0
    # The client stops reading the WatchOperation stream at the final state; the server
    # ends that call when it sees the cancellation, a moment later.
    deadline = time.monotonic() + 10.0
    while value(scrape(metered.metrics_url), "expunge_rpcs_in_flight") != 0:
        assert time.monotonic() < deadline, "a call stayed in flight after the client's wait"
        time.sleep(0.05)
    budget = samples[("expunge_noise_budget_left", (("model", "digits"),))]
    assert 0 <= budget <= metered.settings.forget_budget


def test_a_scan_counts_its_inputs_once_per_stream(state_dir: Path) -> None:
    # The scan's first call calibrates the model: without an index build in the background
    # and with Newton confirmation it takes seconds rather than tens of them.
    running = start(
        Settings(
            state_dir=state_dir,
            port=0,
            metrics_port=0,
            build_index=False,
            scan_confirmation="newton",
        )
    )
    inputs = digits_inputs(3)
    try:
        with Client(running.target, timeout=60.0, retries=0) as client:
            assert running.metrics_url is not None
            before = scrape(running.metrics_url)
            results = list(client.scan("digits", inputs))
            after = scrape(running.metrics_url)
    finally:
        running.stop(grace=0.5)
    assert len(results) == len(inputs)
    assert value(after, "expunge_index_state", model="digits", state="ABSENT") == 1
    assert value(after, "expunge_index_size", model="digits") == 0
    scored = value(after, "expunge_scan_inputs_scored_total", model="digits") - value(
        before, "expunge_scan_inputs_scored_total", model="digits"
    )
    flagged = value(after, "expunge_scan_inputs_flagged_total", model="digits")
    assert scored == len(inputs)
    assert flagged == sum(r.flagged for r in results)
    assert value(after, "expunge_rpc_requests_total", method="Scan", code="OK") == 1
    assert value(after, "expunge_rpc_latency_seconds_count", method="Scan") == 1


def test_refused_calls_are_counted_with_their_code(state_dir: Path) -> None:
    tokens = {"read-secret": "read", "forget-secret": "forget"}
    running = start(
        Settings(
            state_dir=state_dir,
            port=0,
            metrics_port=0,
            build_index=False,
            token_sha256_roles={token_digest(t): r for t, r in tokens.items()},
            rate_limit_per_s=0.01,  # a burst of one membership-revealing call
        )
    )
    try:
        with Client(running.target, retries=0) as anonymous:
            with pytest.raises(UnauthenticatedError):
                anonymous.list_models()
        with Client(running.target, token="read-secret", retries=0) as reader:
            with pytest.raises(PermissionDeniedError):
                reader.get_operation("operations/none")
        with Client(running.target, token="forget-secret", retries=0) as forgetter:
            with pytest.raises(NotFoundError):
                forgetter.get_operation("operations/none")
            with pytest.raises(ResourceExhaustedError):
                forgetter.get_operation("operations/none")
        assert running.metrics_url is not None
        samples = scrape(running.metrics_url)
    finally:
        running.stop(grace=0.5)
    counted = {
        (dict(labels)["method"], dict(labels)["code"]): v
        for (name, labels), v in samples.items()
        if name == "expunge_rpc_requests_total"
    }
    assert counted == {
        ("ListModels", "UNAUTHENTICATED"): 1,
        ("GetOperation", "PERMISSION_DENIED"): 1,
        ("GetOperation", "NOT_FOUND"): 1,
        ("GetOperation", "RESOURCE_EXHAUSTED"): 1,
    }
    assert value(samples, "expunge_rpc_arrived_total", method="GetOperation") == 3


def test_metrics_are_off_by_default(server: RunningServer) -> None:
    assert server.settings.metrics_port == -1
    assert server.metrics_endpoint is None
    assert server.metrics_port is None and server.metrics_url is None


def test_two_servers_in_one_process_count_apart(
    metered: RunningServer, trained_state: Path, tmp_path: Path
) -> None:
    other_state = tmp_path / "other"
    shutil.copytree(trained_state, other_state)
    other = start(Settings(state_dir=other_state, port=0, metrics_port=0, build_index=False))
    try:
        with Client(metered.target, retries=0) as first, Client(other.target, retries=0) as second:
            first.list_models()
            first.list_models()
            second.list_models()
        assert metered.metrics_url is not None and other.metrics_url is not None
        assert metered.metrics_port != other.metrics_port
        mine, theirs = scrape(metered.metrics_url), scrape(other.metrics_url)
    finally:
        other.stop(grace=0.5)
    assert value(mine, "expunge_rpc_requests_total", method="ListModels", code="OK") == 2
    assert value(theirs, "expunge_rpc_requests_total", method="ListModels", code="OK") == 1
    # Nothing went to the process-wide default registry.
    default = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "expunge_" not in default


def test_a_metrics_port_in_use_is_refused_and_releases_the_state(state_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            start(Settings(state_dir=state_dir, port=0, metrics_port=port, build_index=False))
    # The refused start left nothing held: the state directory opens again.
    running = start(Settings(state_dir=state_dir, port=0, build_index=False))
    running.stop(grace=0.5)
