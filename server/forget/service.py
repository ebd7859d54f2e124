"""Forget: validate and journal a request, then (in the worker) select, update, verify, commit.

The update runs on a scratch copy of the current model, while the data shard without
the forgotten rows is staged beside it; nothing becomes visible until one SQLite
transaction writes the new version, names the rewritten data shard, and writes
the removed sample rows, the forgotten-id ledger, the request's receipt and the
audit event together.
"""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from expunge.defenses.architectures import ArchitectureSpec
from expunge.defenses.training import TrainConfig
from expunge.server.engine import (
    Engine,
    ModelSnapshot,
    TrainingData,
    guarded_accuracy,
    parse_model_name,
)
from expunge.server.errors import AlreadyExists, NotFound, invalid_field
from expunge.server.faults import crash_point
from expunge.server.forget.computation import (
    UnlearningOptions,
    recipe_for,
    unlearn,
)
from expunge.server.forget.compute_process import ComputeProcess, ForgetData, UnlearningJob
from expunge.server.forget.journal import JobRunner, ProgressReporter
from expunge.server.forget.policy import TrainingCost
from expunge.server.forget.profile import choose_profile
from expunge.server.forget.requests import (
    MAX_IDS_PER_REQUEST,
    AccuracyCollapse,
    ForgetPayload,
    NamedIdentifiers,
    check_request_id,
    environment,
    request_seed,
    would_empty,
)
from expunge.server.forget.retrain import RetrainPayload, apply_retrain
from expunge.server.forget.shard_staging import StagedShard
from expunge.server.index.service import IndexService
from expunge.server.roles import require_effect
from expunge.server.state import weights as weights_io
from expunge.server.state.datasets import MAX_SAMPLE_KEY_CHARS
from expunge.server.state.store import (
    ForgetCommit,
    JournalEntry,
    ModelRow,
    RequestIdTaken,
    RequestRow,
    VersionRow,
)
from expunge.server.telemetry.metrics import ServerMetrics

log = logging.getLogger("expunge.server.forget")


