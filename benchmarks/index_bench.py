"""Gradient index benchmark: build throughput, query latency and recall@10 (DESIGN 4.9, 7).

``python -m benchmarks.index_bench [--quick]`` measures, in one run:

1. build throughput on real data: a digits MLP (64-32-10) trained with
   ``defenses.training`` on 1,500 digits (10 checkpoints), every training sample embedded
   (GAS: per-sample gradients + projection to 128 dims per checkpoint, 1280 dims in all)
   and added to a flat FAISS index in shards of 512; samples per second over the whole
   pipeline (median of three builds). Also a ResNet-style model on the same data (not
   with ``--quick``). The 297 held-out digits, embedded with their predicted labels,
   give recall@10 of flat and IVF search on real embeddings.
2. query latency and recall@10 against exact search for 10k, 100k and 1M synthetic
   vectors of 128 dims (1M is left out with ``--quick``), for FAISS flat, FAISS IVF
   (nlist = sqrt(n), nprobe = nlist / 16) and the torch index on this device. The data
   is a mixture of sqrt(n) Gaussian clusters whose within-cluster noise is as large as
   the centres, rows scaled to unit norm (GAS embeddings have constant norm); IVF is
   also run on isotropic Gaussian vectors at 100k, its hardest case. Annoy is compared
   when it is installed (it is not a dependency).
3. on CUDA only: the torch index's query of 64 inputs over 1M x 1024 fp16 vectors, and
   the floor it is held to: one read of the stored matrix at the copy bandwidth
   measured on the same device.

Prints a table and writes ``benchmarks/results/index.json`` (flat keys, units in the
names). A figure that was not measured is absent.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sklearn.datasets import load_digits

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.embeddings import EmbeddingConfig, GradientEmbedder
from expunge.defenses.gradients import predicted_labels
from expunge.defenses.index import (
    ExactTorchIndex,
    FaissConfig,
    FaissIndex,
    GradientIndex,
    TorchCudaIndex,
    recall_at_k,
)
from expunge.defenses.training import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results" / "index.json"
DIM = 128
QUERIES = 100
K = 10
TRAIN_DIGITS = 1500
SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}


def _timed(fn: Callable[[], Any], device: torch.device | None = None) -> tuple[Any, float]:
    """Result and wall seconds of ``fn()``, synchronising CUDA around it when relevant."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def _median_seconds(
    fn: Callable[[], Any], repeats: int, device: torch.device | None = None
) -> float:
    return statistics.median(_timed(fn, device)[1] for _ in range(repeats))


def _device_name() -> str:
    cores = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = f"cpu: {cpu}, {cores} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        name += f"; gpu: {torch.cuda.get_device_name(0)}"
    return name


# --- 1. build throughput on real digits embeddings ---------------------------------


