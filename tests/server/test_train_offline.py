"""``train_model`` (behind ``expunge train``): the held-out set is a given file or a stated fraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from expunge.server.errors import InvalidArgument
from expunge.server.settings import Settings
from expunge.server.state.datasets import builtin
from expunge.server.training_job import train_model


def _save(path: Path, rows: slice) -> Path:
    data = builtin("wine")
    np.savez(
        path,
        features=data.features[rows],
        labels=data.labels[rows],
        sample_ids=data.sample_ids[rows],
        owner_ids=data.owner_ids[rows],
    )
    return path


def test_a_given_test_set_is_used_whole_and_nothing_is_held_out(tmp_path: Path) -> None:
    train, test = (
        _save(tmp_path / "train.npz", slice(0, 140)),
        _save(tmp_path / "t.npz", slice(140, None)),
    )
    state = tmp_path / "state"
    info = train_model(
        state,
        "wine",
        str(train),
        "logreg",
        epochs=2,
        settings=Settings(state_dir=state),
        test=str(test),
    )
    assert info.version.num_samples == 140


def test_the_fraction_held_out_is_the_one_asked_for(tmp_path: Path) -> None:
    state = tmp_path / "state"
    info = train_model(
        state,
        "wine",
        "wine",
        "logreg",
        epochs=2,
        settings=Settings(state_dir=state),
        test_fraction=0.5,
    )
    assert info.version.num_samples == round(len(builtin("wine")) * 0.5)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", inputs=np.zeros(3))
    (tmp_path / "junk.npz").write_text("not an archive")
    cases = {
        str(tmp_path / "missing.npz"): "missing.npz: no such file",
        str(tmp_path / "bad.npz"): r"bad.npz: the .npz lacks arrays .* \(it has \['inputs'\]\)",
        str(tmp_path / "junk.npz"): "junk.npz: not an .npz archive",
    }
    for path, message in cases.items():
        with pytest.raises(InvalidArgument, match=message):
            train_model(tmp_path / "state", "m", path, "logreg", epochs=1)
