from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("dtype", "shape")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class IndexStatus(_message.Message):
    __slots__ = ("state", "embedded_version", "size", "progress", "embedded_parameters")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[IndexStatus.State]
        ABSENT: _ClassVar[IndexStatus.State]
        BUILDING: _ClassVar[IndexStatus.State]
        READY: _ClassVar[IndexStatus.State]
        STALE: _ClassVar[IndexStatus.State]
    STATE_UNSPECIFIED: IndexStatus.State
    ABSENT: IndexStatus.State
    BUILDING: IndexStatus.State
    READY: IndexStatus.State
    STALE: IndexStatus.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDED_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDED_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    state: IndexStatus.State
    embedded_version: int
    size: int
    progress: float
    embedded_parameters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, state: _Optional[_Union[IndexStatus.State, str]] = ..., embedded_version: _Optional[int] = ..., size: _Optional[int] = ..., progress: _Optional[float] = ..., embedded_parameters: _Optional[_Iterable[str]] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "architecture", "input_spec", "num_classes", "current_version", "num_training_samples", "num_owners", "num_checkpoints", "metrics", "index", "forgotten_samples", "weight_decay")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SPEC_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAINING_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_OWNERS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FORGOTTEN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    input_spec: InputSpec
    num_classes: int
    current_version: int
    num_training_samples: int
    num_owners: int
    num_checkpoints: int
    metrics: _containers.ScalarMap[str, float]
    index: IndexStatus
    forgotten_samples: int
    weight_decay: float
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., input_spec: _Optional[_Union[InputSpec, _Mapping]] = ..., num_classes: _Optional[int] = ..., current_version: _Optional[int] = ..., num_training_samples: _Optional[int] = ..., num_owners: _Optional[int] = ..., num_checkpoints: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., index: _Optional[_Union[IndexStatus, _Mapping]] = ..., forgotten_samples: _Optional[int] = ..., weight_decay: _Optional[float] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("name", "version", "parent_version", "created_by", "weights_sha256", "create_time", "metrics", "num_training_samples", "superseded_by_forget")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAINING_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_BY_FORGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    parent_version: int
    created_by: str
    weights_sha256: str
    create_time: str
    metrics: _containers.ScalarMap[str, float]
    num_training_samples: int
    superseded_by_forget: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., parent_version: _Optional[int] = ..., created_by: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., create_time: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., num_training_samples: _Optional[int] = ..., superseded_by_forget: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("model", "page_size", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    page_size: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions", "next_page_token")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    next_page_token: str
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExportModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RepositoryChunk(_message.Message):
    __slots__ = ("name", "path", "data", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    data: bytes
    offset: int
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("data", "offset", "total_bytes", "weights_sha256", "version")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_bytes: int
    weights_sha256: str
    version: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., weights_sha256: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class RollbackModelRequest(_message.Message):
    __slots__ = ("name", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    request_id: str
    def __init__(self, name: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RetrainModelRequest(_message.Message):
    __slots__ = ("model", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    request_id: str
    def __init__(self, model: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RetrainReceipt(_message.Message):
    __slots__ = ("new_version", "parent_version", "training_samples", "test_accuracy", "parent_test_accuracy", "weights_sha256", "budget_total", "seconds", "environment")
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PARENT_TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    BUDGET_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    new_version: int
    parent_version: int
    training_samples: int
    test_accuracy: float
    parent_test_accuracy: float
    weights_sha256: str
    budget_total: float
    seconds: float
    environment: str
    def __init__(self, new_version: _Optional[int] = ..., parent_version: _Optional[int] = ..., training_samples: _Optional[int] = ..., test_accuracy: _Optional[float] = ..., parent_test_accuracy: _Optional[float] = ..., weights_sha256: _Optional[str] = ..., budget_total: _Optional[float] = ..., seconds: _Optional[float] = ..., environment: _Optional[str] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "inputs", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: Tensor
    version: int
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("labels", "probabilities", "version")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedScalarFieldContainer[int]
    probabilities: Tensor
    version: int
    def __init__(self, labels: _Optional[_Iterable[int]] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class ForgetOptions(_message.Message):
    __slots__ = ("parameter_budget", "selection", "hessian", "newton_iterations", "damping", "epsilon", "delta", "correct_non_convergence")
    PARAMETER_BUDGET_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    HESSIAN_FIELD_NUMBER: _ClassVar[int]
    NEWTON_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    CORRECT_NON_CONVERGENCE_FIELD_NUMBER: _ClassVar[int]
    parameter_budget: int
    selection: str
    hessian: str
    newton_iterations: int
    damping: float
    epsilon: float
    delta: float
    correct_non_convergence: bool
    def __init__(self, parameter_budget: _Optional[int] = ..., selection: _Optional[str] = ..., hessian: _Optional[str] = ..., newton_iterations: _Optional[int] = ..., damping: _Optional[float] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., correct_non_convergence: _Optional[bool] = ...) -> None: ...

class ForgetRequest(_message.Message):
    __slots__ = ("model", "sample_ids", "owner_ids", "request_id", "options", "sample_keys")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    OWNER_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_KEYS_FIELD_NUMBER: _ClassVar[int]
    model: str
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    owner_ids: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    options: ForgetOptions
    sample_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., sample_ids: _Optional[_Iterable[int]] = ..., owner_ids: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., options: _Optional[_Union[ForgetOptions, _Mapping]] = ..., sample_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class Certificate(_message.Message):
    __slots__ = ("residual_norm_selected", "residual_norm_all", "noise_scale", "budget_total", "budget_used", "budget_remaining", "budget_exhausted", "convex", "statement")
    RESIDUAL_NORM_SELECTED_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_NORM_ALL_FIELD_NUMBER: _ClassVar[int]
    NOISE_SCALE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BUDGET_USED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_REMAINING_FIELD_NUMBER: _ClassVar[int]
    BUDGET_EXHAUSTED_FIELD_NUMBER: _ClassVar[int]
    CONVEX_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    residual_norm_selected: float
    residual_norm_all: float
    noise_scale: float
    budget_total: float
    budget_used: float
    budget_remaining: float
    budget_exhausted: bool
    convex: bool
    statement: str
    def __init__(self, residual_norm_selected: _Optional[float] = ..., residual_norm_all: _Optional[float] = ..., noise_scale: _Optional[float] = ..., budget_total: _Optional[float] = ..., budget_used: _Optional[float] = ..., budget_remaining: _Optional[float] = ..., budget_exhausted: _Optional[bool] = ..., convex: _Optional[bool] = ..., statement: _Optional[str] = ...) -> None: ...

class DeletionMetrics(_message.Message):
    __slots__ = ("forget_loss", "forget_accuracy", "retained_accuracy", "test_accuracy", "mia_auc")
    FORGET_LOSS_FIELD_NUMBER: _ClassVar[int]
    FORGET_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    RETAINED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MIA_AUC_FIELD_NUMBER: _ClassVar[int]
    forget_loss: float
    forget_accuracy: float
    retained_accuracy: float
    test_accuracy: float
    mia_auc: float
    def __init__(self, forget_loss: _Optional[float] = ..., forget_accuracy: _Optional[float] = ..., retained_accuracy: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., mia_auc: _Optional[float] = ...) -> None: ...

class ForgetReceipt(_message.Message):
    __slots__ = ("new_version", "parent_version", "removed_sample_ids", "removed_owner_ids", "already_forgotten_sample_ids", "units_selected", "parameters_updated", "parameters_total", "certificate", "before", "after", "seconds", "weights_sha256", "environment", "damping", "step_accepted", "accuracy_cost_flagged", "note", "method", "already_forgotten_owner_ids", "removed_samples", "removed_owners", "removed_sample_digests", "removed_owner_digests", "already_forgotten_samples", "already_forgotten_owners", "already_forgotten_sample_digests", "already_forgotten_owner_digests", "accuracy_collapse", "policy", "retained_gradient_norm_before", "batchnorm_recomputed")
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REMOVED_SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_OWNER_IDS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FORGOTTEN_SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    UNITS_SELECTED_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FIELD_NUMBER: _ClassVar[int]
    STEP_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_COST_FLAGGED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FORGOTTEN_OWNER_IDS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_OWNERS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_SAMPLE_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_OWNER_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FORGOTTEN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FORGOTTEN_OWNERS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FORGOTTEN_SAMPLE_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FORGOTTEN_OWNER_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_COLLAPSE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RETAINED_GRADIENT_NORM_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BATCHNORM_RECOMPUTED_FIELD_NUMBER: _ClassVar[int]
    new_version: int
    parent_version: int
    removed_sample_ids: _containers.RepeatedScalarFieldContainer[int]
    removed_owner_ids: _containers.RepeatedScalarFieldContainer[str]
    already_forgotten_sample_ids: _containers.RepeatedScalarFieldContainer[int]
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
    already_forgotten_owner_ids: _containers.RepeatedScalarFieldContainer[str]
    removed_samples: int
    removed_owners: int
    removed_sample_digests: _containers.RepeatedScalarFieldContainer[str]
    removed_owner_digests: _containers.RepeatedScalarFieldContainer[str]
    already_forgotten_samples: int
    already_forgotten_owners: int
    already_forgotten_sample_digests: _containers.RepeatedScalarFieldContainer[str]
    already_forgotten_owner_digests: _containers.RepeatedScalarFieldContainer[str]
    accuracy_collapse: AccuracyCollapse
    policy: ForgetPolicy
    retained_gradient_norm_before: float
    batchnorm_recomputed: bool
    def __init__(self, new_version: _Optional[int] = ..., parent_version: _Optional[int] = ..., removed_sample_ids: _Optional[_Iterable[int]] = ..., removed_owner_ids: _Optional[_Iterable[str]] = ..., already_forgotten_sample_ids: _Optional[_Iterable[int]] = ..., units_selected: _Optional[int] = ..., parameters_updated: _Optional[int] = ..., parameters_total: _Optional[int] = ..., certificate: _Optional[_Union[Certificate, _Mapping]] = ..., before: _Optional[_Union[DeletionMetrics, _Mapping]] = ..., after: _Optional[_Union[DeletionMetrics, _Mapping]] = ..., seconds: _Optional[float] = ..., weights_sha256: _Optional[str] = ..., environment: _Optional[str] = ..., damping: _Optional[float] = ..., step_accepted: _Optional[bool] = ..., accuracy_cost_flagged: _Optional[bool] = ..., note: _Optional[str] = ..., method: _Optional[_Union[ForgetMethod, _Mapping]] = ..., already_forgotten_owner_ids: _Optional[_Iterable[str]] = ..., removed_samples: _Optional[int] = ..., removed_owners: _Optional[int] = ..., removed_sample_digests: _Optional[_Iterable[str]] = ..., removed_owner_digests: _Optional[_Iterable[str]] = ..., already_forgotten_samples: _Optional[int] = ..., already_forgotten_owners: _Optional[int] = ..., already_forgotten_sample_digests: _Optional[_Iterable[str]] = ..., already_forgotten_owner_digests: _Optional[_Iterable[str]] = ..., accuracy_collapse: _Optional[_Union[AccuracyCollapse, _Mapping]] = ..., policy: _Optional[_Union[ForgetPolicy, _Mapping]] = ..., retained_gradient_norm_before: _Optional[float] = ..., batchnorm_recomputed: _Optional[bool] = ...) -> None: ...

class ForgetPolicy(_message.Message):
    __slots__ = ("path", "reason", "requested", "estimated_retrain_s", "estimated_newton_all_s", "estimated_targeted_s", "estimated_hessian_bytes", "estimated_seconds_per_sample", "profile", "profile_reason")
    PATH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_RETRAIN_S_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_NEWTON_ALL_S_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_TARGETED_S_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_HESSIAN_BYTES_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_SECONDS_PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_REASON_FIELD_NUMBER: _ClassVar[int]
    path: str
    reason: str
    requested: str
    estimated_retrain_s: float
    estimated_newton_all_s: float
    estimated_targeted_s: float
    estimated_hessian_bytes: int
    estimated_seconds_per_sample: float
    profile: str
    profile_reason: str
    def __init__(self, path: _Optional[str] = ..., reason: _Optional[str] = ..., requested: _Optional[str] = ..., estimated_retrain_s: _Optional[float] = ..., estimated_newton_all_s: _Optional[float] = ..., estimated_targeted_s: _Optional[float] = ..., estimated_hessian_bytes: _Optional[int] = ..., estimated_seconds_per_sample: _Optional[float] = ..., profile: _Optional[str] = ..., profile_reason: _Optional[str] = ...) -> None: ...

class AccuracyCollapse(_message.Message):
    __slots__ = ("drop_points", "limit_points", "policy", "action", "retrain_operation")
    DROP_POINTS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_POINTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RETRAIN_OPERATION_FIELD_NUMBER: _ClassVar[int]
    drop_points: float
    limit_points: float
    policy: str
    action: str
    retrain_operation: str
    def __init__(self, drop_points: _Optional[float] = ..., limit_points: _Optional[float] = ..., policy: _Optional[str] = ..., action: _Optional[str] = ..., retrain_operation: _Optional[str] = ...) -> None: ...

class ForgetMethod(_message.Message):
    __slots__ = ("selection", "hessian", "parameter_budget", "newton_iterations", "newton_iterations_taken", "damping_floor", "hessian_samples", "objective_samples", "ranking_hessian_samples", "ranking_cg_iterations", "ranking_newton_iterations", "seed", "candidate_parameters", "assume_converged", "step_coverage")
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    HESSIAN_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BUDGET_FIELD_NUMBER: _ClassVar[int]
    NEWTON_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    NEWTON_ITERATIONS_TAKEN_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FLOOR_FIELD_NUMBER: _ClassVar[int]
    HESSIAN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RANKING_HESSIAN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RANKING_CG_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    RANKING_NEWTON_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ASSUME_CONVERGED_FIELD_NUMBER: _ClassVar[int]
    STEP_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    selection: str
    hessian: str
    parameter_budget: int
    newton_iterations: int
    newton_iterations_taken: int
    damping_floor: float
    hessian_samples: int
    objective_samples: int
    ranking_hessian_samples: int
    ranking_cg_iterations: int
    ranking_newton_iterations: int
    seed: int
    candidate_parameters: int
    assume_converged: bool
    step_coverage: float
    def __init__(self, selection: _Optional[str] = ..., hessian: _Optional[str] = ..., parameter_budget: _Optional[int] = ..., newton_iterations: _Optional[int] = ..., newton_iterations_taken: _Optional[int] = ..., damping_floor: _Optional[float] = ..., hessian_samples: _Optional[int] = ..., objective_samples: _Optional[int] = ..., ranking_hessian_samples: _Optional[int] = ..., ranking_cg_iterations: _Optional[int] = ..., ranking_newton_iterations: _Optional[int] = ..., seed: _Optional[int] = ..., candidate_parameters: _Optional[int] = ..., assume_converged: _Optional[bool] = ..., step_coverage: _Optional[float] = ...) -> None: ...

class OperationProgress(_message.Message):
    __slots__ = ("phase", "completed", "total", "message")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    phase: str
    completed: int
    total: int
    message: str
    def __init__(self, phase: _Optional[str] = ..., completed: _Optional[int] = ..., total: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class OperationError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("name", "kind", "state", "done", "progress", "error", "receipt", "create_time", "update_time", "model", "retrain_receipt")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Operation.State]
        PENDING: _ClassVar[Operation.State]
        RUNNING: _ClassVar[Operation.State]
        SUCCEEDED: _ClassVar[Operation.State]
        FAILED: _ClassVar[Operation.State]
        CANCELLED: _ClassVar[Operation.State]
    STATE_UNSPECIFIED: Operation.State
    PENDING: Operation.State
    RUNNING: Operation.State
    SUCCEEDED: Operation.State
    FAILED: Operation.State
    CANCELLED: Operation.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RETRAIN_RECEIPT_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    state: Operation.State
    done: bool
    progress: OperationProgress
    error: OperationError
    receipt: ForgetReceipt
    create_time: str
    update_time: str
    model: str
    retrain_receipt: RetrainReceipt
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[Operation.State, str]] = ..., done: _Optional[bool] = ..., progress: _Optional[_Union[OperationProgress, _Mapping]] = ..., error: _Optional[_Union[OperationError, _Mapping]] = ..., receipt: _Optional[_Union[ForgetReceipt, _Mapping]] = ..., create_time: _Optional[str] = ..., update_time: _Optional[str] = ..., model: _Optional[str] = ..., retrain_receipt: _Optional[_Union[RetrainReceipt, _Mapping]] = ...) -> None: ...

class GetOperationRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListOperationsRequest(_message.Message):
    __slots__ = ("model", "states", "page_size", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    states: _containers.RepeatedScalarFieldContainer[Operation.State]
    page_size: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., states: _Optional[_Iterable[_Union[Operation.State, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListOperationsResponse(_message.Message):
    __slots__ = ("operations", "next_page_token")
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    operations: _containers.RepeatedCompositeFieldContainer[Operation]
    next_page_token: str
    def __init__(self, operations: _Optional[_Iterable[_Union[Operation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelOperationRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ScanRequest(_message.Message):
    __slots__ = ("model", "inputs", "estimator", "max_implicated", "mitigate", "request_id", "dry_run")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    MAX_IMPLICATED_FIELD_NUMBER: _ClassVar[int]
    MITIGATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: Tensor
    estimator: str
    max_implicated: int
    mitigate: bool
    request_id: str
    dry_run: bool
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., estimator: _Optional[str] = ..., max_implicated: _Optional[int] = ..., mitigate: _Optional[bool] = ..., request_id: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ImplicatedSample(_message.Message):
    __slots__ = ("sample_id", "owner_id", "label", "influence", "z", "class_outlier_z", "reason", "sample_key")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INFLUENCE_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    CLASS_OUTLIER_Z_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_KEY_FIELD_NUMBER: _ClassVar[int]
    sample_id: int
    owner_id: str
    label: int
    influence: float
    z: float
    class_outlier_z: float
    reason: str
    sample_key: str
    def __init__(self, sample_id: _Optional[int] = ..., owner_id: _Optional[str] = ..., label: _Optional[int] = ..., influence: _Optional[float] = ..., z: _Optional[float] = ..., class_outlier_z: _Optional[float] = ..., reason: _Optional[str] = ..., sample_key: _Optional[str] = ...) -> None: ...

class Mitigation(_message.Message):
    __slots__ = ("operation", "new_version", "predicted_label_after", "prediction_changed", "test_accuracy_before", "test_accuracy_after", "applied", "dry_run", "sample_ids", "targets", "targets_affected", "control_affected", "target_score_after", "p_value_after", "decision", "clean_analogues", "clean_analogues_affected", "sample_keys", "completion_added", "completion_affected", "completion_control_affected", "completion_kept")
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LABEL_AFTER_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_CHANGED_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_BEFORE_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_AFTER_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_AFFECTED_FIELD_NUMBER: _ClassVar[int]
    CONTROL_AFFECTED_FIELD_NUMBER: _ClassVar[int]
    TARGET_SCORE_AFTER_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_AFTER_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    CLEAN_ANALOGUES_FIELD_NUMBER: _ClassVar[int]
    CLEAN_ANALOGUES_AFFECTED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_KEYS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ADDED_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_AFFECTED_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_CONTROL_AFFECTED_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_KEPT_FIELD_NUMBER: _ClassVar[int]
    operation: str
    new_version: int
    predicted_label_after: int
    prediction_changed: bool
    test_accuracy_before: float
    test_accuracy_after: float
    applied: bool
    dry_run: bool
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    targets: int
    targets_affected: int
    control_affected: int
    target_score_after: float
    p_value_after: float
    decision: str
    clean_analogues: int
    clean_analogues_affected: int
    sample_keys: _containers.RepeatedScalarFieldContainer[str]
    completion_added: int
    completion_affected: int
    completion_control_affected: int
    completion_kept: bool
    def __init__(self, operation: _Optional[str] = ..., new_version: _Optional[int] = ..., predicted_label_after: _Optional[int] = ..., prediction_changed: _Optional[bool] = ..., test_accuracy_before: _Optional[float] = ..., test_accuracy_after: _Optional[float] = ..., applied: _Optional[bool] = ..., dry_run: _Optional[bool] = ..., sample_ids: _Optional[_Iterable[int]] = ..., targets: _Optional[int] = ..., targets_affected: _Optional[int] = ..., control_affected: _Optional[int] = ..., target_score_after: _Optional[float] = ..., p_value_after: _Optional[float] = ..., decision: _Optional[str] = ..., clean_analogues: _Optional[int] = ..., clean_analogues_affected: _Optional[int] = ..., sample_keys: _Optional[_Iterable[str]] = ..., completion_added: _Optional[int] = ..., completion_affected: _Optional[int] = ..., completion_control_affected: _Optional[int] = ..., completion_kept: _Optional[bool] = ...) -> None: ...

class ScanResult(_message.Message):
    __slots__ = ("index", "predicted_label", "target_score", "threshold", "flagged", "counterfactual_drop", "implicated", "mitigation", "model_version", "p_value", "influence_p_value", "group_outlier_z", "control_drop", "drop_threshold", "decision")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LABEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    COUNTERFACTUAL_DROP_FIELD_NUMBER: _ClassVar[int]
    IMPLICATED_FIELD_NUMBER: _ClassVar[int]
    MITIGATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    INFLUENCE_P_VALUE_FIELD_NUMBER: _ClassVar[int]
    GROUP_OUTLIER_Z_FIELD_NUMBER: _ClassVar[int]
    CONTROL_DROP_FIELD_NUMBER: _ClassVar[int]
    DROP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    index: int
    predicted_label: int
    target_score: float
    threshold: float
    flagged: bool
    counterfactual_drop: float
    implicated: _containers.RepeatedCompositeFieldContainer[ImplicatedSample]
    mitigation: Mitigation
    model_version: int
    p_value: float
    influence_p_value: float
    group_outlier_z: float
    control_drop: float
    drop_threshold: float
    decision: str
    def __init__(self, index: _Optional[int] = ..., predicted_label: _Optional[int] = ..., target_score: _Optional[float] = ..., threshold: _Optional[float] = ..., flagged: _Optional[bool] = ..., counterfactual_drop: _Optional[float] = ..., implicated: _Optional[_Iterable[_Union[ImplicatedSample, _Mapping]]] = ..., mitigation: _Optional[_Union[Mitigation, _Mapping]] = ..., model_version: _Optional[int] = ..., p_value: _Optional[float] = ..., influence_p_value: _Optional[float] = ..., group_outlier_z: _Optional[float] = ..., control_drop: _Optional[float] = ..., drop_threshold: _Optional[float] = ..., decision: _Optional[str] = ...) -> None: ...

class ScanEstimate(_message.Message):
    __slots__ = ("inputs", "training_samples", "checkpoints", "estimated_seconds", "estimated_bytes", "estimated_scoring_seconds", "estimated_calibration_seconds", "estimated_confirmation_seconds", "estimated_mitigation_seconds", "calibrated")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_SCORING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_CALIBRATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_CONFIRMATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_MITIGATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    inputs: int
    training_samples: int
    checkpoints: int
    estimated_seconds: float
    estimated_bytes: int
    estimated_scoring_seconds: float
    estimated_calibration_seconds: float
    estimated_confirmation_seconds: float
    estimated_mitigation_seconds: float
    calibrated: bool
    def __init__(self, inputs: _Optional[int] = ..., training_samples: _Optional[int] = ..., checkpoints: _Optional[int] = ..., estimated_seconds: _Optional[float] = ..., estimated_bytes: _Optional[int] = ..., estimated_scoring_seconds: _Optional[float] = ..., estimated_calibration_seconds: _Optional[float] = ..., estimated_confirmation_seconds: _Optional[float] = ..., estimated_mitigation_seconds: _Optional[float] = ..., calibrated: _Optional[bool] = ...) -> None: ...

class NeighborsRequest(_message.Message):
    __slots__ = ("model", "inputs", "k", "mode", "filter_label", "label")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FILTER_LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: Tensor
    k: int
    mode: str
    filter_label: bool
    label: int
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., mode: _Optional[str] = ..., filter_label: _Optional[bool] = ..., label: _Optional[int] = ...) -> None: ...

class Neighbor(_message.Message):
    __slots__ = ("sample_id", "owner_id", "label", "score", "sample_key")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_KEY_FIELD_NUMBER: _ClassVar[int]
    sample_id: int
    owner_id: str
    label: int
    score: float
    sample_key: str
    def __init__(self, sample_id: _Optional[int] = ..., owner_id: _Optional[str] = ..., label: _Optional[int] = ..., score: _Optional[float] = ..., sample_key: _Optional[str] = ...) -> None: ...

class NeighborList(_message.Message):
    __slots__ = ("neighbors",)
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    def __init__(self, neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ...) -> None: ...

class NeighborsResponse(_message.Message):
    __slots__ = ("results", "stale", "embedded_version", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDED_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[NeighborList]
    stale: bool
    embedded_version: int
    model_version: int
    def __init__(self, results: _Optional[_Iterable[_Union[NeighborList, _Mapping]]] = ..., stale: _Optional[bool] = ..., embedded_version: _Optional[int] = ..., model_version: _Optional[int] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("id", "time", "actor", "action", "resource", "details_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    id: int
    time: str
    actor: str
    action: str
    resource: str
    details_json: str
    def __init__(self, id: _Optional[int] = ..., time: _Optional[str] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., resource: _Optional[str] = ..., details_json: _Optional[str] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("model", "page_size", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    page_size: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
