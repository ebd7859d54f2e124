"""What the server-only commands (serve, demo, train, import --state-dir, prune) share:
the server extra imported lazily, its settings loaded with errors naming the file or
setting, and its process-level refusals (a held state directory or port, a missing
device) turned into exit codes."""

from __future__ import annotations

import importlib
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from . import exit_codes
from .failures import CommandError

if TYPE_CHECKING:
    from expunge.server.settings import Settings

# The server's settings choices (server/settings.py), repeated because the client never
# imports the server (or torch) to build its parser.
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
SERVER_HINT = "this command needs the server extra: pip install 'expunge[server]'"


def server_module(name: str) -> ModuleType:
    """``expunge.server.<name>``, or a usage error saying to install the server extra."""
    try:
        return importlib.import_module(f"expunge.server.{name}")
    except ImportError as exc:
        raise CommandError(f"{SERVER_HINT} ({exc})") from None


def load_settings(config: str | None, **overrides: Any) -> Settings:
    """Defaults < ``config`` < ``EXPUNGE_*`` < ``overrides``; a usage error naming the
    file or setting when one is wrong."""
    settings = server_module("settings")
    path = Path(config) if config else None
    if path is not None and not path.is_file():
        raise CommandError(f"--config {path}: no such file")
    try:
        return settings.load_settings(path, **overrides)  # type: ignore[no-any-return]
    except tomllib.TOMLDecodeError as exc:
        raise CommandError(f"{path}: not valid TOML ({exc})") from None
    except ValueError as exc:  # a setting's value, type or name; the message names it
        where = f" (in {path})" if path is not None and str(exc).startswith("unknown") else ""
        raise CommandError(f"{exc}{where}") from None


@contextmanager
def refusals() -> Iterator[None]:
    """Turn the server's refusals to start into exit codes: IN_USE for a state directory or
    port held by another process; USAGE for a missing device, Ray missing for executor =
    "ray", or an unsafe bind."""
    try:
        yield
    except Exception as exc:
        if isinstance(
            exc, _loaded("state.state_lock", "StateDirectoryInUse") + _loaded("main", "PortInUse")
        ):
            raise CommandError(str(exc), exit_codes.IN_USE) from None
        if isinstance(
            exc,
            _loaded("main", "InsecureBindRefused")
            + _loaded("device", "DeviceUnavailable")
            + _loaded("executors.factory", "ExecutorUnavailable"),
        ):
            raise CommandError(str(exc)) from None
        raise


def _loaded(module: str, name: str) -> tuple[type[BaseException], ...]:
    """The class ``expunge.server.<module>.<name>`` if that module is loaded (only then can
    it have been raised), else nothing: checking never imports the server."""
    loaded = sys.modules.get(f"expunge.server.{module}")
    return (getattr(loaded, name),) if loaded is not None else ()


def require_state(state_dir: str) -> Path:
    """An existing state directory (one ``expunge train`` or ``serve`` wrote)."""
    path = Path(state_dir)
    if not (path / "expunge.db").is_file():
        raise CommandError(f"--state-dir {path}: no state directory here (no expunge.db)")
    return path
