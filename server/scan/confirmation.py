"""The counterfactual confirmation of a suspected target (DESIGN 4.8).

Remove the input's top proponents from a scratch copy of the model (nothing is committed)
and measure how far the predicted class's probability falls: by retraining from scratch
where that is cheap, else by the shared-Hessian Newton counterfactual (one damped Hessian
per model version), or Newton-CG on every parameter for models too large for a dense
Hessian.
"""

from __future__ import annotations

import copy
import math
import threading

import torch

from expunge.defenses.counterfactual import CounterfactualConfig, SharedHessianCounterfactual
from expunge.defenses.embeddings import trailing_param_names
from expunge.defenses.newton import NewtonConfig, apply_update, newton_cg_update
from expunge.defenses.selection import ParameterSelection
from expunge.defenses.targets import implicated_samples
from expunge.defenses.training import TrainConfig, train
from expunge.server.device import module_on
from expunge.server.engine import Engine
from expunge.server.errors import Aborted
from expunge.server.forget.profile import (
    LARGE_DATA,
    LARGE_DATA_MIN_SAMPLES,
    LARGE_DATA_NEWTON_ITERATIONS,
)
from expunge.server.model_factory import build_architecture
from expunge.server.scan.settings import ScanSettings

DENSE_HESSIAN_MAX = CounterfactualConfig().max_parameters


def changed() -> Aborted:
    return Aborted(
        "the training set changed while this scan ran (a forget was committed); scan again"
    )


