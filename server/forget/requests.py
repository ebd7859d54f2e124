"""A forget request's canonical form, and what its receipt records about it.

The payload is what the idempotency digest covers; the receipt names what was removed by
count and keyed digest only (identifiers at rest), and says what an accuracy collapse did.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from expunge.server.device import describe_device
from expunge.server.errors import FailedPrecondition, invalid_field
from expunge.server.forget.computation import UnlearningOptions
from expunge.server.state.identifiers import IdentifierKey

MAX_IDS_PER_REQUEST = 100_000
REQUEST_ID_MAX = 128


@dataclass(frozen=True)
class ForgetPayload:
    """The canonical form of a request: what the idempotency hash covers."""

    model: str
    sample_ids: tuple[int, ...]
    owner_ids: tuple[str, ...]
    options: UnlearningOptions

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "sample_ids": list(self.sample_ids),
            "owner_ids": list(self.owner_ids),
            "options": self.options.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ForgetPayload:
        return cls(
            data["model"],
            tuple(data["sample_ids"]),
            tuple(data["owner_ids"]),
            UnlearningOptions.from_dict(data["options"]),
        )


@dataclass(frozen=True)
class AccuracyCollapse:
    """An update that cost more test accuracy than allowed, and what the commit does about it."""

    drop_points: float
    limit_points: float
    policy: str  # settings.on_accuracy_collapse
    held_reason: str | None  # set unless the policy is "serve"
    retrain_request_id: str  # set for "retrain": journalled in the forget's own commit

    def receipt_field(self) -> dict[str, Any]:
        return {
            "drop_points": self.drop_points,
            "limit_points": self.limit_points,
            "policy": self.policy,
            "action": self.policy,
            "retrain_operation": (
                f"operations/{self.retrain_request_id}" if self.retrain_request_id else ""
            ),
        }


@dataclass(frozen=True)
class NamedIdentifiers:
    """What a forget removed and found forgotten already, as the receipt keeps it: counts,
    and keyed digests in place of the ids (identifiers.py)."""

    key: IdentifierKey
    removed_sample_ids: list[int]
    removed_owner_ids: list[str]
    already_sample_ids: list[int]
    already_owner_ids: list[str]

    def receipt_fields(self) -> dict[str, Any]:
        def digests(domain: str, values: list[Any]) -> list[str]:
            return sorted(self.key.digest(domain, v) for v in values)

        return {
            "removed_samples": len(self.removed_sample_ids),
            "removed_owners": len(self.removed_owner_ids),
            "removed_sample_digests": digests("sample", self.removed_sample_ids),
            "removed_owner_digests": digests("owner", self.removed_owner_ids),
            "already_forgotten_samples": len(self.already_sample_ids),
            "already_forgotten_owners": len(self.already_owner_ids),
            "already_forgotten_sample_digests": digests("sample", self.already_sample_ids),
            "already_forgotten_owner_digests": digests("owner", self.already_owner_ids),
        }


def request_seed(payload_digest: str, version: int) -> int:
    """Deterministic seed of one request's payload on one model version.

    Derived from what is asked (the keyed payload digest), not from the request id, so the
    same forget on the same version gives the same weights whatever id it was sent under;
    keyed, so the seed in the receipt cannot be used to test a guess of the owner ids.
    """
    digest = hashlib.sha256(f"{payload_digest}:{version}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def check_request_id(request_id: str) -> None:
    if not request_id or len(request_id) > REQUEST_ID_MAX or not request_id.isprintable():
        raise invalid_field(
            "request_id",
            f"required: a printable idempotency key of at most {REQUEST_ID_MAX} characters",
        )


def would_empty(model: str, remaining: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"forgetting these would remove all {remaining} remaining training samples of "
        f"models/{model}, leaving nothing to update the model on; nothing was applied "
        "(delete the model instead)"
    )


def environment(device: torch.device) -> str:
    """What the receipt says the update ran on: torch, the device computed on, threads."""
    return (
        f"torch {torch.__version__}; device {describe_device(device)}; "
        f"threads {torch.get_num_threads()}; "
        f"deterministic {torch.are_deterministic_algorithms_enabled()}"
    )
