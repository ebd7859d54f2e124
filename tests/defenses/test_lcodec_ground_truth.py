"""Ground truth for the server's forget computation: closer to a retrain than doing nothing.

The default selection (``lcodec_cg``) and whole L-CODEC units (``lcodec``) pick the
entries, ``newton_update`` moves them, and the result is compared with the model
retrained from scratch (same initialisation seed) without the forget set: by the output
KL on the forget inputs and by the forget set's loss, which retraining raises.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.evaluate import gap_closed, output_kl, per_sample_losses
from expunge.defenses.newton import NewtonResult, apply_update, newton_update
from expunge.defenses.selection import ParameterSelection
from expunge.defenses.training import TrainConfig, train
from expunge.server.forget.computation import (
    SilentReporter,
    UnlearningOptions,
    choose_parameters,
    recipe_for,
)
from expunge.server.state.datasets import builtin

WD = 1e-3
IMAGE = (1, 8, 8)  # builtin("digits") images
MLP = ArchitectureSpec("mlp", IMAGE, 10, hidden=(32,))
CNN = ArchitectureSpec("cnn", IMAGE, 10, channels=8)
# As benchmarks/forget_bench.py trains them: seeded SGD, then full-batch L-BFGS so the
# model is near an optimum of J, which the Newton update assumes (grad J = 0).
MLP_TRAIN = TrainConfig(
    epochs=30, batch_size=64, weight_decay=WD, checkpoints=1, polish_iterations=300
)
CNN_TRAIN = TrainConfig(
    epochs=20, batch_size=32, weight_decay=WD, checkpoints=1, polish_iterations=300
)
# The server's forget_hessian_samples (default 2000, so all retained rows here) lowered
# for the CNN: with its exact Hessian on all 551 retained rows the update took ~17 s, on
# 128 ~4 s. The sample costs some forgetting (seed 1: KL gap closed 0.51 on all, 0.32 on 128).
CNN_HESSIAN_SAMPLES = 128
CNN_SUBSET = 600
# Share of one class's samples the CNN forgets (49 samples, 8% of the subset). A random
# 10% of the subset left the original as close to the retrain as a retrain with another
# seed is (KL ratio 0.8-1.8 on the forget inputs); 80% of one class is 3-7x that noise.
CNN_CLASS, CNN_CLASS_SHARE = 3, 0.8


Trained = tuple[torch.Tensor, torch.Tensor, nn.Module]  # inputs, labels, model trained on them


@dataclass(frozen=True)
class ForgetCase:
    original: nn.Module
    retrained: nn.Module  # trained from the same init seed on the retained rows only
    fx: torch.Tensor
    fy: torch.Tensor
    rx: torch.Tensor
    ry: torch.Tensor


@dataclass(frozen=True)
class Closeness:
    kl: float  # KL(model || retrained) on the forget inputs
    forget_loss: float


def _digits(limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    data = builtin("digits", seed=0)
    x = torch.from_numpy(data.features).double()
    y = torch.from_numpy(data.labels).long()
    return x[:limit], y[:limit]


def _trained(
    spec: ArchitectureSpec, x: torch.Tensor, y: torch.Tensor, config: TrainConfig
) -> nn.Module:
    model = build_model(spec, seed=0).double()
    train(model, x, y, config)
    return model


def _case(
    spec: ArchitectureSpec,
    config: TrainConfig,
    original: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    forget: torch.Tensor,
    keep: torch.Tensor,
) -> ForgetCase:
    retrained = _trained(spec, x[keep], y[keep], config)
    return ForgetCase(original, retrained, x[forget], y[forget], x[keep], y[keep])


@pytest.fixture(scope="module")
def mlp_data() -> Trained:
    x, y = _digits()
    return x, y, _trained(MLP, x, y, MLP_TRAIN)


@pytest.fixture(scope="module")
def mlp_cases() -> dict[int, ForgetCase]:
    """Retrains by forget seed, shared by the two selections (filled on first use)."""
    return {}


def _mlp_case(mlp_data: Trained, cache: dict[int, ForgetCase], seed: int) -> ForgetCase:
    if seed not in cache:
        x, y, original = mlp_data
        # A seeded random 5% of the 1,797 digits.
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        size = int(0.05 * len(x))
        cache[seed] = _case(MLP, MLP_TRAIN, original, x, y, order[:size], order[size:])
    return cache[seed]


@pytest.fixture(scope="module")
def cnn_data() -> Trained:
    x, y = _digits(CNN_SUBSET)
    return x, y, _trained(CNN, x, y, CNN_TRAIN)


def _cnn_case(cnn_data: Trained, seed: int) -> ForgetCase:
    x, y, original = cnn_data
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    of_class = order[y[order] == CNN_CLASS]
    forget = of_class[: int(CNN_CLASS_SHARE * len(of_class))]
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[forget] = False
    return _case(CNN, CNN_TRAIN, original, x, y, forget, torch.arange(len(x))[keep])


def _forget(
    case: ForgetCase, options: UnlearningOptions, hessian_samples: int
) -> tuple[nn.Module, ParameterSelection, NewtonResult]:
    """The server's forget computation (server.unlearning.unlearn) on a copy of the original."""
    # Parameter budget 0 and seed 0: the server's defaults (25% of the model, at most 4096).
    recipe = recipe_for(options, seed=0, hessian_samples=hessian_samples)
    config = recipe.newton_config()
    data = (case.fx, case.fy, case.rx, case.ry, WD, config)
    chosen = choose_parameters(case.original, recipe, *data[:5], SilentReporter())
    selection = chosen.selection
    # As the server does: the served model is taken as the optimum of J (grad J = 0).
    zero = torch.zeros(selection.num_parameters, dtype=torch.float64)
    result = newton_update(case.original, selection, *data, full_gradient=zero)
    updated = copy.deepcopy(case.original)
    apply_update(updated, selection, result)
    return updated, selection, result


