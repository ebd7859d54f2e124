"""Scan's Newton-CG confirmation on a large training set takes the large-data counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import make_classification

from expunge.defenses.architectures import ArchitectureSpec
from expunge.defenses.newton import solvers
from expunge.defenses.training import TrainConfig
from expunge.server.engine import Engine
from expunge.server.forget.profile import LARGE_DATA, LARGE_DATA_MIN_SAMPLES
from expunge.server.scan.confirmation import DENSE_HESSIAN_MAX, CounterfactualConfirmation
from expunge.server.scan.settings import ScanSettings
from expunge.server.settings import Settings
from expunge.server.state.datasets import synthetic_owners, validate
from expunge.server.state.store import Store


def test_a_large_training_set_confirms_with_the_large_data_counts(
    tmp_path: Path, monkeypatch: object
) -> None:
    n = LARGE_DATA_MIN_SAMPLES + 500
    x, y = make_classification(n, 8, n_informative=6, n_classes=2, random_state=0)
    data = validate(x.astype(np.float32), y, np.arange(n), synthetic_owners(n, 0), num_classes=2)
    spec = ArchitectureSpec("mlp", (8,), 2, hidden=(640,))
    store = Store(tmp_path / "state")
    try:
        engine = Engine(store, Settings(state_dir=tmp_path / "state", build_index=False))
        engine.create_model(
            "big", data, spec, TrainConfig(epochs=1, polish_iterations=0), test_fraction=0.02
        )
        assert (
            sum(p.numel() for p in engine.snapshot("big").module.parameters()) > DENSE_HESSIAN_MAX
        )
        seen = []
        real = solvers.newton_cg_update

        def recorded(*args: object, **kwargs: object) -> object:
            seen.append((args[6], kwargs.get("full_gradient")))
            return real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(  # type: ignore[attr-defined]
            "expunge.server.scan.confirmation.newton_cg_update", recorded
        )
        settings = ScanSettings(confirmation="newton", large_model_confirmation="newton_cg")
        confirm = CounterfactualConfirmation(engine, settings)
        probe = torch.from_numpy(data.features[:4])
        before = confirm.probabilities("big", None, probe, "newton")
        after = confirm.probabilities("big", torch.arange(200), probe, "newton")
        config, full_gradient = seen[0]
        assert (config.objective_samples, config.hessian_samples) == (
            LARGE_DATA["objective_samples"],
            LARGE_DATA["hessian_samples"],
        )
        assert config.iterations == 1
        assert full_gradient is not None and not full_gradient.any()  # the removal alone
        assert not torch.equal(before, after)  # removing 200 samples moved the model

        # The default: the shared Hessian of the last layers, one removal step from the
        # model taken as the optimum; Newton-CG is never called.
        seen.clear()
        confirm = CounterfactualConfirmation(engine, ScanSettings(confirmation="newton"))
        moved = confirm.probabilities("big", torch.arange(200), probe, "newton")
        assert not seen
        solver = confirm._solver("big")
        names = [n for n, _ in engine.snapshot("big").module.named_parameters()]
        assert solver.selection.names == names[-2:]  # the output layer: 1,282 entries
        assert solver.config.iterations == 1 and solver.config.assume_optimum
        assert not torch.equal(before, moved)
    finally:
        store.close()
