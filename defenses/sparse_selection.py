"""Parameter selection by the Newton step itself: the entries the full step moves most.

L-CODEC ranks *units* by conditional dependence with the forget-set loss; a unit's slice
(a whole weight row or filter) then fills the budget, and many of its entries barely move
under the exact update. Measured on the digits MLP of DESIGN 4.3 at a 25% budget (gap
closed, BENCHMARKS.md): L-CODEC units 0.32-0.46; the top 25% of entries of the exact
full Newton step (an oracle) 0.67-0.84. A Newton-CG step over every parameter
(Hessian-vector products, no p x p matrix) is a cheap stand-in for that oracle: its
largest entries, optionally restricted to a pool of L-CODEC units, form the selection,
and the exact damped Newton step is then taken on it.

Two details decide which entries rank first:

- **The softmax gauge.** Adding the same vector to every class's row of the logits layer
  (and the same number to every class's bias) leaves every softmax, so the loss, as it
  was; only weight decay tells the two apart. A minimum-norm step spreads its move over
  all the classes' rows, so a binary classifier's step is +d on one row and -d on the
  other and a top-k ranking spends half its budget on copies. Ranking is done on the
  step's sparsest equivalent: per input of the logits layer, the (lower) median over
  classes is taken out, which zeroes at least one class's entry (all of one row's for
  two classes). Measured on breast-cancer logistic regression at 25%: gap closed
  0.38-0.94 ranked raw, 0.85-0.95 in the gauge.
- **The pool.** L-CODEC's units in FOCI order, at least ``min_parameters`` entries, grown
  unit by unit until it holds ``coverage`` of the ranked step's squared mass: a pool of
  fixed size left out units that carried a tenth of the step on the digits MLP, whose
  entries the restricted update could then not move (DESIGN 4.3 / BENCHMARKS.md).
- **The count.** The budget is a floor: with ``step_coverage`` the selection keeps taking
  the next-ranked entry until it holds that share of the step's squared mass (up to a
  limit that bounds the dense solve). A fixed 25% of a 1,445-entry MLP left the update
  at 8x the seed noise where 95% of the mass (938 entries) left it at 1.7x.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .lcodec import LcodecSelection
from .newton import NewtonConfig, NewtonResult, newton_cg_update
from .selection import ParameterSelection
from .task import task_of

__all__ = [
    "CandidatePool",
    "EntryCount",
    "SparseSelection",
    "candidate_pool",
    "select_by_newton_direction",
    "softmax_gauge",
    "top_entries",
]


@dataclass(frozen=True)
class CandidatePool:
    """How the eligible entries are drawn from an L-CODEC selection."""

    blanket: LcodecSelection = field(
        metadata={"help": "ranked units and their slices; its first block starts the pool"}
    )
    coverage: float = field(
        default=0.0, metadata={"help": "grow until the pool holds this share of the step's mass"}
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.coverage <= 1.0:
            raise ValueError("coverage must lie in [0, 1]")


@dataclass(frozen=True)
class SparseSelection:
    """The chosen entries and the Newton-CG step that ranked them."""

    selection: ParameterSelection = field(metadata={"help": "the largest entries of the step"})
    direction: NewtonResult = field(
        metadata={"help": "Newton-CG over every parameter (ParameterSelection.everything order)"}
    )
    candidates: int = field(metadata={"help": "entries that were eligible (the pool's size)"})
    scores: torch.Tensor = field(
        metadata={"help": "what was ranked: the step in the softmax gauge (or as taken)"}
    )


def _offsets(model: nn.Module) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    start = 0
    for name, p in model.named_parameters():
        out[name] = (start, start + p.numel())
        start += p.numel()
    return out


def softmax_gauge(model: nn.Module, step: torch.Tensor, logits_layer: str) -> torch.Tensor:
    """``step`` with the median over classes taken out of the logits layer's entries.

    step ``(p,)`` in ``ParameterSelection.everything(model)`` order; ``logits_layer`` names
    the Linear module whose outputs are the logits (rows: classes). Applied to the model,
    the result gives the same softmax as ``step`` for every input (logits move by the
    same amount in every class). Other entries are returned unchanged.
    """
    layer = dict(model.named_modules()).get(logits_layer)
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"{logits_layer!r} is not a Linear module of the model")
    offsets = _offsets(model)
    out = step.clone()
    for suffix in ("weight", "bias"):
        name = f"{logits_layer}.{suffix}"
        if name not in offsets:
            continue
        lo, hi = offsets[name]
        block = out[lo:hi].view(layer.out_features, -1)
        out[lo:hi] = (block - block.median(dim=0, keepdim=True).values).reshape(-1)
    return out


def candidate_pool(
    model: nn.Module, scores: torch.Tensor, pool: CandidatePool
) -> ParameterSelection:
    """The eligible entries: the blanket's first block, then units until covered.

    scores ``(p,)`` in ``ParameterSelection.everything(model)`` order; the share is of
    ``sum(scores ** 2)``. Units join in FOCI's order, then those it did not rank in model
    order; the selection names the pool's units.
    """
    blanket = pool.blanket
    unit_map = blanket.unit_map
    offsets = _offsets(model)
    mass = scores.double() ** 2
    wanted = pool.coverage * float(mass.sum())

    def unit_mass(unit: str) -> float:
        return sum(
            float(mass[idx + offsets[name][0]].sum()) for name, idx in unit_map.slices[unit].items()
        )

    units = list(blanket.selection.units)
    held = sum(unit_mass(u) for u in units)
    chosen = set(units)
    ranked = set(blanket.ranked_units)
    unranked = (u for u in unit_map.slices if u not in ranked)
    for unit in (*blanket.ranked_units, *unranked):
        if held >= wanted:
            break
        if unit not in chosen:
            units.append(unit)
            chosen.add(unit)
            held += unit_mass(unit)
    return unit_map.selection(units)


@dataclass(frozen=True)
class EntryCount:
    """How many of the ranked entries a selection keeps."""

    budget: int = field(metadata={"help": "at least this many (fewer only if fewer are eligible)"})
    step_coverage: float = field(
        default=0.0,
        metadata={
            "help": "more, until the kept entries hold this share of the ranked step's "
            "squared mass over every entry; 0: exactly the budget"
        },
    )
    limit: int = field(default=0, metadata={"help": "growth stops here; 0: no limit"})

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError("budget must be >= 1")
        if not 0.0 <= self.step_coverage <= 1.0:
            raise ValueError("step_coverage must lie in [0, 1]")
        if self.limit < 0:
            raise ValueError("limit must be >= 0")

    def count(self, ranked_mass: torch.Tensor, total_mass: float) -> int:
        """Entries to keep, given the eligible entries' squared scores in ranked order."""
        count = self.budget
        if self.step_coverage > 0.0 and total_mass > 0.0:
            held = torch.cumsum(ranked_mass.double(), dim=0)
            short = int((held < self.step_coverage * total_mass).sum())
            covering = min(short + 1, int(ranked_mass.numel()))
            if self.limit:
                covering = min(covering, self.limit)
            count = max(count, covering)
        return min(count, int(ranked_mass.numel()))


