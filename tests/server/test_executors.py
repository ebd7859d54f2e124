"""The executor layer without a cluster: settings, the install hint, the local loop, and
the Ray actor's body (run in this process), which must embed as the server's embedder."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from expunge.client.cli import main as cli_main
from expunge.defenses.embeddings import EmbeddingConfig, GradientEmbedder
from expunge.defenses.training import Checkpoint
from expunge.server.engine import Engine
from expunge.server.executors import (
    EmbedderSpec,
    EmbeddingJob,
    ExecutorUnavailable,
    LocalExecutor,
    make_executor,
)
from expunge.server.executors.worker import EmbeddingWorker, ShardUnreadable
from expunge.server.index.service import IndexService
from expunge.server.main import start
from expunge.server.settings import Settings, load_settings
from expunge.server.state.store import Store


@pytest.mark.parametrize(
    "bad",
    [
        {"executor": "spark"},
        {"index_shard_rows": 0},
        {"ray_address": " "},
        {"ray_workers": -1},
        {"ray_task_retries": -1},
        {"ray_object_store_bytes": 1 << 20},
        {"ray_connect_timeout_s": 0.0},
    ],
)
def test_bad_executor_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        Settings(**bad)  # type: ignore[arg-type]


def test_executor_settings_come_from_the_environment() -> None:
    env = {"EXPUNGE_EXECUTOR": "ray", "EXPUNGE_RAY_WORKERS": "3", "EXPUNGE_RAY_ADDRESS": "auto"}
    settings = load_settings(env=env)
    assert (settings.executor, settings.ray_workers, settings.ray_address) == ("ray", 3, "auto")


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: found nowhere


def test_executor_ray_without_ray_is_refused_with_the_install_hint(no_ray: None) -> None:
    with pytest.raises(ExecutorUnavailable, match=r"pip install 'expunge\[ray\]'"):
        make_executor(Settings(executor="ray"))
    assert isinstance(make_executor(Settings()), LocalExecutor)


def test_the_server_refuses_executor_ray_without_ray_at_start(
    no_ray: None, state_dir: Path
) -> None:
    with pytest.raises(ExecutorUnavailable):
        start(Settings(state_dir=state_dir, port=0, executor="ray"))
    Store(state_dir).close()  # the writer lock was released


def test_expunge_serve_refuses_executor_ray_without_ray(
    no_ray: None,
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("EXPUNGE_EXECUTOR", "ray")
    assert cli_main(["serve", "--state-dir", str(state_dir), "--port", "0"]) == 2
    assert "pip install 'expunge[ray]'" in capsys.readouterr().err


def test_the_local_executor_embeds_in_order_after_each_gate() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    embedder = GradientEmbedder(
        model, [Checkpoint(0, 0.1, model.state_dict())], EmbeddingConfig(projection_dim=4)
    )
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    calls: list[str] = []
    job = EmbeddingJob(embedder, x, y, None)
    for rows in LocalExecutor().embed(job, [(0, 3), (3, 5)], lambda: calls.append("gate")):
        calls.append(f"{rows.start}:{rows.stop}")
        assert torch.equal(
            rows.block, embedder.embed(x[rows.start : rows.stop], y[rows.start : rows.stop])
        )
    assert calls == ["gate", "0:3", "gate", "3:5"]


@pytest.fixture
def engine(state_dir: Path) -> Iterator[Engine]:
    store = Store(state_dir)
    try:
        yield Engine(store, Settings(state_dir=state_dir))
    finally:
        store.close()


def test_the_worker_embeds_the_stored_shard_as_the_servers_embedder(engine: Engine) -> None:
    index = IndexService(engine)
    version = engine.model_row("digits").current_version
    _, embedder = index._embedder("digits", version)
    data = engine.training_data("digits")
    path = str(engine.data_path(data.blob))
    spec = EmbedderSpec(engine.model_row("digits").spec, {}, embedder.checkpoints, embedder.config)
    worker = EmbeddingWorker()
    got = worker.embed([spec], spec.digest, path, 10, 50, None)
    assert got.dtype == np.float32
    assert np.array_equal(got, embedder.embed(data.features[10:50], data.labels[10:50]).numpy())
    # A forget changes the last checkpoint's state only: the drawn projections are kept.
    last = embedder.checkpoints[-1]
    moved = Checkpoint(last.step, last.learning_rate, {k: v + 0.01 for k, v in last.state.items()})
    forgotten = replace(spec, checkpoints=(*spec.checkpoints[:-1], moved))
    assert forgotten.digest != spec.digest
    assert forgotten.projection_digest == spec.projection_digest
    first = worker._current[1]  # type: ignore[index]
    final = (len(spec.checkpoints) - 1,)
    got = worker.embed([forgotten], forgotten.digest, path, 0, 8, final)
    twin = embedder.with_checkpoints(forgotten.checkpoints)
    assert np.array_equal(got, twin.embed(data.features[:8], data.labels[:8], list(final)).numpy())
    assert worker._current[1].projectors is first.projectors  # type: ignore[index]
    with pytest.raises(ShardUnreadable, match="gone"):
        worker.embed([spec], spec.digest, path + ".gone", 0, 8, None)


class _Elsewhere:
    """Embeds every range with a worker's own embedder, as a Ray actor would."""

    def __init__(self) -> None:
        self.worker = EmbeddingWorker()

    def embed(
        self, job: EmbeddingJob, ranges: list[tuple[int, int]], before_each: object
    ) -> Iterator[object]:
        from expunge.server.executors.base import EmbeddedRows

        assert job.stored is not None
        spec = job.stored.spec
        for first, stop in ranges:
            block = self.worker.embed([spec], spec.digest, job.stored.path, first, stop, job.which)
            yield EmbeddedRows(first, stop, torch.from_numpy(block))

    def prepare(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_build_embedded_elsewhere_warms_the_serving_embedder_before_ready(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Queries are embedded in the serving process: a build whose rows were embedded by
    # workers leaves it cold, so the build embeds a few rows here before the index is READY.
    from expunge.server.index.service import WARM_UP_ROWS

    calls: list[tuple[int, int]] = []
    original = GradientEmbedder.embed

    def recording(self: GradientEmbedder, inputs: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append((id(self), len(inputs)))
        return original(self, inputs, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(GradientEmbedder, "embed", recording)
    index = IndexService(engine, executor=_Elsewhere())  # type: ignore[arg-type]
    assert index.build("digits").state == "READY"
    serving = index._loaded["digits"].embedder
    here = [rows for owner, rows in calls if owner == id(serving)]
    assert here == [WARM_UP_ROWS]  # the warm-up, and nothing else of the build
    n = len(engine.training_data("digits").labels)
    assert sum(rows for owner, rows in calls if owner != id(serving)) == n  # the workers'


class _ClusterDownTwice(LocalExecutor):
    """Unreachable for the first two builds, then embeds here."""

    def __init__(self) -> None:
        self.attempts = 0

    def embed(self, job: EmbeddingJob, ranges: list[tuple[int, int]], before_each: object):  # type: ignore[no-untyped-def,override]
        from expunge.server.errors import Unavailable

        self.attempts += 1
        if self.attempts <= 2:
            raise Unavailable("the Ray cluster at test:1 is unreachable (down)")
        return super().embed(job, ranges, before_each)  # type: ignore[arg-type]


def test_a_build_that_found_no_cluster_tries_again_on_its_own(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from expunge.server.index import service

    monkeypatch.setattr(service, "RETRY_UNAVAILABLE_S", 0.05)
    executor = _ClusterDownTwice()
    index = IndexService(engine, executor=executor)  # type: ignore[arg-type]
    try:
        index.build_in_background("digits")
        deadline = time.monotonic() + 60
        seen_unavailable = False
        while (state := index.state("digits")).state != "READY":
            seen_unavailable |= state.unavailable and "unreachable" in state.message
            assert time.monotonic() < deadline, state
            time.sleep(0.01)
        assert executor.attempts == 3 and seen_unavailable  # no query asked for the retries
        assert not index.state("digits").unavailable
    finally:
        index.stop()


def test_a_stop_ends_the_wait_before_the_next_try(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from expunge.server.index import service

    monkeypatch.setattr(service, "RETRY_UNAVAILABLE_S", 3600.0)
    executor = _ClusterDownTwice()
    index = IndexService(engine, executor=executor)  # type: ignore[arg-type]
    index.build_in_background("digits")
    deadline = time.monotonic() + 60
    while not index.state("digits").unavailable:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert index.stop(timeout=30)  # the waiting thread ended: it did not sit out the hour
    assert executor.attempts == 1
