"""``expunge.client.Client``: a typed, retrying client for the Expunge service."""

from __future__ import annotations

import hashlib
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc
import numpy as np

from expunge.v1 import expunge_pb2 as pb
from expunge.v1 import expunge_pb2_grpc as pb_grpc

from . import types as t
from . import wire
from .batching import BatchLimits, request_row_bytes, row_slices
from .errors import AbortedError, ExpungeError, InvalidArgumentError, from_rpc_error

T = TypeVar("T")
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BATCH_INPUTS = 4096  # the server's default max_batch
# Reply bytes per input a batch is sized for: Predict's probabilities (float32) for up to
# 1,000 classes; per neighbour (id, owner id, label, score) with a 64-character owner id.
PREDICT_REPLY_ROW_BYTES = 4 * 1024 + 16
NEIGHBOR_REPLY_BYTES = 100
# ImportModel: the files a model repository may hold, and the size of each piece sent.
REPOSITORY_SUFFIXES = (".toml", ".safetensors", ".npz", ".parquet")
UPLOAD_PIECE_BYTES = 1024 * 1024


class Client:
    """Talks to one Expunge server.

    ``timeout`` is the default per-call deadline in seconds; each method takes its own.
    Calls that fail with UNAVAILABLE are retried ``retries`` times with jittered
    exponential backoff; every other error is raised at once as an ``ExpungeError``.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: Path | bytes | None = None,
        client_certificate: Path | bytes | None = None,
        client_key: Path | bytes | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_batch_inputs: int = DEFAULT_MAX_BATCH_INPUTS,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(
                _read(root_certificates), _read(client_key), _read(client_certificate)
            )
            self._channel = grpc.secure_channel(target, credentials, options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        self._stub = pb_grpc.ExpungeStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        # Predict, Neighbors and a plain Scan split larger inputs into calls within these.
        self.limits = BatchLimits(max_message_bytes, max_batch_inputs)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # Plumbing ---------------------------------------------------------------------------

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:  # type: ignore[attr-defined]
                    raise from_rpc_error(exc) from None
                self._sleep(attempt)
        raise AssertionError("unreachable")

    def _stream(
        self, method: Callable[..., Iterator[T]], request: Any, timeout: float | None
    ) -> Iterator[T]:
        # A stream is retried only until its first message: later, a retry could repeat work.
        for attempt in range(self.retries + 1):
            received = False
            try:
                for item in method(
                    request, timeout=timeout or self.timeout, metadata=self._metadata
                ):
                    received = True
                    yield item
                return
            except grpc.RpcError as exc:
                retryable = exc.code() == grpc.StatusCode.UNAVAILABLE and not received  # type: ignore[attr-defined]
                if not retryable or attempt == self.retries:
                    raise from_rpc_error(exc) from None
                self._sleep(attempt)

    def _sleep(self, attempt: int) -> None:
        time.sleep(self.backoff * (2**attempt) * (0.5 + random.random()))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """SERVING, NOT_SERVING, ... from the standard gRPC health service."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    # Models -----------------------------------------------------------------------------

    def list_models(self, timeout: float | None = None) -> list[t.ModelInfo]:
        reply = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [wire.model(m) for m in reply.models]

    def get_model(self, name: str, timeout: float | None = None) -> t.ModelInfo:
        return wire.model(
            self._call(self._stub.GetModel, pb.GetModelRequest(name=_model(name)), timeout)
        )

    def list_versions(
        self, model: str, page_size: int = 0, timeout: float | None = None
    ) -> list[t.VersionInfo]:
        """Every version of a model, following pages."""
        versions: list[t.VersionInfo] = []
        token = ""
        while True:
            request = pb.ListVersionsRequest(
                model=_model(model), page_size=page_size, page_token=token
            )
            reply = self._call(self._stub.ListVersions, request, timeout)
            versions += [wire.version(v) for v in reply.versions]
            token = reply.next_page_token
            if not token:
                return versions

    def export_model(self, model: str, version: int = 0, timeout: float | None = None) -> bytes:
        """The weights of a version as safetensors bytes, checked against their SHA-256."""
        name = _model(model) + (f"/versions/{version}" if version else "")
        chunks: list[bytes] = []
        expected = ""
        for chunk in self._stream(
            self._stub.ExportModel, pb.ExportModelRequest(name=name), timeout
        ):
            chunks.append(chunk.data)
            expected = chunk.weights_sha256
        data = b"".join(chunks)
        if hashlib.sha256(data).hexdigest() != expected:
            raise ExpungeError(
                grpc.StatusCode.DATA_LOSS, "exported weights do not match their SHA-256"
            )
        return data

    def import_model(
        self, directory: Path | str, name: str, timeout: float | None = 3600.0
    ) -> t.ModelInfo:
        """Create ``name`` from a model repository trained elsewhere (admin only).

        ``directory`` holds ``expunge.toml`` and the files it names; its data files
        (``.toml``, ``.safetensors``, ``.npz``, ``.parquet``) are uploaded in pieces, nothing else is
        sent. The server validates the repository (errors name the file and field) and
        builds the model's gradient index in the background.
        """
        root = Path(directory)
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix in REPOSITORY_SUFFIXES
        )
        if not (root / "expunge.toml").is_file():
            raise InvalidArgumentError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{root}: no expunge.toml manifest here"
            )

        def pieces() -> Iterator[pb.RepositoryChunk]:
            first = True
            for path in files:
                relative = path.relative_to(root).as_posix()
                with path.open("rb") as handle:
                    offset = 0
                    while True:
                        data = handle.read(UPLOAD_PIECE_BYTES)
                        if not data and offset:
                            break
                        yield pb.RepositoryChunk(
                            name=name if first else "", path=relative, data=data, offset=offset
                        )
                        first = False
                        offset += len(data)
                        if not data:  # an empty file: sent as one empty piece
                            break

        try:
            reply = self._stub.ImportModel(
                pieces(), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return wire.model(reply)

    def rollback(self, model: str, version: int, timeout: float | None = None) -> t.ModelInfo:
        request = pb.RollbackModelRequest(
            name=f"{_model(model)}/versions/{version}", request_id=_new_id()
        )
        return wire.model(self._call(self._stub.RollbackModel, request, timeout))

    def predict(
        self, model: str, inputs: np.ndarray, version: int = 0, timeout: float | None = None
    ) -> t.Prediction:
        """Labels and class probabilities of ``inputs`` ``(n, *input_shape)``.

        ``version`` 0 is the current version. Inputs beyond one message (or the server's
        batch limit) go as several calls, all answered by the version the first call used.
        """
        inputs = np.asarray(inputs)
        rows = self.limits.rows_per_batch(request_row_bytes(inputs), PREDICT_REPLY_ROW_BYTES)
        labels, probabilities = [], []
        for part in row_slices(len(inputs), rows) if len(inputs) else [slice(0, 0)]:
            request = pb.PredictRequest(
                model=_model(model), inputs=wire.to_tensor(inputs[part]), version=version
            )
            reply = self._call(self._stub.Predict, request, timeout)
            version = reply.version  # later batches ask for the one the first was given
            labels.append(np.array(reply.labels, dtype=np.int64))
            probabilities.append(wire.from_tensor(reply.probabilities))
        return t.Prediction(np.concatenate(labels), np.concatenate(probabilities), version)

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
        on_progress: Callable[[t.Operation], None] | None = None,
        parameter_budget: int = 0,
        selection: t.Selection = "",
        hessian: str = "",
        newton_iterations: int = 0,
        damping: float = 0.0,
        epsilon: float = 0.0,
        delta: float = 0.0,
        correct_non_convergence: bool = False,
        timeout: float | None = None,
        wait_timeout: float = 600.0,
    ) -> t.Operation:
        """Ask the server to forget samples and/or owners.

        Samples are named by integer id (``sample_ids``) or, for a model imported with
        string sample ids such as UUIDs, by those strings (``sample_keys``).

        ``selection`` "" or "auto" lets the server pick the path (the receipt's ``policy``
        says which and why); "retrain" asks for the exact retrain, any other value for
        that approximate update (see proto ForgetOptions). Returns the operation at once, or with ``wait=True`` once it is done (progress
        through ``on_progress``). The ``request_id`` makes retries safe: a new one is
        generated when omitted, and the same id is reused for every retry of this call.
        """
        request = pb.ForgetRequest(
            model=_model(model),
            sample_ids=list(sample_ids),
            owner_ids=list(owner_ids),
            sample_keys=list(sample_keys),
            request_id=request_id or _new_id(),
            options=pb.ForgetOptions(
                parameter_budget=parameter_budget,
                selection=selection,
                hessian=hessian,
                newton_iterations=newton_iterations,
                damping=damping,
                epsilon=epsilon,
                delta=delta,
                correct_non_convergence=correct_non_convergence,
            ),
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
        on_progress: Callable[[t.Operation], None] | None = None,
        timeout: float | None = None,
        wait_timeout: float = 600.0,
    ) -> t.Operation:
        """Ask for an exact retrain on the current training data (a fresh noise budget).

        Queued behind the forgets already accepted; returns the operation at once, or
        with ``wait=True`` once it is done. ``request_id`` makes retries safe, as in forget.
        """
        request = pb.RetrainModelRequest(model=_model(model), request_id=request_id or _new_id())
        op = wire.operation(self._call(self._stub.RetrainModel, request, timeout))
        if not wait:
            return op
        return self.wait(op.name, on_progress=on_progress, timeout=wait_timeout)

    def get_operation(self, name: str, timeout: float | None = None) -> t.Operation:
        return wire.operation(
            self._call(self._stub.GetOperation, pb.GetOperationRequest(name=_op(name)), timeout)
        )

    def watch_operation(self, name: str, timeout: float | None = 600.0) -> Iterator[t.Operation]:
        for msg in self._stream(
            self._stub.WatchOperation, pb.GetOperationRequest(name=_op(name)), timeout
        ):
            yield wire.operation(msg)

    def wait(
        self,
        name: str,
        on_progress: Callable[[t.Operation], None] | None = None,
        timeout: float = 600.0,
    ) -> t.Operation:
        """Follow an operation until it is done; return its final state."""
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
        request = pb.CancelOperationRequest(name=_op(name))
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
        """
        request = wire.list_operations_request(model and _model(model), states, page_size)
        operations: list[t.Operation] = []
        while limit is None or len(operations) < limit:
            reply = self._call(self._stub.ListOperations, request, timeout)
            operations += [wire.operation(o) for o in reply.operations]
            if not reply.next_page_token:
                break
            request.page_token = reply.next_page_token
        return operations if limit is None else operations[:limit]

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
        """Per-input target-identification results.

        Without ``mitigate`` or ``dry_run`` they stream as the server computes them. With
        ``mitigate`` the server names the attack set of the flagged inputs, forgets it only
        if its removal is confirmed against a random control, rescans the flagged inputs,
        and then sends every result (flagged ones carry ``mitigation``); ``dry_run`` does
        the same but forgets nothing (``mitigation.sample_ids`` is the plan).

        Without either, inputs beyond one message (or the server's batch limit) go as
        several calls; the results' ``index`` counts over all of ``inputs``. A mitigation
        weighs the flagged inputs together, so its inputs must fit one call.
        """
        inputs = np.asarray(inputs)
        rows = self.limits.rows_per_batch(request_row_bytes(inputs), 0)
        planning = mitigate or dry_run
        if planning and len(inputs) > rows:
            raise InvalidArgumentError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a scan with mitigate or dry_run weighs its inputs together and must fit "
                f"one call ({rows} of these inputs); scan without it in batches, then "
                "mitigate on the flagged inputs",
            )
        parts = list(row_slices(len(inputs), rows)) if len(inputs) else [slice(0, 0)]
        version = 0
        for part in parts:
            request = pb.ScanRequest(
                model=_model(model),
                inputs=wire.to_tensor(inputs[part]),
                estimator=estimator,
                max_implicated=max_implicated,
                mitigate=mitigate,
                request_id=_new_id() if request_id is None and mitigate else (request_id or ""),
                dry_run=dry_run,
            )
            for msg in self._stream(self._stub.Scan, request, timeout):
                result = wire.scan_result(msg)
                version = version or result.model_version
                if result.model_version != version:
                    raise _moved("scan", version, result.model_version)
                yield replace(result, index=result.index + part.start)

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
        request = pb.ScanRequest(
            model=_model(model),
            inputs=wire.to_tensor(np.asarray(inputs)),
            estimator=estimator,
            mitigate=mitigate,
            dry_run=dry_run,
        )
        r = self._call(self._stub.EstimateScan, request, timeout)
        return t.ScanEstimate(
            r.inputs,
            r.training_samples,
            r.checkpoints,
            r.estimated_seconds,
            r.estimated_bytes,
            r.estimated_scoring_seconds,
            r.estimated_calibration_seconds,
            r.estimated_confirmation_seconds,
            r.estimated_mitigation_seconds,
            r.calibrated,
        )

    def neighbors(
        self,
        model: str,
        inputs: np.ndarray,
        k: int = 10,
        *,
        mode: str = "proponents",
        label: int | None = None,
        timeout: float | None = None,
    ) -> t.NeighborsResult:
        """The ``k`` training samples nearest each input in the index's gradient space.

        Inputs beyond one message (or the server's batch limit) go as several calls; all
        of them must be answered by the same model version and index embedding.
        """
        inputs = np.asarray(inputs)
        rows = self.limits.rows_per_batch(request_row_bytes(inputs), NEIGHBOR_REPLY_BYTES * k)
        lists: list[list[t.Neighbor]] = []
        first: pb.NeighborsResponse | None = None
        for part in row_slices(len(inputs), rows) if len(inputs) else [slice(0, 0)]:
            request = pb.NeighborsRequest(
                model=_model(model),
                inputs=wire.to_tensor(inputs[part]),
                k=k,
                mode=mode,
                filter_label=label is not None,
                label=label or 0,
            )
            r = self._call(self._stub.Neighbors, request, timeout)
            first = first or r
            if (r.model_version, r.embedded_version) != (
                first.model_version,
                first.embedded_version,
            ):
                raise _moved("neighbors", first.model_version, r.model_version)
            lists += [
                [
                    t.Neighbor(n.sample_id, n.owner_id, n.label, n.score, n.sample_key)
                    for n in lst.neighbors
                ]
                for lst in r.results
            ]
        assert first is not None
        return t.NeighborsResult(lists, first.stale, first.embedded_version, first.model_version)

    def audit(
        self, model: str = "", page_size: int = 0, timeout: float | None = None
    ) -> list[t.AuditEvent]:
        events: list[t.AuditEvent] = []
        token = ""
        while True:
            request = pb.ListAuditRequest(
                model=_model(model) if model else "", page_size=page_size, page_token=token
            )
            reply = self._call(self._stub.ListAudit, request, timeout)
            events += [wire.audit_event(e) for e in reply.events]
            token = reply.next_page_token
            if not token:
                return events


def _model(name: str) -> str:
    return name if name.startswith("models/") else f"models/{name}"


def _op(name: str) -> str:
    return name if name.startswith("operations/") else f"operations/{name}"


def _new_id() -> str:
    return uuid.uuid4().hex


def _moved(call: str, first: int, now: int) -> AbortedError:
    """A batched call whose batches were answered by different model versions."""
    return AbortedError(
        grpc.StatusCode.ABORTED,
        f"the model changed from version {first} to {now} between the batches of this "
        f"{call} (a forget or rollback committed); call again",
    )


def _read(value: Path | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()
