"""The index build on Ray (issue #21): the same embeddings and neighbours as in process,
a build that outlives a killed worker, and a server that keeps serving without its cluster.

One Ray-backed server per module: starting a local Ray costs seconds on two cores.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from expunge.client import Client, UnavailableError
from expunge.client.types import NeighborsResult
from expunge.server.errors import Unavailable
from expunge.server.index.service import IndexService
from expunge.server.main import RunningServer, start
from expunge.server.settings import Settings

if importlib.util.find_spec("ray") is None:
    pytest.skip("ray is not installed (pip install 'expunge[ray]')", allow_module_level=True)

# Ray reads this when imported: keep the tests' clusters on loopback even if something
# other than the server imports Ray first in this process.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

SHARD_ROWS = 16  # 90 ranges of the 1,438 training rows: a build has many points to pause at
QUERIES = (load_digits().data[:6] / 16.0).astype(np.float32).reshape(6, 1, 8, 8)
K = 7
MODES = ("proponents", "opponents")


@dataclass(frozen=True)
class Built:
    vectors: torch.Tensor  # (n, dim) training embeddings the index holds
    answers: dict[str, NeighborsResult]


def _wait_ready(client: Client, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.get_model("digits").index.state != "READY":
        assert time.monotonic() < deadline, "the index never became READY"
        time.sleep(0.1)


def _built(running: RunningServer) -> Built:
    with Client(running.target, timeout=60) as client:
        _wait_ready(client)
        answers = {mode: client.neighbors("digits", QUERIES, K, mode=mode) for mode in MODES}
    embedded = running.forget.index._embeddings.peek("digits")  # type: ignore[union-attr]
    assert embedded is not None
    return Built(embedded.vectors.clone(), answers)


def _state_copy(trained_state: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("ray-state") / "state"
    shutil.copytree(trained_state, target)
    return target


@pytest.fixture(scope="module")
def in_process(trained_state: Path, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The reference: the same model's index built by the local executor."""
    running = start(
        Settings(
            state_dir=_state_copy(trained_state, tmp_path_factory),
            port=0,
            index_shard_rows=SHARD_ROWS,
        )
    )
    try:
        return _built(running)
    finally:
        running.stop(0.5)


