"""Evidence that a test input is an attack's target, and the attack set behind it (DESIGN 4.8).

Two sides, each measured against the same clean calibration inputs:

- **test side** (influence): the robust target score of ``targets.target_score``, turned
  into a conformal p-value against the clean inputs' scores, so it has one scale across
  models, versions and estimators;
- **training side** (representations): do the input's strongest proponents form an
  anomalous group *in their own class*? Poisons carry the label the attack wants, so
  they hide in that class. Two measures: ``group_outlier_z``, the median of the
  members' ``class_outlier_z`` (each training sample's robust z of its spectral score
  within its class: a planted group sits off the class's main direction of variation,
  Tran et al. 2018; a few clean members do not move the median), and
  ``group_direction_z``, the group's robust z along its Fisher discriminant against its
  class. The class's main direction is a poor stand-in for the group's when a class has
  several modes (the development tabular backdoor with two blobs per class, served:
  training-side AUPRC 0.47 spectral, 1.00 direction, chance 0.14), but the direction's
  evidence, served, let a clean tabular model pass a mitigation (BENCHMARKS.md), so the
  server's default stays spectral.

``combined_p_values`` merges the two p-values (Fisher's method, or Tippett's smallest
p-value) and calibrates the merged statistic against the clean inputs again, so the
result is itself a conformal p-value: under the null (a clean input, exchangeable with
the calibration inputs) it is uniform, whatever the model.

``attack_set`` names the training samples to remove for a set of confirmed targets: the
union of each target's top proponents, and of the samples ``shared_proponents`` finds the
targets of one class leaning on together, each member with the reasons it was named.
``cluster_members`` completes it from the training side: a backdoor's poisons beyond every
target's top proponents still sit with the named ones, apart from the rest of their class.
Everything here is pure computation on tensors/arrays; the confirmation (retraining or
a Newton removal without the set, against an equal-size random control) is the
caller's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
import torch

from .poison_filters import spectral_signature_scores
from .targets import qn_scale

MAD_CONSISTENCY = 1.4826  # MAD * this estimates a normal standard deviation

__all__ = [
    "COMBINATIONS",
    "AttackSetMember",
    "ClassShape",
    "ClusterSpace",
    "attack_set",
    "class_outlier_z",
    "class_shapes",
    "cluster_members",
    "cluster_space",
    "combined_p_values",
    "conformal_p_values",
    "group_direction_z",
    "group_outlier_z",
    "random_control",
    "shared_proponents",
    "top_proponents",
    "with_cluster",
]

# Input features wider than this are randomly projected to it before a class's covariance
# is formed for ``cluster_members`` (Johnson-Lindenstrauss: distances and the discriminant
# survive; a 3,072-wide image's covariance per class would not fit the purpose).
CLUSTER_DIMENSIONS = 256
PROJECTION_ROWS = 4096  # rows projected at once


def conformal_p_values(clean_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``(1 + #{clean >= s}) / (n + 1)`` per score ``(q,)``: a valid p-value for "s is no
    larger than a clean input's score" when the input is exchangeable with the ``n``
    clean calibration inputs. The smallest possible value is ``1 / (n + 1)``."""
    clean = np.sort(np.asarray(clean_scores, dtype=np.float64))
    values = np.asarray(scores, dtype=np.float64)
    if clean.size == 0:
        raise ValueError("need at least one clean score")
    if np.isnan(clean).any() or np.isnan(values).any():
        raise ValueError("scores contain NaN")
    at_least = clean.size - np.searchsorted(clean, values, side="left")
    return (1.0 + at_least) / (clean.size + 1.0)


def _fisher(*p_values: np.ndarray) -> np.ndarray:
    return -2.0 * np.sum([np.log(p) for p in p_values], axis=0)


def _tippett(*p_values: np.ndarray) -> np.ndarray:
    # Larger is more surprising, like Fisher's: -log of the smallest p-value.
    return -np.log(np.min(p_values, axis=0))


# fisher: -2 sum log p (strongest when every side carries some evidence); min: the
# smallest p-value (Tippett; strongest when one side carries it and another is blind).
COMBINATIONS = {"fisher": _fisher, "min": _tippett}


