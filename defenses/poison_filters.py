"""Poison-detection baselines that look only at learned representations (DESIGN 4.8).

Two standard filters a backdoor scan is compared against. Both work class by class on
representations ``R`` ``(n, d)`` of the training samples (usually the penultimate-layer
activations, ``penultimate_features``) and their labels ``(n,)``:

- **Spectral signatures** (Tran, Li & Madry, NeurIPS 2018): centre the representations
  of class ``c`` on their mean ``mu_c``, take the top right singular vector ``v`` of the
  centred matrix; the outlier score of sample ``i`` is ``((r_i - mu_c) . v)^2``. Scores
  are comparable within a class (the paper removes the top 1.5 x expected-poison count
  of each class).
- **Activation clustering** (Chen et al. 2018, "Detecting backdoor attacks on deep
  neural networks by activation clustering"): reduce each class's representations to a
  few dimensions, split them into two clusters with k-means, and flag the smaller
  cluster when it holds at most ``size_threshold`` (paper: 35%) of the class. The paper
  reduces with ICA to 10 dimensions; here PCA (SVD of the centred matrix) to
  ``min(dims, d, n_c - 1)`` dimensions is used instead, because it is deterministic
  (ICA depends on a random start and convergence) and needs no scikit-learn. K-means is
  seeded k-means++ followed by Lloyd iterations, in torch.

``recall_at_zero_false_positives`` is the benchmark's figure for either: the share of
poisons ranked above every clean sample of the candidate set.

Everything is computed in float64; every random choice comes from a ``torch.Generator``
seeded by an explicit argument.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .evaluate import inference

__all__ = [
    "ActivationClusters",
    "KMeansResult",
    "activation_clustering",
    "kmeans",
    "penultimate_features",
    "recall_at_zero_false_positives",
    "silhouette_score",
    "spectral_signature_scores",
]

# Above this many samples a class's silhouette is estimated on a seeded subsample.
SILHOUETTE_EXACT_MAX = 5000
# K-means++ starts per class in activation clustering; the lowest inertia wins.
_AC_RESTARTS = 4
# Rows of the pairwise-distance matrix held at once by silhouette_score.
_DISTANCE_BLOCK = 1024


class KMeansResult(NamedTuple):
    """assignments ``(n,)`` long in ``[0, k)``, centroids ``(k, d)`` float64, inertia
    (sum of squared distances to the assigned centroid), Lloyd iterations run."""

    assignments: torch.Tensor
    centroids: torch.Tensor
    inertia: float
    iterations: int


class ActivationClusters(NamedTuple):
    """Result of ``activation_clustering`` on ``n`` samples.

    suspicious ``(n,)`` bool: members of a class's smaller cluster when that cluster
    holds at most ``size_threshold`` of the class. scores ``(n,)`` float64 in ``[-1, 1]``:
    ``(|z - c_large| - |z - c_small|) / |c_large - c_small|`` in the class's reduced
    space, positive exactly for members of the smaller cluster (a converged k-means
    assigns each point to its nearest centroid), larger the deeper inside it; 0 for
    classes with fewer than two samples. cluster_fraction: per class, the smaller
    cluster's share of the class. silhouette: per class, the mean silhouette of the
    2-clustering in the reduced space (nan for classes with fewer than two samples).
    """

    suspicious: torch.Tensor
    scores: torch.Tensor
    cluster_fraction: dict[int, float]
    silhouette: dict[int, float]


def _check_inputs(representations: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if representations.ndim != 2:
        raise ValueError(f"representations must be (n, d); got {tuple(representations.shape)}")
    if labels.shape != (representations.shape[0],):
        raise ValueError(
            f"{representations.shape[0]} representations but labels of shape {tuple(labels.shape)}"
        )
    return representations.to(torch.float64)


def _centred(rows: torch.Tensor) -> torch.Tensor:
    return rows - rows.mean(dim=0, keepdim=True)


def spectral_signature_scores(representations: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Spectral-signature outlier scores ``(n,)`` float64 of representations ``(n, d)``.

    For each class: ``((r_i - mu_c) . v_c)^2`` with ``v_c`` the top right singular vector
    of the class's centred representations. Scores compare within a class; a class with
    one sample scores 0.
    """
    features = _check_inputs(representations, labels)
    scores = torch.zeros(features.shape[0], dtype=torch.float64, device=features.device)
    for label in torch.unique(labels).tolist():
        members = labels == label
        if int(members.sum()) < 2:
            continue
        centred = _centred(features[members])
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        scores[members] = (centred @ vh[0]) ** 2
    return scores


