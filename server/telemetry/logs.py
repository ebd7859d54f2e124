"""Logs an operator can read or parse: one line per record, text or JSON.

``configure_logging`` sets up the ``expunge`` logger hierarchy only (never the root
logger), so an application that embeds the server keeps its own logging; ``serve()``
calls it, ``start()`` does not. Fields passed with ``extra=`` travel as structured
fields: JSON keys, or ``key=value`` after a text line's message. Records never carry
features, labels, owner ids, sample ids or tokens; callers pass counts and names.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from expunge.server.settings import LOG_FORMATS

ROOT_LOGGER = "expunge"
# Every attribute a bare LogRecord has: whatever else a record carries came from ``extra``.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


def structured_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record was given with ``extra=``, in the order they were given."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES}


def rfc3339(created: float) -> str:
    """A record's time as RFC 3339 UTC with milliseconds: ``2024-05-01T12:00:00.123Z``."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


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


class _ConfiguredHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``configure_logging`` installs, so a second call replaces it."""


class _CurrentStderrHandler(_ConfiguredHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when configured:
    a stream swapped and closed since (a test's capture) is never written to."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


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
    handler = _ConfiguredHandler(stream) if stream is not None else _CurrentStderrHandler()
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
        if isinstance(handler, _ConfiguredHandler):
            logger.removeHandler(handler)
            handler.close()
