"""Brute-force search in torch on the CPU: the exact oracle the other indexes are tested against."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .base import _Bookkeeping, _read_document
from .cost import IndexKind
from .protocol import (
    ArrayLike,
    IndexMetadata,
    SearchMode,
    SearchResult,
    _check_search,
    _empty_result,
    _ids_array,
    _vectors_array,
)


class ExactTorchIndex(_Bookkeeping):
    """Brute-force search in torch on the CPU: every score computed, exact top-k."""

    def __init__(
        self,
        dim: int,
        *,
        metadata: IndexMetadata | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        super().__init__(dim, metadata, memory_budget_bytes)
        self._vectors = torch.zeros((0, dim), dtype=torch.float32)

    def add(self, ids: ArrayLike, vectors: ArrayLike, labels: ArrayLike | None = None) -> None:
        """Add vectors ``(n, dim)`` under new ids ``(n,)`` (labels ``(n,)`` optional)."""
        vec_array = _vectors_array(vectors, self._dim)
        id_array, label_array = self._validate(ids, vec_array.shape[0], labels)
        self._vectors = torch.cat([self._vectors, torch.from_numpy(vec_array.copy())])
        self._commit(id_array, label_array)

    def _cost_kind(self) -> IndexKind:
        return "exact"

    def remove(self, ids: ArrayLike) -> int:
        """Remove ids ``(m,)``; returns how many were present."""
        keep = torch.from_numpy(~np.isin(self._ids, _ids_array(ids)))
        removed = self._forget(ids)
        self._vectors = self._vectors[keep]
        return int(removed.shape[0])

    def search(
        self, queries: ArrayLike, k: int, mode: SearchMode = "proponents", label: int | None = None
    ) -> SearchResult:
        """Top ``k`` inner products of queries ``(q, dim)``: ids and scores ``(q, k)``."""
        _check_search(k, mode)
        q = torch.from_numpy(_vectors_array(queries, self._dim, "queries"))
        ids, vectors = torch.from_numpy(self._ids), self._vectors
        if label is not None:
            self._ids_of_label(label)  # raises when the index has no labels
            assert self._labels is not None
            mask = torch.from_numpy(self._labels == label)
            ids, vectors = ids[mask], vectors[mask]
        result = _empty_result(q.shape[0], k, mode)
        found = min(k, ids.shape[0])
        if found:
            scores = q @ vectors.T
            top, where = scores.topk(found, dim=1, largest=mode == "proponents")
            result.ids[:, :found] = ids[where]
            result.scores[:, :found] = top
        return result

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ids, labels, vectors (``.npy``) and ``index.json`` into directory ``path``."""
        target = Path(path)
        self._write_meta(target, {})
        np.save(target / "vectors.npy", self._vectors.numpy(), allow_pickle=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExactTorchIndex:
        """Read an index written by ``save``."""
        document = _read_document(path, cls._saved_type())
        index = cls(
            document["metadata"]["dim"], metadata=IndexMetadata.from_dict(document["metadata"])
        )
        index._read_bookkeeping(Path(path), document)
        index._vectors = torch.from_numpy(np.load(Path(path) / "vectors.npy", allow_pickle=False))
        return index
