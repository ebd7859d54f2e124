"""The forget recipe: every setting of one forget computation, in one frozen object.

The server builds it from its settings and the caller's options; the benchmarks build the
same object to measure what is served; the receipt's ``method`` is produced from it.
How the defaults were chosen, and on which cases, is recorded in BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .lcodec import LcodecConfig
from .newton import NewtonConfig

__all__ = ["HESSIANS", "SELECTIONS", "SELECTION_LIMIT", "STEP_COVERAGE", "ForgetRecipe"]

# lcodec_cg: L-CODEC's units (FOCI order) as the pool, its entries ranked by a Newton-CG step;
# lcodec: whole units in FOCI order; cg: entries of the Newton-CG step over every parameter.
SELECTIONS = ("lcodec_cg", "lcodec", "cg", "all", "output")
# Models this small are updated whole by the sparse selections: a 1,024-entry damped solve
# takes about 0.2 s here (eigendecomposition ~2e-10 p^3 s), while a 25% selection of a
# logistic regression (10 of 42 entries) cannot reach the retrained optimum (issue 17).
WHOLE_MODEL_ENTRIES = 1024
HESSIANS = ("exact", "gauss_newton")
# Chosen on development cases (BENCHMARKS.md, forget): a 25% selection of a 1,445-entry
# MLP left 8x the seed noise; with the saddle-free step, 95% of the step's mass left the
# breast-cancer MLP at 9.0x the noise (372 of 1,058 entries) and 99% at 2.7x (903).
STEP_COVERAGE = 0.99
# The dense solve on a selection is O(|S|^3): L-CODEC's own cap on its budget.
SELECTION_LIMIT = LcodecConfig().budget_cap


@dataclass(frozen=True)
class ForgetRecipe:
    """How one forget is computed. Zero counts mean "derive from the other settings"."""

    selection: str = field(default="lcodec_cg", metadata={"help": f"one of {SELECTIONS}"})
    parameter_budget: int = field(
        default=0,
        metadata={"help": "entries the selection may fill; 0: L-CODEC's rule (25%, <= 4096)"},
    )
    hessian: str = field(default="exact", metadata={"help": f"one of {HESSIANS}"})
    newton_iterations: int = field(
        default=8,
        metadata={
            "help": "damped Newton iterations on the selection: the first moves by the "
            "removal alone, the rest converge the restricted problem"
        },
    )
    damping: float = field(default=0.0, metadata={"help": "0: NewtonConfig's floor"})
    epsilon: float = field(default=0.0, metadata={"help": "> 0: certified Gaussian noise"})
    delta: float = field(default=0.0, metadata={"help": "with epsilon"})
    hessian_samples: int = field(
        default=2000, metadata={"help": "retained samples (seeded) the update's Hessian uses"}
    )
    objective_samples: int = field(
        default=0, metadata={"help": "> 0: J' and its residuals on this many retained samples"}
    )
    ranking_hessian_samples: int = field(
        default=0, metadata={"help": "Hessian-vector products of the ranking; 0: as above"}
    )
    ranking_cg_iterations: int = field(
        default=20, metadata={"help": "conjugate-gradient iterations of the ranking step"}
    )
    ranking_newton_iterations: int = field(
        default=3, metadata={"help": "Newton iterations of the ranking step"}
    )
    pool_factor: int = field(
        default=3,
        metadata={"help": "lcodec_cg: the L-CODEC pool starts with units filling this x budget"},
    )
    pool_coverage: float = field(
        default=0.95,
        metadata={"help": "lcodec_cg: the pool grows until it holds this share of the step"},
    )
    step_coverage: float = field(
        default=STEP_COVERAGE,
        metadata={
            "help": "lcodec_cg/cg: past the budget, the selection grows until it holds this "
            "share of the ranked step's squared mass (at most SELECTION_LIMIT entries)"
        },
    )
    seed: int = field(default=0, metadata={"help": "perturbations, subsamples, noise"})
    assume_converged: bool = field(
        default=True,
        metadata={
            "help": "treat the model as the optimum of J (grad J = 0, the step moves by the "
            "removal alone); False: form the step from the measured retained gradient"
        },
    )

    @property
    def ranked(self) -> bool:
        """Entries are ranked by a Newton-CG step (lcodec_cg, cg)."""
        return self.selection in ("lcodec_cg", "cg")

    @property
    def whole(self) -> bool:
        """The selection is a whole part of the model (all, output): no budget applies."""
        return self.selection in ("all", "output")

    def newton_config(self) -> NewtonConfig:
        """The update's Newton configuration."""
        return NewtonConfig(
            damping=self.damping or NewtonConfig().damping,
            hessian=self.hessian,
            iterations=self.newton_iterations,
            hessian_samples=self.hessian_samples,
            objective_samples=self.objective_samples,
            seed=self.seed,
        )

    def ranking_config(self) -> NewtonConfig:
        """The Newton-CG ranking step's configuration (its own sample and iteration counts)."""
        config = self.newton_config()
        return replace(
            config,
            hessian_samples=self.ranking_hessian_samples or config.hessian_samples,
            cg_iterations=self.ranking_cg_iterations,
            iterations=self.ranking_newton_iterations,
        )

    def entry_budget(self, total_params: int) -> int:
        """Entries a sparse selection may touch: every one in a model of at most
        ``WHOLE_MODEL_ENTRIES`` (its Hessian costs nothing, so restricting it buys nothing),
        else L-CODEC's budget rule (25%, at most 4,096); an explicit budget as given."""
        if not self.parameter_budget and total_params <= WHOLE_MODEL_ENTRIES:
            return total_params
        budget = LcodecConfig(parameter_budget=self.parameter_budget).budget_for(total_params)
        return min(budget, total_params)

    def largest_selection(self, total_params: int) -> int:
        """Entries a sparse selection may reach once grown by ``step_coverage``."""
        budget = self.entry_budget(total_params)
        if not self.ranked or self.step_coverage <= 0:
            return budget
        return max(budget, min(total_params, SELECTION_LIMIT))

    def method(self, total_params: int, iterations_taken: int, candidates: int) -> dict[str, Any]:
        """The receipt's ForgetMethod: every choice the update depended on."""
        config = self.newton_config()
        ranking = self.ranking_config()
        return {
            "selection": self.selection,
            "hessian": config.hessian,
            "parameter_budget": 0 if self.whole else self.entry_budget(total_params),
            "newton_iterations": config.iterations,
            "newton_iterations_taken": iterations_taken,
            "damping_floor": config.damping,
            "hessian_samples": config.hessian_samples,
            "objective_samples": config.objective_samples,
            "ranking_hessian_samples": ranking.hessian_samples if self.ranked else 0,
            "ranking_cg_iterations": ranking.cg_iterations if self.ranked else 0,
            "ranking_newton_iterations": ranking.iterations if self.ranked else 0,
            "seed": config.seed,
            "candidate_parameters": candidates,
            "step_coverage": self.step_coverage if self.ranked else 0.0,
            "assume_converged": self.assume_converged,
        }
