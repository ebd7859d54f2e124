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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .codec import foci
from .gradients import sample_loss
from .selection import ParameterSelection

__all__ = [
    "LcodecConfig",
    "LcodecSelection",
    "UnitActivations",
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
    max_units: int = field(
        default=64, metadata={"help": "FOCI ranks at most this many units (past its own rule)"}
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
        if self.sigma < 0 or self.sigma != self.sigma:
            raise ValueError("sigma must be >= 0")
        if self.max_units < 1 or self.batch_size < 1:
            raise ValueError("max_units and batch_size must be positive")
        if self.parameter_budget < 0 or self.budget_cap < 1:
            raise ValueError("parameter_budget must be >= 0 and budget_cap positive")
        if not 0 < self.budget_fraction <= 1:
            raise ValueError("budget_fraction must lie in (0, 1]")

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


@dataclass(frozen=True)
class UnitParameterMap:
    """Where each unit's parameters live: ``slices[unit][param name]`` = flat indices."""

    slices: dict[str, dict[str, torch.Tensor]] = field(
        metadata={"help": "unit -> parameter name -> sorted flat indices into param.view(-1)"}
    )
    parameter_order: tuple[str, ...] = field(metadata={"help": "named_parameters order"})
    output_units: tuple[str, ...] = field(metadata={"help": "units of the output layer"})

    def size(self, unit: str) -> int:
        """Number of parameter entries that belong to ``unit``."""
        return int(sum(int(idx.numel()) for idx in self.slices[unit].values()))

    def selection(self, units: Sequence[str]) -> ParameterSelection:
        """The parameter entries of ``units`` as a selection (indices sorted and unique)."""
        parts: dict[str, list[torch.Tensor]] = {}
        for unit in units:
            for name, idx in self.slices[unit].items():
                parts.setdefault(name, []).append(idx)
        indices = {
            name: torch.unique(torch.cat(parts[name]))  # unique() also sorts
            for name in self.parameter_order
            if name in parts
        }
        return ParameterSelection(indices=indices, units=tuple(units))


@dataclass(frozen=True)
class LcodecSelection:
    """L-CODEC's answer: the first block of parameters and the ranking behind it."""

    selection: ParameterSelection = field(
        metadata={"help": "first block: top-ranked units within the budget + output layer"}
    )
    ranked_units: tuple[str, ...] = field(metadata={"help": "FOCI order (past its own rule)"})
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

    def blocks(self, max_blocks: int | None = None) -> list[ParameterSelection]:
        """Successive disjoint blocks for block-coordinate Newton; the first is ``selection``.

        Each block takes the next ranked units in order while they fit in the budget; a
        unit whose slice alone exceeds the budget is left out of every block.
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
    """``config.num_perturbations`` noisy copies of the samples and the labels they keep.

    inputs ``(m, *shape)``, labels ``(m,)`` -> copies ``(P, *shape)``, labels ``(P,)``.
    Copy c comes from sample ``order[c % m]`` for a seeded permutation ``order``, so
    every sample gets ``P // m`` or ``P // m + 1`` copies (a seeded subset when P < m).
    """
    m = inputs.shape[0]
    if m == 0 or labels.shape != (m,):
        raise ValueError(
            f"need m >= 1 forget inputs (m, *shape) and labels (m,); got "
            f"{tuple(inputs.shape)} and {tuple(labels.shape)}"
        )
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(m, generator=generator)
    source = order[torch.arange(config.num_perturbations) % m]
    base = inputs.detach().cpu()
    noise = torch.randn(
        (config.num_perturbations, *base.shape[1:]), generator=generator, dtype=torch.float64
    )
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

    The response of each copy is its cross-entropy loss (float64). FOCI ranks the
    non-constant units up to ``config.max_units`` with ``seed=config.seed``. If the loss
    does not vary at all, nothing is ranked and the first block holds only the output
    layer (when asked for).
    """
    config = config or LcodecConfig()
    copies, copy_labels = perturbed_copies(forget_inputs, forget_labels, config)
    with _probing(model) as probe:
        activations = probe.run(copies, config.batch_size)
        unit_map = probe.parameter_map()
    loss = sample_loss(activations.outputs, copy_labels.to(activations.outputs.device).long())
    values = activations.values
    varying = values.amax(dim=0) > values.amin(dim=0)
    names = [n for n, keep in zip(activations.names, varying.tolist(), strict=True) if keep]
    constant = tuple(
        n for n, keep in zip(activations.names, varying.tolist(), strict=True) if not keep
    )
    ranked: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    kept = 0
    if names and bool((loss != loss[0]).any()):
        result = foci(
            loss,
            values[:, varying],
            max_selected=min(config.max_units, len(names)),
            seed=config.seed,
            stop_when_nonpositive=False,
        )
        ranked = tuple(names[j] for j in result.selected)
        scores = result.scores
        kept = result.kept_by_rule
    budget = config.budget_for(sum(p.numel() for p in model.parameters()))
    reserved = unit_map.output_units if config.always_include_output_layer else ()
    groups = _fill_blocks(ranked, reserved, unit_map, budget)
    first = unit_map.selection(groups[0] if groups else ())
    return LcodecSelection(
        selection=first,
        ranked_units=ranked,
        foci_scores=scores,
        stopped_by_rule_at=kept,
        parameter_budget=budget,
        reserved_units=reserved,
        constant_units=constant,
        unit_map=unit_map,
    )


def _fill_blocks(
    ranked: Sequence[str], reserved: Sequence[str], unit_map: UnitParameterMap, budget: int
) -> list[tuple[str, ...]]:
    """Disjoint unit groups whose ranked units fit in ``budget`` each.

    Each group takes the next ranked units while they fit; a unit whose slice alone
    exceeds the budget is left out. The first group also holds ``reserved`` (on top of
    the budget, ranked units first since their order is information); reserved units
    are not ranked again.
    """
    groups: list[tuple[str, ...]] = []
    current: list[str] = []
    size = 0
    used = set(reserved)
    for unit in ranked:
        cost = unit_map.size(unit)
        if unit in used or cost > budget:
            continue
        if size + cost > budget:
            groups.append(tuple(current))
            current, size = [], 0
        current.append(unit)
        size += cost
        used.add(unit)
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
