"""L-CODEC: unit naming, unit -> parameter slices, budgets, blocks, and an informative ranking."""

from __future__ import annotations

from typing import TypeVar

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.lcodec import (
    LcodecConfig,
    LcodecSelection,
    perturbed_copies,
    select_markov_blanket,
    unit_activations,
    unit_parameter_map,
)
from expunge.defenses.selection import ParameterSelection
from expunge.defenses.training import TrainConfig, train
from tests.defenses.planted import planted_network

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _digits(n: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    raw = load_digits()
    x = torch.tensor(raw.data[:n] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x, torch.tensor(raw.target[:n])


def _trained(name: str, epochs: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x, y = _digits()
    model = build_model(ArchitectureSpec(name, (1, 8, 8), 10), seed=0)
    train(model, x, y, TrainConfig(epochs=epochs, batch_size=16, seed=0))
    return model, x, y


@pytest.fixture(scope="module")
def digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return _trained("mlp", epochs=5)


def _seeded(model: ModuleT, seed: int) -> ModuleT:
    """Overwrite every parameter from a seeded generator (no global RNG); eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _inputs(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _equal_selections(a: ParameterSelection, b: ParameterSelection) -> bool:
    return (
        a.units == b.units
        and a.indices.keys() == b.indices.keys()
        and all(torch.equal(a.indices[k], b.indices[k]) for k in a.indices)
    )


def test_units_are_named_by_module_and_identical_layers_do_not_collide() -> None:
    model = _seeded(
        nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)),
        seed=0,
    )
    assert str(model[2]) == str(model[4])  # the reference code's key would collide here
    x = _inputs(5, 4)
    acts = unit_activations(model, x)
    assert acts.names == tuple(f"{layer}:{k}" for layer in (0, 2, 4) for k in range(3))
    with torch.no_grad():
        h0 = model[0](x)
        h2 = model[2](torch.tanh(h0))
        h4 = model[4](torch.tanh(h2))
    torch.testing.assert_close(acts.values, torch.cat([h0, h2, h4], dim=1).double())
    torch.testing.assert_close(acts.outputs, h4.double())
    slices = unit_parameter_map(model, x).slices
    assert slices["2:1"].keys() == {"2.weight", "2.bias"}
    assert slices["4:1"].keys() == {"4.weight", "4.bias"}
    assert slices["2:1"]["2.weight"].tolist() == [3, 4, 5]  # row 1 of a (3, 3) weight
    assert slices["2:1"]["2.bias"].tolist() == [1]
    assert _no_hooks_left(model)


def test_conv_units_average_each_filter_over_space() -> None:
    model = _seeded(
        nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(100, 3)), 1
    )
    conv = model[0]
    x = _inputs(6, 2, 5, 5, seed=1)
    acts = unit_activations(model, x)
    assert acts.names[:4] == ("0:0", "0:1", "0:2", "0:3")
    with torch.no_grad():
        torch.testing.assert_close(acts.values[:, :4], conv(x).mean(dim=(2, 3)).double())


class _Mixed(nn.Module):
    """Conv -> BatchNorm, Linear -> LayerNorm, and a head: each norm follows a unit layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(12, 5)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1)
        return self.head(torch.tanh(self.ln(self.fc(h))))


def test_unit_slices_hold_exactly_the_units_rows_by_construction() -> None:
    model = _Mixed().eval()
    # Write into every entry the code of the unit it belongs to; gathering a unit's
    # slice must then return that code and nothing else.
    owners = {"conv": ("conv", "bn"), "fc": ("fc", "ln"), "head": ("head",)}
    codes = {"conv": 100, "fc": 200, "head": 300}
    with torch.no_grad():
        for layer, modules in owners.items():
            for module_name in modules:
                for param in getattr(model, module_name).parameters():
                    for k in range(param.shape[0]):
                        param[k] = codes[layer] + k
    x = _inputs(4, 1, 6, 6, seed=2)
    unit_map = unit_parameter_map(model, x)
    params = {n: p.detach() for n, p in model.named_parameters()}
    expected_size = {"conv": 9 + 1 + 2, "fc": 12 + 1 + 2, "head": 5 + 1}
    for unit in unit_map.slices:
        layer, k = unit.split(":")
        gathered = unit_map.selection([unit]).gather(params)
        assert gathered.numel() == expected_size[layer] == unit_map.size(unit), unit
        assert bool((gathered == codes[layer] + int(k)).all()), unit
    assert unit_map.slices["conv:2"].keys() == {"conv.weight", "conv.bias", "bn.weight", "bn.bias"}
    assert unit_map.output_units == ("head:0", "head:1", "head:2", "head:3")
    # The units partition the model: every parameter entry belongs to exactly one unit.
    everything = unit_map.selection(list(unit_map.slices))
    assert everything.num_parameters == sum(p.numel() for p in model.parameters())
    assert sum(unit_map.size(u) for u in unit_map.slices) == everything.num_parameters


def test_a_norm_that_does_not_read_the_units_output_is_not_attached() -> None:
    model = _seeded(
        nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2)
        ),
        seed=3,
    )
    unit_map = unit_parameter_map(model, _inputs(3, 1, 4, 4, seed=3))
    assert unit_map.slices["0:1"].keys() == {"0.weight", "0.bias"}


