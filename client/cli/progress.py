"""An operation's progress on stderr: a bar redrawn in place on a terminal, and on a pipe
or file one plain line per phase (no carriage returns in a log)."""

from __future__ import annotations

import sys
from typing import TextIO

from ..types import Operation

BAR_WIDTH = 20


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or stand-in stream
        return False


class Progress:
    """Pass ``update`` as a client call's ``on_progress``; call ``end`` when done."""

    def __init__(self, stream: TextIO | None = None, redraw: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.redraw = is_terminal(self.stream) if redraw is None else redraw
        self._drawn = False
        self._last_phase: tuple[str, str] | None = None

    def update(self, op: Operation) -> None:
        if self.redraw:
            done, total = op.completed, op.total
            bar = "#" * int(BAR_WIDTH * done / total) if total else ""
            phase = op.phase or op.state.lower()
            self.stream.write(f"\r{phase:<12} [{bar:<{BAR_WIDTH}}] {done}/{total}")
            self._drawn = True
        elif (op.state, op.phase) != self._last_phase:
            self.stream.write(f"{op.name}: {op.state} {op.phase}".rstrip() + "\n")
        self._last_phase = (op.state, op.phase)
        self.stream.flush()

    def end(self) -> None:
        """Finish the redrawn line, so what follows starts on its own."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
