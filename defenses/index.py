"""Maximum-inner-product indexes of gradient embeddings (DESIGN 4.9).

Every index answers through ``GradientIndex``: ``add`` vectors under int64 ids (with
optional class labels), ``remove`` ids, ``search`` for the ``k`` largest inner products
(*proponents*) or the ``k`` smallest (*opponents*), optionally among the samples of one
label, and ``save``/``load`` to a directory with the metadata that says which
embeddings the vectors are (JSON, arrays as ``.npy`` read with ``allow_pickle=False``,
FAISS indexes in FAISS's own format; never pickle).

Implementations, which return the same results (ties aside):

- ``ExactTorchIndex``: brute force in torch on the CPU; the oracle of the tests.
- ``FaissIndex``: ``IndexIDMap2(IndexFlatIP)`` (exact) or ``IndexIVFFlat`` with inner
  product (approximate, for large n; its coarse quantiser is trained on the data).
  Deletion uses ``remove_ids``; HNSW is never used because it cannot delete. Uses a
  GPU replica for unfiltered searches when FAISS has GPU support and a GPU is present.
- ``TorchCudaIndex``: chunked matrix product + top-k on a torch device, with fp16 or
  bf16 storage as an option (half the bytes to read per query on a GPU, where the
  search is bound by memory bandwidth). It runs on the CPU too.

Result conventions: scores are always the inner product itself (opponents come most
negative first); where fewer than ``k`` vectors qualify, ids are ``-1`` and scores are
the worst possible value for the mode (``-inf`` for proponents, ``+inf`` for
opponents), so results of several shards merge with one top-k (``merge_results``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "ExactTorchIndex",
    "FaissIndex",
    "GradientIndex",
    "IndexBudgetError",
    "IndexCost",
    "IndexMetadata",
    "SearchMode",
    "SearchResult",
    "TorchCudaIndex",
    "check_index_fits",
    "estimate_index_cost",
    "load_index",
    "merge_results",
    "recall_at_k",
    "recommended_faiss_kind",
]

SearchMode = Literal["proponents", "opponents"]
IndexKind = Literal["exact", "flat", "ivf", "torch"]
ArrayLike = torch.Tensor | np.ndarray

FORMAT = "expunge-gradient-index"
FORMAT_VERSION = 1
_META_FILE = "index.json"

# Above this many vectors an exact scan costs seconds per query batch on a CPU
# (200k x 1280 float32 is 1 GB to read), so IVF is recommended.
IVF_THRESHOLD = 200_000

_FAISS_HINT = (
    "FaissIndex needs the faiss package: `pip install 'expunge[server]'` (faiss-cpu) or, "
    "with CUDA, `pip install 'expunge[gpu]'` (faiss-gpu); ExactTorchIndex and "
    "TorchCudaIndex work without it"
)


class IndexBudgetError(ValueError):
    """An index build or add would exceed the memory budget it was given."""


class SearchResult(NamedTuple):
    """Results of ``q`` queries: ids ``(q, k)`` int64 (-1 padding), scores ``(q, k)`` float32."""

    ids: torch.Tensor
    scores: torch.Tensor


@dataclass(frozen=True)
class IndexMetadata:
    """Which embeddings an index holds: a query must be embedded the same way."""

    dim: int = field(metadata={"help": "length of every vector"})
    embedding_kind: str = field(default="gas", metadata={"help": "gas, tracincp or lgas"})
    projection_kind: str = field(default="rademacher", metadata={"help": "rademacher/gaussian"})
    projection_seed: int = field(default=0, metadata={"help": "seed of the projections"})
    projection_dim: int = field(default=0, metadata={"help": "k per checkpoint (per layer)"})
    checkpoints: int = field(default=0, metadata={"help": "number of checkpoints T"})
    model_version: str = field(default="", metadata={"help": "model version embedded"})

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError("dim must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexMetadata:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class IndexCost(NamedTuple):
    """Estimated resident memory of an index and the time to build it from embeddings."""

    memory_bytes: int
    build_seconds_estimate: float


@runtime_checkable
class GradientIndex(Protocol):
    """A deletable maximum-inner-product index of embeddings under int64 ids."""

    @property
    def dim(self) -> int: ...

    @property
    def metadata(self) -> IndexMetadata: ...

    def add(self, ids: ArrayLike, vectors: ArrayLike, labels: ArrayLike | None = None) -> None:
        """Add vectors ``(n, dim)`` under new ids ``(n,)``, with labels ``(n,)`` if any."""
        ...

    def remove(self, ids: ArrayLike) -> int:
        """Remove these ids ``(m,)``; returns how many were present."""
        ...

    def search(
        self, queries: ArrayLike, k: int, mode: SearchMode = "proponents", label: int | None = None
    ) -> SearchResult:
        """Top ``k`` of queries ``(q, dim)`` by inner product, among samples of ``label``."""
        ...

    def __len__(self) -> int: ...

    def ids(self) -> torch.Tensor:
        """Ids present, ``(len,)`` int64."""
        ...

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index and its metadata into directory ``path`` (created if needed)."""
        ...

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """Read an index written by ``save``."""
        ...


