"""A model repository's data as Parquet beside .npz, and a repository without a test set."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from expunge.client import Client
from expunge.client.cli import main as cli_main
from expunge.server.errors import FailedPrecondition, InvalidArgument
from expunge.server.main import start
from expunge.server.settings import Settings
from expunge.server.state import datasets
from expunge.server.state.repository import read_repository
from tests.server.test_import import _write_repository

LAYOUTS = ("fixed_size_list", "list", "columns")


def _table(npz: Path, layout: str) -> pa.Table:
    """The .npz's rows as a table in one of the documented layouts."""
    with np.load(npz) as arrays:
        features, labels = arrays["features"], arrays["labels"]
        sample_ids, owner_ids = arrays["sample_ids"], arrays["owner_ids"]
    n, size = features.shape
    columns: dict[str, pa.Array] = {
        "sample_id": pa.array(sample_ids.tolist(), pa.string())
        if sample_ids.dtype.kind == "U"
        else pa.array(sample_ids, pa.int64())
    }
    if layout == "fixed_size_list":
        columns["features"] = pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), size)
    elif layout == "list":
        offsets = pa.array(np.arange(0, n * size + 1, size, dtype=np.int32))
        columns["features"] = pa.ListArray.from_arrays(offsets, pa.array(features.ravel()))
    else:  # one float64 column per feature, between the others: the file's order counts
        columns |= {f"x{j:02d}": pa.array(features[:, j].astype(np.float64)) for j in range(size)}
    columns["label"] = pa.array(labels.astype(np.int32))
    columns["owner_id"] = pa.array(owner_ids.tolist(), pa.string()).dictionary_encode()
    return pa.table(columns)


def _parquet_twin(npz_repo: Path, target: Path, layout: str) -> Path:
    """``npz_repo`` with its train and test sets rewritten as Parquet (small row groups)."""
    shutil.copytree(npz_repo, target)
    for part in ("train", "test"):
        pq.write_table(_table(target / f"{part}.npz", layout), target / f"{part}.parquet", 100)
        (target / f"{part}.npz").unlink()
    manifest = (target / "expunge.toml").read_text().replace(".npz", ".parquet")
    (target / "expunge.toml").write_text(manifest)
    return target


