"""Shared fixtures: a tiny model trained on real digits, a state directory, a running server."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

DEMO_EPOCHS = 8


@pytest.fixture(autouse=True)
def server_logging_restored() -> Iterator[None]:
    """A test that runs `expunge serve` in this process configures the server's log (to
    whatever stderr is at the time); put the ``expunge`` logger back as it was, so later
    tests' records do not end up on the terminal."""
    logger = logging.getLogger("expunge")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()  # writes what it queued while the test's capture still holds
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.fixture(scope="session")
def trained_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory holding models/digits (MLP, 8 epochs) trained once per session."""
    from expunge.server.settings import Settings
    from expunge.server.training_job import train_model

    root = tmp_path_factory.mktemp("trained-state")
    train_model(
        root,
        "digits",
        "digits",
        "mlp",
        epochs=DEMO_EPOCHS,
        seed=0,
        settings=Settings(state_dir=root),
    )
    return root


@pytest.fixture
def state_dir(trained_state: Path, tmp_path: Path) -> Path:
    """A private copy of the trained state, so a test may change it."""
    target = tmp_path / "state"
    shutil.copytree(trained_state, target)
    return target


@pytest.fixture
def server(state_dir: Path) -> Iterator[object]:
    from expunge.server.main import start
    from expunge.server.settings import Settings

    running = start(Settings(state_dir=state_dir, port=0))
    yield running
    running.stop(grace=0.5)


@pytest.fixture
def client(server: object) -> Iterator[object]:
    from expunge.client import Client

    with Client(server.target, timeout=60.0, retries=1) as c:  # type: ignore[attr-defined]
        yield c


_exit_status = 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    # The summary is printed by now. With torch, faiss (OpenMP) and gRPC threads loaded, the
    # interpreter's teardown can abort in native destructors and turn a finished run into
    # SIGABRT; end the process with pytest's own exit status instead (as `expunge serve` does).
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
