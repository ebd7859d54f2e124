"""The ``auto`` forget policy: the best deletion a request can afford, and why.

Paths, best first: the exact ``retrain`` (perfect forgetting), a Newton update on ``all``
parameters, the L-CODEC-targeted update (``lcodec_cg``). The retrain is taken whenever its
estimated cost is below ``retrain_below_s`` or below the chosen approximate path's own
estimate; otherwise Newton on every parameter when its Hessian fits the memory budget and
its estimate is at most ``approximate_time_share`` of the retrain's; otherwise the targeted
update. Every estimate goes into the receipt, chosen or not.

Estimates are in seconds on this machine. The retrain's comes from the model's last
measured training time, scaled by the samples it will train on (``TrainingCost``), plus
the passes the path makes besides training (the gradient norms and the receipt's metrics). The
approximate paths' come from a cost model in units of one sample's forward and backward
pass, derived from the same record: Hessian columns cost a pass per (sample, column), the
eigendecomposition ``EIGH_S_PER_CUBE`` p^3 (a Gauss-Newton H's Cholesky factorisation
``CHOLESKY_S_PER_CUBE`` p^3), each pass over the objective data one unit per
sample, plus a fixed overhead per forget. A Gauss-Newton H with far fewer factor rows than
parameters is priced as the solver takes it, in the sample space. The constants were
measured on the development models (digits logistic regression, MLP and CNN;
BENCHMARKS.md); the benchmark reports estimate beside measurement on every case.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch stays unimported until a forget runs (settings import this module)
    from torch import nn

    from expunge.defenses.recipe import ForgetRecipe

PATHS = ("retrain", "all", "lcodec_cg")
EIGH_S_PER_CUBE = 2e-10  # torch.linalg.eigh, float32, one thread (measured 0.7-1.7e-10)
# A Gauss-Newton H is PSD: one Cholesky factorisation per damping instead (solvers.py).
CHOLESKY_S_PER_CUBE = 1e-11  # torch.linalg.cholesky, float32, one thread (0.8e-11, p=1,898)
GAUSS_NEWTON_S_PER_SQUARE = 6e-10  # per sample and p^2 entry (measured 5-7e-10)
GAUSS_NEWTON_PASSES = 100  # jacobian of the logits per sample, in forward-backward units
HESSIAN_COPIES = 3  # H, its eigenvectors and the solver's workspace
# A Gauss-Newton H with far fewer factor rows r (samples x outputs) than parameters p is
# solved in the sample space (defenses/newton/sample_space.py): F F^T and an r x r Cholesky
# factorisation per damping, in float32, refined in float64. Its memory per factor entry:
# F, its float64 copy and the Jacobians it is formed from; plus the r x r matrices (in
# float64 should refinement stall).
LOW_RANK_BYTES_PER_ENTRY = 16
LCODEC_PASSES = 400  # perturbed copies' forward passes and FOCI, in forward-backward units
# What a forget costs besides its computation (receipt metrics, child process hand-off,
# commit), measured through the client on the development cases (BENCHMARKS.md): about
# 0.45 s for an approximate path and 0.15 s for the exact retrain.
APPROXIMATE_OVERHEAD_S = 0.45
RETRAIN_OVERHEAD_S = 0.15
# A forward-backward pass over a batch of 256 costs this share of a training step's time
# per sample (small batches, optimizer, polish): measured 0.22-0.29 on the digits MLP and CNN.
TRAINING_PASS_SHARE = 0.25
DEFAULT_UNIT_S = 1e-5  # models trained before training time was recorded


@dataclass(frozen=True)
class PolicySettings:
    """The server's thresholds for ``auto`` (settings ``forget_auto_*``)."""

    retrain_below_s: float = field(
        default=30.0, metadata={"help": "retrain exactly when its estimate is below this"}
    )
    hessian_memory_bytes: int = field(
        default=1 << 30, metadata={"help": "largest Hessian (with workspace) Newton-all builds"}
    )
    approximate_time_share: float = field(
        default=0.1,
        metadata={"help": "Newton-all only when its estimate is at most this share of a retrain"},
    )


@dataclass(frozen=True)
class CostEstimates:
    """Seconds each path is expected to take here, and what they were derived from."""

    retrain_s: float
    newton_all_s: float
    targeted_s: float
    hessian_bytes: int  # Newton-all's Hessian with workspace
    seconds_per_sample: float  # one forward + backward, per sample (from the training record)


@dataclass(frozen=True)
class PathChoice:
    """The path taken, the rule that took it, and every estimate (the receipt's ForgetPolicy)."""

    path: str  # retrain, all or lcodec_cg
    reason: str
    requested: str  # auto, or the explicit selection
    estimates: CostEstimates

    def receipt(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "reason": self.reason,
            "requested": self.requested,
            **{f"estimated_{k}": v for k, v in asdict(self.estimates).items()},
        }


@dataclass(frozen=True)
class TrainingCost:
    """A model's last measured training: the policy's only measurement.

    Estimates are a function of this record and the request alone, never of a clock read
    while the forget runs: the same request on the same version takes the same path and so
    gives the same bytes (a timing near a threshold would otherwise flip the path).
    """

    seconds: float  # wall time of the training run (SGD and polish); 0: never measured
    samples: int  # samples it trained on

    def retrain_s(self, samples: int) -> float:
        """An exact retrain on ``samples`` samples: the measured run, scaled."""
        if self.seconds <= 0 or self.samples <= 0:
            return -1.0
        return self.seconds * samples / self.samples

    def retrain_estimate_s(self, samples: int, epochs: int) -> float:
        """An exact retrain on ``samples``: the measured run scaled, or, never measured,
        epochs of training steps over them at the default pass cost."""
        measured = self.retrain_s(samples)
        if measured >= 0:
            return measured
        return epochs * samples * self.unit_s(epochs) / TRAINING_PASS_SHARE

    def unit_s(self, epochs: int) -> float:
        """One sample's forward and backward pass: ``TRAINING_PASS_SHARE`` of a training
        step's per-sample time; ``DEFAULT_UNIT_S`` when never measured."""
        if self.seconds <= 0 or self.samples <= 0:
            return DEFAULT_UNIT_S
        return TRAINING_PASS_SHARE * self.seconds / (max(epochs, 1) * self.samples)


