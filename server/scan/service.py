"""Scan: is each input the target of a training-set attack? (DESIGN 4.7-4.8)

Per input: renormalized influence of every training sample (GAS by default, from the
gradient index's embeddings when one is ready, else exactly over the checkpoints; the
clean calibration of a version uses the same source, and its cache key says which), the
robust target score (at k = 2 and 10, the rarer among clean inputs kept), and the
training-side evidence (the input's top proponents' median class-outlier z, by default
the larger of a sample's z in the penultimate features and in the input features, or
with ``training_evidence = "direction"`` their robust z apart from their class). Both become
one conformal p-value against the clean calibration inputs (``defenses.attack_sets``).
Inputs whose p-value passes the first filter get a counterfactual confirmation: remove
their top proponents from a scratch copy (no commit) and measure how far the predicted
class's probability falls, and remove an equal-size random set of the same label as a
control, which must not reach the same (calibrated) drop. Where retraining is cheap the
scratch copy is retrained from scratch, with the model's own configuration and seed;
otherwise the removal is the shared-Hessian Newton counterfactual (one damped Hessian per
model version).

Mitigation (and its dry run) works on the whole request: the attack set is the union of
the flagged inputs' top proponents; it is forgotten only when removing it changes at
least half of the flagged inputs' predictions while its random control changes far
fewer (``mitigation.py``); the flagged inputs are then scored again on the new version.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from expunge.defenses.attack_sets import (
    ClassShape,
    ClusterSpace,
    class_outlier_z,
    class_shapes,
    cluster_space,
    combined_p_values,
    conformal_p_values,
    group_direction_z,
    group_outlier_z,
    random_control,
    top_proponents,
)
from expunge.defenses.gradients import predicted_labels
from expunge.defenses.influence import InfluenceConfig, influence_scores
from expunge.defenses.poison_filters import penultimate_features
from expunge.defenses.targets import (
    calibrate_threshold,
    calibrated_surprise,
    influence_z_scores,
    target_score,
)
from expunge.defenses.training import TrainConfig
from expunge.server.device import module_on
from expunge.server.engine import Engine, ModelSnapshot
from expunge.server.errors import FailedPrecondition, invalid_field
from expunge.server.forget.service import ForgetService
from expunge.server.index.service import IndexService
from expunge.server.roles import require_effect
from expunge.server.scan.confirmation import CounterfactualConfirmation, changed
from expunge.server.scan.mitigation import Mitigator, Suspect
from expunge.server.scan.settings import (
    ENSEMBLES,
    ESTIMATORS,
    Calibration,
    ScanOutcome,
    ScanSettings,
)
from expunge.server.state.store import ArtefactRow
from expunge.server.telemetry.metrics import ServerMetrics

CALIBRATION = "scan_calibration"
Cached = TypeVar("Cached")
CHUNK = 32


class TrainingSide(NamedTuple):
    """A version's training samples for the training-side evidence: penultimate
    representations ``(n, d)``, class-outlier z ``(n,)`` and, for the ``direction``
    evidence only, each class's shape (None otherwise: a covariance per class unused)."""

    representations: torch.Tensor
    outlier_z: torch.Tensor
    shapes: dict[int, ClassShape] | None


