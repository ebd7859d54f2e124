"""Inputs beyond one message: the client splits them and reassembles the answers in order."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from expunge.client import Client, InvalidArgumentError, ResourceExhaustedError
from expunge.client.batching import BatchLimits, row_slices
from expunge.server.main import start
from expunge.server.settings import Settings

MESSAGE_BYTES = 128 * 1024
MAX_BATCH = 100


@pytest.fixture
def small_server(state_dir: Path) -> Iterator[object]:
    running = start(
        Settings(state_dir=state_dir, port=0, max_message_bytes=MESSAGE_BYTES, max_batch=MAX_BATCH)
    )
    yield running
    running.stop(grace=0.5)


def _wait_for_index(client: Client) -> None:
    # Neighbors needs it, and a scan scores from it once it is READY (exact GAS before).
    deadline = time.monotonic() + 120
    while client.get_model("digits").index.state != "READY":
        assert time.monotonic() < deadline, "index never became READY"
        time.sleep(0.1)


def _inputs(server: object, count: int) -> np.ndarray:
    test = server.engine.test_data("digits").features  # type: ignore[attr-defined]
    return test[np.arange(count) % len(test)].astype(np.float32)


def test_rows_per_batch_fit_the_request_the_reply_and_the_input_limit() -> None:
    limits = BatchLimits(max_message_bytes=1_000_000, max_inputs=500)
    assert limits.rows_per_batch(4_000, 10) == (1_000_000 - 65_536) // 4_000  # request
    assert limits.rows_per_batch(10, 8_000) == (1_000_000 - 65_536) // 8_000  # reply
    assert limits.rows_per_batch(10, 10) == 500  # the server's input limit
    assert limits.rows_per_batch(10**7, 0) == 1  # one row always goes
    assert [(s.start, s.stop) for s in row_slices(7, 3)] == [(0, 3), (3, 6), (6, 7)]


def test_predict_and_neighbors_split_large_inputs_and_keep_their_order(
    small_server: object,
) -> None:
    inputs = _inputs(small_server, 700)  # 179 KB of 8x8 images: over both limits
    with Client(small_server.target, timeout=120) as unsplit:  # type: ignore[attr-defined]
        with pytest.raises(ResourceExhaustedError):
            unsplit.predict("digits", inputs)
    with Client(
        small_server.target,  # type: ignore[attr-defined]
        timeout=120,
        max_message_bytes=MESSAGE_BYTES,
        max_batch_inputs=MAX_BATCH,
    ) as client:
        answer = client.predict("digits", inputs)
        module = small_server.engine.snapshot("digits").module  # type: ignore[attr-defined]
        with torch.no_grad():
            expected = torch.softmax(module(torch.from_numpy(inputs)), dim=1).numpy()
        assert answer.labels.shape == (700,) and answer.probabilities.shape == expected.shape
        np.testing.assert_allclose(answer.probabilities, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(answer.labels, expected.argmax(axis=1))
        assert answer.version == 1

        _wait_for_index(client)
        near = client.neighbors("digits", inputs[:250], 5)
        one_by_one = [client.neighbors("digits", inputs[i : i + 1], 5) for i in range(0, 250, 7)]
        assert len(near.neighbors) == 250
        for i, single in zip(range(0, 250, 7), one_by_one, strict=True):
            assert [n.sample_id for n in near.neighbors[i]] == [
                n.sample_id for n in single.neighbors[0]
            ]
        assert near.model_version == 1


def test_a_plain_scan_splits_and_numbers_over_every_input(small_server: object) -> None:
    inputs = _inputs(small_server, 40)
    target = small_server.target  # type: ignore[attr-defined]
    with (
        Client(target, timeout=600) as whole,
        Client(target, timeout=600, max_batch_inputs=16) as batched,
    ):
        _wait_for_index(whole)
        expected = list(whole.scan("digits", inputs))
        got = list(batched.scan("digits", inputs))
        assert [r.index for r in got] == list(range(40))
        key = [(r.index, r.predicted_label, r.target_score, r.p_value, r.flagged) for r in got]
        assert key == [
            (r.index, r.predicted_label, r.target_score, r.p_value, r.flagged) for r in expected
        ]
        with pytest.raises(InvalidArgumentError, match="must fit one call"):
            list(batched.scan("digits", inputs, dry_run=True))
