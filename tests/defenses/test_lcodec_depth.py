"""L-CODEC at depth (DESIGN 4.3): copies per forgotten sample whatever the forget-set size,
a ranking past FOCI's cap through a screen that keeps FOCI's picks, and units larger than
the per-block budget split into chunks instead of skipped."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from expunge.defenses.codec import codec, codec_scores, foci
from expunge.defenses.gradients import sample_loss
from expunge.defenses.lcodec import (
    LcodecConfig,
    UnitChunk,
    perturbed_copies,
    select_markov_blanket,
    unit_parameter_map,
)
from expunge.defenses.selection import ParameterSelection
from tests.defenses.planted import planted_network


def _inputs(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _small_classifier(seed: int = 0) -> nn.Module:
    """6 -> 8 (tanh) -> 3, weights from a seeded generator (no global RNG)."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


def _flat_positions(model: nn.Module, selection: ParameterSelection) -> torch.Tensor:
    """The selection's entries as positions into the concatenated parameters."""
    offsets, start = {}, 0
    for name, param in model.named_parameters():
        offsets[name] = start
        start += param.numel()
    return torch.cat([idx + offsets[name] for name, idx in selection.indices.items()])


# --- 1. enough copies per forgotten sample --------------------------------------------


def test_a_forget_set_larger_than_the_copies_gets_min_copies_per_sample() -> None:
    m = 240  # more samples than num_perturbations (200): the old rule gave each <= 1 copy
    x, ids = _inputs(m, 6, seed=1), torch.arange(m)
    config = LcodecConfig(seed=0)  # defaults: 200 copies, at least 2 per sample
    copies, copy_ids = perturbed_copies(x, ids, config)
    assert torch.equal(torch.bincount(copy_ids, minlength=m), torch.full((m,), 2))
    # The response varies over one sample's own copies, not only across samples.
    model = _small_classifier()
    with torch.no_grad():
        loss = sample_loss(model, model(copies).double(), (copy_ids % 3).long())
    for i in range(m):
        own = loss[copy_ids == i]
        assert own.numel() == 2 and bool(own[0] != own[1]), i
    result = select_markov_blanket(model, x, ids % 3, config)
    assert (result.probed_samples, result.copies_per_sample) == (m, 2)


def test_past_the_cap_a_seeded_subset_is_probed_with_min_copies_each() -> None:
    m = 400
    x, ids = _inputs(m, 6, seed=2), torch.arange(m)
    config = LcodecConfig(max_perturbations=300, min_copies_per_sample=3, seed=4)
    copies, copy_ids = perturbed_copies(x, ids, config)
    counts = torch.bincount(copy_ids, minlength=m)
    assert copies.shape == (300, 6)
    assert int((counts == 3).sum()) == 100 and int((counts == 0).sum()) == 300
    _, again = perturbed_copies(x, ids, config)
    _, other = perturbed_copies(
        x, ids, LcodecConfig(max_perturbations=300, min_copies_per_sample=3, seed=5)
    )
    assert torch.equal(again, copy_ids)
    assert set(other.tolist()) != set(copy_ids.tolist())
    result = select_markov_blanket(_small_classifier(), x, ids % 3, config)
    assert (result.probed_samples, result.copies_per_sample) == (100, 3)


@pytest.mark.parametrize("m", [1, 7, 30, 100])
def test_small_forget_sets_keep_exactly_the_copies_they_had(m: int) -> None:
    """With m * min_copies_per_sample <= num_perturbations the copies are those of the
    rule before this one, bit for bit (results were tuned on them)."""
    x = torch.rand(m, 1, 4, 4, generator=torch.Generator().manual_seed(m))
    labels = torch.arange(m) % 10
    config = LcodecConfig(seed=3)
    copies, copy_labels = perturbed_copies(x, labels, config)
    generator = torch.Generator().manual_seed(3)
    order = torch.randperm(m, generator=generator)
    source = order[torch.arange(200) % m]
    noise = torch.randn((200, 1, 4, 4), generator=generator, dtype=torch.float64)
    scale = 0.1 * float(x.double().std(unbiased=False))  # sigma relative to the inputs
    expected = (x[source].double() + scale * noise).to(x.dtype)
    assert torch.equal(copies, expected) and torch.equal(copy_labels, labels[source])


def test_more_copies_per_sample_can_be_asked_for() -> None:
    x, ids = _inputs(100, 6, seed=6), torch.arange(100)
    _, copy_ids = perturbed_copies(x, ids, LcodecConfig(min_copies_per_sample=4))
    assert torch.equal(torch.bincount(copy_ids, minlength=100), torch.full((100,), 4))


