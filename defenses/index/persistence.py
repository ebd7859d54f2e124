"""Loading a saved index without knowing its class: ``index.json`` names it."""

from __future__ import annotations

import os
from typing import Any

from .base import _read_document
from .device import TorchDeviceIndex
from .exact import ExactTorchIndex
from .faiss_index import FaissIndex
from .protocol import GradientIndex


def load_index(path: str | os.PathLike[str]) -> GradientIndex:
    """Load whichever index ``save`` wrote into directory ``path``."""
    document = _read_document(path, None)
    classes: dict[str, type[Any]] = {
        cls._saved_type(): cls for cls in (ExactTorchIndex, FaissIndex, TorchDeviceIndex)
    }
    cls = classes.get(document["index_type"])
    if cls is None:
        raise ValueError(f"unknown index type {document['index_type']!r} in {path}")
    index: GradientIndex = cls.load(path)
    return index
