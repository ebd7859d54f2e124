"""Scan's settings, and the records a scan produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

ESTIMATORS = ("gas", "lgas", "tracincp", "gas+tracincp")
# A union of detectors: an input is as suspicious as its most unusual component score,
# each measured against the same clean calibration inputs (calibrated_surprise). GAS and
# TracInCP fail on different attacks (measured: BENCHMARKS.md, scan).
ENSEMBLES = {"gas+tracincp": ("gas", "tracincp")}
CONFIRMATIONS = ("auto", "retrain", "newton")


@dataclass(frozen=True)
class ScanSettings:
    false_positive_rate: float = field(default=0.05, metadata={"help": "on clean held-out inputs"})
    calibration_inputs: int = field(
        default=100, metadata={"help": "clean inputs for the threshold"}
    )
    ks: tuple[int, ...] = field(
        default=(2, 10),
        metadata={
            "help": "target scores at these k-th largest influences; with several, an input "
            "takes the k whose score is rarest among the clean calibration inputs"
        },
    )
    implicated_cutoff: float = field(
        default=3.0, metadata={"help": "z above which a sample is implicated"}
    )
    proponents_removed: int = field(
        default=30, metadata={"help": "counterfactual removes this many"}
    )
    drop_threshold: float = field(
        default=0.1, metadata={"help": "least confirming drop (Newton removal); calibrated above"}
    )
    newton_iterations: int = field(default=3, metadata={"help": "fast counterfactual iterations"})
    confirmation: str = field(
        default="auto",
        metadata={"help": "retrain, newton, or auto: retrain when it is cheap (below)"},
    )
    retrain_max_sample_epochs: int = field(
        default=100_000,
        metadata={"help": "auto retrains when training samples x epochs is at most this"},
    )
    retrain_filter_false_positive_rate: float = field(
        default=0.5, metadata={"help": "the first filter's clean pass rate when retraining"}
    )
    retrain_drop_threshold: float = field(
        default=0.5,
        metadata={"help": "least confirming drop (retrained removal); calibrated above"},
    )

    def __post_init__(self) -> None:
        if self.confirmation not in CONFIRMATIONS:
            raise ValueError(f"confirmation must be one of {CONFIRMATIONS}")
        if not self.ks or any(k < 1 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise ValueError("ks must be distinct positive integers")


class Calibration(NamedTuple):
    """Thresholds of one model version, estimator and confirmation mode."""

    score: float  # the first filter on the target score
    drop: float  # the confirming fall of the predicted class's probability
    confirmation: str  # retrain or newton


@dataclass(frozen=True)
class ScanOutcome:
    index: int
    predicted_label: int
    target_score: float
    threshold: float
    flagged: bool
    counterfactual_drop: float
    implicated: list[dict[str, object]]
    model_version: int
    mitigation: dict[str, object] | None = None
