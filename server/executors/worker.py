"""The body of a Ray embedding actor (kept free of Ray so it can be tested without it).

Each actor builds its embedder once per ``EmbedderSpec`` and keeps the drawn projections
across builds whose checkpoints differ only in their states (a forget changes the last);
it maps the training shard by path, so features never pass through the server.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from expunge.defenses.embeddings import GradientEmbedder
from expunge.server.executors.spec import EmbedderSpec
from expunge.server.state.weights import arrays_from_file


class ShardUnreadable(Exception):
    """The worker cannot read the training shard at the path the server gave."""


class EmbeddingWorker:
    """Embeds row ranges of a stored training shard; one CPU thread, deterministic kernels."""

    def __init__(self) -> None:
        # As the server's configure_torch: the same shard gives the same bytes anywhere.
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True, warn_only=True)
        self._by_projection: dict[str, GradientEmbedder] = {}
        self._current: tuple[str, GradientEmbedder] | None = None
        self._shard: tuple[str, torch.Tensor, torch.Tensor] | None = None

    def pid(self) -> int:
        return os.getpid()

    def embed(
        self,
        spec_box: Sequence[Any],
        digest: str,
        path: str,
        start: int,
        stop: int,
        which: tuple[int, ...] | None,
    ) -> np.ndarray:
        """Rows ``[start, stop)`` of the shard at ``path``: ``(stop - start, width)`` float32.

        ``spec_box``: ``[spec]`` or ``[ObjectRef of spec]`` (boxed so Ray hands the ref
        over unresolved: it is fetched only when ``digest`` is new to this actor).
        """
        embedder = self._embedder(spec_box, digest)
        features, labels = self._rows(path)
        rows = slice(start, stop)
        block = embedder.embed(features[rows], labels[rows], None if which is None else list(which))
        return block.to(torch.float32).numpy()

    def _embedder(self, spec_box: Sequence[Any], digest: str) -> GradientEmbedder:
        if self._current is not None and self._current[0] == digest:
            return self._current[1]
        spec = spec_box[0]
        if not isinstance(spec, EmbedderSpec):
            import ray

            spec = ray.get(spec)
        known = self._by_projection.get(spec.projection_digest)
        if known is None:
            known = spec.build("cpu")
            self._by_projection = {spec.projection_digest: known}  # one model at a time
        embedder = known.with_checkpoints(spec.checkpoints)
        self._current = (digest, embedder)
        return embedder

    def _rows(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._shard is None or self._shard[0] != path:
            try:
                arrays = arrays_from_file(Path(path))
            except FileNotFoundError as exc:
                raise ShardUnreadable(path) from exc
            features = torch.from_numpy(arrays["features"])
            labels = torch.from_numpy(np.asarray(arrays["labels"]))
            self._shard = (path, features, labels)
        return self._shard[1], self._shard[2]