@pytest.fixture(scope="module")
def npz_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repos") / "npz"
    _write_repository(root, training=False, checkpoints=False)
    return root


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_parquet_layout_reads_as_the_npz_does(
    npz_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    monkeypatch.setattr(datasets, "PARQUET_BATCH_ROWS", 64)  # many batches, a ragged last
    expected = read_repository(npz_repo, {})
    got = read_repository(_parquet_twin(npz_repo, tmp_path / "repo", layout), {})
    for name in ("train", "test"):
        want, have = getattr(expected, name), getattr(got, name)
        for field in ("features", "labels", "sample_ids", "owner_ids"):
            np.testing.assert_array_equal(getattr(have, field), getattr(want, field))
            assert getattr(have, field).dtype == getattr(want, field).dtype
        assert have.num_classes == want.num_classes


def test_string_sample_ids_read_from_parquet_as_from_npz(tmp_path: Path) -> None:
    """UUID-like sample ids, in a string column, become the same keys as in an .npz."""
    keyed = tmp_path / "keyed"
    _write_repository(keyed, training=False, checkpoints=False)
    for part in ("train", "test"):
        with np.load(keyed / f"{part}.npz") as data:
            arrays = dict(data)
        arrays["sample_ids"] = np.array([f"{part}-{i:05d}" for i in arrays["sample_ids"]])
        np.savez(keyed / f"{part}.npz", **arrays)
    expected = read_repository(keyed, {})
    got = read_repository(_parquet_twin(keyed, tmp_path / "parquet", "list"), {})
    for name in ("train", "test"):
        want, have = getattr(expected, name), getattr(got, name)
        assert want.sample_keys is not None and have.sample_keys is not None
        np.testing.assert_array_equal(have.sample_keys, want.sample_keys)
        np.testing.assert_array_equal(have.sample_ids, want.sample_ids)
    # Training rows are numbered 0..n-1, held-out rows after them.
    assert expected.train.sample_ids.tolist() == list(range(455))
    assert expected.test.sample_ids[0] == 455


def test_a_parquet_repository_uploads_and_imports_as_its_npz_twin(
    npz_repo: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    parquet_repo = _parquet_twin(npz_repo, tmp_path / "parquet", "list")
    assert cli_main(["import", str(npz_repo), "--name", "npz", "--state-dir", str(state)]) == 0
    running = start(Settings(state_dir=state, port=0, build_index=False))
    try:
        engine = running.engine  # type: ignore[attr-defined]
        with Client(running.target, timeout=600) as client:
            info = client.import_model(parquet_repo, "parquet")  # .parquet files travel
            assert info.num_training_samples == 455
            assert info.metrics == client.get_model("npz").metrics
        # The stored shards are content-addressed: the same bytes whichever format came in.
        assert engine.model_row("parquet").train_blob == engine.model_row("npz").train_blob
        assert engine.model_row("parquet").test_blob == engine.model_row("npz").test_blob
        np.testing.assert_array_equal(
            engine.training_data("parquet").owner_ids, engine.training_data("npz").owner_ids
        )
    finally:
        running.stop(0)


def _rewrite(repo: Path, part: str, change: Callable[[pa.Table], pa.Table]) -> None:
    """Replace ``part``.parquet's table by ``change(table)``."""
    path = repo / f"{part}.parquet"
    pq.write_table(change(pq.read_table(path)), path)


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def test_a_bad_parquet_file_is_refused_naming_the_file_and_column(
    npz_repo: Path, tmp_path: Path
) -> None:
    n = 455
    cases = [
        (
            lambda t: t.drop_columns(["label"]),
            r"train.parquet \(\[data\] train\): column 'label' is missing",
        ),
        (
            lambda t: _set(t, "label", pa.array(["a"] * n)),
            r"train.parquet \(\[data\] train\): column 'label' must be an integer type, got string",
        ),
        (
            lambda t: _set(t, "sample_id", pa.array(np.arange(n, dtype=np.uint64))),
            r"column 'sample_id' must be int64 or narrower, or strings \(e.g. UUIDs\); got uint64",
        ),
        (
            lambda t: _set(t, "owner_id", pa.array(np.arange(n))),
            r"column 'owner_id' must be a string type, got int64",
        ),
        (
            lambda t: _set(t, "owner_id", pa.array(["u1"] * (n - 2) + [None, None], pa.string())),
            r"train.parquet \(\[data\] train\): column 'owner_id' has 2 null values",
        ),
        (
            lambda t: _set(t, "owner_id", pa.array(["u1"] * (n - 1) + [""], pa.string())),
            r"column 'owner_id': 1 samples have no owner",
        ),
        (
            lambda t: _set(t, "sample_id", pa.array(np.zeros(n, dtype=np.int64))),
            r"column 'sample_id': duplicate sample ids",
        ),
        (
            lambda t: _set(t, "label", pa.array(np.r_[-1, np.zeros(n - 1)].astype(np.int64))),
            r"column 'label': labels must lie in \[0, 1\); got \[-1, 0\]",
        ),
        (
            lambda t: _set(t, "label", pa.array(np.r_[np.zeros(n - 1), 5].astype(np.int64))),
            r"column 'label' reaches class 5; the model has 2 classes",
        ),
        (
            lambda t: _set(t, "features", pa.array([[0.0] * 30] * (n - 1) + [[0.0] * 29])),
            r"column 'features' holds 29 values in row 454 \(1 rows differ\); the input shape needs 30",
        ),
        (
            lambda t: _set(t, "features", pa.array([[1] * 30] * n)),
            r"column 'features' must hold floating-point values, got int64",
        ),
        (
            lambda t: _set(t, "features", pa.array([[np.nan] * 30] * n)),
            r"column 'features': contains NaN",
        ),
        (
            lambda t: _set(t, "features", pa.array([[0.0] * 29 + [None]] * n)),
            r"column 'features' has 455 null values",
        ),
        (
            lambda t: t.drop_columns(["features"]).append_column("x", pa.array(np.zeros(n))),
            r"column 'features' is missing, and the 1 other columns \('x'\) are not the 30",
        ),
    ]
    repo = _parquet_twin(npz_repo, tmp_path / "repo", "list")
    original = pq.read_table(repo / "train.parquet")
    for change, match in cases:
        pq.write_table(original, repo / "train.parquet")
        _rewrite(repo, "train", change)
        with pytest.raises(InvalidArgument, match=match):
            read_repository(repo, {})

    columns = _parquet_twin(npz_repo, tmp_path / "columns", "columns")
    _rewrite(columns, "test", lambda t: _set(t, "x07", pa.array(np.zeros(len(t), np.int64))))
    with pytest.raises(
        InvalidArgument, match=r"test.parquet \(\[data\] test\): column 'x07' \(a feature\)"
    ):
        read_repository(columns, {})

    (repo / "train.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InvalidArgument, match=r"train.parquet \(\[data\] train\): not a readable"):
        read_repository(repo, {})
    assert cli_main(["import", str(repo), "--name", "x", "--state-dir", str(tmp_path / "s")]) == 5


def test_parquet_without_pyarrow_says_to_install_the_server_extra(
    npz_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _parquet_twin(npz_repo, tmp_path / "repo", "list")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(FailedPrecondition, match=r"train.parquet .*install expunge\[server\]"):
        read_repository(repo, {})
    read_repository(npz_repo, {})  # .npz needs no pyarrow


def test_a_repository_without_a_test_set_imports_and_says_what_is_not_measured(
    npz_repo: Path, tmp_path: Path
) -> None:
    # No held-out set is carved from the training rows (measured on rows the model trained
    # on, every figure would flatter it): the test figures are absent, Scan is refused,
    # and the forget's accuracy guard reads the retained samples.
    import math

    from expunge.client import FailedPreconditionError
    from expunge.server.forget.computation import NO_TEST_SET_NOTE

    repo = tmp_path / "repo"
    shutil.copytree(npz_repo, repo)
    manifest = (repo / "expunge.toml").read_text()
    (repo / "expunge.toml").write_text(manifest.replace('test = "test.npz"\n', ""))
    assert len(read_repository(repo, {}).test) == 0
    state = tmp_path / "state"
    assert cli_main(["import", str(repo), "--name", "x", "--state-dir", str(state)]) == 0
    running = start(Settings(state_dir=state, port=0))
    try:
        engine = running.engine  # type: ignore[attr-defined]
        metrics = engine.version_row("x", 1).metrics
        assert "test_accuracy" not in metrics and "test_loss" not in metrics
        assert metrics["train_accuracy"] > 0.8
        with Client(running.target, timeout=600) as client:
            features = engine.training_data("x").features[:2].numpy()
            with pytest.raises(FailedPreconditionError, match="without a held-out set"):
                list(client.scan("x", features))
            with pytest.raises(FailedPreconditionError, match="without a held-out set"):
                client.estimate_scan("x", features)
            owner = str(engine.training_data("x").owner_ids[0])
            op = client.forget("x", owner_ids=[owner], selection="all", wait=True)
            assert op.state == "SUCCEEDED" and op.receipt is not None
            assert NO_TEST_SET_NOTE in op.receipt.note
            assert math.isnan(op.receipt.after.test_accuracy)
            assert math.isnan(op.receipt.after.mia_auc)
            assert op.receipt.after.retained_accuracy > 0.8
            new = engine.version_row("x", op.receipt.new_version).metrics
            assert "test_accuracy" not in new and new["train_accuracy"] > 0.8
            deadline = time.monotonic() + 120
            while client.get_model("x").index.state != "READY":  # it needs no test set
                assert time.monotonic() < deadline, "index never became READY"
                time.sleep(0.1)
            assert all(len(row) == 3 for row in client.neighbors("x", features, 3).neighbors)
    finally:
        running.stop(0)

    (repo / "expunge.toml").write_text(manifest.replace('"test.npz"', '"test.csv"'))
    (repo / "test.csv").write_text("1,2,3\n")
    with pytest.raises(
        InvalidArgument, match=r"\[data\] test: 'test.csv': only \('.npz', '.parquet'\)"
    ):
        read_repository(repo, {})


def test_without_a_held_out_set_the_accuracy_guard_reads_the_training_accuracy() -> None:
    from expunge.server.engine import guarded_accuracy
    from expunge.server.forget.computation import accuracy_cost

    assert guarded_accuracy({"train_accuracy": 0.9, "test_accuracy": 0.8}) == (
        0.8,
        "test accuracy",
    )
    accuracy, what = guarded_accuracy({"train_accuracy": 0.9})
    assert accuracy == 0.9 and "no held-out set" in what
    nan = float("nan")
    before = {"test_accuracy": nan, "retained_accuracy": 0.95}
    assert accuracy_cost(before, {"test_accuracy": nan, "retained_accuracy": 0.9}) == pytest.approx(
        0.05
    )
    measured = {"test_accuracy": 0.9, "retained_accuracy": 0.95}
    assert accuracy_cost(measured, {"test_accuracy": 0.7, "retained_accuracy": 0.95}) == (
        pytest.approx(0.2)
    )
