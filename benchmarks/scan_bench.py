"""Scan benchmark: attacks nobody tuned the scan for, through the real server and client.

``python -m benchmarks.scan_bench`` (``--quick``: one seed per held-out attack, no clean
tabular model, no throughput run). Every figure is of what is served: each model is
created by ``Engine.create_model`` (the ``expunge train`` path: served ``TrainConfig``
defaults, the attack's held-out clean inputs as the test set, so its first 100 are the
scan's calibration inputs), a real server is started on it with its default settings
(gradient index on), and everything below is a call of the public client.

Cases. **Development** (the scan's defaults may be chosen here): the digits 2x2
bottom-right patch backdoor from one source class and from any class, label-flipped
near-duplicates on digits and on breast cancer (``expunge.defenses.attacks``), and a
two-feature backdoor on ``make_blobs`` data with two blobs per class; MLP.
**Held-out** (made by another procedure, ``benchmarks.heldout_attacks``; nothing is
chosen on them): a 3x3 plus sign in the top-left corner (CNN), a vertical line on the
left edge (MLP), and tabular backdoors that set three features of standardised rows to an
out-of-range value (breast cancer; a ``make_classification`` task), each with several
seeds. **Clean models** (no attack): digits, and the synthetic tabular task.

Per attack: the targets and 60 clean inputs (not calibration inputs) are scanned with
``dry_run`` (timed, beside ``EstimateScan``'s estimate), then with ``mitigate``:
- which targets the attack **caused**: predicted with the adversarial label by the served
  model, and not by a model trained the same way (``Engine.create_model``, same
  configuration and seed) on the training set without the poisons. A trigger that pushes
  an input to the adversarial class on its own (an out-of-range value in the direction
  of that class) is not the attack's doing, and removing poisons cannot undo it;
- ``auprc``: the p-value ranking of the caused targets against the clean inputs
  (``auprc_turned``: of every target predicted with the adversarial label, as before);
- the attack set (the dry run's ``sample_ids``) against the poisons: recall and precision;
- attack success (the caused targets still predicted with the adversarial label) before
  and after the mitigation, and clean accuracy on the attack's other held-out inputs before and after;
- the same run's peers on the same served model: IBM ART 1.20.1 activation clustering and
  spectral signatures with their defaults, and restricted to the attacked class
  (``art_ac``, ``art_ac_class``, ``art_spectral``, ``art_spectral_class``), and
  ``gas_top10``: the union of each caused target's top-10 GAS proponents of its
  adversarial label, from the ``Neighbors`` RPC (the targets and their labels known in
  advance, which the scan is not told).
Clean models: 200 clean inputs scanned with ``mitigate``; ``clean_model_mitigations``
counts the forgets applied (the goal is 0).

Headlines are the worst over every case of a split (held-out unprefixed, ``dev_``
prefixed) where the attack caused a target (the issue's "where the attack succeeded");
an attack that caused none is named in ``attacks_without_effect`` and keeps its per-case
row; any other figure with nothing to measure (no attack set) makes its headline NaN,
not dropped.
``scan_inputs_per_s``: the scoring path on 10k training samples (from
``benchmarks.estimator_bench``'s throughput run). Writes ``benchmarks/results/scan.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.heldout_attacks import shape_backdoor, tabular_backdoor
from benchmarks.setting_args import parse_setting
from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.attacks import (
    AttackedDataset,
    BackdoorConfig,
    TargetedConfig,
    backdoor_digits,
    targeted_poisoning,
)
from expunge.defenses.targets import average_precision
from expunge.defenses.training import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results" / "scan.json"
CLEAN_SCANNED = 60  # clean inputs scanned beside the targets (after the 100 calibration ones)
CALIBRATION = 100
PEERS = ("gas_top10", "art_ac", "art_ac_class", "art_spectral", "art_spectral_class")


@dataclass(frozen=True)
class Case:
    name: str
    split: str  # dev, held_out, clean
    make: Callable[[], AttackedDataset]
    architecture: str = "mlp"
    config: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30))


def _without_poisons(attack: AttackedDataset, name: str) -> AttackedDataset:
    """The attack's clean training rows and held-out inputs: a model with no attack."""
    keep = ~attack.poison_mask
    n = int(keep.sum())
    return AttackedDataset(
        name,
        attack.train_x[keep],
        attack.train_y[keep],
        torch.zeros(n, dtype=torch.bool),
        torch.full((n,), -1),
        attack.target_x[:0],
        attack.target_y[:0],
        attack.target_adversarial_y[:0],
        attack.clean_x,
        attack.clean_y,
        attack.num_classes,
    )


