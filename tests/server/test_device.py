"""The ``device`` setting: resolved once at start, refused clearly, reported in receipts.

The CUDA tests carry ``gpu`` and skip without CUDA: each runs one path of the server
(training, a forget in the worker thread and in the compute process, a scan's influence,
training side and confirmations) on CUDA and on the CPU from the same state, and compares
what they produce within the tolerances below.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from expunge.client.cli import main as cli_main
from expunge.server.device import (
    DeviceUnavailable,
    describe_device,
    module_on,
    resolve_device,
)
from expunge.server.engine import Engine
from expunge.server.forget.computation import UnlearningOptions
from expunge.server.forget.compute_process import ComputeProcess
from expunge.server.forget.requests import environment
from expunge.server.forget.service import ForgetService
from expunge.server.main import start
from expunge.server.scan.service import ScanService
from expunge.server.settings import Settings, load_settings
from expunge.server.state import weights as weights_io
from expunge.server.state.store import Store

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# float32 on both devices. A trained model: the same batches, roundings that differ in
# order over a few hundred SGD steps and the L-BFGS polish.
ATOL_TRAINED = 1e-3
# A forget's update: CUDA and CPU steps agree to this share of the step's own size (one
# Newton step on a float32 MLP; its damped eigen-solve amplifies last-bit differences).
STEP_RTOL = 1e-2
# Influence scores are sums of learning-rate-weighted cosines, each in [-1, 1].
ATOL_INFLUENCE = 1e-4
# Probabilities after a Newton counterfactual, and after retraining without the rows.
ATOL_NEWTON_PROBABILITY = 1e-3
ATOL_RETRAIN_PROBABILITY = 2e-2


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as one without CUDA, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# --- resolution and refusal (every machine) -------------------------------------------


def test_auto_and_cpu_resolve_to_the_cpu_without_cuda(no_cuda: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_takes_cuda_when_present() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert Settings().device == "auto"


def test_cuda_without_cuda_is_refused_with_what_to_do(no_cuda: None) -> None:
    with pytest.raises(DeviceUnavailable, match="finds no usable CUDA device") as raised:
        resolve_device("cuda")
    assert "'auto' or 'cpu'" in str(raised.value)


def test_an_unknown_device_is_refused() -> None:
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="device must be one of"):
        Settings(device="tpu")
    with pytest.raises(ValueError, match="device must be one of"):
        load_settings(env={"EXPUNGE_DEVICE": "mps"})
    assert load_settings(env={"EXPUNGE_DEVICE": "cpu"}).device == "cpu"


def test_the_server_refuses_cuda_at_start_and_frees_the_state(
    no_cuda: None, state_dir: Path
) -> None:
    with pytest.raises(DeviceUnavailable):
        start(Settings(state_dir=state_dir, port=0, device="cuda"))
    Store(state_dir).close()  # the writer lock was released


def test_expunge_serve_refuses_cuda_without_it(
    no_cuda: None, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["serve", "--state-dir", str(state_dir), "--port", "0", "--device", "cuda"])
    assert code == 2
    assert "no usable CUDA device" in capsys.readouterr().err


def test_the_engine_exposes_the_resolved_device(state_dir: Path) -> None:
    store = Store(state_dir)
    try:
        assert Engine(store, Settings(state_dir=state_dir, device="cpu")).device.type == "cpu"
    finally:
        store.close()


def test_receipts_name_the_device_and_cpu_modules_are_not_copied() -> None:
    assert "; device cpu;" in environment(torch.device("cpu"))
    assert describe_device(torch.device("cpu")) == "cpu"
    module = torch.nn.Linear(2, 2)
    assert module_on(module, torch.device("cpu")) is module


# --- the same work on CUDA and on the CPU (CUDA machines only) -------------------------


@contextmanager
def _engine(state: Path, device: str) -> Iterator[Engine]:
    store = Store(state)
    try:
        yield Engine(store, Settings(state_dir=state, device=device))
    finally:
        store.close()


def _copies(state_dir: Path, tmp_path: Path) -> dict[str, Path]:
    copies = {}
    for device in ("cpu", "cuda"):
        copies[device] = tmp_path / device
        shutil.copytree(state_dir, copies[device])
    return copies


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1).double().cpu() for k in sorted(state)])


@pytest.mark.gpu
@needs_cuda
def test_cuda_training_matches_cpu(tmp_path: Path) -> None:
    from expunge.server.training_job import train_model

    trained = {}
    for device in ("cpu", "cuda"):
        root = tmp_path / device
        info = train_model(
            root, "digits", epochs=3, settings=Settings(state_dir=root, device=device)
        )
        store = Store(root)
        try:
            trained[device] = weights_io.parse_state(store.blobs.get(info.version.weights_blob))
        finally:
            store.close()
    torch.testing.assert_close(
        _flat(trained["cuda"]), _flat(trained["cpu"]), rtol=0.0, atol=ATOL_TRAINED
    )


def _first_owner(state: Path) -> str:
    db = sqlite3.connect(state / "expunge.db")
    owner = db.execute("SELECT owner_id FROM samples ORDER BY owner_id LIMIT 1").fetchone()[0]
    db.close()
    return str(owner)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("in_subprocess", [False, True])
def test_cuda_forget_matches_cpu(state_dir: Path, tmp_path: Path, in_subprocess: bool) -> None:
    owner = _first_owner(state_dir)
    options = UnlearningOptions(selection="all", newton_iterations=1)
    after: dict[str, torch.Tensor] = {}
    for device, state in _copies(state_dir, tmp_path).items():
        with _engine(state, device) as engine:
            before = _flat(engine.snapshot("digits").module.state_dict())
            compute = ComputeProcess(1) if in_subprocess else None
            forget = ForgetService(engine, None, compute)
            forget.jobs.start()
            forget.submit("digits", [], [owner], "same", options, "test")
            assert forget.jobs.wait_idle(300)
            row = engine.store.request("same")
            assert row is not None and row.result is not None, row
            assert f"device {device}" in row.result["environment"]
            # By version: wait_idle may return before the commit drops the cached snapshot.
            version = row.result["new_version"]
            after[device] = _flat(engine.snapshot("digits", version).module.state_dict())
            assert forget.close(60)
    step = float((after["cpu"] - before).norm())
    assert step > 0
    assert float((after["cuda"] - after["cpu"]).norm()) <= STEP_RTOL * step


@pytest.mark.gpu
@needs_cuda
def test_cuda_scan_scores_and_confirmations_match_cpu(state_dir: Path, tmp_path: Path) -> None:
    results: dict[str, dict[str, torch.Tensor]] = {}
    for device, state in _copies(state_dir, tmp_path).items():
        with _engine(state, device) as engine:
            forget = ForgetService(engine)
            scan = ScanService(engine, forget, None)
            x = torch.from_numpy(np.ascontiguousarray(engine.test_data("digits").features[:4]))
            removed = torch.arange(10)
            results[device] = {
                "influence": scan._influences("digits", "gas", x, "exact"),
                "outlier_z": scan._outlier_z("digits"),
                "newton": scan.confirm.probabilities("digits", removed, x, "newton"),
                "retrain": scan.confirm.probabilities("digits", removed, x, "retrain"),
                # The path of models too large for the dense Hessian, on this small one.
                "newton_cg": _flat(scan.confirm._newton_cg_without("digits", removed).state_dict()),
            }
            assert forget.close(60)
    cuda, cpu = results["cuda"], results["cpu"]
    assert all(t.device.type == "cpu" for t in cuda.values())
    torch.testing.assert_close(cuda["influence"], cpu["influence"], rtol=0, atol=ATOL_INFLUENCE)
    torch.testing.assert_close(cuda["outlier_z"], cpu["outlier_z"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(cuda["newton"], cpu["newton"], rtol=0, atol=ATOL_NEWTON_PROBABILITY)
    torch.testing.assert_close(
        cuda["retrain"], cpu["retrain"], rtol=0, atol=ATOL_RETRAIN_PROBABILITY
    )
    torch.testing.assert_close(cuda["newton_cg"], cpu["newton_cg"], rtol=0, atol=ATOL_TRAINED)
