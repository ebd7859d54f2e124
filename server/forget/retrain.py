"""Exact retraining on the current training data: a new version and a fresh noise budget.

The certified-noise budget (Guo et al.) bounds how many approximate deletions a model may
take; once it is spent the forget receipt says so, and a retrain restores an exact state:
the architecture and training config of version 1, trained from scratch on what is left.
It is journalled and applied by the forget worker, in order, so it trains on every
deletion acknowledged before it, and it replaces the training checkpoints (Scan's
renormalized influence reads them) with ones that never saw a forgotten sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from expunge.defenses.architectures import ArchitectureSpec
from expunge.defenses.certificate import BudgetLedger
from expunge.defenses.training import TrainConfig, train
from expunge.server.forget.journal import ProgressReporter
from expunge.server.model_factory import build_architecture
from expunge.server.state import weights as weights_io
from expunge.server.state.store import RequestRow, RetrainCommit, VersionRow

if TYPE_CHECKING:
    from expunge.server.engine import Engine


@dataclass(frozen=True)
class RetrainPayload:
    """The canonical form of a retrain request: what the idempotency hash covers."""

    model: str

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrainPayload:
        return cls(data["model"])


def apply_retrain(
    engine: Engine, request: RequestRow, reporter: ProgressReporter, environment: str
) -> int:
    """Train from scratch, commit the new version with the request's receipt; its number."""
    started = time.perf_counter()
    payload = RetrainPayload.from_dict(request.payload)
    store = engine.store
    row = engine.model_row(payload.model)
    parent = engine.version_row(payload.model, row.current_version)
    data = engine.training_data(payload.model)
    spec = ArchitectureSpec.from_dict(row.spec)
    config = TrainConfig.from_dict(row.train_config)
    n = len(data.sample_ids)
    reporter.phase("training", 0, n, f"training from scratch on {n} samples")
    model = build_architecture(spec, engine.settings.trusted_factories, seed=config.seed)
    result = train(model, data.features, data.labels, config, device=engine.device)
    reporter.phase("verifying", message="measuring the retrained model")
    test = engine.test_data(payload.model)
    metrics, tested = engine.evaluate(model, data.features, data.labels, test, config.weight_decay)
    metrics["training_seconds"] = result.seconds
    reporter.phase("committing")
    # Held from the first blob written to the commit that references it: a garbage
    # collection in between (an index build's) would take the new blobs.
    with store.write_lock:
        weights_blob = store.blobs.put(weights_io.model_to_bytes(model))
        checkpoints_blob = store.blobs.put(weights_io.checkpoints_to_bytes(result.checkpoints))
        new_version = store.next_version(payload.model)
        ledger = BudgetLedger.from_dict(row.ledger, engine.settings.forget_budget).reset()
        receipt = {
            "new_version": new_version,
            "parent_version": row.current_version,
            "training_samples": n,
            "test_accuracy": metrics["test_accuracy"],
            "parent_test_accuracy": parent.metrics.get("test_accuracy", 0.0),
            "weights_sha256": weights_blob,
            "budget_total": ledger.budget,
            "seconds": time.perf_counter() - started,
            "environment": environment,
        }
        store.commit_retrain(
            RetrainCommit(
                version=VersionRow.made_by(
                    request.request_id,
                    payload.model,
                    new_version,
                    row.current_version,
                    weights_blob,
                    metrics,
                    n,
                ),
                checkpoints_blob=checkpoints_blob,
                ledger=ledger.to_dict(),
                receipt=receipt,
                actor=request.payload.get("actor", "anonymous"),
                audit={
                    "request_id": request.request_id,
                    "new_version": new_version,
                    "training_samples": n,
                },
            )
        )
        # The old checkpoints were trained on forgotten samples: nothing references them now.
        store.blobs.collect_garbage(store.referenced_blobs())
    engine.forget_snapshot_cache(payload.model)
    engine.keep_test_measurement(payload.model, new_version, tested)
    return new_version
