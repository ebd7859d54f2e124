"""A selection of parameter entries: the unit of a targeted update.

A selection names, per parameter tensor, the flat indices (into ``param.view(-1)``)
that an update may change. L-CODEC produces one from its Markov blanket of units;
``ParameterSelection.everything`` selects the whole model (the convex ground truth).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ParameterSelection:
    """Flat indices per parameter name, plus the units they came from (for receipts)."""

    indices: dict[str, torch.Tensor] = field(metadata={"help": "name -> sorted long indices"})
    units: tuple[str, ...] = field(default=(), metadata={"help": "selected units, 'layer:k'"})

    @classmethod
    def everything(cls, model: nn.Module) -> ParameterSelection:
        return cls(
            indices={n: torch.arange(p.numel()) for n, p in model.named_parameters()},
            units=("*",),
        )

    @property
    def num_parameters(self) -> int:
        return int(sum(int(idx.numel()) for idx in self.indices.values()))

    @property
    def names(self) -> list[str]:
        return [n for n, idx in self.indices.items() if idx.numel() > 0]

    def gather(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Selected entries of ``tensors`` (parameters or gradients) as one vector ``(p,)``."""
        return torch.cat([tensors[n].reshape(-1)[self.indices[n]] for n in self.names])

    def gather_batched(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample version of ``gather``: ``{name: (n, *shape)}`` -> ``(n, p)``."""
        parts = [
            tensors[n].reshape(tensors[n].shape[0], -1)[:, self.indices[n]] for n in self.names
        ]
        return torch.cat(parts, dim=1)

    def scatter_add_(self, model: nn.Module, delta: torch.Tensor) -> None:
        """Add ``delta`` ``(p,)`` to the selected entries of the model's parameters, in place."""
        params = dict(model.named_parameters())
        offset = 0
        with torch.no_grad():
            for n in self.names:
                idx = self.indices[n]
                flat = params[n].view(-1)
                flat[idx] += delta[offset : offset + idx.numel()].to(flat.dtype)
                offset += idx.numel()
        if offset != delta.numel():
            raise ValueError(f"delta has {delta.numel()} entries, selection has {offset}")
