"""Scan: is each input the target of a training-set attack? (DESIGN 4.7-4.8)

Per input: renormalized influence of every training sample (GAS by default, from the
gradient index's embeddings when one is ready, else exactly over the checkpoints), the
robust target score (at k = 2 and 10, each calibrated on clean held-out inputs, the rarer
kept) against a threshold calibrated on the same inputs, and, for
inputs that pass that first filter, a counterfactual confirmation: remove the input's
top proponents from a scratch copy (no commit) and measure how far the predicted
class's probability falls. Where retraining is cheap (a small model and data set) the
scratch copy is retrained from scratch without them, with the model's own training
configuration and seed: on the benchmark's attacks that separated targets far better
than the Newton approximation (BENCHMARKS.md), so the first filter can then be lenient.
Otherwise the removal is the shared-Hessian Newton counterfactual (one damped Hessian
per model version).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator

import numpy as np
import torch

from expunge.defenses.gradients import predicted_labels
from expunge.defenses.influence import InfluenceConfig, influence_scores
from expunge.defenses.targets import (
    calibrate_threshold,
    calibrated_surprise,
    implicated_samples,
    target_score,
)
from expunge.defenses.training import TrainConfig
from expunge.server.engine import Engine
from expunge.server.errors import FailedPrecondition, invalid_field
from expunge.server.forget.computation import UnlearningOptions
from expunge.server.forget.service import ForgetService
from expunge.server.index.service import IndexService
from expunge.server.roles import require_effect
from expunge.server.scan.confirmation import CounterfactualConfirmation, changed
from expunge.server.scan.settings import (
    ENSEMBLES,
    ESTIMATORS,
    Calibration,
    ScanOutcome,
    ScanSettings,
)
from expunge.server.state.store import ArtefactRow

CALIBRATION = "scan_calibration"
CHUNK = 32
# How long a Scan waits for the forget its mitigation submitted.
MITIGATION_TIMEOUT_S = 600.0


class ScanService:
    def __init__(
        self,
        engine: Engine,
        forget: ForgetService,
        index: IndexService | None,
        settings: ScanSettings | None = None,
    ) -> None:
        self.engine = engine
        self.forget = forget  # mitigation submits through it and awaits the outcome
        self.index = index  # GAS scores from its training embeddings when it has them
        self.settings = settings or ScanSettings()
        self.confirm = CounterfactualConfirmation(engine, self.settings)
        self._cache_lock = threading.Lock()
        # (model, version, component) -> clean calibration scores of one component score.
        self._clean: dict[tuple[str, int, str], np.ndarray] = {}

    # Influence -------------------------------------------------------------------------

    def _influences(self, model: str, estimator: str, x: torch.Tensor) -> torch.Tensor:
        """(q, n_train) influences of the current training set on inputs x."""
        snapshot = self.engine.snapshot(model)
        data = self.engine.training_data(model)
        index = self.index
        if estimator == "gas" and index is not None:
            embedded = index.training_embeddings(model)
            if embedded is not None:
                embedder, vectors, ids = embedded
                labels = predicted_labels(snapshot.module, x)
                queries = embedder.embed(x, labels)
                by_id = dict(zip(ids.tolist(), range(len(ids)), strict=True))
                missing = [int(s) for s in data.sample_ids if int(s) not in by_id]
                if missing:
                    raise changed()
                rows = torch.tensor([by_id[int(s)] for s in data.sample_ids])
                return queries @ vectors[rows].T
        checkpoints = self.engine.checkpoints(model)
        config = InfluenceConfig(weight_decay=self._weight_decay(model))
        return influence_scores(
            snapshot.module,
            checkpoints,
            data.features,
            data.labels,
            x,
            estimator,  # type: ignore[arg-type]
            config,
        )  # type: ignore[arg-type]

    def _weight_decay(self, model: str) -> float:
        return TrainConfig.from_dict(self.engine.model_row(model).train_config).weight_decay

    # Calibration -----------------------------------------------------------------------

    def threshold(self, model: str, estimator: str) -> Calibration:
        """Thresholds of the current version, calibrated once per version and estimator.

        The score filter at the configured clean pass rate (lenient before a retrained
        removal, strict before a Newton one), then the drop threshold so that at most
        ``false_positive_rate`` of the clean calibration inputs are flagged in all.
        """
        row = self.engine.model_row(model)
        mode = self.confirm.mode(model)
        ks = "-".join(str(k) for k in self.settings.ks)
        kind = f"{CALIBRATION}:{estimator}:{mode}:k{ks}"
        stored = self.engine.store.artefact(model, kind)
        if stored is not None and stored.version == row.current_version:
            meta = stored.meta
            return Calibration(float(meta["score_threshold"]), float(meta["drop_threshold"]), mode)
        test = self.engine.test_data(model)
        x = torch.from_numpy(test.features[: self.settings.calibration_inputs])
        snapshot = self.engine.snapshot(model)
        labels = predicted_labels(snapshot.module, x)
        scored = self._scores(model, estimator, x, labels, clean_version=snapshot.version)
        scores = np.array([s for s, _ in scored])
        filter_rate = (
            self.settings.retrain_filter_false_positive_rate
            if mode == "retrain"
            else self.settings.false_positive_rate
        )
        score_threshold = calibrate_threshold(scores, filter_rate)
        # Inputs the filter stops are never flagged: their drop counts as -inf.
        drops = np.full(len(scored), -np.inf)
        for i, (score, influences) in enumerate(scored):
            if score >= score_threshold:
                drops[i] = self.confirm.drop(model, x[i], influences, mode)
        drop_threshold = max(
            calibrate_threshold(drops, self.settings.false_positive_rate),
            self.settings.retrain_drop_threshold
            if mode == "retrain"
            else self.settings.drop_threshold,
        )
        meta = {
            "confirmation": mode,
            "score_threshold": score_threshold,
            "filter_false_positive_rate": filter_rate,
            "drop_threshold": drop_threshold,
            "false_positive_rate": self.settings.false_positive_rate,
            "inputs": len(scores),
        }
        with self.engine.store.write_lock:
            blob = self.engine.store.blobs.put(json.dumps(meta, sort_keys=True).encode())
            self.engine.store.put_artefact(
                ArtefactRow(model, kind, blob, row.current_version, meta)
            )
        return Calibration(score_threshold, drop_threshold, mode)

    def _scores(
        self,
        model: str,
        estimator: str,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        clean_version: int | None = None,
    ) -> list[tuple[float, torch.Tensor]]:
        """(target score, influences ``(n_train,)``) per input; ``labels`` = predictions if known.

        Component scores: each estimator's robust target score at each k of
        ``settings.ks`` (the attack set's size is unknown: a few poisons per target in an
        any-source backdoor, dozens in a one-source one). With one component that is the
        score; with several, an input's score is its components' largest calibrated
        surprise and the influences are that component's. With ``clean_version``, ``x``
        are that version's clean calibration inputs: the components' scores are kept as
        the clean reference (so they are not computed a second time).
        """
        if labels is None:
            labels = predicted_labels(self.engine.snapshot(model).module, x)
        parts: dict[str, list[tuple[float, torch.Tensor]]] = {}
        for component in ENSEMBLES.get(estimator, (estimator,)):
            parts.update(self._component_scores(model, component, x, labels))
        if len(parts) == 1:
            return next(iter(parts.values()))
        if clean_version is not None:
            for name, part in parts.items():
                self._remember_clean(model, clean_version, name, np.array([s for s, _ in part]))
        return self._combine(model, parts)

    def _combine(
        self, model: str, parts: dict[str, list[tuple[float, torch.Tensor]]]
    ) -> list[tuple[float, torch.Tensor]]:
        """Per input, the component whose score is rarer among the clean calibration inputs."""
        names = list(parts)
        surprise = np.stack(
            [
                calibrated_surprise(self._clean_scores(model, name), [s for s, _ in parts[name]])
                for name in names
            ]
        )
        best = surprise.argmax(axis=0)
        return [(float(surprise[b, i]), parts[names[b]][i][1]) for i, b in enumerate(best.tolist())]

    def _clean_scores(self, model: str, component: str) -> np.ndarray:
        """Scores of one component on the clean calibration inputs (cached per version)."""
        version = self.engine.snapshot(model).version
        with self._cache_lock:
            cached = self._clean.get((model, version, component))
        if cached is not None:
            return cached
        test = self.engine.test_data(model)
        x = torch.from_numpy(test.features[: self.settings.calibration_inputs])
        labels = predicted_labels(self.engine.snapshot(model).module, x)
        estimator = component.split("@", 1)[0]
        scores = {
            name: np.array([s for s, _ in part])
            for name, part in self._component_scores(model, estimator, x, labels).items()
        }
        for name, values in scores.items():
            self._remember_clean(model, version, name, values)
        return scores[component]

    def _remember_clean(self, model: str, version: int, component: str, scores: np.ndarray) -> None:
        with self._cache_lock:
            # Keep other models' scores; drop this model's older versions.
            self._clean = {k: v for k, v in self._clean.items() if k[0] != model or k[1] == version}
            self._clean[(model, version, component)] = scores

    def _component_scores(
        self, model: str, estimator: str, x: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, list[tuple[float, torch.Tensor]]]:
        """``"<estimator>@k<k>"`` -> (score, influences) per input, for each k of the settings."""
        data = self.engine.training_data(model)
        influences = self._influences(model, estimator, x)
        if influences.shape[1] != len(data.labels):
            raise changed()
        out: dict[str, list[tuple[float, torch.Tensor]]] = {}
        for k in self.settings.ks:
            rows = []
            for i in range(len(x)):
                score = target_score(influences[i].double(), data.labels, int(labels[i]), k=k)
                rows.append((score.score if math.isfinite(score.score) else 0.0, influences[i]))
            out[f"{estimator}@k{k}"] = rows
        return out

    # Counterfactual ---------------------------------------------------------------------

    # Scanning ---------------------------------------------------------------------------

    def validate(self, model: str, inputs: np.ndarray, estimator: str) -> str:
        if estimator not in ESTIMATORS:
            raise invalid_field("estimator", f"{estimator!r} is not one of {ESTIMATORS}")
        snapshot = self.engine.snapshot(model)
        self.engine.refuse_unservable(snapshot.name, snapshot.version, held_only=True)
        self.engine.check_inputs(snapshot.spec, inputs)
        self.engine.forward_checked(snapshot.module, torch.from_numpy(inputs))
        if not self.engine.checkpoints(model):
            raise FailedPrecondition(
                f"models/{model} has no training checkpoints; train it with `expunge train` so "
                "the trajectory (checkpoints and learning rates) is saved"
            )
        return estimator

    def estimate(self, model: str, inputs: np.ndarray, estimator: str) -> dict[str, float]:
        estimator = self.validate(model, inputs, estimator)
        data = self.engine.training_data(model)
        checkpoints = len(self.engine.checkpoints(model))
        params = sum(p.numel() for p in self.engine.snapshot(model).module.parameters())
        probe = torch.from_numpy(inputs[:1])
        started = time.perf_counter()
        for component in ENSEMBLES.get(estimator, (estimator,)):
            self._influences(model, component, probe)
        one = time.perf_counter() - started
        chunks = math.ceil(len(inputs) / CHUNK)
        return {
            "inputs": len(inputs),
            "training_samples": len(data.labels),
            "checkpoints": checkpoints,
            "estimated_seconds": one * chunks * 1.2,
            "estimated_bytes": 4 * (len(data.labels) * CHUNK + 256 * params),
        }

    def scan(
        self,
        model: str,
        inputs: np.ndarray,
        estimator: str,
        max_implicated: int,
        mitigate: bool,
        request_id: str,
        actor: str,
    ) -> Iterator[ScanOutcome]:
        estimator = self.validate(model, inputs, estimator or "gas")
        if mitigate:
            # Refused before any scoring; the forget's submission checks the same rule.
            require_effect("forget", actor)
        if mitigate and not request_id:
            raise invalid_field(
                "request_id", "required with mitigate: it makes the forget idempotent"
            )
        if not 0 <= max_implicated <= 10_000:
            raise invalid_field("max_implicated", "must lie in [0, 10000] (0: default 30)")
        limit = max_implicated or 30
        self.engine.store.record_audit(
            actor, "scan", f"models/{model}", {"inputs": len(inputs), "estimator": estimator}
        )
        start = 0
        while start < len(inputs):
            # Thresholds, data and influences of one version; after a mitigation (a new
            # version) the rest is scored again against the new one.
            calibration = self.threshold(model, estimator)
            mode, threshold, required_drop = (
                calibration.confirmation,
                calibration.score,
                calibration.drop,
            )
            x = torch.from_numpy(inputs[start : start + CHUNK])
            snapshot = self.engine.snapshot(model)
            data = self.engine.training_data(model)
            labels = predicted_labels(snapshot.module, x)
            scored = self._scores(model, estimator, x, labels)
            if any(len(influences) != len(data.labels) for _, influences in scored):
                raise changed()
            done = len(x)
            for offset, (score, influences) in enumerate(scored):
                label = int(labels[offset])
                drop = 0.0
                flagged = False
                if score >= threshold:
                    drop = self.confirm.drop(model, x[offset], influences, mode)
                    flagged = drop >= required_drop
                chosen = implicated_samples(
                    influences.double(),
                    data.labels,
                    label,
                    self.settings.implicated_cutoff,
                    limit=limit,
                )
                implicated = [
                    {
                        "sample_id": int(data.sample_ids[i]),
                        "owner_id": str(data.owner_ids[i]),
                        "label": int(data.labels[i]),
                        "influence": float(v),
                        "z": float(z),
                    }
                    for i, z, v in zip(
                        chosen.indices.tolist(),
                        chosen.z.tolist(),
                        chosen.influence.tolist(),
                        strict=True,
                    )
                ]
                outcome = ScanOutcome(
                    start + offset,
                    label,
                    score,
                    threshold,
                    flagged,
                    drop,
                    implicated,
                    snapshot.version,
                )
                if mitigate and flagged and implicated:
                    yield self._mitigate(
                        model, outcome, x[offset], f"{request_id}:{start + offset}", actor
                    )
                    done = offset + 1
                    break
                yield outcome
            start += done

    def _mitigate(
        self, model: str, outcome: ScanOutcome, x: torch.Tensor, request_id: str, actor: str
    ) -> ScanOutcome:
        before = self.engine.model_info(model).version.metrics.get("test_accuracy", float("nan"))
        ids = [int(s["sample_id"]) for s in outcome.implicated]  # type: ignore[call-overload]
        self.forget.submit(model, ids, [], request_id, UnlearningOptions(), actor)
        row = self.forget.wait_done(request_id, timeout=MITIGATION_TIMEOUT_S)
        if row is None or row.state != "SUCCEEDED":
            raise FailedPrecondition(
                f"mitigation forget {request_id} ended {row.state if row else 'missing'}"
            )
        info = self.engine.model_info(model)
        with torch.no_grad():
            after_label = int(self.engine.snapshot(model).module(x.unsqueeze(0)).argmax(dim=1))
        mitigation = {
            "operation": f"operations/{request_id}",
            "new_version": info.row.current_version,
            "predicted_label_after": after_label,
            "prediction_changed": after_label != outcome.predicted_label,
            "test_accuracy_before": before,
            "test_accuracy_after": info.version.metrics.get("test_accuracy", float("nan")),
        }
        return ScanOutcome(**{**outcome.__dict__, "mitigation": mitigation})
