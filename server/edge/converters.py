"""Protobuf <-> domain conversion: the only module that knows both sides."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any, TypeVar

import numpy as np

from expunge.server.engine import ModelInfo
from expunge.server.errors import ResourceExhausted, invalid_field
from expunge.server.forget.computation import UnlearningOptions
from expunge.server.forget.journal import Progress
from expunge.server.state.store import AuditRow, RequestRow, VersionRow
from expunge.v1 import expunge_pb2 as pb

_M = TypeVar("_M", pb.ForgetReceipt, pb.RetrainReceipt)

# Tensor dtypes the API accepts, by their wire name.
DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "uint8": np.dtype("u1"),
}
MAX_TENSOR_DIMS = 8


def tensor_to_numpy(msg: pb.Tensor, field: str, max_bytes: int) -> np.ndarray:
    """Decode a Tensor message, checking dtype, shape and byte count before touching data."""
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise invalid_field(f"{field}.dtype", f"{msg.dtype!r} is not one of {sorted(DTYPES)}")
    shape = tuple(int(d) for d in msg.shape)
    if not shape or len(shape) > MAX_TENSOR_DIMS or any(d < 0 for d in shape):
        raise invalid_field(
            f"{field}.shape",
            f"{list(shape)} is not a shape of 1 to {MAX_TENSOR_DIMS} non-negative dims",
        )
    count = 1
    for d in shape:
        count *= d
        if count * dtype.itemsize > max_bytes:
            raise ResourceExhausted(f"{field} would need more than the {max_bytes}-byte limit")
    if len(msg.data) != count * dtype.itemsize:
        raise invalid_field(
            f"{field}.data",
            f"holds {len(msg.data)} bytes; shape {list(shape)} of {msg.dtype} needs {count * dtype.itemsize}",
        )
    return np.frombuffer(msg.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def numpy_to_tensor(array: np.ndarray) -> pb.Tensor:
    name = {np.dtype(v).newbyteorder("="): k for k, v in DTYPES.items()}.get(
        array.dtype.newbyteorder("=")
    )
    if name is None:
        raise TypeError(f"unsupported dtype {array.dtype}")
    data = np.ascontiguousarray(array, dtype=DTYPES[name]).tobytes()
    return pb.Tensor(dtype=name, shape=list(array.shape), data=data)


def model_to_proto(info: ModelInfo, index: pb.IndexStatus | None = None) -> pb.Model:
    spec = info.row.spec
    return pb.Model(
        name=f"models/{info.row.name}",
        architecture=str(spec["name"]),
        input_spec=pb.InputSpec(dtype="float32", shape=[int(d) for d in spec["input_shape"]]),
        num_classes=int(spec["num_classes"]),
        current_version=info.row.current_version,
        num_training_samples=info.num_training_samples,
        num_owners=info.num_owners,
        num_checkpoints=info.num_checkpoints,
        metrics=info.version.metrics,
        index=index or pb.IndexStatus(state=pb.IndexStatus.ABSENT),
        forgotten_samples=info.forgotten_samples,
        weight_decay=float(info.row.train_config.get("weight_decay", 0.0)),
    )


def version_to_proto(row: VersionRow) -> pb.ModelVersion:
    return pb.ModelVersion(
        name=f"models/{row.model}/versions/{row.version}",
        version=row.version,
        parent_version=row.parent,
        created_by=row.created_by,
        weights_sha256=row.weights_blob,
        create_time=row.created_at,
        metrics=row.metrics,
        num_training_samples=row.num_samples,
        superseded_by_forget=row.superseded_by_forget,
    )


def audit_to_proto(row: AuditRow) -> pb.AuditEvent:
    return pb.AuditEvent(
        id=row.id,
        time=row.time,
        actor=row.actor,
        action=row.action,
        resource=row.resource,
        details_json=json.dumps(row.details, sort_keys=True),
    )


def struct_fields(message: Any, names: list[str]) -> dict[str, Any]:
    return {n: getattr(message, n) for n in names}


_STATES = {
    "PENDING": pb.Operation.PENDING,
    "APPLYING": pb.Operation.RUNNING,
    "SUCCEEDED": pb.Operation.SUCCEEDED,
    "FAILED": pb.Operation.FAILED,
    "CANCELLED": pb.Operation.CANCELLED,
}


def journal_states(states: Iterable[int]) -> list[str]:
    """The journal states an Operation.State filter names (RUNNING is APPLYING there)."""
    by_proto: dict[int, str] = {int(value): name for name, value in _STATES.items()}
    chosen: list[str] = []
    for state in states:
        if state not in by_proto:
            raise invalid_field(
                "states",
                f"unknown state {state}; use PENDING, RUNNING, SUCCEEDED, FAILED or CANCELLED",
            )
        chosen.append(by_proto[state])
    return chosen


def operation_to_proto(row: RequestRow, progress: Progress) -> pb.Operation:
    """A journalled request and its live progress as an Operation."""
    from google.rpc import code_pb2

    state = _STATES[row.state]
    done = row.state in ("SUCCEEDED", "FAILED", "CANCELLED")
    op = pb.Operation(
        name=f"operations/{row.request_id}",
        kind=row.kind,
        state=state,
        done=done,
        progress=pb.OperationProgress(
            phase="done" if done else ("queued" if row.state == "PENDING" else progress.phase),
            completed=progress.completed,
            total=progress.total,
            message=progress.message,
        ),
        create_time=row.created_at,
        update_time=row.updated_at,
        model=f"models/{row.model}",
    )
    if row.error_code and done:
        op.error.CopyFrom(
            pb.OperationError(
                code=getattr(code_pb2, row.error_code, code_pb2.UNKNOWN),
                message=row.error_message or "",
            )
        )
    if row.state == "SUCCEEDED" and row.result:
        if row.kind == "retrain":
            op.retrain_receipt.CopyFrom(_receipt_proto(row.result, pb.RetrainReceipt()))
        else:
            op.receipt.CopyFrom(_receipt_proto(row.result, pb.ForgetReceipt()))
    return op


def _receipt_proto(result: dict[str, Any], message: _M) -> _M:
    """The stored receipt as ``message`` (fields it does not know are left out).

    Its top-level lists of strings (the keyed digests: 24k for one large owner) are
    copied in whole: json_format converts and checks them one element at a time, 80 ms of
    a 1 s forget's answer.
    """
    from google.protobuf import json_format

    fields = message.DESCRIPTOR.fields_by_name
    strings = {
        key: value
        for key, value in result.items()
        if key in fields
        and _repeated_string(fields[key])
        and isinstance(value, list)
        and all(isinstance(item, str) for item in value)
    }
    rest = {key: value for key, value in result.items() if key not in strings}
    json_format.ParseDict(_proto_json(rest), message, ignore_unknown_fields=True)
    for key, value in strings.items():
        getattr(message, key).extend(value)
    return message


def _repeated_string(field: Any) -> bool:
    # upb's descriptors (protobuf >= 6) have is_repeated and no label.
    repeated = (
        field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    )
    return bool(repeated and field.type == field.TYPE_STRING)


def _proto_json(value: Any) -> Any:
    """``value`` with non-finite floats as proto3 JSON spells them ("NaN", "Infinity"):
    a figure not measured (no held-out set) is NaN in the stored receipt."""
    if isinstance(value, dict):
        return {k: _proto_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_proto_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    return value


def forget_options(msg: pb.ForgetOptions) -> UnlearningOptions:
    return UnlearningOptions.validated(
        selection=msg.selection,
        parameter_budget=msg.parameter_budget,
        hessian=msg.hessian,
        newton_iterations=msg.newton_iterations,
        damping=msg.damping,
        epsilon=msg.epsilon,
        delta=msg.delta,
        correct_non_convergence=msg.correct_non_convergence,
    )
