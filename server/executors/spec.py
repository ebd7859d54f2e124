"""How a worker in another process rebuilds the index's embedder (issue #21).

``GradientEmbedder`` is a function of the architecture, the checkpoints and the
``EmbeddingConfig`` (its projections are seeded), so a worker that builds one from the
same arguments embeds exactly as this process does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import torch

from expunge.defenses.architectures import ArchitectureSpec
from expunge.defenses.embeddings import EmbeddingConfig, GradientEmbedder
from expunge.defenses.training import Checkpoint
from expunge.server.model_factory import build_architecture


@dataclass(frozen=True)
class EmbedderSpec:
    """Picklable arguments of a ``GradientEmbedder``: put once per build in the object store."""

    architecture: dict[str, Any] = field(metadata={"help": "ArchitectureSpec.to_dict()"})
    trusted_factories: dict[str, str] = field(metadata={"help": "the server's setting"})
    checkpoints: tuple[Checkpoint, ...] = field(metadata={"help": "the trajectory + served"})
    config: EmbeddingConfig = field(metadata={"help": "projection dim, seed, parameters"})

    @cached_property
    def projection_digest(self) -> str:
        """What the drawn projections depend on: an embedder with the same one is reused
        for other checkpoint states (``GradientEmbedder.with_checkpoints``)."""
        return hashlib.sha256(
            json.dumps(
                [
                    self.architecture,
                    self.trusted_factories,
                    asdict(self.config),
                    len(self.checkpoints),
                ],
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()

    @cached_property
    def digest(self) -> str:
        """Everything the embeddings depend on, the checkpoints' parameters included."""
        hasher = hashlib.sha256(self.projection_digest.encode())
        for checkpoint in self.checkpoints:
            hasher.update(f"{checkpoint.step}:{checkpoint.learning_rate!r}".encode())
            for name in sorted(checkpoint.state):
                tensor = checkpoint.state[name].detach().cpu().reshape(-1).contiguous()
                hasher.update(f"{name}:{tensor.dtype}".encode())
                hasher.update(tensor.view(torch.uint8).numpy().data)
        return hasher.hexdigest()

    def build(self, device: torch.device | str = "cpu") -> GradientEmbedder:
        """A fresh embedder from these arguments (every projection drawn anew)."""
        spec = ArchitectureSpec.from_dict(self.architecture)
        model = build_architecture(spec, self.trusted_factories, seed=0)
        return GradientEmbedder(model, self.checkpoints, self.config, device)
