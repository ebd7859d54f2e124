"""What a commit writes, as values: the forget worker computes one, the store applies it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from expunge.server.state.store.rows import ArtefactRow, VersionRow


@dataclass(frozen=True)
class JournalEntry:
    """A request to journal: its id, model, kind, keyed payload digest and payload."""

    request_id: str
    model: str
    kind: str  # forget or retrain
    payload_digest: str
    payload: dict[str, Any]  # with the actor; identifiers are scrubbed when it ends
    actor: str
    audit: dict[str, Any]  # details of the "<kind>_requested" audit event


@dataclass(frozen=True)
class ForgetCommit:
    """Everything one forget writes. ``version.created_by`` is the request id and
    ``version.parent`` the current version the forget was computed on."""

    version: VersionRow
    train_blob: str  # the data shard without the forgotten rows
    ledger: dict[str, Any]
    removed_owner_by_sample: dict[int, str]
    receipt: dict[str, Any]
    actor: str
    audit: dict[str, Any]
    index_artefact: ArtefactRow | None = None  # the index without the forgotten ids
    # New training checkpoints when the forget was an exact retrain (the old ones saw the
    # forgotten samples); None keeps the model's.
    checkpoints_blob: str | None = None
    # A request journalled in the same commit (the exact retrain of an accuracy collapse).
    then_journal: JournalEntry | None = None


@dataclass(frozen=True)
class RetrainCommit:
    """Everything one exact retrain writes (``version`` as in ``ForgetCommit``)."""

    version: VersionRow
    checkpoints_blob: str
    ledger: dict[str, Any]
    receipt: dict[str, Any]
    actor: str
    audit: dict[str, Any] = field(default_factory=dict)
