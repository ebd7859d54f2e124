"""Scan through the real server on a backdoored digits model (ground truth from the attack suite)."""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

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
    for r in results:
        if r.flagged:  # the drop threshold is calibrated, never below the 0.1 floor
            assert r.target_score >= r.threshold and r.counterfactual_drop >= 0.1
        if r.target_score < r.threshold:
            assert r.counterfactual_drop == 0.0 and not r.flagged
    assert any(r.target_score >= r.threshold for r in results[: len(attack.target_x)])


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
        results = list(client.scan("bd", inputs))
    assert [r.index for r in results] == list(range(len(inputs)))
    targets, clean = results[: len(attack.target_x)], results[len(attack.target_x) :]
    assert np.median([r.target_score for r in targets]) > np.median([r.target_score for r in clean])
    implicated = [s.sample_id for r in targets for s in r.implicated]
    poison = attack.poison_mask.numpy()
    assert implicated and np.mean(poison[implicated]) > 0.8  # implicated samples are the poisons
    assert all(r.threshold == results[0].threshold for r in results)
    # 1,200 samples x 30 epochs: cheap enough that Scan confirms by retraining, after a
    # lenient first filter (half the clean calibration inputs pass it); the drop threshold
    # is calibrated so that at most 5% of clean calibration inputs are flagged.
    assert sum(r.flagged for r in clean) <= 3
    for r in results:
        if r.flagged:
            assert r.target_score >= r.threshold and r.counterfactual_drop >= 0.5
        elif r.target_score < r.threshold:
            assert r.counterfactual_drop == 0.0  # filtered out: no removal was computed
    assert sum(r.flagged for r in targets) >= 3  # measured: 5 of 10 targets, 0 of 30 clean


def test_mitigation_forgets_the_implicated_samples(
    scan_server: object, attack: AttackedDataset
) -> None:
    with Client(scan_server.target, timeout=600) as client:  # type: ignore[attr-defined]
        results = list(client.scan("bd", attack.target_x.numpy().astype(np.float32)))
        flagged = [r for r in results if r.flagged]
        assert flagged, "no target confirmed: nothing to mitigate"
        strongest = max(flagged, key=lambda r: r.counterfactual_drop).index
        x = attack.target_x.numpy()[strongest : strongest + 1].astype(np.float32)
        (result,) = client.scan("bd", x, mitigate=True, request_id="mitigate-1")
        assert result.flagged  # same version, same calibration: the same decision
        assert result.mitigation is not None and result.mitigation.new_version == 2
        op = client.get_operation(result.mitigation.operation)
        assert op.state == "SUCCEEDED" and op.receipt is not None
        assert op.receipt.removed_sample_digests == sample_digests(
            scan_server.engine.store.root,  # type: ignore[attr-defined]
            (s.sample_id for s in result.implicated),
        )
        assert (
            abs(result.mitigation.test_accuracy_after - result.mitigation.test_accuracy_before)
            < 0.05
        )


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
    assert results[0].threshold != single[0].threshold  # its own calibration
    poison = attack.poison_mask.numpy()
    implicated = [s.sample_id for r in targets for s in r.implicated]
    assert implicated and np.mean(poison[implicated]) > 0.8


def test_several_k_take_the_rarest_calibrated_score(
    scan_server: object, attack: AttackedDataset
) -> None:
    # The attack set's size is unknown, so Scan scores each input at k = 2 and 10 and keeps
    # the k whose score is rarer among the clean calibration inputs: check that against
    # the single-k scores combined explicitly.
    from expunge.defenses.targets import calibrated_surprise
    from expunge.server.scan.service import ScanService
    from expunge.server.scan.settings import ScanSettings

    running = scan_server
    engine, forget = running.engine, running.forget  # type: ignore[attr-defined]
    test = engine.test_data("bd")
    clean_x = torch.from_numpy(test.features[:100])
    x = torch.from_numpy(np.concatenate([attack.target_x.numpy()[:5], test.features[100:105]]))
    multi = ScanService(engine, forget, forget.index, ScanSettings(ks=(2, 10)))
    got = [s for s, _ in multi._scores("bd", "gas", x)]
    expected = []
    for k in (2, 10):
        single = ScanService(engine, forget, forget.index, ScanSettings(ks=(k,)))
        clean = [s for s, _ in single._scores("bd", "gas", clean_x)]
        scores = [s for s, _ in single._scores("bd", "gas", x)]
        expected.append(calibrated_surprise(clean, scores))
    np.testing.assert_allclose(got, np.max(expected, axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="distinct positive"):
        ScanSettings(ks=(10, 10))
    with pytest.raises(ValueError, match="distinct positive"):
        ScanSettings(ks=())