def _clean_digits() -> AttackedDataset:
    return _without_poisons(backdoor_digits(BackdoorConfig(seed=5, n_clean=300)), "clean_digits")


def _clean_synthetic() -> AttackedDataset:
    attack = tabular_backdoor("synthetic", (0, 5, 11), 6.0, 1, 2, seed=9, n_clean=400)
    return _without_poisons(attack, "clean_synthetic")


def _cases(quick: bool) -> list[Case]:
    cnn = TrainConfig(epochs=20, batch_size=32)
    seeds = (0,) if quick else (0, 1)
    cases = [
        Case(
            "digits_patch_src1",
            "dev",
            lambda: backdoor_digits(BackdoorConfig(source_label=1, seed=0, n_clean=560)),
        ),
        Case(
            "digits_patch_any",
            "dev",
            lambda: backdoor_digits(BackdoorConfig(seed=1, n_clean=560)),
        ),
        Case(
            "digits_targeted",
            "dev",
            lambda: targeted_poisoning(TargetedConfig("digits", n_targets=10, n_clean=500)),
        ),
        Case(
            "cancer_targeted",
            "dev",
            lambda: targeted_poisoning(TargetedConfig("breast_cancer", n_targets=10, n_clean=170)),
        ),
        Case(
            "blobs_tabular_mlp",
            "dev",
            lambda: tabular_backdoor("blobs", (1, 4), 4.0, 2, 1, seed=55, n_clean=300),
        ),
    ]
    for seed in seeds:
        cases += [
            Case(
                f"digits_cross_cnn_s{seed}",
                "held_out",
                lambda seed=seed: shape_backdoor("cross", 7, 3, seed, n_clean=560),  # type: ignore[misc]
                "cnn",
                cnn,
            ),
            Case(
                f"digits_line_mlp_s{seed}",
                "held_out",
                lambda seed=seed: shape_backdoor("line", 4, 9, seed + 10, n_clean=560),  # type: ignore[misc]
            ),
            Case(
                f"cancer_tabular_mlp_s{seed}",
                "held_out",
                # Malignant rows (0) with three size features pushed 5 deviations further
                # towards malignant, labelled benign (1). The first version (benign -> 0)
                # caused no target: a model trained without the poisons predicted every
                # triggered benign row malignant too (scan of 2026-12-07, attacks_without_effect).
                lambda seed=seed: tabular_backdoor(  # type: ignore[misc]
                    "breast_cancer", (3, 7, 20), 5.0, 0, 1, seed + 20, n_clean=170
                ),
            ),
            Case(
                f"synthetic_tabular_mlp_s{seed}",
                "held_out",
                lambda seed=seed: tabular_backdoor(  # type: ignore[misc]
                    "synthetic", (2, 9, 17), 6.0, 0, 3, seed + 30, n_clean=900
                ),
            ),
        ]
    cases.append(Case("clean_digits", "clean", _clean_digits))
    if not quick:
        cases.append(Case("clean_synthetic", "clean", _clean_synthetic))
    return cases


# --------------------------------------------------------------------------- serving


def _create_state(case: Case, attack: AttackedDataset, state: Path) -> ArchitectureSpec:
    from expunge.server.engine import Engine
    from expunge.server.settings import Settings
    from expunge.server.state.datasets import synthetic_owners, validate
    from expunge.server.state.store import Store

    n = len(attack.train_y)
    train = validate(
        attack.train_x.numpy().astype(np.float32),
        attack.train_y.numpy(),
        np.arange(n),
        synthetic_owners(n, 0),
    )
    test = validate(
        attack.clean_x.numpy().astype(np.float32),
        attack.clean_y.numpy(),
        np.arange(n, n + len(attack.clean_y)),
        np.full(len(attack.clean_y), "-"),
        attack.num_classes,
    )
    spec = ArchitectureSpec(case.architecture, tuple(attack.train_x.shape[1:]), attack.num_classes)
    store = Store(state)
    try:
        Engine(store, Settings(state_dir=state)).create_model(
            "m", train, spec, case.config, test_set=test
        )
    finally:
        store.close()
    return spec


# Server settings of an option's run (--setting); empty: the served defaults.
SERVER_SETTINGS: dict[str, Any] = {}


