"""``expunge demo``: train on scikit-learn's digits, serve on 127.0.0.1, and call it with the client."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from expunge.client import Client
from expunge.server.main import start
from expunge.server.settings import Settings
from expunge.server.training_job import train_model


def _forget_neighbours_scan(client: Client, test_inputs: np.ndarray) -> None:
    """The main jobs: who is closest in gradient space, forget that owner, scan inputs."""
    deadline = time.monotonic() + 120
    while client.get_model("digits").index.state != "READY" and time.monotonic() < deadline:
        time.sleep(0.1)
    found = client.neighbors("digits", test_inputs[:1], k=5)
    print("training samples closest to test digit 0 in gradient space (GAS):")
    for n in found.neighbors[0]:
        print(f"  sample {n.sample_id} (owner {n.owner_id}, label {n.label}): {n.score:.3f}")
    owner = found.neighbors[0][0].owner_id
    print(f"forgetting owner {owner} ...", flush=True)
    op = client.forget("digits", owner_ids=[owner], wait=True)
    r = op.receipt
    if r is None:
        print(f"  forget ended {op.state}: {op.error_message}")
        return
    print(
        f"  {op.state}: version {r.parent_version} -> {r.new_version}, removed {r.removed_samples} samples, "
        f"updated {r.parameters_updated}/{r.parameters_total} parameters ({r.units_selected} L-CODEC units), "
        f"{r.seconds:.2f} s"
    )
    print(
        f"  forget-set loss {r.before.forget_loss:.3f} -> {r.after.forget_loss:.3f}, test accuracy "
        f"{r.before.test_accuracy:.3f} -> {r.after.test_accuracy:.3f}, MIA AUC {r.before.mia_auc:.3f} -> {r.after.mia_auc:.3f}"
    )
    print(f"  certificate: {r.certificate.statement}")
    after = client.neighbors("digits", test_inputs[:1], k=5)
    assert owner not in {n.owner_id for n in after.neighbors[0]}
    print(
        f"  owner {owner} is gone from the gradient index (stale until re-embedded: {after.stale})"
    )
    # The last test digits: the first 100 are the scan's clean calibration inputs.
    results = list(client.scan("digits", test_inputs[-8:]))
    flagged = sum(r.flagged for r in results)
    lowest = min(results, key=lambda r: r.p_value)
    print(
        f"scanned 8 clean test digits for attack targets: {flagged} flagged; lowest p-value "
        f"{lowest.p_value:.3f} (input {lowest.index}: {lowest.decision})"
    )


def run_demo(state_dir: Path | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="expunge-demo-") as tmp:
        root = state_dir or Path(tmp)
        settings = Settings(state_dir=root, port=0)
        started = time.perf_counter()
        if not (root / "expunge.db").exists() or state_dir is None:
            print("training an MLP on scikit-learn's digits (synthetic owners)...", flush=True)
            train_model(root, "digits", "digits", "mlp", epochs=30, seed=0, settings=settings)
            print(f"  trained in {time.perf_counter() - started:.1f} s", flush=True)
        server = start(settings)
        print(f"server listening on {server.target}", flush=True)
        try:
            with Client(server.target) as client:
                print(f"health: {client.health()}")
                for m in client.list_models():
                    print(
                        f"model {m.name}: {m.architecture}, input {m.input_dtype}{list(m.input_shape)}, "
                        f"{m.num_training_samples} training samples from {m.num_owners} owners, "
                        f"{m.num_checkpoints} checkpoints, current version {m.current_version}"
                    )
                for v in client.list_versions("digits"):
                    print(
                        f"  {v.name}: created by {v.created_by}, weights sha256 {v.weights_sha256[:16]}..."
                    )
                test = server.engine.test_data("digits")
                prediction = client.predict("digits", test.features)
                shown = min(10, len(test.labels))
                print("first test digits (true -> predicted, confidence):")
                for i in range(shown):
                    p = float(prediction.probabilities[i].max())
                    print(f"  {int(test.labels[i])} -> {int(prediction.labels[i])}  ({p:.2f})")
                acc = float(np.mean(prediction.labels == test.labels))
                print(
                    f"held-out accuracy through the server: {acc:.3f} on {len(test.labels)} digits"
                )
                _forget_neighbours_scan(client, test.features)
        finally:
            server.stop(grace=1.0)
    return 0
