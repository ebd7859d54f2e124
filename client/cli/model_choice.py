"""Which model a command acts on when its model is optional: the only one served, or none."""

from __future__ import annotations

from ..client import Client
from . import exit_codes
from .failures import CommandError


def choose_model(client: Client, given: str | None) -> str:
    """``given``, else the server's only model; a usage error naming the models when the
    server holds several (no silent default)."""
    if given:
        return given
    models = client.list_models()
    if len(models) == 1:
        return models[0].name
    if not models:
        raise CommandError(
            "the server holds no models; train or import one first", exit_codes.NOT_FOUND
        )
    names = ", ".join(m.name.removeprefix("models/") for m in models)
    raise CommandError(f"name the model: the server holds {len(models)} ({names})")
