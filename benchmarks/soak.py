"""Soak: a steady mixed workload for minutes; the server's memory must not grow.

``python -m benchmarks.soak [--seconds 600]`` trains a digits model into a temporary state
directory, serves it in a child process, and drives it with grpc.aio at a fixed number
of calls in flight: Predict (most calls), GetOperation, ListVersions, Neighbors, and a
one-sample Forget every few seconds (each one a new model version, an index refresh and
a calibration invalidation: the paths most likely to leak). The server's resident set
(``/proc/<pid>/status`` VmRSS) is sampled every few seconds. Growth compares the median
RSS over the last fifth of the run with the median over the first fifth after a warm-up
(caches filled, first forgets done): single samples swing by tens of MB. The clock starts
once the first gradient index is loaded, so every error counted is one a client could
see in steady state; the server's log is kept and its error lines are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import grpc
import numpy as np

from expunge.v1 import expunge_pb2 as pb
from expunge.v1 import expunge_pb2_grpc as pb_grpc

IN_FLIGHT = 8
SAMPLE_EVERY_S = 5.0
FORGET_EVERY_S = 5.0


@dataclass(frozen=True)
class SoakResult:
    seconds: float
    requests: int
    forgets: int
    errors: dict[str, int]  # "Method CODE" -> count
    rss_warm_mb: float  # median over the first window after the warm-up
    rss_end_mb: float  # median over the last window
    rss_max_mb: float
    rss_growth_frac: float  # (end - warm) / warm
    rss_samples_mb: list[tuple[float, float]]  # (seconds since start, MB)
    warmup_s: float
    server_error_lines: list[str]  # ERROR lines and tracebacks from the server's log


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


async def _drive(
    target: str,
    pid: int,
    seconds: float,
    warmup_s: float,
    sample_ids: list[int],
    inputs: np.ndarray,
) -> SoakResult:
    tensor = pb.Tensor(dtype="float32", shape=list(inputs.shape), data=inputs.tobytes())
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    rss: list[tuple[float, float]] = []
    started = time.monotonic()
    deadline = started + seconds
    forget_ids = iter(sample_ids)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ExpungeStub(channel)
        first = await stub.Forget(
            pb.ForgetRequest(model="digits", sample_ids=[next(forget_ids)], request_id="soak-0")
        )
        predict = (
            "Predict",
            lambda: stub.Predict(pb.PredictRequest(model="digits", inputs=tensor), timeout=30),
        )
        calls = [
            predict,
            predict,
            predict,
            (
                "GetOperation",
                lambda: stub.GetOperation(pb.GetOperationRequest(name=first.name), timeout=30),
            ),
            (
                "ListVersions",
                lambda: stub.ListVersions(pb.ListVersionsRequest(model="digits"), timeout=30),
            ),
            (
                "Neighbors",
                lambda: stub.Neighbors(
                    pb.NeighborsRequest(model="digits", inputs=tensor, k=10), timeout=30
                ),
            ),
        ]

        async def worker(offset: int) -> None:
            i = offset
            while time.monotonic() < deadline:
                name, call = calls[i % len(calls)]
                try:
                    await call()
                    counts["ok"] += 1
                except grpc.aio.AioRpcError as exc:
                    errors[f"{name} {exc.code().name}"] += 1
                i += 1

        async def forgetter() -> None:
            n = 1
            while time.monotonic() + FORGET_EVERY_S < deadline:
                await asyncio.sleep(FORGET_EVERY_S)
                sid = next(forget_ids, None)
                if sid is None:
                    return
                await stub.Forget(
                    pb.ForgetRequest(model="digits", sample_ids=[sid], request_id=f"soak-{n}"),
                    timeout=30,
                )
                counts["forgets"] += 1
                n += 1

        async def sampler() -> None:
            while time.monotonic() < deadline:
                rss.append((time.monotonic() - started, resident_mb(pid)))
                await asyncio.sleep(SAMPLE_EVERY_S)
            rss.append((time.monotonic() - started, resident_mb(pid)))

        await asyncio.gather(*(worker(k) for k in range(IN_FLIGHT)), forgetter(), sampler())
    # RSS moves by tens of MB from one sample to the next (allocator arenas, torch's
    # buffers), so growth compares window medians, not two single samples.
    window = max(SAMPLE_EVERY_S, (seconds - warmup_s) / 5)
    end = rss[-1][0]
    rss_warm = float(np.median([mb for t, mb in rss if warmup_s <= t <= warmup_s + window]))
    rss_end = float(np.median([mb for t, mb in rss if t >= end - window]))
    return SoakResult(
        seconds=round(time.monotonic() - started, 1),
        requests=counts["ok"],
        forgets=counts["forgets"] + 1,
        errors=dict(errors),
        rss_warm_mb=round(rss_warm, 1),
        rss_end_mb=round(rss_end, 1),
        rss_max_mb=round(max(mb for _, mb in rss), 1),
        rss_growth_frac=round((rss_end - rss_warm) / rss_warm, 4),
        rss_samples_mb=[(round(t, 1), round(mb, 1)) for t, mb in rss],
        warmup_s=warmup_s,
        server_error_lines=[],
    )


def wait_index_ready(target: str, timeout: float = 300.0) -> None:
    """Block until the served model's first gradient index is loaded."""
    from expunge.client import Client

    deadline = time.monotonic() + timeout
    with Client(target, retries=0, timeout=10) as client:
        while client.get_model("digits").index.state != "READY":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the index was not ready within {timeout:.0f} s")
            time.sleep(1.0)


def error_lines(log: Path) -> list[str]:
    """The server log's ERROR lines and whole tracebacks (the soak's expected log is quiet)."""
    kept: list[str] = []
    in_traceback = False
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("Traceback"):
            in_traceback = True
        if in_traceback or "ERROR" in line:
            kept.append(line)
        if in_traceback and line and not line.startswith((" ", "Traceback")):
            in_traceback = False  # the exception's own line ends the traceback
    return kept


def soak(seconds: float, warmup_s: float = 60.0) -> SoakResult:
    """Train a demo model, serve it in a child process, soak it; return the figures."""
    from benchmarks.processes import free_port, serve, wait_serving
    from expunge.server.settings import Settings
    from expunge.server.state.datasets import builtin
    from expunge.server.state.store import Store
    from expunge.server.training_job import train_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_model(root, "digits", "digits", "mlp", epochs=5, settings=Settings(state_dir=root))
        store = Store(root)
        ids = store.sample_ids("digits")
        store.close()
        port = free_port()
        log = root / "server.log"
        server = serve(root, port, log=log)
        try:
            target = f"127.0.0.1:{port}"
            if not wait_serving(target, server, timeout=120):
                raise RuntimeError("server did not start")
            wait_index_ready(target)
            inputs = builtin("digits").features[:1]
            result = asyncio.run(
                _drive(target, server.pid, seconds, min(warmup_s, seconds / 2), ids, inputs)
            )
        finally:
            server.terminate()
            server.wait(60)
        return replace(result, server_error_lines=error_lines(log))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args()
    print(json.dumps(asdict(soak(args.seconds)), indent=2))


if __name__ == "__main__":
    main()
