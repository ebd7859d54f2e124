"""Mitigation of a scan: name the attack set, confirm it against a control, forget it, rescan.

The attack set is the union of the flagged inputs' top proponents that stand out on the
test side (influence z) or the training side (class-outlier z), and, with the
``shared_proponents`` option, of the samples the flagged inputs of one class lean on
together (their Stouffer-combined influence z past a class-wide Bonferroni cut: a
backdoor's poisons beyond any one input's top 10) (``attack_sets``). With cluster
completion (the default) it then takes the samples of its classes that sit with its
members along their direction in both the representation and the input features
(``cluster_members``): the poisons no flagged input ranked in its top 10. The widening
never decides: it is tried only on a confirmed set and kept only when its own removal
changes at least as many flagged inputs and passes its own random control. Its removal (a
retrain or Newton removal on a scratch copy, as the per-input confirmation) is measured
against two controls: an equal-size random set with the same labels, and the matched
control, the set the same rule names for the clean calibration inputs that look most
confirmed (their own proponents' removal moved them most), removed and measured on them.
It is forgotten when it changes at least two flagged inputs (their prediction flips, or
the predicted class's probability falls by the calibrated drop), the random control
changes fewer than a quarter as many, and, by the rule in force, it changes at least half
of the flagged inputs (``majority``) or more than twice the share of clean analogues the
matched set changes (``matched``). A dry run returns the plan and forgets nothing. After
the forget, the flagged inputs are scored again on the new version against its own clean
reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from expunge.defenses.attack_sets import (
    AttackSetMember,
    ClusterSpace,
    attack_set,
    cluster_members,
    random_control,
    shared_proponents,
    with_cluster,
)
from expunge.server.engine import Engine
from expunge.server.errors import FailedPrecondition
from expunge.server.forget.computation import UnlearningOptions
from expunge.server.forget.service import ForgetService
from expunge.server.scan.confirmation import CounterfactualConfirmation
from expunge.server.scan.settings import Calibration, ScanOutcome

# Flagged inputs whose predictions removing the set must change before anything is
# forgotten. One is not enough: a clean input whose prediction rests on a few similar
# training samples passes every single-input test (a held-out tabular scan flagged one and
# forgot nine clean samples), while an attack's targets corroborate one another.
MIN_CORROBORATION = 2
# How long a Scan waits for the forget its mitigation submitted.
MITIGATION_TIMEOUT_S = 600.0
CONTROL_SEED = 7_919


@dataclass(frozen=True)
class Suspect:
    """A flagged input: what the attack-set step needs of it."""

    index: int
    x: torch.Tensor  # (*shape)
    label: int  # predicted
    proponents: torch.Tensor  # (k,) training rows, strongest first
    influence_z: torch.Tensor  # (n_train,)


@dataclass(frozen=True)
class Completion:
    """A confirmed set widened by ``cluster_members``, and its own confirmation."""

    joined: dict[int, float]  # training row -> its z when it joined (cluster_members)
    affected: int  # flagged inputs the widened set's removal changes
    control_affected: int  # ... that its equal-size random control's removal changes
    kept: bool  # it changes at least as many as the confirmed set, and passes the control

    @property
    def added(self) -> int:
        return len(self.joined)

    def sentence(self) -> str:
        verdict = "forgetting the widened set" if self.kept else "keeping the confirmed set"
        return (
            f"; {self.added} more samples sit with its members in their class (representation "
            f"and input features): removing the widened set changes {self.affected} flagged "
            f"inputs, its random control {self.control_affected}: {verdict}"
        )


@dataclass(frozen=True)
class MitigationPlan:
    members: list[AttackSetMember]
    targets: int
    affected: int  # flagged inputs its removal changes
    control_affected: int  # ... that the random control's removal changes
    confirmed: bool
    size: int  # each suspect's top-k proponents it was drawn from
    rule: str = "majority"
    analogues: int = 0  # clean calibration inputs in the matched control
    analogues_affected: int = 0  # ... that removing their own rule-named set changes
    # The confirmed set widened by cluster_members; members include the widening where kept.
    completion: Completion | None = None

    def decision(self) -> str:
        if not self.members:
            return (
                f"no top proponent of the {self.targets} flagged inputs stands out (influence "
                "or class-outlier z below the member cut): nothing is forgotten"
            )
        needed = (
            max(MIN_CORROBORATION, math.ceil(self.targets / 2))
            if self.rule == "majority"
            else MIN_CORROBORATION
        )
        verdict = (
            "confirmed: forgetting it" if self.confirmed else "not confirmed: nothing is forgotten"
        )
        matched = (
            f"; the matched control's set, named by the same rule for the {self.analogues} "
            f"clean calibration inputs its removals moved most, changes "
            f"{self.analogues_affected} of them"
            + (" (allowed below half the flagged share)" if self.rule == "matched" else "")
        )
        completion = self.completion
        named = len(self.members) - (completion.added if completion and completion.kept else 0)
        return (
            f"attack set of {named} samples (the union of the flagged inputs' top "
            f"{self.size} proponents that stand out); removing it changes {self.affected} of "
            f"{self.targets} flagged inputs (needed {needed}); removing {named} "
            f"random samples with the same labels changes {self.control_affected} (allowed "
            f"below a quarter of {self.affected}){matched}: {verdict}"
            + (self.completion.sentence() if self.completion is not None else "")
        )


def _completion_fields(completion: Completion | None) -> dict[str, object]:
    """The Mitigation message's completion fields (zeros where nothing was widened)."""
    if completion is None:
        return {}
    return {
        "completion_added": completion.added,
        "completion_affected": completion.affected,
        "completion_control_affected": completion.control_affected,
        "completion_kept": completion.kept,
    }


