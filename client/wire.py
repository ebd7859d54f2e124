"""Protobuf messages -> client dataclasses, and numpy arrays -> Tensor messages."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, TypeVar

import numpy as np

from expunge.v1 import expunge_pb2 as pb

from . import types as t
from .types import OPERATION_STATES

_Mirror = TypeVar("_Mirror")

_WIRE_DTYPES = {
    "float32": "<f4",
    "float64": "<f8",
    "float16": "<f2",
    "int64": "<i8",
    "int32": "<i4",
    "uint8": "u1",
}


def to_tensor(array: np.ndarray) -> pb.Tensor:
    name = str(array.dtype)
    if name not in _WIRE_DTYPES:
        raise TypeError(f"dtype {array.dtype} cannot be sent; use one of {sorted(_WIRE_DTYPES)}")
    data = np.ascontiguousarray(array, dtype=np.dtype(_WIRE_DTYPES[name])).tobytes()
    return pb.Tensor(dtype=name, shape=list(array.shape), data=data)


def from_tensor(msg: pb.Tensor) -> np.ndarray:
    dtype = np.dtype(_WIRE_DTYPES[msg.dtype])
    return (
        np.frombuffer(msg.data, dtype=dtype)
        .reshape(tuple(msg.shape))
        .astype(dtype.newbyteorder("="))
    )


def model(msg: pb.Model) -> t.ModelInfo:
    return t.ModelInfo(
        name=msg.name,
        architecture=msg.architecture,
        input_shape=tuple(msg.input_spec.shape),
        input_dtype=msg.input_spec.dtype,
        num_classes=msg.num_classes,
        current_version=msg.current_version,
        num_training_samples=msg.num_training_samples,
        num_owners=msg.num_owners,
        num_checkpoints=msg.num_checkpoints,
        forgotten_samples=msg.forgotten_samples,
        metrics=dict(msg.metrics),
        index=t.IndexInfo(
            state=pb.IndexStatus.State.Name(msg.index.state),
            embedded_version=msg.index.embedded_version,
            size=msg.index.size,
            progress=msg.index.progress,
            embedded_parameters=tuple(msg.index.embedded_parameters),
        ),
    )


def version(msg: pb.ModelVersion) -> t.VersionInfo:
    return t.VersionInfo(
        name=msg.name,
        version=msg.version,
        parent_version=msg.parent_version,
        created_by=msg.created_by,
        weights_sha256=msg.weights_sha256,
        create_time=msg.create_time,
        metrics=dict(msg.metrics),
        num_training_samples=msg.num_training_samples,
        superseded_by_forget=msg.superseded_by_forget,
    )


def _metrics(msg: pb.DeletionMetrics) -> t.DeletionMetrics:
    return t.DeletionMetrics(
        msg.forget_loss, msg.forget_accuracy, msg.retained_accuracy, msg.test_accuracy, msg.mia_auc
    )


def receipt(msg: pb.ForgetReceipt) -> t.ForgetReceipt:
    c = msg.certificate
    return t.ForgetReceipt(
        new_version=msg.new_version,
        parent_version=msg.parent_version,
        units_selected=msg.units_selected,
        parameters_updated=msg.parameters_updated,
        parameters_total=msg.parameters_total,
        certificate=t.Certificate(
            c.residual_norm_selected,
            c.residual_norm_all,
            c.noise_scale,
            c.budget_total,
            c.budget_used,
            c.budget_remaining,
            c.budget_exhausted,
            c.convex,
            c.statement,
        ),
        before=_metrics(msg.before),
        after=_metrics(msg.after),
        seconds=msg.seconds,
        weights_sha256=msg.weights_sha256,
        environment=msg.environment,
        damping=msg.damping,
        step_accepted=msg.step_accepted,
        accuracy_cost_flagged=msg.accuracy_cost_flagged,
        note=msg.note,
        method=_method(msg.method),
        removed_samples=msg.removed_samples,
        removed_owners=msg.removed_owners,
        removed_sample_digests=list(msg.removed_sample_digests),
        removed_owner_digests=list(msg.removed_owner_digests),
        already_forgotten_samples=msg.already_forgotten_samples,
        already_forgotten_owners=msg.already_forgotten_owners,
        already_forgotten_sample_digests=list(msg.already_forgotten_sample_digests),
        already_forgotten_owner_digests=list(msg.already_forgotten_owner_digests),
        accuracy_collapse=_fields(t.AccuracyCollapse, msg.accuracy_collapse)
        if msg.HasField("accuracy_collapse")
        else None,
        policy=_fields(t.ForgetPolicy, msg.policy),
        retained_gradient_norm_before=msg.retained_gradient_norm_before,
        batchnorm_recomputed=msg.batchnorm_recomputed,
    )


def _method(msg: pb.ForgetMethod) -> t.ForgetMethod:
    return _fields(t.ForgetMethod, msg)


def _fields(cls: type[_Mirror], msg: Any) -> _Mirror:
    """Field for field: the dataclass mirrors the message."""
    return cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})  # type: ignore[call-arg, arg-type]


def operation(msg: pb.Operation) -> t.Operation:
    return t.Operation(
        name=msg.name,
        kind=msg.kind,
        state=pb.Operation.State.Name(msg.state),
        done=msg.done,
        phase=msg.progress.phase,
        completed=msg.progress.completed,
        total=msg.progress.total,
        message=msg.progress.message,
        error_code=(msg.error.message and str(msg.error.code)) or "",
        error_message=msg.error.message,
        receipt=receipt(msg.receipt) if msg.HasField("receipt") else None,
        retrain_receipt=_fields(t.RetrainReceipt, msg.retrain_receipt)
        if msg.HasField("retrain_receipt")
        else None,
        model=msg.model,
        create_time=msg.create_time,
        update_time=msg.update_time,
    )


def list_operations_request(
    model: str, states: Sequence[str], page_size: int
) -> pb.ListOperationsRequest:
    unknown = sorted(set(states) - set(OPERATION_STATES))
    if unknown:
        raise ValueError(f"unknown operation states {unknown}; use {list(OPERATION_STATES)}")
    return pb.ListOperationsRequest(
        model=model,
        states=[pb.Operation.State.Value(s) for s in states],  # type: ignore[misc]
        page_size=page_size,
    )


def scan_result(msg: pb.ScanResult) -> t.ScanResult:
    m = msg.mitigation
    return t.ScanResult(
        index=msg.index,
        predicted_label=msg.predicted_label,
        target_score=msg.target_score,
        threshold=msg.threshold,
        flagged=msg.flagged,
        counterfactual_drop=msg.counterfactual_drop,
        implicated=[
            t.ImplicatedSample(
                s.sample_id,
                s.owner_id,
                s.label,
                s.influence,
                s.z,
                s.class_outlier_z,
                s.reason,
                s.sample_key,
            )
            for s in msg.implicated
        ],
        mitigation=t.Mitigation(
            m.operation,
            m.new_version,
            m.predicted_label_after,
            m.prediction_changed,
            m.test_accuracy_before,
            m.test_accuracy_after,
            m.applied,
            m.dry_run,
            tuple(m.sample_ids),
            m.targets,
            m.targets_affected,
            m.control_affected,
            m.target_score_after,
            m.p_value_after,
            m.decision,
            m.clean_analogues,
            m.clean_analogues_affected,
            tuple(m.sample_keys),
            m.completion_added,
            m.completion_affected,
            m.completion_control_affected,
            m.completion_kept,
        )
        if msg.HasField("mitigation")
        else None,
        model_version=msg.model_version,
        p_value=msg.p_value,
        influence_p_value=msg.influence_p_value,
        group_outlier_z=msg.group_outlier_z,
        control_drop=msg.control_drop,
        drop_threshold=msg.drop_threshold,
        decision=msg.decision,
    )


def scan_estimate(msg: pb.ScanEstimate) -> t.ScanEstimate:
    return _fields(t.ScanEstimate, msg)


def neighbor_lists(msg: pb.NeighborsResponse) -> list[list[t.Neighbor]]:
    return [
        [t.Neighbor(n.sample_id, n.owner_id, n.label, n.score, n.sample_key) for n in lst.neighbors]
        for lst in msg.results
    ]


def audit_event(msg: pb.AuditEvent) -> t.AuditEvent:
    return t.AuditEvent(
        msg.id, msg.time, msg.actor, msg.action, msg.resource, json.loads(msg.details_json or "{}")
    )
