"""Forget through the real server and client: durable, idempotent, purging, audited."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from expunge.client import (
    AlreadyExistsError,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from tests.server.receipts import owner_digests, sample_digests


def _owner_with_samples(state_dir: Path, minimum: int = 3) -> tuple[str, list[int]]:
    db = sqlite3.connect(state_dir / "expunge.db")
    owner = db.execute(
        "SELECT owner_id FROM samples GROUP BY owner_id HAVING COUNT(*) >= ? ORDER BY owner_id LIMIT 1",
        (minimum,),
    ).fetchone()[0]
    ids = [r[0] for r in db.execute("SELECT sample_id FROM samples WHERE owner_id = ?", (owner,))]
    db.close()
    return owner, sorted(ids)


def test_forgetting_an_owner_purges_and_versions(
    client: Client, server: object, state_dir: Path
) -> None:
    owner, ids = _owner_with_samples(state_dir)
    before = client.get_model("digits")
    old_shard = server.engine.model_row("digits").train_blob  # type: ignore[attr-defined]
    phases: list[str] = []
    op = client.forget(
        "digits",
        owner_ids=[owner],
        request_id="r-owner",
        selection="lcodec_cg",
        wait=True,
        on_progress=lambda o: phases.append(o.phase),
    )
    assert op.state == "SUCCEEDED" and op.done and op.receipt is not None
    receipt = op.receipt
    assert receipt.parent_version == 1 and receipt.new_version == 2
    assert receipt.removed_sample_digests == sample_digests(state_dir, ids)
    assert receipt.removed_owner_digests == owner_digests(state_dir, [owner])
    assert (receipt.removed_samples, receipt.removed_owners) == (len(ids), 1)
    assert 0 < receipt.parameters_updated <= receipt.parameters_total
    assert receipt.weights_sha256 and "torch" in receipt.environment
    assert receipt.certificate.statement
    # The receipt says how the update was computed (the targeted path's defaults).
    method = receipt.method
    assert (method.selection, method.hessian) == ("lcodec_cg", "exact")
    # The budget (25%) is a floor: the selection grew to hold 99% of the ranked step.
    assert method.parameter_budget == int(0.25 * receipt.parameters_total)
    assert method.step_coverage == 0.99
    assert method.parameter_budget <= receipt.parameters_updated <= method.candidate_parameters
    assert (method.newton_iterations, method.damping_floor) == (8, 1e-3)
    assert 1 <= method.newton_iterations_taken <= 8
    assert (method.hessian_samples, method.objective_samples) == (2000, 0)
    assert (method.ranking_hessian_samples, method.ranking_cg_iterations) == (2000, 20)
    assert method.ranking_newton_iterations == 3
    # The ranking chose from the L-CODEC pool (units filling 3x the budget, then grown).
    assert method.parameter_budget < method.candidate_parameters <= receipt.parameters_total
    assert 0.0 <= receipt.after.mia_auc <= 1.0 and receipt.after.test_accuracy > 0.7
    after = client.get_model("digits")
    assert after.current_version == 2
    assert after.num_training_samples == before.num_training_samples - len(ids)
    assert after.forgotten_samples == len(ids)
    # The raw rows are gone: the old shard file is deleted and no row names the owner.
    assert not server.engine.store.blobs.exists(old_shard)  # type: ignore[attr-defined]
    data = server.engine.training_data("digits")  # type: ignore[attr-defined]
    assert not set(ids) & set(data.sample_ids.tolist())
    assert owner not in set(data.owner_ids.tolist())
    db = sqlite3.connect(state_dir / "expunge.db")
    assert (
        db.execute("SELECT COUNT(*) FROM samples WHERE owner_id = ?", (owner,)).fetchone()[0] == 0
    )
    db.close()
    # Phases were streamed.
    assert "done" in phases or op.phase == "done"
    # The version it was trained on cannot come back.
    versions = client.list_versions("digits")
    assert [v.version for v in versions] == [1, 2] and versions[0].superseded_by_forget
    assert versions[1].created_by == "r-owner" and versions[1].parent_version == 1
    with pytest.raises(FailedPreconditionError, match="forgotten since"):
        client.rollback("digits", 1)
    with pytest.raises(FailedPreconditionError):
        client.predict("digits", np.zeros((1, 1, 8, 8), np.float32), version=1)
    events = [e for e in client.audit("digits") if e.action == "forget"]
    assert events and events[-1].details["removed_samples"] == len(ids)
    assert "features" not in str(events[-1].details)


def test_request_ids_make_retries_safe(client: Client, state_dir: Path) -> None:
    _, ids = _owner_with_samples(state_dir)
    first = client.forget("digits", sample_ids=ids[:1], request_id="same", wait=True)
    again = client.forget("digits", sample_ids=ids[:1], request_id="same", wait=True)
    assert first.receipt == again.receipt and again.receipt is not None
    assert [v.version for v in client.list_versions("digits")] == [1, 2]
    with pytest.raises(AlreadyExistsError, match="different request"):
        client.forget("digits", sample_ids=ids[1:2], request_id="same")


def test_unknown_ids_are_not_found_and_nothing_is_applied(client: Client, state_dir: Path) -> None:
    _, ids = _owner_with_samples(state_dir)
    with pytest.raises(NotFoundError, match=r"999999") as info:
        client.forget("digits", sample_ids=[ids[0], 999999], owner_ids=["nobody"], request_id="bad")
    assert "nobody" in info.value.message
    assert client.get_model("digits").current_version == 1
    with pytest.raises(NotFoundError):
        client.get_operation("bad")


def test_already_forgotten_is_a_success_that_says_so(client: Client, state_dir: Path) -> None:
    owner, ids = _owner_with_samples(state_dir)
    client.forget("digits", owner_ids=[owner], request_id="a1", wait=True)
    op = client.forget("digits", sample_ids=ids[:2], owner_ids=[owner], request_id="a2", wait=True)
    assert op.state == "SUCCEEDED" and op.receipt is not None
    assert op.receipt.already_forgotten_sample_digests == sample_digests(state_dir, ids[:2])
    assert op.receipt.already_forgotten_owner_digests == owner_digests(state_dir, [owner])
    assert op.receipt.removed_samples == 0
    assert "already" in op.receipt.note
    assert client.get_model("digits").current_version == 2
    # Mixed with a new owner: that one is removed, the old one listed as already gone.
    other = _owner_with_samples(state_dir)[0]
    assert other != owner
    mixed = client.forget("digits", owner_ids=[owner, other], request_id="a3", wait=True)
    assert mixed.receipt is not None and mixed.receipt.new_version == 3
    assert mixed.receipt.removed_owner_digests == owner_digests(state_dir, [other])
    assert mixed.receipt.already_forgotten_owner_digests == owner_digests(state_dir, [owner])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "sample_ids"),
        ({"sample_ids": [1], "selection": "magic"}, "options.selection"),
        (
            {"sample_ids": [1], "selection": "all", "parameter_budget": 10},
            "options.parameter_budget",
        ),
        ({"sample_ids": [1], "epsilon": 1.0}, "options.delta"),
        ({"sample_ids": [1], "epsilon": 2.0, "delta": 1e-5}, "options.epsilon"),
        ({"sample_ids": [1], "epsilon": float("nan"), "delta": 1e-5}, "options.epsilon"),
        ({"sample_ids": [1], "delta": 0.1}, "options.delta"),
        ({"sample_ids": [1], "newton_iterations": 99}, "options.newton_iterations"),
    ],
)
def test_bad_forget_requests_are_invalid_argument(client: Client, kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        client.forget("digits", request_id="x", **kwargs)
    assert info.value.violations[0].field == field


def test_predict_keeps_answering_while_a_forget_runs(
    client: Client, server: object, state_dir: Path
) -> None:
    owner, _ = _owner_with_samples(state_dir)
    inputs = server.engine.test_data("digits").features[:8]  # type: ignore[attr-defined]
    answered: list[int] = []
    stop = threading.Event()

    def keep_predicting() -> None:
        with Client(server.target) as other:  # type: ignore[attr-defined]
            while not stop.is_set():
                answered.append(other.predict("digits", inputs).version)

    thread = threading.Thread(target=keep_predicting)
    thread.start()
    try:
        client.forget("digits", owner_ids=[owner], request_id="concurrent", wait=True)
    finally:
        stop.set()
        thread.join()
    assert answered and set(answered) <= {1, 2}


def test_cancel_a_queued_request(client: Client, state_dir: Path, server: object) -> None:
    owner, ids = _owner_with_samples(state_dir)
    # Hold the worker so the second request stays queued.
    jobs = server.forget.jobs  # type: ignore[attr-defined]
    with server.engine.store.write_lock:  # type: ignore[attr-defined]
        client.forget("digits", owner_ids=[owner], request_id="first")
        queued = client.forget("digits", sample_ids=[ids[0]], request_id="second")
        assert queued.state == "PENDING"
        cancelled = client.cancel_operation("second")
        assert cancelled.state == "CANCELLED" and cancelled.done
    assert jobs.wait_idle(120)
    assert client.get_operation("second").state == "CANCELLED"
    assert client.get_operation("first").state == "SUCCEEDED"


def test_an_interrupted_request_is_redone_before_serving(state_dir: Path) -> None:
    from expunge.server.forget.computation import UnlearningOptions
    from expunge.server.forget.requests import ForgetPayload
    from expunge.server.main import start
    from expunge.server.settings import Settings
    from expunge.server.state.store import Store

    owner, ids = _owner_with_samples(state_dir)
    payload = ForgetPayload("digits", (), (owner,), UnlearningOptions())
    store = Store(state_dir)
    with store.transaction() as tx:  # as a crash mid-apply leaves it
        tx.insert_request(
            "crashed",
            "digits",
            "forget",
            store.identifiers.payload_digest(payload.to_dict()),
            {**payload.to_dict(), "actor": "t"},
        )
        tx.set_request_state("crashed", "APPLYING")
    store.close()
    running = start(Settings(state_dir=state_dir, port=0))
    try:
        with Client(running.target) as client:
            assert client.health() == "SERVING"
            op = client.get_operation("crashed")
            assert op.state == "SUCCEEDED" and op.receipt is not None
            assert op.receipt.removed_sample_digests == sample_digests(state_dir, ids)
            assert client.get_model("digits").current_version == 2
    finally:
        running.stop(0)


def test_the_same_forget_under_another_request_id_gives_the_same_weights(
    state_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from expunge.server.main import start
    from expunge.server.settings import Settings

    owner, _ = _owner_with_samples(state_dir)
    twin = tmp_path / "twin"
    shutil.copytree(state_dir, twin)  # the same model version and the same state secret
    hashes = []
    for root, request_id in ((state_dir, "first-id"), (twin, "another-id")):
        running = start(Settings(state_dir=root, port=0, build_index=False))
        try:
            with Client(running.target) as client:
                op = client.forget("digits", owner_ids=[owner], request_id=request_id, wait=True)
                assert op.state == "SUCCEEDED" and op.receipt is not None
                hashes.append((op.receipt.weights_sha256, op.receipt.method.seed))
        finally:
            running.stop(5)
    assert hashes[0] == hashes[1]


def test_the_large_data_profile_reaches_the_computation(state_dir: Path) -> None:
    # Settings -> the child process computing the forget -> the receipt.
    from expunge.defenses.recipe import ForgetRecipe
    from expunge.defenses.training import TrainConfig
    from expunge.server.forget.computation import metric_subset
    from expunge.server.forget.requests import request_seed
    from expunge.server.main import start
    from expunge.server.settings import Settings

    owner, ids = _owner_with_samples(state_dir)
    profile = Settings(
        state_dir=state_dir,
        port=0,
        forget_hessian_samples=512,
        forget_objective_samples=256,
        forget_ranking_hessian_samples=128,
        forget_ranking_cg_iterations=5,
        forget_newton_iterations=2,
        forget_ranking_newton_iterations=1,
        forget_step_coverage=0.0,
    )
    running = start(profile)
    try:
        with Client(running.target) as client:
            op = client.forget(
                "digits",
                owner_ids=[owner],
                hessian="gauss_newton",
                selection="lcodec_cg",
                request_id="large",
                wait=True,
            )
            assert op.state == "SUCCEEDED" and op.receipt is not None
            assert op.receipt.removed_sample_digests == sample_digests(state_dir, ids)
            method = op.receipt.method
            assert method.hessian == "gauss_newton"
            assert (method.hessian_samples, method.objective_samples) == (512, 256)
            assert (method.ranking_hessian_samples, method.ranking_cg_iterations) == (128, 5)
            # The request left newton_iterations at 0: the server's setting applies.
            assert (method.newton_iterations, method.ranking_newton_iterations) == (2, 1)
            # Step coverage 0: the selection is exactly the budget.
            assert method.step_coverage == 0.0
            assert op.receipt.parameters_updated == method.parameter_budget
            assert method.newton_iterations_taken <= 2
            digest = running.engine.store.request("large").payload_sha256
            assert method.seed == request_seed(digest, 1)
            # The new version's training figures are measured on the same subsample as
            # the receipt's retained figures, and say so.
            metrics = running.engine.version_row("digits", op.receipt.new_version).metrics
            assert metrics["train_metrics_samples"] == 256
            assert metrics["train_accuracy"] == op.receipt.after.retained_accuracy
            assert metrics["test_accuracy"] == op.receipt.after.test_accuracy
            # The figures equal a pass of their own over the same data and weights.
            engine = running.engine
            model = engine.snapshot("digits", op.receipt.new_version).module
            retained = engine.training_data("digits")
            sub_x, sub_y = metric_subset(
                retained.features,
                retained.labels,
                ForgetRecipe(objective_samples=256, seed=method.seed),
            )
            weight_decay = TrainConfig.from_dict(engine.model_row("digits").train_config)
            own, _ = engine.evaluate(
                model, sub_x, sub_y, engine.test_data("digits"), weight_decay.weight_decay
            )
            for key in ("train_accuracy", "test_accuracy", "train_objective", "test_loss"):
                assert metrics[key] == pytest.approx(own[key], rel=1e-5, abs=1e-7), key
    finally:
        running.stop(0)


def test_a_forget_measures_the_served_version_once(
    client: Client, server: object, state_dir: Path
) -> None:
    # The served version's test-set measurement is kept (at start-up and at each commit)
    # and reused as the next forget's "before": the same figures a fresh pass gives.
    import torch

    from expunge.defenses.evaluate import measure_set

    engine = server.engine  # type: ignore[attr-defined]
    owners = sorted({o for o in engine.training_data("digits").owner_ids})
    first = client.forget("digits", owner_ids=[owners[0]], selection="lcodec_cg", wait=True)
    assert first.receipt is not None
    kept = engine.test_measurement("digits", first.receipt.new_version)
    assert kept is not None
    test = engine.test_data("digits")
    fresh = measure_set(
        engine.snapshot("digits", first.receipt.new_version).module,
        torch.from_numpy(test.features),
        torch.from_numpy(test.labels),
    )
    assert torch.equal(kept.losses, fresh.losses) and kept.accuracy == fresh.accuracy
    second = client.forget("digits", owner_ids=[owners[1]], selection="lcodec_cg", wait=True)
    assert second.receipt is not None
    assert second.receipt.before.test_accuracy == first.receipt.after.test_accuracy == kept.accuracy
