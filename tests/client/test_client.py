"""Client behaviour: retries on UNAVAILABLE only, deadlines, typed errors, CLI."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from expunge.client import Client, NotFoundError, UnavailableError
from expunge.client.cli import main as cli_main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unavailable_is_retried_until_the_server_comes_up(state_dir: Path) -> None:
    from expunge.server.main import start
    from expunge.server.settings import Settings

    port = _free_port()
    holder: dict[str, object] = {}

    def late_start() -> None:
        time.sleep(0.6)
        holder["server"] = start(Settings(state_dir=state_dir, port=port))

    thread = threading.Thread(target=late_start)
    thread.start()
    try:
        with Client(f"127.0.0.1:{port}", retries=6, backoff=0.1, timeout=5) as client:
            assert client.list_models()[0].name == "models/digits"
    finally:
        thread.join()
        holder["server"].stop(0)  # type: ignore[attr-defined]


def test_unavailable_surfaces_after_the_retries_are_spent() -> None:
    started = time.perf_counter()
    with Client(f"127.0.0.1:{_free_port()}", retries=2, backoff=0.05, timeout=2) as client:
        with pytest.raises(UnavailableError):
            client.list_models()
    assert time.perf_counter() - started < 10


def test_other_errors_are_not_retried(client: Client) -> None:
    calls = 0
    original = client._stub.GetModel

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    client._stub.GetModel = counting  # type: ignore[method-assign]
    with pytest.raises(NotFoundError):
        client.get_model("absent")
    assert calls == 1


def test_cli_lists_models_and_predicts(
    server: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = server.target  # type: ignore[attr-defined]
    assert cli_main(["--target", target, "models"]) == 0
    assert re.search(r"^models/digits +mlp +1 ", capsys.readouterr().out, re.MULTILINE)
    inputs = tmp_path / "inputs.npz"
    test = server.engine.test_data("digits")  # type: ignore[attr-defined]
    np.savez(inputs, inputs=test.features[:3])
    assert cli_main(["--target", target, "predict", "digits", str(inputs)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(len(line.split("\t")) == 3 for line in lines)
    assert cli_main(["--target", target, "versions", "nosuch"]) == 4  # exit_codes.NOT_FOUND
    assert "NOT_FOUND" in capsys.readouterr().err


def test_cli_help_reads_well(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    for command in ("serve", "demo", "train", "models", "predict", "forget", "scan"):
        assert command in out


def test_cli_forgets_an_owner_with_progress_and_receipt(
    server: object, capsys: pytest.CaptureFixture[str]
) -> None:
    target = server.target  # type: ignore[attr-defined]
    data = server.engine.training_data("digits")  # type: ignore[attr-defined]
    owner = str(data.owner_ids[0])
    removed = int((data.owner_ids == owner).sum())
    args = ["--target", target, "forget", "digits", "--owner", owner, "--request-id", "cli-1"]
    assert cli_main([*args, "--selection", "lcodec_cg"]) == 0
    out, err = capsys.readouterr()
    assert ": SUCCEEDED" in out
    assert f"version 1 -> 2: removed {removed} samples of 1 owners" in out
    assert "path: lcodec_cg (selection asked for explicitly)" in out
    assert re.search(
        r"method: lcodec_cg \(\d+ entries: at least \d+, grown to 99% of the ranked step; "
        r"\d+ candidates\)",
        out,
    )
    # On a pipe (capsys is one) progress is a plain line per phase, ending at done.
    assert "\r" not in err and err.rstrip().splitlines()[-1].endswith(": SUCCEEDED done")
    # A retry with the same request id reports the same operation, nothing removed twice.
    assert cli_main([*args, "--selection", "lcodec_cg"]) == 0
    again, _ = capsys.readouterr()
    assert again.splitlines()[0] == out.splitlines()[0]
    after = server.engine.training_data("digits")  # type: ignore[attr-defined]
    assert len(after.sample_ids) == len(data.sample_ids) - removed
    assert owner not in set(after.owner_ids.tolist())
