"""Memory and build-time model of the indexes, and the budget check made before an add."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

IndexKind = Literal["exact", "flat", "ivf", "torch"]


class IndexBudgetError(ValueError):
    """An index build or add would exceed the memory budget it was given."""


class IndexCost(NamedTuple):
    """Estimated resident memory of an index and the time to build it from embeddings."""

    memory_bytes: int
    build_seconds_estimate: float


# FaissIndex's default IVF list count; here so the estimate sizes the lists it would build.
def _default_nlist(n: int) -> int:
    return max(1, round(math.sqrt(n)))


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Nominal rates for the build-time estimate, measured on the 2-core development machine
# (faiss-cpu 1.15); an order of magnitude, not a promise.
_COPY_BYTES_PER_S = 2e9
_KMEANS_FLOPS_PER_S = 3e10


def estimate_index_cost(
    n: int, dim: int, kind: IndexKind, dtype: str = "float32", nlist: int | None = None
) -> IndexCost:
    """Resident bytes and rough build seconds of an index of ``n`` vectors of ``dim``.

    Counts the vectors, the ids and labels of the bookkeeping (16 bytes), FAISS's id
    maps (``IndexIDMap2``: 8 bytes per id plus a hash map entry, ~40 bytes) or IVF's
    per-entry id (8 bytes) and centroids. The build estimate covers adding prepared
    embeddings (and IVF's k-means and list assignment), not computing them.
    """
    if n < 0 or dim < 1:
        raise ValueError("need n >= 0 and dim >= 1")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)}, got {dtype!r}")
    if kind in ("flat", "ivf") and dtype != "float32":
        raise ValueError("FAISS flat and IVF indexes store float32")
    vector_bytes = n * dim * _DTYPE_BYTES[dtype]
    bookkeeping = 16 * n
    seconds = vector_bytes / _COPY_BYTES_PER_S
    if kind == "flat":
        memory = vector_bytes + bookkeeping + 48 * n
    elif kind == "ivf":
        lists = nlist if nlist is not None else _default_nlist(n)
        memory = vector_bytes + bookkeeping + 8 * n + lists * dim * 4
        train_points = min(n, 64 * lists)
        # k-means: ~10 iterations of a (train x lists) product; then every vector assigned.
        flops = 2.0 * dim * lists * (10 * train_points + n)
        seconds += flops / _KMEANS_FLOPS_PER_S
    elif kind in ("exact", "torch"):
        memory = vector_bytes + bookkeeping + 8 * n
    else:
        raise ValueError(f"kind must be exact, flat, ivf or torch, got {kind!r}")
    return IndexCost(int(memory), float(seconds))


def check_index_fits(
    n: int, dim: int, kind: IndexKind, dtype: str, memory_budget_bytes: int
) -> IndexCost:
    """The cost of the index, or ``IndexBudgetError`` when it exceeds the budget."""
    cost = estimate_index_cost(n, dim, kind, dtype)
    if cost.memory_bytes > memory_budget_bytes:
        raise IndexBudgetError(
            f"a {kind} index of {n:,} x {dim} {dtype} vectors needs about "
            f"{cost.memory_bytes / 2**30:.2f} GiB, over the budget of "
            f"{memory_budget_bytes / 2**30:.2f} GiB: lower the projection dimension, "
            f"store float16 (TorchDeviceIndex), shard the index, or raise the budget"
        )
    return cost
