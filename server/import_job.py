"""Import a model repository into a state directory: the offline path behind ``expunge import``."""

from __future__ import annotations

from pathlib import Path

from expunge.server.engine import Engine, ModelInfo
from expunge.server.main import configure_torch
from expunge.server.settings import Settings
from expunge.server.state.repository import read_repository
from expunge.server.state.store import Store


def import_model(
    state_dir: Path, directory: Path, name: str, settings: Settings | None = None
) -> ModelInfo:
    """Validate the repository at ``directory`` and store it as ``name`` version 1."""
    settings = settings or Settings(state_dir=state_dir)
    configure_torch(settings)
    repository = read_repository(directory, settings.trusted_factories)
    store = Store(state_dir)
    try:
        return Engine(store, settings).import_model(name, repository)
    finally:
        store.close()
