"""Mitigation of a scan: name the attack set, confirm it against a control, forget it, rescan.

The attack set is the union of the flagged inputs' top proponents that stand out on the
test side (influence z) or the training side (class-outlier z) (``attack_sets``). It
is forgotten only when its removal (a retrain or Newton removal on a scratch copy, as the
per-input confirmation) changes at least half of the flagged inputs, and at least two
(their prediction flips, or the predicted class's probability falls by the calibrated
drop), while an equal-size random set with the same labels changes fewer than a quarter
as many. The confirmed union is then narrowed to the proponents of the inputs it
changed (a flagged clean input's proponents are not the attack's) and the narrowed set
is forgotten instead when it passes the same confirmation. A dry run
returns the plan and forgets nothing. After the forget, the flagged inputs are scored
again on the new version against its own clean reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from expunge.defenses.attack_sets import AttackSetMember, attack_set, random_control
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
    union: int = 0  # members of the union before it was narrowed (0: not narrowed)

    def decision(self) -> str:
        if not self.members:
            return (
                f"no top proponent of the {self.targets} flagged inputs stands out (influence "
                "or class-outlier z below the member cut): nothing is forgotten"
            )
        needed = _needed(self.targets)
        verdict = (
            "confirmed: forgetting it" if self.confirmed else "not confirmed: nothing is forgotten"
        )
        drawn = (
            f"the top {self.size} proponents of the flagged inputs that the union of "
            f"{self.union} such samples changed"
            if self.union
            else f"the union of the flagged inputs' top {self.size} proponents"
        )
        return (
            f"attack set of {len(self.members)} samples ({drawn}, those that stand out); "
            f"removing it changes {self.affected} of {self.targets} flagged "
            f"inputs (needed {needed}); removing {len(self.members)} random samples with the "
            f"same labels changes {self.control_affected} (allowed below a quarter of "
            f"{self.affected}): {verdict}"
        )


def _needed(flagged: int) -> int:
    return max(MIN_CORROBORATION, math.ceil(flagged / 2))


def _changed(
    before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor, drop: float
) -> torch.Tensor:
    """Which inputs ``(q,)`` bool a removal changed: their prediction flipped, or the
    predicted class's probability fell by at least ``drop``."""
    rows = torch.arange(len(labels))
    fell = before[rows, labels] - after[rows, labels] >= drop
    flipped = after.argmax(dim=1) != labels
    return fell | flipped


class Mitigator:
    def __init__(
        self,
        engine: Engine,
        forget: ForgetService,
        confirm: CounterfactualConfirmation,
        member_z: float,
        size: int,
    ) -> None:
        self.engine = engine
        self.forget = forget  # mitigation submits through it and awaits the outcome
        self.confirm = confirm
        self.member_z = member_z
        self.size = size  # top-k proponents per suspect that may join the attack set

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
        members = attack_set(
            {s.index: s.proponents[:size] for s in suspects},
            {s.index: s.influence_z for s in suspects},
            outliers,
            self.member_z,
        )
        if not members:
            return MitigationPlan([], len(suspects), 0, 0, False, size)
        x = torch.stack([s.x for s in suspects])
        labels = torch.tensor([s.label for s in suspects])
        mode = calibration.confirmation
        before = self.confirm.probabilities(model, None, x, mode)

        def confirmation(chosen: list[AttackSetMember]) -> tuple[torch.Tensor, int]:
            removed = torch.tensor([m.index for m in chosen], dtype=torch.long)
            after = self.confirm.probabilities(model, removed, x, mode)
            control = random_control(data.labels, removed, CONTROL_SEED)
            after_control = self.confirm.probabilities(model, control, x, mode)
            changed = _changed(before, after, labels, calibration.drop)
            return changed, int(_changed(before, after_control, labels, calibration.drop).sum())

        def passes(changed: torch.Tensor, control_affected: int) -> bool:
            affected = int(changed.sum())
            return affected >= _needed(len(suspects)) and 4 * control_affected < affected

        changed, control_affected = confirmation(members)
        plan = MitigationPlan(
            members,
            len(suspects),
            int(changed.sum()),
            control_affected,
            passes(changed, control_affected),
            size,
        )
        if not plan.confirmed:
            return plan
        # A flagged input the removal left unchanged is not corroborated as a target (a
        # clean input flagged beside the attack's): its proponents leave the set, which
        # must then pass the same confirmation on its own.
        corroborated = {s.index for s, hit in zip(suspects, changed.tolist(), strict=True) if hit}
        narrowed = [m for m in members if corroborated.intersection(m.targets)]
        if len(narrowed) == len(members):
            return plan
        changed, control_affected = confirmation(narrowed)
        if not passes(changed, control_affected):
            return plan  # the union passed; the narrowed set alone did not
        return MitigationPlan(
            narrowed,
            len(suspects),
            int(changed.sum()),
            control_affected,
            True,
            size,
            union=len(members),
        )

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
