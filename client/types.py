"""Typed results of client calls (dataclasses; no protobuf leaks to callers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

# The values the server takes for each option; the CLI offers the same choices.
OperationState = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
# How to forget: "auto" (or "") lets the server choose and say why in the receipt.
Selection = Literal["", "auto", "retrain", "lcodec_cg", "lcodec", "cg", "all", "output"]
# The Hessian of a Newton update: "" is the server's default (exact).
Hessian = Literal["", "exact", "gauss_newton"]
# Scan's influence estimator.
Estimator = Literal["gas", "lgas", "tracincp", "gas+tracincp"]
# Neighbors: the training samples that most support each input's prediction, or oppose it.
NeighborMode = Literal["proponents", "opponents"]
OPERATION_STATES: tuple[str, ...] = get_args(OperationState)
SELECTIONS: tuple[str, ...] = get_args(Selection)
HESSIANS: tuple[str, ...] = get_args(Hessian)
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
NEIGHBOR_MODES: tuple[str, ...] = get_args(NeighborMode)


@dataclass(frozen=True)
class IndexInfo:
    state: str
    embedded_version: int
    size: int
    progress: float
    # Parameters whose gradients the index embeds; empty: every parameter.
    embedded_parameters: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    input_shape: tuple[int, ...]
    input_dtype: str
    num_classes: int
    current_version: int
    num_training_samples: int
    num_owners: int
    num_checkpoints: int
    forgotten_samples: int
    metrics: dict[str, float]
    index: IndexInfo


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: int
    parent_version: int
    created_by: str
    weights_sha256: str
    create_time: str
    metrics: dict[str, float]
    num_training_samples: int
    superseded_by_forget: bool


@dataclass(frozen=True)
class Prediction:
    labels: np.ndarray  # (B,) int
    probabilities: np.ndarray  # (B, C) float32
    version: int


@dataclass(frozen=True)
class Certificate:
    residual_norm_selected: float
    residual_norm_all: float
    noise_scale: float
    budget_total: float
    budget_used: float
    budget_remaining: float
    budget_exhausted: bool
    convex: bool
    statement: str


@dataclass(frozen=True)
class DeletionMetrics:
    forget_loss: float
    forget_accuracy: float
    retained_accuracy: float
    test_accuracy: float
    mia_auc: float


@dataclass(frozen=True)
class ForgetMethod:
    """How the update was computed (proto ForgetMethod): every choice it depended on."""

    selection: str
    hessian: str
    parameter_budget: int
    newton_iterations: int
    newton_iterations_taken: int
    damping_floor: float
    hessian_samples: int
    objective_samples: int  # 0: all retained samples
    ranking_hessian_samples: int  # 0: no ranking step (selections lcodec, all, output)
    ranking_cg_iterations: int
    ranking_newton_iterations: int
    seed: int
    candidate_parameters: int  # entries the ranking chose from; 0: no ranking step
    assume_converged: bool  # the served model was taken as the optimum of J
    step_coverage: float  # the selection grew to hold this share of the step; 0: budget only


@dataclass(frozen=True)
class ForgetPolicy:
    """Which path a forget took, why, and every path's estimated seconds (proto ForgetPolicy)."""

    path: str  # retrain, all, lcodec_cg (or the explicit selection)
    reason: str
    requested: str  # auto or the explicit selection
    estimated_retrain_s: float
    estimated_newton_all_s: float
    estimated_targeted_s: float
    estimated_hessian_bytes: int
    estimated_seconds_per_sample: float
    profile: str = ""  # standard or large_data: the counts an approximate update used
    profile_reason: str = ""


@dataclass(frozen=True)
class RetrainReceipt:
    """An exact retrain's result (proto RetrainReceipt)."""

    new_version: int
    parent_version: int
    training_samples: int
    test_accuracy: float
    parent_test_accuracy: float
    weights_sha256: str
    budget_total: float  # the noise budget, reset to this
    seconds: float
    environment: str


@dataclass(frozen=True)
class ForgetReceipt:
    new_version: int
    parent_version: int
    units_selected: int
    parameters_updated: int
    parameters_total: int
    certificate: Certificate
    before: DeletionMetrics
    after: DeletionMetrics
    seconds: float
    weights_sha256: str
    environment: str
    damping: float
    step_accepted: bool
    accuracy_cost_flagged: bool
    note: str
    method: ForgetMethod
    # Ids are never echoed back: counts, and keyed digests (HMAC-SHA-256 under the server's
    # per-state secret) that prove which samples and owners a receipt covers.
    removed_samples: int
    removed_owners: int
    removed_sample_digests: list[str]
    removed_owner_digests: list[str]
    already_forgotten_samples: int
    already_forgotten_owners: int
    already_forgotten_sample_digests: list[str]
    already_forgotten_owner_digests: list[str]
    accuracy_collapse: AccuracyCollapse | None
    policy: ForgetPolicy
    retained_gradient_norm_before: float  # |grad J'| of the served model before the update
    batchnorm_recomputed: bool