def test_resnet_conv_units_carry_their_batch_norm_entries() -> None:
    model = build_model(ArchitectureSpec("resnet", (1, 8, 8), 10), seed=0).eval()
    unit_map = unit_parameter_map(model, _digits(4)[0])
    followers = {
        "0": "1",
        "3.conv1": "3.bn1",
        "3.conv2": "3.bn2",
        "4.conv1": "4.bn1",
        "4.conv2": "4.bn2",
        "4.shortcut.0": "4.shortcut.1",
    }
    params = dict(model.named_parameters())
    for conv, bn in followers.items():
        filter_size = params[f"{conv}.weight"][0].numel()
        for k in (0, 3):
            expected = {
                f"{conv}.weight": torch.arange(k * filter_size, (k + 1) * filter_size),
                f"{bn}.weight": torch.tensor([k]),
                f"{bn}.bias": torch.tensor([k]),
            }
            assert _same_slices(unit_map.slices[f"{conv}:{k}"], expected), (conv, k)
    everything = unit_map.selection(list(unit_map.slices))
    assert everything.num_parameters == sum(p.numel() for p in model.parameters())
    assert unit_map.output_units == tuple(f"7:{k}" for k in range(10))


def _same_slices(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_copies_are_spread_over_the_forget_set_with_the_configured_noise() -> None:
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([4, 7, 9])
    copies, copy_labels = perturbed_copies(x, labels, LcodecConfig(num_perturbations=10, sigma=0))
    source = [next(i for i in range(3) if torch.equal(c, x[i])) for c in copies]
    assert sorted(source.count(i) for i in range(3)) == [3, 3, 4]
    assert copy_labels.tolist() == [int(labels[i]) for i in source]
    config = LcodecConfig(num_perturbations=3000, sigma=0.5)
    noisy, noisy_labels = perturbed_copies(x, labels, config)
    clean = x[[int(torch.nonzero(labels == lab)[0]) for lab in noisy_labels]]
    measured = float((noisy - clean).double().std())
    assert measured == pytest.approx(0.5 * float(x.double().std(unbiased=False)), rel=0.02)
    absolute = LcodecConfig(num_perturbations=3000, sigma=0.5, sigma_relative=False)
    noisy, _ = perturbed_copies(x, labels, absolute)
    assert float((noisy - clean).double().std()) == pytest.approx(0.5, rel=0.02)


def test_digits_mlp_selection(digits_mlp: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = digits_mlp
    model.train()  # the probe must not depend on, nor change, the caller's mode
    result = select_markov_blanket(model, x[:30], y[:30], LcodecConfig(seed=0))
    assert model.training and _no_hooks_left(model)
    assert isinstance(result, LcodecSelection)
    # 64-32-10 MLP: 32 hidden and 10 output units, none constant under tanh.
    assert len(result.ranked_units) == 42 and not result.constant_units
    assert set(result.ranked_units) == {f"1:{k}" for k in range(32)} | {f"3:{k}" for k in range(10)}
    assert len(result.foci_scores) == 42
    assert 1 <= result.stopped_by_rule_at < 42
    assert all(s > 0 for s in result.foci_scores[: result.stopped_by_rule_at])
    assert result.foci_scores[result.stopped_by_rule_at] <= 0
    assert result.selection.num_parameters > 0
    assert result.parameter_budget == int(0.25 * 2410)


@pytest.mark.parametrize("budget", [65, 200, 600, 1500])
def test_budget_is_filled_in_foci_order_with_the_output_layer_on_top(
    digits_mlp: tuple[nn.Module, torch.Tensor, torch.Tensor], budget: int
) -> None:
    model, x, y = digits_mlp
    result = select_markov_blanket(
        model, x[:20], y[:20], LcodecConfig(parameter_budget=budget, seed=1)
    )
    output = tuple(f"3:{k}" for k in range(10))
    assert result.reserved_units == output
    chosen = [u for u in result.selection.units if u not in output]
    # A prefix of the ranking (output units are already in), within the budget, and
    # the next hidden unit would not have fitted.
    hidden_order = [u for u in result.ranked_units if u not in output]
    assert chosen == hidden_order[: len(chosen)]
    assert 65 * len(chosen) <= budget < 65 * (len(chosen) + 1)
    indices = result.selection.indices
    assert torch.equal(indices["3.weight"], torch.arange(320))
    assert torch.equal(indices["3.bias"], torch.arange(10))
    assert result.selection.num_parameters == 65 * len(chosen) + 330
    rows = sorted(int(u.split(":")[1]) for u in chosen)
    want = torch.cat([torch.arange(r * 64, (r + 1) * 64) for r in rows]) if rows else None
    if want is None:
        assert "1.weight" not in indices
    else:
        assert torch.equal(indices["1.weight"], want)
        assert indices["1.bias"].tolist() == rows


def test_without_the_output_layer_the_whole_selection_fits_the_budget(
    digits_mlp: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = digits_mlp
    config = LcodecConfig(parameter_budget=300, always_include_output_layer=False, seed=2)
    result = select_markov_blanket(model, x[:20], y[:20], config)
    assert result.reserved_units == ()
    assert 0 < result.selection.num_parameters <= 300
    assert list(result.selection.units) == list(result.ranked_units[: len(result.selection.units)])


def test_blocks_continue_the_ranking_disjointly(
    digits_mlp: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = digits_mlp
    result = select_markov_blanket(
        model, x[:20], y[:20], LcodecConfig(parameter_budget=200, max_units=20, seed=3)
    )
    blocks = result.blocks()
    assert _equal_selections(blocks[0], result.selection)
    assert len(result.blocks(max_blocks=2)) == 2
    seen: set[str] = set()
    order: list[str] = []
    for block in blocks:
        ranked_part = [u for u in block.units if u not in result.reserved_units]
        assert sum(result.unit_map.size(u) for u in ranked_part) <= 200
        assert not seen & set(block.units)
        seen |= set(block.units)
        order += ranked_part
    # Every ranked unit lands in exactly one block, in rank order (hidden units cost 65,
    # output units are reserved in the first block).
    ranked_hidden = [u for u in result.ranked_units if u not in result.reserved_units]
    assert order == ranked_hidden
    assert seen == set(result.ranked_units) | set(result.reserved_units)


def test_same_seed_same_selection_other_seed_other_copies(
    digits_mlp: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = digits_mlp
    a = select_markov_blanket(model, x[:10], y[:10], LcodecConfig(seed=5))
    b = select_markov_blanket(model, x[:10], y[:10], LcodecConfig(seed=5))
    c = select_markov_blanket(model, x[:10], y[:10], LcodecConfig(seed=6))
    assert a.ranked_units == b.ranked_units and a.foci_scores == b.foci_scores
    assert _equal_selections(a.selection, b.selection)
    assert c.foci_scores != a.foci_scores


def test_without_noise_nothing_varies_and_only_the_output_layer_is_left(
    digits_mlp: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = digits_mlp
    result = select_markov_blanket(model, x[:1], y[:1], LcodecConfig(sigma=0.0))
    assert result.ranked_units == () and result.stopped_by_rule_at == 0
    assert len(result.constant_units) == 42
    assert result.selection.units == tuple(f"3:{k}" for k in range(10))


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_convolutional_models(name: str) -> None:
    model, x, y = _trained(name, epochs=2)
    result = select_markov_blanket(model, x[:20], y[:20], LcodecConfig(seed=0))
    assert _no_hooks_left(model)
    assert result.ranked_units and result.selection.num_parameters > 0
    output = result.reserved_units
    ranked_part = [u for u in result.selection.units if u not in output]
    assert sum(result.unit_map.size(u) for u in ranked_part) <= result.parameter_budget
    conv_units = [u for u in ranked_part if not u.startswith("7:")]
    assert conv_units, "no convolution filter made the first block"
    for unit in conv_units:
        module, k = unit.rsplit(":", 1)
        filter_size = dict(model.named_parameters())[f"{module}.weight"][0].numel()
        weight = result.selection.indices[f"{module}.weight"]
        assert set(range(int(k) * filter_size, (int(k) + 1) * filter_size)) <= set(weight.tolist())
        if name == "resnet":  # every resnet convolution (bias-free) feeds a batch norm
            norm_params = [p for p in result.unit_map.slices[unit] if p != f"{module}.weight"]
            assert len(norm_params) == 2
            for param in norm_params:
                assert int(k) in result.selection.indices[param].tolist()


RELEVANT = (1, 4, 6)  # the hidden units the planted loss depends on


def _planted(seed: int) -> nn.Module:
    return planted_network(seed, 8, RELEVANT)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_foci_ranks_the_units_the_loss_depends_on_first(seed: int) -> None:
    model = _planted(seed)
    x = torch.randn(1, 12, generator=torch.Generator().manual_seed(100 + seed))
    config = LcodecConfig(num_perturbations=300, sigma=1.0, sigma_relative=False, seed=seed)
    result = select_markov_blanket(model, x, torch.zeros(1, dtype=torch.long), config)
    # Logit c is a function of hidden unit RELEVANT[c] alone, so both name one variable.
    variable = {f"hidden:{r}": r for r in RELEVANT} | {
        f"out:{c}": r for c, r in enumerate(RELEVANT)
    }
    kept = result.ranked_units[: result.stopped_by_rule_at]
    assert all(u in variable for u in kept), kept
    assert {variable[u] for u in kept} == set(RELEVANT)  # the Markov blanket, found
    # Of 11 units, the 6 the loss depends on take the first 6 places.
    assert set(result.ranked_units[:6]) == set(variable)
