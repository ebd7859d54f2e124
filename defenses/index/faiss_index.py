"""FAISS inner-product indexes: exact flat, or IVF for large n (never HNSW: it cannot delete).

faiss is optional and heavy, so it is imported on first use only.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .base import _Bookkeeping, _read_document
from .cost import IndexKind, _default_nlist
from .protocol import (
    ArrayLike,
    IndexMetadata,
    SearchMode,
    SearchResult,
    _check_search,
    _empty_result,
    _padding,
    _vectors_array,
)

# Above this many vectors an exact scan costs seconds per query batch on a CPU
# (200k x 1280 float32 is 1 GB to read), so IVF is recommended.
IVF_THRESHOLD = 200_000

_FAISS_HINT = (
    "FaissIndex needs the faiss package: `pip install 'expunge[server]'` (faiss-cpu) or, "
    "with CUDA, `pip install 'expunge[gpu]'` (faiss-gpu); ExactTorchIndex and "
    "TorchDeviceIndex work without it"
)


def _import_faiss() -> Any:
    try:
        # Imported on first use: faiss is an optional, heavy dependency.
        import faiss
    except ImportError as exc:
        raise ImportError(_FAISS_HINT) from exc
    return faiss


def recommended_faiss_kind(n: int) -> Literal["flat", "ivf"]:
    """Exact flat search up to ``IVF_THRESHOLD`` vectors, IVF above."""
    return "flat" if n <= IVF_THRESHOLD else "ivf"


def _default_nprobe(nlist: int) -> int:
    # About 1/16 of the lists: recall@10 >= 0.95 on clustered data in the tests and
    # benchmark, at a sixteenth of a flat scan's reads.
    return max(1, math.ceil(nlist / 16))


@dataclass(frozen=True)
class FaissConfig:
    """FAISS index choice; ``nlist``/``nprobe`` matter for IVF only."""

    kind: Literal["flat", "ivf"] = field(
        default="flat", metadata={"help": "flat (exact, IndexFlatIP) or ivf (IndexIVFFlat)"}
    )
    nlist: int | None = field(
        default=None, metadata={"help": "IVF lists; None: sqrt(n) of the training batch"}
    )
    nprobe: int | None = field(
        default=None, metadata={"help": "IVF lists visited per query; None: ceil(nlist / 16)"}
    )
    max_points_per_centroid: int = field(
        default=64, metadata={"help": "k-means training sample per list (FAISS default 256)"}
    )
    seed: int = field(default=0, metadata={"help": "k-means seed"})
    use_gpu: bool | None = field(
        default=None, metadata={"help": "GPU replica for search; None: when faiss-gpu sees a GPU"}
    )

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivf"):
            raise ValueError(f"faiss kind must be 'flat' or 'ivf' (never HNSW), got {self.kind!r}")
        if (self.nlist is not None and self.nlist < 1) or (
            self.nprobe is not None and self.nprobe < 1
        ):
            raise ValueError("nlist and nprobe must be positive")


class FaissIndex(_Bookkeeping):
    """FAISS inner-product index: exact flat by default, IVF for large n.

    Flat: ``IndexIDMap2(IndexFlatIP)``. IVF: ``IndexIVFFlat`` (inner product) holding the
    ids itself (``IndexIDMap`` over IVF would mis-map ids after ``remove_ids``, which
    does not renumber IVF entries); trained at the first ``add`` (or ``train``) on that
    data. Label filters pass an ``IDSelectorBatch`` of the label's ids, so filtered flat
    search stays exact. Opponents are the proponents of the negated query.
    """

    def __init__(
        self,
        dim: int,
        config: FaissConfig | None = None,
        *,
        metadata: IndexMetadata | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        super().__init__(dim, metadata, memory_budget_bytes)
        self.config = config if config is not None else FaissConfig()
        self.index_: Any = None
        self.nlist_: int | None = None
        self._gpu_index: Any = None
        self._gpu_stale = True

    def _cost_kind(self) -> IndexKind:
        return self.config.kind

    @property
    def nprobe(self) -> int:
        """Lists visited per IVF query (1 for flat)."""
        if self.nlist_ is None:
            return 1
        return (
            self.config.nprobe if self.config.nprobe is not None else _default_nprobe(self.nlist_)
        )

    @property
    def is_trained(self) -> bool:
        return self.index_ is not None

    def train(self, vectors: ArrayLike) -> None:
        """Create the FAISS index; for IVF, run k-means on vectors ``(n, dim)`` first."""
        if self.index_ is not None:
            raise ValueError("the index is already trained")
        faiss = _import_faiss()
        data = _vectors_array(vectors, self._dim)
        if self.config.kind == "flat":
            self.index_ = faiss.IndexIDMap2(faiss.IndexFlatIP(self._dim))
            return
        nlist = self.config.nlist if self.config.nlist is not None else _default_nlist(len(data))
        if len(data) < nlist:
            raise ValueError(f"IVF with {nlist} lists needs at least {nlist} training vectors")
        quantizer = faiss.IndexFlatIP(self._dim)
        ivf = faiss.IndexIVFFlat(quantizer, self._dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = self.config.seed
        ivf.cp.max_points_per_centroid = self.config.max_points_per_centroid
        ivf.train(data)
        ivf.nprobe = (
            self.config.nprobe if self.config.nprobe is not None else _default_nprobe(nlist)
        )
        self.index_, self.nlist_ = ivf, nlist
        self._quantizer = quantizer  # the IVF index refers to it; keep it alive

    def add(self, ids: ArrayLike, vectors: ArrayLike, labels: ArrayLike | None = None) -> None:
        """Add vectors ``(n, dim)`` under new ids ``(n,)``; an untrained IVF trains on them."""
        vec_array = _vectors_array(vectors, self._dim)
        id_array, label_array = self._validate(ids, vec_array.shape[0], labels)
        if id_array.size:
            if self.index_ is None:
                self.train(vec_array)
            self.index_.add_with_ids(vec_array, id_array)
            self._gpu_stale = True
        self._commit(id_array, label_array)

    def remove(self, ids: ArrayLike) -> int:
        """Remove ids ``(m,)`` with ``remove_ids``; returns how many were present."""
        present = self._forget(ids)
        if present.size and self.index_ is not None:
            faiss = _import_faiss()
            removed = int(self.index_.remove_ids(faiss.IDSelectorBatch(present)))
            if removed != present.size:
                raise RuntimeError(f"faiss removed {removed} of {present.size} ids")
            self._gpu_stale = True
        return int(present.size)

    def search(
        self, queries: ArrayLike, k: int, mode: SearchMode = "proponents", label: int | None = None
    ) -> SearchResult:
        """Top ``k`` inner products of queries ``(q, dim)``: ids and scores ``(q, k)``."""
        _check_search(k, mode)
        q = _vectors_array(queries, self._dim, "queries")
        if mode == "opponents":
            q = -q
        selected = self._ids_of_label(label) if label is not None else None
        if self.index_ is None or not len(self) or (selected is not None and not selected.size):
            return _empty_result(q.shape[0], k, mode)
        if selected is None:
            distances, labels = self._searcher().search(q, k)
        else:
            faiss = _import_faiss()
            selector = faiss.IDSelectorBatch(selected)
            if self.config.kind == "ivf":
                params = faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe)
            else:
                params = faiss.SearchParameters(sel=selector)
            distances, labels = self.index_.search(q, k, params=params)
        ids = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        scores = torch.from_numpy(np.ascontiguousarray(distances, dtype=np.float32))
        if mode == "opponents":
            scores = -scores
        scores[ids < 0] = _padding(mode)
        return SearchResult(ids, scores)

    def stored_vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """A labelled flat index's ids ``(n,)``, vectors ``(n, dim)`` and labels ``(n,)`` as
        stored; None for IVF (its lists hold no order to read back cheaply)."""
        if self.config.kind != "flat" or self._labels is None or self.index_ is None:
            return None
        faiss = _import_faiss()
        ids = faiss.vector_to_array(self.index_.id_map).astype(np.int64)
        if not np.array_equal(ids, self._ids):  # flat removal keeps order; check, not assume
            return None
        vectors = self.index_.index.reconstruct_n(0, self.index_.index.ntotal)
        return ids, np.asarray(vectors, dtype=np.float32), self._labels.copy()

    def _searcher(self) -> Any:
        """The GPU replica when configured and available, else the CPU index."""
        if not self._use_gpu():
            return self.index_
        if self._gpu_stale:
            faiss = _import_faiss()
            if not hasattr(self, "_gpu_resources"):
                self._gpu_resources = faiss.StandardGpuResources()
            # A replica for search only: the CPU index stays the source of truth for
            # remove_ids, selectors and save, which GPU indexes do not all support.
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index_)
            self._gpu_stale = False
        return self._gpu_index

    def _use_gpu(self) -> bool:
        if self.config.use_gpu is False:
            return False
        faiss = _import_faiss()
        available = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if self.config.use_gpu and not available:
            raise RuntimeError(
                "use_gpu=True but faiss has no GPU support or sees no GPU: install "
                "'expunge[gpu]' (faiss-gpu) on a CUDA machine, or set use_gpu=None"
            )
        return available

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the FAISS index (``faiss.index``), ids, labels and ``index.json`` into ``path``."""
        target = Path(path)
        config = {**asdict(self.config), "nlist_": self.nlist_}
        self._write_meta(target, config)
        if self.index_ is not None:
            _import_faiss().write_index(self.index_, str(target / "faiss.index"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FaissIndex:
        """Read an index written by ``save``."""
        document = _read_document(path, cls._saved_type())
        stored = dict(document["config"])
        nlist = stored.pop("nlist_", None)
        index = cls(
            document["metadata"]["dim"],
            FaissConfig(**stored),
            metadata=IndexMetadata.from_dict(document["metadata"]),
        )
        index._read_bookkeeping(Path(path), document)
        file = Path(path) / "faiss.index"
        if file.exists():
            faiss = _import_faiss()
            index.index_ = faiss.read_index(str(file))
            index.nlist_ = nlist
        return index
