"""SIGKILL at named points of forget processing; restart; nothing acknowledged is lost or half applied."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from benchmarks.processes import free_port, serve, wait_serving
from expunge.client import Client, NotFoundError, UnavailableError
from expunge.server.state.consistency import check_state
from expunge.server.state.store import Store

# A handful here; the reliability benchmark kills at every point and at random times.
POINTS = ["blob_mid_write", "forget_before_commit"]


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
    port = free_port()
    target = f"127.0.0.1:{port}"
    process = serve(state_dir, port, fault)
    acknowledged = []
    unanswered = None  # sent when the process died: journalled or not, either is correct
    try:
        assert wait_serving(target, process)
        with Client(target, retries=0) as client:
            for i, owner in enumerate(owners):
                try:
                    op = client.forget("digits", owner_ids=[owner], request_id=f"crash-{i}")
                except UnavailableError:
                    unanswered = f"crash-{i}"  # the process died at the fault point
                    break
                acknowledged.append(op.name.removeprefix("operations/"))
        assert process.wait(timeout=120) == -signal.SIGKILL, "the fault point was not reached"
    finally:
        if process.poll() is None:
            process.kill()
    process = serve(state_dir, port, None)
    try:
        assert wait_serving(target, process)
        with Client(target) as client:
            for request_id in acknowledged:
                assert client.wait(request_id, timeout=120).state == "SUCCEEDED"
            # The forget being answered when the process died (the shard is staged as soon
            # as the worker takes it) was either journalled, and is applied whole, or not.
            if unanswered is not None:
                try:
                    assert client.wait(unanswered, timeout=120).state == "SUCCEEDED"
                    acknowledged.append(unanswered)
                except NotFoundError:
                    pass
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
    process = serve(pristine, port, None)
    try:
        assert wait_serving(target, process)
        with Client(target) as client:
            for i, owner in enumerate(owners[: len(acknowledged)]):
                client.forget("digits", owner_ids=[owner], request_id=f"crash-{i}", wait=True)
            assert client.list_versions("digits")[-1].weights_sha256 == served_sha
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
