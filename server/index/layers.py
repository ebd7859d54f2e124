"""Which parameters' gradients the gradient index embeds (DESIGN 4.9, issue #19 item 4).

Every checkpoint's projection ``R_t`` is ``(p, k)``; drawing it again for every batch
costs more than applying it, so the index keeps each ``R_t`` once drawn. That bounds the
gradients it can embed: ``T * p * k * 4`` bytes must fit ``index_projection_cache_bytes``.
Under ``auto`` a model within that bound embeds every parameter's gradient; a larger
one embeds the gradients of its *trailing* layers, as many as fit, the output layer
always (TRAK and captum's TracIn restrict to final layers for the same reason): the
backward pass then stops at the first chosen layer, and only they are projected.
"""

from __future__ import annotations

from torch import nn

from expunge.defenses.embeddings import layer_groups, trailing_param_names
from expunge.server.errors import InvalidArgument

FLOAT32_BYTES = 4


def embedded_param_names(
    model: nn.Module, setting: str, checkpoints: int, projection_dim: int, cache_bytes: int
) -> tuple[str, ...] | None:
    """Parameter names to embed (in model order), or None for all of them.

    ``setting``: ``"all"``, ``"auto"``, or comma-separated module names (as
    ``named_modules`` spells them) whose parameters are embedded.
    """
    groups = layer_groups(model)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    if setting == "all":
        return None
    if setting != "auto":
        return _named(groups, setting)
    per_entry = checkpoints * projection_dim * FLOAT32_BYTES
    if sum(sizes.values()) * per_entry <= cache_bytes:
        return None
    return trailing_param_names(model, cache_bytes // per_entry)


def _named(groups: list[tuple[str, tuple[str, ...]]], setting: str) -> tuple[str, ...]:
    wanted = [part.strip() for part in setting.split(",") if part.strip()]
    owners = dict(groups)
    unknown = [name for name in wanted if name not in owners]
    if not wanted or unknown:
        raise InvalidArgument(
            f"index_layers: {unknown or setting!r} names no module with parameters; "
            f"use 'auto', 'all' or some of {list(owners)[:20]}"
        )
    keep = set(wanted)
    return tuple(name for owner, names in groups if owner in keep for name in names)
