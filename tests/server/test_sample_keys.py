"""String sample ids (UUIDs): imported, answered in responses, forgotten by key, kept by
keyed digest only once forgotten."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from expunge.client import Client, InvalidArgumentError, NotFoundError
from expunge.client.cli import main as cli_main
from expunge.server.errors import InvalidArgument
from expunge.server.main import start
from expunge.server.settings import Settings
from expunge.server.state.datasets import MAX_SAMPLE_KEY_CHARS, validate
from tests.server.test_import import _write_repository


def _uuids(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)])


def _keyed_repository(root: Path) -> dict[str, np.ndarray]:
    """The import tests' breast-cancer repository with UUIDs for sample ids."""
    expected = _write_repository(root, training=False, checkpoints=False)
    for part, seed in (("train", 1), ("test", 2)):
        with np.load(root / f"{part}.npz") as data:
            arrays = dict(data)
        arrays["sample_ids"] = _uuids(len(arrays["labels"]), seed)
        np.savez(root / f"{part}.npz", **arrays)
        expected[f"{part}_keys"] = arrays["sample_ids"]
        expected[f"{part}_owners"] = arrays["owner_ids"]
        expected[f"{part}_features"] = arrays["features"]
    return expected


def test_string_ids_become_keys_numbered_by_row() -> None:
    features = np.zeros((3, 2), dtype=np.float32)
    labels = np.array([0, 1, 0])
    owners = np.array(["a", "b", "c"])
    data = validate(features, labels, np.array(["k2", "k0", "k1"]), owners)
    assert data.sample_ids.tolist() == [0, 1, 2]
    assert data.sample_keys is not None and data.sample_keys.tolist() == ["k2", "k0", "k1"]
    assert validate(features, labels, np.array([5, 6, 7]), owners).sample_keys is None
    for bad, match in (
        (np.array(["a", "b", "a"]), "duplicate sample ids"),
        (np.array(["a", "", "c"]), "empty string sample ids at rows \\[1\\]"),
        (np.array(["a", "b", "x" * (MAX_SAMPLE_KEY_CHARS + 1)]), "at most 256 characters"),
    ):
        with pytest.raises(InvalidArgument, match=match):
            validate(features, labels, bad, owners)


def test_a_model_imported_with_uuids_answers_and_forgets_by_key(tmp_path: Path) -> None:
    repo, state = tmp_path / "repo", tmp_path / "state"
    expected = _keyed_repository(repo)
    keys = expected["train_keys"]
    assert cli_main(["import", str(repo), "--name", "cancer", "--state-dir", str(state)]) == 0
    running = start(Settings(state_dir=state, port=0))
    try:
        with Client(running.target, timeout=600) as client:
            _wait_ready(client)
            # Responses name each training sample by its key as well as the server's id.
            near = client.neighbors("cancer", expected["train_features"][:3], 1)
            for hits in near.neighbors:
                assert hits[0].sample_key == keys[hits[0].sample_id] != ""
            for result in client.scan("cancer", expected["train_features"][:2]):
                assert all(s.sample_key == keys[s.sample_id] for s in result.implicated)

            # Forget two samples by key: the receipt counts them; the rows are gone.
            op = client.forget("cancer", sample_keys=[str(keys[4]), str(keys[9])], wait=True)
            assert op.state == "SUCCEEDED" and op.receipt is not None
            assert op.receipt.removed_samples == 2
            data = running.engine.training_data("cancer")  # type: ignore[attr-defined]
            assert data.sample_keys is not None and keys[4] not in set(data.sample_keys)
            assert len(data.sample_keys) == len(keys) - 2
            # The same key again is "already forgotten", not unknown.
            again = client.forget("cancer", sample_keys=[str(keys[4])], wait=True)
            assert again.receipt is not None and again.receipt.already_forgotten_samples == 1
            assert again.receipt.removed_samples == 0
            with pytest.raises(NotFoundError, match="unknown sample keys \\['no-such-key'\\]"):
                client.forget("cancer", sample_keys=["no-such-key"])
            with pytest.raises(InvalidArgumentError, match="sample_keys"):
                client.forget("cancer", sample_keys=[""])
            # The CLI names samples by key too.
            target = running.target
            assert (
                cli_main(["--target", target, "forget", "cancer", "--sample-key", str(keys[11])])
                == 0
            )
    finally:
        running.stop(0)
    # A forgotten key survives only as a keyed digest: not in the database in plain text.
    database = b"".join(p.read_bytes() for p in state.glob("expunge.db*"))
    for forgotten in (keys[4], keys[9], keys[11]):
        assert forgotten.encode() not in database
    assert keys[0].encode() in database  # a retained one is still there to answer to
    # After a restart the keys are read back from the store.
    running = start(Settings(state_dir=state, port=0, build_index=False))
    try:
        data = running.engine.training_data("cancer")  # type: ignore[attr-defined]
        assert data.sample_keys is not None and data.sample_keys[0] == keys[0]
    finally:
        running.stop(0)


def _wait_ready(client: Client, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while client.get_model("cancer").index.state != "READY":
        assert time.monotonic() < deadline, "index never became READY"
        time.sleep(0.1)
