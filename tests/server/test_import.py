"""Importing a model trained elsewhere (plain PyTorch), then serving every RPC on it."""

from __future__ import annotations

import io
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from expunge.client import Client, FailedPreconditionError
from expunge.client.cli import main as cli_main
from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.server.errors import InvalidArgument
from expunge.server.main import start
from expunge.server.settings import Settings
from expunge.server.state.datasets import builtin
from expunge.server.state.repository import read_repository

SPEC = ArchitectureSpec("mlp", (30,), 2, hidden=(16,), activation="relu")
WEIGHT_DECAY = 1e-3


def _write_repository(root: Path, training: bool, checkpoints: bool) -> dict[str, np.ndarray]:
    """Train an MLP on breast cancer with a plain PyTorch loop and write its repository."""
    data = builtin("breast_cancer")
    rows = np.random.default_rng(3).permutation(len(data))
    train_rows, test_rows = rows[:455], rows[455:]
    model = build_model(SPEC, seed=5)
    x = torch.from_numpy(data.features[train_rows])
    y = torch.from_numpy(data.labels[train_rows])
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=WEIGHT_DECAY)
    states = []
    for epoch in range(40):
        if epoch % 10 == 0:
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    root.mkdir(parents=True)
    save_file(model.state_dict(), root / "weights.safetensors")
    for name, part in (("train", train_rows), ("test", test_rows)):
        np.savez(
            root / f"{name}.npz",
            features=data.features[part],
            labels=data.labels[part],
            sample_ids=data.sample_ids[part] + 1000,
            owner_ids=data.owner_ids[part],
        )
    manifest = [
        'format = "expunge-model-repository-v1"',
        "[model]",
        'architecture = "mlp"',
        "input_shape = [30]",
        "num_classes = 2",
        "hidden = [16]",
        'activation = "relu"',
        'weights = "weights.safetensors"',
        "[objective]",
        f"weight_decay = {WEIGHT_DECAY}",
        "[data]",
        'train = "train.npz"',
        'test = "test.npz"',
    ]
    if training:
        manifest += ["[training]", "epochs = 20", "seed = 1"]
    if checkpoints:
        (root / "ckpt").mkdir()
        for i, state in enumerate(states):
            save_file(state, root / "ckpt" / f"{i}.safetensors")
            manifest += [
                "[[checkpoints]]",
                f'weights = "ckpt/{i}.safetensors"',
                "learning_rate = 0.1",
                f"step = {10 * i}",
            ]
    (root / "expunge.toml").write_text("\n".join(manifest) + "\n")
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.from_numpy(data.features)), dim=1)
    return {"probabilities": probabilities.numpy(), "features": data.features}


def test_an_imported_model_without_training_config_serves_and_forgets_approximately(
    tmp_path: Path,
) -> None:
    repo, state = tmp_path / "repo", tmp_path / "state"
    expected = _write_repository(repo, training=False, checkpoints=False)
    assert cli_main(["import", str(repo), "--name", "cancer", "--state-dir", str(state)]) == 0
    running = start(Settings(state_dir=state, port=0))
    try:
        with Client(running.target, timeout=600) as client:
            info = client.get_model("cancer")
            assert info.num_training_samples == 455 and info.current_version == 1
            answer = client.predict("cancer", expected["features"])
            np.testing.assert_allclose(answer.probabilities, expected["probabilities"], atol=1e-6)
            with pytest.raises(FailedPreconditionError, match="cannot be retrained exactly"):
                client.retrain("cancer")
            with pytest.raises(FailedPreconditionError, match="cannot be retrained exactly"):
                client.forget("cancer", sample_ids=[1000], selection="retrain")
            owner = running.engine.training_data("cancer").owner_ids[0]  # type: ignore[attr-defined]
            op = client.forget("cancer", owner_ids=[str(owner)], wait=True)
            assert op.state == "SUCCEEDED" and op.receipt is not None
            # auto would retrain a model this small; with nothing to retrain with it may not.
            assert op.receipt.policy.path in ("all", "lcodec_cg")
            assert "no exact retrain" in op.receipt.policy.reason
            results = list(client.scan("cancer", expected["features"][:3]))
            assert all("final weights only" in r.decision for r in results)
            deadline = time.monotonic() + 120
            while client.get_model("cancer").index.state != "READY":
                assert time.monotonic() < deadline, "index never became READY"
                time.sleep(0.1)
            near = client.neighbors("cancer", expected["features"][:2], 3)
            assert all(n.sample_id >= 1000 for row in near.neighbors for n in row)
    finally:
        running.stop(0)