class CounterfactualConfirmation:
    """Drops of the predicted class's probability once top proponents are removed."""

    def __init__(self, engine: Engine, settings: ScanSettings) -> None:
        self.engine = engine
        self.settings = settings
        # model -> (version, shared-Hessian solver of that version); one per model kept.
        self._solvers: dict[str, tuple[int, SharedHessianCounterfactual]] = {}
        self._cache_lock = threading.Lock()
        # A solver holds the training data it was built on: gone once a forget commits.
        engine.on_version_change(self._drop_solver)

    def _drop_solver(self, model: str) -> None:
        with self._cache_lock:
            self._solvers.pop(model, None)

    def _weight_decay(self, model: str) -> float:
        return TrainConfig.from_dict(self.engine.model_row(model).train_config).weight_decay

    def mode(self, model: str) -> str:
        """retrain or newton: how a suspected target's removal is checked for this model
        (newton for a model imported without a training configuration: nothing to retrain)."""
        mode = self.settings.confirmation
        if not self.engine.retrainable(model):
            return "newton"
        if mode != "auto":
            return mode
        config = TrainConfig.from_dict(self.engine.model_row(model).train_config)
        size = len(self.engine.training_data(model).labels) * config.epochs
        # A run never timed (-1) is judged by its size alone, as before timing was recorded.
        seconds = self.engine.training_cost(model).retrain_s(size // max(config.epochs, 1))
        cheap = size <= self.settings.retrain_max_sample_epochs
        return "retrain" if cheap and seconds <= self.settings.retrain_max_s else "newton"

    def _proponents(self, model: str, influences: torch.Tensor, label: int) -> torch.Tensor:
        data = self.engine.training_data(model)
        if len(influences) != len(data.labels):
            raise changed()
        return implicated_samples(
            influences.double(),
            data.labels,
            label,
            cutoff=-math.inf,
            limit=self.settings.proponents_removed,
        ).indices

    def drop(self, model: str, x: torch.Tensor, influences: torch.Tensor, mode: str) -> float:
        """Fall of the predicted class's probability once the top proponents are removed.

        x ``(*shape)``; influences ``(n_train,)``. The proponents are the training samples
        of the predicted label with the largest influence; nothing is committed.
        """
        before = self.probabilities(model, None, x.unsqueeze(0), mode)[0]
        label = int(before.argmax())
        removed = self._proponents(model, influences, label)
        after = self.probabilities(model, removed, x.unsqueeze(0), mode)[0, label]
        return float(before[label] - after)

    def drop_without(
        self, model: str, x: torch.Tensor, label: int, removed: torch.Tensor, mode: str
    ) -> float:
        """Fall of P(``label`` | x) once the training rows ``removed`` are removed."""
        before, after = (
            self.probabilities(model, r, x.unsqueeze(0), mode)[0, label] for r in (None, removed)
        )
        return float(before - after)

    def probabilities(
        self, model: str, removed: torch.Tensor | None, x: torch.Tensor, mode: str
    ) -> torch.Tensor:
        """Softmax outputs ``(q, C)`` on ``x`` ``(q, *shape)`` of the current model, or of a
        scratch copy without the training rows ``removed`` (nothing is committed); on the
        CPU, wherever the scratch copy was computed."""
        snapshot = self.engine.snapshot(model)
        if removed is None:
            scratch = snapshot.module
        elif mode == "retrain":
            scratch = self._retrained_without(model, removed)
        elif (
            sum(p.numel() for p in snapshot.module.parameters()) <= DENSE_HESSIAN_MAX
            or self.settings.large_model_confirmation == "trailing_layers"
        ):
            scratch = self._solver(model).removed(removed)
        else:
            scratch = self._newton_cg_without(model, removed)
        device = next(scratch.parameters()).device
        with torch.no_grad():
            return torch.softmax(scratch(x.to(device)), dim=1).cpu()

    def _retrained_without(self, model: str, removed: torch.Tensor) -> torch.nn.Module:
        """The model retrained from scratch without ``removed``: same spec, config and seed."""
        row = self.engine.model_row(model)
        data = self.engine.training_data(model)
        keep = torch.ones(len(data.labels), dtype=torch.bool)
        keep[removed] = False
        config = TrainConfig.from_dict({**row.train_config, "checkpoints": 1})
        spec = self.engine.snapshot(model).spec
        scratch = build_architecture(spec, self.engine.settings.trusted_factories, config.seed)
        train(scratch, data.features[keep], data.labels[keep], config, device=self.engine.device)
        scratch.eval()
        return scratch

    def _newton_cg_without(self, model: str, removed: torch.Tensor) -> torch.nn.Module:
        """Large models: Newton-CG (Hessian-vector products) on every parameter.

        On a large training set (the forget's large-data floor) it takes the forget's
        large-data counts: one step, J' on 512 retained samples, Hessian-vector products
        on 256, and the removal alone (the model taken as the optimum of J, as the forget
        does by default): a subsample's measured gradient would be mostly sampling noise.
        Each confirmation otherwise passed over every retained sample several times (a
        532k-parameter CNN on 5,000 images: minutes per scan).
        """
        snapshot = self.engine.snapshot(model)
        data = self.engine.training_data(model)
        forget = torch.zeros(len(data.labels), dtype=torch.bool)
        forget[removed] = True
        scratch = copy.deepcopy(snapshot.module).to(self.engine.device)
        large = len(data.labels) >= LARGE_DATA_MIN_SAMPLES
        config = (
            NewtonConfig(
                iterations=LARGE_DATA_NEWTON_ITERATIONS,
                hessian_samples=LARGE_DATA["hessian_samples"],
                objective_samples=LARGE_DATA["objective_samples"],
                cg_iterations=LARGE_DATA["ranking_cg_iterations"],
            )
            if large
            else NewtonConfig(iterations=self.settings.newton_iterations, hessian_samples=1000)
        )
        result = newton_cg_update(
            scratch,
            data.features[forget],
            data.labels[forget],
            data.features[~forget],
            data.labels[~forget],
            self._weight_decay(model),
            config,
            full_gradient=(
                torch.zeros(sum(p.numel() for p in scratch.parameters())) if large else None
            ),
        )
        apply_update(scratch, ParameterSelection.everything(scratch), result)
        scratch.eval()
        return scratch

    def _solver(self, model: str) -> SharedHessianCounterfactual:
        """The shared-Hessian counterfactual of the current version (built once per version)."""
        snapshot = self.engine.snapshot(model)
        with self._cache_lock:
            cached = self._solvers.get(model)
            if cached is not None and cached[0] == snapshot.version:
                return cached[1]
            data = self.engine.training_data(model)
            module = snapshot.module
            selection = None
            if sum(p.numel() for p in module.parameters()) > DENSE_HESSIAN_MAX:
                # Too large for one dense Hessian: the removal moves the last layers only
                # (last-layer influence), and the calibration uses the same counterfactual.
                names = trailing_param_names(module, DENSE_HESSIAN_MAX)
                params = dict(module.named_parameters())
                selection = ParameterSelection(
                    {n: torch.arange(params[n].numel()) for n in names}, names
                )
            large = len(data.labels) >= LARGE_DATA_MIN_SAMPLES
            config = CounterfactualConfig(
                # As the forget's large-data profile: one removal step, the model taken as
                # the optimum, so a confirmation never passes over every training sample.
                iterations=LARGE_DATA_NEWTON_ITERATIONS
                if large
                else self.settings.newton_iterations,
                assume_optimum=large,
                # Exact for an output layer (the logits are linear in it), PSD before it,
                # and one Jacobian per sample instead of a Hessian-vector product per entry.
                hessian="exact" if selection is None else "gauss_newton",
            )
            # The solver computes on its model's device and keeps its own copy there.
            solver = SharedHessianCounterfactual(
                module_on(snapshot.module, self.engine.device),
                data.features,
                data.labels,
                self._weight_decay(model),
                config,
                selection,
            )
            self._solvers[model] = (snapshot.version, solver)
            return solver
