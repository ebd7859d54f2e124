"""The server as a real process: SIGTERM drains and exits; acknowledged forgets survive."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

from benchmarks.processes import free_port, serve, wait_serving
from expunge.client import Client


def test_sigterm_drains_exits_and_keeps_acknowledged_forgets(state_dir: Path) -> None:
    db = sqlite3.connect(state_dir / "expunge.db")
    owner = db.execute("SELECT owner_id FROM samples ORDER BY owner_id LIMIT 1").fetchone()[0]
    db.close()
    port = free_port()
    target = f"127.0.0.1:{port}"
    process = serve(state_dir, port, EXPUNGE_GRACE_PERIOD_S="5")
    try:
        assert wait_serving(target, process)
        with Client(target) as client:
            op = client.forget("digits", owner_ids=[owner], request_id="before-sigterm")
            assert op.name == "operations/before-sigterm"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    # Restarted, the acknowledged request is applied exactly once.
    process = serve(state_dir, port, EXPUNGE_GRACE_PERIOD_S="5")
    try:
        assert wait_serving(target, process, timeout=120)
        with Client(target) as client:
            done = client.wait("before-sigterm", timeout=120)
            assert done.state == "SUCCEEDED", done
            assert client.get_model("digits").current_version == 2
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