def test_an_imported_model_with_training_config_and_checkpoints_retrains(
    tmp_path: Path,
) -> None:
    repo, state = tmp_path / "repo", tmp_path / "state"
    _write_repository(repo, training=True, checkpoints=True)
    assert cli_main(["import", str(repo), "--name", "cancer", "--state-dir", str(state)]) == 0
    running = start(Settings(state_dir=state, port=0, build_index=False))
    try:
        engine = running.engine  # type: ignore[attr-defined]
        assert len(engine.checkpoints("cancer")) == 4
        assert [c.learning_rate for c in engine.checkpoints("cancer")] == [0.1] * 4
        with Client(running.target, timeout=600) as client:
            op = client.retrain("cancer", wait=True)
            assert op.state == "SUCCEEDED" and op.retrain_receipt is not None
            assert op.retrain_receipt.training_samples == 455
            results = list(client.scan("cancer", np.zeros((2, 30), dtype=np.float32)))
            assert not any("final weights only" in r.decision for r in results)
            # The retrained version's test measurement is kept for its first forget.
            _assert_kept_measurement_is_fresh(engine, "cancer", op.retrain_receipt.new_version)
    finally:
        running.stop(0)


def _assert_kept_measurement_is_fresh(engine: object, name: str, version: int) -> None:
    """The engine kept ``version``'s test-set measurement, equal to a pass of its own."""
    from expunge.defenses.evaluate import measure_set

    kept = engine.test_measurement(name, version)  # type: ignore[attr-defined]
    assert kept is not None, f"{name} v{version}: no test measurement kept"
    test = engine.test_data(name)  # type: ignore[attr-defined]
    fresh = measure_set(
        engine.snapshot(name, version).module,  # type: ignore[attr-defined]
        torch.from_numpy(test.features),
        torch.from_numpy(test.labels),
    )
    assert torch.equal(kept.losses, fresh.losses) and kept.accuracy == fresh.accuracy


def test_an_import_keeps_its_test_measurement_for_the_first_forget(tmp_path: Path) -> None:
    """The first forget after an import starts from the import's own test-set pass (a
    10,000-sample CNN pass is 1.7 s of a forget), and reports the same figures."""
    repo = tmp_path / "repo"
    _write_repository(repo, training=False, checkpoints=False)
    running = start(Settings(state_dir=tmp_path / "state", port=0, build_index=False))
    try:
        engine = running.engine  # type: ignore[attr-defined]
        engine.import_model("cancer", read_repository(repo, {}))
        _assert_kept_measurement_is_fresh(engine, "cancer", 1)
        imported = engine.test_measurement("cancer", 1).accuracy
        with Client(running.target, timeout=600) as client:
            owner = str(engine.training_data("cancer").owner_ids[0])
            op = client.forget("cancer", owner_ids=[owner], wait=True)
            assert op.receipt is not None
            assert op.receipt.before.test_accuracy == imported
    finally:
        running.stop(0)


