"""``NAME=VALUE`` arguments of the benchmarks' option runs, typed as a settings file would be."""

from __future__ import annotations

from typing import Any


def parse_value(raw: str) -> Any:
    """``true``/``false`` -> bool, then int, then float, else the text itself."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            continue
    return raw


def parse_setting(text: str) -> tuple[str, Any]:
    """``"name=value"`` -> ``(name, typed value)``."""
    name, _, raw = text.partition("=")
    return name.strip(), parse_value(raw.strip())
