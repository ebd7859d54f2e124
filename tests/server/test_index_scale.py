"""The index at scale: layer subsets, IVF for large sets, final-block re-embedding kept
across restarts (issue #19 items 4 and 5)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from expunge.client import Client
from expunge.defenses.gradients import predicted_labels
from expunge.defenses.index import ExactTorchIndex
from expunge.server.errors import InvalidArgument
from expunge.server.index.layers import embedded_param_names
from expunge.server.index.service import ARTEFACT
from expunge.server.main import RunningServer, start
from expunge.server.settings import Settings


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(),
        nn.Linear(16, 10),
    )  # fmt: skip


def test_auto_embeds_every_layer_while_the_projections_fit_else_trailing_layers() -> None:
    model = _cnn()
    sizes = [40, 144 * 16 + 16, 16 * 10 + 10]  # conv, dense, output
    per_param = 2 * 8 * 4  # checkpoints * k * float32
    everything = sum(sizes) * per_param
    assert embedded_param_names(model, "auto", 2, 8, everything) is None
    dense_and_output = (sizes[1] + sizes[2]) * per_param
    assert embedded_param_names(model, "auto", 2, 8, dense_and_output) == (
        "3.weight", "3.bias", "5.weight", "5.bias",
    )  # fmt: skip
    # The output layer always, even beyond the budget: influence needs some gradient.
    assert embedded_param_names(model, "auto", 2, 8, 1) == ("5.weight", "5.bias")
    assert embedded_param_names(model, "all", 2, 8, 1) is None
    assert embedded_param_names(model, "5, 0", 2, 8, 1) == (
        "0.weight", "0.bias", "5.weight", "5.bias",
    )  # fmt: skip
    with pytest.raises(InvalidArgument, match="names no module"):
        embedded_param_names(model, "nope", 2, 8, 1)


def _ready(client: Client, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while client.get_model("digits").index.state != "READY":
        assert time.monotonic() < deadline, "index never became READY"
        time.sleep(0.1)


@pytest.fixture
def small_index_server(state_dir: Path) -> Iterator[RunningServer]:
    # Projections of the output layer only fit, and the 1,437 digits exceed the IVF bound.
    settings = Settings(
        state_dir=state_dir, port=0, index_projection_cache_bytes=700_000, index_ivf_threshold=500
    )
    running = start(settings)
    yield running
    running.stop(grace=0.5)


def test_a_large_model_embeds_its_trailing_layers_in_an_ivf_index(
    small_index_server: RunningServer,
) -> None:
    server = small_index_server
    with Client(server.target, timeout=60.0) as client:
        _ready(client)
        engine = server.engine
        loaded = server.forget.index._loaded["digits"]  # type: ignore[union-attr]
        output = [n for n, _ in engine.snapshot("digits").module.named_parameters()][-2:]
        assert loaded.embedder.param_names == tuple(output)
        assert loaded.index.metadata.param_names == tuple(output)
        assert engine.store.artefact("digits", ARTEFACT).meta["kind"] == "ivf"
        # The response says which gradients its neighbours and scores come from.
        assert client.get_model("digits").index.embedded_parameters == tuple(output)
        data = engine.training_data("digits")
        exact = ExactTorchIndex(loaded.embedder.dim)
        exact.add(data.sample_ids, loaded.embedder.embed(data.features, data.labels))
        x = engine.test_data("digits").features[:20]
        queries = loaded.embedder.embed(
            torch.from_numpy(x),
            predicted_labels(engine.snapshot("digits").module, torch.from_numpy(x)),
        )
        truth = exact.search(queries, 10)
        answer = client.neighbors("digits", x, 10)
        got = [[n.sample_id for n in row] for row in answer.neighbors]
        # IVF visits some lists: its hits are real samples scored exactly, most of the true top.
        by_id = dict(zip(data.sample_ids.tolist(), range(len(data.sample_ids)), strict=True))
        vectors = loaded.embedder.embed(data.features, data.labels)
        for q, row in enumerate(answer.neighbors):
            for hit in row:
                expected = float(queries[q] @ vectors[by_id[hit.sample_id]])
                assert hit.score == pytest.approx(expected, rel=1e-4, abs=1e-6)
        recall = np.mean(
            [len(set(g) & set(t)) / 10 for g, t in zip(got, truth.ids.tolist(), strict=True)]
        )
        assert recall >= 0.6, recall


def test_a_restarted_server_re_embeds_only_the_final_block(state_dir: Path) -> None:
    running = start(Settings(state_dir=state_dir, port=0))
    with Client(running.target, timeout=60.0) as client:
        _ready(client)
        _, before, before_ids = running.forget.index.training_embeddings("digits")  # type: ignore[union-attr,misc]
        assert client.get_model("digits").index.embedded_parameters == ()  # every one
    running.stop(grace=0.5)
    running = start(Settings(state_dir=state_dir, port=0))
    try:
        index = running.forget.index
        assert index is not None
        cached = index._embeddings.peek("digits")
        assert cached is not None  # read back from the persisted flat index
        assert np.array_equal(cached.ids, before_ids)
        torch.testing.assert_close(cached.vectors, before)
        with Client(running.target, timeout=60.0) as client:
            victims = before_ids[:2].tolist()
            client.forget(
                "digits", sample_ids=victims, request_id="r", selection="lcodec_cg", wait=True
            )
            _, after, ids = index.training_embeddings("digits")  # type: ignore[misc]
        width = index._embeddings.peek("digits").embedder.block_width  # type: ignore[union-attr]
        rows = [before_ids.tolist().index(i) for i in ids.tolist()]
        assert not set(victims) & set(ids.tolist())
        torch.testing.assert_close(after[:, :-width], before[rows, :-width])
    finally:
        running.stop(grace=0.5)


def test_pruning_at_a_commit_never_waits_for_an_embedding_and_reaches_it() -> None:
    import threading

    from expunge.defenses.embeddings import EmbeddingConfig, GradientEmbedder
    from expunge.defenses.training import Checkpoint
    from expunge.server.index.embeddings import STALE, EmbeddingCache, EmbeddingKey

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    checkpoints = [Checkpoint(0, 0.1, model.state_dict()), Checkpoint(1, 0.1, model.state_dict())]
    embedder = GradientEmbedder(model, checkpoints, EmbeddingConfig(projection_dim=4))
    key = EmbeddingKey("trajectory", None, embedder.dim)
    x, y, ids = torch.randn(10, 4), torch.randint(0, 3, (10,)), np.arange(10, dtype=np.int64)
    cache = EmbeddingCache(shard_size=2)
    halfway, go_on = threading.Event(), threading.Event()

    def slow(fraction: float) -> None:
        if fraction >= 0.5:
            halfway.set()
            go_on.wait(30)

    worker = threading.Thread(target=cache.get, args=("m", 1, key, embedder, (x, y, ids), slow))
    worker.start()
    assert halfway.wait(30)
    # A forget commits while the embedding runs: the pruning returns at once...
    pruner = threading.Thread(target=cache.keep_only, args=("m", ids[3:]))
    pruner.start()
    pruner.join(5)
    assert not pruner.is_alive()
    go_on.set()
    worker.join(30)
    # ...and the embedding that ends afterwards is kept pruned: no forgotten row survives.
    kept = cache.peek("m")
    assert kept is not None and kept.version == STALE
    assert kept.ids.tolist() == list(range(3, 10))
    assert not kept.vectors[:, -embedder.block_width :].any()
