"""The gradient index of each model: built in the background, persisted, kept in sync.

Embeddings (DESIGN 4.9) use the training checkpoints plus the served version's weights
as the last checkpoint, so GAS neighbours reflect the model as it is served. Forgetting
removes the forgotten ids from the index in the same commit (always in sync); the new
version's weights make the last block stale, and a background job re-embeds that block
only (``embeddings``), outside the store's write lock, which it takes just to commit.
The gradients embedded are those ``layers`` chooses; a training set beyond
``index_ivf_threshold`` gets an IVF index trained on a seeded sample of all of it.
"""

from __future__ import annotations

import io
import logging
import math
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from expunge.defenses.embeddings import EmbeddingConfig, GradientEmbedder
from expunge.defenses.gradients import predicted_labels
from expunge.defenses.index import (
    FaissConfig,
    FaissIndex,
    GradientIndex,
    IndexBudgetError,
    IndexMetadata,
    check_index_fits,
    load_index,
)
from expunge.defenses.training import Checkpoint
from expunge.server.engine import Engine
from expunge.server.errors import FailedPrecondition, Unavailable, invalid_field
from expunge.server.executors import (
    EmbedderSpec,
    EmbeddingExecutor,
    StoredShard,
    make_executor,
)
from expunge.server.index.embeddings import (
    EmbeddingCache,
    EmbeddingKey,
    EmbeddingStopped,
    TrainingEmbeddings,
)
from expunge.server.index.layers import embedded_param_names
from expunge.server.state.store import ArtefactRow

log = logging.getLogger("expunge.server.index")
# Training samples the build embeds in this process to warm the query side (_warm_queries):
# a few, since each costs a sample's embedding (17 ms on the CNN below).
WARM_UP_ROWS = 4
ARTEFACT = "gradient_index"
PROJECTION_DIM = 128
MAX_K = 1000
RETRY_UNAVAILABLE_S = 5.0
# A build that found no cluster tries again on its own after RETRY_UNAVAILABLE_S, then
# doubling waits up to this: a cluster that comes back gets its index without a query.
RETRY_UNAVAILABLE_MAX_S = 300.0


@dataclass(frozen=True)
class IndexState:
    state: str = "ABSENT"  # ABSENT, BUILDING, READY, STALE
    embedded_version: int = 0
    size: int = 0
    progress: float = 0.0
    message: str = ""
    embedded_parameters: tuple[str, ...] = ()  # empty: every parameter
    unavailable: bool = False  # the last build failed for want of its executor's cluster


@dataclass
class _Loaded:
    index: GradientIndex
    embedder: GradientEmbedder
    version: int


@dataclass(frozen=True)
class NeighborHit:
    sample_id: int
    owner_id: str
    label: int
    score: float
    sample_key: str = ""  # the caller's string id, when the model's samples have them


