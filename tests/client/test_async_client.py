"""AsyncClient against the real server: the sync Client's answers, errors, batching, retries."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from sklearn.datasets import load_digits

from expunge.client import (
    AlreadyExistsError,
    AsyncClient,
    Client,
    InvalidArgumentError,
    NotFoundError,
    Operation,
    UnavailableError,
)

T = TypeVar("T")
# A batch of 7 rows may round differently in the model's matmul than the whole input.
RTOL, ATOL = 1e-5, 1e-7


def _run(test: Callable[[AsyncClient], Awaitable[T]], target: str, **options: Any) -> T:
    """Run ``test`` with an AsyncClient opened (and closed) in a fresh event loop."""

    async def main() -> T:
        async with AsyncClient(target, **{"timeout": 60.0, "retries": 1, **options}) as client:
            return await test(client)

    return asyncio.run(main())


def _digits(n: int) -> np.ndarray:
    return (load_digits().data[:n] / 16.0).astype(np.float32).reshape(n, 1, 8, 8)


async def _index_ready(client: AsyncClient, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (await client.get_model("digits")).index.state != "READY":
        assert time.monotonic() < deadline, "index never became READY"
        await asyncio.sleep(0.1)


def test_models_and_predictions_equal_the_sync_clients(server: Any, client: Client) -> None:
    x = _digits(20)

    async def calls(c: AsyncClient) -> tuple[Any, ...]:
        return (
            await c.health(),
            await c.list_models(),
            await c.get_model("models/digits"),
            await c.list_versions("digits"),
            await c.predict("digits", x),
            await c.export_model("digits"),
        )

    health, models, model, versions, prediction, weights = _run(calls, server.target)
    assert health == "SERVING"
    assert models == client.list_models()
    assert model == client.get_model("digits")
    assert versions == client.list_versions("digits")
    expected = client.predict("digits", x)
    np.testing.assert_array_equal(prediction.labels, expected.labels)
    np.testing.assert_array_equal(prediction.probabilities, expected.probabilities)
    assert prediction.version == expected.version == 1
    assert weights == client.export_model("digits")


def test_errors_are_the_sync_clients(server: Any, client: Client) -> None:
    async def unknown(c: AsyncClient) -> None:
        await c.get_model("nosuch")

    with pytest.raises(NotFoundError) as sync_error:
        client.get_model("nosuch")
    with pytest.raises(NotFoundError) as async_error:
        _run(unknown, server.target)
    assert async_error.value.message == sync_error.value.message
    assert "nosuch" in async_error.value.message

    # grpc.aio's errors carry the BadRequest field violations too.
    async def not_finite(c: AsyncClient) -> None:
        await c.predict("digits", np.full((1, 1, 8, 8), np.nan, np.float32))

    with pytest.raises(InvalidArgumentError, match="NaN") as invalid:
        _run(not_finite, server.target)
    assert [v.field for v in invalid.value.violations] == ["inputs[0]"]

    async def bad_state(c: AsyncClient) -> None:
        await c.list_operations(states=["DONE"])  # type: ignore[list-item]

    with pytest.raises(ValueError, match="unknown operation states"):
        _run(bad_state, server.target)


def test_a_large_predict_goes_in_batches_with_one_calls_answer(server: Any) -> None:
    x = _digits(30)
    sent: list[int] = []

    async def batched(c: AsyncClient) -> Any:
        predict = c._stub.Predict

        def counting(request: Any, **kwargs: Any) -> Any:
            sent.append(request.inputs.shape[0])
            return predict(request, **kwargs)

        c._stub.Predict = counting
        return await c.predict("digits", x)

    async def whole(c: AsyncClient) -> Any:
        return await c.predict("digits", x)

    parts = _run(batched, server.target, max_batch_inputs=7)
    one = _run(whole, server.target)
    assert sent == [7, 7, 7, 7, 2]
    np.testing.assert_array_equal(parts.labels, one.labels)
    np.testing.assert_allclose(parts.probabilities, one.probabilities, rtol=RTOL, atol=ATOL)


def test_forgets_an_owner_and_follows_the_operation(server: Any) -> None:
    data = server.engine.training_data("digits")
    owner = str(data.owner_ids[0])
    removed = int((data.owner_ids == owner).sum())
    updates: list[Operation] = []

    async def forget(c: AsyncClient) -> tuple[Operation, ...]:
        op = await c.forget(
            "digits", owner_ids=[owner], request_id="aio-1", wait=True, on_progress=updates.append
        )
        watched = [o async for o in c.watch_operation(op.name)]
        listed = await c.list_operations("digits", states=["SUCCEEDED"])
        return op, await c.get_operation("aio-1"), watched[-1], *listed

    op, got, watched, *listed = _run(forget, server.target)
    assert op.state == "SUCCEEDED" and op.done and op.receipt is not None
    assert op.receipt.removed_samples == removed and op.receipt.removed_owners == 1
    assert updates and updates[-1].done
    assert got == watched == op
    assert [o.name for o in listed] == [op.name] == ["operations/aio-1"]
    after = server.engine.training_data("digits")
    assert owner not in set(after.owner_ids.tolist())


def test_scan_neighbors_and_audit(server: Any, client: Client) -> None:
    x = _digits(3)

    async def calls(c: AsyncClient) -> tuple[Any, ...]:
        results = [r async for r in c.scan("digits", x)]
        await _index_ready(c)
        nearest = await c.neighbors("digits", x, 4)
        farthest = await c.neighbors("digits", x, 4, mode="opponents", label=2)
        return results, nearest, farthest, await c.audit("digits")

    results, nearest, farthest, events = _run(calls, server.target)
    assert [r.index for r in results] == [0, 1, 2]
    assert all(r.model_version == 1 for r in results)
    np.testing.assert_array_equal(
        [r.predicted_label for r in results], client.predict("digits", x).labels
    )
    assert nearest == client.neighbors("digits", x, 4)
    assert len(nearest.neighbors) == 3 and all(len(row) == 4 for row in nearest.neighbors)
    assert all(n.label == 2 for row in farthest.neighbors for n in row)
    assert {"scan", "neighbors"} <= {e.action for e in events}


def test_imports_a_model_repository(tmp_path: Path) -> None:
    from expunge.server.main import start
    from expunge.server.settings import Settings
    from tests.server.test_import import _write_repository

    repo = tmp_path / "repo"
    _write_repository(repo, training=False, checkpoints=False)
    running = start(Settings(state_dir=tmp_path / "state", port=0))

    async def upload(c: AsyncClient) -> Any:
        info = await c.import_model(repo, "cancer")
        assert [m.name for m in await c.list_models()] == [info.name]
        with pytest.raises(AlreadyExistsError):
            await c.import_model(repo, "cancer")
        with pytest.raises(InvalidArgumentError, match=r"no expunge\.toml"):
            await c.import_model(tmp_path, "other")
        return info

    try:
        info = _run(upload, running.target)
    finally:
        running.stop(0)
    assert info.name == "models/cancer" and info.num_training_samples == 455


def test_unavailable_is_retried_then_raised() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    attempts = 0

    async def list_models(c: AsyncClient) -> None:
        original = c._stub.ListModels

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal attempts
            attempts += 1
            return original(*args, **kwargs)

        c._stub.ListModels = counting
        await c.list_models()

    with pytest.raises(UnavailableError):
        _run(list_models, f"127.0.0.1:{port}", retries=1, backoff=0.05, timeout=5)
    assert attempts == 2
