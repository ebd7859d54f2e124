"""Structured logs through a real server: one access record per call, lifecycle events, no ids."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from sklearn.datasets import load_digits

from expunge.client import Client, NotFoundError, PermissionDeniedError, UnauthenticatedError
from expunge.server.edge.interceptors import token_digest
from expunge.server.main import start
from expunge.server.settings import Settings
from expunge.server.telemetry.logs import configure_logging, flush_logging, reset_logging
from expunge.v1 import expunge_pb2 as pb
from expunge.v1 import expunge_pb2_grpc as pb_grpc

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """JSON logs of the ``expunge`` loggers into a buffer, for one test."""
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    yield stream
    reset_logging()


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line as a JSON object (a line that does not parse fails the test)."""
    flush_logging()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def access(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["logger"] == "expunge.access"]


def test_every_call_writes_one_access_record_and_the_lifecycle_is_logged(
    state_dir: Path, captured: io.StringIO
) -> None:
    running = start(Settings(state_dir=state_dir, port=0, build_index=False))
    owner = str(running.engine.training_data("digits").owner_ids[0])
    inputs = (load_digits().data[:2] / 16).astype(np.float32).reshape(2, 1, 8, 8)
    try:
        with Client(running.target, timeout=60.0, retries=0) as client:
            client.list_models()
            client.predict("digits", inputs)
            with pytest.raises(NotFoundError):
                client.get_model("no-such-model")
            op = client.forget("digits", owner_ids=[owner])
            done = running.forget.wait_done(op.name.removeprefix("operations/"), 120)
            assert done is not None and done.state == "SUCCEEDED"
            client.get_operation(op.name)
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.ExpungeStub(channel)
            stub.ListModels(pb.ListModelsRequest(), metadata=(("x-request-id", "trace-42"),))
            stub.ListModels(pb.ListModelsRequest(), metadata=(("x-request-id", "bad id"),))
    finally:
        running.stop(grace=0.5)

    flush_logging()

    text = captured.getvalue()
    entries = records(captured)
    for entry in entries:
        assert RFC3339_UTC.fullmatch(entry["time"]), entry
        assert {"level", "logger", "message"} <= set(entry)
    calls = access(entries)
    assert Counter((e["method"], e["code"]) for e in calls) == {
        ("ListModels", "OK"): 3,
        ("Predict", "OK"): 1,
        ("GetModel", "NOT_FOUND"): 1,
        ("Forget", "OK"): 1,
        ("GetOperation", "OK"): 1,
    }
    for entry in calls:
        assert entry["role"] == "local"
        assert entry["latency_ms"] >= 0
        assert entry["peer"].startswith(("ipv4:", "ipv6:"))
        assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+|trace-42", entry["request_id"]), entry
    assert [e["request_id"] for e in calls].count("trace-42") == 1  # the bad one was replaced
    assert len({e["request_id"] for e in calls}) == len(calls)  # each call its own
    (forget_call,) = [e for e in calls if e["method"] == "Forget"]
    assert forget_call["operation"] == op.name

    events = {e.get("event"): e for e in entries if e["logger"].startswith("expunge.server")}
    assert {"start", "ready", "forget_committed", "shutdown"} <= set(events)
    committed = events["forget_committed"]
    assert committed["model"] == "digits" and committed["operation"] == op.name
    assert committed["new_version"] == done.result["new_version"]  # type: ignore[index]
    assert committed["removed_samples"] >= 1 and committed["removed_owners"] == 1
    assert committed["path"] and committed["seconds"] >= 0
    # Counts only: the owner forgotten never appears, in any record.
    assert owner not in text