def estimate_costs(
    model: nn.Module,
    recipe: ForgetRecipe,
    retained: int,
    evaluated: int,
    unit_s: float,
    retrain_s: float,
) -> CostEstimates:
    """Cost model of the approximate paths (module docstring); ``evaluated``: samples the
    receipt's metrics pass over (forget, retained and test sets)."""
    from expunge.defenses.newton.sample_space import LOW_RANK_SHARE

    p = sum(q.numel() for q in model.parameters())
    classes = _output_width(model)
    objective_n = min(recipe.objective_samples or retained, retained)
    hessian_n = min(recipe.hessian_samples, objective_n)  # drawn from the objective's samples
    # Per Newton iteration: a gradient and about two float64 values; plus the gradient norm
    # before, the residuals after and the receipt's two metric passes.
    common = ((3 * recipe.newton_iterations + 3) * objective_n + 2 * evaluated) * unit_s
    rows = hessian_n * classes  # the Gauss-Newton factor's rows, at most

    def low_rank(k: int) -> bool:
        return recipe.hessian == "gauss_newton" and rows < LOW_RANK_SHARE * k

    def width(k: int) -> int:
        return rows if low_rank(k) else k  # the Gram matrix's side

    def hessian(k: int) -> float:
        if recipe.hessian == "exact":
            return hessian_n * k * unit_s
        return hessian_n * (k * width(k) * GAUSS_NEWTON_S_PER_SQUARE + classes * 10 * unit_s)

    def solve(k: int) -> float:
        if recipe.hessian == "exact":
            return EIGH_S_PER_CUBE * k**3
        return CHOLESKY_S_PER_CUBE * width(k) ** 3

    def hessian_bytes(k: int) -> int:
        if low_rank(k):
            return LOW_RANK_BYTES_PER_ENTRY * rows * k + HESSIAN_COPIES * rows * rows * 8
        return HESSIAN_COPIES * k * k * 4

    # The selection's size is known only after the ranking: priced at its largest.
    budget = recipe.largest_selection(p)
    ranking_n = min(recipe.ranking_hessian_samples or hessian_n, retained)
    ranking = (
        recipe.ranking_newton_iterations * (recipe.ranking_cg_iterations * 3 * ranking_n)
        + LCODEC_PASSES
    ) * unit_s
    # The retrain path's own passes besides training: the served model's gradient norm,
    # the trained model's residual on every retained sample and the receipt's two metric
    # passes (a record of an imported model's timed SGD steps holds none of them).
    retrain_passes = (objective_n + retained + 2 * evaluated) * unit_s
    return CostEstimates(
        retrain_s=retrain_s + retrain_passes + RETRAIN_OVERHEAD_S,
        newton_all_s=hessian(p) + solve(p) + common + APPROXIMATE_OVERHEAD_S,
        targeted_s=ranking
        + hessian(budget)
        + solve(budget)
        + common
        + retained * unit_s
        + APPROXIMATE_OVERHEAD_S,
        hessian_bytes=hessian_bytes(p),
        seconds_per_sample=unit_s,
    )


def choose_path(
    requested: str, estimates: CostEstimates, settings: PolicySettings, retrainable: bool = True
) -> PathChoice:
    """The path for ``requested`` (``auto`` decides; anything else is taken as asked).
    ``retrainable`` False (a model imported without its training configuration): ``auto``
    never takes the retrain."""
    if requested != "auto":
        return PathChoice(requested, "selection asked for explicitly", requested, estimates)
    retrain = estimates.retrain_s if retrainable else math.inf
    if retrain <= settings.retrain_below_s:
        return PathChoice(
            "retrain",
            f"the exact retrain is estimated at {retrain:.3g} s, within the "
            f"{settings.retrain_below_s:g} s allowed for it",
            requested,
            estimates,
        )
    fits = estimates.hessian_bytes <= settings.hessian_memory_bytes
    fast = estimates.newton_all_s <= settings.approximate_time_share * retrain
    if fits and fast:
        path, approximate = "all", estimates.newton_all_s
        why = (
            f"Newton on every parameter: its Hessian ({estimates.hessian_bytes / 2**20:.0f} MiB) "
            f"fits and it is estimated at {approximate:.3g} s"
        )
    else:
        path, approximate = "lcodec_cg", estimates.targeted_s
        missing = "its Hessian does not fit the memory budget" if not fits else "too slow"
        why = f"the L-CODEC-targeted update ({approximate:.3g} s; Newton on every parameter: {missing})"
    if retrain <= approximate:
        return PathChoice(
            "retrain",
            f"the exact retrain ({retrain:.3g} s) is estimated to cost no more than {why}",
            requested,
            estimates,
        )
    against = (
        f"against {retrain:.3g} s for the exact retrain"
        if retrainable
        else "and no exact retrain (the model has no training configuration)"
    )
    return PathChoice(path, f"{why}, {against}", requested, estimates)


def _output_width(model: nn.Module) -> int:
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 1
