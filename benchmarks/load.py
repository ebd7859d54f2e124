"""Load on loopback with grpc.aio: throughput and latency at fixed numbers in flight.

``python -m benchmarks.load [--seconds S]`` trains a digits model into a temp state
directory, starts the server in this process, and measures Predict, GetOperation and
Forget acknowledgement at 1, 16, 32 and 64 requests in flight, then drives Predict past
``max_concurrent_rpcs`` and checks that the only errors are RESOURCE_EXHAUSTED while
health keeps answering. Every loop is bounded in time and count. The server serves
Prometheus metrics; their request counts and latency-histogram counts are scraped before
and after the measurements, and the differences are reported with them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from expunge.v1 import expunge_pb2 as pb
from expunge.v1 import expunge_pb2_grpc as pb_grpc

MAX_REQUESTS = 200_000


@dataclass(frozen=True)
class LoadResult:
    name: str
    in_flight: int
    requests: int
    errors: dict[str, int]
    rps: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class MetricDeltas:
    """How much the server's own counters moved during the measurements."""

    requests: dict[tuple[str, str], float]  # (method, code) -> expunge_rpc_requests_total
    latency_counts: dict[str, float]  # method -> expunge_rpc_latency_seconds_count
    # method -> expunge_rpc_arrived_total: more than answered when grpcio itself refused
    # calls past its thread limit (RESOURCE_EXHAUSTED without a handler)
    arrived: dict[str, float]


@dataclass(frozen=True)
class LoadReport:
    results: list[LoadResult]
    metrics: MetricDeltas


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the metrics endpoint serves, by name and sorted labels."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric_deltas(
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    after: dict[tuple[str, tuple[tuple[str, str], ...]], float],
) -> MetricDeltas:
    requests: dict[tuple[str, str], float] = {}
    latency: dict[str, float] = {}
    arrived: dict[str, float] = {}
    for (name, labels), value in after.items():
        moved = value - before.get((name, labels), 0.0)
        if not moved:
            continue
        label = dict(labels)
        if name == "expunge_rpc_requests_total":
            requests[(label["method"], label["code"])] = moved
        elif name == "expunge_rpc_latency_seconds_count":
            latency[label["method"]] = moved
        elif name == "expunge_rpc_arrived_total":
            arrived[label["method"]] = moved
    return MetricDeltas(
        dict(sorted(requests.items())), dict(sorted(latency.items())), dict(sorted(arrived.items()))
    )


async def drive(name: str, make_call, in_flight: int, seconds: float) -> LoadResult:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    deadline = time.perf_counter() + seconds
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while time.perf_counter() < deadline and sent < MAX_REQUESTS:
            sent += 1
            started = time.perf_counter()
            try:
                await make_call(sent)
                latencies.append(time.perf_counter() - started)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    lat = sorted(latencies) or [float("nan")]
    return LoadResult(
        name,
        in_flight,
        len(latencies),
        dict(errors),
        len(latencies) / elapsed,
        1000 * statistics.median(lat),
        1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    )


async def run(
    target: str, seconds: float, sample_ids: list[int], inputs: np.ndarray
) -> list[LoadResult]:
    results = []
    tensor = pb.Tensor(dtype="float32", shape=list(inputs.shape), data=inputs.tobytes())
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ExpungeStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        op = await stub.Forget(
            pb.ForgetRequest(model="digits", sample_ids=[sample_ids[0]], request_id="load-op")
        )

        async def predict(i: int) -> None:
            await stub.Predict(pb.PredictRequest(model="digits", inputs=tensor), timeout=10)

        async def get_operation(i: int) -> None:
            await stub.GetOperation(pb.GetOperationRequest(name=op.name), timeout=10)

        ids = iter(sample_ids[1:])

        async def forget_ack(i: int) -> None:
            sid = next(ids, sample_ids[1])
            await stub.Forget(
                pb.ForgetRequest(model="digits", sample_ids=[sid], request_id=f"load-{sid}"),
                timeout=10,
            )

        for in_flight in (1, 16, 32, 64):
            results.append(await drive("Predict", predict, in_flight, seconds))
            results.append(await drive("GetOperation", get_operation, in_flight, seconds))
        for in_flight in (1, 16, 64):
            results.append(await drive("Forget ack", forget_ack, in_flight, seconds / 2))
        # Past saturation: more in flight than max_concurrent_rpcs.
        saturation = asyncio.create_task(drive("Predict past saturation", predict, 256, seconds))
        await asyncio.sleep(seconds / 2)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        results.append(await saturation)
        results.append(
            LoadResult(
                f"health during saturation: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
                0,
                1,
                {},
                0,
                0,
                0,
            )
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    args = parser.parse_args()
    report = measure(args.seconds)
    print(
        f"{'call':<28}{'in flight':>10}{'requests':>10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}  errors"
    )
    for r in report.results:
        print(
            f"{r.name:<28}{r.in_flight:>10}{r.requests:>10}{r.rps:>10.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}  {r.errors}"
        )
    print("\nserver metrics moved during the run (expunge_rpc_requests_total by method and code):")
    for (method, code), moved in report.metrics.requests.items():
        print(f"  {method:<32}{code:<22}{moved:>10.0f}")
    print("expunge_rpc_latency_seconds_count and expunge_rpc_arrived_total by method:")
    for method, moved in report.metrics.latency_counts.items():
        arrived = report.metrics.arrived.get(method, 0.0)
        print(f"  {method:<32}{moved:>10.0f}{arrived:>10.0f} arrived")


def measure(seconds: float) -> LoadReport:
    """Train a demo model, serve it in a subprocess, drive it; return every measurement and
    how far the server's own request and latency counters moved meanwhile."""
    from benchmarks.processes import free_port, serve, wait_serving
    from expunge.server.settings import Settings
    from expunge.server.training_job import train_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = Settings(state_dir=root)
        train_model(root, "digits", "digits", "mlp", epochs=5, settings=settings)
        from expunge.server.state.datasets import builtin
        from expunge.server.state.store import Store

        # Read before serving: the server then holds the state directory's writer lock.
        store = Store(root)
        ids = store.sample_ids("digits")
        store.close()
        port, metrics_port = free_port(), free_port()
        # The server runs in its own process so the load generator does not share its GIL.
        server = serve(root, port, EXPUNGE_METRICS_PORT=str(metrics_port))
        try:
            target = f"127.0.0.1:{port}"
            if not wait_serving(target, server, timeout=60):
                raise RuntimeError("server did not start")
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            inputs = builtin("digits").features[:1]
            before = scrape(metrics_url)
            results = asyncio.run(run(target, seconds, ids, inputs))
            after = scrape(metrics_url)
        finally:
            server.terminate()
            server.wait(30)
    return LoadReport(results, metric_deltas(before, after))


if __name__ == "__main__":
    main()