class IndexService:
    def __init__(
        self,
        engine: Engine,
        projection_dim: int = PROJECTION_DIM,
        executor: EmbeddingExecutor | None = None,
    ) -> None:
        self.engine = engine
        self.projection_dim = projection_dim
        # Where builds embed (the executor setting); a benchmark may pass its own.
        self.executor = executor if executor is not None else make_executor(engine.settings)
        self._lock = threading.RLock()
        self._loaded: dict[str, _Loaded] = {}
        self._states: dict[str, IndexState] = {}
        self._building: set[str] = set()
        # Models whose served version changed since their build thread last looked: the
        # thread builds again before it ends, so no change is ever skipped.
        self._wanted: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._retried: dict[str, float] = {}  # model -> when a query last asked for a build
        self._stopping = threading.Event()
        self._index_lock = threading.Lock()  # a loaded index's mutations vs its searches
        # Training embeddings of the latest version (Scan's influences, the next build's
        # trajectory blocks) and one embedder per model, whose drawn projections it keeps.
        self._embeddings = EmbeddingCache(engine.settings.index_shard_rows, self.executor)
        self._embedders: dict[str, tuple[EmbeddingKey, GradientEmbedder]] = {}
        # Every version change (forget, retrain, rollback) reaches the index here.
        engine.on_version_change(self._follow_served_version)

    def _follow_served_version(self, model: str) -> None:
        """The served version changed: a re-embed starts (of the final block, if it can)."""
        row = self.engine.store.model(model)
        if row is not None:
            self._embeddings.keep_only(model, self.engine.training_data(model).sample_ids)
        with self._lock:
            loaded = self._loaded.get(model)
        if loaded is not None:
            # A forget removed its ids from the loaded index in the commit.
            self._set_state(model, size=len(loaded.index))
        row = self.engine.store.model(model)
        if row is not None and row.checkpoints_blob:
            self.build_in_background(model)

    # Lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Load persisted indexes; build missing or stale ones in the background."""
        for row in self.engine.store.models():
            if not row.checkpoints_blob:
                continue
            try:
                self._load_persisted(row.name)
            except Exception:
                log.exception("could not load the index of %s; rebuilding", row.name)
            if self.state(row.name).state != "READY":
                self.build_in_background(row.name)

    def stop(self, timeout: float | None = None) -> bool:
        """Stop background builds at their next shard and wait for them; True once all ended."""
        self._stopping.set()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
        return not any(thread.is_alive() for thread in threads)

    def close(self) -> None:
        """Release the executor (the Ray actors, and the cluster if it started one)."""
        self.executor.close()

    def state(self, model: str, current_version: int | None = None) -> IndexState:
        """The index's state against the served version: READY only if it embeds that version."""
        with self._lock:
            state = self._states.get(model, IndexState())
        if state.state != "READY":
            return state
        if current_version is None:
            row = self.engine.store.model(model)
            current_version = row.current_version if row is not None else 0
        if state.embedded_version != current_version:
            return replace(state, state="STALE")
        return state

    def _set_state(self, model: str, **changes: object) -> None:
        with self._lock:
            self._states[model] = replace(self._states.get(model, IndexState()), **changes)  # type: ignore[arg-type]

    def _load_persisted(self, model: str) -> None:
        artefact = self.engine.store.artefact(model, ARTEFACT)
        if artefact is None:
            return
        blob, version = artefact.blob, artefact.version
        index = unpack_index(self.engine.store.blobs.get(blob))
        embedded = int(index.metadata.model_version or version)
        key, embedder = self._embedder(model, embedded)
        if (key.param_names or ()) != index.metadata.param_names or key.dim != index.dim:
            log.info("the index of %s embeds other gradients than configured; rebuilding", model)
            return
        current = self.engine.model_row(model).current_version
        with self._lock:
            self._loaded[model] = _Loaded(index, embedder, embedded)
        stored = index.stored_vectors() if isinstance(index, FaissIndex) else None
        if stored is not None and artefact.meta.get("trajectory") == key.trajectory:
            # The next re-embed after a restart needs only the final block, too.
            ids, vectors, labels = stored
            self._embeddings.put(
                model,
                TrainingEmbeddings(embedded, key, embedder, torch.from_numpy(vectors), ids, labels),
            )
        self._set_state(
            model,
            state="READY" if embedded == current else "STALE",
            embedded_version=embedded,
            size=len(index),
            progress=1.0,
            embedded_parameters=index.metadata.param_names,
        )

    # Building --------------------------------------------------------------------------

    def _checkpoints(self, model: str, version: int) -> list[Checkpoint]:
        trajectory = self.engine.checkpoints(model)
        if not trajectory:
            raise FailedPrecondition(
                f"models/{model} has no training checkpoints; retrain it with Expunge so the "
                "trajectory is saved"
            )
        served = self.engine.snapshot(model, version)
        final = Checkpoint(
            step=trajectory[-1].step + 1,
            learning_rate=trajectory[-1].learning_rate,
            state={k: v.detach().clone() for k, v in served.module.state_dict().items()},
        )
        return [*trajectory, final]

    def _embedder(self, model: str, version: int) -> tuple[EmbeddingKey, GradientEmbedder]:
        """The embedder of ``version``: the model's one, moved to this version's weights."""
        checkpoints = self._checkpoints(model, version)
        settings = self.engine.settings
        module = self.engine.snapshot(model, version).module
        names = embedded_param_names(
            module,
            settings.index_layers,
            len(checkpoints),
            self.projection_dim,
            settings.index_projection_cache_bytes,
        )
        with self._lock:
            known = self._embedders.get(model)
        trajectory = self.engine.model_row(model).checkpoints_blob or ""
        if (
            known is not None
            and known[0].trajectory == trajectory
            and known[0].param_names == names
        ):
            return known[0], known[1].with_checkpoints(checkpoints)
        config = EmbeddingConfig(
            kind="gas",
            projection_dim=self.projection_dim,
            seed=0,
            param_names=names,
            projection_cache_bytes=settings.index_projection_cache_bytes // len(checkpoints),
        )
        embedder = GradientEmbedder(module, checkpoints, config, self.engine.device)
        key = EmbeddingKey(trajectory, names, embedder.dim)
        with self._lock:
            self._embedders[model] = (key, embedder)
        return key, embedder

    def _training_embeddings_of(
        self, model: str, version: int, progress: bool = False
    ) -> TrainingEmbeddings:
        data = self.engine.training_data(model)
        cached = self._embeddings.peek(model)
        trajectory = self.engine.model_row(model).checkpoints_blob or ""
        if (
            cached is not None
            and cached.version == version
            and cached.key.trajectory == trajectory
            and np.array_equal(cached.ids, data.sample_ids)
        ):
            # Scan asks once per chunk: the embedder (checkpoints read from the store, the
            # served weights copied) is built only when something must be embedded.
            return cached
        key, embedder = self._embedder(model, version)
        stored = StoredShard(
            str(self.engine.data_path(data.blob)),
            EmbedderSpec(
                self.engine.model_row(model).spec,
                dict(self.engine.settings.trusted_factories),
                embedder.checkpoints,
                embedder.config,
            ),
        )

        def report(fraction: float) -> None:
            self._set_state(model, progress=fraction)

        return self._embeddings.get(
            model,
            version,
            key,
            embedder,
            (data.features, data.labels, data.sample_ids),
            report if progress else None,
            # A stop abandons background builds; a scan waiting for its answer goes on.
            self._stopping if progress else None,
            # A background build yields the cores to a forget computing meanwhile.
            self._yield_to_foreground if progress else None,
            stored,
        )

    def _yield_to_foreground(self, someone_waits: Callable[[], bool]) -> float:
        return self.engine.foreground.yield_to(self._stopping, someone_waits)

    def build_in_background(self, model: str) -> None:
        """Build now, or, if a build of this model is running, once more after it."""
        if self._stopping.is_set():
            return
        with self._lock:
            self._wanted.add(model)
            if model in self._building:
                return
            self._building.add(model)
            thread = threading.Thread(
                target=self._build_guarded, args=(model,), name=f"index-{model}", daemon=True
            )
            # Started before it is listed, under the lock stop() lists under: stop() never
            # joins a thread that has not started.
            thread.start()
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)

    def _build_guarded(self, model: str) -> None:
        wait = RETRY_UNAVAILABLE_S
        while not self._stopping.is_set():
            with self._lock:
                if model not in self._wanted:
                    # Cleared under the lock that build_in_background checks: a request
                    # arriving after this line starts a new thread.
                    self._building.discard(model)
                    return
                self._wanted.discard(model)
            try:
                self.build(model)
            except Unavailable as exc:
                # Its cluster is unreachable or lost: said without a trace, and tried
                # again after a wait that doubles each time (a stop ends the wait).
                log.warning(
                    "building the index of %s failed: %s; trying again in %.0f s",
                    model,
                    exc.message,
                    wait,
                    extra={"event": "index_build_unavailable", "model": model},
                )
                self._failed(model, exc.message, unavailable=True)
                if self._stopping.wait(wait):
                    break
                wait = min(2 * wait, RETRY_UNAVAILABLE_MAX_S)
                with self._lock:
                    self._wanted.add(model)
            except Exception:
                log.exception("building the index of %s failed", model)
                self._failed(model, None, unavailable=False)
        with self._lock:
            self._building.discard(model)

    def _failed(self, model: str, message: str | None, unavailable: bool) -> None:
        """A build failed: the index keeps what it had (a loaded one serves, stale).
        ``message``: what callers are told, or None to leave the state's as it is."""
        with self._lock:
            loaded = model in self._loaded
        said = {} if message is None else {"message": message}
        self._set_state(
            model, state="STALE" if loaded else "ABSENT", unavailable=unavailable, **said
        )

    def _retry_build(self, model: str) -> None:
        """Build again unless a build runs (or waits to try again) or the last try is
        recent."""
        now = time.monotonic()
        with self._lock:
            recent = now - self._retried.get(model, -math.inf) < RETRY_UNAVAILABLE_S
            if model in self._building or recent:
                return
            self._retried[model] = now
        self.build_in_background(model)

    def build(self, model: str) -> IndexState:
        """Embed the training samples for the current version and persist the index."""
        started = time.perf_counter()
        row = self.engine.model_row(model)
        version = row.current_version
        previous = self.state(model)
        self._set_state(
            model, state="BUILDING" if previous.state == "ABSENT" else previous.state, progress=0.0
        )
        key, embedder = self._embedder(model, version)
        n = len(self.engine.training_data(model).labels)
        kind: Literal["flat", "ivf"] = (
            "flat" if n <= self.engine.settings.index_ivf_threshold else "ivf"
        )
        try:
            # Refuse a build that would not fit before spending any time on it.
            check_index_fits(
                n, embedder.dim, kind, "float32", self.engine.settings.index_memory_bytes
            )
        except IndexBudgetError as exc:
            self._set_state(model, state="ABSENT", progress=0.0, message=str(exc))
            raise
        try:
            embedded = self._training_embeddings_of(model, version, progress=True)
        except EmbeddingStopped:
            return self.state(model)
        index = _faiss_index(embedded, kind, version)
        self._warm_queries(model, embedded.embedder)
        store = self.engine.store
        with store.write_lock:
            # Samples forgotten while we embedded must not enter the index.
            present = set(self.engine.training_data(model).sample_ids.tolist())
            gone = [int(i) for i in embedded.ids if int(i) not in present]
            if gone:
                index.remove(np.array(gone, dtype=np.int64))
            if self.engine.model_row(model).current_version != version:
                # Not persisted: the version change that moved it asked for another build
                # (build_in_background's loop runs it), so building again here would be twice.
                self._set_state(model, progress=0.0)
                return self.state(model)
            blob = store.blobs.put(pack_index(index))
            meta = {"trajectory": key.trajectory, "kind": kind}
            store.put_artefact(ArtefactRow(model, ARTEFACT, blob, version, meta))
            with self._lock:
                self._loaded[model] = _Loaded(index, embedded.embedder, version)
            store.blobs.collect_garbage(store.referenced_blobs())
        self._set_state(
            model,
            state="READY",
            embedded_version=version,
            size=len(index),
            progress=1.0,
            embedded_parameters=key.param_names or (),
            message="",
            unavailable=False,
        )
        seconds = time.perf_counter() - started
        log.info(
            "index of models/%s built: %d samples, version %d, %.1f s",
            model,
            len(index),
            version,
            seconds,
            extra={
                "event": "index_built",
                "model": model,
                "version": version,
                "size": len(index),
                "kind": kind,
                "seconds": round(seconds, 3),
            },
        )
        return self.state(model)

    def _warm_queries(self, model: str, embedder: GradientEmbedder) -> None:
        """Embed one batch of training samples in this process before the index is READY.

        Neighbors and Scan embed their inputs here with the build's embedder. A build whose
        shards were embedded elsewhere (Ray workers) leaves this process cold, and the first
        queries paid its warm-up: 64 Neighbors queries took 5.9 s, then 1.9 s, then 1.1 s
        against 0.9 s each after a local build (1,500 CIFAR-shaped images, 532k parameters).
        """
        data = self.engine.training_data(model)
        rows = min(len(data.labels), WARM_UP_ROWS)
        if rows:
            x = torch.from_numpy(np.ascontiguousarray(data.features[:rows]))
            embedder.embed(x, torch.from_numpy(np.asarray(data.labels[:rows])))

    # Forgetting -------------------------------------------------------------------------

    def remove_for_commit(self, model: str, sample_ids: list[int]) -> ArtefactRow | None:
        """Remove forgotten ids and write the index blob; the caller's commit records it."""
        persisted = self.engine.store.artefact(model, ARTEFACT)
        if persisted is None:
            return None
        with self._lock:
            loaded = self._loaded.get(model)
        if loaded is None:
            # An index on disk but not in memory still loses the forgotten ids in the commit.
            index = unpack_index(self.engine.store.blobs.get(persisted.blob))
            index.remove(np.array(sample_ids, dtype=np.int64))
            packed = pack_index(index)
        else:
            # faiss indexes are not safe to search while ids are removed: searches wait.
            with self._index_lock:
                loaded.index.remove(np.array(sample_ids, dtype=np.int64))
                packed = pack_index(loaded.index)
        return replace(persisted, blob=self.engine.store.blobs.put(packed))

    def has_embeddings(self, model: str) -> bool:
        """Whether an index is loaded, so Scan can take its influences from it."""
        with self._lock:
            return model in self._loaded

    def training_embeddings(
        self, model: str
    ) -> tuple[GradientEmbedder, torch.Tensor, np.ndarray] | None:
        """The current version's embedder and training embeddings ``(n, dim)`` with their
        ids, if an index is loaded; computed here (the final block only, when it can) if
        the background build has not yet done so."""
        if not self.has_embeddings(model):
            return None
        version = self.engine.model_row(model).current_version
        embedded = self._training_embeddings_of(model, version)
        return embedded.embedder, embedded.vectors, embedded.ids

    # Queries ------------------------------------------------------------------------------

    def neighbors(
        self, model: str, inputs: np.ndarray, k: int, mode: str, label: int | None
    ) -> tuple[list[list[NeighborHit]], IndexState, int]:
        row = self.engine.model_row(model)
        snapshot = self.engine.snapshot(model)
        self.engine.refuse_unservable(snapshot.name, snapshot.version, held_only=True)
        self.engine.check_inputs(snapshot.spec, inputs)
        self.engine.forward_checked(snapshot.module, torch.from_numpy(inputs))
        if mode not in ("proponents", "opponents"):
            raise invalid_field("mode", f"{mode!r} is not 'proponents' or 'opponents'")
        if label is not None and not 0 <= label < snapshot.spec.num_classes:
            raise invalid_field(
                "label",
                f"{label} is not a class of this model (0..{snapshot.spec.num_classes - 1})",
            )
        with self._lock:
            loaded = self._loaded.get(model)
        state = self.state(model, row.current_version)
        if state.unavailable:
            # The last build found no cluster: its thread tries again on its own; a query
            # asks for a try where no thread is left (at most every RETRY_UNAVAILABLE_S).
            # A loaded index answers meanwhile, stale.
            self._retry_build(model)
        if loaded is None and state.unavailable:
            raise Unavailable(f"the gradient index of models/{model} is absent: {state.message}")
        if loaded is None:
            detail = f": {state.message}" if state.message else "; retry shortly"
            raise FailedPrecondition(
                f"the gradient index of models/{model} is {state.state.lower()} "
                f"({100 * state.progress:.0f}% embedded){detail}"
            )
        size = len(loaded.index)
        if not 1 <= k <= min(MAX_K, size):
            raise invalid_field("k", f"must lie in [1, {min(MAX_K, size)}]")
        x = torch.from_numpy(inputs)
        embedded_model = self.engine.snapshot(model, loaded.version).module
        queries = loaded.embedder.embed(x, predicted_labels(embedded_model, x))
        finite = torch.isfinite(queries).all(dim=1)
        if not bool(finite.all()):
            raise invalid_field(
                f"inputs[{int(torch.argmin(finite.to(torch.int8)))}]",
                "the gradient of this input overflows float32; scale it as the training data",
            )
        with self._index_lock:
            result = loaded.index.search(queries, k, mode=mode, label=label)  # type: ignore[arg-type]
        data = self.engine.training_data(model)
        position = {int(s): i for i, s in enumerate(data.sample_ids)}
        hits: list[list[NeighborHit]] = []
        for ids, scores in zip(result.ids.tolist(), result.scores.tolist(), strict=True):
            row_hits = []
            for sid, score in zip(ids, scores, strict=True):
                where = position.get(int(sid))
                if sid < 0 or where is None:
                    continue
                row_hits.append(
                    NeighborHit(
                        int(sid),
                        str(data.owner_ids[where]),
                        int(data.labels[where]),
                        float(score),
                        data.key_of(where),
                    )
                )
            hits.append(row_hits)
        return hits, state, row.current_version