def combined_p_values(
    clean_components: Sequence[np.ndarray],
    components: Sequence[np.ndarray],
    combination: str = "fisher",
) -> tuple[np.ndarray, np.ndarray]:
    """Combined conformal p-values of inputs from several component scores.

    ``clean_components[j]`` ``(n,)``: component j's scores of the clean calibration
    inputs; ``components[j]`` ``(q,)``: the inputs'. Each component becomes a conformal
    p-value (a clean input's own against the other clean inputs, leave-one-out), the
    p-values are merged by ``combination`` (``COMBINATIONS``: Fisher's ``-2 sum log p``
    or Tippett's smallest p), and that statistic is calibrated against the clean inputs'
    own, so neither rule needs a multiplicity correction. Returns
    ``(p (q,), clean_p (n,))``.
    """
    if combination not in COMBINATIONS:
        raise ValueError(f"combination must be one of {tuple(COMBINATIONS)}")
    merge = COMBINATIONS[combination]
    if len(clean_components) != len(components) or not components:
        raise ValueError("need the same, positive number of clean and input components")
    n = len(clean_components[0])
    if n < 2:
        raise ValueError("need at least two clean calibration inputs")
    clean_p = []
    input_p = []
    for clean, values in zip(clean_components, components, strict=True):
        clean = np.asarray(clean, dtype=np.float64)
        if clean.shape != (n,):
            raise ValueError("every clean component needs one score per calibration input")
        # Leave-one-out: a clean input against the n - 1 others.
        rank_from_top = n - np.searchsorted(np.sort(clean), clean, side="left") - 1
        clean_p.append((1.0 + rank_from_top) / n)
        input_p.append(conformal_p_values(clean, values))
    clean_statistic = merge(*clean_p)
    statistic = merge(*input_p)
    return conformal_p_values(clean_statistic, statistic), conformal_p_values(
        clean_statistic, clean_statistic
    )


