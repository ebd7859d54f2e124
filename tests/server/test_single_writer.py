"""One writer per state directory, and one server per port, with real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.processes import free_port, serve, wait_serving
from expunge.client import Client
from expunge.client.cli import EXIT_IN_USE
from expunge.server.state.state_lock import StateDirectoryInUse, StateDirectoryLock

REFUSAL_TIMEOUT_S = 60


def _cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "expunge.client.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=REFUSAL_TIMEOUT_S,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def served(state_dir: Path) -> object:
    port = free_port()
    process = serve(state_dir, port)
    assert wait_serving(f"127.0.0.1:{port}", process)
    yield process, port
    _stop(process)


def test_second_server_on_the_same_state_directory_is_refused(
    served: tuple[subprocess.Popen[bytes], int], state_dir: Path
) -> None:
    first, port = served
    second = _cli("serve", "--state-dir", str(state_dir), "--port", str(free_port()))
    assert second.returncode == EXIT_IN_USE
    assert f"state directory {state_dir} is in use by process {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    # The first server is untouched and still the only one answering.
    with Client(f"127.0.0.1:{port}") as client:
        assert client.get_model("digits").current_version == 1


def test_training_into_a_served_directory_is_refused(
    served: tuple[subprocess.Popen[bytes], int], state_dir: Path
) -> None:
    first, port = served
    refused = _cli("train", "--state-dir", str(state_dir), "--name", "other", "--epochs", "1")
    assert refused.returncode == EXIT_IN_USE
    assert f"in use by process {first.pid}" in refused.stderr
    assert "Traceback" not in refused.stderr
    with Client(f"127.0.0.1:{port}") as client:
        assert [m.name for m in client.list_models()] == ["models/digits"]


def test_a_sigkilled_holder_does_not_block_the_next_start(state_dir: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    killed = serve(state_dir, port)
    assert wait_serving(target, killed)
    killed.kill()
    killed.wait(timeout=30)
    # The lock file (with the dead pid) is still there; the kernel has dropped the lock.
    assert (state_dir / "expunge.lock").read_text().strip() == str(killed.pid)
    restarted = serve(state_dir, port)
    try:
        assert wait_serving(target, restarted)
        with Client(target) as client:
            assert client.get_model("digits").current_version == 1
    finally:
        _stop(restarted)


def test_a_port_in_use_is_refused(
    served: tuple[subprocess.Popen[bytes], int], tmp_path: Path
) -> None:
    first, port = served
    second = _cli("serve", "--state-dir", str(tmp_path / "other"), "--port", str(port))
    assert second.returncode == EXIT_IN_USE
    assert f"cannot listen on 127.0.0.1:{port}: the address is in use" in second.stderr
    assert "Traceback" not in second.stderr
    # Every call still reaches the first server: nothing shares its port.
    with Client(f"127.0.0.1:{port}") as client:
        for _ in range(6):
            assert [m.name for m in client.list_models()] == ["models/digits"]
    assert first.poll() is None


def test_the_lock_is_released_on_close_and_names_its_holder(tmp_path: Path) -> None:
    held = StateDirectoryLock(tmp_path)
    with pytest.raises(StateDirectoryInUse) as refused:
        StateDirectoryLock(tmp_path)
    assert refused.value.holder_pid is not None
    held.release()
    held.release()  # idempotent
    again = StateDirectoryLock(tmp_path)
    assert again.held
    again.release()
