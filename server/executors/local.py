"""Today's loop: every range embedded in this process by the embedder already built."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from expunge.server.executors.base import EmbeddedRows, EmbeddingJob


class LocalExecutor:
    """Embeds ranges one after another, in order, in the calling thread."""

    def embed(
        self,
        job: EmbeddingJob,
        ranges: Sequence[tuple[int, int]],
        before_each: Callable[[], object],
    ) -> Iterator[EmbeddedRows]:
        which = None if job.which is None else list(job.which)
        for start, stop in ranges:
            before_each()
            block = job.embedder.embed(job.features[start:stop], job.labels[start:stop], which)
            yield EmbeddedRows(start, stop, block)

    def prepare(self) -> None:
        pass

    def close(self) -> None:
        pass