def _squared_distances(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    # The difference form, not cdist's matrix-product form, so equal inputs give equal,
    # exactly reproducible distances (k is tiny, so n x k x d is cheap).
    return (points[:, None, :] - centroids[None, :, :]).pow(2).sum(dim=-1)


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = points[first : first + 1]
    closest = _squared_distances(points, centroids)[:, 0]
    for _ in range(1, k):
        weights = closest.cpu()
        if float(weights.sum()) <= 0.0:
            # Every point sits on a centroid already (duplicates): pick uniformly.
            weights = torch.ones(n, dtype=torch.float64)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        centroids = torch.cat([centroids, points[pick : pick + 1]])
        closest = torch.minimum(closest, _squared_distances(points, points[pick : pick + 1])[:, 0])
    return centroids


def _lloyd(
    points: torch.Tensor, centroids: torch.Tensor, max_iterations: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    k = centroids.shape[0]
    assignments = torch.argmin(_squared_distances(points, centroids), dim=1)
    iterations = 0
    while iterations < max_iterations:
        iterations += 1
        centroids = centroids.clone()
        for j in range(k):
            members = assignments == j
            if bool(members.any()):
                centroids[j] = points[members].mean(dim=0)
            else:
                # An empty cluster restarts at the point farthest from its nearest centroid.
                worst = torch.argmax(_squared_distances(points, centroids).min(dim=1).values)
                centroids[j] = points[worst]
        updated = torch.argmin(_squared_distances(points, centroids), dim=1)
        if torch.equal(updated, assignments):
            break
        assignments = updated
    return assignments, centroids, iterations


def kmeans(
    points: torch.Tensor,
    k: int = 2,
    *,
    seed: int = 0,
    max_iterations: int = 100,
    restarts: int = 1,
) -> KMeansResult:
    """K-means of ``points`` ``(n, d)``: seeded k-means++ starts, then Lloyd iterations.

    Deterministic given ``seed``: ``restarts`` starts are drawn from one generator and the
    run with the lowest inertia is kept (the first on ties). Ties in assignment go to the
    lower cluster index; an empty cluster moves to the point farthest from its nearest
    centroid.
    """
    if points.ndim != 2 or points.shape[0] < k:
        raise ValueError(f"need points of shape (n, d) with n >= k={k}; got {tuple(points.shape)}")
    if k < 1 or max_iterations < 1 or restarts < 1:
        raise ValueError("k, max_iterations and restarts must be positive")
    x = points.to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    best: KMeansResult | None = None
    for _ in range(restarts):
        start = _kmeans_plus_plus(x, k, generator)
        assignments, centroids, iterations = _lloyd(x, start, max_iterations)
        inertia = float(_squared_distances(x, centroids).gather(1, assignments[:, None]).sum())
        if best is None or inertia < best.inertia:
            best = KMeansResult(assignments, centroids, inertia, iterations)
    assert best is not None
    return best


def silhouette_score(points: torch.Tensor, assignments: torch.Tensor) -> float:
    """Mean silhouette of a clustering of ``points`` ``(n, d)``, exact (all pairs).

    ``s_i = (b_i - a_i) / max(a_i, b_i)`` with ``a_i`` the mean Euclidean distance to the
    other members of ``i``'s cluster and ``b_i`` the smallest mean distance to another
    cluster's members; ``s_i = 0`` for singletons (and where ``a_i = b_i = 0``), as in
    scikit-learn. ``assignments`` ``(n,)`` must use at least two clusters. Memory is
    ``O(n)`` per block of rows; time ``O(n^2 d)``.
    """
    if points.ndim != 2 or assignments.shape != (points.shape[0],):
        raise ValueError("need points (n, d) and assignments (n,)")
    x = points.to(torch.float64)
    _, cluster = torch.unique(assignments, return_inverse=True)
    k = int(cluster.max()) + 1 if cluster.numel() else 0
    if k < 2:
        raise ValueError("the silhouette needs at least two clusters")
    one_hot = torch.nn.functional.one_hot(cluster, k).to(torch.float64)
    sizes = one_hot.sum(dim=0)
    values = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], _DISTANCE_BLOCK):
        rows = slice(start, start + _DISTANCE_BLOCK)
        distances = torch.cdist(x[rows], x, compute_mode="donot_use_mm_for_euclid_dist")
        sums = distances @ one_hot  # (block, k): summed distance to each cluster
        own = cluster[rows]
        own_size = sizes[own]
        a = sums.gather(1, own[:, None])[:, 0] / (own_size - 1).clamp(min=1)
        means = sums / sizes
        means.scatter_(1, own[:, None], math.inf)
        b = means.min(dim=1).values
        denominator = torch.maximum(a, b)
        s = torch.where(denominator > 0, (b - a) / denominator.clamp(min=1e-300), 0.0)
        values[rows] = torch.where(own_size > 1, s, 0.0)
    return float(values.mean())


def _principal_components(rows: torch.Tensor, dims: int) -> torch.Tensor:
    centred = _centred(rows)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:dims].T


