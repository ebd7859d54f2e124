"""What the index build hands an executor, and what it gets back (issue #21).

The embedding loop (``expunge.server.index.embeddings``) splits a training shard into
row ranges and asks an executor to embed them; the executor yields each range's block as
it completes, in any order. Before it starts each range it calls ``before_each``, where
a background build pauses for a forget or stops, so both hold for every executor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from expunge.defenses.embeddings import GradientEmbedder
from expunge.server.executors.spec import EmbedderSpec


class EmbeddedRows(NamedTuple):
    """The block of rows ``[start, stop)``: ``(stop - start, width)`` float32 on the CPU."""

    start: int
    stop: int
    block: torch.Tensor


@dataclass(frozen=True)
class StoredShard:
    """What a worker in another process needs: the shard's file, mapped there by path (the
    features never pass through this process), and how to rebuild the embedder."""

    path: str
    spec: EmbedderSpec


@dataclass(frozen=True)
class EmbeddingJob:
    """One model's training shard to embed, in the forms the executors use."""

    embedder: GradientEmbedder  # this process's; built from ``stored.spec`` when stored
    features: torch.Tensor  # (n, *input_shape), this process's map of the shard
    labels: torch.Tensor  # (n,)
    which: tuple[int, ...] | None  # checkpoint blocks to embed; None: every one
    stored: StoredShard | None = None  # None: the data lives in this process only


class EmbeddingExecutor(Protocol):
    """Embeds row ranges of a training shard; ``embed`` yields blocks as they complete."""

    def embed(
        self,
        job: EmbeddingJob,
        ranges: Sequence[tuple[int, int]],
        before_each: Callable[[], object],
    ) -> Iterator[EmbeddedRows]:
        """Each range's block, in completion order; ``before_each()`` runs before each
        range starts and may block (a pause) or raise (a stop)."""
        ...

    def prepare(self) -> None:
        """Connect and start the workers now rather than at the first build (a no-op
        where there is nothing to start); raises what the first build would."""
        ...

    def close(self) -> None:
        """Release the workers and whatever this executor started or joined."""
        ...
