"""Data held once: shards memory-mapped, handed to the compute process by path (#19 item 3)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from expunge.server.errors import FailedPrecondition
from expunge.server.forget.compute_process import ForgetData, UnlearningJob
from expunge.server.state import weights as weights_io
from expunge.server.state.blobs import BlobStore
from expunge.server.state.store import Store


def _shard(path: Path, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "features": rng.standard_normal((n, 3, 4, 4)).astype(np.float32),
        "labels": rng.integers(0, 5, n),
        "sample_ids": np.arange(n, dtype=np.int64) + 100,
    }
    path.write_bytes(weights_io.arrays_to_bytes(arrays))
    return arrays


def test_a_mapped_shard_equals_the_stored_arrays_and_writes_stay_private(tmp_path: Path) -> None:
    arrays = _shard(tmp_path / "train", 50, 0)
    mapped = weights_io.arrays_from_file(tmp_path / "train")
    for name, expected in arrays.items():
        assert isinstance(mapped[name], np.memmap)
        assert mapped[name].dtype == expected.dtype and np.array_equal(mapped[name], expected)
    mapped["features"][0] = 0.0  # copy-on-write: the file and other mappings keep theirs
    again = weights_io.arrays_from_file(tmp_path / "train")
    assert np.array_equal(again["features"], arrays["features"])


def test_the_forget_job_carries_paths_and_rows_not_the_data(tmp_path: Path) -> None:
    train = _shard(tmp_path / "train", 2_000, 1)
    test = _shard(tmp_path / "test", 300, 2)
    rows = np.array([3, 17, 1999], dtype=np.int64)
    data = ForgetData(str(tmp_path / "train"), str(tmp_path / "test"), rows)
    arrays = data.arrays()
    mask = np.zeros(2_000, dtype=bool)
    mask[rows] = True
    assert torch.equal(arrays["forget_x"], torch.from_numpy(train["features"][mask]))
    assert torch.equal(arrays["retained_y"], torch.from_numpy(train["labels"][~mask]))
    assert torch.equal(arrays["test_x"], torch.from_numpy(test["features"]))
    job = UnlearningJob("r", {}, {}, b"", data, {}, {})
    # 2,000 x 48 float32 is 384 kB: the pickled job crossing the pipe holds none of it.
    assert len(pickle.dumps(job)) < 2_000


def test_a_corrupt_shard_is_refused_before_it_is_mapped(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    try:
        digest = store.blobs.put(weights_io.arrays_to_bytes({"labels": np.arange(10)}))
        assert store.blobs.verified_path(digest) == store.blobs.path(digest)
        path = store.blobs.path(digest)
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.chmod(0o644)
        path.write_bytes(bytes(data))
        # This process wrote and hashed it; the next one to map it hashes it first.
        with pytest.raises(FailedPrecondition, match="corrupt"):
            BlobStore(store.blobs.root).verified_path(digest)
    finally:
        store.close()
