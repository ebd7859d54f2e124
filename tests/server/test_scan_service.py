"""Scan through the real server on a backdoored digits model (ground truth from the attack suite)."""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from expunge.client import Client, FailedPreconditionError, InvalidArgumentError
from expunge.defenses.architectures import ArchitectureSpec
from expunge.defenses.attacks import AttackedDataset, BackdoorConfig, backdoor_digits
from expunge.defenses.training import TrainConfig
from expunge.server.engine import Engine
from expunge.server.main import start
from expunge.server.settings import Settings
from expunge.server.state.datasets import synthetic_owners, validate
from expunge.server.state.store import Store
from tests.server.receipts import sample_digests


@pytest.fixture(scope="module")
def attack() -> AttackedDataset:
    return backdoor_digits(BackdoorConfig(source_label=1, seed=0))


@pytest.fixture(scope="module")
def backdoored_state(attack: AttackedDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("backdoored")
    n = len(attack.train_y)
    train = validate(
        attack.train_x.numpy().astype(np.float32),
        attack.train_y.numpy(),
        np.arange(n),
        synthetic_owners(n, 0),
    )
    clean = attack.clean_y.numpy()
    test = validate(
        attack.clean_x.numpy().astype(np.float32),
        clean,
        np.arange(n, n + len(clean)),
        np.full(len(clean), "-"),
        10,
    )
    store = Store(root)
    Engine(store, Settings(state_dir=root)).create_model(
        "bd", train, ArchitectureSpec("mlp", (1, 8, 8), 10), TrainConfig(epochs=30), test_set=test
    )
    store.close()
    return root


def _serve(state: Path, confirmation: str = "auto") -> object:
    running = start(Settings(state_dir=state, port=0, scan_confirmation=confirmation))
    with Client(running.target) as client:
        deadline = time.monotonic() + 120
        while client.get_model("bd").index.state != "READY":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    return running


@pytest.fixture
def scan_server(backdoored_state: Path, tmp_path: Path) -> Iterator[object]:
    state = tmp_path / "state"
    shutil.copytree(backdoored_state, state)
    running = _serve(state)
    yield running
    running.stop(0)  # type: ignore[attr-defined]


def _check_decisions(results: list[object]) -> None:
    """Every flag follows from the cuts the result reports, and its sentence names them."""
    for r in results:
        passed = r.p_value <= r.threshold  # type: ignore[attr-defined]
        assert (f"p-value {r.p_value:.3g}") in r.decision  # type: ignore[attr-defined]
        if not passed:
            assert r.counterfactual_drop == 0.0 and not r.flagged  # type: ignore[attr-defined]
            assert r.decision.endswith("not suspected") and not r.implicated  # type: ignore[attr-defined]
        if r.flagged:  # type: ignore[attr-defined]
            assert passed and r.counterfactual_drop >= r.drop_threshold  # type: ignore[attr-defined]
            assert r.control_drop < r.drop_threshold  # type: ignore[attr-defined]
            assert r.decision.endswith(  # type: ignore[attr-defined]
                "flagged" if r.p_value <= 0.05 else "no sample for mitigation)"  # type: ignore[attr-defined]
            )


def test_newton_confirmation_uses_the_calibrated_filter_and_drop(
    backdoored_state: Path, tmp_path: Path, attack: AttackedDataset
) -> None:
    state = tmp_path / "state"
    shutil.copytree(backdoored_state, state)
    running = _serve(state, "newton")
    try:
        inputs = np.concatenate([attack.target_x.numpy(), attack.clean_x.numpy()[:30]])
        with Client(running.target, timeout=600) as client:  # type: ignore[attr-defined]
            results = list(client.scan("bd", inputs.astype(np.float32)))
    finally:
        running.stop(0)  # type: ignore[attr-defined]
    clean = results[len(attack.target_x) :]
    assert sum(r.flagged for r in clean) <= 3
    _check_decisions(results)
    for r in results:
        assert r.threshold == 0.05 and r.drop_threshold >= 0.1  # strict filter, floored drop
        assert "Newton" in r.decision or r.decision.endswith("not suspected")
    # Measured: 7 of 10 targets flagged, 0 of 30 clean inputs.
    assert sum(r.flagged for r in results[: len(attack.target_x)]) >= 3


def test_scan_scores_targets_above_clean_inputs_and_implicates_poisons(
    scan_server: object, attack: AttackedDataset
) -> None:
    inputs = np.concatenate([attack.target_x.numpy(), attack.clean_x.numpy()[:30]]).astype(
        np.float32
    )
    with Client(scan_server.target, timeout=600) as client:  # type: ignore[attr-defined]
        estimate = client.estimate_scan("bd", inputs)
        assert (
            estimate.inputs == len(inputs)
            and estimate.training_samples == 1200
            and estimate.checkpoints == 10
        )
        assert not estimate.calibrated and estimate.estimated_calibration_seconds > 0
        assert estimate.estimated_mitigation_seconds == 0  # none asked for
        parts = (
            estimate.estimated_scoring_seconds
            + estimate.estimated_calibration_seconds
            + estimate.estimated_confirmation_seconds
        )
        assert estimate.estimated_seconds == pytest.approx(parts)
        results = list(client.scan("bd", inputs))
        # The version is calibrated now: a second estimate leaves calibration out.
        again = client.estimate_scan("bd", inputs, mitigate=True)
        assert again.calibrated and again.estimated_calibration_seconds == 0
        assert again.estimated_mitigation_seconds > 0
    assert [r.index for r in results] == list(range(len(inputs)))
    targets, clean = results[: len(attack.target_x)], results[len(attack.target_x) :]
    # p-values against the 100 clean calibration inputs: 1/101 is the smallest possible.
    assert all(1 / 101 <= r.p_value <= 1 for r in results)
    assert np.median([r.p_value for r in targets]) < np.median([r.p_value for r in clean])
    # The training side: the targets' top proponents are outliers of their class.
    assert np.median([r.group_outlier_z for r in targets]) > 3
    assert np.median([r.group_outlier_z for r in clean]) < 1
    poison = attack.poison_mask.numpy()
    implicated = [s.sample_id for r in targets if r.flagged for s in r.implicated]
    assert implicated and np.mean(poison[implicated]) > 0.8  # implicated samples are the poisons
    assert all(s.reason.startswith("top-") for r in targets for s in r.implicated)
    # 1,200 samples x 30 epochs: cheap enough that Scan confirms by retraining, after a
    # lenient first filter (p <= 0.5); the drop threshold is calibrated so that at most 5%
    # of clean calibration inputs would be flagged.
    assert all(r.threshold == 0.5 and "retrained" in r.decision for r in targets)
    # One estimator per threshold: the index was ready, so the calibration and every score
    # came from its embeddings, and the stored calibration's key says so.
    assert all("index influence" in r.decision for r in results)
    store = scan_server.engine.store  # type: ignore[attr-defined]
    stored = store.artefact("bd", "scan_calibration:gas:index:retrain:k2-10:ts-both10")
    assert stored is not None and stored.meta["source"] == "index"
    assert store.artefact("bd", "scan_calibration:gas:exact:retrain:k2-10:ts-both10") is None
    assert sum(r.flagged for r in clean) <= 3
    _check_decisions(results)
    assert sum(r.flagged for r in targets) >= 3  # measured: 7 of 10 targets, 1 of 30 clean


def test_mitigation_forgets_a_confirmed_attack_set_and_rescans(
    scan_server: object, attack: AttackedDataset
) -> None:
    targets = attack.target_x.numpy().astype(np.float32)
    poison = attack.poison_mask.numpy()
    with Client(scan_server.target, timeout=600) as client:  # type: ignore[attr-defined]
        planned = list(client.scan("bd", targets, dry_run=True))
        assert client.get_model("bd").current_version == 1  # a dry run forgets nothing
        plan = next(r.mitigation for r in planned if r.flagged)
        assert plan is not None and plan.dry_run and not plan.applied and not plan.operation
        assert all(r.mitigation is None for r in planned if not r.flagged)
        results = list(client.scan("bd", targets, mitigate=True, request_id="mitigate-1"))
        flagged = [r for r in results if r.flagged]
        assert [r.flagged for r in results] == [r.flagged for r in planned]  # same version
        mitigation = flagged[0].mitigation
        assert mitigation is not None and mitigation.applied and mitigation.new_version == 2
        assert mitigation.sample_ids == plan.sample_ids  # what the dry run announced
        assert all(r.mitigation.sample_ids == mitigation.sample_ids for r in flagged)  # type: ignore[union-attr]
        # Confirmed against its control: most flagged targets changed, the control's none.
        # The inputs naming the attack set: flagged ones with p <= 0.05.
        assert mitigation.targets == sum(r.p_value <= 0.05 for r in flagged) > 0
        assert 2 * mitigation.targets_affected >= mitigation.targets
        assert 4 * mitigation.control_affected < mitigation.targets_affected
        assert "confirmed" in mitigation.decision
        op = client.get_operation(mitigation.operation)
        assert op.state == "SUCCEEDED" and op.receipt is not None
        assert op.receipt.removed_sample_digests == sample_digests(
            scan_server.engine.store.root,  # type: ignore[attr-defined]
            mitigation.sample_ids,
        )
        # The attack set is the poisons (measured: 26 of 30 poisons, no clean sample).
        named = np.array(mitigation.sample_ids)
        assert poison[named].mean() >= 0.9 and poison[named].sum() >= 0.8 * poison.sum()
        # The rescan on the new version: the targets' predictions left the attack's label.
        changed = sum(r.mitigation.prediction_changed for r in flagged)  # type: ignore[union-attr]
        assert 2 * changed >= len(flagged)
        assert all(r.mitigation.p_value_after > 0 for r in flagged)  # type: ignore[union-attr]
        assert abs(mitigation.test_accuracy_after - mitigation.test_accuracy_before) < 0.05
        with pytest.raises(InvalidArgumentError, match="dry_run"):
            list(client.scan("bd", targets[:1], mitigate=True, dry_run=True, request_id="x"))


def test_bad_scans_are_refused_clearly(scan_server: object) -> None:
    good = np.zeros((1, 1, 8, 8), np.float32)
    with Client(scan_server.target) as client:  # type: ignore[attr-defined]
        with pytest.raises(InvalidArgumentError, match="empty"):
            list(client.scan("bd", np.zeros((0, 1, 8, 8), np.float32)))
        with pytest.raises(InvalidArgumentError, match="shape"):
            list(client.scan("bd", np.zeros((2, 64), np.float32)))
        with pytest.raises(InvalidArgumentError) as info:
            list(client.scan("bd", good, estimator="magic"))
        assert info.value.violations[0].field == "estimator"
        with pytest.raises(InvalidArgumentError, match="request_id"):
            list(client.scan("bd", good, mitigate=True, request_id=""))


def test_a_model_without_checkpoints_is_failed_precondition(scan_server: object) -> None:
    db = sqlite3.connect(Path(scan_server.settings.state_dir) / "expunge.db")  # type: ignore[attr-defined]
    db.execute("UPDATE models SET checkpoints_blob = NULL")
    db.commit()
    db.close()
    with Client(scan_server.target) as client:  # type: ignore[attr-defined]
        with pytest.raises(FailedPreconditionError, match="expunge train"):
            list(client.scan("bd", np.zeros((1, 1, 8, 8), np.float32)))


def test_the_gas_tracincp_ensemble_scores_targets_above_clean_inputs(
    scan_server: object, attack: AttackedDataset
) -> None:
    inputs = np.concatenate([attack.target_x.numpy(), attack.clean_x.numpy()[:30]])
    with Client(scan_server.target, timeout=600) as client:  # type: ignore[attr-defined]
        results = list(client.scan("bd", inputs.astype(np.float32), estimator="gas+tracincp"))
        single = list(client.scan("bd", inputs[:1].astype(np.float32), estimator="tracincp"))
    targets, clean = results[: len(attack.target_x)], results[len(attack.target_x) :]
    # Scores are surprises (-log clean tail share): a clean input sits near log(2).
    assert min(r.target_score for r in targets) > np.median([r.target_score for r in clean])
    assert sum(r.flagged for r in clean) <= 3
    # Each estimator has its own clean reference: the same input scores differently.
    assert results[0].target_score != single[0].target_score
    poison = attack.poison_mask.numpy()
    implicated = [s.sample_id for r in targets if r.flagged for s in r.implicated]
    assert implicated and np.mean(poison[implicated]) > 0.8
    _check_decisions(results)


def test_several_k_take_the_rarest_calibrated_score(
    scan_server: object, attack: AttackedDataset
) -> None:
    # The attack set's size is unknown, so Scan scores each input at k = 2 and 10 and keeps
    # the k whose score is rarer among the clean calibration inputs: check that against
    # the single-k scores combined explicitly.
    from expunge.defenses.gradients import predicted_labels
    from expunge.defenses.targets import calibrated_surprise
    from expunge.server.scan.service import ScanService
    from expunge.server.scan.settings import ScanSettings

    running = scan_server
    engine, forget = running.engine, running.forget  # type: ignore[attr-defined]
    test = engine.test_data("bd")
    clean_x = torch.from_numpy(test.features[:100])
    x = torch.from_numpy(np.concatenate([attack.target_x.numpy()[:5], test.features[100:105]]))
    multi = ScanService(engine, forget, forget.index, ScanSettings(ks=(2, 10)))
    labels = predicted_labels(engine.snapshot("bd").module, x)
    clean_labels = predicted_labels(engine.snapshot("bd").module, clean_x)
    got = [s for s, _ in multi._scores("bd", "gas", x, labels, "exact")]
    expected = []
    for k in (2, 10):
        single = ScanService(engine, forget, forget.index, ScanSettings(ks=(k,)))
        clean = [s for s, _ in single._scores("bd", "gas", clean_x, clean_labels, "exact")]
        scores = [s for s, _ in single._scores("bd", "gas", x, labels, "exact")]
        expected.append(calibrated_surprise(clean, scores))
    np.testing.assert_allclose(got, np.max(expected, axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="distinct positive"):
        ScanSettings(ks=(10, 10))
    with pytest.raises(ValueError, match="distinct positive"):
        ScanSettings(ks=())


def test_a_clean_model_scanned_with_mitigation_forgets_nothing(state_dir: Path) -> None:
    # The demo digits model has no attack: 200 clean held-out inputs (none of them the
    # calibration inputs) scanned with mitigate must leave the model as it was.
    running = start(Settings(state_dir=state_dir, port=0, build_index=False))
    try:
        test = running.engine.test_data("digits")
        inputs = test.features[100:300]
        assert len(inputs) == 200
        with Client(running.target, timeout=900) as client:
            results = list(client.scan("digits", inputs, mitigate=True, request_id="clean-1"))
            assert client.get_model("digits").current_version == 1
        assert len(results) == 200
        applied = [r for r in results if r.mitigation is not None and r.mitigation.applied]
        assert not applied
        # Measured: 6 of 200 flagged (3%, below the 5% calibrated rate); removing the 28
        # standing-out top proponents of all six changed only one of them, so the attack
        # set was refused and nothing was forgotten.
        assert sum(r.flagged for r in results) <= 10
        _check_decisions(results)
        assert running.engine.store.request("clean-1") is None  # no forget was journalled
    finally:
        running.stop(0)


def test_the_combination_setting_reaches_the_p_values_and_the_calibration_key(
    scan_server: object, attack: AttackedDataset
) -> None:
    # Scan's p-value merges the influence and training-side p-values by the configured
    # rule: check it against combined_p_values with that rule, and that each rule keeps
    # its own calibration artefact.
    from expunge.defenses.attack_sets import combined_p_values
    from expunge.defenses.gradients import predicted_labels
    from expunge.server.scan.service import ScanService
    from expunge.server.scan.settings import ScanSettings
    from expunge.server.settings import load_settings

    running = scan_server
    engine, forget = running.engine, running.forget  # type: ignore[attr-defined]
    test = engine.test_data("bd")
    x = torch.from_numpy(np.concatenate([attack.target_x.numpy()[:4], test.features[100:104]]))
    labels = predicted_labels(engine.snapshot("bd").module, x)
    kinds = set()
    for rule in ("fisher", "min"):
        service = ScanService(engine, forget, forget.index, ScanSettings(combination=rule))
        source = service._source("bd", "gas")
        mode = service.confirm.mode("bd")
        _, _, reference = service._clean_reference("bd", "gas", source, mode)
        scored = service._scores("bd", "gas", x, labels, source)
        scores = np.array([s for s, _ in scored])
        group_z = service._group_z("bd", scored, labels)
        p, _ = service.p_values(reference, scores, group_z)
        clean = [np.array(reference.clean_scores), np.array(reference.clean_group_z)]
        expected, _ = combined_p_values(clean, [scores, group_z], rule)
        np.testing.assert_array_equal(p, expected)
        kinds.add(service._kind("gas", source, mode))
    assert len(kinds) == 2 and any(k.endswith("-min") for k in kinds)
    with pytest.raises(ValueError, match="combination must be one of"):
        ScanSettings(combination="mean")
    with pytest.raises(ValueError, match="scan_combination must be"):
        load_settings(env={}, scan_combination="mean")
    assert load_settings(env={}).scan_combination == "fisher"


def test_the_outlier_space_setting_measures_class_outlier_z_where_it_says(
    scan_server: object,
) -> None:
    # representation: the penultimate features; input: the features themselves; both: the
    # larger z per sample. Checked against class_outlier_z computed here, and each space
    # keeps its own calibration artefact.
    from expunge.defenses.attack_sets import class_outlier_z
    from expunge.defenses.poison_filters import penultimate_features
    from expunge.server.scan.service import ScanService
    from expunge.server.scan.settings import ScanSettings
    from expunge.server.settings import load_settings

    running = scan_server
    engine, forget = running.engine, running.forget  # type: ignore[attr-defined]
    data = engine.training_data("bd")
    representations = penultimate_features(engine.snapshot("bd").module, data.features)
    in_representation = class_outlier_z(representations, data.labels)
    in_input = class_outlier_z(data.features.reshape(len(data.labels), -1).float(), data.labels)
    expected = {
        "representation": in_representation,
        "input": in_input,
        "both": torch.maximum(in_representation, in_input),
    }
    kinds = set()
    for space, z in expected.items():
        service = ScanService(engine, forget, forget.index, ScanSettings(outlier_space=space))
        torch.testing.assert_close(service._outlier_z("bd"), z)
        kinds.add(service._kind("gas", "index", "retrain"))
    assert len(kinds) == 3
    assert not torch.equal(in_representation, in_input)
    with pytest.raises(ValueError, match="outlier_space must be one of"):
        ScanSettings(outlier_space="pixels")
    with pytest.raises(ValueError, match="scan_outlier_space must be"):
        load_settings(env={}, scan_outlier_space="pixels")


def _dry_run_plans(
    backdoored_state: Path, targets: np.ndarray, tmp_path: Path, **variants: dict[str, Any]
) -> dict[str, Any]:
    """Each variant's mitigation plan of a dry run on a copy of the backdoored state,
    served with the variant's settings."""
    plans = {}
    for name, overrides in variants.items():
        state = tmp_path / f"state-{name}"
        shutil.copytree(backdoored_state, state)
        running = start(Settings(state_dir=state, port=0, build_index=False, **overrides))
        try:
            with Client(running.target, timeout=600) as client:
                results = list(client.scan("bd", targets, dry_run=True))
                assert client.get_model("bd").current_version == 1
                plans[name] = next(r for r in results if r.flagged).mitigation
        finally:
            running.stop(0)
    return plans


def test_shared_proponents_widen_the_planned_attack_set_and_say_why(
    backdoored_state: Path, attack: AttackedDataset, tmp_path: Path
) -> None:
    # scan_shared_proponents: the plan also names the samples the flagged inputs of one
    # class lean on together; the default plan's members stay (the members' reasons are
    # checked in tests/defenses/test_attack_sets.py). Cluster completion off in both.
    targets = attack.target_x.numpy().astype(np.float32)
    plans = _dry_run_plans(
        backdoored_state,
        targets,
        tmp_path,
        plain={"scan_shared_proponents": False, "scan_cluster_completion": False},
        shared={"scan_shared_proponents": True, "scan_cluster_completion": False},
    )
    plain, widened = plans["plain"], plans["shared"]
    assert plain is not None and widened is not None
    assert set(plain.sample_ids) <= set(widened.sample_ids)
    added = set(widened.sample_ids) - set(plain.sample_ids)
    assert added, "the premise: the flagged inputs share proponents beyond their top 10"
    poison = attack.poison_mask.numpy()
    assert poison[sorted(widened.sample_ids)].mean() >= 0.9


def test_cluster_completion_widens_a_confirmed_set_with_the_poisons_it_missed(
    backdoored_state: Path, attack: AttackedDataset, tmp_path: Path
) -> None:
    # Cluster completion (the default): a confirmed set also takes the samples that sit
    # with its members in their class; the widened set is planned only when its own
    # removal changes at least as many flagged inputs and passes its own random control.
    targets = attack.target_x.numpy().astype(np.float32)
    plans = _dry_run_plans(
        backdoored_state,
        targets,
        tmp_path,
        narrow={"scan_cluster_completion": False},
        widened={"scan_cluster_completion": True},
    )
    narrow, widened = plans["narrow"], plans["widened"]
    assert narrow is not None and widened is not None and "confirmed" in narrow.decision
    assert narrow.completion_added == 0 and not narrow.completion_kept
    assert widened.completion_added > 0, "the premise: the top proponents missed poisons"
    assert widened.completion_kept, widened.decision
    assert widened.completion_affected >= widened.targets_affected
    assert 4 * widened.completion_control_affected < widened.completion_affected
    assert set(narrow.sample_ids) < set(widened.sample_ids)
    added = sorted(set(widened.sample_ids) - set(narrow.sample_ids))
    assert len(added) == widened.completion_added
    assert f"{widened.completion_added} more samples sit with its members" in widened.decision
    poison = attack.poison_mask.numpy()
    assert poison[added].all()  # every sample it added is a poison
    assert poison[sorted(widened.sample_ids)].sum() > poison[sorted(narrow.sample_ids)].sum()


def test_the_matched_control_applies_the_attack_set_rule_to_the_most_moved_clean_inputs(
    scan_server: object, attack: AttackedDataset
) -> None:
    # The matched control: the calibration inputs whose own proponents' removal moved them
    # most (the calibration's stored drops), given an attack set by the same rule. Under
    # scan_mitigation_rule = "matched" a set is forgotten only when it changes more than
    # twice the share of those clean analogues that their set changes: with the suspects
    # themselves as their own analogues the shares are equal, so it never is.
    from expunge.server.scan.service import ScanService
    from expunge.server.scan.settings import ScanSettings
    from expunge.server.settings import load_settings

    running = scan_server
    engine, forget = running.engine, running.forget  # type: ignore[attr-defined]
    service = ScanService(engine, forget, forget.index, ScanSettings(mitigation_rule="matched"))
    calibration = service.threshold("bd", "gas")
    x = attack.target_x.float()
    version = engine.snapshot("bd").version
    suspects = [s for _, s in service._decide("bd", "gas", calibration, version, x, 0, 10) if s]
    assert len(suspects) >= 2, "the premise: the backdoor's targets are flagged"
    outliers = service._outlier_z("bd")

    analogues = service._clean_analogues("bd", "gas", calibration, len(suspects))
    drops = np.array(calibration.clean_drops)
    finite = np.flatnonzero(np.isfinite(drops))
    expected = finite[np.argsort(-drops[finite], kind="stable")][: len(suspects)]
    assert [-1 - a.index for a in analogues] == expected.tolist()
    assert len(analogues) == min(len(suspects), len(finite)) > 0

    alone = service.mitigator.plan("bd", suspects, calibration, outliers, lambda k: [])
    assert alone.analogues == alone.analogues_affected == 0
    assert alone.confirmed == (alone.affected >= 2 and 4 * alone.control_affected < alone.affected)
    assert alone.confirmed, "measured: the backdoor's attack set changes its targets"
    mirrored = service.mitigator.plan("bd", suspects, calibration, outliers, lambda k: suspects[:k])
    assert mirrored.analogues == len(suspects)
    assert mirrored.analogues_affected == mirrored.affected == alone.affected
    assert not mirrored.confirmed
    assert "matched control" in mirrored.decision()
    with pytest.raises(ValueError, match="mitigation_rule must be one of"):
        ScanSettings(mitigation_rule="vote")
    with pytest.raises(ValueError, match="scan_mitigation_rule must be"):
        load_settings(env={}, scan_mitigation_rule="vote")
