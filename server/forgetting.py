"""Forget: validate and journal a request, then (in the worker) select, update, verify, commit.

The update runs on a scratch copy of the current model; nothing becomes visible
until one SQLite transaction writes the new version, the rewritten data shard,
the removed sample rows, the forgotten-id ledger, the request's receipt and the
audit event together.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from expunge.defenses.architectures import ArchitectureSpec
from expunge.defenses.training import TrainConfig

from . import weights as weights_io
from .compute import ComputeProcess, UnlearningJob
from .engine import Engine, parse_model_name
from .errors import AlreadyExists, FailedPrecondition, NotFound, invalid_field
from .faults import crash_point
from .identifiers import IdentifierKey
from .indexing import ARTEFACT as INDEX_ARTEFACT
from .indexing import IndexService
from .jobs import SUCCEEDED, JobRunner, ProgressReporter
from .retraining import RetrainPayload, apply_retrain
from .roles import require_effect
from .store import RequestRow
from .unlearning import UnlearningOptions, unlearn
from .versioning import insert_next_version

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
class _NamedIdentifiers:
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


def request_seed(request_id: str, version: int) -> int:
    """Deterministic seed of one request on one model version."""
    return int.from_bytes(hashlib.sha256(f"{request_id}:{version}".encode()).digest()[:4], "little")


class ForgetService:
    """Submission (in the RPC thread) and application (in the worker) of forget requests."""

    def __init__(
        self,
        engine: Engine,
        index: IndexService | None = None,
        compute: ComputeProcess | None = None,
    ) -> None:
        self.engine = engine
        self.index = index
        self.compute = compute  # None: compute in the worker thread
        self.jobs = JobRunner(engine.store, self._apply)

    def close(self, timeout: float | None = None) -> bool:
        """Stop the worker (the request in progress may finish within ``timeout``), then the
        compute process; True once the worker is gone.

        Call it before the process exits: the worker is a daemon thread, and one still in
        torch code when the interpreter finalizes is unwound through C++ and aborts the
        process ("terminate called without an active exception", seen once in 12 runs of the
        determinism test's script, after its forget had committed).
        """
        stopped = self.jobs.stop(timeout)
        if self.compute is not None:
            self.compute.close()
        return stopped

    # Submission --------------------------------------------------------------------------

    def submit(
        self,
        model: str,
        sample_ids: list[int],
        owner_ids: list[str],
        request_id: str,
        options: UnlearningOptions,
        actor: str,
    ) -> RequestRow:
        """Validate, check idempotency, resolve ids, journal durably; return the request row."""
        require_effect("forget", actor)
        _check_request_id(request_id)
        name = parse_model_name(model)
        if not sample_ids and not owner_ids:
            raise invalid_field("sample_ids", "name at least one sample id or owner id to forget")
        if len(sample_ids) + len(owner_ids) > MAX_IDS_PER_REQUEST:
            raise invalid_field(
                "sample_ids", f"at most {MAX_IDS_PER_REQUEST} ids per request; split it"
            )
        if any(not o for o in owner_ids):
            raise invalid_field("owner_ids", "owner ids must be non-empty strings")
        payload = ForgetPayload(
            name, tuple(sorted(set(sample_ids))), tuple(sorted(set(owner_ids))), options
        )
        digest = self.engine.store.identifiers.payload_digest(payload.to_dict())
        existing = self._existing(request_id, digest)
        if existing is not None:
            return existing
        self.engine.model_row(name)
        self._check_known(payload)
        details = {
            "request_id": request_id,
            "samples": len(payload.sample_ids),
            "owners": len(payload.owner_ids),
        }
        return self._journal(request_id, "forget", payload.to_dict(), digest, actor, details)

    def submit_retrain(self, model: str, request_id: str, actor: str) -> RequestRow:
        """Journal an exact retrain of ``model`` behind the requests already queued."""
        require_effect("retrain", actor)
        _check_request_id(request_id)
        payload = RetrainPayload(parse_model_name(model))
        digest = self.engine.store.identifiers.payload_digest(payload.to_dict())
        existing = self._existing(request_id, digest)
        if existing is not None:
            return existing
        self.engine.model_row(payload.model)
        details = {"request_id": request_id}
        return self._journal(request_id, "retrain", payload.to_dict(), digest, actor, details)

    def _accuracy_collapse(
        self, model: str, request_id: str, parent_version: int, metrics: dict[str, float]
    ) -> AccuracyCollapse | None:
        """None unless the update costs more test accuracy than the settings allow."""
        settings = self.engine.settings
        parent = self.engine.version_row(model, parent_version).metrics.get("test_accuracy")
        after = metrics.get("test_accuracy")
        if parent is None or after is None:
            return None
        drop = 100.0 * (parent - after)
        if drop <= settings.accuracy_collapse_points:
            return None
        policy = settings.on_accuracy_collapse
        retrain_id = f"{request_id}:retrain" if policy == "retrain" else ""
        held = None
        if policy != "serve":
            then = (
                f"the exact retrain operations/{retrain_id} will replace it"
                if retrain_id
                else f"run an exact retrain (expunge retrain {model}) to serve the model again"
            )
            held = (
                f"its forget (operations/{request_id}) cost {drop:.1f} points of test accuracy, "
                f"more than the {settings.accuracy_collapse_points:g} allowed; {then}"
            )
        return AccuracyCollapse(drop, settings.accuracy_collapse_points, policy, held, retrain_id)

    def _existing(self, request_id: str, payload_sha256: str) -> RequestRow | None:
        """The request journalled under ``request_id``, if any; another payload conflicts."""
        existing = self.engine.store.request(request_id)
        if existing is not None and existing.payload_sha256 != payload_sha256:
            raise AlreadyExists(
                f"request id {request_id!r} was used for a different request; use a new id"
            )
        return existing

    def _journal(
        self,
        request_id: str,
        kind: str,
        payload: dict[str, Any],
        payload_sha256: str,
        actor: str,
        details: dict[str, Any],
    ) -> RequestRow:
        model = payload["model"]
        try:
            with self.engine.store.transaction() as tx:
                tx.insert_request(
                    request_id, model, kind, payload_sha256, {**payload, "actor": actor}
                )
                tx.audit(actor, f"{kind}_requested", f"models/{model}", details)
        except sqlite3.IntegrityError:
            # The same id journalled by a concurrent call since _existing looked: answer
            # as a retry would (or ALREADY_EXISTS for another payload).
            existing = self._existing(request_id, payload_sha256)
            if existing is None:
                raise
            return existing
        self.jobs.notify()
        row = self.engine.store.request(request_id)
        assert row is not None
        return row

    def _journal_in(
        self,
        tx: Any,
        request_id: str,
        payload: RetrainPayload,
        actor: str,
        details: dict[str, Any],
    ) -> None:
        """Journal a retrain inside another request's commit (no acknowledgement to give)."""
        as_dict = payload.to_dict()
        digest = self.engine.store.identifiers.payload_digest(as_dict)
        tx.insert_request(request_id, payload.model, "retrain", digest, {**as_dict, "actor": actor})
        tx.audit(actor, "retrain_requested", f"models/{payload.model}", details)

    def _check_known(self, payload: ForgetPayload) -> None:
        """Unknown ids are NOT_FOUND (listing them) and nothing is applied; forgotten ones are fine."""
        store = self.engine.store
        unknown_samples = []
        for start in range(0, len(payload.sample_ids), 500):
            chunk = list(payload.sample_ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            known = {
                int(r[0])
                for r in store.query(
                    f"SELECT sample_id FROM samples WHERE model = ? AND sample_id IN ({marks}) "
                    f"UNION SELECT sample_id FROM forgotten WHERE model = ? AND sample_id IN ({marks})",
                    (payload.model, *chunk, payload.model, *chunk),
                )
            }
            unknown_samples += [s for s in chunk if s not in known]
        unknown_owners = [
            o
            for o in payload.owner_ids
            if not store.query(
                "SELECT 1 FROM samples WHERE model = ? AND owner_id = ? LIMIT 1", (payload.model, o)
            )
            and not store.query(
                "SELECT 1 FROM forgotten WHERE model = ? AND owner_sha256 = ? LIMIT 1",
                (payload.model, store.identifiers.digest("owner", o)),
            )
        ]
        if unknown_samples or unknown_owners:
            parts = []
            if unknown_samples:
                parts.append(
                    f"sample ids {unknown_samples[:20]}"
                    + (" ..." if len(unknown_samples) > 20 else "")
                )
            if unknown_owners:
                parts.append(
                    f"owner ids {unknown_owners[:20]}"
                    + (" ..." if len(unknown_owners) > 20 else "")
                )
            raise NotFound(
                f"unknown {' and '.join(parts)} in models/{payload.model}; nothing was applied"
            )
        self._check_leaves_data(payload)

    def _check_leaves_data(self, payload: ForgetPayload) -> None:
        """A forget must leave training data: the update needs the retained objective."""
        store = self.engine.store
        named: set[int] = set()
        for start in range(0, len(payload.sample_ids), 500):
            chunk = list(payload.sample_ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            named |= {
                int(r[0])
                for r in store.query(
                    f"SELECT sample_id FROM samples WHERE model = ? AND sample_id IN ({marks})",
                    (payload.model, *chunk),
                )
            }
        for owner in payload.owner_ids:
            named |= {
                int(r[0])
                for r in store.query(
                    "SELECT sample_id FROM samples WHERE model = ? AND owner_id = ?",
                    (payload.model, owner),
                )
            }
        remaining = int(
            store.query("SELECT COUNT(*) FROM samples WHERE model = ?", (payload.model,))[0][0]
        )
        if named and len(named) >= remaining:
            raise _would_empty(payload.model, remaining)

    # Application (worker thread) -----------------------------------------------------------

    def _apply(self, request: RequestRow, reporter: ProgressReporter) -> None:
        if request.kind == "retrain":
            apply_retrain(self.engine, request, reporter, environment())
            return
        started = time.perf_counter()
        payload = ForgetPayload.from_dict(request.payload)
        engine, store = self.engine, self.engine.store
        row = engine.model_row(payload.model)
        data = engine.training_data(payload.model)
        owners_set = set(payload.owner_ids)
        id_set = set(payload.sample_ids)
        mask = np.array(
            [
                int(s) in id_set or str(o) in owners_set
                for s, o in zip(data.sample_ids, data.owner_ids, strict=True)
            ],
            dtype=bool,
        )
        removed_ids = [int(s) for s in data.sample_ids[mask]]
        # Owners named in the request whose samples this forget removes.
        removed_owners = sorted(owners_set & {str(o) for o in data.owner_ids[mask]})
        already = sorted(id_set - set(removed_ids))
        # Every named owner is known (submit checked): those with no rows left were forgotten.
        already_owners = sorted(owners_set - set(removed_owners))
        named = _NamedIdentifiers(
            store.identifiers, removed_ids, removed_owners, already, already_owners
        )
        if not removed_ids:
            result = {
                "new_version": row.current_version,
                "parent_version": row.current_version,
                **named.receipt_fields(),
                "note": "everything named had been forgotten already; nothing changed",
                "seconds": time.perf_counter() - started,
            }
            with store.transaction() as tx:
                tx.set_request_state(request.request_id, SUCCEEDED, result)
                tx.audit(
                    request.payload.get("actor", "anonymous"),
                    "forget",
                    f"models/{payload.model}",
                    {
                        "request_id": request.request_id,
                        "already_forgotten": len(already),
                        "removed": 0,
                    },
                )
            return

        if mask.all():
            # Earlier forgets left only what this one names (submit checked the rest).
            raise _would_empty(payload.model, len(mask))
        snapshot = engine.snapshot(payload.model)
        spec = ArchitectureSpec.from_dict(row.spec)
        config = TrainConfig.from_dict(row.train_config)
        model = copy.deepcopy(snapshot.module)
        for p in model.parameters():
            p.requires_grad_(True)
        keep = torch.from_numpy(~mask)
        forget_idx = torch.from_numpy(mask)
        test = engine.test_data(payload.model)
        arrays: dict[str, Any] = {
            "forget_x": data.features[forget_idx],
            "forget_y": data.labels[forget_idx],
            "retained_x": data.features[keep],
            "retained_y": data.labels[keep],
            "test_x": torch.from_numpy(test.features),
            "test_y": torch.from_numpy(test.labels),
        }
        arguments: dict[str, Any] = {
            "weight_decay": config.weight_decay,
            "options": payload.options,
            "ledger": row.ledger,
            "default_budget": engine.settings.forget_budget,
            "default_parameter_budget": engine.settings.forget_parameter_budget,
            "hessian_samples": engine.settings.forget_hessian_samples,
            "objective_samples": engine.settings.forget_objective_samples,
            "ranking_hessian_samples": engine.settings.forget_ranking_hessian_samples,
            "ranking_cg_iterations": engine.settings.forget_ranking_cg_iterations,
            "seed": request_seed(request.request_id, row.current_version),
        }
        if self.compute is None:
            outcome = unlearn(model=model, spec=spec, reporter=reporter, **arrays, **arguments)
        else:
            job = UnlearningJob(
                job=request.request_id,
                spec=row.spec,
                trusted_factories=engine.settings.trusted_factories,
                weights=weights_io.model_to_bytes(model),
                arrays=arrays,
                arguments=arguments,
            )
            outcome, new_weights = self.compute.unlearn(job, reporter)
            weights_io.load_into(model, new_weights)
        reporter.check_cancelled()
        reporter.phase("committing")
        with store.write_lock:
            crash_point("forget_before_weights")
            weights = weights_io.model_to_bytes(model)
            weights_blob = store.blobs.put(weights)
            crash_point("forget_after_weights")
            shard = weights_io.arrays_to_bytes(
                {
                    "features": data.features[keep].numpy(),
                    "labels": data.labels[keep].numpy(),
                    "sample_ids": data.sample_ids[~mask],
                }
            )
            train_blob = store.blobs.put(shard)
            crash_point("forget_after_shard")
            index_blob = (
                self.index.remove_for_commit(payload.model, removed_ids) if self.index else None
            )
            crash_point("forget_after_index")
            new_version = store.next_version(payload.model)
            receipt = {
                **outcome.receipt,
                "new_version": new_version,
                "parent_version": row.current_version,
                **named.receipt_fields(),
                "weights_sha256": weights_blob,
                "environment": environment(),
                "seconds": time.perf_counter() - started,
            }
            metrics = engine.evaluate(
                model, data.features[keep], data.labels[keep], test, config.weight_decay
            )
            actor = request.payload.get("actor", "anonymous")
            collapse = self._accuracy_collapse(
                payload.model, request.request_id, row.current_version, metrics
            )
            if collapse is not None:
                receipt["accuracy_collapse"] = collapse.receipt_field()
            crash_point("forget_before_commit")
            with store.transaction() as tx:
                insert_next_version(
                    tx,
                    row,
                    new_version,
                    request.request_id,
                    weights_blob,
                    metrics,
                    int(keep.sum()),
                    "the forget",
                    held_reason=collapse.held_reason if collapse else None,
                )
                if collapse is not None and collapse.retrain_request_id:
                    self._journal_in(
                        tx,
                        collapse.retrain_request_id,
                        RetrainPayload(payload.model),
                        actor,
                        {"request_id": collapse.retrain_request_id, "after": request.request_id},
                    )
                tx.execute(
                    "UPDATE models SET current_version = ?, train_blob = ?, num_samples = ?, ledger_json = ? WHERE name = ?",
                    (
                        new_version,
                        train_blob,
                        row.num_samples - len(removed_ids),
                        json.dumps(outcome.ledger),
                        payload.model,
                    ),
                )
                tx.execute(
                    "UPDATE versions SET superseded_by_forget = 1 WHERE model = ? AND version < ?",
                    (payload.model, new_version),
                )
                owners_by_id = dict(
                    zip(data.sample_ids[mask].tolist(), data.owner_ids[mask].tolist(), strict=True)
                )
                for start in range(0, len(removed_ids), 500):
                    chunk = removed_ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    tx.execute(
                        f"DELETE FROM samples WHERE model = ? AND sample_id IN ({marks})",
                        (payload.model, *chunk),
                    )
                for sid in removed_ids:
                    tx.execute(
                        "INSERT INTO forgotten (model, sample_id, owner_sha256, request_id, version) VALUES (?,?,?,?,?)",
                        (
                            payload.model,
                            sid,
                            store.identifiers.digest("owner", owners_by_id[sid]),
                            request.request_id,
                            new_version,
                        ),
                    )
                if index_blob is not None:
                    tx.execute(
                        "UPDATE artefacts SET blob = ? WHERE model = ? AND kind = ?",
                        (index_blob, payload.model, INDEX_ARTEFACT),
                    )
                tx.set_request_state(request.request_id, SUCCEEDED, receipt)
                tx.audit(
                    actor,
                    "forget",
                    f"models/{payload.model}",
                    {
                        "request_id": request.request_id,
                        "removed_samples": len(removed_ids),
                        "owners": len(removed_owners),
                        "new_version": new_version,
                        "parameters_updated": receipt.get("parameters_updated", 0),
                    },
                )
            crash_point("forget_after_commit")
            store.blobs.collect_garbage(store.referenced_blobs())
            store.checkpoint_wal()
        # Listeners (the index's re-embed, scan's solver cache) follow from here.
        engine.forget_snapshot_cache(payload.model)


def _check_request_id(request_id: str) -> None:
    if not request_id or len(request_id) > REQUEST_ID_MAX or not request_id.isprintable():
        raise invalid_field(
            "request_id",
            f"required: a printable idempotency key of at most {REQUEST_ID_MAX} characters",
        )


def _would_empty(model: str, remaining: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"forgetting these would remove all {remaining} remaining training samples of "
        f"models/{model}, leaving nothing to update the model on; nothing was applied "
        "(delete the model instead)"
    )


def environment() -> str:
    device = "cpu"
    return (
        f"torch {torch.__version__}; device {device}; threads {torch.get_num_threads()}; "
        f"deterministic {torch.are_deterministic_algorithms_enabled()}"
    )
