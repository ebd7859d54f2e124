from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.server.errors import InvalidArgument
from expunge.server.state import weights as weights_io
from expunge.server.state.datasets import builtin, load_npz, synthetic_owners, validate
from expunge.server.training_job import resolve_dataset


def _arrays(n: int = 6) -> dict[str, np.ndarray]:
    return {
        "features": np.zeros((n, 3), np.float32),
        "labels": np.arange(n) % 2,
        "sample_ids": np.arange(n, dtype=np.int64),
        "owner_ids": np.array([f"u{i}" for i in range(n)]),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"features": np.zeros((6,), np.float32)}, "features"),
        ({"features": np.zeros((6, 3), np.int64)}, "floating"),
        ({"labels": np.arange(5)}, "labels"),
        ({"labels": np.array([0, 1, 2, 0, 1, -1])}, "lie in"),
        ({"sample_ids": np.array([0, 1, 2, 3, 3, 5])}, "duplicate"),
        ({"owner_ids": np.array(["a", "b", "", "d", "e", "f"])}, "no owner"),
        ({"features": np.full((6, 3), np.nan, np.float32)}, "NaN"),
    ],
)
def test_bad_arrays_are_refused_with_a_clear_error(
    change: dict[str, np.ndarray], message: str
) -> None:
    arrays = {**_arrays(), **change}
    with pytest.raises(InvalidArgument, match=message):
        validate(**arrays)


def test_npz_import_round_trip_and_object_arrays_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, **_arrays())
    assert len(load_npz(good)) == 6
    bad = tmp_path / "bad.npz"
    arrays = _arrays()
    arrays["owner_ids"] = arrays["owner_ids"].astype(object)
    np.savez(bad, **arrays)
    with pytest.raises(InvalidArgument, match="pickle"):
        load_npz(bad)


def test_builtin_datasets_have_owners_of_one_to_twenty_samples() -> None:
    for name, n in (("digits", 1797), ("breast_cancer", 569), ("wine", 178)):
        data = builtin(name, seed=3)
        assert len(data) == n
        _, counts = np.unique(data.owner_ids, return_counts=True)
        assert counts.min() >= 1 and counts.max() <= 20
    assert (synthetic_owners(100, 1) == synthetic_owners(100, 1)).all()
    assert (synthetic_owners(100, 1) != synthetic_owners(100, 2)).any()


def test_weights_round_trip_and_mismatch_refused() -> None:
    spec = ArchitectureSpec("mlp", (4,), 3)
    model = build_model(spec, 0)
    data = weights_io.model_to_bytes(model)
    other = weights_io.load_into(build_model(spec, 1), data)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(InvalidArgument, match="do not fit"):
        weights_io.load_into(build_model(ArchitectureSpec("mlp", (5,), 3), 0), data)


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_a_pickle_payload_is_refused_and_never_executed(capsys: pytest.CaptureFixture[str]) -> None:
    payload = pickle.dumps({"1.weight": _Exploit()})
    with pytest.raises(InvalidArgument, match="safetensors"):
        weights_io.load_into(build_model(ArchitectureSpec("mlp", (4,), 3), 0), payload)
    buf = torch.zeros(1)
    import io

    torch_file = io.BytesIO()
    torch.save({"w": buf, "x": _Exploit()}, torch_file)
    with pytest.raises(InvalidArgument):
        weights_io.parse_state(torch_file.getvalue())
    assert "pwned" not in capsys.readouterr().out