def _affected(before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor, drop: float) -> int:
    rows = torch.arange(len(labels))
    fell = before[rows, labels] - after[rows, labels] >= drop
    flipped = after.argmax(dim=1) != labels
    return int((fell | flipped).sum())


class Mitigator:
    def __init__(
        self,
        engine: Engine,
        forget: ForgetService,
        confirm: CounterfactualConfirmation,
        member_z: float,
        size: int,
        shared: bool = False,
        rule: str = "majority",
        cluster: Callable[[str], Sequence[ClusterSpace]] | None = None,
    ) -> None:
        self.engine = engine
        self.forget = forget  # mitigation submits through it and awaits the outcome
        self.confirm = confirm
        self.member_z = member_z
        self.size = size  # top-k proponents per suspect that may join the attack set
        self.shared = shared  # samples the suspects of one class lean on together join too
        self.rule = rule  # majority or matched (module docstring)
        # The current version's training samples in the spaces cluster_members compares
        # them in (None: the set is not completed from the training side).
        self.cluster = cluster

    def plan(
        self,
        model: str,
        suspects: list[Suspect],
        calibration: Calibration,
        outliers: torch.Tensor,
        analogues: Callable[[int], list[Suspect]] | None = None,
    ) -> MitigationPlan:
        """The attack set of ``suspects`` and its confirmation; ``outliers`` ``(n_train,)``:
        the training samples' class-outlier z (reported per member); ``analogues(k)``: up
        to k clean calibration inputs for the matched control (none: no matched control).

        Only each suspect's top ``self.size`` proponents are candidates. Larger sets
        (its top 20 or 30) cured more of a backdoor's targets, but on a clean model four
        fragile clean inputs' top 30 proponents changed two of them, which passed the
        confirmation and forgot clean samples (tests/server/test_scan_service.py).
        """
        size = self.size
        data = self.engine.training_data(model)
        members = self._named(model, suspects, outliers)
        if not members:
            return MitigationPlan([], len(suspects), 0, 0, False, size, self.rule)
        removed = torch.tensor([m.index for m in members], dtype=torch.long)
        affected = self._changed(model, suspects, removed, calibration)
        control = random_control(data.labels, removed, CONTROL_SEED)
        control_affected = self._changed(model, suspects, control, calibration)
        clean = analogues(len(suspects)) if analogues is not None else []
        clean_members = self._named(model, clean, outliers) if clean else []
        clean_affected = (
            self._changed(
                model,
                clean,
                torch.tensor([m.index for m in clean_members], dtype=torch.long),
                calibration,
            )
            if clean_members
            else 0
        )
        corroborated = affected >= MIN_CORROBORATION and 4 * control_affected < affected
        if self.rule == "majority":
            confirmed = corroborated and affected >= math.ceil(len(suspects) / 2)
        else:  # the flagged share changed is more than twice the clean analogues' share
            confirmed = corroborated and 2 * clean_affected * len(suspects) < affected * max(
                len(clean), 1
            )
        completion = None
        if confirmed:
            completion = self._complete(model, suspects, members, affected, calibration, outliers)
            if completion is not None and completion.kept:
                labels = torch.as_tensor(data.labels)
                members = with_cluster(members, completion.joined, labels, outliers)
        return MitigationPlan(
            members,
            len(suspects),
            affected,
            control_affected,
            confirmed,
            size,
            self.rule,
            len(clean),
            clean_affected,
            completion,
        )

    def _complete(
        self,
        model: str,
        suspects: list[Suspect],
        members: list[AttackSetMember],
        affected: int,
        calibration: Calibration,
        outliers: torch.Tensor,
    ) -> Completion | None:
        """The confirmed set widened by the samples that sit with it in their class, kept
        only when its removal changes at least as many flagged inputs and its own random
        control passes. The widening never decides a mitigation: a set is forgotten only
        when the narrow one was confirmed. Deciding on the widened set would have forgotten
        60 samples of a clean synthetic model: the widening took 21 more clean samples to
        the refused 39, whose removal then changed all 5 flagged inputs (the random control
        none)."""
        if self.cluster is None or not members:
            return None
        labels = torch.as_tensor(self.engine.training_data(model).labels)
        named = [m.index for m in members]
        joined = cluster_members(self.cluster(model), labels, torch.tensor(named))
        if not joined:
            return None
        removed = torch.tensor(named + sorted(joined), dtype=torch.long)
        widened = self._changed(model, suspects, removed, calibration)
        control = random_control(labels, removed, CONTROL_SEED)
        control_affected = self._changed(model, suspects, control, calibration)
        kept = widened >= affected and 4 * control_affected < widened
        return Completion(joined, widened, control_affected, kept)

    def _named(
        self, model: str, suspects: list[Suspect], outliers: torch.Tensor
    ) -> list[AttackSetMember]:
        """The attack-set rule: the suspects' top proponents (and shared ones) that stand out."""
        data = self.engine.training_data(model)
        influence_z = {s.index: s.influence_z for s in suspects}
        shared = (
            shared_proponents(
                influence_z,
                {s.index: s.label for s in suspects},
                torch.as_tensor(data.labels),
                self.member_z,
            )
            if self.shared
            else None
        )
        return attack_set(
            {s.index: s.proponents[: self.size] for s in suspects},
            influence_z,
            outliers,
            self.member_z,
            shared,
        )

    def _changed(
        self, model: str, inputs: list[Suspect], removed: torch.Tensor, calibration: Calibration
    ) -> int:
        """How many of ``inputs`` removing the training rows ``removed`` changes."""
        x = torch.stack([s.x for s in inputs])
        labels = torch.tensor([s.label for s in inputs])
        mode = calibration.confirmation
        before = self.confirm.probabilities(model, None, x, mode)
        after = self.confirm.probabilities(model, removed, x, mode)
        return _affected(before, after, labels, calibration.drop)

    def resolve(
        self,
        model: str,
        outcomes: list[ScanOutcome],
        suspects: list[Suspect],
        calibration: Calibration,
        request_id: str,
        actor: str,
        dry_run: bool,
        rescore: Callable[[torch.Tensor], list[tuple[int, float, float]]],
        outliers: torch.Tensor,
        analogues: Callable[[int], list[Suspect]] | None = None,
    ) -> Iterator[ScanOutcome]:
        """The outcomes, each flagged one carrying the mitigation (or its plan)."""
        if not suspects:
            yield from outcomes
            return
        plan = self.plan(model, suspects, calibration, outliers, analogues)
        data = self.engine.training_data(model)
        ids = [int(data.sample_ids[m.index]) for m in plan.members]
        common: dict[str, object] = {
            "sample_ids": ids,
            "sample_keys": [data.key_of(m.index) for m in plan.members]
            if data.sample_keys is not None
            else [],
            "dry_run": dry_run,
            "applied": False,
            "targets": plan.targets,
            "targets_affected": plan.affected,
            "control_affected": plan.control_affected,
            "clean_analogues": plan.analogues,
            "clean_analogues_affected": plan.analogues_affected,
            **_completion_fields(plan.completion),
            "decision": plan.decision(),
        }
        after: dict[int, tuple[int, float, float]] = {}
        if plan.confirmed and not dry_run:
            common.update(self._forget(model, ids, request_id, actor))
            rescored = rescore(torch.stack([s.x for s in suspects]))
            after = {s.index: r for s, r in zip(suspects, rescored, strict=True)}
        named = {int(data.sample_ids[m.index]): m for m in plan.members}
        flagged_rows = {s.index for s in suspects}
        for outcome in outcomes:
            if outcome.index not in flagged_rows:
                yield outcome
                continue
            mitigation = dict(common)
            if outcome.index in after:
                label, score, p = after[outcome.index]
                mitigation.update(
                    predicted_label_after=label,
                    prediction_changed=label != outcome.predicted_label,
                    target_score_after=score,
                    p_value_after=p,
                )
            implicated = [
                {**row, "reason": named[sample].reason()}
                if (sample := int(row["sample_id"])) in named  # type: ignore[call-overload]
                else row
                for row in outcome.implicated
            ]
            yield replace(outcome, mitigation=mitigation, implicated=implicated)

    def _forget(self, model: str, ids: list[int], request_id: str, actor: str) -> dict[str, object]:
        before = self.engine.model_info(model).version.metrics.get("test_accuracy", float("nan"))
        self.forget.submit(model, ids, [], request_id, UnlearningOptions(), actor)
        row = self.forget.wait_done(request_id, timeout=MITIGATION_TIMEOUT_S)
        if row is None or row.state != "SUCCEEDED":
            raise FailedPrecondition(
                f"mitigation forget {request_id} ended {row.state if row else 'missing'}"
            )
        info = self.engine.model_info(model)
        return {
            "applied": True,
            "operation": f"operations/{request_id}",
            "new_version": info.row.current_version,
            "test_accuracy_before": before,
            "test_accuracy_after": info.version.metrics.get("test_accuracy", float("nan")),
        }
