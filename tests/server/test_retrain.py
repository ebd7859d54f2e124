"""Exact retrain: a new version trained from scratch on what is left, and a fresh budget."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from expunge.client import AlreadyExistsError, Client, NotFoundError
from expunge.client.cli import main as cli_main


def _owners(state_dir: Path, count: int) -> list[str]:
    db = sqlite3.connect(state_dir / "expunge.db")
    rows = db.execute(
        "SELECT owner_id FROM samples GROUP BY owner_id ORDER BY owner_id LIMIT ?", (count,)
    ).fetchall()
    db.close()
    return [r[0] for r in rows]


def test_a_retrain_starts_a_fresh_budget_on_the_retained_data(
    client: Client, server: object, state_dir: Path
) -> None:
    engine = server.engine  # type: ignore[attr-defined]
    first, second = _owners(state_dir, 2)
    spent = client.forget(
        "digits", owner_ids=[first], request_id="f1", selection="lcodec_cg", wait=True
    ).receipt
    assert spent is not None and spent.certificate.budget_used > 0
    old_checkpoints = engine.model_row("digits").checkpoints_blob
    remaining = client.get_model("digits").num_training_samples

    phases: list[str] = []
    op = client.retrain(
        "digits", request_id="r1", wait=True, on_progress=lambda o: phases.append(o.phase)
    )
    assert op.kind == "retrain" and op.state == "SUCCEEDED"
    assert op.receipt is None and op.retrain_receipt is not None
    r = op.retrain_receipt
    assert (r.parent_version, r.new_version) == (2, 3)
    assert r.training_samples == remaining
    assert r.test_accuracy > 0.8 and r.parent_test_accuracy > 0.8
    assert r.budget_total == spent.certificate.budget_total and r.seconds > 0
    assert "done" in phases
    model = client.get_model("digits")
    assert model.current_version == 3 and model.num_training_samples == remaining
    # The retrained weights are new, and the checkpoints that saw the forgotten owner
    # are replaced and deleted from disk.
    assert r.weights_sha256 != spent.weights_sha256
    assert engine.model_row("digits").checkpoints_blob != old_checkpoints
    assert not engine.store.blobs.exists(old_checkpoints)
    assert [e.action for e in client.audit("digits")].count("retrain") == 1

    # The next forget spends from a fresh ledger: its use is its own residual alone.
    after = client.forget(
        "digits", owner_ids=[second], request_id="f2", selection="lcodec_cg", wait=True
    ).receipt
    assert after is not None and after.parent_version == 3
    cert = after.certificate
    # In the units the noise is calibrated to: r / lambda (the model's weight decay 1e-3).
    assert cert.budget_used == pytest.approx(cert.residual_norm_all / 1e-3)
    assert cert.budget_remaining == pytest.approx(cert.budget_total - cert.budget_used)


def test_retrain_requests_are_idempotent_and_checked(client: Client) -> None:
    op = client.retrain("digits", request_id="same", wait=True)
    again = client.retrain("digits", request_id="same", wait=True)
    assert again.name == op.name and again.retrain_receipt == op.retrain_receipt
    assert client.get_model("digits").current_version == 2
    with pytest.raises(AlreadyExistsError, match="different request"):
        client.forget("digits", sample_ids=[1], request_id="same")
    with pytest.raises(NotFoundError):
        client.retrain("nosuch", request_id="other")


def test_cli_retrains_with_progress(server: object, capsys: pytest.CaptureFixture[str]) -> None:
    target = server.target  # type: ignore[attr-defined]
    assert cli_main(["--target", target, "retrain", "--request-id", "cli-r"]) == 0
    out, err = capsys.readouterr()
    assert "operations/cli-r: SUCCEEDED" in out
    assert "version 1 -> 2: retrained on" in out and "noise budget reset to" in out
    assert err.rstrip().splitlines()[-1] == "operations/cli-r: SUCCEEDED done"


def test_a_spent_budget_is_said_and_a_retrain_restores_it(state_dir: Path) -> None:
    from expunge.server.main import start
    from expunge.server.settings import Settings

    first, second = _owners(state_dir, 2)
    # A budget far below one forget's residual: the first forget spends it.
    running = start(Settings(state_dir=state_dir, port=0, forget_budget=1e-9))
    try:
        with Client(running.target) as client:
            spent = client.forget(
                "digits", owner_ids=[first], request_id="s1", selection="lcodec_cg", wait=True
            )
            assert spent.state == "SUCCEEDED" and spent.receipt is not None
            assert spent.receipt.certificate.budget_exhausted
            assert "budget is spent" in spent.receipt.note and "retrain" in spent.receipt.note
            assert client.retrain("digits", request_id="s2", wait=True).state == "SUCCEEDED"
            # Still applied after a retrain, and the ledger starts again from nothing.
            after = client.forget(
                "digits", owner_ids=[second], request_id="s3", selection="lcodec_cg", wait=True
            )
            assert after.receipt is not None and after.receipt.parent_version == 3
            cert = after.receipt.certificate
            assert cert.budget_used == pytest.approx(cert.residual_norm_all / 1e-3)
    finally:
        running.stop(0)


def test_the_same_retrain_gives_the_same_bytes(trained_state: Path, tmp_path: Path) -> None:
    # Two servers on two copies of the same state: the retrain's weights are identical,
    # and equal to version 1's (the same data, architecture, config and seed).
    import shutil

    from expunge.server.main import start
    from expunge.server.settings import Settings

    digests = []
    for copy_name in ("a", "b"):
        state = tmp_path / copy_name
        shutil.copytree(trained_state, state)
        running = start(Settings(state_dir=state, port=0))
        try:
            with Client(running.target) as client:
                op = client.retrain("digits", request_id="same-retrain", wait=True)
                assert op.retrain_receipt is not None
                digests.append(op.retrain_receipt.weights_sha256)
                original = running.engine.version_row("digits", 1).weights_blob
        finally:
            running.stop(0)
    assert digests[0] == digests[1] == original
