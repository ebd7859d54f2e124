"""Train a model into a state directory: the offline path behind ``expunge train`` and the demo."""

from __future__ import annotations

from pathlib import Path

from expunge.defenses.architectures import ArchitectureSpec
from expunge.defenses.training import TrainConfig
from expunge.server.engine import Engine, ModelInfo
from expunge.server.errors import InvalidArgument
from expunge.server.main import configure_torch
from expunge.server.settings import Settings
from expunge.server.state.datasets import BUILTIN_DATASETS, Dataset, builtin, load_npz
from expunge.server.state.store import Store


def resolve_dataset(dataset: str, seed: int, data_root: Path | None = None) -> Dataset:
    """A built-in data set by name, or an .npz file (under ``data_root`` when one is set).

    The path is resolved (symlinks followed, ``..`` removed) before the check, so neither
    traversal nor a link placed under the root can reach a file outside it. URLs are
    refused: the server never fetches.
    """
    if dataset in BUILTIN_DATASETS:
        return builtin(dataset, seed)
    if "://" in dataset:
        raise ValueError("URLs are not accepted; copy the file under the data root")
    path = Path(dataset).resolve()
    if data_root is not None and not path.is_relative_to(data_root.resolve()):
        raise ValueError(f"data files must lie under the data root {data_root}")
    try:
        return load_npz(path)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{dataset}: {exc.message}") from exc


def train_model(
    state_dir: Path,
    name: str,
    dataset: str = "digits",
    architecture: str = "mlp",
    epochs: int = 30,
    seed: int = 0,
    hidden: tuple[int, ...] = (32,),
    config: TrainConfig | None = None,
    settings: Settings | None = None,
    test: str | None = None,
    test_fraction: float = 0.2,
) -> ModelInfo:
    """Train version 1 of ``name`` on ``dataset``.

    The held-out set (metrics, the forget's accuracy guard and MIA, Scan's calibration) is
    the ``test`` .npz when given; otherwise a seeded ``test_fraction`` of the rows, which
    are then never trained on.
    """
    settings = settings or Settings(state_dir=state_dir)
    configure_torch(settings)
    data = resolve_dataset(dataset, seed, settings.data_root)
    test_set = resolve_dataset(test, seed, settings.data_root) if test else None
    spec = ArchitectureSpec(architecture, data.input_shape, data.num_classes, hidden=hidden)
    store = Store(state_dir)
    try:
        engine = Engine(store, settings)
        return engine.create_model(
            name,
            data,
            spec,
            config or TrainConfig(epochs=epochs, seed=seed),
            test_fraction=test_fraction,
            test_set=test_set,
        )
    finally:
        store.close()
