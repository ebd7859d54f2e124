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
TRAINING_EVIDENCE = ("spectral", "direction")
OUTLIER_SPACES = ("representation", "input", "both")
COMBINATIONS = ("fisher", "min")  # expunge.defenses.attack_sets.COMBINATIONS
MITIGATION_RULES = ("majority", "matched")


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
    large_model_confirmation: str = field(
        default="trailing_layers",
        metadata={
            "help": "models too large for a dense Hessian: trailing_layers (shared Hessian "
            "of the last layers; fast) or newton_cg (Newton-CG on every parameter; slow)"
        },
    )
    retrain_max_s: float = field(
        default=5.0,
        metadata={
            "help": "and when the model's recorded training run took at most this many "
            "seconds (a convolutional net on few samples can be slow to retrain)"
        },
    )
    retrain_filter_false_positive_rate: float = field(
        default=0.5, metadata={"help": "the first filter's clean pass rate when retraining"}
    )
    retrain_drop_threshold: float = field(
        default=0.5,
        metadata={"help": "least confirming drop (retrained removal); calibrated above"},
    )
    training_side: bool = field(
        default=True,
        metadata={
            "help": "combine the influence score's p-value with the training-side evidence "
            "of the input's top proponents by Fisher's method"
        },
    )
    training_evidence: str = field(
        default="spectral",
        metadata={
            "help": "spectral: the top proponents' median class-outlier z (spectral "
            "signature within the class); direction: their robust z apart from their class "
            "along the group's Fisher direction (better on classes with several modes, "
            "but a clean tabular model then passed a mitigation: BENCHMARKS.md)"
        },
    )
    outlier_space: str = field(
        default="both",
        metadata={
            "help": "where a training sample's class-outlier z is measured: representation "
            "(the model's penultimate features), input (the features themselves: a poison "
            "whose features resemble another class, or carry a trigger far off the data), "
            "or both (the larger of the two z; chosen on the development attacks)"
        },
    )
    shared_proponents: bool = field(
        default=False,
        metadata={
            "help": "the attack set also takes the training samples whose influence z, "
            "combined (Stouffer) over the flagged inputs of their class, passes the "
            "class-wide Bonferroni cut (mitigated 5 of 8 held-out attacks, but forgot 77 "
            "clean samples on a clean model: BENCHMARKS.md)"
        },
    )
    cluster_completion: bool = field(
        default=True,
        metadata={
            "help": "the attack set also takes the samples of its classes that sit with "
            "its members, past a class-wide Bonferroni cut along their direction in both "
            "the representation and the input features (attack_sets.cluster_members; "
            "chosen on the development attacks: BENCHMARKS.md)"
        },
    )
    combination: str = field(
        default="fisher",
        metadata={
            "help": "how the two sides' p-values merge before calibration: fisher "
            "(-2 sum log p) or min (the smallest p-value, Tippett)"
        },
    )
    mitigation_rule: str = field(
        default="majority",
        metadata={
            "help": "when an attack set is forgotten: majority (its removal changes at "
            "least half of the flagged inputs, and at least two) or matched (at least two, "
            "and more than twice the share of the clean analogues it changes: the "
            "calibration inputs whose own proponents' removal moved them most, given an "
            "attack set by the same rule); both also need the random same-label control "
            "to change fewer than a quarter as many"
        },
    )
    group_size: int = field(
        default=10, metadata={"help": "top proponents that form the input's group"}
    )
    proponents_per_target: int = field(
        default=10,
        metadata={"help": "top proponents a flagged input names (its share of the attack set)"},
    )
    member_z: float = field(
        default=3.0,
        metadata={
            "help": "a top proponent joins the attack set when its influence z or its "
            "class-outlier z reaches this (chosen on the development attacks)"
        },
    )
    attack_set_p: float = field(
        default=0.05,
        metadata={
            "help": "flagged inputs with a p-value at most this name the attack set (the "
            "lenient retrain filter lets clean inputs through; chosen on the development "
            "attacks)"
        },
    )

    def __post_init__(self) -> None:
        if self.confirmation not in CONFIRMATIONS:
            raise ValueError(f"confirmation must be one of {CONFIRMATIONS}")
        if self.training_evidence not in TRAINING_EVIDENCE:
            raise ValueError(f"training_evidence must be one of {TRAINING_EVIDENCE}")
        if self.outlier_space not in OUTLIER_SPACES:
            raise ValueError(f"outlier_space must be one of {OUTLIER_SPACES}")
        if self.mitigation_rule not in MITIGATION_RULES:
            raise ValueError(f"mitigation_rule must be one of {MITIGATION_RULES}")
        if self.large_model_confirmation not in ("trailing_layers", "newton_cg"):
            raise ValueError("large_model_confirmation must be 'trailing_layers' or 'newton_cg'")
        if self.combination not in COMBINATIONS:
            raise ValueError(f"combination must be one of {COMBINATIONS}")
        if not self.ks or any(k < 1 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise ValueError("ks must be distinct positive integers")


class Calibration(NamedTuple):
    """Thresholds of one model version, influence source, estimator and confirmation mode."""

    filter_p: float  # the first filter: an input passes when its p-value is at most this
    drop: float  # the confirming fall of the predicted class's probability
    confirmation: str  # retrain or newton
    source: str  # where the influences came from: "index" or "exact" (the same when scoring)
    clean_scores: tuple[float, ...]  # the clean calibration inputs' influence scores
    clean_group_z: tuple[float, ...]  # ... and their top proponents' class-outlier z
    # ... and the fall of their predicted class's probability once their top proponents
    # are removed (NaN where the first filter stopped them): the clean analogues of a
    # mitigation's matched control are those it moved most.
    clean_drops: tuple[float, ...] = ()


@dataclass(frozen=True)
class ScanOutcome:
    index: int
    predicted_label: int
    target_score: float
    threshold: float  # the filter's p-value cut
    flagged: bool
    counterfactual_drop: float
    implicated: list[dict[str, object]]
    model_version: int
    mitigation: dict[str, object] | None = None
    p_value: float = 1.0
    influence_p_value: float = 1.0
    group_outlier_z: float = 0.0  # training side: the group's evidence (training_evidence)
    control_drop: float = 0.0
    drop_threshold: float = 0.0
    decision: str = ""
