"""What ``Client`` (blocking) and ``AsyncClient`` (asyncio) share, so that they cannot drift.

Their options and retry policy (``ClientBase``), and each call's client side without I/O:
the functions here build requests, check arguments and assemble replies; the two clients
only send. A call made of several requests (batches of a large input, pages of a list) is
an *exchange*: a generator that yields each request, is sent that request's reply, and
returns the call's result, so that one loop serves both transports.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
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

Request = TypeVar("Request")
Reply = TypeVar("Reply")
Result = TypeVar("Result")
# Yields requests, is sent their replies, returns the call's result.
Exchange = Generator[Request, Reply, Result]
ProgressCallback = Callable[[t.Operation], None]

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BATCH_INPUTS = 4096  # the server's default max_batch
# Reply bytes per input a batch is sized for: Predict's probabilities (float32) for up to
# 1,000 classes; per neighbour (id, owner id, label, score) with a 64-character owner id.
PREDICT_REPLY_ROW_BYTES = 4 * 1024 + 16
NEIGHBOR_REPLY_BYTES = 100
# ImportModel: the files a model repository may hold, and the size of each piece sent.
REPOSITORY_SUFFIXES = (".toml", ".safetensors", ".npz", ".parquet")
UPLOAD_PIECE_BYTES = 1024 * 1024


class ClientBase:
    """The constructor options, channel and retry policy both clients share (documented
    on ``Client``); a subclass opens the channel for its transport."""

    _channel: Any
    _stub: Any

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
        credentials = None
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(
                _read(root_certificates), _read(client_key), _read(client_certificate)
            )
        self._channel = self._open_channel(target, credentials, options)
        self._stub = pb_grpc.ExpungeStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.limits = BatchLimits(max_message_bytes, max_batch_inputs)

    def _open_channel(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> Any:
        raise NotImplementedError

    def _options(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": timeout or self.timeout, "metadata": self._metadata}

    def _retry_delay(self, error: grpc.RpcError, attempt: int, received: bool = False) -> float:
        """Seconds to wait before trying again; raises ``error`` as an ``ExpungeError``
        when it may not be retried.

        Only UNAVAILABLE is retried, and a stream only before its first message: later,
        a retry could repeat work.
        """
        code = error.code()  # type: ignore[attr-defined]
        if code != grpc.StatusCode.UNAVAILABLE or received or attempt == self.retries:
            raise from_rpc_error(error) from None
        return self.backoff * (2**attempt) * (0.5 + random.random())


def model_name(name: str) -> str:
    return name if name.startswith("models/") else f"models/{name}"


def operation_name(name: str) -> str:
    return name if name.startswith("operations/") else f"operations/{name}"


def new_request_id() -> str:
    return uuid.uuid4().hex


def _read(value: Path | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def _parts(count: int, rows: int) -> list[slice]:
    """The batches of ``count`` inputs; an empty input is one empty batch (the server says why)."""
    return list(row_slices(count, rows)) if count else [slice(0, 0)]


def _moved(call: str, first: int, now: int) -> AbortedError:
    """A batched call whose batches were answered by different model versions."""
    return AbortedError(
        grpc.StatusCode.ABORTED,
        f"the model changed from version {first} to {now} between the batches of this "
        f"{call} (a forget or rollback committed); call again",
    )


# Models -------------------------------------------------------------------------------------


def list_versions(
    model: str, page_size: int
) -> Exchange[pb.ListVersionsRequest, pb.ListVersionsResponse, list[t.VersionInfo]]:
    versions: list[t.VersionInfo] = []
    token = ""
    while True:
        reply = yield pb.ListVersionsRequest(
            model=model_name(model), page_size=page_size, page_token=token
        )
        versions += [wire.version(v) for v in reply.versions]
        token = reply.next_page_token
        if not token:
            return versions


def export_request(model: str, version: int) -> pb.ExportModelRequest:
    return pb.ExportModelRequest(
        name=model_name(model) + (f"/versions/{version}" if version else "")
    )


def exported_weights(chunks: Sequence[pb.ExportChunk]) -> bytes:
    """The streamed weights, joined and checked against the SHA-256 the server sent."""
    data = b"".join(chunk.data for chunk in chunks)
    expected = chunks[-1].weights_sha256 if chunks else ""
    if hashlib.sha256(data).hexdigest() != expected:
        raise ExpungeError(grpc.StatusCode.DATA_LOSS, "exported weights do not match their SHA-256")
    return data


def repository_pieces(directory: Path | str, name: str) -> Iterator[pb.RepositoryChunk]:
    """ImportModel's upload: each data file of the repository, in pieces, in order.

    Raises InvalidArgumentError at once when ``directory`` holds no ``expunge.toml``.
    """
    root = Path(directory)
    if not (root / "expunge.toml").is_file():
        raise InvalidArgumentError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{root}: no expunge.toml manifest here"
        )
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in REPOSITORY_SUFFIXES)
    return _file_pieces(root, files, name)


def _file_pieces(root: Path, files: list[Path], name: str) -> Iterator[pb.RepositoryChunk]:
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


def rollback_request(model: str, version: int) -> pb.RollbackModelRequest:
    return pb.RollbackModelRequest(
        name=f"{model_name(model)}/versions/{version}", request_id=new_request_id()
    )


def predict(
    model: str, inputs: np.ndarray, version: int, limits: BatchLimits
) -> Exchange[pb.PredictRequest, pb.PredictResponse, t.Prediction]:
    inputs = np.asarray(inputs)
    rows = limits.rows_per_batch(request_row_bytes(inputs), PREDICT_REPLY_ROW_BYTES)
    labels, probabilities = [], []
    for part in _parts(len(inputs), rows):
        reply = yield pb.PredictRequest(
            model=model_name(model), inputs=wire.to_tensor(inputs[part]), version=version
        )
        version = reply.version  # later batches ask for the one the first was given
        labels.append(np.array(reply.labels, dtype=np.int64))
        probabilities.append(wire.from_tensor(reply.probabilities))
    return t.Prediction(np.concatenate(labels), np.concatenate(probabilities), version)


# Forgetting ---------------------------------------------------------------------------------


def forget_request(
    model: str,
    *,
    sample_ids: Sequence[int],
    owner_ids: Sequence[str],
    sample_keys: Sequence[str],
    request_id: str | None,
    parameter_budget: int,
    selection: t.Selection,
    hessian: t.Hessian,
    newton_iterations: int,
    damping: float,
    epsilon: float,
    delta: float,
    correct_non_convergence: bool,
) -> pb.ForgetRequest:
    return pb.ForgetRequest(
        model=model_name(model),
        sample_ids=list(sample_ids),
        owner_ids=list(owner_ids),
        sample_keys=list(sample_keys),
        request_id=request_id or new_request_id(),
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


def retrain_request(model: str, request_id: str | None) -> pb.RetrainModelRequest:
    return pb.RetrainModelRequest(
        model=model_name(model), request_id=request_id or new_request_id()
    )


def list_operations(
    model: str, states: Sequence[t.OperationState], limit: int | None, page_size: int
) -> Exchange[pb.ListOperationsRequest, pb.ListOperationsResponse, list[t.Operation]]:
    request = wire.list_operations_request(model and model_name(model), states, page_size)
    operations: list[t.Operation] = []
    while limit is None or len(operations) < limit:
        reply = yield request
        operations += [wire.operation(o) for o in reply.operations]
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    return operations if limit is None else operations[:limit]


# Scanning and neighbours --------------------------------------------------------------------


def scan_request(
    model: str,
    inputs: np.ndarray,
    estimator: t.Estimator | Literal[""],
    *,
    max_implicated: int = 0,
    mitigate: bool = False,
    request_id: str | None = None,
    dry_run: bool = False,
) -> pb.ScanRequest:
    return pb.ScanRequest(
        model=model_name(model),
        inputs=wire.to_tensor(np.asarray(inputs)),
        estimator=estimator,
        max_implicated=max_implicated,
        mitigate=mitigate,
        # A mitigation forgets: its id makes a retry safe.
        request_id=new_request_id() if request_id is None and mitigate else (request_id or ""),
        dry_run=dry_run,
    )


def scan_batches(
    model: str,
    inputs: np.ndarray,
    limits: BatchLimits,
    estimator: t.Estimator | Literal[""],
    *,
    max_implicated: int,
    mitigate: bool,
    request_id: str | None,
    dry_run: bool,
) -> Iterator[tuple[slice, pb.ScanRequest]]:
    """Scan's requests, one per batch of inputs, each with the inputs it covers.

    Raises InvalidArgumentError (on the first ``next``) for a mitigation or dry run whose
    inputs do not fit one call.
    """
    inputs = np.asarray(inputs)
    rows = limits.rows_per_batch(request_row_bytes(inputs), 0)
    if (mitigate or dry_run) and len(inputs) > rows:
        raise InvalidArgumentError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"a scan with mitigate or dry_run weighs its inputs together and must fit "
            f"one call ({rows} of these inputs); scan without it in batches, then "
            "mitigate on the flagged inputs",
        )
    for part in _parts(len(inputs), rows):
        request = scan_request(
            model,
            inputs[part],
            estimator,
            max_implicated=max_implicated,
            mitigate=mitigate,
            request_id=request_id,
            dry_run=dry_run,
        )
        yield part, request


class ScanResults:
    """Numbers a batched scan's results over all its inputs; every batch must see one version."""

    def __init__(self) -> None:
        self.version = 0

    def add(self, msg: pb.ScanResult, part: slice) -> t.ScanResult:
        result = wire.scan_result(msg)
        self.version = self.version or result.model_version
        if result.model_version != self.version:
            raise _moved("scan", self.version, result.model_version)
        return replace(result, index=result.index + part.start)


