"""Where the index build embeds the training set: in this process or on Ray (issue #21).

The server process never imports Ray: with ``executor = "ray"`` a driver child process
(``ray_driver``) connects to the cluster and runs the actors (``worker``).
"""

from expunge.server.executors.base import (
    EmbeddedRows,
    EmbeddingExecutor,
    EmbeddingJob,
    StoredShard,
)
from expunge.server.executors.factory import ExecutorUnavailable, make_executor
from expunge.server.executors.local import LocalExecutor
from expunge.server.executors.spec import EmbedderSpec

__all__ = [
    "EmbeddedRows",
    "EmbedderSpec",
    "EmbeddingExecutor",
    "EmbeddingJob",
    "ExecutorUnavailable",
    "LocalExecutor",
    "StoredShard",
    "make_executor",
]
