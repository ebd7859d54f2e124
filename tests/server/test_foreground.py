"""Background index work yields the cores to a forget computing meanwhile."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from expunge.client import Client
from expunge.defenses.embeddings import EmbeddingConfig, GradientEmbedder
from expunge.defenses.training import Checkpoint
from expunge.server.foreground import ForegroundWork
from expunge.server.index.embeddings import EmbeddingCache, EmbeddingKey
from expunge.server.main import start
from expunge.server.settings import Settings


def test_yield_to_waits_while_foreground_work_runs_and_not_otherwise() -> None:
    gate = ForegroundWork()
    assert gate.yield_to() == 0.0  # idle: no wait at all
    entered, leave = threading.Event(), threading.Event()

    def foreground() -> None:
        with gate.running():
            entered.set()
            leave.wait(30)

    worker = threading.Thread(target=foreground)
    worker.start()
    assert entered.wait(30) and gate.busy
    released: list[float] = []
    waiter = threading.Thread(target=lambda: released.append(gate.yield_to()))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "background work went on beside foreground work"
    leave.set()
    waiter.join(30)
    worker.join(30)
    assert not waiter.is_alive() and released and not gate.busy


def test_yield_to_ends_at_a_stop_or_when_someone_waits_for_the_result() -> None:
    gate = ForegroundWork()
    stopping = threading.Event()
    with gate.running():
        stopping.set()
        assert gate.yield_to(stopping) == 0.0
        assert gate.yield_to(None, unless=lambda: True) == 0.0


def _cache_inputs() -> tuple[
    GradientEmbedder, EmbeddingKey, tuple[torch.Tensor, torch.Tensor, np.ndarray]
]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    checkpoints = [Checkpoint(0, 0.1, model.state_dict())]
    embedder = GradientEmbedder(model, checkpoints, EmbeddingConfig(projection_dim=4))
    key = EmbeddingKey("trajectory", None, embedder.dim)
    data = (torch.randn(8, 4), torch.randint(0, 3, (8,)), np.arange(8, dtype=np.int64))
    return embedder, key, data


def test_a_background_embedding_pauses_for_a_forget_unless_a_scan_waits_for_it() -> None:
    embedder, key, data = _cache_inputs()
    gate = ForegroundWork()
    progress: list[float] = []
    cache = EmbeddingCache(shard_size=2)

    def pause(someone_waits: object) -> float:
        return gate.yield_to(None, someone_waits)  # type: ignore[arg-type]

    leave = threading.Event()
    entered = threading.Event()

    def forget() -> None:
        with gate.running():
            entered.set()
            leave.wait(30)

    foreground = threading.Thread(target=forget)
    foreground.start()
    assert entered.wait(30)
    background = threading.Thread(
        target=cache.get, args=("m", 1, key, embedder, data, progress.append, None, pause)
    )
    background.start()
    background.join(0.6)
    assert background.is_alive() and progress == [], "it embedded beside the forget"
    # A scan asks for the same embedding: the background one stops pausing and serves it.
    answers = []
    scan = threading.Thread(target=lambda: answers.append(cache.get("m", 1, key, embedder, data)))
    scan.start()
    scan.join(30)
    background.join(30)
    assert not scan.is_alive() and not background.is_alive()
    assert progress[-1] == 1.0 and answers and answers[0].vectors.shape == (8, embedder.dim)
    leave.set()
    foreground.join(30)


def test_a_forget_runs_as_foreground_work_on_a_real_server(state_dir: Path) -> None:
    running = start(Settings(state_dir=state_dir, port=0, build_index=False))
    try:
        engine = running.engine  # type: ignore[attr-defined]
        with Client(running.target, timeout=600) as client:
            seen = []
            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    seen.append(engine.foreground.busy)
                    time.sleep(0.002)

            watcher = threading.Thread(target=watch)
            watcher.start()
            owner = str(engine.training_data("digits").owner_ids[0])
            op = client.forget("digits", owner_ids=[owner], selection="lcodec_cg", wait=True)
            done.set()
            watcher.join(30)
            assert op.state == "SUCCEEDED"
            assert any(seen), "the forget never marked itself as foreground work"
            assert not engine.foreground.busy
    finally:
        running.stop(0)