class ForgetService:
    """Submission (in the RPC thread) and application (in the worker) of forget requests."""

    def __init__(
        self,
        engine: Engine,
        index: IndexService | None = None,
        compute: ComputeProcess | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.index = index
        self.compute = compute  # None: compute in the worker thread
        self.jobs = JobRunner(
            engine.store, self._apply, metrics.operation_ended if metrics else None
        )

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

    def wait_done(self, request_id: str, timeout: float) -> RequestRow | None:
        """The request's row once it has ended (or when ``timeout`` runs out)."""
        return self.jobs.wait_done(request_id, timeout)

    # Submission --------------------------------------------------------------------------

    def submit(
        self,
        model: str,
        sample_ids: list[int],
        owner_ids: list[str],
        request_id: str,
        options: UnlearningOptions,
        actor: str,
        sample_keys: list[str] | None = None,
    ) -> RequestRow:
        """Validate, check idempotency, resolve ids, journal durably; return the request row.

        ``sample_keys``: string sample ids of a model imported with them; each names the
        integer id the server gave it (an unknown one is NOT_FOUND)."""
        require_effect("forget", actor)
        check_request_id(request_id)
        name = parse_model_name(model)
        keys = sample_keys or []
        if not sample_ids and not owner_ids and not keys:
            raise invalid_field(
                "sample_ids", "name at least one sample id, sample key or owner id to forget"
            )
        if len(sample_ids) + len(owner_ids) + len(keys) > MAX_IDS_PER_REQUEST:
            raise invalid_field(
                "sample_ids", f"at most {MAX_IDS_PER_REQUEST} ids per request; split it"
            )
        if any(not o for o in owner_ids):
            raise invalid_field("owner_ids", "owner ids must be non-empty strings")
        if any(not k or len(k) > MAX_SAMPLE_KEY_CHARS for k in keys):
            raise invalid_field(
                "sample_keys",
                f"sample keys must be non-empty strings of at most {MAX_SAMPLE_KEY_CHARS} "
                "characters",
            )
        if keys:
            sample_ids = [*sample_ids, *self._resolve_keys(name, keys)]
        payload = ForgetPayload(
            name, tuple(sorted(set(sample_ids))), tuple(sorted(set(owner_ids))), options
        )
        entry = self._entry(
            request_id,
            "forget",
            payload.to_dict(),
            actor,
            {
                "request_id": request_id,
                "samples": len(payload.sample_ids),
                "owners": len(payload.owner_ids),
            },
        )
        existing = self._existing(request_id, entry.payload_digest)
        if existing is not None:
            return existing
        self.engine.model_row(name)
        if options.selection == "retrain":
            self.engine.require_retrainable(name, "selection retrain")
        self._check_known(payload)
        return self._journal(entry)

    def submit_retrain(self, model: str, request_id: str, actor: str) -> RequestRow:
        """Journal an exact retrain of ``model`` behind the requests already queued."""
        require_effect("retrain", actor)
        check_request_id(request_id)
        payload = RetrainPayload(parse_model_name(model))
        entry = self._entry(
            request_id, "retrain", payload.to_dict(), actor, {"request_id": request_id}
        )
        existing = self._existing(request_id, entry.payload_digest)
        if existing is not None:
            return existing
        self.engine.require_retrainable(payload.model, "RetrainModel")
        return self._journal(entry)

    def _accuracy_collapse(
        self, model: str, request_id: str, parent_version: int, metrics: dict[str, float]
    ) -> AccuracyCollapse | None:
        """None unless the update costs more test accuracy than the settings allow."""
        settings = self.engine.settings
        parent, measured = guarded_accuracy(self.engine.version_row(model, parent_version).metrics)
        after, _ = guarded_accuracy(metrics)
        if parent is None or after is None:
            return None
        drop = 100.0 * (parent - after)
        if drop <= settings.accuracy_collapse_points:
            return None
        policy = settings.on_accuracy_collapse
        retrainable = self.engine.retrainable(model)
        if policy == "retrain" and not retrainable:
            policy = "hold"  # nothing to retrain with: held until rolled back
        retrain_id = f"{request_id}:retrain" if policy == "retrain" else ""
        held = None
        if policy != "serve":
            then = (
                f"the exact retrain operations/{retrain_id} will replace it"
                if retrain_id
                else f"run an exact retrain (expunge retrain {model}) to serve the model again"
                if retrainable
                else "roll back to serve the model again (it was imported without a training "
                "configuration, so it cannot be retrained)"
            )
            held = (
                f"its forget (operations/{request_id}) cost {drop:.1f} points of {measured}, "
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

    def _journal(self, entry: JournalEntry) -> RequestRow:
        try:
            self.engine.store.journal(entry)
        except RequestIdTaken:
            # The same id journalled by a concurrent call since _existing looked: answer
            # as a retry would (or ALREADY_EXISTS for another payload).
            existing = self._existing(entry.request_id, entry.payload_digest)
            if existing is None:
                raise
            return existing
        self.jobs.notify()
        row = self.engine.store.request(entry.request_id)
        assert row is not None
        return row

    def _entry(
        self, request_id: str, kind: str, payload: dict[str, Any], actor: str, audit: dict[str, Any]
    ) -> JournalEntry:
        digest = self.engine.store.identifiers.payload_digest(payload)
        return JournalEntry(
            request_id, payload["model"], kind, digest, {**payload, "actor": actor}, actor, audit
        )

    def _resolve_keys(self, model: str, keys: list[str]) -> list[int]:
        """The sample ids ``keys`` name (held or forgotten); NOT_FOUND lists unknown ones."""
        self.engine.model_row(model)  # NOT_FOUND for an unknown model, before any key
        found = self.engine.store.sample_ids_for_keys(model, sorted(set(keys)))
        unknown = [k for k in keys if k not in found]
        if unknown:
            more = " ..." if len(unknown) > 20 else ""
            raise NotFound(
                f"unknown sample keys {unknown[:20]}{more} in models/{model}; nothing was applied"
            )
        return [found[k] for k in keys]

    def _check_known(self, payload: ForgetPayload) -> None:
        """Unknown ids are NOT_FOUND (listing them) and nothing is applied; forgotten ones are fine."""
        store = self.engine.store
        known = store.known_sample_ids(payload.model, list(payload.sample_ids))
        unknown_samples = [s for s in payload.sample_ids if s not in known]
        unknown_owners = [o for o in payload.owner_ids if not store.owner_known(payload.model, o)]
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
        owners = set(payload.owner_ids)
        # Named samples: the owners' (counted), and the named ids of other owners.
        present = store.present_sample_ids(payload.model, list(payload.sample_ids))
        named = sum(store.owner_sample_count(payload.model, owner) for owner in owners)
        named += sum(
            1 for owner in store.owners_of(payload.model, sorted(present)).values()
            if owner not in owners
        )  # fmt: skip
        remaining = store.sample_count(payload.model)
        if named and named >= remaining:
            raise would_empty(payload.model, remaining)

    def _training_cost(self, model: str) -> TrainingCost:
        """The model's last measured training (time and samples), from its version metrics;
        a fixed default for models trained before it was recorded."""
        return self.engine.training_cost(model)

    # Application (worker thread) -----------------------------------------------------------

    def _apply(self, request: RequestRow, reporter: ProgressReporter) -> None:
        with self.engine.foreground.running():
            self._apply_now(request, reporter)

    def _apply_now(self, request: RequestRow, reporter: ProgressReporter) -> None:
        if request.kind == "retrain":
            started = time.perf_counter()
            version = apply_retrain(self.engine, request, reporter, environment(self.engine.device))
            log.info(
                "retrain committed: models/%s version %d",
                request.model,
                version,
                extra={
                    "event": "retrain_committed",
                    "model": request.model,
                    "operation": f"operations/{request.request_id}",
                    "new_version": version,
                    "seconds": round(time.perf_counter() - started, 3),
                },
            )
            return
        started = time.perf_counter()
        payload = ForgetPayload.from_dict(request.payload)
        engine, store = self.engine, self.engine.store
        row = engine.model_row(payload.model)
        data = engine.training_data(payload.model)
        owners_set = set(payload.owner_ids)
        id_set = set(payload.sample_ids)
        mask = np.isin(data.sample_ids, np.array(sorted(id_set), dtype=np.int64)) | np.isin(
            data.owner_ids, np.array(sorted(owners_set), dtype=str)
        )
        removed_ids = [int(s) for s in data.sample_ids[mask]]
        # Owners named in the request whose samples this forget removes.
        removed_owners = sorted(owners_set & {str(o) for o in data.owner_ids[mask]})
        already = sorted(id_set - set(removed_ids))
        # Every named owner is known (submit checked): those with no rows left were forgotten.
        already_owners = sorted(owners_set - set(removed_owners))
        named = NamedIdentifiers(
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
            store.commit_nothing_to_forget(
                payload.model,
                request.request_id,
                result,
                request.payload.get("actor", "anonymous"),
                {"request_id": request.request_id, "already_forgotten": len(already), "removed": 0},
            )
            _log_committed(request, payload.model, row.current_version, "none", 0, 0, started)
            return

        if mask.all():
            # Earlier forgets left only what this one names (submit checked the rest).
            raise would_empty(payload.model, len(mask))
        resolved = _ResolvedForget(
            request, payload, row, data, mask, engine.snapshot(payload.model),
            removed_ids, removed_owners, named, started,
        )  # fmt: skip
        # The shard without the forgotten rows is written while the update computes.
        with StagedShard(
            store.blobs,
            {
                "features": data.features.numpy(),
                "labels": data.labels.numpy(),
                "sample_ids": data.sample_ids,
            },
            ~mask,
        ) as new_shard:
            self._compute_and_commit(resolved, reporter, new_shard)

    def _compute_and_commit(
        self, resolved: _ResolvedForget, reporter: ProgressReporter, new_shard: StagedShard
    ) -> None:
        """Run the update (in the compute process when there is one) and commit it."""
        engine, store = self.engine, self.engine.store
        request, payload, row, data, mask = (
            resolved.request, resolved.payload, resolved.row, resolved.data, resolved.mask,
        )  # fmt: skip
        snapshot, started, named = resolved.snapshot, resolved.started, resolved.named
        removed_ids, removed_owners = resolved.removed_ids, resolved.removed_owners
        spec = ArchitectureSpec.from_dict(row.spec)
        config = TrainConfig.from_dict(row.train_config)
        model = copy.deepcopy(snapshot.module)
        for p in model.parameters():
            p.requires_grad_(True)
        keep = torch.from_numpy(~mask)
        test = engine.test_data(payload.model)
        # By reference: the files the server verified and maps, and the forgotten rows.
        forget_data = ForgetData(
            str(engine.data_path(data.blob)),
            str(engine.data_path(row.test_blob)),
            np.flatnonzero(mask).astype(np.int64),
        )
        arrays: dict[str, Any] = {
            "test_before": engine.test_measurement(payload.model, snapshot.version)
        }
        settings = engine.settings
        recipe = recipe_for(
            payload.options,
            seed=request_seed(request.payload_sha256, row.current_version),
            default_parameter_budget=settings.forget_parameter_budget,
            hessian_samples=settings.forget_hessian_samples,
            objective_samples=settings.forget_objective_samples,
            ranking_hessian_samples=settings.forget_ranking_hessian_samples,
            ranking_cg_iterations=settings.forget_ranking_cg_iterations,
            newton_iterations=settings.forget_newton_iterations,
            ranking_newton_iterations=settings.forget_ranking_newton_iterations,
            step_coverage=settings.forget_step_coverage,
        )
        training_cost = self._training_cost(payload.model)
        recipe, profile = choose_profile(
            settings.forget_profile,
            settings.forget_auto_target_s,
            model,
            recipe,
            payload.options.newton_iterations,
            payload.options.hessian,
            int(keep.sum()),
            int(keep.sum()) + int(mask.sum()) + len(test.labels),
            training_cost,
            config.epochs,
            settings.forget_policy(),
            engine.retrainable(payload.model),
        )
        arguments: dict[str, Any] = {
            "weight_decay": config.weight_decay,
            "recipe": recipe,
            "ledger": row.ledger,
            "default_budget": settings.forget_budget,
            "train_config": row.train_config,
            "training_cost": training_cost,
            "policy": asdict(settings.forget_policy()),
            "trusted_factories": settings.trusted_factories,
            # A string crosses the process boundary; the child computes there too.
            "device": str(engine.device),
        }
        # The keyed digests (24k HMACs for one large owner) do not depend on the update.
        digesting = ThreadPoolExecutor(1, thread_name_prefix="expunge-receipt-digests")
        digests = digesting.submit(named.receipt_fields)
        digesting.shutdown(wait=False)
        if self.compute is None:
            outcome = unlearn(
                model=model,
                spec=spec,
                reporter=reporter,
                **forget_data.arrays(),
                **arrays,
                **arguments,
            )
        else:
            job = UnlearningJob(
                job=request.request_id,
                spec=row.spec,
                trusted_factories=engine.settings.trusted_factories,
                weights=weights_io.model_to_bytes(model),
                data=forget_data,
                arrays=arrays,
                arguments=arguments,
            )
            outcome, new_weights = self.compute.unlearn(job, reporter)
            weights_io.load_into(model, new_weights)
        outcome.receipt["policy"].update(profile.receipt())
        reporter.check_cancelled()
        reporter.phase("committing")
        with store.write_lock:
            crash_point("forget_before_weights")
            weights = weights_io.model_to_bytes(model)
            weights_blob = store.blobs.put(weights)
            crash_point("forget_after_weights")
            train_blob = new_shard.adopt()
            checkpoints_blob = (
                store.blobs.put(weights_io.checkpoints_to_bytes(outcome.checkpoints))
                if outcome.checkpoints is not None
                else None
            )
            crash_point("forget_after_shard")
            index_artefact = (
                self.index.remove_for_commit(payload.model, removed_ids) if self.index else None
            )
            crash_point("forget_after_index")
            new_version = store.next_version(payload.model)
            receipt = {
                **outcome.receipt,
                "new_version": new_version,
                "parent_version": row.current_version,
                **digests.result(),
                "weights_sha256": weights_blob,
                "environment": environment(engine.device),
                "seconds": time.perf_counter() - started,
            }
            # The after-measurement's figures, on the receipt's retained subset.
            metrics = engine.metrics_of(outcome.receipt["after"], model, config.weight_decay)
            retained = int(keep.sum())
            measured_on = min(recipe.objective_samples or retained, retained)  # as metric_subset
            if measured_on < retained:
                metrics["train_metrics_samples"] = float(measured_on)
            if outcome.checkpoints is not None:  # an exact retrain: its time is the new estimate
                metrics["training_seconds"] = float(outcome.receipt.get("training_seconds", 0.0))
            actor = request.payload.get("actor", "anonymous")
            # The collapse policy guards against approximate updates; an exact retrain is
            # the ground truth it would fall back to (a retrain after it would repeat it).
            collapse = (
                None
                if outcome.checkpoints is not None
                else self._accuracy_collapse(
                    payload.model, request.request_id, row.current_version, metrics
                )
            )
            if collapse is not None:
                receipt["accuracy_collapse"] = collapse.receipt_field()
            retrain = (
                self._entry(
                    collapse.retrain_request_id,
                    "retrain",
                    RetrainPayload(payload.model).to_dict(),
                    actor,
                    {"request_id": collapse.retrain_request_id, "after": request.request_id},
                )
                if collapse is not None and collapse.retrain_request_id
                else None
            )
            crash_point("forget_before_commit")
            store.commit_forget(
                ForgetCommit(
                    version=VersionRow.made_by(
                        request.request_id,
                        payload.model,
                        new_version,
                        row.current_version,
                        weights_blob,
                        metrics,
                        int(keep.sum()),
                        collapse.held_reason if collapse else None,
                    ),
                    train_blob=train_blob,
                    ledger=outcome.ledger,
                    removed_owner_by_sample=dict(
                        zip(
                            data.sample_ids[mask].tolist(),
                            data.owner_ids[mask].tolist(),
                            strict=True,
                        )
                    ),
                    receipt=receipt,
                    actor=actor,
                    audit={
                        "request_id": request.request_id,
                        "removed_samples": len(removed_ids),
                        "owners": len(removed_owners),
                        "new_version": new_version,
                        "parameters_updated": receipt.get("parameters_updated", 0),
                    },
                    index_artefact=index_artefact,
                    checkpoints_blob=checkpoints_blob,
                    then_journal=retrain,
                )
            )
            crash_point("forget_after_commit")
            store.blobs.collect_garbage(store.referenced_blobs())
            store.checkpoint_wal()
        _log_committed(
            request,
            payload.model,
            new_version,
            str(receipt.get("policy", {}).get("path", "")),
            len(removed_ids),
            len(removed_owners),
            started,
        )
        if outcome.test_after is not None:  # the next forget's "before" on the test set
            engine.keep_test_measurement(payload.model, new_version, outcome.test_after)
        # Listeners (the index's re-embed, scan's solver cache) follow from here.
        engine.forget_snapshot_cache(payload.model)


@dataclass(frozen=True)
class _ResolvedForget:
    """A forget request resolved against the served version: what its computation and
    its commit read."""

    request: RequestRow
    payload: ForgetPayload
    row: ModelRow
    data: TrainingData
    mask: np.ndarray  # (n,) bool over the training shard's rows: those forgotten
    snapshot: ModelSnapshot
    removed_ids: list[int]
    removed_owners: list[str]
    named: NamedIdentifiers
    started: float  # perf_counter when the worker took the request


def _log_committed(
    request: RequestRow,
    model: str,
    version: int,
    path: str,
    samples: int,
    owners: int,
    started: float,
) -> None:
    """The lifecycle record of a committed forget: counts only, never an id it removed."""
    log.info(
        "forget committed: models/%s version %d (%s, %d samples)",
        model,
        version,
        path,
        samples,
        extra={
            "event": "forget_committed",
            "model": model,
            "operation": f"operations/{request.request_id}",
            "new_version": version,
            "path": path,
            "removed_samples": samples,
            "removed_owners": owners,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
