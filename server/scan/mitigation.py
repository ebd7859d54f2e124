"""Mitigation of a scan: name the attack set, confirm it against a control, forget it, rescan.

The attack set is the union of the flagged inputs' top proponents that stand out on the
test side (influence z) or the training side (class-outlier z), and, with the
``shared_proponents`` option, of the samples the flagged inputs of one class lean on
together (their Stouffer-combined influence z past a class-wide Bonferroni cut: a
backdoor's poisons beyond any one input's top 10) (``attack_sets``). It
is forgotten only when its removal (a retrain or Newton removal on a scratch copy, as the
per-input confirmation) changes at least half of the flagged inputs, and at least two
(their prediction flips, or the predicted class's probability falls by the calibrated
drop), while an equal-size random set with the same labels changes fewer than a quarter
as many. A dry run
returns the plan and forgets nothing. After the forget, the flagged inputs are scored
again on the new version against its own clean reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from expunge.defenses.attack_sets import (
    AttackSetMember,
    attack_set,
    random_control,
    shared_proponents,
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
class MitigationPlan:
    members: list[AttackSetMember]
    targets: int
    affected: int  # flagged inputs its removal changes
    control_affected: int  # ... that the random control's removal changes
    confirmed: bool
    size: int  # each suspect's top-k proponents it was drawn from

    def decision(self) -> str:
        if not self.members:
            return (
                f"no top proponent of the {self.targets} flagged inputs stands out (influence "
                "or class-outlier z below the member cut): nothing is forgotten"
            )
        needed = max(MIN_CORROBORATION, math.ceil(self.targets / 2))
        verdict = (
            "confirmed: forgetting it" if self.confirmed else "not confirmed: nothing is forgotten"
        )
        return (
            f"attack set of {len(self.members)} samples (the union of the flagged inputs' top "
            f"{self.size} proponents that stand out); removing it changes {self.affected} of {self.targets} flagged "
            f"inputs (needed {needed}); removing {len(self.members)} random samples with the "
            f"same labels changes {self.control_affected} (allowed below a quarter of "
            f"{self.affected}): {verdict}"
        )


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
    ) -> None:
        self.engine = engine
        self.forget = forget  # mitigation submits through it and awaits the outcome
        self.confirm = confirm
        self.member_z = member_z
        self.size = size  # top-k proponents per suspect that may join the attack set
        self.shared = shared  # samples the suspects of one class lean on together join too

    def plan(
        self,
        model: str,
        suspects: list[Suspect],
        calibration: Calibration,
        outliers: torch.Tensor,
    ) -> MitigationPlan:
        """The attack set of ``suspects`` and its confirmation; ``outliers`` ``(n_train,)``:
        the training samples' class-outlier z (reported per member).

        Only each suspect's top ``self.size`` proponents are candidates. Larger sets
        (its top 20 or 30) cured more of a backdoor's targets, but on a clean model four
        fragile clean inputs' top 30 proponents changed two of them, which passed the
        confirmation and forgot clean samples (tests/server/test_scan_service.py).
        """
        size = self.size
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
        members = attack_set(
            {s.index: s.proponents[:size] for s in suspects},
            influence_z,
            outliers,
            self.member_z,
            shared,
        )
        if not members:
            return MitigationPlan([], len(suspects), 0, 0, False, size)
        removed = torch.tensor([m.index for m in members], dtype=torch.long)
        x = torch.stack([s.x for s in suspects])
        labels = torch.tensor([s.label for s in suspects])
        mode = calibration.confirmation
        before = self.confirm.probabilities(model, None, x, mode)
        after = self.confirm.probabilities(model, removed, x, mode)
        control = random_control(data.labels, removed, CONTROL_SEED)
        after_control = self.confirm.probabilities(model, control, x, mode)
        affected = _affected(before, after, labels, calibration.drop)
        control_affected = _affected(before, after_control, labels, calibration.drop)
        confirmed = (
            affected >= max(MIN_CORROBORATION, math.ceil(len(suspects) / 2))
            and 4 * control_affected < affected
        )
        return MitigationPlan(members, len(suspects), affected, control_affected, confirmed, size)

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
    ) -> Iterator[ScanOutcome]:
        """The outcomes, each flagged one carrying the mitigation (or its plan)."""
        if not suspects:
            yield from outcomes
            return
        plan = self.plan(model, suspects, calibration, outliers)
        data = self.engine.training_data(model)
        ids = [int(data.sample_ids[m.index]) for m in plan.members]
        common: dict[str, object] = {
            "sample_ids": ids,
            "dry_run": dry_run,
            "applied": False,
            "targets": plan.targets,
            "targets_affected": plan.affected,
            "control_affected": plan.control_affected,
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