@dataclass(frozen=True)
class AccuracyCollapse:
    """The update cost more test accuracy than the server allows, and what the server did."""

    drop_points: float
    limit_points: float
    policy: str  # the server's on_accuracy_collapse: retrain, hold or serve
    action: str  # retrain (held, exact retrain queued), hold (held), or serve
    retrain_operation: str  # operations/<id> of the queued retrain, for "retrain"


@dataclass(frozen=True)
class Operation:
    name: str
    kind: str
    state: str
    done: bool
    phase: str
    completed: int
    total: int
    message: str
    error_code: str
    error_message: str
    receipt: ForgetReceipt | None
    model: str
    retrain_receipt: RetrainReceipt | None = None  # kind "retrain", once it succeeded
    create_time: str = ""  # RFC 3339, UTC
    update_time: str = ""


@dataclass(frozen=True)
class ImplicatedSample:
    sample_id: int
    owner_id: str
    label: int
    influence: float
    z: float  # standardised influence
    class_outlier_z: float = 0.0  # robust z of its spectral score within its class
    reason: str = ""  # why it was named
    sample_key: str = ""  # its string id, when the model's samples have them


@dataclass(frozen=True)
class Mitigation:
    """The request's mitigation (or, with ``dry_run``, its plan) and this input's rescan."""

    operation: str  # empty unless applied
    new_version: int
    predicted_label_after: int
    prediction_changed: bool
    test_accuracy_before: float
    test_accuracy_after: float
    applied: bool = False
    dry_run: bool = False
    sample_ids: tuple[int, ...] = ()  # the attack set: forgotten, or would be
    targets: int = 0  # flagged inputs
    targets_affected: int = 0  # ... whose prediction removing the set changes
    control_affected: int = 0  # ... that removing a random equal-size set changes
    target_score_after: float = 0.0
    p_value_after: float = 0.0
    decision: str = ""
    clean_analogues: int = 0  # clean calibration inputs in the matched control
    clean_analogues_affected: int = 0  # ... that removing their own rule-named set changes
    sample_keys: tuple[str, ...] = ()  # the attack set's string ids, when it has them
    completion_added: int = 0  # samples cluster completion added to the confirmed set
    completion_affected: int = 0  # flagged inputs the widened set's removal changes
    completion_control_affected: int = 0  # ... that its random control's removal changes
    completion_kept: bool = False  # the widened set is the one forgotten (or would be)


@dataclass(frozen=True)
class ScanResult:
    index: int
    predicted_label: int
    target_score: float  # the robust influence score, on the estimator's own scale
    threshold: float  # the first filter's p-value cut
    flagged: bool
    counterfactual_drop: float
    implicated: list[ImplicatedSample]
    mitigation: Mitigation | None
    model_version: int
    p_value: float = 1.0  # conformal, against the clean calibration inputs
    influence_p_value: float = 1.0
    group_outlier_z: float = 0.0  # training side: its top proponents' evidence
    control_drop: float = 0.0
    drop_threshold: float = 0.0
    decision: str = ""  # every cut that decided it, with its value


@dataclass(frozen=True)
class ScanEstimate:
    inputs: int
    training_samples: int
    checkpoints: int
    estimated_seconds: float  # the sum of the parts below
    estimated_bytes: int
    estimated_scoring_seconds: float = 0.0
    estimated_calibration_seconds: float = 0.0  # 0 when the version is calibrated already
    estimated_confirmation_seconds: float = 0.0
    estimated_mitigation_seconds: float = 0.0
    calibrated: bool = False


@dataclass(frozen=True)
class Neighbor:
    sample_id: int
    owner_id: str
    label: int
    score: float
    sample_key: str = ""  # its string id, when the model's samples have them


@dataclass(frozen=True)
class NeighborsResult:
    neighbors: list[list[Neighbor]]
    stale: bool
    embedded_version: int
    model_version: int


@dataclass(frozen=True)
class AuditEvent:
    id: int
    time: str
    actor: str
    action: str
    resource: str
    details: dict[str, object] = field(default_factory=dict)
