"""A model imported with a loss other than plain cross-entropy: every figure and update
uses that loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from expunge.client import Client
from expunge.defenses.task import CrossEntropy, task_of
from expunge.server.errors import InvalidArgument
from expunge.server.main import start
from expunge.server.settings import Settings
from expunge.server.state.repository import read_repository
from tests.server.losses import SquaredLogits
from tests.server.test_import import _write_repository

TRUSTED = {
    "squared_logits": "tests.server.losses:squared_logits",
    "not_a_task": "tests.server.losses:not_a_task",
}


def _with_loss(root: Path, lines: str) -> Path:
    _write_repository(root, training=True, checkpoints=True)
    manifest = (root / "expunge.toml").read_text()
    (root / "expunge.toml").write_text(manifest.replace("[objective]\n", f"[objective]\n{lines}\n"))
    return root


@pytest.mark.parametrize(
    ("lines", "expected"),
    [('loss = "squared_logits"', SquaredLogits()), ("label_smoothing = 0.1", CrossEntropy(0.1))],
    ids=["trusted-task", "label-smoothing"],
)
def test_an_imported_models_figures_and_forgets_use_its_own_loss(
    tmp_path: Path, lines: str, expected: object
) -> None:
    repo = _with_loss(tmp_path / "repo", lines)
    settings = Settings(state_dir=tmp_path / "state", port=0, build_index=False,
                        trusted_factories=TRUSTED)  # fmt: skip
    running = start(settings)
    try:
        engine = running.engine  # type: ignore[attr-defined]
        engine.import_model("cancer", read_repository(repo, TRUSTED))
        snapshot = engine.snapshot("cancer")
        assert task_of(snapshot.module).name == expected.name  # type: ignore[attr-defined]
        test = engine.test_data("cancer")
        x, y = torch.from_numpy(test.features), torch.from_numpy(test.labels)
        with torch.no_grad():
            own = float(expected.sample_loss(snapshot.module(x), y).double().mean())  # type: ignore[attr-defined]
        assert engine.version_row("cancer", 1).metrics["test_loss"] == pytest.approx(own, rel=1e-6)
        with Client(running.target, timeout=600) as client:
            owner = str(engine.training_data("cancer").owner_ids[0])
            op = client.forget("cancer", owner_ids=[owner], selection="all", wait=True)
            assert op.state == "SUCCEEDED" and op.receipt is not None
            data = engine.training_data("cancer")
            # The compute process rebuilt the model with the same loss: the new version's
            # figures are that loss's too.
            after = engine.snapshot("cancer").module
            assert task_of(after).name == expected.name  # type: ignore[attr-defined]
            with torch.no_grad():
                mine = float(expected.sample_loss(after(x), y).double().mean())  # type: ignore[attr-defined]
            new = engine.version_row("cancer", op.receipt.new_version)
            assert new.metrics["test_loss"] == pytest.approx(mine, rel=1e-6)
            assert len(data.labels) == 455 - op.receipt.removed_samples
            # An exact retrain trains under it as well.
            retrained = client.retrain("cancer", wait=True)
            assert retrained.state == "SUCCEEDED"
            assert task_of(engine.snapshot("cancer").module).name == expected.name  # type: ignore[attr-defined]
            assert list(client.scan("cancer", test.features[:2]))  # scan runs under it too
    finally:
        running.stop(0)


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ('loss = "focal"', r"\[objective\] loss: loss 'focal' is neither built in"),
        ('loss = "not_a_task"', r"\[objective\] loss: .* did not return a Task"),
        ("label_smoothing = 1.5", r"\[objective\]: label_smoothing must lie in \[0, 1\)"),
        (
            'loss = "squared_logits"\nlabel_smoothing = 0.1',
            "applies to the cross_entropy loss only",
        ),
    ],
)
def test_a_loss_the_server_does_not_trust_is_refused_naming_the_field(
    tmp_path: Path, lines: str, match: str
) -> None:
    repo = _with_loss(tmp_path / "repo", lines)
    with pytest.raises(InvalidArgument, match=match):
        read_repository(repo, TRUSTED)
    assert np.load(repo / "train.npz")["labels"].size  # the repository itself was fine
