"""Python client for the Expunge service (needs grpcio, protobuf and numpy; no torch)."""

from .client import Client
from .errors import (
    AlreadyExistsError,
    ExpungeError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from .types import (
    ForgetMethod,
    ForgetReceipt,
    ModelInfo,
    Operation,
    Prediction,
    RetrainReceipt,
    ScanResult,
    VersionInfo,
)

__all__ = [
    "AlreadyExistsError",
    "Client",
    "ExpungeError",
    "FailedPreconditionError",
    "ForgetMethod",
    "ForgetReceipt",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "Operation",
    "PermissionDeniedError",
    "Prediction",
    "ResourceExhaustedError",
    "RetrainReceipt",
    "ScanResult",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "VersionInfo",
]
