"""Logs an operator can read or parse: one line per record, text or JSON.

``configure_logging`` sets up the ``expunge`` logger hierarchy only (never the root
logger), so an application that embeds the server keeps its own logging; ``serve()``
calls it, ``start()`` does not. Fields passed with ``extra=`` travel as structured
fields: JSON keys, or ``key=value`` after a text line's message. Records never carry
features, labels, owner ids, sample ids or tokens; callers pass counts and names.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from expunge.server.settings import LOG_FORMATS

ROOT_LOGGER = "expunge"
FLUSH_TIMEOUT_S = 5.0
MAX_BATCH_RECORDS = 1024
BATCH_INTERVAL_S = 0.02
MAX_QUEUED_RECORDS = 100_000
# Every attribute a bare LogRecord has: whatever else a record carries came from ``extra``.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


def structured_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record was given with ``extra=``, in the order they were given."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES}


def rfc3339(created: float) -> str:
    """A record's time as RFC 3339 UTC with milliseconds: ``2024-05-01T12:00:00.123Z``."""
    second = int(created)
    milliseconds = int((created - second) * 1000)
    return f"{_utc_second(second)}.{milliseconds:03d}Z"


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    """``2024-05-01T12:00:00`` (records come in bursts within a second: formatted once)."""
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in structured_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a field of another type (a Path, an enum) is written, never dropped.
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...`` on one line (tracebacks follow it)."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{rfc3339(record.created)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        )
        fields = structured_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(value: Any) -> str:
    """A field's value on a text line: quoted (JSON-escaped) when it holds spaces or quotes,
    so a value can never start a line of its own."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class _BackgroundWriter(logging.Handler):
    """The handler ``configure_logging`` installs: the calling thread (an RPC's) only
    queues the record; one daemon thread formats what has queued and writes it in one
    write and one flush.

    Writing from the RPC threads cost 12-15% of the server's Predict and GetOperation
    throughput under load (benchmarks.load, INFO against WARNING): each write released
    and re-took the GIL. Records still queued when the process is killed are lost;
    ``flush`` (and ``logging.shutdown``, through ``close``) waits for them.
    """

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__()
        # None: whatever sys.stderr is when a batch is written (a test's capture may have
        # been swapped in and closed since configuration).
        self._stream = stream
        # Bounded: a reader that stops reading stderr must not grow the server's memory;
        # records beyond the bound are dropped and the count written once it reads again.
        self._queue: queue.Queue[logging.LogRecord | threading.Event | None] = queue.Queue(
            MAX_QUEUED_RECORDS
        )
        self._dropped = 0
        self._writer = threading.Thread(target=self._write_batches, name="log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        # Freeze the message now: its arguments may change before the writer formats it.
        try:
            record.msg, record.args = record.getMessage(), None
        except Exception:
            self.handleError(record)
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._dropped += 1

    def flush(self) -> None:
        """Return once every record queued before the call is written (at most 5 s)."""
        if self._writer.is_alive():
            written = threading.Event()
            with contextlib.suppress(queue.Full):
                self._queue.put(written, timeout=FLUSH_TIMEOUT_S)
                written.wait(FLUSH_TIMEOUT_S)

    def close(self) -> None:
        if self._writer.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=FLUSH_TIMEOUT_S)
                self._writer.join(FLUSH_TIMEOUT_S)
        super().close()

    def _write_batches(self) -> None:
        while True:
            batch = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < MAX_BATCH_RECORDS:
                    batch.append(self._queue.get_nowait())
            lines = [self._formatted(r) for r in batch if isinstance(r, logging.LogRecord)]
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                lines.append(self._formatted(_dropped_record(dropped)))
            if lines:
                self._write("".join(line + "\n" for line in lines))
            waiters = [item for item in batch if isinstance(item, threading.Event)]
            for waiter in waiters:
                waiter.set()
            if None in batch:
                return
            if not waiters:
                # Let records gather: one wake-up, write and flush per interval rather
                # than per record, which under load is a thread switch per RPC.
                time.sleep(BATCH_INTERVAL_S)

    def _formatted(self, record: logging.LogRecord) -> str:
        try:
            return self.format(record)
        except Exception:  # a field that cannot be written must not stop the writer
            return f"{rfc3339(record.created)} {record.levelname} {record.name}: (unformattable record)"

    def _write(self, text: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        with contextlib.suppress(ValueError, OSError):  # a closed stream: nothing to write to
            stream.write(text)
            stream.flush()


def _dropped_record(count: int) -> logging.LogRecord:
    record = logging.LogRecord(
        "expunge.server", logging.WARNING, __file__, 0,
        "%d log records were dropped: stderr was not being read", (count,), None,
    )  # fmt: skip
    record.event = "log_records_dropped"
    record.count = count
    return record


def flush_logging() -> None:
    """Wait until every record logged so far is written (tests read what was written)."""
    for handler in logging.getLogger(ROOT_LOGGER).handlers:
        handler.flush()


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send the ``expunge`` loggers' records at ``level`` and above to ``stream`` (stderr).

    ``fmt``: ``text`` or ``json``. Calling it again replaces the earlier configuration.
    The records stop at the ``expunge`` logger (they do not reach the root logger's
    handlers too), so each is written once.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, not {fmt!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    logger = logging.getLogger(ROOT_LOGGER)
    _remove_configured(logger)
    handler = _BackgroundWriter(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(numeric)
    logger.propagate = False


def reset_logging() -> None:
    """Undo ``configure_logging``: its handler goes, and records propagate as by default."""
    logger = logging.getLogger(ROOT_LOGGER)
    _remove_configured(logger)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


def _remove_configured(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        if isinstance(handler, _BackgroundWriter):
            logger.removeHandler(handler)
            handler.close()
