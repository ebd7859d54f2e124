"""Which Ray cluster the index build uses, and how the driver process joins it.

Ray is imported only in the driver process (``ray_driver``), never in the server's.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from expunge.server.errors import Unavailable

# Starting the local cluster spawns its processes and imports; it has no network to wait
# for, so it gets a fixed bound instead of the join timeout.
LOCAL_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RayOptions:
    """The server's ``ray_*`` settings."""

    address: str = field(default="local", metadata={"help": "'local' or ray.init's address"})
    workers: int = field(default=0, metadata={"help": "actors; 0: the cluster's CPUs"})
    task_retries: int = field(default=3, metadata={"help": "actor restarts and task retries"})
    object_store_bytes: int = field(default=512 << 20, metadata={"help": "local cluster only"})
    connect_timeout_s: float = field(default=10.0, metadata={"help": "joining a cluster"})

    @property
    def local(self) -> bool:
        return self.address == "local"

    @property
    def where(self) -> str:
        """The cluster, as messages name it."""
        return (
            "the server's local Ray cluster" if self.local else f"the Ray cluster at {self.address}"
        )

    @property
    def start_timeout_s(self) -> float:
        return LOCAL_START_TIMEOUT_S if self.local else self.connect_timeout_s


def import_ray(local: bool) -> Any:
    """``ray``, with the environment it must see when first imported: no usage statistics
    (there is no network), and for the local cluster loopback addresses only, not the
    host's (it serves this server alone and holds training data; a joined cluster needs
    the node's address). Ray reads that single-node switch at import."""
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    return ray


def init_arguments(options: RayOptions) -> dict[str, Any]:
    """``ray.init``'s arguments: start the local cluster, or join ``options.address``."""
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if not options.local:
        return {"address": options.address, **quiet}
    return {
        "address": "local",
        "num_cpus": options.workers or os.cpu_count() or 1,
        "include_dashboard": False,
        "object_store_memory": options.object_store_bytes,
        **quiet,
    }


def probe(address: str, timeout: float) -> None:
    """Fail fast on an address nothing listens at: ``ray.init`` itself retries for
    minutes. Addresses Ray resolves itself (``auto``) are left to it."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise Unavailable(f"the Ray cluster at {address} is unreachable ({reason})") from exc
