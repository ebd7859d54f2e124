"""Maximum-inner-product indexes of gradient embeddings (DESIGN 4.9).

Every index answers through ``GradientIndex`` (``protocol``) and returns the same
results, ties aside:

- ``ExactTorchIndex`` (``exact``): brute force in torch on the CPU; the tests' oracle.
- ``FaissIndex`` (``faiss_index``): FAISS flat (exact) or IVF (approximate, large n).
- ``TorchDeviceIndex`` (``device``): chunked top-k on a torch device, fp16/bf16 optional.

``cost`` estimates memory and build time, ``merge`` combines shard results and
``persistence`` loads a saved index of any kind.
"""

from .cost import IndexBudgetError, IndexCost, check_index_fits, estimate_index_cost
from .device import TorchDeviceIndex
from .exact import ExactTorchIndex
from .faiss_index import FaissConfig, FaissIndex, recommended_faiss_kind
from .merge import merge_results, recall_at_k
from .persistence import load_index
from .protocol import GradientIndex, IndexMetadata, SearchMode, SearchResult

# The class's name before it was renamed; tests and benchmarks still use it.
TorchCudaIndex = TorchDeviceIndex

__all__ = [
    "ExactTorchIndex",
    "FaissConfig",
    "FaissIndex",
    "GradientIndex",
    "IndexBudgetError",
    "IndexCost",
    "IndexMetadata",
    "SearchMode",
    "SearchResult",
    "TorchCudaIndex",
    "TorchDeviceIndex",
    "check_index_fits",
    "estimate_index_cost",
    "load_index",
    "merge_results",
    "recall_at_k",
    "recommended_faiss_kind",
]
