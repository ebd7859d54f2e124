"""Parameter selection by the Newton step itself: the entries the full step moves most.

L-CODEC ranks *units* by conditional dependence with the forget-set loss; a unit's slice
(a whole weight row or filter) then fills the budget, and many of its entries barely move
under the exact update. Measured on the digits MLP of DESIGN 4.3 at a 25% budget (gap
closed, BENCHMARKS.md): L-CODEC units 0.32-0.46; the top 25% of entries of the exact
full Newton step (an oracle) 0.67-0.84. A Newton-CG step over every parameter
(Hessian-vector products, no p x p matrix) is a cheap stand-in for that oracle: its
largest entries, optionally restricted to the units of an L-CODEC Markov blanket, form
the selection, and the exact damped Newton step is then taken on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .newton import NewtonConfig, NewtonResult, newton_cg_update
from .selection import ParameterSelection

__all__ = ["SparseSelection", "select_by_newton_direction", "top_entries"]


@dataclass(frozen=True)
class SparseSelection:
    """The chosen entries and the Newton-CG step that ranked them."""

    selection: ParameterSelection = field(metadata={"help": "the largest entries of the step"})
    direction: NewtonResult = field(
        metadata={"help": "Newton-CG over every parameter (ParameterSelection.everything order)"}
    )
    candidates: int = field(metadata={"help": "entries that were eligible (the pool's size)"})


def _offsets(model: nn.Module) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    start = 0
    for name, p in model.named_parameters():
        out[name] = (start, start + p.numel())
        start += p.numel()
    return out


def top_entries(
    model: nn.Module,
    scores: torch.Tensor,
    budget: int,
    candidates: ParameterSelection | None = None,
    unit_slices: dict[str, dict[str, torch.Tensor]] | None = None,
) -> ParameterSelection:
    """The ``budget`` entries of largest ``|scores|`` (ties: lower index first).

    scores ``(p,)`` in ``ParameterSelection.everything(model)`` order. ``candidates``
    restricts the choice to its entries. ``unit_slices`` (unit -> name -> flat indices)
    names the units for the receipt: those with at least one chosen entry.
    """
    offsets = _offsets(model)
    total = next(reversed(offsets.values()))[1] if offsets else 0
    if scores.shape != (total,):
        raise ValueError(f"scores has shape {tuple(scores.shape)}, the model has {total} entries")
    if budget < 1:
        raise ValueError("budget must be >= 1")
    if candidates is None:
        pool = torch.arange(total)
    else:
        unknown = sorted(set(candidates.indices) - set(offsets))
        if unknown:
            raise KeyError(f"candidates name unknown parameters: {unknown}")
        pool = torch.cat(
            [idx + offsets[name][0] for name, idx in candidates.indices.items() if idx.numel()]
            or [torch.empty(0, dtype=torch.long)]
        )
    order = torch.sort(scores[pool].abs(), descending=True, stable=True).indices
    chosen = torch.sort(pool[order[:budget]]).values
    indices = {
        name: chosen[(chosen >= lo) & (chosen < hi)] - lo for name, (lo, hi) in offsets.items()
    }
    units: tuple[str, ...] = ()
    if unit_slices is not None:
        units = tuple(
            unit
            for unit, parts in unit_slices.items()
            if any(bool(torch.isin(idx, indices[name]).any()) for name, idx in parts.items())
        )
    return ParameterSelection(
        indices={n: idx for n, idx in indices.items() if idx.numel()}, units=units
    )


def select_by_newton_direction(
    model: nn.Module,
    forget_inputs: torch.Tensor,
    forget_labels: torch.Tensor,
    retained_inputs: torch.Tensor,
    retained_labels: torch.Tensor,
    weight_decay: float,
    budget: int,
    config: NewtonConfig | None = None,
    candidates: ParameterSelection | None = None,
    unit_slices: dict[str, dict[str, torch.Tensor]] | None = None,
    assume_converged: bool = False,
) -> SparseSelection:
    """Rank entries by a Newton-CG step over every parameter; keep the top ``budget``.

    forget ``(m, *shape)``/``(m,)``, retained ``(n - m, *shape)``/``(n - m,)``.
    ``assume_converged``: take grad J = 0 at the current parameters (as the server does),
    so the direction comes from the removal alone. The model is not modified.
    """
    config = config or NewtonConfig()
    total = sum(p.numel() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    full_gradient = torch.zeros(total, dtype=dtype) if assume_converged else None
    direction = newton_cg_update(
        model,
        forget_inputs,
        forget_labels,
        retained_inputs,
        retained_labels,
        weight_decay,
        config,
        full_gradient=full_gradient,
    )
    pool = total if candidates is None else candidates.num_parameters
    selection = top_entries(model, direction.delta, min(budget, pool), candidates, unit_slices)
    return SparseSelection(selection=selection, direction=direction, candidates=pool)
