"""The server as a real process: SIGTERM drains and exits; acknowledged forgets survive."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from expunge.client import Client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(state_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EXPUNGE_GRACE_PERIOD_S": "5"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "expunge.client.cli",
            "serve",
            "--state-dir",
            str(state_dir),
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_serving(target: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with Client(target, retries=0, timeout=2) as client:
                if client.health() == "SERVING":
                    return
        except Exception:
            time.sleep(0.2)
    raise AssertionError("server did not become SERVING")


def test_sigterm_drains_exits_and_keeps_acknowledged_forgets(state_dir: Path) -> None:
    db = sqlite3.connect(state_dir / "expunge.db")
    owner = db.execute("SELECT owner_id FROM samples ORDER BY owner_id LIMIT 1").fetchone()[0]
    db.close()
    port = _free_port()
    target = f"127.0.0.1:{port}"
    process = _serve(state_dir, port)
    try:
        _wait_serving(target)
        with Client(target) as client:
            op = client.forget("digits", owner_ids=[owner], request_id="before-sigterm")
            assert op.name == "operations/before-sigterm"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    # Restarted, the acknowledged request is applied exactly once.
    process = _serve(state_dir, port)
    try:
        _wait_serving(target, timeout=120)
        with Client(target) as client:
            done = client.wait("before-sigterm", timeout=120)
            assert done.state == "SUCCEEDED", done
            assert client.get_model("digits").current_version == 2
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