def class_outlier_z(representations: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Robust z ``(n,)`` float64 of each training sample's spectral score within its class.

    ``representations`` ``(n, d)`` (penultimate features), ``labels`` ``(n,)``. A class
    whose scores have no spread (one member, identical rows) gets z = 0.
    """
    scores = spectral_signature_scores(representations, labels)
    z = torch.zeros_like(scores)
    for label in torch.unique(labels).tolist():
        members = labels == label
        values = scores[members].numpy()
        scale = qn_scale(values) if values.size > 1 else 0.0
        if scale > 0 and math.isfinite(scale):
            z[members] = (scores[members] - float(np.median(values))) / scale
    return z


def top_proponents(
    influences: torch.Tensor, train_labels: torch.Tensor, label: int, count: int
) -> torch.Tensor:
    """Indices ``(<= count,)`` of the training samples labelled ``label`` with the largest
    influence, largest first (ties in training order)."""
    same = torch.nonzero(train_labels == label).reshape(-1)
    order = torch.argsort(influences[same].double(), descending=True, stable=True)
    return same[order[:count]]


class ClassShape(NamedTuple):
    """One class's representations summarised for ``group_direction_z``: the members'
    indices ``(n_c,)``, their mean ``(d,)`` and the Cholesky factor ``(d, d)`` of their
    (ridge-regularised) covariance."""

    members: torch.Tensor
    centre: torch.Tensor
    factor: torch.Tensor


def class_shapes(representations: torch.Tensor, labels: torch.Tensor) -> dict[int, ClassShape]:
    """``ClassShape`` of every class with at least two members (float64).

    The ridge is 1e-6 of the mean variance (and at least 1e-12): it keeps the factor
    defined where the members span fewer than d dimensions and changes nothing else."""
    shapes: dict[int, ClassShape] = {}
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).reshape(-1)
        if members.numel() < 2:
            continue
        rows = representations[members].double()
        centre = rows.mean(dim=0)
        centred = rows - centre
        covariance = centred.T @ centred / (members.numel() - 1)
        ridge = max(1e-6 * float(covariance.diagonal().mean()), 1e-12)
        covariance.diagonal().add_(ridge)
        shapes[int(label)] = ClassShape(members, centre, torch.linalg.cholesky(covariance))
    return shapes


def group_direction_z(
    representations: torch.Tensor,
    labels: torch.Tensor,
    label: int,
    group: torch.Tensor,
    shapes: Mapping[int, ClassShape] | None = None,
) -> float:
    """How far ``group`` stands apart from its class ``label``, in robust z.

    ``representations`` ``(n, d)`` of the training samples, ``labels`` ``(n,)``, ``group``
    indices ``(k,)`` of members of class ``label``; ``shapes``: ``class_shapes`` of the
    same data, computed once for many groups. The direction is Fisher's discriminant of
    the group against its class, ``w = S^-1 (group mean - class mean)`` with S the class
    covariance: whitening keeps a class's own wide directions (two modes far apart) from
    drowning a group set off along a narrow one. The class's members are projected on
    w; the result is the group's median projection minus the class median, over the
    class's MAD scale (normal-consistent; O(n) per group where Qn's O(n^2) would dominate
    a scan). The direction is fitted to the group, so even a random group scores above
    0: the caller calibrates the value against clean inputs' groups. 0 for an empty
    group, one at the class mean, or a class with fewer than two members or no spread.
    """
    shape = (shapes or class_shapes(representations, labels)).get(int(label))
    if shape is None or group.numel() == 0:
        return 0.0
    direction = _fisher_direction(representations, shape, group)
    if direction is None:
        return 0.0
    projections = ((representations[shape.members].double() - shape.centre) @ direction).numpy()
    spread = _median_and_mad(projections)
    if spread is None:
        return 0.0
    middle, scale = spread
    group_projection = ((representations[group].double() - shape.centre) @ direction).numpy()
    return float((np.median(group_projection) - middle) / scale)


def _fisher_direction(
    features: torch.Tensor, shape: ClassShape, group: torch.Tensor
) -> torch.Tensor | None:
    """``S^-1 (group mean - class mean)`` ``(d,)`` float64; None for a group at the mean."""
    difference = features[group].double().mean(dim=0) - shape.centre
    if not float(difference.norm()) > 0:
        return None
    return torch.cholesky_solve(difference.unsqueeze(1), shape.factor).squeeze(1)


def _median_and_mad(values: np.ndarray) -> tuple[float, float] | None:
    """The median and the normal-consistent MAD scale; None without spread."""
    middle = float(np.median(values))
    scale = MAD_CONSISTENCY * float(np.median(np.abs(values - middle)))
    if not scale > 0 or not math.isfinite(scale):
        return None
    return middle, scale


def group_outlier_z(outlier_z: torch.Tensor, members: torch.Tensor) -> float:
    """A candidate group's spectral evidence: its members' median class-outlier z."""
    if members.numel() == 0:
        return 0.0
    return float(outlier_z[members].median())


def random_control(train_labels: torch.Tensor, removed: torch.Tensor, seed: int) -> torch.Tensor:
    """An equal-size random set with the same label counts as ``removed``, disjoint from it.

    The confirmation's control: if removing it changes a prediction as much as removing
    the implicated set does, the change says nothing about the set. Seeded.
    """
    generator = torch.Generator().manual_seed(seed)
    taken = torch.zeros(len(train_labels), dtype=torch.bool)
    taken[removed] = True
    picked: list[torch.Tensor] = []
    labels, counts = torch.unique(train_labels[removed], return_counts=True)
    for label, count in zip(labels.tolist(), counts.tolist(), strict=True):
        pool = torch.nonzero((train_labels == label) & ~taken).reshape(-1)
        order = torch.randperm(len(pool), generator=generator)
        picked.append(pool[order[: min(count, len(pool))]])
    if not picked:
        return torch.zeros(0, dtype=torch.long)
    return torch.sort(torch.cat(picked)).values


@dataclass(frozen=True)
class AttackSetMember:
    """One training sample an attack set names, and why."""

    index: int  # row in the training set
    targets: tuple[int, ...]  # the confirmed inputs (scan indices) it is a top proponent of
    best_rank: int  # 1 = the strongest proponent of one of them
    influence_z: float  # its largest standardised influence over those inputs
    class_outlier_z: float
    shared_z: float = math.nan  # combined z over the inputs of its class (shared_proponents)
    cluster_z: float = math.nan  # joined by cluster_members: its smallest z over the spaces

    def reason(self) -> str:
        inputs = ", ".join(str(t) for t in self.targets[:5]) + (
            " ..." if len(self.targets) > 5 else ""
        )
        if self.best_rank == 0:  # not a top proponent: joined by cluster_members
            return (
                f"not a top proponent: sits with the set's members of its class (z at least "
                f"{self.cluster_z:.2f} along their direction, in the model's representation "
                f"and in the input features), named for input(s) {inputs}; class-outlier z "
                f"{self.class_outlier_z:.2f}"
            )
        shared = (
            f"; shared: combined influence z {self.shared_z:.2f} over the inputs of its class"
            if math.isfinite(self.shared_z)
            else ""
        )
        return (
            f"top-{self.best_rank} proponent of confirmed input(s) {inputs} "
            f"(influence z {self.influence_z:.2f}); class-outlier z {self.class_outlier_z:.2f}"
            f"{shared}"
        )


def shared_proponents(
    influence_z: Mapping[int, torch.Tensor],
    predicted: Mapping[int, int],
    train_labels: torch.Tensor,
    min_z: float,
    family_error: float = 0.05,
) -> dict[int, tuple[float, tuple[int, ...]]]:
    """Training samples that several flagged inputs lean on together.

    ``influence_z[t]`` ``(n_train,)``: input t's standardised influences; ``predicted[t]``:
    its predicted label. For each label with at least two inputs, a sample of that label
    gets Stouffer's combined z, ``sum_t z_t / sqrt(T)`` over the label's T inputs: a
    backdoor's poisons serve every target, so their combined z grows with T, while one
    input's idiosyncratic proponents are diluted. Every sample of the class is a test, so
    the cut is Bonferroni's over the class (``family_error`` for the whole class if the
    combined z were standard normal), and never below ``min_z``: at ``min_z`` = 3 alone a
    development tabular backdoor's set took 14 clean samples. Returns
    ``{index: (combined z, inputs)}`` for the samples at or above the cut.
    """
    by_label: dict[int, list[int]] = {}
    for target, label in sorted(predicted.items()):
        by_label.setdefault(int(label), []).append(target)
    out: dict[int, tuple[float, tuple[int, ...]]] = {}
    for label, targets in by_label.items():
        if len(targets) < 2:
            continue
        rows = torch.nonzero(train_labels == label).reshape(-1)
        if rows.numel() == 0:
            continue
        cut = max(min_z, NormalDist().inv_cdf(1.0 - family_error / rows.numel()))
        combined = sum(influence_z[t].double()[rows] for t in targets) / math.sqrt(len(targets))
        assert isinstance(combined, torch.Tensor)
        for row, z in zip(rows.tolist(), combined.tolist(), strict=True):
            if z >= cut:
                out[row] = (float(z), tuple(targets))
    return out


def attack_set(
    proponents: Mapping[int, torch.Tensor],
    influence_z: Mapping[int, torch.Tensor],
    outlier_z: torch.Tensor,
    min_z: float = -math.inf,
    shared: Mapping[int, tuple[float, tuple[int, ...]]] | None = None,
) -> list[AttackSetMember]:
    """The confirmed targets' top proponents that stand out on either side, strongest first.

    ``proponents[t]`` ``(k,)``: target t's top proponents (``top_proponents``), largest
    influence first; ``influence_z[t]`` ``(n_train,)``: its standardised influences;
    ``outlier_z`` ``(n_train,)``: ``class_outlier_z``. A proponent is a member when its
    influence z (on any of the targets) or its class-outlier z is at least ``min_z``: a
    top proponent that is neither unusually influential for its class nor unusual in its
    class is what a clean input's proponents look like too. Members are ordered by best
    rank, then by the number of targets naming them (more first), then by index.
    ``shared`` (``shared_proponents``): samples that join on their combined z, beyond the
    top proponents (their rank: their best by influence over every training sample).
    """
    ranks: dict[int, int] = {}
    named_by: dict[int, list[int]] = {}
    best_z: dict[int, float] = {}
    for target in sorted(proponents):
        z = influence_z[target]
        for rank, index in enumerate(proponents[target].tolist(), start=1):
            ranks[index] = min(ranks.get(index, rank), rank)
            named_by.setdefault(index, []).append(target)
            best_z[index] = max(best_z.get(index, -math.inf), float(z[index]))
    members = {
        index: AttackSetMember(
            index, tuple(named_by[index]), ranks[index], best_z[index], float(outlier_z[index])
        )
        for index in ranks
        if max(best_z[index], float(outlier_z[index])) >= min_z
    }
    for index, (combined, targets) in (shared or {}).items():
        zs = [float(influence_z[t][index]) for t in targets]
        rank = min(int((influence_z[t] > influence_z[t][index]).sum()) + 1 for t in targets)
        base = members.get(index)
        members[index] = AttackSetMember(
            index,
            base.targets if base else tuple(targets),
            base.best_rank if base else rank,
            base.influence_z if base else max(zs),
            float(outlier_z[index]),
            combined,
        )
    ordered = sorted(members.values(), key=lambda m: (m.best_rank, -len(m.targets), m.index))
    return ordered


class ClusterSpace(NamedTuple):
    """Training samples in one feature space for ``cluster_members``: ``features`` ``(n, d)``
    float64 and each class's ``ClassShape``."""

    features: torch.Tensor
    shapes: dict[int, ClassShape]


