"""``expunge.client.Client``: a typed, retrying, blocking client for the Expunge service.

Every method raises an ``ExpungeError`` subclass named after the gRPC status (see
``expunge.client.errors``): ``NotFoundError`` for an unknown model, version or operation,
``InvalidArgumentError`` for a bad argument (``violations`` names the field),
``PermissionDeniedError`` when the token's role may not make the call, and
``UnavailableError`` once the retries are spent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc
import numpy as np

from expunge.v1 import expunge_pb2 as pb

from . import calls, wire
from . import types as t
from .calls import ClientBase, Exchange, ProgressCallback, model_name, operation_name
from .errors import from_rpc_error

T = TypeVar("T")
R = TypeVar("R")


class Client(ClientBase):
    """Talks to one Expunge server; ``with Client(target) as c:`` closes the channel.

    ``timeout`` is the default per-call deadline in seconds; each method takes its own.
    Calls that fail with UNAVAILABLE are retried ``retries`` times with jittered
    exponential backoff from ``backoff`` seconds; every other error is raised at once as
    an ``ExpungeError``. ``token`` is sent as a bearer token; ``root_certificates`` (PEM,
    a path or bytes) switches to TLS, with ``client_certificate`` and ``client_key`` for
    mutual TLS. Predict, Neighbors and a plain Scan send inputs larger than
    ``max_message_bytes`` or ``max_batch_inputs`` (the server's batch limit) as several
    calls.
    """

    _channel: grpc.Channel

    def _open_channel(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> grpc.Channel:
        if credentials is not None:
            return grpc.secure_channel(target, credentials, options)
        return grpc.insecure_channel(target, options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls made afterwards fail."""
        self._channel.close()

    # Plumbing ---------------------------------------------------------------------------

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        for attempt in range(self.retries + 1):
            try:
                return method(request, **self._options(timeout))
            except grpc.RpcError as exc:
                time.sleep(self._retry_delay(exc, attempt))
        raise AssertionError("unreachable")

    def _stream(
        self, method: Callable[..., Iterator[T]], request: Any, timeout: float | None
    ) -> Iterator[T]:
        for attempt in range(self.retries + 1):
            received = False
            try:
                for item in method(request, **self._options(timeout)):
                    received = True
                    yield item
                return
            except grpc.RpcError as exc:
                time.sleep(self._retry_delay(exc, attempt, received))

    def _exchange(
        self, method: Callable[..., Any], exchange: Exchange[Any, Any, R], timeout: float | None
    ) -> R:
        """Send each request the exchange yields and give it the reply (batches, pages)."""
        request = next(exchange)
        while True:
            reply = self._call(method, request, timeout)
            try:
                request = exchange.send(reply)
            except StopIteration as done:
                return done.value

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's health from the standard gRPC health service: "SERVING",
        "NOT_SERVING", ...; ``service`` "" is the server as a whole."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    # Models -----------------------------------------------------------------------------

    def list_models(self, timeout: float | None = None) -> list[t.ModelInfo]:
        """Every model the server holds, with its current version and index state."""
        reply = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [wire.model(m) for m in reply.models]

    def get_model(self, name: str, timeout: float | None = None) -> t.ModelInfo:
        """One model (``"digits"`` or ``"models/digits"``); NotFoundError if unknown."""
        request = pb.GetModelRequest(name=model_name(name))
        return wire.model(self._call(self._stub.GetModel, request, timeout))

    def list_versions(
        self, model: str, page_size: int = 0, timeout: float | None = None
    ) -> list[t.VersionInfo]:
        """Every version of a model, oldest first, following pages; NotFoundError if the
        model is unknown."""
        return self._exchange(
            self._stub.ListVersions, calls.list_versions(model, page_size), timeout
        )

    def export_model(self, model: str, version: int = 0, timeout: float | None = None) -> bytes:
        """The weights of a version (0: the current one) as safetensors bytes.

        Raises NotFoundError for an unknown model or version, FailedPreconditionError for a
        version trained on data forgotten since, and ExpungeError (DATA_LOSS) when the
        bytes do not match the SHA-256 the server sent.
        """
        request = calls.export_request(model, version)
        return calls.exported_weights(list(self._stream(self._stub.ExportModel, request, timeout)))

    def import_model(
        self, directory: Path | str, name: str, timeout: float | None = 3600.0
    ) -> t.ModelInfo:
        """Create ``name`` from a model repository trained elsewhere (admin only).

        ``directory`` holds ``expunge.toml`` and the files it names; its data files
        (``.toml``, ``.safetensors``, ``.npz``, ``.parquet``) are uploaded in pieces, nothing
        else is sent. The server validates the repository (InvalidArgumentError names the
        file and field) and builds the model's gradient index in the background. Raises
        AlreadyExistsError if ``name`` is taken. An upload is not retried.
        """
        pieces = calls.repository_pieces(directory, name)
        try:
            reply = self._stub.ImportModel(pieces, **self._options(timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return wire.model(reply)

    def rollback(self, model: str, version: int, timeout: float | None = None) -> t.ModelInfo:
        """Make an earlier version current again; returns the model.

        FailedPreconditionError for a version trained on data forgotten since (kept for
        the record only); NotFoundError for an unknown model or version.
        """
        request = calls.rollback_request(model, version)
        return wire.model(self._call(self._stub.RollbackModel, request, timeout))

    def predict(
        self, model: str, inputs: np.ndarray, version: int = 0, timeout: float | None = None
    ) -> t.Prediction:
        """Labels ``(n,)`` and class probabilities ``(n, C)`` of ``inputs`` ``(n, *input_shape)``.

        ``version`` 0 is the current version. Inputs beyond one message (or the server's
        batch limit) go as several calls, all answered by the version the first call used.
        InvalidArgumentError for inputs of the wrong shape or dtype, or not finite.
        """
        exchange = calls.predict(model, inputs, version, self.limits)
        return self._exchange(self._stub.Predict, exchange, timeout)

    # Forgetting ----------------------------------------------------------------------------

    def forget(
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
        """Ask the server to forget samples and/or owners; returns the operation.

        Samples are named by integer id (``sample_ids``) or, for a model imported with
        string sample ids such as UUIDs, by those strings (``sample_keys``).
        ``selection`` "" or "auto" lets the server pick the path (the receipt's ``policy``
        says which and why); "retrain" asks for the exact retrain, any other value for
        that approximate update (see proto ForgetOptions); zero options take the server's
        defaults. Returns at once, or with ``wait=True`` once the operation is done
        (``on_progress`` gets each update; the receipt is in ``Operation.receipt``).
        ``request_id`` makes retries safe: a new one is generated when omitted, and the
        same id is reused for every retry of this call.

        Raises NotFoundError for an unknown model, InvalidArgumentError for unknown ids
        or options, AlreadyExistsError for a ``request_id`` used for another request, and
        FailedPreconditionError when the forget would remove every training sample.
        """
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
        op = wire.operation(self._call(self._stub.Forget, request, timeout))
        if not wait:
            return op
        return self.wait(op.name, on_progress=on_progress, timeout=wait_timeout)

    def retrain(
        self,
        model: str,
        *,
        request_id: str | None = None,
        wait: bool = False,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        wait_timeout: float = 600.0,
    ) -> t.Operation:
        """Ask for an exact retrain on the current training data (a fresh noise budget).

        Queued behind the forgets already accepted; returns the operation at once, or
        with ``wait=True`` once it is done. ``request_id`` makes retries safe, as in
        forget. NotFoundError for an unknown model.
        """
        request = calls.retrain_request(model, request_id)
        op = wire.operation(self._call(self._stub.RetrainModel, request, timeout))
        if not wait:
            return op
        return self.wait(op.name, on_progress=on_progress, timeout=wait_timeout)

    def get_operation(self, name: str, timeout: float | None = None) -> t.Operation:
        """An operation's state now (``"<id>"`` or ``"operations/<id>"``); NotFoundError if
        unknown."""
        request = pb.GetOperationRequest(name=operation_name(name))
        return wire.operation(self._call(self._stub.GetOperation, request, timeout))

    def watch_operation(self, name: str, timeout: float | None = 600.0) -> Iterator[t.Operation]:
        """The operation's state at each change, until it is done (or ``timeout`` seconds,
        then DeadlineExceededError). NotFoundError if unknown."""
        request = pb.GetOperationRequest(name=operation_name(name))
        for msg in self._stream(self._stub.WatchOperation, request, timeout):
            yield wire.operation(msg)

    def wait(
        self, name: str, on_progress: ProgressCallback | None = None, timeout: float = 600.0
    ) -> t.Operation:
        """Follow an operation until it is done and return its final state.

        ``on_progress`` is called with each update. A failed operation is returned, not
        raised: see ``state`` and ``error_message``. DeadlineExceededError if it is not
        done within ``timeout`` seconds; NotFoundError if unknown.
        """
        last = self.get_operation(name)
        if last.done:
            return last
        for op in self.watch_operation(name, timeout=timeout):
            last = op
            if on_progress is not None:
                on_progress(op)
            if op.done:
                break
        return last

    def cancel_operation(self, name: str, timeout: float | None = None) -> t.Operation:
        """Cancel an operation that has not committed; returns its state after the request
        (a finished operation is left as it is). NotFoundError if unknown."""
        request = pb.CancelOperationRequest(name=operation_name(name))
        return wire.operation(self._call(self._stub.CancelOperation, request, timeout))

    def list_operations(
        self,
        model: str = "",
        states: Sequence[t.OperationState] = (),
        limit: int | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> list[t.Operation]:
        """Forget and retrain operations, newest first, across pages.

        ``model`` narrows them to one model, ``states`` to those states (e.g. ``("PENDING",
        "RUNNING")`` for the work still to finish); ``limit`` stops after that many.
        ValueError for an unknown state; NotFoundError for an unknown model.
        """
        exchange = calls.list_operations(model, states, limit, page_size)
        return self._exchange(self._stub.ListOperations, exchange, timeout)

    # Scanning and neighbours -----------------------------------------------------------------

    def scan(
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
    ) -> Iterator[t.ScanResult]:
        """Per-input target-identification results for ``inputs`` ``(n, *input_shape)``.

        Without ``mitigate`` or ``dry_run`` they stream as the server computes them. With
        ``mitigate`` the server names the attack set of the flagged inputs, forgets it only
        if its removal is confirmed against a random control, rescans the flagged inputs,
        and then sends every result (flagged ones carry ``mitigation``); ``dry_run`` does
        the same but forgets nothing (``mitigation.sample_ids`` is the plan).

        Without either, inputs beyond one message (or the server's batch limit) go as
        several calls; the results' ``index`` counts over all of ``inputs``. A mitigation
        weighs the flagged inputs together, so its inputs must fit one call
        (InvalidArgumentError otherwise). FailedPreconditionError for a model without
        training checkpoints or a held-out set.
        """
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
            for msg in self._stream(self._stub.Scan, request, timeout):
                yield results.add(msg, part)

    def estimate_scan(
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
        return wire.scan_estimate(self._call(self._stub.EstimateScan, request, timeout))

    def neighbors(
        self,
        model: str,
        inputs: np.ndarray,
        k: int = 10,
        *,
        mode: t.NeighborMode = "proponents",
        label: int | None = None,
        timeout: float | None = None,
    ) -> t.NeighborsResult:
        """The ``k`` training samples nearest each of ``inputs`` ``(n, *input_shape)`` in the
        gradient index: those that most support its prediction (``mode`` "proponents") or
        most oppose it ("opponents"), only of class ``label`` when given.

        Inputs beyond one message (or the server's batch limit) go as several calls; all
        of them must be answered by the same model version and index embedding
        (AbortedError otherwise). FailedPreconditionError while the index is still being
        built (``get_model(...).index.state`` says when it is "READY").
        """
        exchange = calls.neighbors(model, inputs, k, mode, label, self.limits)
        return self._exchange(self._stub.Neighbors, exchange, timeout)

    def audit(
        self, model: str = "", page_size: int = 0, timeout: float | None = None
    ) -> list[t.AuditEvent]:
        """The audit log (who did what, when), oldest first, across pages; ``model``
        narrows it to one model. Admin only: PermissionDeniedError for another role."""
        return self._exchange(self._stub.ListAudit, calls.audit(model, page_size), timeout)