class ScanService:
    def __init__(
        self,
        engine: Engine,
        forget: ForgetService,
        index: IndexService | None,
        settings: ScanSettings | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.index = index  # GAS scores from its training embeddings when it has them
        self.settings = settings or ScanSettings()
        self.metrics = metrics
        self.confirm = CounterfactualConfirmation(engine, self.settings)
        self.mitigator = Mitigator(
            engine,
            forget,
            self.confirm,
            self.settings.member_z,
            self.settings.proponents_per_target,
            self.settings.shared_proponents,
            self.settings.mitigation_rule,
            self._cluster_spaces if self.settings.cluster_completion else None,
        )
        self._cache_lock = threading.Lock()
        # (model, version, component) -> clean calibration scores of one component score.
        self._clean: dict[tuple[str, int, str], np.ndarray] = {}
        # model -> (version, its training side: representations, class-outlier z, shapes).
        self._outliers: dict[str, tuple[int, TrainingSide]] = {}
        # model -> (version, its training samples in cluster_members' two spaces).
        self._clusters: dict[str, tuple[int, tuple[ClusterSpace, ...]]] = {}

    # Influence -------------------------------------------------------------------------

    def _source(self, model: str, estimator: str) -> str:
        """Where this version's influences come from: the index's embeddings or exact GAS."""
        index = self.index
        if estimator == "gas" and index is not None and index.has_embeddings(model):
            return "index"
        return "exact"

    def _influences(self, model: str, estimator: str, x: torch.Tensor, source: str) -> torch.Tensor:
        """(q, n_train) influences of the current training set on inputs x, from ``source``."""
        snapshot = self.engine.snapshot(model)
        data = self.engine.training_data(model)
        if source == "index":
            embedded = self.index.training_embeddings(model) if self.index else None
            if embedded is None:
                raise changed()  # calibrated on the index, which is gone: scan again
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
        # Computed on the engine's device; the ranking and statistics after it are CPU work.
        return influence_scores(
            snapshot.module,
            checkpoints,
            data.features,
            data.labels,
            x,
            estimator,  # type: ignore[arg-type]
            config,
            device=self.engine.device,
        ).cpu()

    def _weight_decay(self, model: str) -> float:
        return TrainConfig.from_dict(self.engine.model_row(model).train_config).weight_decay

    def _per_version(
        self,
        cache: dict[str, tuple[int, Cached]],
        model: str,
        compute: Callable[[ModelSnapshot], Cached],
    ) -> Cached:
        """``compute(snapshot)`` of the current version, kept in ``cache`` until it moves."""
        snapshot = self.engine.snapshot(model)
        with self._cache_lock:
            cached = cache.get(model)
        if cached is not None and cached[0] == snapshot.version:
            return cached[1]
        value = compute(snapshot)
        with self._cache_lock:
            cache[model] = (snapshot.version, value)
        return value

    def _training_side(self, model: str) -> TrainingSide:
        """The current version's training samples as the training-side evidence sees them,
        computed once per version."""

        def compute(snapshot: ModelSnapshot) -> TrainingSide:
            data = self.engine.training_data(model)
            # One pass over the training set, on the engine's device; the result is on the CPU.
            representations = penultimate_features(
                module_on(snapshot.module, self.engine.device), data.features
            )
            return TrainingSide(
                representations,
                self._class_outlier_z(representations, data.features, data.labels),
                class_shapes(representations, data.labels)
                if self.settings.training_evidence == "direction"
                else None,
            )

        return self._per_version(self._outliers, model, compute)

    def _cluster_spaces(self, model: str) -> tuple[ClusterSpace, ...]:
        """The current version's training samples in the model's representation and in the
        input features (``cluster_members``), computed once per version when a plan needs
        them."""

        def compute(_: ModelSnapshot) -> tuple[ClusterSpace, ...]:
            data = self.engine.training_data(model)
            labels = torch.as_tensor(data.labels)
            return (
                cluster_space(self._training_side(model).representations, labels),
                cluster_space(torch.as_tensor(data.features), labels),
            )

        return self._per_version(self._clusters, model, compute)

    def _class_outlier_z(
        self, representations: torch.Tensor, features: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Each training sample's class-outlier z in ``outlier_space`` (both: the larger)."""
        space = self.settings.outlier_space
        if space == "representation":
            return class_outlier_z(representations, labels)
        in_input = class_outlier_z(features.reshape(len(features), -1).float(), labels)
        if space == "input":
            return in_input
        return torch.maximum(class_outlier_z(representations, labels), in_input)

    def _outlier_z(self, model: str) -> torch.Tensor:
        """Class-outlier z ``(n_train,)`` of the current version's training samples."""
        return self._training_side(model).outlier_z

    def _group_z(
        self, model: str, scored: list[tuple[float, torch.Tensor]], labels: torch.Tensor
    ) -> np.ndarray:
        """The training-side evidence per input (``training_evidence``): its top
        proponents' median class-outlier z, or their robust z apart from their class."""
        train_labels = self.engine.training_data(model).labels
        side = self._training_side(model)
        values = []
        for (_, influences), label in zip(scored, labels.tolist(), strict=True):
            group = top_proponents(influences, train_labels, int(label), self.settings.group_size)
            if self.settings.training_evidence == "direction":
                values.append(
                    group_direction_z(
                        side.representations, train_labels, int(label), group, side.shapes
                    )
                )
            else:
                values.append(group_outlier_z(side.outlier_z, group))
        return np.array(values)

    # Calibration -----------------------------------------------------------------------

    def threshold(self, model: str, estimator: str) -> Calibration:
        """The current version's calibration for ``estimator``, computed once per version,
        influence source, confirmation mode and evidence setting (the artefact's kind).

        The clean calibration inputs' influence scores and training-side evidence are the
        reference every p-value is computed against; the first filter passes inputs with
        a p-value of at most the configured clean pass rate (lenient before a retrained
        removal, strict before a Newton one); the drop threshold is then set so that at
        most ``false_positive_rate`` of the clean calibration inputs would be flagged.
        """
        row = self.engine.model_row(model)
        mode = self.confirm.mode(model)
        source = self._source(model, estimator)
        kind = self._kind(estimator, source, mode)
        stored = self.engine.store.artefact(model, kind)
        # One stored before the clean drops were kept is computed again (once per version).
        if (
            stored is not None
            and stored.version == row.current_version
            and "clean_drops" in stored.meta
        ):
            meta = stored.meta
            return Calibration(
                float(meta["filter_p"]),
                float(meta["drop_threshold"]),
                mode,
                source,
                tuple(meta["clean_scores"]),
                tuple(meta["clean_group_z"]),
                tuple(math.nan if d is None else float(d) for d in meta["clean_drops"]),
            )
        x, scored, reference = self._clean_reference(model, estimator, source, mode)
        scores, group_z = np.array(reference.clean_scores), np.array(reference.clean_group_z)
        if self.settings.training_side:
            _, clean_p = combined_p_values(
                [scores, group_z], [scores, group_z], self.settings.combination
            )
        else:
            clean_p = conformal_p_values(scores, scores)
        # Inputs the filter stops are never flagged: their drop counts as -inf.
        drops = np.full(len(scored), -np.inf)
        for i, (_, influences) in enumerate(scored):
            if clean_p[i] <= reference.filter_p:
                drops[i] = self.confirm.drop(model, x[i], influences, mode)
        settings = self.settings
        drop_threshold = max(
            calibrate_threshold(drops, settings.false_positive_rate),
            settings.retrain_drop_threshold if mode == "retrain" else settings.drop_threshold,
        )
        meta = {
            "confirmation": mode,
            "source": source,
            "filter_p": reference.filter_p,
            "drop_threshold": drop_threshold,
            "false_positive_rate": settings.false_positive_rate,
            "inputs": len(scores),
            "clean_scores": scores.tolist(),
            "clean_group_z": group_z.tolist(),
            "clean_drops": [float(d) if math.isfinite(d) else None for d in drops.tolist()],
        }
        with self.engine.store.write_lock:
            blob = self.engine.store.blobs.put(json.dumps(meta, sort_keys=True).encode())
            self.engine.store.put_artefact(
                ArtefactRow(model, kind, blob, row.current_version, meta)
            )
        return reference._replace(
            drop=drop_threshold,
            clean_drops=tuple(float(d) if math.isfinite(d) else math.nan for d in drops.tolist()),
        )

    def _kind(self, estimator: str, source: str, mode: str) -> str:
        """The calibration artefact's kind: everything its thresholds depend on."""
        settings = self.settings
        ks = "-".join(str(k) for k in settings.ks)
        tag = "dir" if settings.training_evidence == "direction" else "ts"
        # Calibrations stored before the setting existed measured the representation: the
        # key without a suffix keeps naming those, so a stored one is never read for another space.
        if settings.outlier_space != "representation":
            tag += f"-{settings.outlier_space}"
        merge = "" if settings.combination == "fisher" else f"-{settings.combination}"
        evidence = f"{tag}{settings.group_size}{merge}" if settings.training_side else "influence"
        return f"{CALIBRATION}:{estimator}:{source}:{mode}:k{ks}:{evidence}"

    def _filter_p(self, mode: str) -> float:
        settings = self.settings
        if mode == "retrain":
            return settings.retrain_filter_false_positive_rate
        return settings.false_positive_rate

    def _clean_reference(
        self, model: str, estimator: str, source: str, mode: str
    ) -> tuple[torch.Tensor, list[tuple[float, torch.Tensor]], Calibration]:
        """The calibration inputs, their (score, influences), and the clean reference of
        the current version (its drop threshold NaN: no confirmation was run)."""
        x = self._calibration_inputs(model)
        snapshot = self.engine.snapshot(model)
        labels = predicted_labels(snapshot.module, x)
        scored = self._scores(model, estimator, x, labels, source, clean_version=snapshot.version)
        scores = tuple(float(s) for s, _ in scored)
        group_z = tuple(self._group_z(model, scored, labels).tolist())
        reference = Calibration(self._filter_p(mode), math.nan, mode, source, scores, group_z)
        return x, scored, reference

    def _calibration_inputs(self, model: str) -> torch.Tensor:
        test = self.engine.test_data(model)
        return torch.from_numpy(test.features[: self.settings.calibration_inputs])

    def p_values(
        self, calibration: Calibration, scores: np.ndarray, group_z: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(p-value, influence-only p-value) per input against the clean calibration inputs."""
        clean_scores = np.array(calibration.clean_scores)
        influence_p = conformal_p_values(clean_scores, scores)
        if not self.settings.training_side:
            return influence_p, influence_p
        combined, _ = combined_p_values(
            [clean_scores, np.array(calibration.clean_group_z)],
            [scores, group_z],
            self.settings.combination,
        )
        return combined, influence_p

    def _scores(
        self,
        model: str,
        estimator: str,
        x: torch.Tensor,
        labels: torch.Tensor,
        source: str,
        clean_version: int | None = None,
    ) -> list[tuple[float, torch.Tensor]]:
        """(target score, influences ``(n_train,)``) per input.

        Component scores: each estimator's robust target score at each k of
        ``settings.ks`` (the attack set's size is unknown: a few poisons per target in an
        any-source backdoor, dozens in a one-source one). With one component that is the
        score; with several, an input's score is its components' largest calibrated
        surprise and the influences are that component's. With ``clean_version``, ``x``
        are that version's clean calibration inputs: the components' scores are kept as
        the clean reference (so they are not computed a second time).
        """
        parts: dict[str, list[tuple[float, torch.Tensor]]] = {}
        for component in ENSEMBLES.get(estimator, (estimator,)):
            parts.update(self._component_scores(model, component, x, labels, source))
        if len(parts) == 1:
            return next(iter(parts.values()))
        if clean_version is not None:
            for name, part in parts.items():
                self._remember_clean(
                    model, clean_version, name, source, np.array([s for s, _ in part])
                )
        return self._combine(model, parts, source)

    def _combine(
        self, model: str, parts: dict[str, list[tuple[float, torch.Tensor]]], source: str
    ) -> list[tuple[float, torch.Tensor]]:
        """Per input, the component whose score is rarer among the clean calibration inputs."""
        names = list(parts)
        surprise = np.stack(
            [
                calibrated_surprise(
                    self._clean_scores(model, name, source), [s for s, _ in parts[name]]
                )
                for name in names
            ]
        )
        best = surprise.argmax(axis=0)
        return [(float(surprise[b, i]), parts[names[b]][i][1]) for i, b in enumerate(best.tolist())]

    def _clean_scores(self, model: str, component: str, source: str) -> np.ndarray:
        """Scores of one component on the clean calibration inputs (cached per version)."""
        version = self.engine.snapshot(model).version
        key = (model, version, f"{component}:{source}")
        with self._cache_lock:
            cached = self._clean.get(key)
        if cached is not None:
            return cached
        x = self._calibration_inputs(model)
        labels = predicted_labels(self.engine.snapshot(model).module, x)
        estimator = component.split("@", 1)[0]
        scores = {
            name: np.array([s for s, _ in part])
            for name, part in self._component_scores(model, estimator, x, labels, source).items()
        }
        for name, values in scores.items():
            self._remember_clean(model, version, name, source, values)
        return scores[component]

    def _remember_clean(
        self, model: str, version: int, component: str, source: str, scores: np.ndarray
    ) -> None:
        with self._cache_lock:
            # Keep other models' scores; drop this model's older versions.
            self._clean = {k: v for k, v in self._clean.items() if k[0] != model or k[1] == version}
            self._clean[(model, version, f"{component}:{source}")] = scores

    def _component_scores(
        self, model: str, estimator: str, x: torch.Tensor, labels: torch.Tensor, source: str
    ) -> dict[str, list[tuple[float, torch.Tensor]]]:
        """``"<estimator>@k<k>"`` -> (score, influences) per input, for each k of the settings."""
        data = self.engine.training_data(model)
        component_source = source if estimator == "gas" else "exact"
        influences = self._influences(model, estimator, x, component_source)
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
        if not self.engine.has_test_set(model):
            raise FailedPrecondition(
                f"models/{model} was imported without a held-out set ([data] test), and Scan "
                "calibrates its p-values on held-out inputs the model never trained on; "
                "import it again with one"
            )
        return estimator

    def scan(
        self,
        model: str,
        inputs: np.ndarray,
        estimator: str,
        max_implicated: int,
        mitigate: bool,
        request_id: str,
        actor: str,
        dry_run: bool = False,
    ) -> Iterator[ScanOutcome]:
        """One outcome per input, in order (after the mitigation, if any, was resolved)."""
        estimator = self.validate(model, inputs, estimator or "gas")
        if mitigate and dry_run:
            raise invalid_field(
                "dry_run",
                "dry_run returns the mitigation plan without applying it; unset mitigate",
            )
        if mitigate:
            # Refused before any scoring; the forget's submission checks the same rule.
            require_effect("forget", actor)
        if mitigate and not request_id:
            raise invalid_field(
                "request_id", "required with mitigate: it makes the forget idempotent"
            )
        if not 0 <= max_implicated <= 10_000:
            raise invalid_field(
                "max_implicated",
                f"must lie in [0, 10000] (0: default {self.settings.proponents_per_target})",
            )
        limit = max_implicated or self.settings.proponents_per_target
        self.engine.store.record_audit(
            actor,
            "scan",
            f"models/{model}",
            {
                "inputs": len(inputs),
                "estimator": estimator,
                "mitigate": mitigate,
                "dry_run": dry_run,
            },
        )
        calibration = self.threshold(model, estimator)
        version = self.engine.snapshot(model).version
        planning = mitigate or dry_run
        outcomes: list[ScanOutcome] = []
        suspects: list[Suspect] = []
        for start in range(0, len(inputs), CHUNK):
            x = torch.from_numpy(inputs[start : start + CHUNK])
            for outcome, suspect in self._decide(
                model, estimator, calibration, version, x, start, limit
            ):
                if suspect is not None and planning:
                    suspects.append(suspect)
                if planning:
                    outcomes.append(outcome)
                else:
                    yield outcome
        if planning:
            yield from self.mitigator.resolve(
                model, outcomes, suspects, calibration, request_id, actor, dry_run,
                rescore=lambda xs: self._rescore(model, estimator, xs),
                outliers=self._outlier_z(model),
                analogues=lambda k: self._clean_analogues(model, estimator, calibration, k),
            )  # fmt: skip

    def _decide(
        self,
        model: str,
        estimator: str,
        calibration: Calibration,
        version: int,
        x: torch.Tensor,
        start: int,
        limit: int,
    ) -> Iterator[tuple[ScanOutcome, Suspect | None]]:
        """Score, filter and confirm one chunk; each outcome with its suspect when flagged."""
        snapshot = self.engine.snapshot(model)
        if snapshot.version != version:
            raise changed()
        data = self.engine.training_data(model)
        labels = predicted_labels(snapshot.module, x)
        scored = self._scores(model, estimator, x, labels, calibration.source)
        if any(len(influences) != len(data.labels) for _, influences in scored):
            raise changed()
        scores = np.array([s for s, _ in scored])
        group_z = self._group_z(model, scored, labels)
        p, influence_p = self.p_values(calibration, scores, group_z)
        outliers = self._outlier_z(model)
        mode, required = calibration.confirmation, calibration.drop
        note = self._influence_note(model)
        for offset, (score, influences) in enumerate(scored):
            index = start + offset
            label = int(labels[offset])
            passed = bool(p[offset] <= calibration.filter_p)
            drop = control = 0.0
            flagged = False
            implicated: list[dict[str, object]] = []
            suspect = None
            if passed:
                removed = top_proponents(
                    influences, data.labels, label, self.settings.proponents_removed
                )
                drop = self.confirm.drop_without(model, x[offset], label, removed, mode)
                if drop >= required:
                    seed = version * 1_000_003 + index
                    control_set = random_control(data.labels, removed, seed)
                    control = self.confirm.drop_without(model, x[offset], label, control_set, mode)
                    flagged = control < required
                z = influence_z_scores(influences.double(), data.labels, label)
                named = top_proponents(influences, data.labels, label, limit)
                implicated = [
                    {
                        "sample_id": int(data.sample_ids[i]),
                        "sample_key": data.key_of(i),
                        "owner_id": str(data.owner_ids[i]),
                        "label": int(data.labels[i]),
                        "influence": float(influences[i]),
                        "z": float(z[i]),
                        "class_outlier_z": float(outliers[i]),
                        "reason": f"top-{rank} proponent of input {index} "
                        f"(influence z {float(z[i]):.2f}); class-outlier z {float(outliers[i]):.2f}",
                    }
                    for rank, i in enumerate(named.tolist(), start=1)
                ]
                if flagged and p[offset] <= self.settings.attack_set_p:
                    suspect = Suspect(
                        index,
                        x[offset],
                        label,
                        top_proponents(
                            influences, data.labels, label, self.settings.proponents_per_target
                        ),
                        z,
                    )
            outcome = ScanOutcome(
                index=index,
                predicted_label=label,
                target_score=float(score),
                threshold=calibration.filter_p,
                flagged=flagged,
                counterfactual_drop=drop,
                implicated=implicated,
                model_version=snapshot.version,
                p_value=float(p[offset]),
                influence_p_value=float(influence_p[offset]),
                group_outlier_z=float(group_z[offset]),
                control_drop=control,
                drop_threshold=required,
                decision=_decision(
                    float(p[offset]), calibration, passed, drop, control, flagged, label,
                    self.settings.proponents_removed, self.settings.attack_set_p,
                ) + note,
            )  # fmt: skip
            yield outcome, suspect

    def _influence_note(self, model: str) -> str:
        """What a result says when the influence had no training trajectory to read."""
        if self.engine.model_row(model).train_config.get("checkpoints_imported", -1) != 0:
            return ""
        return (
            " (influence from the final weights only: the model was imported without "
            "training checkpoints)"
        )

    def _clean_analogues(
        self, model: str, estimator: str, calibration: Calibration, count: int
    ) -> list[Suspect]:
        """The ``count`` clean calibration inputs whose removal of their own top proponents
        moved them most (the calibration's drops), as suspects: what the attack-set rule
        names for clean inputs that look confirmed, the mitigation's matched control.
        Their indices are negative (-1 - calibration row): they are not scanned inputs."""
        drops = np.array(calibration.clean_drops, dtype=float)
        rows = [int(i) for i in np.argsort(-np.nan_to_num(drops, nan=-np.inf), kind="stable")]
        rows = [i for i in rows if math.isfinite(drops[i])][:count]
        if not rows:
            return []
        data = self.engine.training_data(model)
        x = self._calibration_inputs(model)[rows]
        labels = predicted_labels(self.engine.snapshot(model).module, x)
        scored = self._scores(model, estimator, x, labels, calibration.source)
        analogues = []
        for i, (row, (_, influences)) in enumerate(zip(rows, scored, strict=True)):
            label = int(labels[i])
            if len(influences) != len(data.labels):
                raise changed()
            analogues.append(
                Suspect(
                    -1 - row,
                    x[i],
                    label,
                    top_proponents(
                        influences, data.labels, label, self.settings.proponents_per_target
                    ),
                    influence_z_scores(influences.double(), data.labels, label),
                )
            )
        return analogues

    def _rescore(
        self, model: str, estimator: str, x: torch.Tensor
    ) -> list[tuple[int, float, float]]:
        """(predicted label, target score, p-value) of inputs on the current version: the
        rescan after a mitigation (no confirmation: the clean reference alone)."""
        calibration = self.reference(model, estimator)
        labels = predicted_labels(self.engine.snapshot(model).module, x)
        scored = self._scores(model, estimator, x, labels, calibration.source)
        scores = np.array([s for s, _ in scored])
        p, _ = self.p_values(calibration, scores, self._group_z(model, scored, labels))
        return [
            (int(label), float(score), float(pv))
            for label, score, pv in zip(labels.tolist(), scores.tolist(), p.tolist(), strict=True)
        ]

    def reference(self, model: str, estimator: str) -> Calibration:
        """The clean reference of the current version (scores and evidence of the
        calibration inputs) without the drop threshold's confirmations (NaN there)."""
        source = self._source(model, estimator)
        return self._clean_reference(model, estimator, source, self.confirm.mode(model))[2]

    # Estimating ---------------------------------------------------------------------------

    def estimate(
        self,
        model: str,
        inputs: np.ndarray,
        estimator: str,
        mitigate: bool = False,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """What a Scan of ``inputs`` will cost, from timed probes on this version: scoring,
        the version's calibration when it is not stored yet, the confirmations the clean
        pass rate predicts (their controls at the false-positive rate), the attack set's
        removals (mitigate or dry run), and the forget and the rescan (mitigate)."""
        estimator = self.validate(model, inputs, estimator or "gas")
        data = self.engine.training_data(model)
        snapshot = self.engine.snapshot(model)
        params = sum(p.numel() for p in snapshot.module.parameters())
        mode = self.confirm.mode(model)
        source = self._source(model, estimator)
        probe = torch.from_numpy(inputs[:1])
        labels = predicted_labels(snapshot.module, probe)
        # Each probe runs until it is in steady state: the first pass pays what is built
        # once per process or version and kept (torch.func's imports, the class-outlier z,
        # the Newton solver's shared Hessian), so the scan that follows does not pay it.
        for _ in range(2):
            started = time.perf_counter()
            scored = self._scores(model, estimator, probe, labels, source)
            self._group_z(model, scored, labels)
            chunk_s = time.perf_counter() - started
        confirm_s = self._confirmation_seconds(model, probe[0], scored[0][1], mode)
        settings = self.settings
        filter_p = self._filter_p(mode)
        calibrated = self._calibrated(model, estimator, mode, source)
        calibration_inputs = min(
            settings.calibration_inputs, len(self.engine.test_data(model).labels)
        )
        reference_s = math.ceil(calibration_inputs / CHUNK) * chunk_s
        calibration_s = 0.0
        if not calibrated:
            calibration_s = reference_s + filter_p * calibration_inputs * confirm_s
        expected = filter_p * len(inputs) * (1 + settings.false_positive_rate)
        confirmation_s = expected * confirm_s
        mitigation_s = 0.0
        if mitigate or dry_run:  # the attack set's removal, its random and matched controls
            # (and the widened set's removal and control, with cluster completion)
            mitigation_s = (5 if settings.cluster_completion else 3) * confirm_s
        if mitigate:  # the forget, then the rescan against the new version's reference
            metrics = self.engine.version_row(model, 0).metrics
            forget_s = max(float(metrics.get("training_seconds", 0.0)), confirm_s)
            mitigation_s += forget_s + reference_s + chunk_s
        scoring_s = math.ceil(len(inputs) / CHUNK) * chunk_s
        return {
            "inputs": len(inputs),
            "training_samples": len(data.labels),
            "checkpoints": len(self.engine.checkpoints(model)),
            "estimated_seconds": scoring_s + calibration_s + confirmation_s + mitigation_s,
            "estimated_bytes": 4 * (len(data.labels) * CHUNK + 256 * params),
            "estimated_scoring_seconds": scoring_s,
            "estimated_calibration_seconds": calibration_s,
            "estimated_confirmation_seconds": confirmation_s,
            "estimated_mitigation_seconds": mitigation_s,
            "calibrated": calibrated,
        }

    def _confirmation_seconds(
        self, model: str, x: torch.Tensor, influences: torch.Tensor, mode: str
    ) -> float:
        """One confirmation's time, from timed removals of the probe's proponents: a
        retrained one costs the same every time; the first Newton one also builds the
        version's shared Hessian (kept for the scan), so the second is timed."""
        for _ in range(1 if mode == "retrain" else 2):
            started = time.perf_counter()
            self.confirm.drop(model, x, influences, mode)
            elapsed = time.perf_counter() - started
        return elapsed

    def _calibrated(self, model: str, estimator: str, mode: str, source: str) -> bool:
        stored = self.engine.store.artefact(model, self._kind(estimator, source, mode))
        return stored is not None and stored.version == self.engine.model_row(model).current_version


def _decision(
    p: float,
    calibration: Calibration,
    passed: bool,
    drop: float,
    control: float,
    flagged: bool,
    label: int,
    removed: int,
    attack_set_p: float,
) -> str:
    """Every cut that decided the input, with its value, in one sentence."""
    first = (
        f"p-value {p:.3g} {'<=' if passed else '>'} the filter's {calibration.filter_p:g} "
        f"(clean calibration inputs, {calibration.source} influence)"
    )
    if not passed:
        return f"{first}: not suspected"
    how = "retrained" if calibration.confirmation == "retrain" else "Newton"
    second = (
        f"removing its top {removed} proponents ({how}) lowered P(label {label}) by {drop:.3f} "
        f"{'>=' if drop >= calibration.drop else '<'} the calibrated {calibration.drop:.3f}"
    )
    if drop < calibration.drop:
        return f"{first}; {second}: not confirmed"
    third = (
        f"removing {removed} random label-{label} samples lowered it by {control:.3f} "
        f"{'<' if control < calibration.drop else '>='} {calibration.drop:.3f}"
    )
    if not flagged:
        return f"{first}; {second}; {third}: control also moved it: not flagged"
    if p > attack_set_p:
        return (
            f"{first}; {second}; {third}: flagged (its p-value is above the attack set's "
            f"{attack_set_p:g}: it names no sample for mitigation)"
        )
    return f"{first}; {second}; {third}: flagged"