def activation_clustering(
    representations: torch.Tensor,
    labels: torch.Tensor,
    *,
    dims: int = 10,
    size_threshold: float = 0.35,
    seed: int = 0,
) -> ActivationClusters:
    """Activation clustering of representations ``(n, d)`` with labels ``(n,)``.

    Per class: PCA to ``min(dims, d, n_c - 1)`` dimensions, 2-means (seeded k-means++,
    a few restarts), flag the smaller cluster when its share is ``<= size_threshold``.
    See ``ActivationClusters`` for the per-sample ranking score. The silhouette is exact
    for classes of at most ``SILHOUETTE_EXACT_MAX`` samples, else computed on a seeded
    subsample of that many.
    """
    if dims < 1 or not 0.0 <= size_threshold <= 1.0:
        raise ValueError("need dims >= 1 and 0 <= size_threshold <= 1")
    features = _check_inputs(representations, labels)
    n = features.shape[0]
    suspicious = torch.zeros(n, dtype=torch.bool, device=features.device)
    scores = torch.zeros(n, dtype=torch.float64, device=features.device)
    fractions: dict[int, float] = {}
    silhouettes: dict[int, float] = {}
    generator = torch.Generator().manual_seed(seed)
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).reshape(-1)
        n_c = members.numel()
        if n_c < 2:
            fractions[int(label)], silhouettes[int(label)] = 0.0, math.nan
            continue
        reduced = _principal_components(features[members], min(dims, features.shape[1], n_c - 1))
        class_seed = int(torch.randint(2**62, (1,), generator=generator))
        result = kmeans(reduced, 2, seed=class_seed, restarts=_AC_RESTARTS)
        counts = torch.bincount(result.assignments, minlength=2)
        small = int(torch.argmin(counts))  # ties: cluster 0
        large = 1 - small
        fraction = float(counts[small]) / n_c
        fractions[int(label)] = fraction
        distances = _squared_distances(reduced, result.centroids).sqrt()
        gap = torch.linalg.vector_norm(result.centroids[large] - result.centroids[small])
        margin = distances[:, large] - distances[:, small]
        scores[members] = margin / gap if float(gap) > 0 else torch.zeros_like(margin)
        if fraction <= size_threshold:
            suspicious[members] = result.assignments == small
        sample = torch.arange(n_c)
        if n_c > SILHOUETTE_EXACT_MAX:
            sample = torch.randperm(n_c, generator=generator)[:SILHOUETTE_EXACT_MAX]
        sample = sample.to(reduced.device)
        if torch.unique(result.assignments[sample]).numel() < 2:
            silhouettes[int(label)] = math.nan
        else:
            silhouettes[int(label)] = silhouette_score(reduced[sample], result.assignments[sample])
    return ActivationClusters(suspicious, scores, fractions, silhouettes)


def penultimate_features(
    model: nn.Module, inputs: torch.Tensor, batch_size: int = 1024
) -> torch.Tensor:
    """Inputs ``(n, d)`` float64 (on the CPU) of the model's last ``nn.Linear``.

    "Last" is the last ``nn.Linear`` in ``model.modules()`` order, which for the built-in
    architectures (``architectures.build_model``) is the output layer, so these are the
    penultimate-layer activations (for ``logreg``, the flattened input). Recorded with a
    forward hook in eval mode without gradients; ``inputs`` ``(n, *shape)`` are cast to
    the model's parameter dtype and device.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layer")
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    reference = next(model.parameters())
    x = inputs.to(reference.device)
    if x.is_floating_point():
        x = x.to(reference.dtype)
    recorded: list[torch.Tensor] = []

    def record(_module: nn.Module, args: tuple[torch.Tensor, ...], _output: object) -> None:
        recorded.append(args[0].detach().reshape(args[0].shape[0], -1).to("cpu", torch.float64))

    handle = linears[-1].register_forward_hook(record)
    try:
        with inference(model):
            for start in range(0, x.shape[0], batch_size):
                model(x[start : start + batch_size])
    finally:
        handle.remove()
    if x.shape[0] == 0:
        raise ValueError("need at least one input")
    if not recorded:
        raise ValueError("the model's last nn.Linear was not called in forward")
    return torch.cat(recorded)


def recall_at_zero_false_positives(
    scores: torch.Tensor, poison_mask: torch.Tensor, candidate_mask: torch.Tensor
) -> float:
    """Share of poisons scoring strictly above every clean sample, within the candidates.

    scores, poison_mask, candidate_mask ``(n,)``. Poisons and clean samples are the
    candidates with and without ``poison_mask``; with no clean candidate every poison
    counts as recalled.
    """
    if not scores.shape == poison_mask.shape == candidate_mask.shape or scores.ndim != 1:
        raise ValueError("scores, poison_mask and candidate_mask must all be (n,)")
    poisons = poison_mask & candidate_mask
    clean = ~poison_mask & candidate_mask
    if not bool(poisons.any()):
        raise ValueError("no poison among the candidates")
    values = scores.to(torch.float64)
    cutoff = float(values[clean].max()) if bool(clean.any()) else -math.inf
    return float((values[poisons] > cutoff).to(torch.float64).mean())
