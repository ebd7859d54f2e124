"""The ``expunge`` command line as a script sees it: exit codes, one-line errors, --json,
operations that can be followed again, progress and closed pipes."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from sklearn.datasets import load_digits

from expunge.client import Client, DeadlineExceededError
from expunge.client.cli import build_parser, exit_codes, main
from expunge.client.cli import progress as progress_module

CLI = [sys.executable, "-m", "expunge.client.cli"]
SUBPROCESS_TIMEOUT_S = 120
INDEX_READY_TIMEOUT_S = 120
# What `expunge serve` logs (server/telemetry/logs.py): text records start with a time.
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\dT|^\{")
WINE_LOGREG = ["--dataset", "wine", "--architecture", "logreg", "--epochs", "2"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, code: int, expected: int, *phrases: str) -> None:
    """The command's own stderr (a server's log records aside) is one line."""
    assert code == expected, err
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if not LOG_RECORD.match(line)]
    assert len(said) == 1, err
    for phrase in phrases:
        assert phrase in err, err


def digits_inputs(path: Path, n: int) -> Path:
    """``n`` digits as the served model takes them: float32 (n, 1, 8, 8) in [0, 1]."""
    x = (load_digits().data[:n] / 16.0).astype(np.float32).reshape(n, 1, 8, 8)
    np.savez(path, inputs=x)
    return path


def owner(server: Any, index: int = 0) -> str:
    owners = sorted(set(server.engine.training_data("digits").owner_ids.tolist()))
    return str(owners[index])


def wait_index_ready(target: str) -> None:
    with Client(target) as client:
        deadline = time.monotonic() + INDEX_READY_TIMEOUT_S
        while client.get_model("digits").index.state != "READY":
            assert time.monotonic() < deadline, "the gradient index never became ready"
            time.sleep(0.2)


@pytest.fixture
def target(server: Any) -> str:
    return str(server.target)


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    return digits_inputs(tmp_path / "inputs.npz", 3)


# Version, help, exit codes ---------------------------------------------------------------


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"expunge {metadata.version('expunge')}\n"
    with pytest.raises(SystemExit):
        main(["--json", "--version"])
    assert json.loads(capsys.readouterr().out) == {"version": metadata.version("expunge")}


def test_the_module_runs_with_dash_m() -> None:
    done = subprocess.run(
        [*CLI, "--version"], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
    )
    assert done.returncode == 0 and done.stdout.startswith("expunge "), done.stderr


def _leaf_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in action.choices.values():
            yield from _leaf_parsers(child)


def test_help_gives_every_option_a_text_and_lists_the_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    leaves = list(_leaf_parsers(build_parser()))
    assert len(leaves) >= 20
    for leaf in leaves:
        for action in leaf._actions:
            assert action.help, f"{leaf.prog} {action.option_strings or action.dest}: no help"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for entry in exit_codes.TABLE:
        assert f"{entry.code:>3}  {entry.name}:" in out
    for command in ("show", "neighbors", "export", "rollback", "operations", "estimate", "health"):
        assert command in out


def test_every_client_error_maps_to_a_documented_code() -> None:
    from expunge.client import errors

    documented = {e.code for e in exit_codes.TABLE}
    for code in errors._BY_CODE:
        assert exit_codes.for_status(code.name) in documented
    assert exit_codes.for_status("NOT_FOUND") == exit_codes.NOT_FOUND
    assert exit_codes.for_status("INVALID_ARGUMENT") == exit_codes.INVALID_ARGUMENT
    assert exit_codes.for_status("FAILED_PRECONDITION") == exit_codes.FAILED_PRECONDITION
    assert exit_codes.for_status("UNAUTHENTICATED") == exit_codes.PERMISSION
    assert exit_codes.for_status("DEADLINE_EXCEEDED") == exit_codes.RETRY_LATER
    assert exit_codes.for_status("INTERNAL") == exit_codes.FAILED


# User mistakes: one line, no traceback, the documented code ----------------------------------


def test_user_mistakes_are_one_line_with_their_exit_code(
    target: str,
    state_dir: Path,
    inputs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, a=np.zeros(2), b=np.ones(2))
    t = ["--target", target]
    cases: list[tuple[list[str], int, tuple[str, ...]]] = [
        (
            [*t, "predict", "digits", str(tmp_path / "missing.npz")],
            2,
            ("missing.npz: no such file",),
        ),
        (
            [*t, "predict", "digits", str(wrong)],
            2,
            (f"expunge predict: {wrong}: no array 'inputs' (has: a, b)",),
        ),
        ([*t, "predict", "my_model", str(inputs)], 5, ("INVALID_ARGUMENT", "my_model")),
        ([*t, "versions", "nosuch"], 4, ("NOT_FOUND",)),
        ([*t, "--tls-ca", str(tmp_path / "ca.pem"), "models"], 2, ("ca.pem: no such file",)),
        ([*t, "operations", "get", "nosuch"], 4, ("NOT_FOUND",)),
        ([*t, "forget", "digits"], 2, ("--owner, --sample or --sample-key",)),
        ([*t, "forget", "--selection", "nonsense"], 2, ("invalid choice",)),
        ([*t, "rollback", "digits", "7"], 4, ("NOT_FOUND",)),
        ([*t, "scan", str(inputs), "--report", str(tmp_path / "no" / "r.html")], 2, ("--report",)),
        (["serve", "--config", str(tmp_path / "missing.toml")], 2, ("missing.toml: no such file",)),
        (["serve", "--state-dir", str(state_dir), "--port", "0"], 3, ("is in use by",)),
        (["serve", "--log-level", "LOUD"], 2, ("--log-level",)),
        (
            ["train", "--state-dir", str(tmp_path / "s"), "--name", "my_model", "--epochs", "1"],
            5,
            ("INVALID_ARGUMENT", "my_model"),
        ),
        (["train", "--state-dir", str(state_dir), "--name", "x"], 3, ("is in use by",)),
        (
            ["train", "--state-dir", str(tmp_path / "s"), "--name", "x", "--dataset", "nope.npz"],
            2,
            ("--dataset nope.npz: no such file",),
        ),
        (
            ["train", "--state-dir", str(tmp_path / "s"), "--name", "x", "--test", "nope.npz"],
            2,
            ("--test nope.npz: no such file",),
        ),
        (
            ["train", "--state-dir", str(tmp_path / "s"), "--name", "x", "--test-fraction", "1"],
            2,
            ("--test-fraction 1.0: must lie strictly between 0 and 1",),
        ),
        (["import", str(tmp_path / "nodir"), "--name", "x"], 2, ("nodir: no such directory",)),
        (["import", str(tmp_path), "--name", "x"], 2, ("no expunge.toml",)),
        (["prune", "--state-dir", str(tmp_path / "none")], 2, ("no state directory here",)),
        (["prune", "--state-dir", str(state_dir)], 3, ("is in use by",)),
        (["demo", "--state-dir", str(state_dir)], 3, ("is in use by",)),
    ]
    for args, expected, phrases in cases:
        code, out, err = run(capsys, *args)
        assert_one_line_error(err, code, expected, *phrases)
        assert out == "", args
        # With --json the same failure is also one JSON object on stdout.
        code, out, err = run(capsys, "--json", *args)
        assert_one_line_error(err, code, expected, *phrases)
        assert json.loads(out)["error"]["exit_code"] == expected, args


def test_train_takes_its_held_out_set_from_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from expunge.server.state.datasets import builtin
    from expunge.server.state.store import Store

    data = builtin("wine")
    for name, rows in (("train", slice(0, 150)), ("test", slice(150, None))):
        np.savez(
            tmp_path / f"{name}.npz",
            features=data.features[rows],
            labels=data.labels[rows],
            sample_ids=data.sample_ids[rows],
            owner_ids=data.owner_ids[rows],
        )
    state = tmp_path / "state"
    code, out, err = run(
        capsys, "--json", "train", "--state-dir", str(state), "--name", "wine",
        "--dataset", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz"),
        "--architecture", "logreg", "--epochs", "2",
    )  # fmt: skip
    assert code == 0, err
    assert "test_accuracy" in json.loads(out)["metrics"]
    store = Store(state)
    try:
        version = store.version("wine", 1)
        assert version is not None and version.num_samples == 150  # nothing held out of it
    finally:
        store.close()


def test_a_bad_setting_in_the_environment_is_named(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "serve", "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        env={**os.environ, "EXPUNGE_PORT": "abc"},
    )
    assert_one_line_error(done.stderr, done.returncode, 2, "EXPUNGE_PORT", "'abc'")
    assert done.stdout == ""


def test_serve_passes_metrics_and_log_options_to_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import expunge.server.main

    served: list[Any] = []
    monkeypatch.setattr(expunge.server.main, "serve", served.append)
    code, out, _ = run(
        capsys,
        "--json",
        "serve",
        "--state-dir",
        str(tmp_path),
        "--metrics-port",
        "0",
        "--log-level",
        "DEBUG",
        "--log-format",
        "json",
    )
    assert code == 0 and json.loads(out)["served"] is True
    (settings,) = served
    assert (settings.metrics_port, settings.log_level, settings.log_format) == (0, "DEBUG", "json")
    assert settings.state_dir == tmp_path


# --json on every command ------------------------------------------------------------------


def _write_repository(root: Path) -> Path:
    """A logistic regression on breast cancer, as a model trained elsewhere is shipped."""
    from safetensors.torch import save_file

    from expunge.defenses.architectures import ArchitectureSpec, build_model
    from expunge.server.state.datasets import builtin

    data = builtin("breast_cancer")
    model = build_model(ArchitectureSpec("logreg", (30,), 2), seed=0)
    root.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "w.safetensors")
    for name, rows in (("train", slice(0, 400)), ("test", slice(400, None))):
        np.savez(
            root / f"{name}.npz",
            features=data.features[rows],
            labels=data.labels[rows],
            sample_ids=data.sample_ids[rows],
            owner_ids=data.owner_ids[rows],
        )
    (root / "expunge.toml").write_text(
        'format = "expunge-model-repository-v1"\n[model]\narchitecture = "logreg"\n'
        'input_shape = [30]\nnum_classes = 2\nweights = "w.safetensors"\n'
        "[objective]\nweight_decay = 0.001\n"
        '[data]\ntrain = "train.npz"\ntest = "test.npz"\n'
    )
    return root


@pytest.fixture
def quick_scan_server(state_dir: Path) -> Iterator[Any]:
    """A server whose scans confirm with Newton steps, not retrains: a scan's calibration
    takes a fraction of a second instead of a quarter of a minute."""
    from expunge.server.main import start
    from expunge.server.settings import Settings

    running = start(Settings(state_dir=state_dir, port=0, scan_confirmation="newton"))
    yield running
    running.stop(grace=0.5)


def test_json_output_of_every_command_is_one_document(
    quick_scan_server: Any,
    inputs: Path,
    trained_state: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = quick_scan_server
    target = str(server.target)
    wait_index_ready(target)
    repository = _write_repository(tmp_path / "repo")
    idle_state = tmp_path / "idle"
    shutil.copytree(trained_state, idle_state)
    one_input = digits_inputs(tmp_path / "one.npz", 1)
    t = ["--target", target]
    commands: list[list[str]] = [
        [*t, "models"],
        [*t, "show", "digits"],
        [*t, "versions", "digits"],
        [*t, "predict", "digits", str(inputs)],
        [*t, "neighbors", "digits", str(inputs), "-k", "3"],
        [*t, "export", "digits", "--output", str(tmp_path / "w.safetensors")],
        [*t, "estimate", "digits", str(one_input)],
        [*t, "scan", str(one_input)],
        [*t, "health"],
        [*t, "forget", "--owner", owner(server), "--request-id", "json-forget"],
        [*t, "retrain", "digits", "--request-id", "json-retrain"],
        [*t, "rollback", "digits", "2"],
        [*t, "operations", "list"],
        [*t, "operations", "get", "json-forget"],
        [*t, "operations", "watch", "json-retrain"],
        [*t, "operations", "cancel", "json-retrain"],
        [*t, "audit", "--model", "digits"],
        [*t, "import", str(repository), "--name", "uploaded"],
        ["import", str(repository), "--name", "cancer", "--state-dir", str(tmp_path / "s1")],
        ["train", "--state-dir", str(tmp_path / "s2"), "--name", "wine", *WINE_LOGREG],
        ["prune", "--state-dir", str(idle_state)],
        # A server started here would run until stopped; a refusal is a document too.
        ["serve", "--state-dir", str(server.settings.state_dir), "--port", "0"],
        ["demo", "--state-dir", str(server.settings.state_dir)],
    ]

    def name(command: list[str]) -> str:
        words = command[2:] if command[0] == "--target" else command
        return " ".join(words[:2] if words[0] == "operations" else words[:1])

    leaves = {leaf.prog.removeprefix("expunge ") for leaf in _leaf_parsers(build_parser())}
    assert {name(c) for c in commands} == leaves
    documents = {}
    for command in commands:
        # --json after the command works as well as before it.
        flagged = ["--json", *command] if len(documents) % 2 else [*command, "--json"]
        code, out, err = run(capsys, *flagged)
        assert "Traceback" not in err
        documents[" ".join(command[:4])] = document = json.loads(out)  # one document only
        if command[0] in ("serve", "demo"):
            assert code == exit_codes.IN_USE and document["error"]["exit_code"] == code
        else:
            assert code == 0, (command, err)
            assert "error" not in document, command
    forget = documents[f"--target {target} forget --owner"]
    assert forget["state"] == "SUCCEEDED" and forget["receipt"]["removed_owners"] == 1
    predict = documents[f"--target {target} predict digits"]
    assert len(predict["labels"]) == 3 and len(predict["probabilities"][0]) == 10


def test_export_to_stdout_writes_the_weights(
    target: str, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert main(["--target", target, "export", "digits", "--output", "-"]) == 0
    with Client(target) as client:
        assert capsysbinary.readouterr().out == client.export_model("digits")
    assert main(["--target", target, "--json", "export", "digits", "-o", "-"]) == 2


# Operations: named on acceptance, listed, followed again, cancelled ---------------------------


def test_forget_names_the_operation_then_says_when_nothing_is_left_to_forget(
    server: Any,
    target: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    who = owner(server)
    args = ["--target", target, "forget", "--owner", who]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    first = err.splitlines()[0]
    name = first.split()[1]
    assert first == (
        f"operation {name} accepted; follow with: expunge --target {target} operations watch {name}"
    )
    assert out.startswith(f"{name}: SUCCEEDED\nversion 1 -> 2: removed ")
    # On a pipe (capsys is one), progress is a line per phase: no carriage returns.
    assert "\r" not in err and f"{name}: SUCCEEDED done" in err
    code, out, err = run(capsys, *args)
    assert code == 0
    assert out.splitlines()[1] == (
        "nothing to forget: 1 owner(s) already forgotten; model stays at version 2"
    )
    # On a terminal the bar redraws in place and ends its line.
    monkeypatch.setattr(progress_module, "is_terminal", lambda stream: True)
    code, out, err = run(capsys, *args[:-1], owner(server, 1))
    assert code == 0
    assert "\r" in err and err.endswith("\n") and "version 2 -> 3" in out


def test_following_stops_at_a_deadline_or_ctrl_c_and_says_how_to_resume(
    server: Any,
    target: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def deadline(self: Client, name: str, **kwargs: Any) -> None:
        raise DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, "Stream removed")

    def interrupt(self: Client, name: str, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    resume = f"expunge --target {target} operations watch operations/"
    with monkeypatch.context() as patch:
        patch.setattr(Client, "wait", deadline)
        code, _, err = run(
            capsys, "--target", target, "forget", "--owner", owner(server), "--request-id", "d1"
        )
        assert code == exit_codes.RETRY_LATER and "Traceback" not in err
        assert "stopped following operations/d1 after 600 s" in err and f"{resume}d1" in err
        patch.setattr(Client, "wait", interrupt)
        code, _, err = run(capsys, "--target", target, "retrain", "--request-id", "i1")
        assert code == exit_codes.INTERRUPTED and f"{resume}i1" in err
        assert "Traceback" not in err
    # The forget went on on the server; watching it again ends with its receipt.
    code, out, err = run(capsys, "--target", target, "operations", "watch", "operations/d1")
    assert code == 0, err
    assert out.startswith("operations/d1: SUCCEEDED\nversion 1 -> 2")
    code, out, err = run(capsys, "--target", target, "--json", "operations", "watch", "i1")
    assert code == 0 and json.loads(out)["retrain_receipt"]["new_version"] == 3


def test_operations_list_get_watch_and_cancel(
    server: Any, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ["--target", target]
    with Client(target) as client, server.engine.store.write_lock:
        # The worker waits for the lock, so what is submitted now stays queued.
        client.forget("digits", owner_ids=[owner(server, 0)], request_id="first")
        code, out, err = run(
            capsys, *t, "forget", "--owner", owner(server, 1), "--request-id", "second", "--no-wait"
        )
        assert code == 0, err
        assert out.startswith("operations/second: PENDING")
        assert "operation operations/second accepted" in err
        code, out, _ = run(capsys, *t, "operations", "list", "--state", "PENDING")
        assert out.splitlines()[0].split() == ["NAME", "KIND", "MODEL", "STATE", "PHASE", "CREATED"]
        assert "operations/second" in out and "operations/first" not in out
        code, out, _ = run(capsys, *t, "--json", "operations", "list", "--model", "digits")
        assert [o["name"] for o in json.loads(out)["operations"]][:2] == [
            "operations/second",
            "operations/first",
        ]
        code, out, _ = run(capsys, *t, "operations", "list", "--limit", "1")
        assert len(out.splitlines()) == 2
        code, out, _ = run(capsys, *t, "operations", "cancel", "second")
        assert code == 0 and out == "operations/second: CANCELLED\n"
    code, out, err = run(capsys, *t, "operations", "watch", "second")
    assert_one_line_error(err, code, exit_codes.FAILED, "operations/second CANCELLED")
    assert out.startswith("operations/second: CANCELLED")
    code, out, _ = run(capsys, *t, "operations", "watch", "first")
    assert code == 0 and "version 1 -> 2" in out
    code, out, _ = run(capsys, *t, "operations", "get", "operations/first")
    assert code == 0 and out.startswith("operations/first: SUCCEEDED")


def test_models_and_versions_print_a_header_row(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--target", target, "models")
    header, row = out.splitlines()
    assert header.split()[:3] == ["NAME", "ARCHITECTURE", "VERSION"]
    assert row.split()[:3] == ["models/digits", "mlp", "1"]
    assert header.index("ARCHITECTURE") == row.index("mlp")  # aligned
    code, out, _ = run(capsys, "--target", target, "versions", "digits")
    assert code == 0
    assert out.splitlines()[0].split()[:3] == ["VERSION", "PARENT", "CREATED_BY"]


# The model is named unless the server holds exactly one ------------------------------------


def test_the_model_must_be_named_when_the_server_holds_two(
    state_dir: Path, inputs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from expunge.server.main import start
    from expunge.server.settings import Settings
    from expunge.server.training_job import train_model

    settings = Settings(state_dir=state_dir, port=0, build_index=False)
    train_model(state_dir, "wine", "wine", "logreg", epochs=2, seed=0, settings=settings)
    running = start(settings)
    try:
        t = ["--target", running.target]
        for args in (
            ["forget", "--owner", "u0001"],
            ["retrain"],
            ["scan", str(inputs)],
        ):
            code, out, err = run(capsys, *t, *args)
            assert_one_line_error(err, code, exit_codes.USAGE, "name the model", "(digits, wine)")
            assert out == ""
    finally:
        running.stop(0.5)


# Pipes: no tracebacks when the reader goes, no carriage returns in a log ----------------------


def test_a_closed_pipe_ends_quietly_and_progress_on_a_pipe_has_no_redraws(
    server: Any, target: str, tmp_path: Path
) -> None:
    many = digits_inputs(tmp_path / "many.npz", 1000)
    reader_gone = subprocess.Popen(
        [*CLI, "--target", target, "predict", "digits", str(many)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert reader_gone.stdout is not None and reader_gone.stderr is not None
    reader_gone.stdout.close()  # as `| head` does once it has what it wants
    err = reader_gone.stderr.read().decode()
    assert reader_gone.wait(SUBPROCESS_TIMEOUT_S) == exit_codes.BROKEN_PIPE
    assert err == ""
    followed = subprocess.run(
        [*CLI, "--target", target, "forget", "digits", "--owner", owner(server)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert followed.returncode == 0, followed.stderr
    assert "\r" not in followed.stderr
    lines = followed.stderr.splitlines()
    assert lines[0].startswith("operation operations/") and "accepted" in lines[0]
    assert lines[-1].endswith(": SUCCEEDED done")
