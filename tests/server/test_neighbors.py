"""Neighbors through the real server: exact answers, in sync with forgets, persisted, validated."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from expunge.client import Client, FailedPreconditionError, InvalidArgumentError
from expunge.defenses.gradients import predicted_labels
from expunge.defenses.index import ExactTorchIndex
from expunge.server.main import start
from expunge.server.settings import Settings


def _wait_ready(client: Client, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.get_model("digits").index.state != "READY":
        assert time.monotonic() < deadline, "index never became READY"
        time.sleep(0.1)


def test_neighbors_equal_exact_search_over_the_same_embeddings(
    client: Client, server: object
) -> None:
    _wait_ready(client)
    engine = server.engine  # type: ignore[attr-defined]
    loaded = server.forget.index._loaded["digits"]  # type: ignore[attr-defined]
    data = engine.training_data("digits")
    oracle = ExactTorchIndex(loaded.embedder.dim)
    oracle.add(
        data.sample_ids, loaded.embedder.embed(data.features, data.labels), data.labels.numpy()
    )
    x = engine.test_data("digits").features[:6]
    queries = loaded.embedder.embed(
        torch.from_numpy(x), predicted_labels(engine.snapshot("digits").module, torch.from_numpy(x))
    )
    for mode, label in (("proponents", None), ("opponents", None), ("proponents", 3)):
        answer = client.neighbors("digits", x, 7, mode=mode, label=label)
        expected = oracle.search(queries, 7, mode=mode, label=label)  # type: ignore[arg-type]
        got = [[n.sample_id for n in row] for row in answer.neighbors]
        assert got == expected.ids.tolist()
        np.testing.assert_allclose(
            [[n.score for n in row] for row in answer.neighbors],
            expected.scores.numpy(),
            rtol=1e-4,
            atol=1e-6,
        )
        if label is not None:
            assert all(n.label == label for row in answer.neighbors for n in row)
    owners = dict(zip(data.sample_ids.tolist(), data.owner_ids.tolist(), strict=True))
    first = client.neighbors("digits", x[:1], 3).neighbors[0]
    assert all(n.owner_id == owners[n.sample_id] for n in first)


def test_forgotten_samples_leave_the_index_in_the_same_commit(
    client: Client, server: object
) -> None:
    _wait_ready(client)
    x = server.engine.test_data("digits").features[:20]  # type: ignore[attr-defined]
    before = client.neighbors("digits", x, 10)
    victims = sorted({n.sample_id for row in before.neighbors for n in row})[:15]
    size = client.get_model("digits").index.size
    jobs = server.forget.jobs  # type: ignore[attr-defined]
    index = server.forget.index  # type: ignore[attr-defined]
    index.stop()  # hold re-embedding back, to see the state right after the commit
    client.forget("digits", sample_ids=victims, request_id="nb", wait=True)
    assert jobs.wait_idle(60)
    after = client.neighbors("digits", x, 10)
    assert after.stale and after.embedded_version == 1 and after.model_version == 2
    assert not {n.sample_id for row in after.neighbors for n in row} & set(victims)
    assert client.get_model("digits").index.size == size - len(victims)


def test_the_index_is_persisted_and_reloaded(state_dir: Path) -> None:
    running = start(Settings(state_dir=state_dir, port=0))
    try:
        with Client(running.target) as client:
            _wait_ready(client)
    finally:
        running.stop(0)
    running = start(Settings(state_dir=state_dir, port=0))
    try:
        with Client(running.target) as client:
            # Loaded from its blob during start-up: ready without a rebuild.
            assert client.get_model("digits").index.state == "READY"
    finally:
        running.stop(0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"k": 0}, "k"),
        ({"k": 100_000}, "k"),
        ({"k": 3, "mode": "sideways"}, "mode"),
        ({"k": 3, "label": 10}, "label"),
    ],
)
def test_bad_neighbor_requests_are_invalid_argument(
    client: Client, server: object, kwargs: dict, field: str
) -> None:
    _wait_ready(client)
    x = server.engine.test_data("digits").features[:1]  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgumentError) as info:
        client.neighbors("digits", x, **kwargs)
    assert info.value.violations[0].field == field
    with pytest.raises(InvalidArgumentError, match="shape"):
        client.neighbors("digits", np.zeros((1, 64), np.float32), 3)


def test_no_index_is_failed_precondition(state_dir: Path) -> None:
    running = start(Settings(state_dir=state_dir, port=0, build_index=False))
    try:
        with Client(running.target) as client:
            with pytest.raises(FailedPreconditionError, match="without a gradient index"):
                client.neighbors("digits", np.zeros((1, 1, 8, 8), np.float32), 3)
    finally:
        running.stop(0)


def test_an_index_that_would_not_fit_is_refused_with_its_reason(state_dir: Path) -> None:
    running = start(Settings(state_dir=state_dir, port=0, index_memory_bytes=1024))
    try:
        with Client(running.target) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.neighbors("digits", np.zeros((1, 1, 8, 8), np.float32), 3)
                except FailedPreconditionError as exc:
                    if "budget" in exc.message:
                        break
                assert time.monotonic() < deadline, "the refusal never surfaced"
                time.sleep(0.1)
            assert client.get_model("digits").index.state == "ABSENT"
    finally:
        running.stop(0)


def test_a_persisted_index_not_in_memory_loses_forgotten_ids_in_the_commit(
    client: Client, server: object
) -> None:
    from expunge.server.index.service import ARTEFACT, unpack_index

    _wait_ready(client)
    engine = server.engine  # type: ignore[attr-defined]
    index = server.forget.index  # type: ignore[attr-defined]
    index.stop()  # no rebuild after the commit: the artefact is what the commit wrote
    with index._lock:
        del index._loaded["digits"]  # on disk only, as before a load or after a failed one
    victims = engine.training_data("digits").sample_ids[:5].tolist()
    client.forget("digits", sample_ids=victims, request_id="disk", wait=True)
    blob = engine.store.query(
        "SELECT blob FROM artefacts WHERE model = ? AND kind = ?", ("digits", ARTEFACT)
    )[0][0]
    persisted = set(unpack_index(engine.store.blobs.get(blob)).ids().tolist())
    assert not persisted & set(victims)
    assert len(persisted) == len(engine.training_data("digits").sample_ids)


def test_derived_training_caches_are_dropped_at_the_commit(client: Client, server: object) -> None:
    _wait_ready(client)
    engine = server.engine  # type: ignore[attr-defined]
    index = server.forget.index  # type: ignore[attr-defined]
    index.stop()
    embeddings = index.training_embeddings("digits")
    assert embeddings is not None
    _, before, before_ids = embeddings
    victims = engine.training_data("digits").sample_ids[:3].tolist()
    assert set(victims) <= set(before_ids.tolist())
    trajectory = engine.model_row("digits").checkpoints_blob
    # A targeted update keeps the training trajectory (a retrain would replace it).
    client.forget(
        "digits", sample_ids=victims, request_id="caches", selection="lcodec_cg", wait=True
    )
    assert engine.model_row("digits").checkpoints_blob == trajectory
    # Per-sample embeddings of the forgotten samples are gone at the commit; the others
    # keep their trajectory blocks, and their final block (the old weights') is dropped.
    cached = index._embeddings.peek("digits")
    assert not set(cached.ids.tolist()) & set(victims)
    width = cached.embedder.block_width
    assert not cached.vectors[:, -width:].any()
    _, vectors, ids = index.training_embeddings("digits")
    assert not set(ids.tolist()) & set(victims) and len(vectors) == len(ids)
    # Only the final block was embedded again: the trajectory blocks are the same numbers.
    rows = [before_ids.tolist().index(i) for i in ids.tolist()]
    assert torch.equal(vectors[:, :-width], before[rows, :-width])
    assert not torch.equal(vectors[:, -width:], before[rows, -width:])