def _served(state: Path) -> Any:
    from expunge.client import Client
    from expunge.server.main import start
    from expunge.server.settings import Settings

    running = start(Settings(state_dir=state, port=0, **SERVER_SETTINGS))
    with Client(running.target) as client:
        deadline = time.monotonic() + 600
        while client.get_model("m").index.state != "READY":
            if time.monotonic() > deadline:
                raise RuntimeError("the gradient index was not built within 10 minutes")
            time.sleep(0.2)
    return running


def _load(spec: ArchitectureSpec, weights: bytes) -> nn.Module:
    from expunge.server.state import weights as weights_io

    model = build_model(spec, seed=0)
    weights_io.load_into(model, weights)
    return model.eval()


# --------------------------------------------------------------------------- peers


def _art_flags(
    model: nn.Module, spec: ArchitectureSpec, x: np.ndarray, y: np.ndarray, method: str
) -> np.ndarray:
    """ART's poison flags (True = flagged) on ``x``, ``y`` with the library's defaults.

    Both defences work class by class (clustering, or the spectral score and its cut,
    within each class), so their flags restricted to the attacked class are what they
    give when run on that class alone.
    """
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=spec.input_shape,
        nb_classes=spec.num_classes,
    )
    onehot = np.eye(spec.num_classes, dtype=np.float32)[y]
    defence = (
        ActivationDefence(classifier, x, onehot)
        if method == "ac"
        else SpectralSignatureDefense(classifier, x, onehot)
    )
    _, is_clean = defence.detect_poison()
    return np.asarray(is_clean) == 0


def _recall_precision(named: np.ndarray, poison: np.ndarray) -> tuple[float, float]:
    """(recall, precision) of a named set of training rows (bool mask) against the poisons."""
    hits = int((named & poison).sum())
    recall = hits / int(poison.sum()) if poison.any() else math.nan
    precision = hits / int(named.sum()) if named.any() else 0.0
    return recall, precision


def _peers(
    client: Any,
    model: nn.Module,
    spec: ArchitectureSpec,
    attack: AttackedDataset,
    turned: np.ndarray,
    row_of: dict[int, int],
) -> dict[str, tuple[float, float]]:
    x = attack.train_x.numpy().astype(np.float32)
    y = attack.train_y.numpy()
    poison = attack.poison_mask.numpy()
    adversarial = attack.target_adversarial_y.numpy()
    out: dict[str, tuple[float, float]] = {}
    named = np.zeros(len(y), dtype=bool)
    for target in np.flatnonzero(turned):  # each with its own adversarial label
        result = client.neighbors(
            "m",
            attack.target_x.numpy()[target : target + 1].astype(np.float32),
            k=10,
            label=int(adversarial[target]),
        )
        for hit in result.neighbors[0]:
            named[row_of[hit.sample_id]] = True
    out["gas_top10"] = _recall_precision(named, poison)
    in_class = np.isin(y, np.unique(adversarial))  # the attacked classes
    for method in ("ac", "spectral"):
        flags = _art_flags(model, spec, x, y, method)
        out[f"art_{method}"] = _recall_precision(flags, poison)
        out[f"art_{method}_class"] = _recall_precision(flags & in_class, poison)
    return out


# --------------------------------------------------------------------------- one case


def _poison_free_adversarial(case: Case, attack: AttackedDataset, workdir: Path) -> np.ndarray:
    """Which targets ``(t,)`` a model trained the served way without the poisons also
    predicts with their adversarial label."""
    from expunge.server.engine import Engine
    from expunge.server.settings import Settings
    from expunge.server.state.store import Store

    state = workdir / f"{case.name}-poison-free"
    _create_state(case, _without_poisons(attack, f"{case.name}-poison-free"), state)
    store = Store(state)
    try:
        module = Engine(store, Settings(state_dir=state)).snapshot("m").module.eval()
        with torch.no_grad():
            predicted = module(attack.target_x.float()).argmax(dim=1).numpy()
    finally:
        store.close()
    return np.asarray(predicted == attack.target_adversarial_y.numpy())


