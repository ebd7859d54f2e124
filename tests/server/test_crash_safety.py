"""SIGKILL at named points of forget processing; restart; nothing acknowledged is lost or half applied."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from expunge.client import Client, UnavailableError
from expunge.server.consistency import check_state
from expunge.server.store import Store

# A handful here; the reliability benchmark kills at every point and at random times.
POINTS = ["blob_mid_write", "forget_before_commit"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(state_dir: Path, port: int, fault: str | None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "EXPUNGE_FAULT"}
    if fault:
        env["EXPUNGE_FAULT"] = fault
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
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_serving(target: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode} before serving")
        try:
            with Client(target, retries=0, timeout=2) as client:
                if client.health() == "SERVING":
                    return
        except Exception:
            time.sleep(0.2)
    raise AssertionError("server did not become SERVING")


def _owners(state_dir: Path, count: int) -> list[str]:
    store = Store(state_dir)
    try:
        rows = store.query(
            "SELECT DISTINCT owner_id FROM samples ORDER BY owner_id LIMIT ?", (count,)
        )
        return [str(r[0]) for r in rows]
    finally:
        store.close()


@pytest.mark.parametrize("fault", POINTS)
def test_sigkill_at_a_crash_point_loses_nothing(
    state_dir: Path, tmp_path: Path, fault: str
) -> None:
    pristine = tmp_path / "pristine"
    shutil.copytree(state_dir, pristine)
    owners = _owners(state_dir, 2)
    port = _free_port()
    target = f"127.0.0.1:{port}"
    process = _serve(state_dir, port, fault)
    acknowledged = []
    try:
        _wait_serving(target, process)
        with Client(target, retries=0) as client:
            for i, owner in enumerate(owners):
                try:
                    op = client.forget("digits", owner_ids=[owner], request_id=f"crash-{i}")
                except UnavailableError:
                    break  # the process already died at the fault point: not acknowledged
                acknowledged.append(op.name.removeprefix("operations/"))
        assert process.wait(timeout=120) == -signal.SIGKILL, "the fault point was not reached"
    finally:
        if process.poll() is None:
            process.kill()
    process = _serve(state_dir, port, None)
    try:
        _wait_serving(target, process)
        with Client(target) as client:
            for request_id in acknowledged:
                assert client.wait(request_id, timeout=120).state == "SUCCEEDED"
            assert client.get_model("digits").current_version == 1 + len(acknowledged)
            served_sha = client.list_versions("digits")[-1].weights_sha256
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    store = Store(state_dir)
    try:
        assert check_state(store) == []
        assert not store.requests_in_state("PENDING", "APPLYING")
    finally:
        store.close()
    # The crashed-and-recovered history ends where an uninterrupted replay ends.
    process = _serve(pristine, port, None)
    try:
        _wait_serving(target, process)
        with Client(target) as client:
            for i, owner in enumerate(owners[: len(acknowledged)]):
                client.forget("digits", owner_ids=[owner], request_id=f"crash-{i}", wait=True)
            assert client.list_versions("digits")[-1].weights_sha256 == served_sha
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
