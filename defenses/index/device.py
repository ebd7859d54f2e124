"""Chunked matrix product + top-k on a torch device: the GPU path, which runs on the CPU too.

fp16 or bf16 storage halves the bytes read per query, which is what bounds the search
on a GPU.
"""

from __future__ import annotations

import math
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
    _vectors_tensor,
)

# Score-matrix elements computed per chunk: (queries x rows). 2^24 fp16 scores are 32 MiB,
# small next to the rows read for them (1024 dims each) and large enough that launches
# do not dominate.
_CHUNK_SCORES = 1 << 24
# Queries scored together; more would only shrink the row chunks.
_QUERY_BLOCK = 1024


class TorchDeviceIndex(_Bookkeeping):
    """Chunked ``queries @ vectors.T`` + top-k on a torch device (CUDA; CPU works too).

    Vectors live in one preallocated ``(capacity, dim)`` tensor in ``dtype`` (float32,
    float16 or bfloat16); removal moves tail rows into the holes, so it copies only as
    many rows as are removed. With half-precision storage the final ``k`` candidates are
    rescored in float32 from the stored rows, so the scores are exact for the stored
    vectors and only the choice of candidates can differ from float32 search.
    """

    def __init__(
        self,
        dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        metadata: IndexMetadata | None = None,
        memory_budget_bytes: int | None = None,
        chunk_scores: int = _CHUNK_SCORES,
    ) -> None:
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        super().__init__(dim, metadata, memory_budget_bytes)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = dtype
        self.chunk_scores = chunk_scores
        self._count = 0
        self._vectors = torch.zeros((0, dim), dtype=dtype, device=self.device)
        self._row_ids = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._row_labels: torch.Tensor | None = None

    @classmethod
    def _saved_type(cls) -> str:
        # index.json keeps the name this class had before it was renamed, so indexes
        # saved before the rename still load and the ones saved now load in older code.
        return "TorchCudaIndex" if cls is TorchDeviceIndex else cls.__name__

    def _storage_dtype(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def add(self, ids: ArrayLike, vectors: ArrayLike, labels: ArrayLike | None = None) -> None:
        """Add vectors ``(n, dim)`` under new ids ``(n,)`` (labels ``(n,)`` optional)."""
        rows_in = _vectors_tensor(vectors, self._dim, self.device, self.dtype)
        id_array, label_array = self._validate(ids, rows_in.shape[0], labels)
        n = id_array.shape[0]
        if n:
            self._reserve(self._count + n, label_array is not None)
            rows = slice(self._count, self._count + n)
            self._vectors[rows] = rows_in
            self._row_ids[rows] = torch.from_numpy(id_array).to(self.device)
            if label_array is not None and self._row_labels is not None:
                self._row_labels[rows] = torch.from_numpy(label_array).to(self.device)
            self._count += n
        self._commit(id_array, label_array)

    def _cost_kind(self) -> IndexKind:
        return "torch"

    def _reserve(self, needed: int, labelled: bool) -> None:
        capacity = self._vectors.shape[0]
        if needed <= capacity:
            return
        # Geometric growth: n single adds cost O(n) copies in all.
        capacity = max(needed, capacity + capacity // 2, 1024)
        vectors = torch.empty((capacity, self._dim), dtype=self.dtype, device=self.device)
        vectors[: self._count] = self._vectors[: self._count]
        row_ids = torch.empty(capacity, dtype=torch.int64, device=self.device)
        row_ids[: self._count] = self._row_ids[: self._count]
        self._vectors, self._row_ids = vectors, row_ids
        if labelled:
            row_labels = torch.empty(capacity, dtype=torch.int64, device=self.device)
            if self._row_labels is not None:
                row_labels[: self._count] = self._row_labels[: self._count]
            self._row_labels = row_labels

    def remove(self, ids: ArrayLike) -> int:
        """Remove ids ``(m,)``; returns how many were present."""
        present = self._forget(ids)
        if not present.size:
            return 0
        count = self._count
        gone = torch.isin(self._row_ids[:count], torch.from_numpy(present).to(self.device))
        kept = count - int(present.size)
        holes = torch.nonzero(gone[:kept]).squeeze(1)
        movers = torch.nonzero(~gone[kept:]).squeeze(1) + kept
        self._vectors[holes] = self._vectors[movers]
        self._row_ids[holes] = self._row_ids[movers]
        if self._row_labels is not None:
            self._row_labels[holes] = self._row_labels[movers]
        self._count = kept
        return int(present.size)

    def search(
        self, queries: ArrayLike, k: int, mode: SearchMode = "proponents", label: int | None = None
    ) -> SearchResult:
        """Top ``k`` inner products of queries ``(q, dim)``: ids and scores ``(q, k)`` on CPU."""
        _check_search(k, mode)
        q32 = _vectors_tensor(queries, self._dim, self.device, torch.float32, "queries")
        if mode == "opponents":
            q32 = -q32
        qn = q32.shape[0]
        if label is not None:
            self._ids_of_label(label)  # raises when the index has no labels
            assert self._row_labels is not None
            valid = int((self._row_labels[: self._count] == label).sum())
        else:
            valid = self._count
        found = min(k, valid)
        if not found or not qn:
            return _empty_result(qn, k, mode)
        rows_parts, scores_parts = [], []
        for start in range(0, qn, _QUERY_BLOCK):
            rows, scores32 = self._search_block(q32[start : start + _QUERY_BLOCK], found, label)
            rows_parts.append(rows)
            scores_parts.append(scores32)
        rows, scores32 = torch.cat(rows_parts), torch.cat(scores_parts)
        result = _empty_result(qn, k, mode)
        result.ids[:, :found] = self._row_ids[rows].cpu()
        result.scores[:, :found] = (-scores32 if mode == "opponents" else scores32).cpu()
        return result

    def _search_block(
        self, q32: torch.Tensor, found: int, label: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``(q, found)`` of the best stored vectors for queries ``(q, dim)`` float32,
        with their float32 scores ``(q, found)``, best first."""
        # CPU matrix products in half precision are slow and not always implemented:
        # there the stored rows are widened chunk by chunk instead.
        compute = self.dtype if self.device.type == "cuda" else torch.float32
        q = q32.to(compute)
        rows_per_chunk = max(found, self.chunk_scores // q.shape[0])
        best_scores: torch.Tensor | None = None
        best_rows: torch.Tensor | None = None
        for start in range(0, self._count, rows_per_chunk):
            stop = min(start + rows_per_chunk, self._count)
            scores = q @ self._vectors[start:stop].to(compute).T
            if label is not None and self._row_labels is not None:
                scores.masked_fill_(self._row_labels[start:stop] != label, -math.inf)
            top, where = scores.topk(min(found, stop - start), dim=1)
            where += start
            if best_scores is not None and best_rows is not None:
                # A running top-k: memory stays (q, 2 * found) however many chunks.
                top = torch.cat([best_scores, top], dim=1)
                where = torch.cat([best_rows, where], dim=1)
                top, pick = top.topk(found, dim=1)
                where = where.gather(1, pick)
            best_scores, best_rows = top, where
        assert best_scores is not None and best_rows is not None
        rows, scores32 = best_rows, best_scores.float()
        if self.dtype != torch.float32:
            # Exact float32 scores of the stored rows, then the order they imply.
            stored = self._vectors[rows].float()  # (q, found, dim)
            scores32 = torch.einsum("qkd,qd->qk", stored, q32)
            scores32, order = scores32.sort(dim=1, descending=True)
            rows = rows.gather(1, order)
        return rows, scores32

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ids, labels, vectors (``.npy``; bfloat16 as its int16 bits) and ``index.json``."""
        target = Path(path)
        dtype = self._storage_dtype()
        self._write_meta(target, {"dtype": dtype})
        # Rows in id-bookkeeping order, so loading needs no second permutation.
        order = self._row_order()
        vectors = self._vectors[order].cpu()
        array = vectors.view(torch.int16).numpy() if dtype == "bfloat16" else vectors.numpy()
        np.save(target / "vectors.npy", array, allow_pickle=False)

    def _row_order(self) -> torch.Tensor:
        """Row of each id in ``self._ids`` order."""
        row_ids = self._row_ids[: self._count].cpu()
        by_id = torch.argsort(row_ids)
        position = torch.searchsorted(row_ids[by_id], torch.from_numpy(self._ids))
        return by_id[position].to(self.device)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: torch.device | str | None = None
    ) -> TorchDeviceIndex:
        """Read an index written by ``save`` onto ``device`` (default: CUDA if present)."""
        document = _read_document(path, cls._saved_type())
        dtype = getattr(torch, document["config"]["dtype"])
        index = cls(
            document["metadata"]["dim"],
            device=device,
            dtype=dtype,
            metadata=IndexMetadata.from_dict(document["metadata"]),
        )
        index._read_bookkeeping(Path(path), document)
        array = torch.from_numpy(np.load(Path(path) / "vectors.npy", allow_pickle=False))
        vectors = array.view(torch.bfloat16) if dtype == torch.bfloat16 else array
        n = vectors.shape[0]
        index._reserve(n, index._labels is not None)
        index._vectors[:n] = vectors.to(index.device)
        index._row_ids[:n] = torch.from_numpy(index._ids).to(index.device)
        if index._labels is not None and index._row_labels is not None:
            index._row_labels[:n] = torch.from_numpy(index._labels).to(index.device)
        index._count = n
        return index
