"""The contract every gradient index keeps: the protocol, its types, and the input checks.

Result conventions: scores are always the inner product itself (opponents come most
negative first); where fewer than ``k`` vectors qualify, ids are ``-1`` and scores are
the worst possible value for the mode (``-inf`` for proponents, ``+inf`` for
opponents), so results of several shards merge with one top-k (``merge_results``).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from typing import Self

SearchMode = Literal["proponents", "opponents"]
ArrayLike = torch.Tensor | np.ndarray


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
    param_names: tuple[str, ...] = field(
        default=(), metadata={"help": "parameters whose gradients are embedded (empty: all)"}
    )

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError("dim must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexMetadata:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "param_names" in known:  # JSON has lists, the field a tuple
            known["param_names"] = tuple(known["param_names"])
        return cls(**known)


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
