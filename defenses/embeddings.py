"""Gradient embeddings whose inner products are influence scores (DESIGN 4.7, 4.9).

For checkpoints ``t = 1..T`` (parameters ``theta_t``, learning rate ``eta_t``), a sample
``(x, y)`` has per-sample gradient ``g^t`` at ``theta_t`` and, with ``P_t`` a seeded
random projection to ``k`` dimensions:

- ``gas``:      ``e = concat_t sqrt(eta_t) P_t g^t / |P_t g^t|``
  so ``<e_i, e_te> = sum_t eta_t cos(P_t g_i^t, P_t g_te^t)`` ~ GAS(i, te);
- ``tracincp``: ``e = concat_t sqrt(eta_t) P_t g^t``
  so ``<e_i, e_te> = sum_t eta_t <P_t g_i^t, P_t g_te^t>`` ~ TracInCP(i, te);
- ``lgas``:     ``e = concat_t concat_l sqrt(eta_t) P_{t,l} g^{t,l} / |P_{t,l} g^{t,l}|``
  so ``<e_i, e_te>`` ~ LGAS(i, te) = sum_t eta_t sum_l cos(g_i^{t,l}, g_te^{t,l}).
  A *layer* is a module that owns parameters: its weight and bias are one layer.

Each checkpoint (and each layer) gets its own projection, seeded with
``derive_seed(seed, t)`` (``derive_seed(seed, t, l)``), so projection errors of
different checkpoints are independent and average out in the sum over ``t``.

Training samples use their own labels. A **test input uses the label the final model
predicts** for it (``expunge.defenses.gradients.predicted_labels(final_model, x)``):
influence explains the prediction that was made. Either way the labels are an argument.

Featurisation is a pure map over shards of the data (DESIGN 8): ``embed_shard`` depends
only on the model (or a factory), the checkpoints, the config (which holds the
projection seed) and the shard, and ``embed(a ++ b) == embed(a) ++ embed(b)``: the
model runs in eval mode, so batch norm uses its stored running statistics and one
sample's embedding never depends on the others in its batch.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .gradients import flatten_gradients, per_sample_gradients
from .index import IndexMetadata
from .projection import ProjectionKind, RandomProjector, derive_seed
from .training import Checkpoint

__all__ = [
    "EmbeddingConfig",
    "EmbeddingKind",
    "GradientEmbedder",
    "embed_shard",
    "embedding_dim",
    "index_metadata",
    "layer_groups",
    "trailing_param_names",
]

EmbeddingKind = Literal["gas", "tracincp", "lgas"]
ModelSource = nn.Module | Callable[[], nn.Module]


@dataclass(frozen=True)
class EmbeddingConfig:
    """How per-sample gradients become embeddings; stored beside the index built from them."""

    kind: EmbeddingKind = field(
        default="gas", metadata={"help": "gas (renormalised), tracincp (raw) or lgas (per layer)"}
    )
    projection_dim: int = field(
        default=256, metadata={"help": "k per checkpoint (per checkpoint and layer for lgas)"}
    )
    projection_kind: ProjectionKind = field(
        default="rademacher", metadata={"help": "rademacher or gaussian"}
    )
    seed: int = field(default=0, metadata={"help": "projection seed; P_t from (seed, t)"})
    block_size: int = field(
        default=8192, metadata={"help": "rows of each projection matrix applied at once"}
    )
    batch_size: int = field(
        default=256, metadata={"help": "samples whose per-sample gradients exist at once"}
    )
    param_names: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "parameters whose gradients count (None: all, in model order)"},
    )
    projection_cache_bytes: int = field(
        default=256 << 20,
        metadata={"help": "keep each drawn projection matrix when it is at most this large"},
    )

    def __post_init__(self) -> None:
        if self.kind not in ("gas", "tracincp", "lgas"):
            raise ValueError(f"embedding kind must be gas, tracincp or lgas, got {self.kind!r}")
        if self.projection_dim < 1 or self.batch_size < 1 or self.block_size < 1:
            raise ValueError("projection_dim, batch_size and block_size must be positive")
        if self.projection_kind not in ("rademacher", "gaussian"):
            raise ValueError("projection_kind must be 'rademacher' or 'gaussian'")


def layer_groups(
    model: nn.Module, param_names: Sequence[str] | None = None
) -> list[tuple[str, tuple[str, ...]]]:
    """Parameters grouped by the module that owns them, in model order.

    Returns ``[(module_name, (param_name, ...)), ...]``; with ``param_names`` only
    those parameters are kept (a layer with none of them is left out).
    """
    wanted = None if param_names is None else set(param_names)
    known = dict(model.named_parameters())
    if wanted is not None and not wanted <= known.keys():
        raise KeyError(f"unknown parameter names: {sorted(wanted - known.keys())}")
    groups: dict[str, list[str]] = {}
    for name in known:
        if wanted is None or name in wanted:
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            groups.setdefault(owner, []).append(name)
    return [(owner, tuple(names)) for owner, names in groups.items()]


def trailing_param_names(model: nn.Module, max_parameters: int) -> tuple[str, ...]:
    """The parameters of the model's last layers (in model order) that together hold at
    most ``max_parameters``; the last layer always, whatever its size. Gradients of these
    need the backward pass only down to the first of them."""
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    chosen: list[tuple[str, ...]] = []
    total = 0
    for _, names in reversed(layer_groups(model)):
        size = sum(sizes[n] for n in names)
        if chosen and total + size > max_parameters:
            break
        chosen.append(names)
        total += size
    return tuple(name for names in reversed(chosen) for name in names)


def embedding_dim(model: nn.Module, num_checkpoints: int, config: EmbeddingConfig) -> int:
    """Length of one embedding: ``T * k``, or ``T * layers * k`` for lgas."""
    layers = len(layer_groups(model, config.param_names)) if config.kind == "lgas" else 1
    return num_checkpoints * layers * config.projection_dim


def index_metadata(
    config: EmbeddingConfig, num_checkpoints: int, dim: int, model_version: str
) -> IndexMetadata:
    """What an index of these embeddings must record to be searched with fresh queries."""
    return IndexMetadata(
        dim=dim,
        embedding_kind=config.kind,
        projection_kind=config.projection_kind,
        projection_seed=config.seed,
        projection_dim=config.projection_dim,
        checkpoints=num_checkpoints,
        model_version=model_version,
    )


class GradientEmbedder:
    """Embeds shards of samples for fixed checkpoints and projections.

    Holds a private copy of the model and the projectors (whose drawn matrices are
    cached when small), so embedding many shards in one process draws each ``P_t`` once;
    a worker on another machine builds its own from the same arguments and gets the
    same embeddings.
    """

    def __init__(
        self,
        model: ModelSource,
        checkpoints: Sequence[Checkpoint],
        config: EmbeddingConfig,
        device: torch.device | str | None = None,
    ) -> None:
        if not checkpoints:
            raise ValueError("need at least one checkpoint")
        bad = [c.step for c in checkpoints if not c.learning_rate > 0]
        if bad:
            raise ValueError(f"checkpoints at steps {bad} have a non-positive learning rate")
        # A copy, so loading checkpoint states never changes the caller's module.
        source = model if isinstance(model, nn.Module) else model()
        self.model = copy.deepcopy(source).to(device if device is not None else "cpu").eval()
        # embed() loads each checkpoint into this private model, and functional_call swaps
        # its parameters while it runs: concurrent calls would mix checkpoints.
        self._model_lock = threading.Lock()
        self.checkpoints = tuple(checkpoints)
        self.config = config
        self.device = next(self.model.parameters()).device
        self.groups = layer_groups(self.model, config.param_names)
        self.param_names = tuple(name for _, names in self.groups for name in names)
        sizes = {name: p.numel() for name, p in self.model.named_parameters()}
        # The parts of the flattened gradient that are projected (and normalised) apart.
        if config.kind == "lgas":
            self.parts = [names for _, names in self.groups]
        else:
            self.parts = [self.param_names]
        self.projectors = [
            [
                RandomProjector(
                    config.projection_kind,
                    sum(sizes[n] for n in names),
                    config.projection_dim,
                    self._seed(t, part),
                    config.block_size,
                    cache_bytes=config.projection_cache_bytes,
                )
                for part, names in enumerate(self.parts)
            ]
            for t in range(len(self.checkpoints))
        ]

    @property
    def dim(self) -> int:
        """Length of one embedding."""
        return len(self.checkpoints) * len(self.parts) * self.config.projection_dim

    def with_checkpoints(self, checkpoints: Sequence[Checkpoint]) -> GradientEmbedder:
        """The same embedder over other states of as many checkpoints (a new final
        version): it shares the model copy, its lock and the projections (with their
        drawn matrices), so nothing is drawn again."""
        if len(checkpoints) != len(self.checkpoints):
            raise ValueError(f"need {len(self.checkpoints)} checkpoints, got {len(checkpoints)}")
        twin = copy.copy(self)
        twin.checkpoints = tuple(checkpoints)
        return twin

    @property
    def block_width(self) -> int:
        """Columns one checkpoint contributes: checkpoint ``t`` owns columns
        ``[t * block_width, (t + 1) * block_width)``."""
        return len(self.parts) * self.config.projection_dim

    def embed(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        checkpoints: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Embeddings of inputs ``(n, *input_shape)`` with labels ``(n,)``: ``(n, dim)`` on CPU.

        Labels: the training label for a training sample, the final model's predicted
        label for a test input (see the module docstring). ``checkpoints`` (indices into
        ``self.checkpoints``) embeds only those blocks, ``(n, len(checkpoints) *
        block_width)`` in the order given: each block depends on its checkpoint alone, so
        a changed last checkpoint re-embeds one block, not all.
        """
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(f"{inputs.shape[0]} inputs but {labels.shape[0]} labels")
        which = list(range(len(self.checkpoints)) if checkpoints is None else checkpoints)
        if any(not 0 <= t < len(self.checkpoints) for t in which):
            raise ValueError(f"checkpoint indices {which} outside 0..{len(self.checkpoints) - 1}")
        with self._model_lock:
            return self._embed(inputs, labels, which)

    def _embed(self, inputs: torch.Tensor, labels: torch.Tensor, which: list[int]) -> torch.Tensor:
        n, k = inputs.shape[0], self.config.projection_dim
        dtype = next(self.model.parameters()).dtype
        width = self.block_width
        out = torch.zeros((n, len(which) * width), dtype=dtype)
        for block, t in enumerate(which):
            checkpoint = self.checkpoints[t]
            self.model.load_state_dict(checkpoint.state)
            self.model.eval()
            weight = math.sqrt(checkpoint.learning_rate)
            for start in range(0, n, self.config.batch_size):
                stop = min(start + self.config.batch_size, n)
                x = inputs[start:stop].to(self.device, dtype)
                y = labels[start:stop].to(self.device)
                grads = per_sample_gradients(
                    self.model, x, y, self.param_names, batch_size=self.config.batch_size
                )
                for part, names in enumerate(self.parts):
                    projected = self.projectors[t][part].project(flatten_gradients(grads, names))
                    if self.config.kind != "tracincp":
                        # A zero gradient stays zero (cosine 0) instead of becoming NaN.
                        norms = projected.norm(dim=1, keepdim=True)
                        projected = projected / norms.clamp_min(torch.finfo(dtype).tiny)
                    column = block * width + part * k
                    out[start:stop, column : column + k] = (weight * projected).cpu()
        return out

    def _seed(self, checkpoint: int, part: int) -> int:
        if self.config.kind == "lgas":
            return derive_seed(self.config.seed, checkpoint, part)
        return derive_seed(self.config.seed, checkpoint)


def embed_shard(
    model: ModelSource,
    checkpoints: Sequence[Checkpoint],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    config: EmbeddingConfig,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Embed one shard: inputs ``(n, *input_shape)``, labels ``(n,)`` -> ``(n, dim)`` on CPU.

    ``model`` is an architecture instance (only its structure is used; it is copied, not
    changed) or a factory that builds one; ``checkpoints`` supply the parameters and
    learning rates; ``config.seed`` the projections. Nothing else enters, so shards can
    be embedded in any order, in any process, and concatenated.
    """
    return GradientEmbedder(model, checkpoints, config, device).embed(inputs, labels)
