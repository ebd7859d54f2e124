"""The server as a real process: SIGTERM drains and exits; acknowledged forgets survive."""

from __future__ import annotations

import ctypes
import platform
import signal
import sqlite3
from pathlib import Path

import pytest

from benchmarks.processes import free_port, serve, wait_serving
from expunge.client import Client

# tgkill(2) sends a signal to one thread of a process (x86-64 and arm64 numbers).
SYS_TGKILL = {"x86_64": 234, "aarch64": 131}.get(platform.machine(), 0)


# Grace 0 abandons the forget mid-computation: the server exits at once (skipping
# interpreter finalization, which could abort with the worker still in torch code), and
# the journal redoes the request at the next start.
@pytest.mark.parametrize("grace", ["5", "0"])
def test_sigterm_drains_exits_and_keeps_acknowledged_forgets(state_dir: Path, grace: str) -> None:
    db = sqlite3.connect(state_dir / "expunge.db")
    owner = db.execute("SELECT owner_id FROM samples ORDER BY owner_id LIMIT 1").fetchone()[0]
    db.close()
    port = free_port()
    target = f"127.0.0.1:{port}"
    process = serve(state_dir, port, EXPUNGE_GRACE_PERIOD_S=grace)
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


@pytest.mark.skipif(
    not SYS_TGKILL or not Path("/proc/self/task").is_dir(), reason="needs Linux tgkill"
)
def test_sigterm_delivered_to_a_worker_thread_still_stops_the_server(state_dir: Path) -> None:
    """The kernel may hand a process's SIGTERM to any thread; the server must still exit."""
    port = free_port()
    process = serve(state_dir, port, EXPUNGE_GRACE_PERIOD_S="5")
    try:
        assert wait_serving(f"127.0.0.1:{port}", process)
        workers = sorted(
            int(t.name) for t in Path(f"/proc/{process.pid}/task").iterdir() if t.name.isdigit()
        )
        workers.remove(process.pid)  # the main thread's id is the process id
        assert workers
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.syscall(SYS_TGKILL, process.pid, workers[-1], signal.SIGTERM) == 0
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