def neighbors(
    model: str,
    inputs: np.ndarray,
    k: int,
    mode: t.NeighborMode,
    label: int | None,
    limits: BatchLimits,
) -> Exchange[pb.NeighborsRequest, pb.NeighborsResponse, t.NeighborsResult]:
    inputs = np.asarray(inputs)
    rows = limits.rows_per_batch(request_row_bytes(inputs), NEIGHBOR_REPLY_BYTES * k)
    lists: list[list[t.Neighbor]] = []
    first: pb.NeighborsResponse | None = None
    for part in _parts(len(inputs), rows):
        reply = yield pb.NeighborsRequest(
            model=model_name(model),
            inputs=wire.to_tensor(inputs[part]),
            k=k,
            mode=mode,
            filter_label=label is not None,
            label=label or 0,
        )
        first = first or reply
        if (reply.model_version, reply.embedded_version) != (
            first.model_version,
            first.embedded_version,
        ):
            raise _moved("neighbors", first.model_version, reply.model_version)
        lists += wire.neighbor_lists(reply)
    assert first is not None
    return t.NeighborsResult(lists, first.stale, first.embedded_version, first.model_version)


def audit(
    model: str, page_size: int
) -> Exchange[pb.ListAuditRequest, pb.ListAuditResponse, list[t.AuditEvent]]:
    events: list[t.AuditEvent] = []
    token = ""
    while True:
        reply = yield pb.ListAuditRequest(
            model=model_name(model) if model else "", page_size=page_size, page_token=token
        )
        events += [wire.audit_event(e) for e in reply.events]
        token = reply.next_page_token
        if not token:
            return events