def cluster_space(features: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> ClusterSpace:
    """``features`` ``(n, *shape)`` flattened, projected to ``CLUSTER_DIMENSIONS`` by a
    seeded Gaussian matrix when wider, with every class's shape."""
    flat = features.reshape(len(features), -1)
    if flat.shape[1] > CLUSTER_DIMENSIONS:
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(flat.shape[1], CLUSTER_DIMENSIONS, generator=generator)
        projection /= math.sqrt(CLUSTER_DIMENSIONS)
        # In float32 blocks of rows: a float64 copy of 50,000 CIFAR images would be 1.2 GB.
        flat = torch.cat(
            [
                (flat[start : start + PROJECTION_ROWS].float() @ projection).double()
                for start in range(0, len(flat), PROJECTION_ROWS)
            ]
        )
    else:
        flat = flat.double()
    return ClusterSpace(flat, class_shapes(flat, labels))


def _along_group(space: ClusterSpace, label: int, group: torch.Tensor) -> dict[int, float]:
    """Robust z of each member of class ``label`` along the group's Fisher direction in its
    class (as ``group_direction_z``), centred and scaled on the class's other members."""
    shape = space.shapes.get(label)
    if shape is None:
        return {}
    direction = _fisher_direction(space.features, shape, group)
    if direction is None:
        return {}
    projections = ((space.features[shape.members] - shape.centre) @ direction).numpy()
    others = ~np.isin(shape.members.numpy(), group.numpy())
    spread = _median_and_mad(projections[others]) if others.sum() >= 2 else None
    if spread is None:
        return {}
    middle, scale = spread
    z = (projections - middle) / scale
    return dict(zip(shape.members.tolist(), z.tolist(), strict=True))


def cluster_members(
    spaces: Sequence[ClusterSpace],
    labels: torch.Tensor,
    named: torch.Tensor,
    family_error: float = 0.05,
    min_z: float = 3.0,
    min_group: int = 3,
    max_rounds: int = 10,
) -> dict[int, float]:
    """Training samples that sit with an attack set's named members in their class.

    ``spaces``: the training samples in each feature space (``cluster_space``; the server
    passes the model's penultimate representations and the input features); ``labels``
    ``(n,)``; ``named`` ``(k,)``: the set's rows. For each label with at least
    ``min_group`` named members, every other member of the class gets its robust z along
    the named members' Fisher direction against the class (centred and scaled on the
    class's unnamed members), in every space; it joins when each z passes Bonferroni's cut
    over the class (``family_error`` for the class if the z were standard normal, never
    below ``min_z``). Both spaces must agree: on the development attacks the
    representation alone also took the clean near-duplicates of targeted poisoning's
    targets. The joined samples are named in turn and the direction refitted, until no
    sample joins (three rounds at most on the development attacks; ``max_rounds`` bounds
    it). Returns ``{row: its smallest z over the spaces when it joined}``.
    """
    if not spaces:
        return {}
    group = {int(i) for i in named.tolist()}
    joined: dict[int, float] = {}
    for _ in range(max_rounds):
        added: dict[int, float] = {}
        rows = torch.tensor(sorted(group), dtype=torch.long)
        for label in torch.unique(labels[rows]).tolist() if rows.numel() else []:
            members = rows[labels[rows] == label]
            if members.numel() < min_group:
                continue
            size = int((labels == label).sum())
            cut = max(min_z, NormalDist().inv_cdf(1.0 - family_error / size))
            per_space = [_along_group(space, int(label), members) for space in spaces]
            if any(not z for z in per_space):
                continue
            for row in per_space[0]:
                if row in group:
                    continue
                smallest = min(z[row] for z in per_space)
                if smallest >= cut:
                    added[row] = smallest
        if not added:
            break
        joined.update(added)
        group.update(added)
    return joined


def with_cluster(
    members: list[AttackSetMember],
    joined: Mapping[int, float],
    labels: torch.Tensor,
    outlier_z: torch.Tensor,
) -> list[AttackSetMember]:
    """``members`` followed by the ``cluster_members`` they brought in (strongest first),
    each naming the inputs behind the members of its class."""
    targets_of: dict[int, set[int]] = {}
    for member in members:
        targets_of.setdefault(int(labels[member.index]), set()).update(member.targets)
    extra = [
        AttackSetMember(
            row,
            tuple(sorted(targets_of.get(int(labels[row]), set()))),
            0,
            math.nan,
            float(outlier_z[row]),
            cluster_z=z,
        )
        for row, z in sorted(joined.items(), key=lambda item: (-item[1], item[0]))
    ]
    return members + extra
