"""Training embeddings of a model's served version, re-embedding only what changed.

A GAS embedding is one block per checkpoint (DESIGN 4.9), and each block depends on its
checkpoint alone. The index's checkpoints are the training trajectory plus the served
version's weights; a forget changes only the last. So the embeddings of a new version
keep the trajectory blocks of the rows that remain and embed one block, not all: after
a forget on the 50k-image model that is a quarter of the work. A retrain, a rollback to
another trajectory, or a new layer choice embeds everything again. The shards are embedded
by an executor (``expunge.server.executors``): in this process, or on Ray workers that map
the stored shard themselves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch

from expunge.defenses.embeddings import GradientEmbedder
from expunge.server.executors import EmbeddingExecutor, EmbeddingJob, LocalExecutor, StoredShard

Progress = Callable[[float], None]
# Called between shards with "is a caller waiting for this embedding?": background work
# pauses there while foreground work runs (``ForegroundWork.yield_to``).
Pause = Callable[[Callable[[], bool]], object]
STALE = -1  # the version of embeddings whose final block was dropped


class EmbeddingStopped(Exception):
    """The service is stopping: the embedding was abandoned between shards."""


@dataclass(frozen=True)
class EmbeddingKey:
    """What the trajectory blocks depend on besides the samples."""

    trajectory: str  # the checkpoints blob
    param_names: tuple[str, ...] | None
    dim: int


@dataclass(frozen=True)
class TrainingEmbeddings:
    """``vectors`` ``(n, dim)`` of the training samples ``ids`` (``labels``) at ``version``."""

    version: int
    key: EmbeddingKey
    embedder: GradientEmbedder
    vectors: torch.Tensor
    ids: np.ndarray
    labels: np.ndarray


class EmbeddingCache:
    """The latest training embeddings of each model; one computation at a time per model,
    so a scan asking while the background build embeds waits for it and reuses it."""

    def __init__(self, shard_size: int = 512, executor: EmbeddingExecutor | None = None) -> None:
        self.shard_size = shard_size
        self.executor = executor if executor is not None else LocalExecutor()
        self._latest: dict[str, TrainingEmbeddings] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        # Bumped by keep_only, with the ids still trained on: a computation that started
        # before is pruned to them when it ends.
        self._generation: dict[str, int] = {}
        self._allowed: dict[str, np.ndarray] = {}
        # Callers of get() waiting for a model's embedding: a background one never pauses
        # while someone waits for its result.
        self._waiting: dict[str, int] = {}

    def peek(self, model: str) -> TrainingEmbeddings | None:
        with self._guard:
            return self._latest.get(model)

    def put(self, model: str, embeddings: TrainingEmbeddings) -> None:
        with self._guard:
            self._latest[model] = embeddings

    def keep_only(self, model: str, ids: np.ndarray) -> None:
        """A new version is served: drop the rows of samples no longer trained on (a
        forgotten sample's embedding must not outlive the commit) and the stale final
        block; the trajectory blocks of the rest stay for the next re-embed.

        Never waits for an embedding in progress (the forget's worker calls this after
        its commit): one that ends later is pruned the same way before it is kept."""
        with self._guard:
            self._generation[model] = self._generation.get(model, 0) + 1
            self._allowed[model] = ids
            latest = self._latest.get(model)
            if latest is not None:
                self._latest[model] = _pruned(latest, ids)

    def _lock(self, model: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(model, threading.Lock())

    def get(
        self,
        model: str,
        version: int,
        key: EmbeddingKey,
        embedder: GradientEmbedder,
        data: tuple[torch.Tensor, torch.Tensor, np.ndarray],
        progress: Progress | None = None,
        stopping: threading.Event | None = None,
        pause: Pause | None = None,
        stored: StoredShard | None = None,
    ) -> TrainingEmbeddings:
        """Embeddings of ``data`` (features, labels, ids) at ``version``: cached, updated in
        the final block, or embedded whole. ``pause``: a background caller's (see
        ``Pause``); a caller without one counts as waiting for the result. ``stored``: the
        file ``data`` was mapped from, for an executor whose workers map it themselves."""
        with self._waiting_for(model, counts=pause is None), self._lock(model):
            with self._guard:
                started = self._generation.get(model, 0)
            latest = self.peek(model)
            reusable = latest if latest is not None and latest.key == key else None
            if (
                reusable is not None
                and reusable.version == version
                and np.array_equal(reusable.ids, data[2])
            ):
                return reusable
            between = None if pause is None else lambda: pause(lambda: self._someone_waits(model))
            shards = _Shards(self.executor, self.shard_size, stored)
            vectors = _embed(embedder, data, reusable, shards, progress, stopping, between)
            labels = data[1].numpy().copy()
            result = TrainingEmbeddings(version, key, embedder, vectors, data[2].copy(), labels)
            with self._guard:
                changed = self._generation.get(model, 0) != started
                kept = _pruned(result, self._allowed[model]) if changed else result
                self._latest[model] = kept
            return result

    @contextmanager
    def _waiting_for(self, model: str, counts: bool) -> Iterator[None]:
        """Count a caller that waits for ``model``'s embedding (see ``_someone_waits``)."""
        if counts:
            with self._guard:
                self._waiting[model] = self._waiting.get(model, 0) + 1
        try:
            yield
        finally:
            if counts:
                with self._guard:
                    self._waiting[model] -= 1

    def _someone_waits(self, model: str) -> bool:
        with self._guard:
            return self._waiting.get(model, 0) > 0


