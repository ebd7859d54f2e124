"""The gradient index build and a scan on Ray against the local executor (issue 21).

``python -m benchmarks.scaleout_bench [--samples 50000] [--scan-inputs 200]`` trains the
CIFAR-shaped CNN of ``benchmarks.scale_bench`` outside Expunge, imports it offline into a
state directory, then, for each executor (local with one torch thread, local with two,
Ray with one embedding worker, Ray with two), starts a server on a fresh copy of that
state, times the index build of the served version (``IndexService.build``: the same
code the server runs in the background), then ``Neighbors`` of 64 inputs and a scan of
``--scan-inputs`` held-out inputs through the real client. Every executor's neighbours
and scan scores are compared with the local executor's in the same run; Ray's overhead
per task is its one-worker build time over the local one-thread build's, per shard of
``index_shard_rows``. Scan scoring itself runs in the server process with either executor.
Writes ``benchmarks/results/scaleout.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.scale_bench import Recipe, cifar_shaped, train_plain, write_repository
from benchmarks.scale_models import cifar_cnn
from expunge.client import Client
from expunge.server.import_job import import_model
from expunge.server.main import start
from expunge.server.settings import Settings
from expunge.server.state.datasets import synthetic_owners

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "scaleout.json"
MODEL = "cifar-cnn"
TRUSTED = {"cifar_cnn": "benchmarks.scale_models:cifar_cnn"}
NEIGHBOR_QUERIES = 64


@dataclass(frozen=True)
class Executor:
    label: str
    executor: str
    torch_threads: int
    ray_workers: int = 0


EXECUTORS = (
    Executor("local, 1 thread", "local", 1),
    Executor("local, 2 threads", "local", 2),
    Executor("ray, 1 worker", "ray", 1, ray_workers=1),
    Executor("ray, 2 workers", "ray", 1, ray_workers=2),
)


def prepare(workdir: Path, samples: int, test_samples: int, recipe: Recipe) -> np.ndarray:
    """Train outside Expunge, import offline; returns the held-out images."""
    images, labels = cifar_shaped(samples + test_samples, seed=0)
    ids = np.arange(samples + test_samples, dtype=np.int64)
    owners = synthetic_owners(samples + test_samples, seed=0)
    parts = {"train": slice(0, samples), "test": slice(samples, samples + test_samples)}
    arrays = {
        part: {
            "features": images[rows],
            "labels": labels[rows],
            "sample_ids": ids[rows],
            "owner_ids": owners[rows],
        }
        for part, rows in parts.items()
    }
    torch.set_num_threads(2)
    x = torch.from_numpy(arrays["train"]["features"])
    y = torch.from_numpy(arrays["train"]["labels"])
    model, states, seconds = train_plain(x, y, recipe, 0, cifar_cnn)
    print(f"trained outside Expunge: {seconds:.1f} s", flush=True)
    repository = workdir / "repository"
    write_repository(repository, model, states, arrays["train"], arrays["test"], recipe)
    state = workdir / "state"
    settings = Settings(state_dir=state, trusted_factories=TRUSTED, max_import_bytes=1 << 34)
    import_model(state, repository, MODEL, settings)
    return images[samples:]


def measure(
    executor: Executor, state: Path, held_out: np.ndarray, scan_inputs: int
) -> dict[str, Any]:
    settings = Settings(
        state_dir=state,
        port=0,
        trusted_factories=TRUSTED,
        torch_threads=executor.torch_threads,
        executor=executor.executor,
        ray_workers=executor.ray_workers,
    )
    # The build as served: the background build a start begins, until the index is READY
    # (with Ray: the cluster's start-up and the actors' set-up included).
    started = time.perf_counter()
    running = start(settings)
    try:
        index = running.forget.index
        assert index is not None
        while (built := index.state(MODEL)).state != "READY":
            assert built.state in ("ABSENT", "BUILDING"), built
            time.sleep(0.2)
        build_s = time.perf_counter() - started
        with Client(running.target, timeout=3600) as client:
            queries = held_out[100 : 100 + NEIGHBOR_QUERIES]
            started = time.perf_counter()
            near = client.neighbors(MODEL, queries, 10)
            neighbors_s = time.perf_counter() - started
            inputs = held_out[200 : 200 + scan_inputs]
            list(client.scan(MODEL, inputs[:2]))  # calibration, once per version
            started = time.perf_counter()
            results = list(client.scan(MODEL, inputs))
            scan_s = time.perf_counter() - started
    finally:
        running.stop(grace=5.0)
    return {
        "executor": executor.label,
        "index_build_s": build_s,
        "index_size": built.size,
        "neighbors_64_s": neighbors_s,
        "scan_s": scan_s,
        "scan_inputs_per_s": scan_inputs / scan_s,
        "neighbor_ids": [[n.sample_id for n in row] for row in near.neighbors],
        "neighbor_scores": [[n.score for n in row] for row in near.neighbors],
        "scan_scores": [r.target_score for r in results],
        "scan_flagged": [r.flagged for r in results],
    }


def compare(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """How far ``other``'s answers are from the reference executor's."""
    ref_scores = np.array(reference["neighbor_scores"])
    scores = np.array(other["neighbor_scores"])
    scan_ref, scan = np.array(reference["scan_scores"]), np.array(other["scan_scores"])
    return {
        "neighbor_ids_identical": reference["neighbor_ids"] == other["neighbor_ids"],
        "neighbor_score_max_abs_diff": float(np.max(np.abs(ref_scores - scores))),
        "neighbor_score_max_rel_diff": _relative(ref_scores, scores),
        "scan_score_max_abs_diff": float(np.max(np.abs(scan_ref - scan))),
        "scan_score_max_rel_diff": _relative(scan_ref, scan),
        "scan_flags_identical": reference["scan_flagged"] == other["scan_flagged"],
    }


def _relative(reference: np.ndarray, other: np.ndarray) -> float:
    """Largest difference over the reference's largest magnitude (scores have no fixed scale)."""
    scale = float(np.max(np.abs(reference))) or 1.0
    return float(np.max(np.abs(reference - other))) / scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000, help="training samples")
    parser.add_argument("--scan-inputs", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=Recipe().epochs)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    recipe = replace(Recipe(), epochs=args.epochs)
    began = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="scaleout-"))
    try:
        held_out = prepare(workdir, args.samples, 1_000, recipe)
        runs = []
        for executor in EXECUTORS:
            state = workdir / f"state-{len(runs)}"
            shutil.copytree(workdir / "state", state)
            run = measure(executor, state, held_out, args.scan_inputs)
            shutil.rmtree(state)
            runs.append(run)
            print(
                f"{executor.label:<18} build {run['index_build_s']:8.1f} s   "
                f"neighbours(64) {run['neighbors_64_s']:6.2f} s   "
                f"scan {run['scan_inputs_per_s']:6.1f} inputs/s",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    by_label = {r["executor"]: r for r in runs}
    local = by_label["local, 1 thread"]
    for run in runs:
        run["against_local_1_thread"] = compare(local, run)
    ray1, ray2 = by_label["ray, 1 worker"], by_label["ray, 2 workers"]
    shard_size = Settings().index_shard_rows
    shards = -(-args.samples // shard_size)
    summary = {
        "ray_2_over_1_worker_build_speedup": ray1["index_build_s"] / ray2["index_build_s"],
        "ray_1_worker_overhead_vs_local_1_thread": ray1["index_build_s"] / local["index_build_s"]
        - 1,
        "ray_overhead_per_task_s": (ray1["index_build_s"] - local["index_build_s"]) / shards,
        "tasks": shards,
        "identical_neighbours_all": all(
            r["against_local_1_thread"]["neighbor_ids_identical"] for r in runs
        ),
    }
    for run in runs:  # the raw answers were for the comparison; keep the file small
        for key in ("neighbor_ids", "neighbor_scores", "scan_scores", "scan_flagged"):
            run.pop(key)
    document = {
        "command": "python -m benchmarks.scaleout_bench "
        f"--samples {args.samples} --scan-inputs {args.scan_inputs} --epochs {args.epochs}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads available",
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - began,
        "runs": runs,
        "summary": summary,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
