"""The executor the ``executor`` setting names, refused at start when it cannot run."""

from __future__ import annotations

import importlib.util

from expunge.server.executors.base import EmbeddingExecutor
from expunge.server.executors.local import LocalExecutor
from expunge.server.settings import Settings


class ExecutorUnavailable(RuntimeError):
    """``executor = "ray"`` without Ray installed."""


def make_executor(settings: Settings) -> EmbeddingExecutor:
    """``LocalExecutor``, or a ``RayExecutor`` whose driver connects at the first build (a
    cluster that cannot be reached then fails that build, not the server's start)."""
    if settings.executor == "local":
        return LocalExecutor()
    from expunge.server.executors.ray_cluster import RayOptions
    from expunge.server.executors.ray_executor import RayExecutor

    # Found, not imported: Ray is imported by the driver process only.
    if importlib.util.find_spec("ray") is None:
        raise ExecutorUnavailable(
            "executor = 'ray' needs Ray, which is not installed: pip install 'expunge[ray]', "
            "or set executor to 'local'"
        )
    return RayExecutor(
        RayOptions(
            address=settings.ray_address,
            workers=settings.ray_workers,
            task_retries=settings.ray_task_retries,
            object_store_bytes=settings.ray_object_store_bytes,
            connect_timeout_s=settings.ray_connect_timeout_s,
        )
    )
