"""Splitting a call's inputs into batches that fit the message and batch limits.

Predict, Neighbors and a plain Scan answer each input on its own, so a large array can go
as several requests; the client reassembles the answers in order. A batch holds as many
rows as fit in the smaller of the request and reply budgets (a share of the message limit
kept for the envelope), and at most the server's input limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# Of each message, this much is left for everything but the rows: field tags, the model
# name, shapes, a reply's version and flags.
ENVELOPE_BYTES = 64 * 1024


@dataclass(frozen=True)
class BatchLimits:
    max_message_bytes: int
    max_inputs: int  # the server's max_batch

    def rows_per_batch(self, request_row_bytes: int, reply_row_bytes: int) -> int:
        """Rows one call may carry so that its request and its reply fit."""
        budget = self.max_message_bytes - ENVELOPE_BYTES
        per_row = max(request_row_bytes, reply_row_bytes, 1)
        return max(1, min(self.max_inputs, budget // per_row))


def row_slices(count: int, rows_per_batch: int) -> Iterator[slice]:
    """Consecutive slices of ``count`` rows, ``rows_per_batch`` at most each."""
    for start in range(0, count, rows_per_batch):
        yield slice(start, min(start + rows_per_batch, count))


def request_row_bytes(inputs: np.ndarray) -> int:
    """Bytes one input row takes on the wire (float64 travels as is; see ``wire``)."""
    rows = max(len(inputs), 1)
    return int(np.asarray(inputs).nbytes // rows)