def _refused(repo: Path, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        read_repository(repo, {})


def test_a_bad_repository_is_refused_naming_the_file_and_field(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _write_repository(repo, training=False, checkpoints=False)
    read_repository(repo, {})  # the premise: the repository is valid
    manifest = (repo / "expunge.toml").read_text()

    _refused(tmp_path, "no expunge.toml")
    (repo / "expunge.toml").write_text(manifest.replace('"train.npz"', '"../train.npz"'))
    _refused(repo, r"\[data\] train: '../train.npz' lies outside the repository")
    # Without [data] train there is nothing to serve ([data] test is optional).
    (repo / "expunge.toml").write_text(manifest.replace('train = "train.npz"\n', ""))
    _refused(repo, r"\[data\] train: is required")
    (repo / "expunge.toml").write_text(manifest.replace("hidden = [16]", "hidden = [8]"))
    _refused(repo, r"weights.safetensors \(\[model\] weights\): weights do not fit")
    (repo / "expunge.toml").write_text(manifest.replace("weight_decay = 0.001", ""))
    _refused(repo, r"\[objective\] weight_decay: must be a number")
    (repo / "expunge.toml").write_text(manifest + "[training]\nepochs = 0\n")
    _refused(repo, r"\[training\]: epochs")
    (repo / "expunge.toml").write_text(manifest + "[training]\nlearning_rte = 0.1\n")
    _refused(repo, r"unknown keys \['learning_rte'\]")
    (repo / "expunge.toml").write_text(manifest.replace("[model]", "[model\n"))
    _refused(repo, "not valid TOML")

    # A pickled "weights" file is refused, never loaded.
    (repo / "expunge.toml").write_text(manifest)
    buffer = io.BytesIO()
    pickle.dump({"0.weight": np.zeros(3)}, buffer)
    (repo / "weights.safetensors").write_bytes(buffer.getvalue())
    _refused(repo, "not a valid safetensors file")

    # An .npz whose arrays lack a field: the file is named.
    _write_repository(tmp_path / "other", training=False, checkpoints=False)
    np.savez(tmp_path / "other" / "test.npz", features=np.zeros((3, 30), np.float32))
    _refused(tmp_path / "other", r"test.npz \(\[data\] test\): the .npz lacks arrays")
    assert (
        cli_main(
            ["import", str(tmp_path / "other"), "--name", "x", "--state-dir", str(tmp_path / "s")]
        )
        == 5  # exit_codes.INVALID_ARGUMENT
    )


def test_import_model_uploads_a_repository_to_a_running_server_which_indexes_it(
    tmp_path: Path,
) -> None:
    # A model added while serving gets what a model present at start-up gets: its index
    # is built in the background, and every RPC works on it, with no restart.
    import grpc

    from expunge.client import AlreadyExistsError, InvalidArgumentError, ResourceExhaustedError
    from expunge.v1 import expunge_pb2 as pb

    repo = tmp_path / "repo"
    expected = _write_repository(repo, training=True, checkpoints=True)
    state = tmp_path / "state"
    running = start(Settings(state_dir=state, port=0, max_import_bytes=2_000_000))
    try:
        with Client(running.target, timeout=600) as client:
            info = client.import_model(repo, "cancer")
            assert info.name == "models/cancer" and info.num_training_samples == 455
            assert info.metrics["test_accuracy"] > 0.9
            assert not any((state / "uploads").iterdir()), "the upload's scratch files are gone"
            deadline = time.monotonic() + 120
            while client.get_model("cancer").index.state != "READY":
                assert time.monotonic() < deadline, "the imported model was never indexed"
                time.sleep(0.1)
            answer = client.predict("cancer", expected["features"][:5])
            np.testing.assert_allclose(
                answer.probabilities, expected["probabilities"][:5], atol=1e-6
            )
            assert client.neighbors("cancer", expected["features"][:1], 3).model_version == 1
            op = client.forget("cancer", sample_ids=[1000, 1001], wait=True)
            assert op.state == "SUCCEEDED" and op.receipt is not None
            events = [e for e in client.audit("cancer") if e.action == "import_model"]
            assert len(events) == 1

            with pytest.raises(AlreadyExistsError):
                client.import_model(repo, "cancer")
            (repo / "expunge.toml").write_text(
                (repo / "expunge.toml").read_text().replace('train = "train.npz"\n', "")
            )
            with pytest.raises(InvalidArgumentError, match=r"\[data\] train: is required"):
                client.import_model(repo, "other")
            (repo / "big.npz").write_bytes(b"\0" * 2_500_000)
            with pytest.raises(ResourceExhaustedError, match="max_import_bytes"):
                client.import_model(repo, "other")

            stub = client._stub
            for path, match in (
                ("../evil.npz", "no '..'"),
                ("/etc/passwd.npz", "not a relative path"),
                ("model.py", "only"),
            ):
                pieces = iter([pb.RepositoryChunk(name="other", path=path, data=b"x")])
                with pytest.raises(grpc.RpcError) as caught:
                    stub.ImportModel(pieces, timeout=30)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert match in caught.value.details()
            assert [m.name for m in client.list_models()] == ["models/cancer"]
            assert not any((state / "uploads").iterdir())
    finally:
        running.stop(0)