def test_refused_calls_are_logged_with_the_role_and_never_the_token(
    state_dir: Path, captured: io.StringIO
) -> None:
    tokens = {"read-secret-1f3a": "read"}
    running = start(
        Settings(
            state_dir=state_dir,
            port=0,
            build_index=False,
            token_sha256_roles={token_digest(t): r for t, r in tokens.items()},
        )
    )
    try:
        with Client(running.target, retries=0) as anonymous:
            with pytest.raises(UnauthenticatedError):
                anonymous.list_models()
            assert anonymous.health() == "SERVING"  # open, and not an INFO access record
        with Client(running.target, token="read-secret-1f3a", retries=0) as reader:
            reader.list_models()
            with pytest.raises(PermissionDeniedError):
                reader.forget("digits", sample_ids=[1])
    finally:
        running.stop(grace=0.5)
    flush_logging()
    text = captured.getvalue()
    calls = access(records(captured))
    assert [(e["method"], e["code"], e["role"]) for e in calls] == [
        ("ListModels", "UNAUTHENTICATED", "unidentified"),
        ("ListModels", "OK", "read"),
        ("Forget", "PERMISSION_DENIED", "read"),
    ]
    assert "read-secret-1f3a" not in text
    assert token_digest("read-secret-1f3a")[:8] not in text


def test_configuring_twice_keeps_one_handler_and_text_is_one_line(
    captured: io.StringIO,
) -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", "text", stream)
    configure_logging("DEBUG", "text", stream)
    logger = logging.getLogger("expunge")
    # (pytest adds its own capture handlers to loggers that do not propagate.)
    ours = [h for h in logger.handlers if getattr(h, "_stream", None) in (stream, captured)]
    assert len(ours) == 1 and ours[0]._stream is stream  # type: ignore[attr-defined]
    assert ours[0] not in logging.getLogger().handlers
    logging.getLogger("expunge.server").info(
        "serving", extra={"event": "ready", "target": "127.0.0.1:1", "note": "two words"}
    )
    flush_logging()
    (line,) = stream.getvalue().splitlines()
    assert re.fullmatch(
        r"\S+Z INFO    expunge\.server: serving event=ready target=127\.0\.0\.1:1 "
        r'note="two words"',
        line,
    ), line
    assert captured.getvalue() == ""  # the earlier configuration was replaced, not added to
    with pytest.raises(ValueError, match="log format"):
        configure_logging("INFO", "xml")


def test_records_are_written_off_the_calling_thread_in_order_and_flushed_at_shutdown() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    try:
        log = logging.getLogger("expunge.server")
        values = {"n": 0}
        for i in range(2000):
            values["n"] = i
            log.info("record %d of %s", i, values)  # an argument changed after the call
        flush_logging()
        lines = stream.getvalue().splitlines()
        assert [json.loads(line)["message"] for line in lines] == [
            f"record {i} of {{'n': {i}}}" for i in range(2000)
        ]
        log.info("last words", extra={"event": "shutdown"})
    finally:
        reset_logging()  # closes the handler, as logging.shutdown() does at exit
    assert json.loads(stream.getvalue().splitlines()[-1])["event"] == "shutdown"


def test_a_reader_that_stops_reading_costs_bounded_memory_and_is_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from expunge.server.telemetry import logs

    monkeypatch.setattr(logs, "MAX_QUEUED_RECORDS", 10)
    reading = threading.Event()

    class StalledStream(io.StringIO):
        def write(self, text: str) -> int:
            reading.wait(30)
            return super().write(text)

    stream = StalledStream()
    configure_logging("INFO", "json", stream)
    try:
        log = logging.getLogger("expunge.server")
        for i in range(200):
            log.info("record %d", i)  # never blocks, however long the reader stalls
        reading.set()
        flush_logging()
        log.info("after")
        flush_logging()
    finally:
        reset_logging()
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    dropped = [e for e in entries if e.get("event") == "log_records_dropped"]
    assert dropped and all(e["level"] == "WARNING" for e in dropped)
    kept = [e for e in entries if e["message"].startswith("record")]
    assert len(kept) < 200
    assert len(kept) + sum(e["count"] for e in dropped) == 200
    assert entries[-1]["message"] == "after"


def test_the_access_log_can_be_turned_off_while_lifecycle_records_stay(
    state_dir: Path, captured: io.StringIO
) -> None:
    running = start(Settings(state_dir=state_dir, port=0, build_index=False, access_log=False))
    try:
        with Client(running.target, timeout=60.0, retries=0) as client:
            client.list_models()
    finally:
        running.stop(grace=0.5)
    entries = records(captured)
    assert access(entries) == []
    assert any(e.get("event") == "ready" for e in entries)
