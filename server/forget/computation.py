"""One forget computation on a scratch model: select, solve, (noise), certify, verify.

Pure orchestration over ``expunge.defenses``; the forget service calls it from the
worker and the scan counterfactual calls it with ``commit`` left to no one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from expunge.defenses.architectures import ArchitectureSpec, output_layer_name
from expunge.defenses.recipe import (
    HESSIANS,
    SELECTIONS,
    STEP_COVERAGE,
    ForgetRecipe,
)
from expunge.server.errors import invalid_field
from expunge.server.forget.policy import (
    PathChoice,
    PolicySettings,
    TrainingCost,
    choose_path,
    estimate_costs,
)

if TYPE_CHECKING:
    from expunge.defenses.evaluate import SetMeasurement
    from expunge.defenses.selection import ParameterSelection
    from expunge.defenses.training import Checkpoint

_DEFAULTS = ForgetRecipe()
NO_TEST_SET_NOTE = (
    "the model has no held-out set: test figures and the membership-inference AUC are not "
    "measured (NaN), and the accuracy guard read the retained samples"
)
# What a caller may ask for: the policy (auto), the exact retrain, or one update.
OPTION_SELECTIONS = ("auto", "retrain", *SELECTIONS)
DEFAULT_SELECTION = "auto"
DEFAULT_NEWTON_ITERATIONS = _DEFAULTS.newton_iterations


class PhaseReporter(Protocol):
    def phase(self, name: str, completed: int = 0, total: int = 0, message: str = "") -> None: ...


class SilentReporter:
    def phase(self, name: str, completed: int = 0, total: int = 0, message: str = "") -> None:
        return None


@dataclass(frozen=True)
class UnlearningOptions:
    """What the caller may choose for one forget; zero values mean the server's defaults."""

    selection: str = field(
        default=DEFAULT_SELECTION, metadata={"help": f"one of {OPTION_SELECTIONS}"}
    )
    parameter_budget: int = field(default=0, metadata={"help": "0: server default"})
    hessian: str = field(default="exact", metadata={"help": "exact or gauss_newton"})
    newton_iterations: int = field(
        default=0, metadata={"help": "Newton steps on the slice; 0: the server's default"}
    )
    damping: float = field(default=0.0, metadata={"help": "0: default floor"})
    epsilon: float = field(default=0.0, metadata={"help": "> 0: certified noise"})
    delta: float = field(default=0.0, metadata={"help": "with epsilon"})
    correct_non_convergence: bool = field(
        default=False,
        metadata={
            "help": "take the served model's measured retained gradient into the step "
            "instead of treating the model as the optimum of J"
        },
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnlearningOptions:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @classmethod
    def validated(
        cls,
        selection: str,
        parameter_budget: int,
        hessian: str,
        newton_iterations: int,
        damping: float,
        epsilon: float,
        delta: float,
        correct_non_convergence: bool = False,
    ) -> UnlearningOptions:
        """Check a caller's options; contradictory or out-of-range ones are INVALID_ARGUMENT."""
        selection = selection or DEFAULT_SELECTION
        hessian = hessian or "exact"
        if selection not in OPTION_SELECTIONS:
            raise invalid_field(
                "options.selection", f"{selection!r} is not one of {OPTION_SELECTIONS}"
            )
        if hessian not in HESSIANS:
            raise invalid_field("options.hessian", f"{hessian!r} is not one of {HESSIANS}")
        if parameter_budget < 0 or parameter_budget > 10_000_000:
            raise invalid_field(
                "options.parameter_budget", "must lie in [0, 10,000,000] (0: default)"
            )
        if parameter_budget and selection in ("all", "retrain"):
            raise invalid_field(
                "options.parameter_budget", f"contradicts selection {selection!r}; drop one"
            )
        if not 0 <= newton_iterations <= 20:
            raise invalid_field(
                "options.newton_iterations",
                "must lie in [0, 20] (0: the server's default, forget_newton_iterations)",
            )
        if not (0 <= damping < 1e6):
            raise invalid_field("options.damping", "must be >= 0 and finite (0: default floor)")
        # The Gaussian mechanism's calibration (sigma = c * eps' / eps) holds for eps <= 1
        # (Guo et al. 2020); beyond it the noise would certify nothing.
        if not 0 <= epsilon <= 1:
            raise invalid_field(
                "options.epsilon", "must lie in [0, 1] (0: no noise; the calibration needs <= 1)"
            )
        if epsilon > 0 and not 0 < delta < 1:
            raise invalid_field("options.delta", "with epsilon > 0, delta must lie in (0, 1)")
        if epsilon == 0 and delta != 0:
            raise invalid_field(
                "options.delta", "delta without epsilon means nothing; set epsilon too"
            )
        return cls(
            selection,
            parameter_budget,
            hessian,
            newton_iterations,
            damping,
            epsilon,
            delta,
            correct_non_convergence,
        )


def recipe_for(
    options: UnlearningOptions,
    seed: int,
    default_parameter_budget: int = 0,
    hessian_samples: int = _DEFAULTS.hessian_samples,
    objective_samples: int = 0,
    ranking_hessian_samples: int = 0,
    ranking_cg_iterations: int = 0,
    newton_iterations: int = 0,
    ranking_newton_iterations: int = 0,
    step_coverage: float = -1.0,
) -> ForgetRecipe:
    """The recipe a caller's options and the server's settings give (0: the defaults)."""
    return ForgetRecipe(
        selection=options.selection,
        parameter_budget=options.parameter_budget or default_parameter_budget,
        hessian=options.hessian,
        newton_iterations=options.newton_iterations
        or newton_iterations
        or DEFAULT_NEWTON_ITERATIONS,
        damping=options.damping,
        epsilon=options.epsilon,
        delta=options.delta,
        hessian_samples=hessian_samples,
        objective_samples=objective_samples,
        ranking_hessian_samples=ranking_hessian_samples,
        ranking_cg_iterations=ranking_cg_iterations or _DEFAULTS.ranking_cg_iterations,
        ranking_newton_iterations=ranking_newton_iterations or _DEFAULTS.ranking_newton_iterations,
        step_coverage=STEP_COVERAGE if step_coverage < 0 else step_coverage,
        seed=seed,
        assume_converged=not options.correct_non_convergence,
    )


@dataclass(frozen=True)
class UnlearningOutcome:
    receipt: dict[str, Any]  # receipt fields (proto ForgetReceipt names) this step knows
    ledger: dict[str, Any]  # the model's budget ledger after this forget
    checkpoints: list[Checkpoint] | None = None  # new ones when the path was the retrain
    # The new model's test-set measurement: the next forget's "before" (Engine keeps it).
    test_after: SetMeasurement | None = None


def is_convex(spec: ArchitectureSpec) -> bool:
    """The loss is convex in the parameters: a linear model under a built-in loss (convex
    in the logits; a trusted Task's convexity is its own claim, not relied on here)."""
    return spec.name == "logreg" and spec.loss == "cross_entropy"


def deletion_metrics(
    model: nn.Module,
    forget_x: torch.Tensor,
    forget_y: torch.Tensor,
    retained_x: torch.Tensor,
    retained_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    test_measured: SetMeasurement | None = None,
) -> dict[str, float]:
    """The receipt's DeletionMetrics (forget, retained, test sets) as proto field names, with
    the retained and test losses the new version's metrics are made of (``Engine.metrics_of``)."""
    from expunge.defenses.evaluate import deletion_metrics as measure

    metrics = measure(
        model, forget_x, forget_y, retained_x, retained_y, test_x, test_y,
        test_measured=test_measured,
    )  # fmt: skip
    return {
        "forget_loss": metrics.forget_loss,
        "forget_accuracy": metrics.forget_accuracy,
        "retained_loss": metrics.retained_loss,
        "retained_accuracy": metrics.retained_accuracy,
        "test_loss": metrics.test_loss,
        "test_accuracy": metrics.test_accuracy,
        "mia_auc": metrics.mia_auc,
    }


def metric_subset(
    retained_x: torch.Tensor, retained_y: torch.Tensor, recipe: ForgetRecipe
) -> tuple[torch.Tensor, torch.Tensor]:
    """The retained samples a forget's figures are measured on: all of them, or with a
    subsampled objective (large data) that seeded subsample, for the receipt and the new
    version's training metrics alike. A full pass before, after and at the commit would
    cost more than the update (0.34 s of a 2 s forget on 60k samples)."""
    if not recipe.objective_samples or recipe.objective_samples >= len(retained_x):
        return retained_x, retained_y
    from expunge.defenses.newton.objective import _subsample

    return _subsample(retained_x, retained_y, recipe.objective_samples, recipe.seed + 1)


def unlearn(
    *,
    model: nn.Module,
    spec: ArchitectureSpec,
    forget_x: torch.Tensor,
    forget_y: torch.Tensor,
    retained_x: torch.Tensor,
    retained_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    weight_decay: float,
    recipe: ForgetRecipe,
    ledger: dict[str, Any],
    default_budget: float,
    train_config: dict[str, Any],
    training_cost: TrainingCost,
    policy: dict[str, Any] | None = None,
    trusted_factories: dict[str, str] | None = None,
    reporter: PhaseReporter | None = None,
    test_before: SetMeasurement | None = None,
    device: torch.device | str = "cpu",
) -> UnlearningOutcome:
    """Update ``model`` in place so it behaves as if trained without the forget set.

    forget ``(m, *shape)``/``(m,)``, retained ``(n - m, *shape)``/``(n - m,)``, test likewise.
    ``recipe.selection`` "auto" lets the policy choose the path (``policy``: the
    ``PolicySettings`` fields); "retrain" trains from scratch on the retained data with
    ``train_config``; ``training_cost`` (the model's recorded training) is what the
    policy's estimates come from. ``test_before``: the served model's test measurement when
    the server kept it (a pass over the largest set saved). Never skips: a step that costs
    accuracy is applied and flagged. ``device``: where it computes; the model is handed
    back on the device it came on, and the outcome's tensors are on the CPU.
    """
    from expunge.defenses.evaluate import SetMeasurement, measure_set

    target = torch.device(device)
    forget_x, forget_y, retained_x, retained_y, test_x, test_y = (
        t.to(target) for t in (forget_x, forget_y, retained_x, retained_y, test_x, test_y)
    )
    report = reporter or SilentReporter()
    with _computing_on(model, target):
        model.eval()
        report.phase("verifying", message="measuring the model before the update")
        metric_x, metric_y = metric_subset(retained_x, retained_y, recipe)

        # Each measured model's test side, in order: the last is the new model's. On the
        # CPU: the last is kept for the next forget and may cross a process boundary.
        tested: list[SetMeasurement] = []

        def measure(candidate: nn.Module) -> dict[str, float]:
            known = test_before if not tested else None  # the served model's, when kept
            if known is None:
                measured = measure_set(candidate, test_x, test_y)
                known = SetMeasurement(measured.losses.cpu(), measured.accuracy)
            tested.append(known)
            return deletion_metrics(
                candidate, forget_x, forget_y, metric_x, metric_y, test_x, test_y, tested[-1]
            )

        before = measure(model)
        evaluated = len(forget_x) + len(retained_x) + len(test_x)
        epochs = int(train_config.get("epochs", 30))
        unit_s = training_cost.unit_s(epochs)
        retrain_s = training_cost.retrain_estimate_s(len(retained_x), epochs)
        estimates = estimate_costs(model, recipe, len(retained_x), evaluated, unit_s, retrain_s)
        choice = choose_path(
            recipe.selection,
            estimates,
            PolicySettings(**(policy or {})),
            retrainable=bool(train_config.get("retrainable", True)),
        )
        report.phase("verifying", message="measuring the served model's retained gradient")
        # On the objective data: the metrics' subsample when one is configured.
        gradient_before = retained_gradient_norm(model, metric_x, metric_y, weight_decay)
        if choice.path == "retrain":
            outcome = _retrain_exactly(
                model, spec, retained_x, retained_y, train_config, ledger, default_budget,
                trusted_factories or {}, before, measure, choice, report,
            )  # fmt: skip
        else:
            outcome = _newton_removal(
                model, spec, forget_x, forget_y, retained_x, retained_y, weight_decay,
                replace(recipe, selection=choice.path), ledger, default_budget,
                before, measure, choice, report,
            )  # fmt: skip
    outcome.receipt["retained_gradient_norm_before"] = gradient_before
    if len(test_x) == 0:
        notes = [outcome.receipt.get("note", ""), NO_TEST_SET_NOTE]
        outcome.receipt["note"] = "; ".join(n for n in notes if n)
    return replace(outcome, test_after=tested[-1])


@contextmanager
def _computing_on(model: nn.Module, device: torch.device) -> Iterator[None]:
    """``model`` on ``device`` for the block, then back where it came from (the caller
    stores its weights from there)."""
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def _newton_removal(
    model: nn.Module,
    spec: ArchitectureSpec,
    forget_x: torch.Tensor,
    forget_y: torch.Tensor,
    retained_x: torch.Tensor,
    retained_y: torch.Tensor,
    weight_decay: float,
    recipe: ForgetRecipe,
    ledger: dict[str, Any],
    default_budget: float,
    before: dict[str, float],
    measure: Callable[[nn.Module], dict[str, float]],
    choice: PathChoice,
    report: PhaseReporter,
) -> UnlearningOutcome:
    """Select, take the damped Newton steps, recompute batch norms, (noise), certify."""
    from expunge.defenses.batchnorm import recompute_batchnorm_statistics
    from expunge.defenses.certificate import (
        BudgetLedger,
        add_certified_noise,
        make_certificate,
        noise_scale,
        removal_bound,
    )
    from expunge.defenses.newton import apply_update, newton_update

    total_params = sum(p.numel() for p in model.parameters())
    config = recipe.newton_config()
    chosen = choose_parameters(
        model, recipe, forget_x, forget_y, retained_x, retained_y, weight_decay, report
    )
    selection = chosen.selection
    units = selection.units
    report.phase("solving", 0, selection.num_parameters, "targeted Newton step on the selection")
    # By default the served model is taken as the optimum of the full objective (grad J =
    # 0): training polishes it to one (TrainConfig.polish_tolerance), and the steps then move
    # by the removal alone. ``correct_non_convergence`` instead forms the step from the
    # measured retained gradient, which also removes what training left unconverged. A
    # convex model updated whole always does: J' has one minimiser, the one retraining
    # approaches, so the leftover gradient only keeps the step from reaching it (wine
    # logistic regression: 5.5x the seed noise from the polish tolerance's residue).
    recipe = replace(
        recipe,
        assume_converged=recipe.assume_converged
        and not (is_convex(spec) and selection.num_parameters == total_params),
    )
    full_gradient = (
        torch.zeros(selection.num_parameters, dtype=next(model.parameters()).dtype)
        if recipe.assume_converged
        else None
    )
    result = newton_update(
        model,
        selection,
        forget_x,
        forget_y,
        retained_x,
        retained_y,
        weight_decay,
        config,
        full_gradient=full_gradient,
    )
    apply_update(model, selection, result)
    batchnorm = recompute_batchnorm_statistics(model, retained_x)
    report.phase(
        "solving",
        selection.num_parameters,
        selection.num_parameters,
        f"{result.iterations} Newton steps taken, damping {result.damping:.3g}",
    )
    # The noise is calibrated to, and the ledger spends, the same quantity: r / lambda.
    bound = removal_bound(result.residual_norm_all, weight_decay)
    scale = 0.0
    if recipe.epsilon > 0:
        scale = noise_scale(bound, recipe.epsilon, recipe.delta)
        add_certified_noise(model, selection, scale, recipe.seed)
    spent = BudgetLedger.from_dict(ledger, default_budget).spend(bound)
    full_set = recipe.objective_samples == 0 or recipe.objective_samples >= len(retained_x)
    certificate = make_certificate(
        result.residual_norm_selected,
        result.residual_norm_all,
        scale,
        spent,
        convex=is_convex(spec),
        full_retained_set=full_set,
        weight_decay=weight_decay,
    )
    report.phase("verifying", message="measuring the model after the update")
    after = measure(model)
    flagged = accuracy_cost(before, after) > 0.01
    receipt = {
        "units_selected": len(units),
        "parameters_updated": selection.num_parameters,
        "parameters_total": total_params,
        "certificate": asdict(certificate),
        "before": before,
        "after": after,
        "damping": result.damping,
        "step_accepted": result.accepted,
        "accuracy_cost_flagged": flagged,
        "note": _note(
            result.accepted,
            flagged,
            certificate.budget_exhausted,
            _guarding_accuracy(before)[1],
        ),
        "method": recipe.method(total_params, result.iterations, chosen.candidates),
        "policy": choice.receipt(),
        "batchnorm_recomputed": batchnorm,
    }
    return UnlearningOutcome(receipt, spent.to_dict())


def _guarding_accuracy(before: dict[str, float]) -> tuple[str, str]:
    """The accuracy that guards an update, and its name: the test set's, or for a model
    without a held-out set the retained samples' the figures were measured on."""
    if math.isfinite(before["test_accuracy"]):
        return "test_accuracy", "test accuracy"
    return "retained_accuracy", "retained accuracy (no held-out set)"


def accuracy_cost(before: dict[str, float], after: dict[str, float]) -> float:
    """The accuracy an update cost (``_guarding_accuracy``)."""
    key, _ = _guarding_accuracy(before)
    return before[key] - after[key]


def retained_gradient_norm(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float
) -> float:
    """|grad J| over every parameter of the model as it is, on ``x`` ``(n, *shape)``, ``y``."""
    from expunge.defenses.newton import objective_gradient
    from expunge.defenses.selection import ParameterSelection

    everything = ParameterSelection.everything(model)
    return float(objective_gradient(model, everything, x, y, weight_decay).norm())


def _retrain_exactly(
    model: nn.Module,
    spec: ArchitectureSpec,
    retained_x: torch.Tensor,
    retained_y: torch.Tensor,
    train_config: dict[str, Any],
    ledger: dict[str, Any],
    default_budget: float,
    trusted_factories: dict[str, str],
    before: dict[str, float],
    measure: Callable[[nn.Module], dict[str, float]],
    choice: PathChoice,
    report: PhaseReporter,
) -> UnlearningOutcome:
    """Train from scratch on the retained data (the model's own seed and configuration)."""
    from expunge.defenses.certificate import BudgetLedger, Certificate
    from expunge.defenses.training import TrainConfig, train
    from expunge.server.model_factory import build_architecture

    config = TrainConfig.from_dict(train_config)
    report.phase("training", 0, len(retained_x), f"exact retrain on {len(retained_x)} samples")
    fresh = build_architecture(spec, trusted_factories, seed=config.seed)
    # On the retained data's device (the forget's); ``fresh`` comes back on the CPU.
    result = train(fresh, retained_x, retained_y, config, device=retained_x.device)
    model.load_state_dict(fresh.state_dict())
    model.eval()
    residual = retained_gradient_norm(model, retained_x, retained_y, config.weight_decay)
    reset = BudgetLedger.from_dict(ledger, default_budget).reset()
    certificate = Certificate(
        residual_norm_selected=residual,
        residual_norm_all=residual,
        noise_scale=0.0,
        budget_total=reset.budget,
        budget_used=reset.used,
        budget_remaining=reset.remaining,
        budget_exhausted=False,
        convex=is_convex(spec),
        statement=(
            "Exact retrain: the model was trained from scratch on the retained data only, "
            f"with its own configuration and seed {config.seed}; no forgotten sample ever "
            f"reached it, so nothing is left to bound (training's own residual {residual:.3g}). "
            "The removal budget starts afresh."
        ),
        proof=True,
    )
    report.phase("verifying", message="measuring the retrained model")
    after = measure(model)
    total = sum(p.numel() for p in model.parameters())
    receipt = {
        "units_selected": 0,
        "parameters_updated": total,
        "parameters_total": total,
        "certificate": asdict(certificate),
        "before": before,
        "after": after,
        "step_accepted": True,
        "accuracy_cost_flagged": accuracy_cost(before, after) > 0.01,
        "note": f"exact retrain ({result.seconds:.3g} s)",
        "training_seconds": result.seconds,
        "method": {"selection": "retrain", "seed": config.seed},
        "policy": choice.receipt(),
        "batchnorm_recomputed": False,
    }
    return UnlearningOutcome(receipt, reset.to_dict(), result.checkpoints)


@dataclass(frozen=True)
class ChosenParameters:
    """What choose_parameters returns: the entries and how many the ranking chose from."""

    selection: ParameterSelection
    candidates: int = 0  # 0: no ranking step (lcodec, all, output)


def choose_parameters(
    model: nn.Module,
    recipe: ForgetRecipe,
    forget_x: torch.Tensor,
    forget_y: torch.Tensor,
    retained_x: torch.Tensor,
    retained_y: torch.Tensor,
    weight_decay: float,
    report: PhaseReporter,
) -> ChosenParameters:
    """The entries the Newton step may change, per ``recipe.selection``."""
    from expunge.defenses.lcodec import LcodecConfig, select_markov_blanket
    from expunge.defenses.selection import ParameterSelection
    from expunge.defenses.sparse_selection import CandidatePool, select_by_newton_direction

    if recipe.selection == "all":
        return ChosenParameters(ParameterSelection.everything(model))
    if recipe.selection == "output":
        layer = output_layer_name(model)
        output = {
            n: torch.arange(p.numel())
            for n, p in model.named_parameters()
            if n.startswith(f"{layer}.")
        }
        return ChosenParameters(ParameterSelection(output, (f"{layer}:*",)))
    if recipe.selection not in SELECTIONS:
        raise ValueError(f"no parameter selection {recipe.selection!r}; one of {SELECTIONS}")
    total = sum(p.numel() for p in model.parameters())
    budget = recipe.entry_budget(total)
    if budget >= total:  # the budget covers the model: nothing to select
        return ChosenParameters(ParameterSelection.everything(model))
    if recipe.selection == "lcodec":
        report.phase("selecting", message="L-CODEC Markov blanket over units")
        lcodec = LcodecConfig(parameter_budget=budget, seed=recipe.seed)
        return ChosenParameters(select_markov_blanket(model, forget_x, forget_y, lcodec).selection)
    pool = None
    if recipe.selection == "lcodec_cg":
        report.phase("selecting", message="L-CODEC Markov blanket over units (candidate pool)")
        lcodec = LcodecConfig(
            parameter_budget=min(total, recipe.pool_factor * budget),
            always_include_output_layer=False,
            seed=recipe.seed,
        )
        blanket = select_markov_blanket(model, forget_x, forget_y, lcodec)
        pool = CandidatePool(blanket, recipe.pool_coverage)
    report.phase("selecting", message="ranking entries by a Newton-CG step")
    chosen = select_by_newton_direction(
        model,
        forget_x,
        forget_y,
        retained_x,
        retained_y,
        weight_decay,
        budget,
        recipe.ranking_config(),
        pool=pool,
        logits_layer=output_layer_name(model),
        assume_converged=True,
        step_coverage=recipe.step_coverage,
        max_entries=recipe.largest_selection(total),
    )
    return ChosenParameters(chosen.selection, chosen.candidates)


def _note(accepted: bool, flagged: bool, exhausted: bool, measured: str) -> str:
    notes = []
    if not accepted:
        notes.append(
            "the damped step did not lower the retained objective within the trust region; the smallest safe step was applied"
        )
    if flagged:
        notes.append(f"the update cost more than one point of {measured} (applied, not skipped)")
    if exhausted:
        notes.append(
            "the certificate budget is spent: request an exact retrain (RetrainModel; expunge retrain <model>)"
        )
    return "; ".join(notes)