def build_throughput(architecture: str, epochs: int) -> dict[str, float]:
    """Train on 1,500 digits, embed every training sample and add it to a flat index.

    Then the 297 held-out digits, embedded with the final model's predicted labels,
    query that index and an IVF index of the same embeddings: recall@10 of each against
    exact search, and how concentrated real neighbours are (mean top-10 cosine).
    """
    raw = load_digits()
    x_all = torch.tensor(raw.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y_all = torch.tensor(raw.target)
    x, y = x_all[:TRAIN_DIGITS], y_all[:TRAIN_DIGITS]
    spec = ArchitectureSpec(architecture, (1, 8, 8), 10, hidden=(32,), channels=8)
    trained = train(
        build_model(spec, seed=0), x, y, TrainConfig(epochs=epochs, checkpoints=10, seed=0)
    )
    config = EmbeddingConfig(kind="gas", projection_dim=128, seed=0, batch_size=256)

    def build() -> GradientIndex:
        embedder = GradientEmbedder(build_model(spec, seed=0), trained.checkpoints, config)
        index = FaissIndex(embedder.dim, FaissConfig(kind="flat"))
        for start in range(0, len(x), 512):  # shards, as a distributed build would see them
            stop = min(start + 512, len(x))
            vectors = embedder.embed(x[start:stop], y[start:stop])
            index.add(torch.arange(start, stop), vectors, y[start:stop])
        return index

    # Median of three whole builds: one build of 1,500 samples takes well under a second.
    index, first = _timed(build)
    seconds = statistics.median([first, _timed(build)[1], _timed(build)[1]])
    parameters = sum(p.numel() for p in trained.model.parameters())
    embedder = GradientEmbedder(build_model(spec, seed=0), trained.checkpoints, config)
    train_vectors = embedder.embed(x, y)
    x_test = x_all[TRAIN_DIGITS:]
    queries = embedder.embed(x_test, predicted_labels(trained.model, x_test))
    ids = torch.arange(len(x))
    oracle = ExactTorchIndex(embedder.dim)
    oracle.add(ids, train_vectors)
    truth = oracle.search(queries, K)
    ivf = FaissIndex(embedder.dim, FaissConfig(kind="ivf", seed=0))
    ivf.add(ids, train_vectors)
    norms = torch.outer(queries.norm(dim=1), torch.ones(K)) * train_vectors.norm(dim=1)[truth.ids]
    return {
        "samples": float(len(index)),
        "parameters": float(parameters),
        "dim": float(index.dim),
        "seconds": seconds,
        "samples_per_s": len(index) / seconds,
        "recall_at_10_flat": recall_at_k(index.search(queries, K).ids, truth.ids),
        "recall_at_10_ivf": recall_at_k(ivf.search(queries, K).ids, truth.ids),
        "top10_cosine": float((truth.scores / norms).mean()),
    }


# --- 2. synthetic vectors: latency and recall --------------------------------------


def clustered(n: int, seed: int) -> torch.Tensor:
    """``(n, DIM)`` unit rows around sqrt(n) Gaussian centres, noise as large as the centres."""
    generator = torch.Generator().manual_seed(seed)
    clusters = max(1, round(math.sqrt(n)))
    centres = torch.randn((clusters, DIM), generator=generator)
    which = torch.randint(0, clusters, (n,), generator=generator)
    rows = centres[which] + torch.randn((n, DIM), generator=generator)
    return rows / rows.norm(dim=1, keepdim=True)


def isotropic(n: int, seed: int) -> torch.Tensor:
    """``(n, DIM)`` unit rows in uniformly random directions: no structure for IVF to use."""
    rows = torch.randn((n, DIM), generator=torch.Generator().manual_seed(seed))
    return rows / rows.norm(dim=1, keepdim=True)


def measure_index(
    make: Callable[[], GradientIndex],
    ids: torch.Tensor,
    vectors: torch.Tensor,
    queries: torch.Tensor,
    truth: torch.Tensor,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Build seconds, per-query latency alone and in a batch, and recall@10 of one index."""
    index, build_s = _timed(lambda: _filled(make(), ids, vectors), device)
    result = index.search(queries, K)
    single_s = _median_seconds(lambda: index.search(queries[:1], K), repeats=5, device=device)
    batch_s = _median_seconds(lambda: index.search(queries, K), repeats=3, device=device)
    return {
        "build_s": build_s,
        "query_ms_single": 1e3 * single_s,
        "query_ms_per_query_batch": 1e3 * batch_s / len(queries),
        "recall_at_10": recall_at_k(result.ids, truth),
    }


def _filled(index: GradientIndex, ids: torch.Tensor, vectors: torch.Tensor) -> GradientIndex:
    index.add(ids, vectors)
    return index


def measure_annoy(
    vectors: torch.Tensor, queries: torch.Tensor, truth: torch.Tensor
) -> dict[str, float] | None:
    """Annoy (dot metric, 50 trees) when installed; None otherwise."""
    try:
        from annoy import AnnoyIndex
    except ImportError:
        return None
    data = vectors.numpy()

    def build() -> Any:
        index = AnnoyIndex(DIM, "dot")
        for i, row in enumerate(data):
            index.add_item(i, row)
        index.build(50, n_jobs=-1)
        return index

    index, build_s = _timed(build)
    found = torch.tensor([index.get_nns_by_vector(q, K) for q in queries.numpy()])
    single_s = _median_seconds(lambda: index.get_nns_by_vector(queries[0].numpy(), K), 5)
    return {
        "build_s": build_s,
        "query_ms_single": 1e3 * single_s,
        "query_ms_per_query_batch": 1e3 * single_s,
        "recall_at_10": recall_at_k(found, truth),
    }


class Case(NamedTuple):
    """One synthetic data set: figures per index, and the mean true top-10 cosine."""

    by_index: dict[str, dict[str, float]]
    top10_cosine: float


def synthetic(sizes: dict[str, int]) -> dict[str, Case]:
    """Per size label: build, latency and recall figures of every index."""
    out: dict[str, Case] = {}
    for label, n in sizes.items():
        data = clustered(n + QUERIES, seed=n)
        out[label] = _compare(data[QUERIES:], data[:QUERIES], with_flat=True)
        print(f"  measured {label}", file=sys.stderr, flush=True)
        del data
    if "100k" in sizes:
        data = isotropic(100_000 + QUERIES, seed=1)
        out["100k_isotropic"] = _compare(data[QUERIES:], data[:QUERIES], with_flat=False)
    return out


def _compare(vectors: torch.Tensor, queries: torch.Tensor, with_flat: bool) -> Case:
    ids = torch.arange(len(vectors))
    oracle = ExactTorchIndex(DIM)
    oracle.add(ids, vectors)
    truth = oracle.search(queries, K)
    del oracle
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    makers: dict[str, Callable[[], GradientIndex]] = {}
    if with_flat:
        makers["faiss_flat"] = lambda: FaissIndex(DIM, FaissConfig(kind="flat"))
    makers["faiss_ivf"] = lambda: FaissIndex(DIM, FaissConfig(kind="ivf", seed=0))
    if with_flat:
        makers[f"torch_{device.type}"] = lambda: TorchCudaIndex(DIM, device=device)
    results = {
        name: measure_index(make, ids, vectors, queries, truth.ids, device)
        for name, make in makers.items()
    }
    annoy = measure_annoy(vectors, queries, truth.ids) if with_flat else None
    if annoy is not None:
        results["annoy"] = annoy
    # Rows have unit norm, so the true top-10 scores are cosines.
    return Case(results, float(truth.scores.mean()))


# --- 3. CUDA: 64 queries over 1M x 1024 fp16 ----------------------------------------


def gpu_query(device: torch.device, n: int = 1_000_000, dim: int = 1024) -> dict[str, float]:
    """Query time of TorchCudaIndex (fp16) and one read of its matrix at copy bandwidth."""
    generator = torch.Generator(device=device).manual_seed(0)
    index = TorchCudaIndex(dim, device=device, dtype=torch.float16)
    for start in range(0, n, 1 << 18):  # fill in slices: no n x dim float32 copy at once
        rows = torch.randn((min(1 << 18, n - start), dim), generator=generator, device=device)
        rows /= rows.norm(dim=1, keepdim=True)
        index.add(torch.arange(start, start + len(rows)), rows.half())
    # A matrix of the stored one's size and dtype: what a query must read at least once.
    stored = torch.zeros((n, dim), dtype=torch.float16, device=device)
    copy = torch.empty_like(stored)
    for _ in range(3):
        copy.copy_(stored)
    copy_s = _median_seconds(lambda: copy.copy_(stored), repeats=20, device=device)
    bandwidth = 2 * stored.numel() * stored.element_size() / copy_s  # read + write
    bound_ms = 1e3 * stored.numel() * stored.element_size() / bandwidth
    queries = torch.randn((64, dim), generator=generator, device=device)
    for _ in range(3):
        index.search(queries, K)
    query_s = _median_seconds(lambda: index.search(queries, K), repeats=20, device=device)
    return {
        "gpu_query_ms_1m_1024": 1e3 * query_s,
        "gpu_bandwidth_bound_ms": bound_ms,
        "gpu_copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "gpu_query_over_bound": 1e3 * query_s / bound_ms,
    }


# --- report --------------------------------------------------------------------------


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k and 100k only; MLP only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    # The development machine is shared: the load when the run began says how much of
    # its 2 cores the figures below had.
    figures: dict[str, Any] = {"cpu_load_avg_1m_at_start": os.getloadavg()[0]}

    mlp = build_throughput("mlp", epochs=30)
    figures["build_samples_per_s"] = mlp["samples_per_s"]
    figures["build_embedding_dim"] = mlp["dim"]
    builds = [["model", "parameters", "samples", "dim", "seconds", "samples/s"]]
    builds.append(_build_row("mlp 64-32-10", mlp))
    if not args.quick:
        resnet = build_throughput("resnet", epochs=5)
        figures["build_samples_per_s_resnet"] = resnet["samples_per_s"]
        builds.append(_build_row("resnet (8 ch)", resnet))
    print("Build: digits, GAS, 10 checkpoints x 128 dims, per-sample gradients + projection + add")
    print(_table(builds))

    sizes = {k: v for k, v in SIZES.items() if not (args.quick and k == "1m")}
    measured = synthetic(sizes)
    rows = [["vectors", "index", "build s", "1 query ms", "batched ms/query", "recall@10"]]
    for label, case in measured.items():
        figures[f"top10_cosine_{label}"] = case.top10_cosine
        for name, m in case.by_index.items():
            rows.append(
                [
                    label,
                    name,
                    f"{m['build_s']:.2f}",
                    f"{m['query_ms_single']:.2f}",
                    f"{m['query_ms_per_query_batch']:.3f}",
                    f"{m['recall_at_10']:.3f}",
                ]
            )
            for key, value in m.items():
                figures[f"{key}_{name}_{label}"] = value
    for name in ("flat", "ivf"):
        rows.append(["digits", f"faiss_{name}", "", "", "", f"{mlp[f'recall_at_10_{name}']:.3f}"])
    print(
        f"\nSearch: {DIM} dims (digits: {mlp['dim']:.0f}), {QUERIES} queries "
        f"(digits: {len(load_digits().target) - TRAIN_DIGITS}), k = {K}; batched = all at once"
    )
    print(_table(rows))
    cosines = ", ".join(f"{label} {case.top10_cosine:.2f}" for label, case in measured.items())
    print(f"mean true top-10 cosine: digits {mlp['top10_cosine']:.2f}, {cosines}")
    figures["recall_at_10_flat_digits"] = mlp["recall_at_10_flat"]
    figures["recall_at_10_ivf_digits"] = mlp["recall_at_10_ivf"]
    figures["top10_cosine_digits"] = mlp["top10_cosine"]
    # Headline figures: the worst case over the clustered sizes and the real embeddings
    # (the isotropic case is reported apart: no embedding we have seen looks like it).
    clustered_sizes = [label for label in measured if label in SIZES]
    figures["recall_at_10_flat"] = min(
        [measured[s].by_index["faiss_flat"]["recall_at_10"] for s in clustered_sizes]
        + [mlp["recall_at_10_flat"]]
    )
    figures["recall_at_10_ivf"] = min(
        [measured[s].by_index["faiss_ivf"]["recall_at_10"] for s in clustered_sizes]
        + [mlp["recall_at_10_ivf"]]
    )

    if torch.cuda.is_available():
        gpu = gpu_query(torch.device("cuda"))
        figures.update(gpu)
        print(
            f"\nGPU: 64 queries over 1M x 1024 fp16: {gpu['gpu_query_ms_1m_1024']:.3f} ms; "
            f"one read at copy bandwidth ({gpu['gpu_copy_bandwidth_gb_per_s']:.0f} GB/s): "
            f"{gpu['gpu_bandwidth_bound_ms']:.3f} ms ({gpu['gpu_query_over_bound']:.2f}x)"
        )
    else:
        print("\nGPU: no CUDA device here; gpu_* figures not measured")
    try:
        import annoy  # noqa: F401
    except ImportError:
        print("Annoy: not installed; comparison skipped")

    figures["vector_dim"] = DIM
    figures["total_s"] = time.perf_counter() - started
    figures["device"] = _device_name()
    figures["command"] = "python -m benchmarks.index_bench" + (" --quick" if args.quick else "")
    figures["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"\nrecall_at_10_flat = {figures['recall_at_10_flat']:.3f}")
    print(f"recall_at_10_ivf = {figures['recall_at_10_ivf']:.3f}")
    print(f"build_samples_per_s = {figures['build_samples_per_s']:.0f}")
    print(f"wrote {args.out} in {figures['total_s']:.0f} s")
    return figures


def _build_row(name: str, m: dict[str, float]) -> list[str]:
    return [
        name,
        f"{m['parameters']:.0f}",
        f"{m['samples']:.0f}",
        f"{m['dim']:.0f}",
        f"{m['seconds']:.2f}",
        f"{m['samples_per_s']:.0f}",
    ]


if __name__ == "__main__":
    main()