def test_copy_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="min_copies_per_sample"):
        LcodecConfig(min_copies_per_sample=0)
    with pytest.raises(ValueError, match="min_copies_per_sample"):
        LcodecConfig(num_perturbations=200, max_perturbations=100, min_copies_per_sample=201)
    # A cap below num_perturbations never lowers it.
    assert LcodecConfig(num_perturbations=300, max_perturbations=100).copy_cap == 300


# --- 2. a ranking past FOCI's cap, and a screen that keeps FOCI's picks ----------------

RELEVANT = (5, 40, 77)  # the hidden units the planted loss depends on
WIDE = 100


def _planted_wide(seed: int) -> nn.Module:
    return planted_network(seed, WIDE, RELEVANT)


# Logit c is a function of hidden unit RELEVANT[c] alone: both name one variable.
GROUND_TRUTH = {f"hidden:{r}" for r in RELEVANT} | {f"out:{c}" for c in range(3)}


def _planted_selection(seed: int, **config: int) -> tuple[nn.Module, LcodecConfig]:
    base = LcodecConfig(num_perturbations=300, sigma=1.0, sigma_relative=False, seed=seed)
    return _planted_wide(seed), replace(base, **config)


def _planted_forget(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(1, 12, generator=torch.Generator().manual_seed(100 + seed))
    return x, torch.zeros(1, dtype=torch.long)


def test_every_varying_unit_is_ranked_past_foci_s_cap() -> None:
    model, config = _planted_selection(0)
    result = select_markov_blanket(model, *_planted_forget(0), config)
    units = {f"hidden:{k}" for k in range(WIDE)} | {f"out:{c}" for c in range(3)}
    assert not result.constant_units and len(units) > config.max_units == 64
    assert len(result.ranked_units) == len(units) and set(result.ranked_units) == units
    assert len(result.foci_scores) == 64
    # The tail follows FOCI's picks by marginal T, largest first.
    tail = result.screening_scores
    assert len(tail) == len(units) - 64
    assert list(tail) == sorted(tail, reverse=True)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_screen_keeps_the_unit_foci_picks_first(seed: int) -> None:
    forget = _planted_forget(seed)
    model, everything = _planted_selection(seed, screen_units=0)
    full = select_markov_blanket(model, *forget, everything)
    assert full.screened_units == WIDE + 3
    assert full.ranked_units[0] in GROUND_TRUTH  # the known answer
    # The coarsest screen: one marginal pass keeps 8 of 103 units for all of FOCI's steps.
    model, screened_config = _planted_selection(seed, screen_units=8, rescreen_every=64)
    screened = select_markov_blanket(model, *forget, screened_config)
    assert screened.screened_units == 8
    assert screened.ranked_units[0] == full.ranked_units[0]
    assert screened.foci_scores[0] == full.foci_scores[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_rescreening_every_step_reproduces_foci_over_all_units(seed: int) -> None:
    """Each pass scores every unit given the chosen ones, so its best is FOCI's next pick."""
    forget = _planted_forget(seed)
    model, everything = _planted_selection(seed, screen_units=0, max_units=20)
    full = select_markov_blanket(model, *forget, everything)
    model, config = _planted_selection(seed, screen_units=5, rescreen_every=1, max_units=20)
    screened = select_markov_blanket(model, *forget, config)
    assert screened.ranked_units[:20] == full.ranked_units[:20]
    assert screened.foci_scores == full.foci_scores
    assert screened.stopped_by_rule_at == full.stopped_by_rule_at


def test_codec_scores_are_codec_per_column_and_foci_s_next_step() -> None:
    generator = torch.Generator().manual_seed(7)
    z = torch.randn(60, 5, generator=generator, dtype=torch.float64)
    y = z[:, 2] + 0.3 * torch.randn(60, generator=generator, dtype=torch.float64)
    x = torch.randn(60, 2, generator=generator, dtype=torch.float64)
    marginal = codec_scores(y, z, seed=1, standardize=False)
    conditional = codec_scores(y, z, seed=1, standardize=False, given=x)
    for j in range(5):
        assert float(marginal[j]) == codec(y, z[:, j], seed=1)
        assert float(conditional[j]) == codec(y, z[:, j], x, seed=1)
    first = foci(y, z, max_selected=2, seed=1, stop_when_nonpositive=False)
    assert first.selected[0] == int(torch.argmax(codec_scores(y, z, seed=1)))
    # FOCI continued from a given set is FOCI's own continuation.
    given = z[:, [first.selected[0]]]
    rest = [j for j in range(5) if j != first.selected[0]]
    second = foci(y, z[:, rest], max_selected=1, seed=1, stop_when_nonpositive=False, given=given)
    assert rest[second.selected[0]] == first.selected[1]
    assert second.scores[0] == first.scores[1]


# --- 3. units larger than the budget are split, not skipped ----------------------------


class _Layer4Filters(nn.Module):
    """A ResNet-18 layer-4 convolution: 512 input channels, 3x3, no bias, batch norm:
    4,608 weights + 2 norm entries per filter, more than the default budget cap (4,096)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(512, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in self.parameters():
                fan_in = param[0].numel() if param.dim() > 1 else 1
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.head(h)


FILTER = 512 * 9


def test_a_filter_larger_than_the_budget_is_split_across_consecutive_blocks() -> None:
    model = _Layer4Filters(seed=0).eval()
    x = _inputs(8, 512, 3, 3, seed=8)
    result = select_markov_blanket(model, x, torch.arange(8) % 3, LcodecConfig(seed=0))
    budget = result.parameter_budget
    assert budget == 4096 < FILTER + 2
    filters = [u for u in result.ranked_units if u.startswith("conv:")]
    assert len(filters) == 4  # every filter is ranked, and each is too big for a block
    blocks = result.blocks()
    reserved = sum(result.unit_map.size(u) for u in result.reserved_units)
    assert reserved == 15
    seen: list[torch.Tensor] = []
    for k, block in enumerate(blocks):
        ranked_part = block.num_parameters - (reserved if k == 0 else 0)
        assert 0 < ranked_part <= budget, k
        seen.append(_flat_positions(model, block))
    # The first block holds a filter's chunk (the old rule left every filter out), the
    # blocks are disjoint, and together they hold every entry of the model exactly once.
    assert "conv.weight" in result.selection.indices
    everything = torch.cat(seen)
    assert everything.numel() == torch.unique(everything).numel()
    assert everything.numel() == sum(p.numel() for p in model.parameters())
    # Each filter spans consecutive blocks, in rank order.
    places = {u: [k for k, b in enumerate(blocks) if u in b.units] for u in filters}
    for unit in filters:
        assert places[unit] == list(range(places[unit][0], places[unit][-1] + 1)), unit
    assert [places[u][0] for u in filters] == sorted(places[u][0] for u in filters)


def test_a_split_filter_leads_with_its_norm_entries_then_its_input_channels() -> None:
    model = _Layer4Filters(seed=1).eval()
    unit_map = unit_parameter_map(model, _inputs(2, 512, 3, 3))
    chunks = unit_map.chunks("conv:2", 4096)
    assert chunks == (UnitChunk("conv:2", 0, 2305), UnitChunk("conv:2", 2305, 4610))
    first, second = (unit_map.selection([c]) for c in chunks)
    assert first.units == second.units == ("conv:2",)
    assert first.indices["bn.weight"].tolist() == [2] and first.indices["bn.bias"].tolist() == [2]
    start = 2 * FILTER
    assert torch.equal(first.indices["conv.weight"], torch.arange(start, start + 2303))
    assert torch.equal(second.indices["conv.weight"], torch.arange(start + 2303, start + FILTER))
    assert set(second.indices) == {"conv.weight"}
    assert unit_map.chunks("head:0", 4096) == ("head:0",)


def test_chunks_partition_a_unit_within_the_budget() -> None:
    model = nn.Sequential(nn.Linear(7, 2), nn.Tanh(), nn.Linear(2, 2))
    unit_map = unit_parameter_map(model, _inputs(2, 7))
    chunks = unit_map.chunks("0:1", 3)
    assert [unit_map.size(c) for c in chunks] == [2, 3, 3]
    whole = _flat_positions(model, unit_map.selection(["0:1"]))
    parts = torch.cat([_flat_positions(model, unit_map.selection([c])) for c in chunks])
    assert torch.equal(torch.sort(parts).values, torch.sort(whole).values)
    assert unit_map.selection([chunks[0]]).indices["0.bias"].tolist() == [1]
    # Whole units and chunks mix in one selection, named by unit once each.
    mixed = unit_map.selection(["2:0", *chunks])
    assert mixed.units == ("2:0", "0:1") and mixed.num_parameters == 3 + 8
