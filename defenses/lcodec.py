"""L-CODEC: the parameters that carry a forget set's information (DESIGN 4.3).

Perturbed copies of the forget samples go through the model; forward hooks record one
feature per *unit* (each output of a Linear layer, each filter of a Conv layer averaged
over space) and the response is each copy's loss. FOCI over the units' activations
ranks them; each unit maps to its parameter slice (weight row or filter, bias entry,
and the affine entries of a norm layer applied directly to its output). The ranked
units fill a parameter budget, block after block, for a (block-coordinate) Newton step;
the output layer's rows join the first block on top of the budget when asked for, so
the first block holds at most ``budget + output layer`` parameters.

FOCI's own stopping rule keeps far too few units to forget well (DESIGN 4.3 measured
one unit on a digits MLP), so FOCI runs past its rule to rank units and the budget, not
the rule, decides how many are used; ``stopped_by_rule_at`` still reports the rule.

At depth (DESIGN 4.3, ResNet-18 on CIFAR) three rules keep the method meaningful:

- every probed forget sample gets at least ``min_copies_per_sample`` copies, so the
  response varies over perturbations of one sample and not only across samples; past
  ``max_perturbations`` copies a seeded subset of the forget set is probed;
- FOCI's forward selection chooses among the ``screen_units`` units that score best in
  a batched pass over every unit, repeated every ``rescreen_every`` steps given the units
  chosen so far (``_rank_units``); past FOCI's ``max_units`` the other units follow in
  marginal-CODEC order, so every varying unit is ranked;
- a unit larger than the per-block budget is split into chunks that fill consecutive
  blocks, instead of being left out (a ResNet-18 layer-4 filter has 4,608 weights).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, NamedTuple

import torch
from torch import nn

from .codec import codec_scores, foci, standardized
from .gradients import sample_loss
from .selection import ParameterSelection

__all__ = [
    "LcodecConfig",
    "LcodecSelection",
    "UnitActivations",
    "UnitChunk",
    "UnitParameterMap",
    "perturbed_copies",
    "select_markov_blanket",
    "unit_activations",
    "unit_parameter_map",
]

# Modules whose outputs are units; transposed convolutions are left out because their
# weight is laid out (in, out, ...), so "filter k" is not weight[k].
UNIT_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
)


@dataclass(frozen=True)
class LcodecConfig:
    """How to probe the model and how many parameters the selection may hold."""

    num_perturbations: int = field(
        default=200, metadata={"help": "perturbed copies P in total, spread over the forget set"}
    )
    sigma: float = field(default=0.1, metadata={"help": "noise standard deviation of the copies"})
    sigma_relative: bool = field(
        default=True,
        metadata={
            "help": "sigma is a multiple of the forget inputs' standard deviation (over all "
            "entries); False: sigma is absolute, in input units"
        },
    )
    min_copies_per_sample: int = field(
        default=2,
        metadata={
            "help": "each probed forget sample gets at least this many copies; more copies "
            "than num_perturbations are made when the forget set needs them"
        },
    )
    max_perturbations: int = field(
        default=500,
        metadata={
            "help": "most copies in all (never below num_perturbations); past it a seeded "
            "subset of forget samples is probed, min_copies_per_sample each (FOCI's cost "
            "grows as copies^2)"
        },
    )
    max_units: int = field(
        default=64,
        metadata={
            "help": "FOCI's forward selection ranks this many units (past its own rule); "
            "the other units follow in marginal-CODEC order"
        },
    )
    screen_units: int = field(
        default=256,
        metadata={
            "help": "FOCI's steps choose among this many units, those of largest T(Y, unit "
            "| units chosen so far); 0: among all units (cost max_units x all units)"
        },
    )
    rescreen_every: int = field(
        default=16,
        metadata={
            "help": "with a screen: every this many FOCI steps all units are scored again, "
            "given the units chosen so far, and screened anew"
        },
    )
    parameter_budget: int = field(
        default=0,
        metadata={
            "help": "most parameters of ranked units per block (a reserved output layer comes "
            "on top); 0: use budget_fraction"
        },
    )
    budget_fraction: float = field(
        default=0.25, metadata={"help": "with parameter_budget 0: this share of all parameters"}
    )
    budget_cap: int = field(
        default=4096,
        metadata={"help": "with parameter_budget 0: at most this many (Newton solves |S| x |S|)"},
    )
    always_include_output_layer: bool = field(
        default=True,
        metadata={"help": "add the output layer's rows to the first block, on top of the budget"},
    )
    batch_size: int = field(default=256, metadata={"help": "copies per forward pass"})
    seed: int = field(default=0, metadata={"help": "seeds the copies and FOCI's tie-breaking"})

    def __post_init__(self) -> None:
        if self.num_perturbations < 2:
            raise ValueError("num_perturbations must be at least 2 (CODEC compares copies)")
        if not 1 <= self.min_copies_per_sample <= self.copy_cap:
            raise ValueError(
                "min_copies_per_sample must lie in [1, max(max_perturbations, num_perturbations)]"
            )
        if self.screen_units < 0 or self.rescreen_every < 1:
            raise ValueError("screen_units must be >= 0 (0: no screen), rescreen_every >= 1")
        if self.sigma < 0 or self.sigma != self.sigma:
            raise ValueError("sigma must be >= 0")
        if self.max_units < 1 or self.batch_size < 1:
            raise ValueError("max_units and batch_size must be positive")
        if self.parameter_budget < 0 or self.budget_cap < 1:
            raise ValueError("parameter_budget must be >= 0 and budget_cap positive")
        if not 0 < self.budget_fraction <= 1:
            raise ValueError("budget_fraction must lie in (0, 1]")

    @property
    def copy_cap(self) -> int:
        """Most copies in all: ``max_perturbations``, never below ``num_perturbations``."""
        return max(self.max_perturbations, self.num_perturbations)

    def budget_for(self, num_parameters: int) -> int:
        """The budget of ranked units per block for a model with ``num_parameters``."""
        if self.parameter_budget:
            return self.parameter_budget
        return max(1, min(self.budget_cap, int(self.budget_fraction * num_parameters)))


class UnitActivations(NamedTuple):
    """Unit features of a batch: ``values`` ``(n, U)`` float64 in the order of ``names``."""

    names: tuple[str, ...]
    values: torch.Tensor
    outputs: torch.Tensor  # the model's outputs (n, C), float64


class UnitChunk(NamedTuple):
    """Part of a unit too large for one block: its entries at positions ``[start, stop)``
    of ``UnitParameterMap.entry_order(unit)``."""

    unit: str
    start: int
    stop: int


# A block's member: a whole unit by name, or a chunk of one.
UnitEntry = str | UnitChunk


@dataclass(frozen=True)
class UnitParameterMap:
    """Where each unit's parameters live: ``slices[unit][param name]`` = flat indices."""

    slices: dict[str, dict[str, torch.Tensor]] = field(
        metadata={"help": "unit -> parameter name -> sorted flat indices into param.view(-1)"}
    )
    parameter_order: tuple[str, ...] = field(metadata={"help": "named_parameters order"})
    output_units: tuple[str, ...] = field(metadata={"help": "units of the output layer"})

    def size(self, unit: UnitEntry) -> int:
        """Number of parameter entries that belong to ``unit`` (or to the chunk)."""
        if isinstance(unit, UnitChunk):
            return unit.stop - unit.start
        return int(sum(int(idx.numel()) for idx in self.slices[unit].values()))

    def entry_order(self, unit: str) -> list[tuple[str, torch.Tensor]]:
        """The unit's ``(parameter name, flat indices)`` pieces in the order chunks cut them.

        Smallest piece first (stable): the bias and norm affine entries, one each per
        unit and the most direct handles on its output, go to the first chunk; the weight
        row or filter follows in flat order, so a conv filter's chunk is a run of whole
        input channels (kh x kw kernels), cut only at the chunk's two ends.
        """
        return sorted(self.slices[unit].items(), key=lambda piece: int(piece[1].numel()))

    def chunks(self, unit: str, budget: int) -> tuple[UnitEntry, ...]:
        """``(unit,)`` if it fits in ``budget``, else ``ceil(size / budget)`` chunks of
        near-equal size (each within the budget) that cover it in ``entry_order``."""
        size = self.size(unit)
        if size <= budget:
            return (unit,)
        count = -(-size // budget)
        bounds = [k * size // count for k in range(count + 1)]
        return tuple(UnitChunk(unit, lo, hi) for lo, hi in pairwise(bounds))

    def selection(self, units: Sequence[UnitEntry]) -> ParameterSelection:
        """The parameter entries of ``units`` (whole units or chunks) as a selection
        (indices sorted and unique). A chunk is named by its unit in ``units``."""
        parts: dict[str, list[torch.Tensor]] = {}
        for entry in units:
            for name, idx in self._pieces(entry):
                parts.setdefault(name, []).append(idx)
        indices = {
            name: torch.unique(torch.cat(parts[name]))  # unique() also sorts
            for name in self.parameter_order
            if name in parts
        }
        names = (e.unit if isinstance(e, UnitChunk) else e for e in units)
        return ParameterSelection(indices=indices, units=tuple(dict.fromkeys(names)))

    def _pieces(self, entry: UnitEntry) -> Iterator[tuple[str, torch.Tensor]]:
        if not isinstance(entry, UnitChunk):
            yield from self.slices[entry].items()
            return
        offset = 0
        for name, idx in self.entry_order(entry.unit):
            lo, hi = max(entry.start - offset, 0), min(entry.stop - offset, int(idx.numel()))
            if lo < hi:
                yield name, idx[lo:hi]
            offset += int(idx.numel())


@dataclass(frozen=True)
class LcodecSelection:
    """L-CODEC's answer: the first block of parameters and the ranking behind it."""

    selection: ParameterSelection = field(
        metadata={"help": "first block: top-ranked units within the budget + output layer"}
    )
    ranked_units: tuple[str, ...] = field(
        metadata={
            "help": "FOCI's order (past its own rule; len(foci_scores) units), then every "
            "other varying unit by marginal T"
        }
    )
    foci_scores: tuple[float, ...] = field(metadata={"help": "T of each ranked unit at its step"})
    stopped_by_rule_at: int = field(
        metadata={"help": "how many ranked units FOCI's own rule (T > 0) would keep"}
    )
    parameter_budget: int = field(
        metadata={"help": "most parameters of ranked units per block (reserved ones on top)"}
    )
    reserved_units: tuple[str, ...] = field(
        metadata={"help": "units placed in the first block whatever their rank (output layer)"}
    )
    constant_units: tuple[str, ...] = field(
        metadata={"help": "units that did not vary over the copies; never ranked"}
    )
    unit_map: UnitParameterMap = field(metadata={"help": "unit -> parameter slices"})
    probed_samples: int = field(
        default=0,
        metadata={"help": "forget samples that were copied (a seeded subset past the cap)"},
    )
    copies_per_sample: int = field(
        default=0, metadata={"help": "each probed sample had at least this many copies"}
    )
    screened_units: int = field(
        default=0,
        metadata={"help": "units each FOCI step chose among (best of a pass over all units)"},
    )
    screening_scores: tuple[float, ...] = field(
        default=(),
        metadata={"help": "marginal T of the ranked units after FOCI's (ranked_units tail)"},
    )

    def blocks(self, max_blocks: int | None = None) -> list[ParameterSelection]:
        """Successive disjoint blocks for block-coordinate Newton; the first is ``selection``.

        Each block takes the next ranked units in order while they fit in the budget; a
        unit whose slice alone exceeds the budget is split (``UnitParameterMap.chunks``)
        and its chunks take consecutive places, so it spans consecutive blocks. Blocks
        are disjoint in entries; a split unit is named in each block that holds a chunk.
        """
        groups = _fill_blocks(
            self.ranked_units, self.reserved_units, self.unit_map, self.parameter_budget
        )
        if max_blocks is not None:
            groups = groups[:max_blocks]
        return [self.unit_map.selection(units) for units in groups]


def perturbed_copies(
    inputs: torch.Tensor, labels: torch.Tensor, config: LcodecConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of the samples and the labels they keep.

    inputs ``(m, *shape)``, labels ``(m,)`` -> copies ``(C, *shape)``, labels ``(C,)``.
    Copy c comes from sample ``order[c % s]`` for a seeded permutation ``order`` and
    ``s`` probed samples. With k = ``min_copies_per_sample`` and P = ``num_perturbations``:
    if m * k <= P, all m samples share C = P copies (``P // m`` or ``P // m + 1`` each);
    otherwise every probed sample gets exactly k, all m of them while m * k stays within
    ``config.copy_cap``, else the first ``copy_cap // k`` of ``order`` (a seeded subset).
    """
    m = inputs.shape[0]
    if m == 0 or labels.shape != (m,):
        raise ValueError(
            f"need m >= 1 forget inputs (m, *shape) and labels (m,); got "
            f"{tuple(inputs.shape)} and {tuple(labels.shape)}"
        )
    plan = _copy_plan(m, config)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(m, generator=generator)
    source = order[torch.arange(plan.total) % plan.probed]
    base = inputs.detach().cpu()
    noise = torch.randn((plan.total, *base.shape[1:]), generator=generator, dtype=torch.float64)
    scale = config.sigma
    if config.sigma_relative:
        spread = float(base.double().std(unbiased=False)) if base.numel() > 1 else 0.0
        # A constant input (e.g. one blank image) has no scale of its own; use unit scale.
        scale *= spread if spread > 0 else 1.0
    # Integer inputs (raw pixels) would round the noise away; copies stay floating point.
    dtype = inputs.dtype if inputs.is_floating_point() else torch.float32
    copies = (base[source].double() + scale * noise).to(dtype)
    return copies.to(inputs.device), labels[source.to(labels.device)]


def unit_activations(
    model: nn.Module, inputs: torch.Tensor, batch_size: int = 256
) -> UnitActivations:
    """One feature per unit for each input: inputs ``(n, *shape)`` -> values ``(n, U)``.

    Linear unit k is output column k (averaged over any middle axes), Conv filter k is
    its output channel averaged over space. Units are named ``"<module name>:<k>"`` by
    ``named_modules`` names. A module called twice in one forward pass gives the mean of
    its calls. The model is probed in eval mode without gradients and left as it was.
    """
    with _probing(model) as probe:
        return probe.run(inputs, batch_size)


def unit_parameter_map(model: nn.Module, example_inputs: torch.Tensor) -> UnitParameterMap:
    """Map every unit to its parameter slice; a short forward pass over ``example_inputs``
    ``(k, *shape)`` reveals which norm layer is applied to which unit's output and which
    layer produces the model's output."""
    with _probing(model) as probe:
        probe.run(example_inputs[:2], batch_size=2)
        return probe.parameter_map()


def select_markov_blanket(
    model: nn.Module,
    forget_inputs: torch.Tensor,
    forget_labels: torch.Tensor,
    config: LcodecConfig | None = None,
) -> LcodecSelection:
    """L-CODEC selection for the forget set: inputs ``(m, *shape)``, labels ``(m,)``.

    The copies come from ``perturbed_copies`` (the result says how many samples were
    probed, with at least how many copies each); the response of each copy is its
    cross-entropy loss (float64). Every non-constant unit is ranked (``_rank_units``):
    FOCI's order first, with ``seed=config.seed``, then the rest by marginal CODEC. If
    the loss does not vary at all, nothing is ranked and the first block holds only the
    output layer (when asked for).
    """
    config = config or LcodecConfig()
    copies, copy_labels = perturbed_copies(forget_inputs, forget_labels, config)
    plan = _copy_plan(forget_inputs.shape[0], config)
    with _probing(model) as probe:
        activations = probe.run(copies, config.batch_size)
        unit_map = probe.parameter_map()
    loss = sample_loss(
        model, activations.outputs, copy_labels.to(activations.outputs.device).long()
    )
    values = activations.values
    varying = values.amax(dim=0) > values.amin(dim=0)
    names = [n for n, keep in zip(activations.names, varying.tolist(), strict=True) if keep]
    constant = tuple(
        n for n, keep in zip(activations.names, varying.tolist(), strict=True) if not keep
    )
    ranking = _Ranking((), (), 0, 0, ())
    if names and bool((loss != loss[0]).any()):
        ranking = _rank_units(loss, values[:, varying], config)
    ranked = tuple(names[j] for j in ranking.order)
    budget = config.budget_for(sum(p.numel() for p in model.parameters()))
    reserved = unit_map.output_units if config.always_include_output_layer else ()
    groups = _fill_blocks(ranked, reserved, unit_map, budget)
    first = unit_map.selection(groups[0] if groups else ())
    return LcodecSelection(
        selection=first,
        ranked_units=ranked,
        foci_scores=ranking.foci_scores,
        stopped_by_rule_at=ranking.kept,
        parameter_budget=budget,
        reserved_units=reserved,
        constant_units=constant,
        unit_map=unit_map,
        probed_samples=plan.probed,
        copies_per_sample=plan.per_sample,
        screened_units=ranking.screened,
        screening_scores=ranking.screening_scores,
    )


class _CopyPlan(NamedTuple):
    probed: int  # forget samples that get copies
    total: int  # copies in all
    per_sample: int  # each probed sample gets at least this many


def _copy_plan(m: int, config: LcodecConfig) -> _CopyPlan:
    """How ``perturbed_copies`` spreads copies over ``m >= 1`` forget samples."""
    k = config.min_copies_per_sample
    if m * k <= config.num_perturbations:
        # The P copies as before this rule existed: results tuned on it stay as they were.
        return _CopyPlan(m, config.num_perturbations, config.num_perturbations // m)
    probed = min(m, config.copy_cap // k)
    return _CopyPlan(probed, probed * k, k)


class _Ranking(NamedTuple):
    order: tuple[int, ...]  # candidate columns, FOCI's first, then by marginal T
    foci_scores: tuple[float, ...]
    kept: int  # leading FOCI picks its own rule keeps
    screened: int  # candidates each FOCI step chose among
    screening_scores: tuple[float, ...]  # marginal T of the columns after FOCI's


def _rank_units(loss: torch.Tensor, values: torch.Tensor, config: LcodecConfig) -> _Ranking:
    """Rank every column of ``values`` ``(n, U)`` (non-constant units) for ``loss`` ``(n,)``.

    Screening rule: FOCI's forward selection runs in rounds of ``rescreen_every`` steps;
    each round first scores all U units in one batched pass, T(loss, unit | units
    chosen so far) (``codec_scores``: exactly FOCI's next-step scores), and the round's
    steps choose only among the ``screen_units`` best. The first pick is therefore always
    the one FOCI makes over all units, and the cost is bounded by
    ``max_units x (screen_units + U / rescreen_every)`` candidate evaluations of O(n^2)
    each, whatever the model's size (the defaults were measured against FOCI over all
    units: BENCHMARKS.md, "L-CODEC at depth"). Past FOCI's
    ``max_units`` the other units follow by marginal T (descending, ties to the lower
    column). With U within both limits (the small models), FOCI ranks all units exactly
    as it did before the screen existed.
    """
    p = values.shape[1]
    screen = config.screen_units if 0 < config.screen_units < p else p
    if screen == p and config.max_units >= p:
        result = foci(loss, values, max_selected=p, seed=config.seed, stop_when_nonpositive=False)
        return _Ranking(result.selected, result.scores, result.kept_by_rule, p, ())
    # Standardized once, so the scores over a screened subset equal those over all units.
    columns = standardized(values)
    marginal = codec_scores(loss, columns, seed=config.seed, standardize=False)
    head, scores, kept = _screened_foci(loss, columns, marginal, screen, config)
    chosen = set(head)
    by_marginal = torch.sort(marginal, descending=True, stable=True).indices.tolist()
    tail = [j for j in by_marginal if j not in chosen]
    tail_scores = tuple(float(marginal[j]) for j in tail)
    return _Ranking(tuple(head + tail), scores, kept, screen, tail_scores)


def _screened_foci(
    loss: torch.Tensor,
    columns: torch.Tensor,
    marginal: torch.Tensor,
    screen: int,
    config: LcodecConfig,
) -> tuple[list[int], tuple[float, ...], int]:
    """FOCI's first ``max_units`` picks over standardized ``columns`` ``(n, U)``, each
    round among the ``screen`` best of a pass over all columns: (picks, T at each
    step, how many picks FOCI's own rule keeps). ``marginal``: the first pass."""
    p = columns.shape[1]
    # Without a screen a re-scoring pass changes nothing: one round, as plain FOCI.
    every = config.rescreen_every if screen < p else config.max_units
    head: list[int] = []
    scores: list[float] = []
    kept: int | None = None
    while len(head) < min(config.max_units, p):
        given = columns[:, head]
        step = marginal.clone()
        if head:
            step = codec_scores(loss, columns, seed=config.seed, standardize=False, given=given)
            step[head] = float("-inf")
        by_step = torch.sort(step, descending=True, stable=True).indices.tolist()
        # Column order is kept so FOCI's ties still go to the lower unit, as over all units.
        pool = sorted(by_step[: min(screen, p - len(head))])
        result = foci(
            loss,
            columns[:, pool],
            max_selected=min(every, config.max_units - len(head), len(pool)),
            seed=config.seed,
            stop_when_nonpositive=False,
            standardize=False,
            given=given,
        )
        if kept is None and result.kept_by_rule < len(result.selected):
            kept = len(head) + result.kept_by_rule
        head += [pool[j] for j in result.selected]
        scores += result.scores
    return head, tuple(scores), len(head) if kept is None else kept


def _fill_blocks(
    ranked: Sequence[str], reserved: Sequence[str], unit_map: UnitParameterMap, budget: int
) -> list[tuple[UnitEntry, ...]]:
    """Disjoint entry groups whose ranked entries fit in ``budget`` each.

    Each group takes the next ranked entries while they fit; a unit larger than the
    budget comes as its chunks (``UnitParameterMap.chunks``), in order. The first group
    also holds ``reserved`` (on top of the budget, ranked entries first since their
    order is information); reserved units are not ranked again.
    """
    groups: list[tuple[UnitEntry, ...]] = []
    current: list[UnitEntry] = []
    size = 0
    used = set(reserved)
    for unit in ranked:
        if unit in used:
            continue
        used.add(unit)
        for entry in unit_map.chunks(unit, budget):
            cost = unit_map.size(entry)
            if size + cost > budget:
                groups.append(tuple(current))
                current, size = [], 0
            current.append(entry)
            size += cost
    if current or not groups:
        groups.append(tuple(current))
    groups[0] = (*groups[0], *reserved)
    return [group for group in groups if group]


class _Probe:
    """Forward-hook state: unit features per batch and the data flow between layers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.units: list[tuple[str, nn.Module, int]] = [
            (name, module, _unit_count(module))
            for name, module in model.named_modules()
            if isinstance(module, UNIT_MODULES)
        ]
        self.norms: dict[str, nn.Module] = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, NORM_MODULES)
        }
        self.followers: dict[str, str] = {}  # unit module -> norm applied to its output
        self.output_module: str | None = None
        self._calls: dict[str, list[torch.Tensor]] = {}
        # Outputs of unit modules in the current batch, by id; the tensor is kept so the
        # id cannot be reused by another tensor while the batch runs.
        self._produced: dict[int, tuple[str, torch.Tensor]] = {}

    def unit_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                return
            self._produced[id(output)] = (name, output)
            if isinstance(module, nn.Linear):
                feature = output.reshape(output.shape[0], -1, output.shape[-1]).mean(dim=1)
            else:
                feature = output.flatten(start_dim=2).mean(dim=2)
            self._calls.setdefault(name, []).append(feature.detach().double().cpu())

        return hook

    def norm_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not inputs or not isinstance(inputs[0], torch.Tensor):
                return
            source = self._produced.get(id(inputs[0]))
            if source is not None and source[1] is inputs[0]:
                self.followers.setdefault(source[0], name)

        return hook

    def run(self, inputs: torch.Tensor, batch_size: int) -> UnitActivations:
        reference = next(self.model.parameters(), inputs)
        columns: list[list[torch.Tensor]] = [[] for _ in self.units]
        outputs: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                self._calls, self._produced = {}, {}
                batch = inputs[start : start + batch_size]
                out = self.model(batch.to(device=reference.device, dtype=reference.dtype))
                source = self._produced.get(id(out))
                if self.output_module is None and source is not None and source[1] is out:
                    self.output_module = source[0]
                outputs.append(out.detach().double().cpu())
                rows = out.shape[0]
                for k, (name, _, count) in enumerate(self.units):
                    calls = self._calls.get(name)
                    # A module the forward pass never reached carries no information: zeros
                    # make its units constant, so FOCI never sees them.
                    columns[k].append(
                        torch.stack(calls).mean(dim=0)
                        if calls
                        else torch.zeros((rows, count), dtype=torch.float64)
                    )
        self._calls, self._produced = {}, {}
        names = tuple(f"{name}:{k}" for name, _, count in self.units for k in range(count))
        per_module = [torch.cat(chunks) for chunks in columns]
        values = torch.cat(per_module, dim=1) if per_module else torch.zeros((len(inputs), 0))
        return UnitActivations(names, values.double(), torch.cat(outputs))

    def parameter_map(self) -> UnitParameterMap:
        param_names = {id(p): n for n, p in self.model.named_parameters()}
        slices: dict[str, dict[str, torch.Tensor]] = {}
        for name, module, count in self.units:
            owners = [module]
            norm = self.norms.get(self.followers.get(name, ""))
            weight = getattr(norm, "weight", None)
            if (
                norm is not None
                and isinstance(weight, torch.Tensor)
                and weight.dim() >= 1
                and weight.shape[0] == count
            ):
                owners.append(norm)
            for k in range(count):
                unit: dict[str, torch.Tensor] = {}
                for owner in owners:
                    for param in owner.parameters(recurse=False):
                        if param.dim() >= 1 and param.shape[0] == count:
                            per = param[0].numel()
                            unit[param_names[id(param)]] = torch.arange(k * per, (k + 1) * per)
                slices[f"{name}:{k}"] = unit
        output = self.output_module
        if output is None:
            # The model post-processes its last layer's output; fall back to the last Linear.
            linear = [n for n, m, _ in self.units if isinstance(m, nn.Linear)]
            output = linear[-1] if linear else None
        output_units = tuple(
            f"{name}:{k}" for name, _, count in self.units if name == output for k in range(count)
        )
        return UnitParameterMap(
            slices=slices,
            parameter_order=tuple(n for n, _ in self.model.named_parameters()),
            output_units=output_units,
        )


@contextmanager
def _probing(model: nn.Module) -> Iterator[_Probe]:
    """Hooks on every unit and norm module, eval mode; all undone on the way out."""
    probe = _Probe(model)
    modes = {module: module.training for module in model.modules()}
    handles = []
    try:
        model.eval()
        for name, module, _ in probe.units:
            handles.append(module.register_forward_hook(probe.unit_hook(name)))
        for name, module in probe.norms.items():
            handles.append(module.register_forward_hook(probe.norm_hook(name)))
        yield probe
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training


def _unit_count(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(module.out_channels)  # type: ignore[arg-type]
