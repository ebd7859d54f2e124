"""``expunge demo``: train on scikit-learn's digits, serve on 127.0.0.1, and call it with the client."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from expunge.client import Client

from .main import start
from .settings import Settings
from .training_job import train_model


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
        finally:
            server.stop(grace=1.0)
    return 0
