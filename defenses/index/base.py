"""What every index implementation shares: id and label bookkeeping, the add rules, and
the ``index.json`` document that ``save`` writes and ``load`` reads (never pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cost import IndexKind, check_index_fits
from .protocol import ArrayLike, IndexMetadata, _ids_array, _labels_array

FORMAT = "expunge-gradient-index"
FORMAT_VERSION = 1
_META_FILE = "index.json"


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

    @classmethod
    def _saved_type(cls) -> str:
        """The ``index_type`` that ``index.json`` records and ``load`` expects."""
        return cls.__name__

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
            "index_type": self._saved_type(),
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
