"""An operation and its receipt as lines of text (forget, retrain, nothing to forget)."""

from __future__ import annotations

from ..types import ForgetReceipt, Operation, RetrainReceipt


def state_line(op: Operation) -> str:
    """``operations/abc: RUNNING (solving 3/10)``; the phase only while it runs."""
    line = f"{op.name}: {op.state}"
    if not op.done and op.phase:
        line += f" ({op.phase} {op.completed}/{op.total})" if op.total else f" ({op.phase})"
    return line


def operation_lines(op: Operation) -> list[str]:
    lines = [state_line(op)]
    if op.receipt is not None:
        lines += forget_lines(op.receipt)
    if op.retrain_receipt is not None:
        lines += retrain_lines(op.retrain_receipt)
    return lines


def nothing_forgotten(r: ForgetReceipt) -> bool:
    """Everything the forget named had been forgotten already: no new version, no figures."""
    return r.removed_samples == 0 and r.new_version == r.parent_version


def already_forgotten(r: ForgetReceipt) -> str:
    """``1 owner(s) and 2 sample(s)`` the forget named that were forgotten before it."""
    parts = []
    if r.already_forgotten_owners:
        parts.append(f"{r.already_forgotten_owners} owner(s)")
    if r.already_forgotten_samples:
        parts.append(f"{r.already_forgotten_samples} sample(s)")
    return " and ".join(parts) or "everything named"


def forget_lines(r: ForgetReceipt) -> list[str]:
    if nothing_forgotten(r):
        return [
            f"nothing to forget: {already_forgotten(r)} already forgotten; "
            f"model stays at version {r.new_version}"
        ]
    lines = [
        f"version {r.parent_version} -> {r.new_version}: removed {r.removed_samples} samples "
        f"of {r.removed_owners} owners; updated {r.parameters_updated}/{r.parameters_total} "
        f"parameters; test accuracy {r.before.test_accuracy:.3f} -> {r.after.test_accuracy:.3f}; "
        f"MIA AUC {r.before.mia_auc:.3f} -> {r.after.mia_auc:.3f}; {r.seconds:.2f} s"
    ]
    if r.already_forgotten_owners or r.already_forgotten_samples:
        lines.append(f"already forgotten before this request: {already_forgotten(r)}")
    lines.append(f"path: {r.policy.path} ({r.policy.reason})")
    m = r.method
    if m.selection != "retrain":
        count = (
            f"{r.parameters_updated} entries: at least {m.parameter_budget}, grown to "
            f"{m.step_coverage:.0%} of the ranked step"
            if m.step_coverage
            else f"{m.parameter_budget} entries at most"
        )
        lines.append(
            f"method: {m.selection} ({count}"
            + (f"; {m.candidate_parameters} candidates" if m.candidate_parameters else "")
            + f"), {m.hessian} Hessian "
            f"on {m.hessian_samples} samples, {m.newton_iterations_taken}/"
            f"{m.newton_iterations} Newton steps, seed {m.seed}; retained gradient before "
            f"{r.retained_gradient_norm_before:.3g}"
        )
    lines.append(r.certificate.statement)
    if r.accuracy_collapse is not None:
        c = r.accuracy_collapse
        lines.append(
            f"accuracy collapse: the update cost {c.drop_points:.1f} points (limit "
            f"{c.limit_points:g}); action: {c.action}"
            + (f", exact retrain {c.retrain_operation}" if c.retrain_operation else "")
        )
    return lines


def retrain_lines(r: RetrainReceipt) -> list[str]:
    return [
        f"version {r.parent_version} -> {r.new_version}: retrained on {r.training_samples} "
        f"samples; test accuracy {r.parent_test_accuracy:.3f} -> {r.test_accuracy:.3f}; "
        f"noise budget reset to {r.budget_total:g}; {r.seconds:.2f} s"
    ]