@pytest.fixture(scope="module")
def on_ray(
    trained_state: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    running = start(
        Settings(
            state_dir=_state_copy(trained_state, tmp_path_factory),
            port=0,
            executor="ray",
            ray_workers=2,
            index_shard_rows=SHARD_ROWS,
            ray_object_store_bytes=128 << 20,
        )
    )
    try:
        yield running
    finally:
        running.stop(5.0)


def test_ray_builds_the_same_index_as_the_local_executor(
    on_ray: RunningServer, in_process: Built
) -> None:
    built = _built(on_ray)
    # Bit-identical: the same ranges, one thread and deterministic kernels on both sides.
    assert torch.equal(built.vectors, in_process.vectors)
    for mode in MODES:
        got, expected = built.answers[mode], in_process.answers[mode]
        assert [[n.sample_id for n in row] for row in got.neighbors] == [
            [n.sample_id for n in row] for row in expected.neighbors
        ]
        assert [[n.score for n in row] for row in got.neighbors] == [
            [n.score for n in row] for row in expected.neighbors
        ]


def _start_rebuild(
    on_ray: RunningServer,
) -> tuple[IndexService, threading.Thread, list[BaseException]]:
    """Once the server's own index is READY: a second service on the same engine and
    executor (it starts with no embeddings, so its build embeds everything again, as a
    benchmark times a build), building in a thread, returned once some ranges are in."""
    assert on_ray.forget.index is not None
    with Client(on_ray.target, timeout=60) as client:
        _wait_ready(client)
    rebuild = IndexService(on_ray.engine, executor=on_ray.forget.index.executor)
    failures: list[BaseException] = []

    def build() -> None:
        try:
            rebuild.build("digits")
        except BaseException as exc:
            failures.append(exc)

    builder = threading.Thread(target=build)
    builder.start()
    deadline = time.monotonic() + 60
    while rebuild.state("digits").progress == 0.0:
        assert time.monotonic() < deadline and builder.is_alive(), failures
        time.sleep(0.005)
    return rebuild, builder, failures


def test_a_worker_killed_mid_build_is_restarted_and_the_build_completes_the_same(
    on_ray: RunningServer, in_process: Built
) -> None:
    rebuild, builder, failures = _start_rebuild(on_ray)
    executor = rebuild.executor
    before = executor.worker_pids()  # type: ignore[attr-defined]
    # Foreground work pauses the background build between ranges: the kill lands mid-build.
    with on_ray.engine.foreground.running():
        time.sleep(0.5)
        progress = rebuild.state("digits").progress
        os.kill(before[0], signal.SIGKILL)
    builder.join(120)
    assert not builder.is_alive() and not failures, failures
    assert 0.0 < progress < 1.0
    assert rebuild.state("digits").state == "READY"
    rebuilt = rebuild._embeddings.peek("digits")
    assert rebuilt is not None and torch.equal(rebuilt.vectors, in_process.vectors)
    after = executor.worker_pids()  # type: ignore[attr-defined]
    assert before[0] not in after and before[1] in after, (before, after)


def test_a_lost_cluster_fails_the_build_and_the_next_build_starts_a_new_one(
    on_ray: RunningServer, in_process: Built
) -> None:
    rebuild, builder, failures = _start_rebuild(on_ray)
    executor = rebuild.executor
    with Client(on_ray.target, timeout=60) as client:
        with on_ray.engine.foreground.running():  # paused mid-build, as above
            time.sleep(0.5)
            # Ray ends its driver when the cluster is lost: here, the driver process.
            os.kill(executor.driver_pid, signal.SIGKILL)  # type: ignore[attr-defined]
        builder.join(60)
        assert not builder.is_alive()
        assert len(failures) == 1 and isinstance(failures[0], Unavailable), failures
        assert "local Ray cluster is lost" in failures[0].message
        # Nothing was committed; the server's own index and Predict go on.
        assert client.get_model("digits").index.state == "READY"
        assert client.predict("digits", QUERIES).labels.shape == (6,)
    again = IndexService(on_ray.engine, executor=executor)
    assert again.build("digits").state == "READY"
    rebuilt = again._embeddings.peek("digits")
    assert rebuilt is not None and torch.equal(rebuilt.vectors, in_process.vectors)


def test_an_unreachable_cluster_leaves_the_server_serving_without_an_index(
    state_dir: Path,
) -> None:
    running = start(
        Settings(
            state_dir=state_dir,
            port=0,
            executor="ray",
            ray_address="127.0.0.1:1",  # nothing listens on port 1
            ray_connect_timeout_s=2.0,
        )
    )
    try:
        with Client(running.target, timeout=60, retries=0) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.neighbors("digits", QUERIES, 3)
                except UnavailableError as exc:
                    assert "127.0.0.1:1" in exc.message and "unreachable" in exc.message
                    break
                except Exception:
                    pass  # still BUILDING: the first connection attempt is under way
                assert time.monotonic() < deadline, "the build never failed"
                time.sleep(0.1)
            assert client.get_model("digits").index.state != "READY"
            assert client.predict("digits", QUERIES).labels.shape == (6,)
            owner = str(running.engine.training_data("digits").owner_ids[0])
            forgotten = client.forget("digits", owner_ids=[owner], wait=True)
            assert forgotten.state == "SUCCEEDED"
            assert client.get_model("digits").current_version == 2
            assert client.predict("digits", QUERIES).labels.shape == (6,)
            assert client.get_model("digits").index.state != "READY"
    finally:
        running.stop(2.0)