def _closeness(model: nn.Module, case: ForgetCase) -> Closeness:
    kl = output_kl(model, case.retrained, case.fx)
    return Closeness(kl, float(per_sample_losses(model, case.fx, case.fy).mean()))


def _loss_gap_closed(original: Closeness, model: Closeness, retrained_loss: float) -> float:
    """1 - |loss - retrained| / |original - retrained|: the forget-loss analogue of gap_closed."""
    return 1.0 - abs(model.forget_loss - retrained_loss) / abs(
        original.forget_loss - retrained_loss
    )


def _changed_entries(a: nn.Module, b: nn.Module) -> int:
    return sum(int((pa != pb).sum()) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


def _check(
    case: ForgetCase,
    updated: nn.Module,
    selection: ParameterSelection,
    result: NewtonResult,
    min_kl_gap: float,
    min_loss_gap: float,
    label: str,
) -> None:
    total = sum(p.numel() for p in case.original.parameters())
    changed = _changed_entries(case.original, updated)
    # A targeted step: it moved parameters, and only selected ones (a strict subset).
    assert result.accepted
    assert 0 < changed <= selection.num_parameters < total
    original = _closeness(case.original, case)
    after = _closeness(updated, case)
    retrained_loss = float(per_sample_losses(case.retrained, case.fx, case.fy).mean())
    kl_gap = gap_closed(original.kl, after.kl)
    loss_gap = _loss_gap_closed(original, after, retrained_loss)
    print(
        f"{label}: |S|={selection.num_parameters}/{total} changed={changed} "
        f"KL {original.kl:.4g} -> {after.kl:.4g} (gap closed {kl_gap:.3f}); forget loss "
        f"original {original.forget_loss:.4f} updated {after.forget_loss:.4f} "
        f"retrained {retrained_loss:.4f} (gap closed {loss_gap:.3f})"
    )
    # The ground truth differs from the original where it should: retraining without
    # the forget set raised its loss there, so there is a gap to close.
    assert original.kl > 1e-3
    # (MLP forget seed 2, the smallest: 0.025 -> 0.036.)
    assert retrained_loss > 1.25 * original.forget_loss
    # Doing nothing closes no gap on either measure, so it fails both thresholds below.
    assert gap_closed(original.kl, original.kl) == 0.0
    assert _loss_gap_closed(original, original, retrained_loss) == 0.0
    assert after.kl < original.kl and kl_gap > min_kl_gap
    assert abs(after.forget_loss - retrained_loss) < abs(original.forget_loss - retrained_loss)
    assert after.forget_loss > original.forget_loss and loss_gap > min_loss_gap
    # The comparison tells directions apart: the same step reversed moves away on both.
    reversed_step = copy.deepcopy(case.original)
    selection.scatter_add_(reversed_step, -result.delta)
    away = _closeness(reversed_step, case)
    print(
        f"  reversed step: KL {away.kl:.4g}, forget-loss gap closed "
        f"{_loss_gap_closed(original, away, retrained_loss):.3f}"
    )
    assert gap_closed(original.kl, away.kl) < 0
    assert _loss_gap_closed(original, away, retrained_loss) < 0


# Measured (float64, 1 thread), gap closed on KL / on the forget loss, by forget seed 0, 1, 2:
# lcodec_cg (602 of 2,410 entries) KL 0.0201 -> 0.0022, 0.0156 -> 0.00095, 0.0026 -> 0.00059:
#   0.89, 0.94, 0.77 / 0.70, 0.81, 0.66 (forget loss 0.038 -> 0.072 vs retrained 0.087, ...);
# lcodec (915 entries in whole units) 0.67, 0.64, 0.55 / 0.38, 0.39, 0.38.
MLP_THRESHOLDS = {"lcodec_cg": (0.6, 0.5), "lcodec": (0.4, 0.25)}


@pytest.mark.parametrize("selection", ["lcodec_cg", "lcodec"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_mlp_update_moves_towards_the_retrained_model(
    mlp_data: Trained, mlp_cases: dict[int, ForgetCase], seed: int, selection: str
) -> None:
    case = _mlp_case(mlp_data, mlp_cases, seed)
    options = UnlearningOptions(selection=selection)
    updated, chosen, result = _forget(case, options, hessian_samples=2000)
    _check(
        case, updated, chosen, result, *MLP_THRESHOLDS[selection], f"mlp seed {seed} {selection}"
    )


# Measured (float64, 1 thread) by forget seed 0, 1: KL 0.155 -> 0.062, 0.238 -> 0.161
# (gap closed 0.60, 0.32; a retrain with init seed 1 is at KL 0.049, 0.037); forget loss
# 0.0106 -> 0.063, 0.0105 -> 0.040 vs retrained 0.194, 0.279 (gap closed 0.29, 0.11).
# Forget seeds 2 and 3 (not run, for cost) gave 0.31, 0.45 / 0.09, 0.15.
@pytest.mark.parametrize("seed", [0, 1])
def test_the_cnn_update_moves_towards_the_retrained_model(cnn_data: Trained, seed: int) -> None:
    case = _cnn_case(cnn_data, seed)
    updated, chosen, result = _forget(
        case, UnlearningOptions(selection="lcodec_cg"), CNN_HESSIAN_SAMPLES
    )
    _check(case, updated, chosen, result, 0.2, 0.05, f"cnn seed {seed}")