def test_truncated_weights_are_refused() -> None:
    data = weights_io.model_to_bytes(build_model(ArchitectureSpec("mlp", (4,), 3), 0))
    with pytest.raises(InvalidArgument):
        weights_io.parse_state(data[: len(data) // 2])


def test_data_files_outside_the_data_root_and_urls_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside.npz"
    np.savez(
        outside,
        features=np.zeros((4, 3), np.float32),
        labels=np.array([0, 1, 0, 1]),
        sample_ids=np.arange(4),
        owner_ids=np.array(["a", "b", "c", "d"]),
    )
    inside = root / "inside.npz"
    inside.write_bytes(outside.read_bytes())
    assert len(resolve_dataset(str(inside), 0, root).labels) == 4
    with pytest.raises(ValueError, match="data root"):
        resolve_dataset(str(outside), 0, root)
    with pytest.raises(ValueError, match="data root"):
        resolve_dataset(str(root / ".." / "outside.npz"), 0, root)
    (root / "link.npz").symlink_to(outside)
    with pytest.raises(ValueError, match="data root"):
        resolve_dataset(str(root / "link.npz"), 0, root)
    with pytest.raises(ValueError, match="URLs"):
        resolve_dataset("https://example.com/data.npz", 0, root)


def test_checkpoints_serialise_to_the_same_bytes_every_time_and_v1_still_reads() -> None:
    import json

    from safetensors.torch import save as torch_save

    from expunge.defenses.training import Checkpoint

    states = [{"w": torch.full((3,), float(i)), "b": torch.zeros(1)} for i in range(3)]
    checkpoints = [
        Checkpoint(step=10 * i, learning_rate=0.1 / (i + 1), state=s) for i, s in enumerate(states)
    ]
    encoded = {weights_io.checkpoints_to_bytes(checkpoints) for _ in range(20)}
    assert len(encoded) == 1
    (data,) = encoded
    for read, wrote in zip(weights_io.checkpoints_from_bytes(data), checkpoints, strict=True):
        assert (read.step, read.learning_rate) == (wrote.step, wrote.learning_rate)
        assert all(torch.equal(read.state[k], wrote.state[k]) for k in wrote.state)
    legacy = torch_save(
        {f"t{i:04d}/{k}": v for i, c in enumerate(checkpoints) for k, v in c.state.items()},
        metadata={
            "format": "expunge-checkpoints-v1",
            "learning_rates": json.dumps([c.learning_rate for c in checkpoints]),
            "steps": json.dumps([c.step for c in checkpoints]),
        },
    )
    assert [c.step for c in weights_io.checkpoints_from_bytes(legacy)] == [0, 10, 20]


@pytest.mark.parametrize("block_bytes", [1, 100, 4 << 20])
def test_streamed_kept_rows_are_the_bytes_of_the_subset(
    block_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stream_kept_rows`` writes exactly ``arrays_to_bytes`` of the kept rows, whatever
    the block size, dtype mix and names (safetensors orders tensors by dtype, then name)."""
    monkeypatch.setattr(weights_io, "STREAM_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(3)
    n = 37
    arrays = {
        "features": rng.normal(size=(n, 3, 2, 2)).astype(np.float32),
        "labels": rng.integers(0, 5, n),
        "sample_ids": np.arange(100, 100 + n, dtype=np.int64),
        "a_float64": rng.normal(size=(n,)),
        "z_int32": rng.integers(0, 9, (n, 2)).astype(np.int32),
        "flags": rng.random(n) > 0.5,
    }
    for keep in (rng.random(n) > 0.3, np.ones(n, dtype=bool), np.eye(1, n, 5, dtype=bool)[0]):
        written = bytearray()
        weights_io.stream_kept_rows(arrays, keep, written.extend)
        expected = weights_io.arrays_to_bytes({k: a[keep] for k, a in arrays.items()})
        assert bytes(written) == expected
    with pytest.raises(ValueError, match="rows"):
        weights_io.stream_kept_rows({"labels": np.arange(3)}, np.ones(4, bool), lambda _: None)


def test_kept_rows_of_a_mapped_file_equal_the_boolean_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(weights_io, "STREAM_BLOCK_BYTES", 64)  # many blocks, some empty
    rng = np.random.default_rng(4)
    features = rng.normal(size=(50, 2, 3)).astype(np.float32)
    (tmp_path / "shard").write_bytes(weights_io.arrays_to_bytes({"features": features}))
    mapped = weights_io.arrays_from_file(tmp_path / "shard")["features"]
    keep = rng.random(50) > 0.4
    keep[10:30] = False
    gathered = weights_io.kept_rows(mapped, keep)
    assert gathered.flags.c_contiguous and np.array_equal(gathered, features[keep])
