"""Reliability: SIGKILL crash loop, long fuzz run, and loopback load, in one command.

``python -m benchmarks.reliability [--kills 100] [--fuzz 10000] [--seconds 5]``

1. Kills: a server process is killed with SIGKILL at a named crash point of forget
   processing (mid blob write, after the weights, after the shard, after the index,
   before and after the commit) or at a random moment, then restarted. After every
   restart: each acknowledged request is applied exactly once, the state invariants
   hold (blob hashes verify, shard and rows agree, nothing half applied), and at the
   end the served weights equal an uninterrupted replay of the same requests.
2. Fuzz: generated and mutated messages for every RPC; counts UNKNOWN/INTERNAL answers.
3. Load: benchmarks.load at 32 in flight (Predict) and Forget acknowledgement.
4. Determinism: benchmarks.determinism_bench, the cost of deterministic mode on the
   forget and scan paths and the byte-identity of repeated forgets.
5. Soak: benchmarks.soak, a mixed workload for ``--soak-seconds`` (10 minutes by
   default) with the server's resident memory sampled; growth after warm-up.
Writes benchmarks/results/reliability.json (DESIGN 7 keys).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_messages import SERVICE, request_strategy
from benchmarks.processes import free_port, serve, wait_serving
from expunge.client import Client, UnavailableError
from expunge.server.faults import POINTS
from expunge.server.settings import Settings
from expunge.server.state.consistency import check_state
from expunge.server.state.store import Store
from expunge.server.training_job import train_model

RESULTS = Path(__file__).parent / "results" / "reliability.json"


def kill_loop(state: Path, kills: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    store = Store(state)
    owners = store.owner_ids("digits")
    store.close()
    pristine = state.parent / "pristine"
    shutil.copytree(state, pristine)
    acknowledged: list[tuple[str, str]] = []
    done_kills = lost = half = 0
    next_owner = 0
    while done_kills < kills and next_owner < len(owners) - 2:
        port = free_port()
        target = f"127.0.0.1:{port}"
        fault = rng.choice([*POINTS, None, None])
        process = serve(state, port, fault)
        if not wait_serving(target, process):
            process.kill()
            process.wait()
            done_kills += 1  # killed during recovery by its own fault point: counts, recovery resumes next round
            continue
        with Client(target, retries=0, timeout=5) as client:
            for _ in range(2):
                owner = owners[next_owner]
                request_id = f"kill-{next_owner}"
                try:
                    client.forget("digits", owner_ids=[owner], request_id=request_id)
                except UnavailableError:
                    break
                acknowledged.append((request_id, owner))
                next_owner += 1
        if fault is None:
            time.sleep(rng.uniform(0.0, 1.5))
            process.send_signal(signal.SIGKILL)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        done_kills += 1
        store = Store(state)
        half += len(check_state(store))
        store.close()
    # Final recovery: everything acknowledged must be SUCCEEDED exactly once.
    port = free_port()
    process = serve(state, port, None)
    target = f"127.0.0.1:{port}"
    assert wait_serving(target, process, timeout=600)
    with Client(target, timeout=60) as client:
        for request_id, _ in acknowledged:
            op = client.wait(request_id, timeout=300)
            lost += op.state != "SUCCEEDED"
        served = client.list_versions("digits")[-1].weights_sha256
        versions = len(client.list_versions("digits"))
    process.send_signal(signal.SIGTERM)
    process.wait(60)
    store = Store(state)
    half += len(check_state(store))
    store.close()
    lost += versions - 1 != len(acknowledged)
    # Replay the same requests without interruption.
    port = free_port()
    process = serve(pristine, port, None)
    target = f"127.0.0.1:{port}"
    assert wait_serving(target, process)
    with Client(target, timeout=60) as client:
        for request_id, owner in acknowledged:
            client.forget("digits", owner_ids=[owner], request_id=request_id, wait=True)
        replay = client.list_versions("digits")[-1].weights_sha256
    process.send_signal(signal.SIGTERM)
    process.wait(60)
    return {
        "kills": done_kills,
        "acknowledged": len(acknowledged),
        "acknowledged_lost": lost,
        "half_applied": half,
        "replay_matches": float(replay == served),
    }


def fuzz(target: str, requests: int) -> dict[str, float]:
    channel = grpc.insecure_channel(target)
    bad = 0
    sent = 0
    per_method = max(1, requests // len(SERVICE.methods))
    # Hypothesis stops a method early once its strategy is exhausted; further rounds
    # (fresh random draws) make up the count asked for.
    for _round in range(5):
        for method in SERVICE.methods:
            bad_here, sent_here = _fuzz_method(channel, method, per_method)
            bad += bad_here
            sent += sent_here
        if sent >= requests:
            break
    malformed, malformed_bad = _fuzz_malformed_bytes(channel, per_method=50, seed=0)
    # Nothing the fuzz sent may leave the server unable to answer an ordinary call.
    still_serving = _ordinary_call_succeeds(channel)
    channel.close()
    return {
        "fuzz_requests": sent,
        "fuzz_bad_status": bad,
        "fuzz_malformed_requests": malformed,
        "fuzz_malformed_bad_status": malformed_bad,
        "fuzz_then_ordinary_call_ok": float(still_serving),
    }


def _fuzz_malformed_bytes(channel: grpc.Channel, per_method: int, seed: int) -> tuple[int, int]:
    """Raw bodies that are not valid messages (random bytes, truncated varints, wrong wire
    types) to every method; UNKNOWN or INTERNAL answers are counted as bad (the probe saw
    INTERNAL, and leaked admission slots)."""
    rng = random.Random(seed)
    bodies = [b"\xff" * 8, b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x0b", b"\x12\x05ab"]
    sent = bad = 0
    for method in SERVICE.methods:
        path = f"/{SERVICE.full_name}/{method.name}"
        streaming = bool(method.server_streaming)
        call = (channel.unary_stream if streaming else channel.unary_unary)(path)
        for i in range(per_method):
            body = bodies[i] if i < len(bodies) else rng.randbytes(rng.randint(1, 64))
            sent += 1
            bad += _answered_badly(call, body, streaming)
    return sent, bad


def _answered_badly(call: Any, request: object, streaming: bool) -> bool:
    """True if the server answers UNKNOWN or INTERNAL: a bug, whatever the request."""
    try:
        if streaming:
            for _item in call(request, timeout=30):
                break
        else:
            call(request, timeout=30)
    except grpc.RpcError as exc:
        return exc.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)  # type: ignore[attr-defined]
    return False


def _ordinary_call_succeeds(channel: grpc.Channel) -> bool:
    from expunge.v1 import expunge_pb2, expunge_pb2_grpc

    try:
        expunge_pb2_grpc.ExpungeStub(channel).ListModels(
            expunge_pb2.ListModelsRequest(), timeout=30
        )
    except grpc.RpcError:
        return False
    return True


def _fuzz_method(channel: grpc.Channel, method: object, examples: int) -> tuple[int, int]:
    path = f"/{SERVICE.full_name}/{method.name}"  # type: ignore[attr-defined]
    streaming = bool(method.server_streaming)  # type: ignore[attr-defined]
    factory = channel.unary_stream if streaming else channel.unary_unary
    call = factory(
        path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=lambda b: b
    )
    counts = {"bad": 0, "sent": 0}

    @settings(
        max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(request=request_strategy(method), _=st.just(None))  # type: ignore[arg-type]
    def one(request: object, _: None) -> None:
        counts["sent"] += 1
        counts["bad"] += _answered_badly(call, request, streaming)

    one()
    return counts["bad"], counts["sent"]


def fuzz_only(requests: int) -> None:
    """The fuzz run alone, on a fresh demo model, into its own results file."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "state"
        train_model(root, "digits", "digits", "mlp", epochs=5, settings=Settings(state_dir=root))
        port = free_port()
        process = serve(root, port, None)
        assert wait_serving(f"127.0.0.1:{port}", process)
        try:
            results: dict[str, object] = dict(fuzz(f"127.0.0.1:{port}", requests))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    results.update(
        {
            "command": "python -m benchmarks.reliability " + " ".join(sys.argv[1:]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    out = RESULTS.with_name("reliability_fuzz.json")
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(json.dumps(results, indent=2, sort_keys=True))


def soak_results(seconds: float) -> dict[str, object]:
    """The soak's figures under their reliability.json keys."""
    from benchmarks.soak import soak

    soaked = soak(seconds)
    print(f"soak: {soaked}", flush=True)
    return {
        "soak_seconds": soaked.seconds,
        "soak_requests": soaked.requests,
        "soak_forgets": soaked.forgets,
        "soak_errors": sum(soaked.errors.values()),
        "soak_errors_by_call": soaked.errors,
        "soak_server_error_lines": soaked.server_error_lines,
        "soak_rss_warm_mb": soaked.rss_warm_mb,
        "soak_rss_end_mb": soaked.rss_end_mb,
        "soak_rss_growth_frac": soaked.rss_growth_frac,
        "soak_rss_max_mb": soaked.rss_max_mb,
        "soak_rss_samples_mb": soaked.rss_samples_mb,
    }


def soak_only(seconds: float) -> None:
    """Rerun the soak alone; its keys in reliability.json are replaced, with their command."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.update(soak_results(seconds))
    results["soak_command"] = (
        f"python -m benchmarks.reliability --soak-only --soak-seconds {seconds:g}"
    )
    results["soak_date"] = datetime.now(UTC).isoformat(timespec="seconds")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--fuzz", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument(
        "--fuzz-only",
        action="store_true",
        help="only the fuzz run, written to results/reliability_fuzz.json",
    )
    parser.add_argument(
        "--soak-only",
        action="store_true",
        help="only the soak; its keys in results/reliability.json are replaced",
    )
    args = parser.parse_args()
    if args.soak_only:
        soak_only(args.soak_seconds)
        return
    if args.fuzz_only:
        fuzz_only(args.fuzz)
        return
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "state"
        train_model(root, "digits", "digits", "mlp", epochs=5, settings=Settings(state_dir=root))
        base = Path(tmp) / "base"
        shutil.copytree(root, base)
        started = time.perf_counter()
        results.update(kill_loop(root, args.kills, seed=0))
        print(f"kill loop: {results} in {time.perf_counter() - started:.0f} s", flush=True)
        fuzz_state = Path(tmp) / "fuzz"
        shutil.copytree(base, fuzz_state)
        port = free_port()
        process = serve(fuzz_state, port, None)
        assert wait_serving(f"127.0.0.1:{port}", process)
        started = time.perf_counter()
        results.update(fuzz(f"127.0.0.1:{port}", args.fuzz))
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        print(
            f"fuzz: {results['fuzz_requests']} requests, {results['fuzz_bad_status']} UNKNOWN/INTERNAL in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    from benchmarks import load

    load_results = load.measure(args.seconds).results
    for r in load_results:
        print(
            f"{r.name:<28}{r.in_flight:>6}{r.rps:>10.0f} req/s  p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  {r.errors}"
        )
        if r.name == "Predict" and r.in_flight == 32:
            results["predict_rps_32"] = round(r.rps, 1)
            results["predict_p99_ms_32"] = round(r.p99_ms, 2)
        if r.name == "Forget ack" and r.in_flight == 1:
            results["forget_ack_p99_ms"] = round(r.p99_ms, 2)
        if r.name == "Forget ack" and r.in_flight == 16:
            results["forget_ack_p99_ms_16"] = round(r.p99_ms, 2)
    from benchmarks.determinism_bench import measure as determinism_cost

    cost = determinism_cost(repeats=5)
    print(f"determinism: {cost}", flush=True)
    results.update(
        {
            "determinism_forget_cost_frac": cost.forget_cost_frac,
            "determinism_scan_cost_frac": cost.scan_cost_frac,
            "determinism_repeated_forget_identical": cost.repeated_forget_hashes_identical,
            "determinism_device": cost.device,
        }
    )

    results.update(soak_results(args.soak_seconds))
    results.update(
        {
            "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "command": "python -m benchmarks.reliability " + " ".join(sys.argv[1:]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