# --- shared checks and conversions ------------------------------------------------


def _ids_array(ids: ArrayLike) -> np.ndarray:
    array = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"ids must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"ids must be integers, got {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and array.min() < 0:
        raise ValueError("ids must be non-negative (-1 marks padding in results)")
    return array


def _vectors_array(vectors: ArrayLike, dim: int, name: str = "vectors") -> np.ndarray:
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().to("cpu", torch.float32).numpy()
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return array


def _vectors_tensor(
    vectors: ArrayLike, dim: int, device: torch.device, dtype: torch.dtype, name: str = "vectors"
) -> torch.Tensor:
    """Like ``_vectors_array`` but stays in torch: a CUDA tensor is checked where it lies,
    never copied through host memory."""
    tensor = vectors if isinstance(vectors, torch.Tensor) else torch.from_numpy(np.asarray(vectors))
    if tensor.ndim != 2 or tensor.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}), got {tuple(tensor.shape)}")
    tensor = tensor.detach().to(device=device)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contain NaN or infinite values")
    return tensor.to(dtype)


def _labels_array(labels: ArrayLike | None, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    array = _ids_array(labels) if n else np.zeros(0, dtype=np.int64)
    if array.shape[0] != n:
        raise ValueError(f"{n} vectors but {array.shape[0]} labels")
    return array


def _padding(mode: SearchMode) -> float:
    return -math.inf if mode == "proponents" else math.inf


def _check_search(k: int, mode: str) -> None:
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    if mode not in ("proponents", "opponents"):
        raise ValueError(f"mode must be 'proponents' or 'opponents', got {mode!r}")


def _empty_result(q: int, k: int, mode: SearchMode) -> SearchResult:
    return SearchResult(
        torch.full((q, k), -1, dtype=torch.int64),
        torch.full((q, k), _padding(mode), dtype=torch.float32),
    )


class _Bookkeeping:
    """Ids and labels in insertion order, the rules every index shares, and the JSON file.

    Kept apart from the vectors because FAISS's IVF lists cannot be enumerated cheaply
    and a label filter needs the ids of a label.
    """

    def __init__(
        self, dim: int, metadata: IndexMetadata | None, memory_budget_bytes: int | None
    ) -> None:
        if dim < 1:
            raise ValueError("dim must be positive")
        if metadata is not None and metadata.dim != dim:
            raise ValueError(f"metadata.dim={metadata.dim} but the index has dim={dim}")
        self._dim = dim
        self._metadata = metadata if metadata is not None else IndexMetadata(dim=dim)
        self.memory_budget_bytes = memory_budget_bytes
        self._ids = np.zeros(0, dtype=np.int64)
        self._labels: np.ndarray | None = None
        self._labelled: bool | None = None  # fixed by the first add

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def metadata(self) -> IndexMetadata:
        return self._metadata

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    def ids(self) -> torch.Tensor:
        return torch.from_numpy(self._ids.copy())

    def _storage_dtype(self) -> str:
        return "float32"

    def _cost_kind(self) -> IndexKind:
        raise NotImplementedError

    def _validate(
        self, ids: ArrayLike, num_vectors: int, labels: ArrayLike | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Check an add of ``num_vectors`` against the rules and the budget; ids, labels."""
        id_array = _ids_array(ids)
        if num_vectors != id_array.shape[0]:
            raise ValueError(f"{id_array.shape[0]} ids but {num_vectors} vectors")
        label_array = _labels_array(labels, id_array.shape[0])
        if self._labelled is not None and self._labelled != (label_array is not None):
            state = "with" if self._labelled else "without"
            raise ValueError(f"this index was built {state} labels; every add must be the same")
        if np.unique(id_array).shape[0] != id_array.shape[0]:
            raise ValueError("ids repeat within the batch")
        clash = id_array[np.isin(id_array, self._ids)]
        if clash.size:
            raise ValueError(f"ids already in the index: {clash[:10].tolist()}; remove them first")
        if self.memory_budget_bytes is not None:
            check_index_fits(
                len(self) + id_array.shape[0],
                self._dim,
                self._cost_kind(),
                self._storage_dtype(),
                self.memory_budget_bytes,
            )
        return id_array, label_array

    def _commit(self, id_array: np.ndarray, label_array: np.ndarray | None) -> None:
        """Record ids and labels once their vectors are stored."""
        self._labelled = label_array is not None
        self._ids = np.concatenate([self._ids, id_array])
        if label_array is not None:
            base = self._labels if self._labels is not None else np.zeros(0, np.int64)
            self._labels = np.concatenate([base, label_array])

    def _forget(self, ids: ArrayLike) -> np.ndarray:
        """Drop ids from the bookkeeping; returns those that were present."""
        gone = np.isin(self._ids, _ids_array(ids))
        present = self._ids[gone]
        self._ids = self._ids[~gone]
        if self._labels is not None:
            self._labels = self._labels[~gone]
        return present

    def _ids_of_label(self, label: int) -> np.ndarray:
        if not self._labelled or self._labels is None:
            raise ValueError("a label filter needs an index built with labels")
        return self._ids[self._labels == label]

    def _write_meta(self, path: Path, config: dict[str, Any]) -> None:
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "ids.npy", self._ids, allow_pickle=False)
        if self._labels is not None:
            np.save(path / "labels.npy", self._labels, allow_pickle=False)
        document = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "index_type": type(self).__name__,
            "count": len(self),
            "labelled": self._labelled,
            "metadata": self._metadata.to_dict(),
            "config": config,
        }
        (path / _META_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))

    def _read_bookkeeping(self, path: Path, document: dict[str, Any]) -> None:
        self._ids = np.load(path / "ids.npy", allow_pickle=False).astype(np.int64)
        self._labelled = document["labelled"]
        if (path / "labels.npy").exists():
            self._labels = np.load(path / "labels.npy", allow_pickle=False).astype(np.int64)


def _read_document(path: str | os.PathLike[str], expected: str | None) -> dict[str, Any]:
    meta = Path(path) / _META_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"no {_META_FILE} in {path}: not a saved gradient index")
    document: dict[str, Any] = json.loads(meta.read_text())
    if document.get("format") != FORMAT or document.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta} is not a {FORMAT} version {FORMAT_VERSION} file "
            f"(format={document.get('format')!r}, version={document.get('version')!r})"
        )
    if expected is not None and document["index_type"] != expected:
        raise ValueError(
            f"{path} holds a {document['index_type']}, not a {expected}; use load_index()"
        )
    return document


def load_index(path: str | os.PathLike[str]) -> GradientIndex:
    """Load whichever index ``save`` wrote into directory ``path``."""
    document = _read_document(path, None)
    classes: dict[str, type[Any]] = {
        cls.__name__: cls for cls in (ExactTorchIndex, FaissIndex, TorchCudaIndex)
    }
    cls = classes.get(document["index_type"])
    if cls is None:
        raise ValueError(f"unknown index type {document['index_type']!r} in {path}")
    index: GradientIndex = cls.load(path)
    return index


# --- exact brute force (the oracle) ------------------------------------------------


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
        document = _read_document(path, cls.__name__)
        index = cls(
            document["metadata"]["dim"], metadata=IndexMetadata.from_dict(document["metadata"])
        )
        index._read_bookkeeping(Path(path), document)
        index._vectors = torch.from_numpy(np.load(Path(path) / "vectors.npy", allow_pickle=False))
        return index


# --- FAISS ---------------------------------------------------------------------------


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


def _default_nlist(n: int) -> int:
    return max(1, round(math.sqrt(n)))


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
        document = _read_document(path, cls.__name__)
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


# --- torch on a device (the GPU path) ------------------------------------------------

# Score-matrix elements computed per chunk: (queries x rows). 2^24 fp16 scores are 32 MiB,
# small next to the rows read for them (1024 dims each) and large enough that launches
# do not dominate.
_CHUNK_SCORES = 1 << 24
# Queries scored together; more would only shrink the row chunks.
_QUERY_BLOCK = 1024


class TorchCudaIndex(_Bookkeeping):
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
    ) -> TorchCudaIndex:
        """Read an index written by ``save`` onto ``device`` (default: CUDA if present)."""
        document = _read_document(path, cls.__name__)
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


# --- results, recall, cost ---------------------------------------------------------


def merge_results(results: Sequence[SearchResult], k: int, mode: SearchMode) -> SearchResult:
    """Top ``k`` of the per-shard results of the same queries (ids disjoint across shards)."""
    _check_search(k, mode)
    if not results:
        raise ValueError("nothing to merge")
    ids = torch.cat([r.ids for r in results], dim=1)
    scores = torch.cat([r.scores for r in results], dim=1)
    # Padding already carries the worst score for the mode; ranking it by the key below
    # keeps it last even against real scores equal to +-inf.
    key = scores if mode == "proponents" else -scores
    key = key.masked_fill(ids < 0, -math.inf)
    take = min(k, ids.shape[1])
    _, where = key.topk(take, dim=1)
    merged = _empty_result(ids.shape[0], k, mode)
    merged.ids[:, :take] = ids.gather(1, where)
    merged.scores[:, :take] = scores.gather(1, where)
    merged.scores[merged.ids < 0] = _padding(mode)
    return merged


def recall_at_k(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean share of each query's true top-k ids ``(q, k)`` that ``found`` ``(q, k')`` holds."""
    if found.shape[0] != truth.shape[0]:
        raise ValueError("found and truth must have one row per query")
    hits = 0
    total = 0
    for got, want in zip(found.tolist(), truth.tolist(), strict=True):
        wanted = {i for i in want if i >= 0}
        hits += len(wanted & set(got))
        total += len(wanted)
    return hits / total if total else 1.0


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
            f"store float16 (TorchCudaIndex), shard the index, or raise the budget"
        )
    return cost