def _pruned(embeddings: TrainingEmbeddings, ids: np.ndarray) -> TrainingEmbeddings:
    """Only the rows of ``ids``, the final block dropped (its version is no longer served)."""
    keep = np.isin(embeddings.ids, ids)
    vectors = embeddings.vectors[torch.from_numpy(keep)]
    vectors[:, vectors.shape[1] - embeddings.embedder.block_width :] = 0.0
    return replace(
        embeddings,
        version=STALE,
        vectors=vectors,
        ids=embeddings.ids[keep],
        labels=embeddings.labels[keep],
    )


@dataclass(frozen=True)
class _Shards:
    """How ``_embed`` embeds: by whom, in ranges of how many rows, from which file."""

    executor: EmbeddingExecutor
    size: int
    stored: StoredShard | None


def _embed(
    embedder: GradientEmbedder,
    data: tuple[torch.Tensor, torch.Tensor, np.ndarray],
    previous: TrainingEmbeddings | None,
    shards: _Shards,
    progress: Progress | None,
    stopping: threading.Event | None,
    between_shards: Callable[[], object] | None = None,
) -> torch.Tensor:
    features, labels, ids = data
    last = len(embedder.checkpoints) - 1
    rows = _rows_of(previous.ids, ids) if previous is not None else None
    which = (last,) if rows is not None else None
    n = len(ids)
    if rows is not None:
        assert previous is not None
        vectors = previous.vectors[torch.from_numpy(rows)]  # a copy: the old one stays intact
    else:
        vectors = torch.zeros((n, embedder.dim), dtype=torch.float32)
    columns = slice(last * embedder.block_width if which else 0, embedder.dim)

    def before_each() -> None:
        if between_shards is not None:
            between_shards()
        if stopping is not None and stopping.is_set():
            raise EmbeddingStopped

    ranges = [(start, min(start + shards.size, n)) for start in range(0, n, shards.size)]
    job = EmbeddingJob(embedder, features, labels, which, shards.stored)
    done = 0
    for start, stop, block in shards.executor.embed(job, ranges, before_each):
        vectors[start:stop, columns] = block.to(vectors.dtype)
        done += stop - start
        if progress is not None:
            progress(done / n)
    return vectors


def _rows_of(known: np.ndarray, wanted: np.ndarray) -> np.ndarray | None:
    """Positions of ``wanted`` ids in ``known``, or None if any is missing."""
    order = np.argsort(known, kind="stable")
    found = np.searchsorted(known, wanted, sorter=order)
    found = np.clip(found, 0, max(len(known) - 1, 0))
    if len(known) == 0 or not np.array_equal(known[order[found]], wanted):
        return None
    return order[found]
