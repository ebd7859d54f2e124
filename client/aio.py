"""``expunge.client.AsyncClient``: the ``Client`` on asyncio (``grpc.aio``).

The same constructor options, methods, results and exceptions as ``Client`` (see its
docstrings for the details of each call), with ``async def`` methods and async iterators
for the streams (``watch_operation``, ``scan``). Requests, batching and retries are
shared with ``Client`` through ``calls``. Create it inside the event loop that uses it::

    async with AsyncClient("localhost:50051") as client:
        prediction = await client.predict("digits", inputs)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc
import grpc.aio
import numpy as np

from expunge.v1 import expunge_pb2 as pb

from . import calls, wire
from . import types as t
from .calls import ClientBase, Exchange, ProgressCallback, model_name, operation_name
from .errors import from_rpc_error

T = TypeVar("T")
R = TypeVar("R")


class AsyncClient(ClientBase):
    """Talks to one Expunge server from asyncio; ``async with AsyncClient(target) as c:``
    closes the channel. Options as ``Client``."""

    _channel: grpc.aio.Channel

    def _open_channel(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> grpc.aio.Channel:
        if credentials is not None:
            return grpc.aio.secure_channel(target, credentials, options)
        return grpc.aio.insecure_channel(target, options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel, cancelling calls in flight."""
        await self._channel.close(None)

    # Plumbing ---------------------------------------------------------------------------

    async def _call(
        self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None
    ) -> T:
        for attempt in range(self.retries + 1):
            try:
                return await method(request, **self._options(timeout))
            except grpc.RpcError as exc:
                await asyncio.sleep(self._retry_delay(exc, attempt))
        raise AssertionError("unreachable")

    async def _stream(
        self, method: Callable[..., Any], request: Any, timeout: float | None
    ) -> AsyncIterator[Any]:
        for attempt in range(self.retries + 1):
            received = False
            call = method(request, **self._options(timeout))
            try:
                async for item in call:
                    received = True
                    yield item
                return
            except grpc.RpcError as exc:
                await asyncio.sleep(self._retry_delay(exc, attempt, received))
            finally:
                call.cancel()  # a consumer that stopped early ends the stream now, not at GC

    async def _exchange(
        self, method: Callable[..., Any], exchange: Exchange[Any, Any, R], timeout: float | None
    ) -> R:
        """Send each request the exchange yields and give it the reply (batches, pages)."""
        request = next(exchange)
        while True:
            reply = await self._call(method, request, timeout)
            try:
                request = exchange.send(reply)
            except StopIteration as done:
                return done.value

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's health from the standard gRPC health service: "SERVING",
        "NOT_SERVING", ...; ``service`` "" is the server as a whole."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest(service=service)
        reply = await self._call(stub.Check, request, timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    # Models -----------------------------------------------------------------------------

    async def list_models(self, timeout: float | None = None) -> list[t.ModelInfo]:
        """Every model the server holds, with its current version and index state."""
        reply = await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [wire.model(m) for m in reply.models]

    async def get_model(self, name: str, timeout: float | None = None) -> t.ModelInfo:
        """One model (``"digits"`` or ``"models/digits"``); NotFoundError if unknown."""
        request = pb.GetModelRequest(name=model_name(name))
        return wire.model(await self._call(self._stub.GetModel, request, timeout))

    async def list_versions(
        self, model: str, page_size: int = 0, timeout: float | None = None
    ) -> list[t.VersionInfo]:
        """Every version of a model, oldest first, following pages; NotFoundError if the
        model is unknown."""
        exchange = calls.list_versions(model, page_size)
        return await self._exchange(self._stub.ListVersions, exchange, timeout)

    async def export_model(
        self, model: str, version: int = 0, timeout: float | None = None
    ) -> bytes:
        """The weights of a version (0: the current one) as safetensors bytes, checked
        against their SHA-256 (ExpungeError DATA_LOSS if they differ). NotFoundError for an
        unknown model or version."""
        request = calls.export_request(model, version)
        chunks = [c async for c in self._stream(self._stub.ExportModel, request, timeout)]
        return calls.exported_weights(chunks)

    async def import_model(
        self, directory: Path | str, name: str, timeout: float | None = 3600.0
    ) -> t.ModelInfo:
        """Create ``name`` from a model repository trained elsewhere (admin only), uploaded
        in pieces as ``Client.import_model`` does; the files are read off the event loop.
        InvalidArgumentError names a bad file and field; AlreadyExistsError if ``name`` is
        taken. An upload is not retried."""
        pieces = _off_loop(calls.repository_pieces(directory, name))
        try:
            reply = await self._stub.ImportModel(pieces, **self._options(timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return wire.model(reply)

    async def rollback(self, model: str, version: int, timeout: float | None = None) -> t.ModelInfo:
        """Make an earlier version current again; returns the model. FailedPreconditionError
        for a version trained on data forgotten since; NotFoundError if unknown."""
        request = calls.rollback_request(model, version)
        return wire.model(await self._call(self._stub.RollbackModel, request, timeout))

    async def predict(
        self, model: str, inputs: np.ndarray, version: int = 0, timeout: float | None = None
    ) -> t.Prediction:
        """Labels ``(n,)`` and class probabilities ``(n, C)`` of ``inputs`` ``(n, *input_shape)``
        by ``version`` (0: the current one), in batches as ``Client.predict``.
        InvalidArgumentError for inputs of the wrong shape or dtype, or not finite."""
        exchange = calls.predict(model, inputs, version, self.limits)
        return await self._exchange(self._stub.Predict, exchange, timeout)

    # Forgetting ----------------------------------------------------------------------------

    async def forget(
        self,
        model: str,
        *,
        sample_ids: Sequence[int] = (),
        owner_ids: Sequence[str] = (),
        sample_keys: Sequence[str] = (),
        request_id: str | None = None,
        wait: bool = False,
        on_progress: ProgressCallback | None = None,
        parameter_budget: int = 0,
        selection: t.Selection = "",
        hessian: t.Hessian = "",
        newton_iterations: int = 0,
        damping: float = 0.0,
        epsilon: float = 0.0,
        delta: float = 0.0,
        correct_non_convergence: bool = False,
        timeout: float | None = None,
        wait_timeout: float = 600.0,
    ) -> t.Operation:
        """Ask the server to forget samples and/or owners; returns the operation at once, or
        with ``wait=True`` once it is done (``on_progress`` gets each update). Options and
        errors as ``Client.forget``: NotFoundError for an unknown model,
        InvalidArgumentError for unknown ids or options, AlreadyExistsError for a
        ``request_id`` used for another request."""
        request = calls.forget_request(
            model,
            sample_ids=sample_ids,
            owner_ids=owner_ids,
            sample_keys=sample_keys,
            request_id=request_id,
            parameter_budget=parameter_budget,
            selection=selection,
            hessian=hessian,
            newton_iterations=newton_iterations,
            damping=damping,
            epsilon=epsilon,
            delta=delta,
            correct_non_convergence=correct_non_convergence,
        )
        op = wire.operation(await self._call(self._stub.Forget, request, timeout))
        if not wait:
            return op
        return await self.wait(op.name, on_progress=on_progress, timeout=wait_timeout)

    async def retrain(
        self,
        model: str,
        *,
        request_id: str | None = None,
        wait: bool = False,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        wait_timeout: float = 600.0,
    ) -> t.Operation:
        """Ask for an exact retrain on the current training data, queued behind the
        forgets already accepted; ``wait`` and ``request_id`` as in ``forget``.
        NotFoundError for an unknown model."""
        request = calls.retrain_request(model, request_id)
        op = wire.operation(await self._call(self._stub.RetrainModel, request, timeout))
        if not wait:
            return op
        return await self.wait(op.name, on_progress=on_progress, timeout=wait_timeout)

    async def get_operation(self, name: str, timeout: float | None = None) -> t.Operation:
        """An operation's state now (``"<id>"`` or ``"operations/<id>"``); NotFoundError if
        unknown."""
        request = pb.GetOperationRequest(name=operation_name(name))
        return wire.operation(await self._call(self._stub.GetOperation, request, timeout))

    async def watch_operation(
        self, name: str, timeout: float | None = 600.0
    ) -> AsyncIterator[t.Operation]:
        """The operation's state at each change, until it is done (or ``timeout`` seconds,
        then DeadlineExceededError). NotFoundError if unknown."""
        request = pb.GetOperationRequest(name=operation_name(name))
        async for msg in self._stream(self._stub.WatchOperation, request, timeout):
            yield wire.operation(msg)

    async def wait(
        self, name: str, on_progress: ProgressCallback | None = None, timeout: float = 600.0
    ) -> t.Operation:
        """Follow an operation until it is done and return its final state (a failed one
        is returned, not raised). ``on_progress`` is called with each update.
        DeadlineExceededError if not done within ``timeout`` seconds; NotFoundError if
        unknown."""
        last = await self.get_operation(name)
        if last.done:
            return last
        updates = self.watch_operation(name, timeout=timeout)
        try:
            async for op in updates:
                last = op
                if on_progress is not None:
                    on_progress(op)
                if op.done:
                    break
        finally:
            await updates.aclose()  # type: ignore[attr-defined]
        return last

    async def cancel_operation(self, name: str, timeout: float | None = None) -> t.Operation:
        """Cancel an operation that has not committed; returns its state after the request.
        NotFoundError if unknown."""
        request = pb.CancelOperationRequest(name=operation_name(name))
        return wire.operation(await self._call(self._stub.CancelOperation, request, timeout))

    async def list_operations(
        self,
        model: str = "",
        states: Sequence[t.OperationState] = (),
        limit: int | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> list[t.Operation]:
        """Forget and retrain operations, newest first, across pages; narrowed to ``model``
        and ``states`` when given, at most ``limit``. ValueError for an unknown state;
        NotFoundError for an unknown model."""
        exchange = calls.list_operations(model, states, limit, page_size)
        return await self._exchange(self._stub.ListOperations, exchange, timeout)

    # Scanning and neighbours -----------------------------------------------------------------

    async def scan(
        self,
        model: str,
        inputs: np.ndarray,
        *,
        estimator: t.Estimator | Literal[""] = "",
        max_implicated: int = 0,
        mitigate: bool = False,
        request_id: str | None = None,
        timeout: float | None = 600.0,
        dry_run: bool = False,
    ) -> AsyncIterator[t.ScanResult]:
        """Per-input target-identification results for ``inputs`` ``(n, *input_shape)``, as
        the server computes them; ``mitigate`` and ``dry_run`` as in ``Client.scan``.
        Without them large inputs go in batches, ``index`` counting over all of them; with
        them the inputs must fit one call (InvalidArgumentError otherwise)."""
        batches = calls.scan_batches(
            model,
            inputs,
            self.limits,
            estimator,
            max_implicated=max_implicated,
            mitigate=mitigate,
            request_id=request_id,
            dry_run=dry_run,
        )
        results = calls.ScanResults()
        for part, request in batches:
            async for msg in self._stream(self._stub.Scan, request, timeout):
                yield results.add(msg, part)

    async def estimate_scan(
        self,
        model: str,
        inputs: np.ndarray,
        estimator: t.Estimator | Literal[""] = "",
        timeout: float | None = None,
        *,
        mitigate: bool = False,
        dry_run: bool = False,
    ) -> t.ScanEstimate:
        """What ``scan`` with the same arguments will cost: scoring, this version's
        calibration if not stored yet, confirmations, and the mitigation if asked for."""
        request = calls.scan_request(model, inputs, estimator, mitigate=mitigate, dry_run=dry_run)
        return wire.scan_estimate(await self._call(self._stub.EstimateScan, request, timeout))

    async def neighbors(
        self,
        model: str,
        inputs: np.ndarray,
        k: int = 10,
        *,
        mode: t.NeighborMode = "proponents",
        label: int | None = None,
        timeout: float | None = None,
    ) -> t.NeighborsResult:
        """The ``k`` training samples nearest each input in the gradient index
        (``"proponents"`` support its prediction, ``"opponents"`` oppose it), only of class
        ``label`` when given; batched as ``Client.neighbors``. FailedPreconditionError while
        the index is still being built."""
        exchange = calls.neighbors(model, inputs, k, mode, label, self.limits)
        return await self._exchange(self._stub.Neighbors, exchange, timeout)

    async def audit(
        self, model: str = "", page_size: int = 0, timeout: float | None = None
    ) -> list[t.AuditEvent]:
        """The audit log, oldest first, across pages; ``model`` narrows it to one model.
        Admin only: PermissionDeniedError for another role."""
        return await self._exchange(self._stub.ListAudit, calls.audit(model, page_size), timeout)


async def _off_loop(items: Iterator[T]) -> AsyncIterator[T]:
    """Each item of a blocking iterator (file reads), computed in a worker thread."""
    done = object()
    while (item := await asyncio.to_thread(next, items, done)) is not done:
        yield item  # type: ignore[misc]