def top_entries(
    model: nn.Module,
    scores: torch.Tensor,
    budget: int | EntryCount,
    candidates: ParameterSelection | None = None,
    unit_slices: dict[str, dict[str, torch.Tensor]] | None = None,
) -> ParameterSelection:
    """The ``budget`` entries of largest ``|scores|`` (ties: lower index first).

    scores ``(p,)`` in ``ParameterSelection.everything(model)`` order. ``budget``: a count,
    or an ``EntryCount`` that may grow it to cover the step's mass. ``candidates``
    restricts the choice to its entries. ``unit_slices`` (unit -> name -> flat indices)
    names the units for the receipt: those with at least one chosen entry.
    """
    wanted = budget if isinstance(budget, EntryCount) else EntryCount(budget)
    # Selections hold CPU indices whatever device the step was computed on.
    scores = scores.detach().cpu()
    offsets = _offsets(model)
    total = next(reversed(offsets.values()))[1] if offsets else 0
    if scores.shape != (total,):
        raise ValueError(f"scores has shape {tuple(scores.shape)}, the model has {total} entries")
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
    mass = scores.double() ** 2
    count = wanted.count(mass[pool[order]], float(mass.sum()))
    chosen = torch.sort(pool[order[:count]]).values
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
    pool: CandidatePool | None = None,
    logits_layer: str | None = None,
    assume_converged: bool = False,
    step_coverage: float = 0.0,
    max_entries: int = 0,
) -> SparseSelection:
    """Rank entries by a Newton-CG step over every parameter; keep the top ``budget``,
    or more until they hold ``step_coverage`` of the step's squared mass (at most
    ``max_entries``; 0: no limit).

    forget ``(m, *shape)``/``(m,)``, retained ``(n - m, *shape)``/``(n - m,)``.
    ``pool``: only its entries are eligible (every entry without one). ``logits_layer``:
    the Linear module feeding the softmax; the step is ranked in its gauge
    (``softmax_gauge``). ``assume_converged``: take grad J = 0 at the current parameters
    (as the server does), so the direction comes from the removal alone. The model is
    not modified.
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
    scores = direction.delta
    # The gauge holds only for a loss of the softmax alone (cross-entropy's family).
    if logits_layer is not None and task_of(model).shift_invariant:
        scores = softmax_gauge(model, scores, logits_layer)
    candidates = unit_slices = None
    eligible = total
    if pool is not None:
        candidates = candidate_pool(model, scores, pool)
        unit_slices = pool.blanket.unit_map.slices
        eligible = candidates.num_parameters
    count = EntryCount(max(1, min(budget, eligible)), step_coverage, max_entries)
    selection = top_entries(model, scores, count, candidates, unit_slices)
    return SparseSelection(
        selection=selection, direction=direction, candidates=eligible, scores=scores
    )