def _faiss_index(
    embedded: TrainingEmbeddings, kind: Literal["flat", "ivf"], version: int
) -> FaissIndex:
    """A flat index of the embeddings or, for large sets, an IVF one whose k-means runs on
    a seeded sample of all of them (training on the first shard alone would bias lists)."""
    key = embedded.key
    metadata = IndexMetadata(
        dim=key.dim,
        embedding_kind="gas",
        projection_seed=0,
        projection_dim=embedded.embedder.config.projection_dim,
        checkpoints=len(embedded.embedder.checkpoints),
        model_version=str(version),
        param_names=key.param_names or (),
    )
    config = FaissConfig(kind=kind, seed=0)
    index = FaissIndex(key.dim, config, metadata=metadata)
    vectors = embedded.vectors.numpy()
    if kind == "ivf":
        lists = max(1, round(math.sqrt(len(vectors))))
        take = min(len(vectors), lists * config.max_points_per_centroid)
        rows = np.sort(np.random.default_rng(0).permutation(len(vectors))[:take])
        index.train(vectors[rows])
    index.add(embedded.ids, vectors, embedded.labels)
    return index


def pack_index(index: GradientIndex) -> bytes:
    """An index directory as one zip blob (no pickle: faiss' own format plus JSON)."""
    with tempfile.TemporaryDirectory() as tmp:
        index.save(tmp)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for path in sorted(Path(tmp).iterdir()):
                archive.write(path, path.name)
        return buffer.getvalue()


def unpack_index(data: bytes) -> GradientIndex:
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(io.BytesIO(data)) as archive:
        for member in archive.namelist():
            if "/" in member or member.startswith("."):
                raise FailedPrecondition("index artefact has an unexpected layout")
            (Path(tmp) / member).write_bytes(archive.read(member))
        return load_index(tmp)
