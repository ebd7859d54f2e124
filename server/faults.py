"""Named crash points for the crash-safety tests: ``EXPUNGE_FAULT=<point>`` kills the process there.

A no-op unless the variable is set. The points sit where a crash is most likely to
leave a half-applied state: mid blob write, between blob writes, around the commit.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "blob_mid_write",
    "forget_before_weights",
    "forget_after_weights",
    "forget_after_shard",
    "forget_after_index",
    "forget_before_commit",
    "forget_after_commit",
)


def crash_point(name: str) -> None:
    """SIGKILL this process if the environment names ``name`` as the fault to inject."""
    if os.environ.get("EXPUNGE_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
