"""Running the server as a real process on loopback (crash, lifecycle and reliability runs)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from expunge.client import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(
    state_dir: Path, port: int, fault: str | None = None, log: Path | None = None, **env: str
) -> subprocess.Popen[bytes]:
    """``expunge serve`` in a child process; ``fault`` names a crash point (EXPUNGE_FAULT).

    The server's stdout and stderr go to ``log`` when given, else nowhere.
    """
    environment = {k: v for k, v in os.environ.items() if k != "EXPUNGE_FAULT"}
    environment.update(env)
    if fault:
        environment["EXPUNGE_FAULT"] = fault
    command = [
        sys.executable,
        "-m",
        "expunge.client.cli",
        "serve",
        "--state-dir",
        str(state_dir),
        "--port",
        str(port),
    ]
    if log is None:
        return subprocess.Popen(
            command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    with log.open("ab") as sink:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, env=environment, stdout=sink, stderr=subprocess.STDOUT)


def wait_serving(target: str, process: subprocess.Popen[bytes], timeout: float = 120) -> bool:
    """True once health says SERVING; False if the process exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with Client(target, retries=0, timeout=2) as client:
                if client.health() == "SERVING":
                    return True
        except Exception:
            time.sleep(0.1)
    return False