def _accuracy(client: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float((client.predict("m", x.astype(np.float32)).labels == y).mean())


def _run_attack(case: Case, attack: AttackedDataset, workdir: Path) -> dict[str, Any]:
    from expunge.client import Client

    state = workdir / case.name
    spec = _create_state(case, attack, state)
    without_poisons = _poison_free_adversarial(case, attack, workdir)
    running = _served(state)
    targets = attack.target_x.numpy().astype(np.float32)
    adversarial = attack.target_adversarial_y.numpy()
    clean = attack.clean_x.numpy()[CALIBRATION : CALIBRATION + CLEAN_SCANNED]
    held_x = attack.clean_x.numpy()[CALIBRATION + CLEAN_SCANNED :]
    held_y = attack.clean_y.numpy()[CALIBRATION + CLEAN_SCANNED :]
    inputs = np.concatenate([targets, clean]).astype(np.float32)
    poison = attack.poison_mask.numpy()
    try:
        with Client(running.target, timeout=3600) as client:
            turned = client.predict("m", targets).labels == adversarial
            caused = turned & ~without_poisons
            accuracy_before = _accuracy(client, held_x, held_y)
            estimate = client.estimate_scan("m", inputs, dry_run=True)
            began = time.perf_counter()
            planned = list(client.scan("m", inputs, dry_run=True))
            dry_s = time.perf_counter() - began
            row_of = {k: k for k in range(len(poison))}  # sample ids are the rows
            model = _load(spec, client.export_model("m"))
            peers = _peers(client, model, spec, attack, caused, row_of)
            began = time.perf_counter()
            mitigated = list(client.scan("m", inputs, mitigate=True, request_id="mitigate"))
            mitigate_s = time.perf_counter() - began
            success_after = (
                float((client.predict("m", targets).labels == adversarial)[caused].mean())
                if caused.any()
                else math.nan
            )
            accuracy_after = _accuracy(client, held_x, held_y)
    finally:
        running.stop(grace=1.0)
    n_targets = len(targets)
    p = np.array([r.p_value for r in planned])
    labels = np.concatenate([caused, np.zeros(len(clean), dtype=bool)])
    keep = np.concatenate([caused, np.ones(len(clean), dtype=bool)])
    labels_turned = np.concatenate([turned, np.zeros(len(clean), dtype=bool)])
    keep_turned = np.concatenate([turned, np.ones(len(clean), dtype=bool)])
    plan = next((r.mitigation for r in planned if r.mitigation is not None), None)
    named = np.zeros(len(poison), dtype=bool)
    if plan is not None:
        named[[row_of[int(i)] for i in plan.sample_ids]] = True
    recall, precision = _recall_precision(named, poison)
    applied = next(
        (r.mitigation for r in mitigated if r.mitigation is not None and r.mitigation.applied),
        None,
    )
    return {
        "case": case.name,
        "split": case.split,
        "architecture": case.architecture,
        "training_samples": len(poison),
        "poisons": int(poison.sum()),
        "targets": n_targets,
        "targets_turned": int(turned.sum()),
        "targets_adversarial_without_poisons": int(without_poisons.sum()),
        "targets_caused": int(caused.sum()),
        # Over the targets the attack caused: each of them succeeded before mitigation.
        "attack_success_before": 1.0 if caused.any() else math.nan,
        "auprc": _auprc(labels, keep, -np.log(p)),
        "auprc_turned": _auprc(labels_turned, keep_turned, -np.log(p)),
        # The two sides alone: the influence score's p-value, the top proponents' group z.
        "auprc_influence_only": _auprc(
            labels, keep, -np.log(np.array([r.influence_p_value for r in planned]))
        ),
        "auprc_training_side_only": _auprc(
            labels, keep, np.array([r.group_outlier_z for r in planned])
        ),
        "chance_auprc": float(caused.sum() / keep.sum()) if caused.any() else math.nan,
        "flagged_targets": int(
            sum(r.flagged for r, c in zip(planned[:n_targets], caused, strict=True) if c)
        ),
        "flagged_targets_not_caused": int(
            sum(r.flagged for r, c in zip(planned[:n_targets], caused, strict=True) if not c)
        ),
        "flagged_clean": int(sum(r.flagged for r in planned[n_targets:])),
        "attack_set_size": int(named.sum()),
        "attack_set_recall": recall,
        "attack_set_precision": precision,
        "plan_decision": plan.decision if plan is not None else "no input flagged",
        **_plan_counts(plan),
        "mitigation_applied": applied is not None,
        "attack_success_after": success_after,
        "clean_accuracy_before": accuracy_before,
        "clean_accuracy_after": accuracy_after,
        "accuracy_drop_pts": 100 * (accuracy_before - accuracy_after),
        "estimated_s": estimate.estimated_seconds,
        "dry_run_s": dry_s,
        "estimate_ratio": estimate.estimated_seconds / dry_s,
        "mitigate_s": mitigate_s,
        "peers": {name: {"recall": r, "precision": q} for name, (r, q) in peers.items()},
    }


def _plan_counts(plan: Any) -> dict[str, int]:
    """The mitigation plan's confirmation counts (zeros when nothing was flagged)."""
    fields = (
        "targets",
        "targets_affected",
        "control_affected",
        "clean_analogues",
        "clean_analogues_affected",
        "completion_added",
        "completion_affected",
        "completion_control_affected",
        "completion_kept",
    )
    return {f"plan_{name}": int(getattr(plan, name)) if plan is not None else 0 for name in fields}


def _auprc(labels: np.ndarray, keep: np.ndarray, scores: np.ndarray) -> float:
    """AUPRC of the targets (``labels``) among the kept inputs; NaN if there are none."""
    if not labels.any():
        return math.nan
    return average_precision(labels[keep], scores[keep])


def _run_clean(case: Case, attack: AttackedDataset, workdir: Path) -> dict[str, Any]:
    from expunge.client import Client

    state = workdir / case.name
    _create_state(case, attack, state)
    running = _served(state)
    inputs = attack.clean_x.numpy()[CALIBRATION : CALIBRATION + 200].astype(np.float32)
    try:
        with Client(running.target, timeout=3600) as client:
            estimate = client.estimate_scan("m", inputs, mitigate=True)
            began = time.perf_counter()
            results = list(client.scan("m", inputs, mitigate=True, request_id="clean"))
            seconds = time.perf_counter() - began
            version = client.get_model("m").current_version
    finally:
        running.stop(grace=1.0)
    plan = next((r.mitigation for r in results if r.mitigation), None)
    decision = plan.decision if plan is not None else "no input flagged"
    return {
        "case": case.name,
        "split": case.split,
        "inputs": len(inputs),
        "flagged": int(sum(r.flagged for r in results)),
        "mitigations": int(version - 1),
        "plan_decision": decision,
        **_plan_counts(plan),
        "estimated_s": estimate.estimated_seconds,
        "scan_s": seconds,
        "estimate_ratio": estimate.estimated_seconds / seconds,
    }


# --------------------------------------------------------------------------- summary


def _worst(values: list[float], worst: Callable[[list[float]], float]) -> float:
    """The worst value; a case with nothing measured (NaN) makes the headline NaN."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return worst(values)


def _headlines(all_rows: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    # Where the attack succeeded: an attack that caused no target has nothing to find.
    rows = [r for r in all_rows if r["targets_caused"]]
    without_effect = [r["case"] for r in all_rows if not r["targets_caused"]]
    if not rows:
        return {f"{prefix}attacks_without_effect": without_effect} if all_rows else {}
    out: dict[str, Any] = {
        f"{prefix}cases": len(rows),
        f"{prefix}attacks_without_effect": without_effect,
        f"{prefix}auprc_turned_min": min(
            r["auprc_turned"] for r in all_rows if r["targets_turned"]
        ),
        f"{prefix}auprc_min": _worst([r["auprc"] for r in rows], min),
        f"{prefix}auprc_influence_only_min": _worst([r["auprc_influence_only"] for r in rows], min),
        f"{prefix}auprc_training_side_only_min": _worst(
            [r["auprc_training_side_only"] for r in rows], min
        ),
        f"{prefix}attack_set_recall_min": _worst([r["attack_set_recall"] for r in rows], min),
        f"{prefix}attack_set_precision_min": _worst([r["attack_set_precision"] for r in rows], min),
        f"{prefix}mitigated_attack_success_max": _worst(
            [r["attack_success_after"] for r in rows], max
        ),
        f"{prefix}mitigation_acc_drop_pts_max": max(r["accuracy_drop_pts"] for r in rows),
        f"{prefix}mitigations_applied": sum(r["mitigation_applied"] for r in rows),
        f"{prefix}estimate_ratio_max": max(r["estimate_ratio"] for r in rows),
        f"{prefix}estimate_ratio_min": min(r["estimate_ratio"] for r in rows),
    }
    ahead = True
    for peer in PEERS:
        recalls = [r["peers"][peer]["recall"] for r in rows]
        precisions = [r["peers"][peer]["precision"] for r in rows]
        out[f"{prefix}{peer}_recall_min"] = _worst(recalls, min)
        out[f"{prefix}{peer}_precision_min"] = _worst(precisions, min)
    for r in rows:
        ours = _f1(r["attack_set_recall"], r["attack_set_precision"])
        best = max(_f1(v["recall"], v["precision"]) for v in r["peers"].values())
        r["ahead_of_best_peer"] = ours >= best
        ahead = ahead and ours >= best
    out[f"{prefix}ahead_of_best_peer_every_attack"] = ahead
    return out


def _f1(recall: float, precision: float) -> float:
    if math.isnan(recall) or recall + precision == 0:
        return 0.0
    return 2 * recall * precision / (recall + precision)


def _print_attack(r: dict[str, Any]) -> None:
    print(
        f"== {r['case']} ({r['split']}, {r['architecture']}): n={r['training_samples']}, "
        f"{r['poisons']} poisons, {r['targets_turned']}/{r['targets']} targets turned, "
        f"{r['targets_adversarial_without_poisons']} of them adversarial without the poisons "
        f"too: {r['targets_caused']} caused by the attack (auprc over every turned target "
        f"{r['auprc_turned']:.3f})"
    )
    print(
        f"   auprc {r['auprc']:.3f} (influence alone {r['auprc_influence_only']:.3f}, training "
        f"side alone {r['auprc_training_side_only']:.3f}; chance {r['chance_auprc']:.3f}); flagged "
        f"{r['flagged_targets']} caused targets ({r['flagged_targets_not_caused']} other "
        f"targets), {r['flagged_clean']} of {CLEAN_SCANNED} clean"
    )
    print(
        f"   attack set {r['attack_set_size']}: recall {r['attack_set_recall']:.2f}, "
        f"precision {r['attack_set_precision']:.2f}; {r['plan_decision']}"
    )
    print(
        f"   mitigation applied {r['mitigation_applied']}: attack success "
        f"{r['attack_success_before']:.2f} -> {r['attack_success_after']:.2f}, clean accuracy "
        f"{r['clean_accuracy_before']:.3f} -> {r['clean_accuracy_after']:.3f}"
    )
    print(
        f"   time: estimate {r['estimated_s']:.1f} s, dry run {r['dry_run_s']:.1f} s "
        f"(ratio {r['estimate_ratio']:.2f}), mitigate {r['mitigate_s']:.1f} s"
    )
    for name, v in r["peers"].items():
        print(f"   peer {name:20s} recall {v['recall']:.2f} precision {v['precision']:.2f}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer cases")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument(
        "--split", default="", help="dev, held_out or clean: run only that split's cases"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="serve with this server setting (an option's run; repeatable)",
    )
    args = parser.parse_args(argv)
    SERVER_SETTINGS.update(parse_setting(text) for text in args.setting)
    torch.set_num_threads(2)
    started = time.perf_counter()
    attacks: list[dict[str, Any]] = []
    cleans: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="scan-bench-") as tmp:
        for case in _cases(args.quick):
            if (args.only and args.only not in case.name) or args.split not in ("", case.split):
                continue
            attack = case.make()
            if case.split == "clean":
                row = _run_clean(case, attack, Path(tmp))
                print(
                    f"== {row['case']} (clean model): {row['flagged']} of {row['inputs']} "
                    f"flagged, {row['mitigations']} mitigations; {row['plan_decision']}; "
                    f"estimate {row['estimated_s']:.1f} s vs {row['scan_s']:.1f} s",
                    flush=True,
                )
                cleans.append(row)
            else:
                row = _run_attack(case, attack, Path(tmp))
                _print_attack(row)
                attacks.append(row)
    summary: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.scan_bench", *(argv or sys.argv[1:])]),
        "server_settings": dict(SERVER_SETTINGS),
        "device": f"cpu: {platform.machine()}, torch threads {torch.get_num_threads()}",
        "seconds": time.perf_counter() - started,
    }
    summary.update(_headlines([r for r in attacks if r["split"] == "held_out"], ""))
    summary.update(_headlines([r for r in attacks if r["split"] == "dev"], "dev_"))
    if cleans:
        summary["clean_model_mitigations"] = sum(r["mitigations"] for r in cleans)
        summary["clean_model_flagged"] = sum(r["flagged"] for r in cleans)
        summary["clean_estimate_ratio_max"] = max(r["estimate_ratio"] for r in cleans)
    if not args.quick and not args.only and not args.split:
        from benchmarks.estimator_bench import _throughput

        summary.update(_throughput())
    summary["cases"] = attacks + cleans
    print("\nheadlines:")
    for key, value in summary.items():
        if key != "cases":
            print(f"  {key}: {value}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
