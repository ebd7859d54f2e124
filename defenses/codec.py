"""CODEC conditional dependence and FOCI forward selection (Azadkia & Chatterjee 2021).

DESIGN 4.2. For a response ``y`` ``(n,)``, predictors ``z`` ``(n, dz)`` and an optional
conditioning set ``x`` ``(n, dx)``:

- ranks: ``R_i = #{j : y_j <= y_i}`` and ``L_i = #{j : y_j >= y_i}``. Ties in ``y`` are
  *counted*, exactly as written, not broken: that is what makes T reach 1 when ``y`` is
  a discrete function of ``z`` (a random order inside a tie group would read as noise);
- ``N(i)`` / ``M(i)``: the Euclidean nearest neighbour of ``x_i`` / of ``(x_i, z_i)``
  among the other samples;
- ``T(y, z)     = sum_i [n min(R_i, R_M(i)) - L_i^2] / sum_i L_i (n - L_i)``
- ``T(y, z | x) = sum_i [min(R_i, R_M(i)) - min(R_i, R_N(i))] / sum_i [R_i - min(R_i, R_N(i))]``

Nearest-neighbour ties are broken uniformly at random, as in the paper, but
reproducibly: ``keys = torch.rand((n, n), generator=torch.Generator().manual_seed(seed),
dtype=torch.float64)`` is drawn once per call, and among the samples ``j != i`` at the
smallest distance from ``i`` the one with the smallest ``keys[i, j]`` wins. Each ``i``
draws its own winner, so a block of identical rows (a ReLU unit that is zero on many
inputs) does not send every member to one shared representative, whose single rank
would then decide the whole block. ``N`` and ``M`` share the keys, so when ``z`` adds no
resolution inside a tie group of ``x`` both pick the same neighbour and the term is 0.

Squared distances are accumulated one coordinate at a time, conditioning columns first
(in order), then the candidate's: ``D += (a_c - b_c) * (a_c - b_c)``, in float64. A
brute-force implementation that sums in the same order reproduces every tie exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

__all__ = ["FociResult", "codec", "codec_scores", "foci", "standardized"]

# Elements of the (chunk, n, n) float64 distance workspace: 16 MiB, about what stays in
# cache; larger blocks measured no faster per candidate (n = 1000, one core).
_CHUNK_ELEMENTS = 1 << 21
# Nearest samples under the chosen set that a conditional step's search starts from
# (``_pruned_step_scores``); steps over at most twice as many samples search whole rows.
_PRUNE_NEIGHBOURS = 32


@dataclass(frozen=True)
class FociResult:
    """Outcome of FOCI: the chosen candidates in order, with T at the step each was chosen."""

    selected: tuple[int, ...] = field(metadata={"help": "candidate column indices, in order"})
    scores: tuple[float, ...] = field(
        metadata={"help": "T of each selected column at its step (the first unconditional)"}
    )
    stopped_by_rule: bool = field(
        metadata={"help": "True when the run ended because the best T was <= 0"}
    )
    kept_by_rule: int = field(
        metadata={"help": "how many leading selections FOCI's own rule (T > 0) keeps"}
    )


def codec(y: torch.Tensor, z: torch.Tensor, x: torch.Tensor | None = None, seed: int = 0) -> float:
    """CODEC T(y, z) or, with ``x``, T(y, z | x).

    y ``(n,)``; z ``(n,)`` or ``(n, dz)``; x ``(n,)`` or ``(n, dx)`` or None; n >= 2.
    Returns NaN where T is undefined (a zero denominator: ``y`` constant, or ``y`` a
    nearest-neighbour function of ``x``). ``seed`` breaks nearest-neighbour ties.
    """
    y64 = _response(y)
    n = y64.shape[0]
    z64 = _columns(z, n, "z")
    keys = _tie_keys(n, seed)
    ranks, larger = _ranks(y64)
    if x is None:
        near_xz = _nearest(_squared_distances(z64).unsqueeze(0), keys)[0]
        numerator, denominator = _unconditional_terms(ranks, larger, near_xz.unsqueeze(0))
    else:
        x64 = _columns(x, n, "x")
        dist_x = _squared_distances(x64)
        near_x = _nearest(dist_x.clone().unsqueeze(0), keys)[0]
        near_xz = _nearest(_squared_distances(z64, start=dist_x).unsqueeze(0), keys)[0]
        numerator, denominator = _conditional_terms(ranks, near_x, near_xz.unsqueeze(0))
    if int(denominator) == 0:
        return float("nan")
    return float(numerator[0]) / float(denominator)


def foci(
    y: torch.Tensor,
    candidates: torch.Tensor,
    max_selected: int,
    seed: int = 0,
    stop_when_nonpositive: bool = True,
    standardize: bool = True,
    chunk_size: int | None = None,
    given: torch.Tensor | None = None,
) -> FociResult:
    """FOCI forward selection of candidate columns that explain ``y``.

    y ``(n,)``, candidates ``(n, p)``. Step one picks ``argmax_j T(y, c_j)``; each later
    step picks ``argmax_j T(y, c_j | c_S)`` over the columns not yet chosen. With
    ``stop_when_nonpositive`` the run ends when that maximum is <= 0 (also at the first
    step: nothing explains ``y``), otherwise it continues to ``max_selected``, which
    ranks columns beyond the rule; ``kept_by_rule`` says where the rule would have ended.
    A conditional step whose denominator is 0 (``y`` already a nearest-neighbour function
    of ``c_S``) scores candidates by the numerator alone, which is then <= 0.

    Every step evaluates all candidates in batched ``(chunk, n, n)`` distance blocks:
    the conditioning distances are kept and each candidate adds its own squared
    differences. ``standardize`` z-scores each column first (constant columns become 0),
    so that columns on different scales weigh alike in the joint distances.
    ``chunk_size`` (candidates per block) defaults to a workspace of about 16 MiB.
    ``given`` ``(n, g)``: columns chosen before (standardized like the candidates), on
    which every step is conditioned; the result is then what a run over ``given``'s and
    the candidates' columns, having picked ``given``'s first, would continue with.
    """
    y64 = _explainable(y, candidates)
    n, p = candidates.shape
    if not 0 <= max_selected <= p:
        raise ValueError(f"max_selected must lie in [0, p={p}]; got {max_selected}")
    columns = _candidate_columns(candidates, standardize)
    workspace = _workspace(n, p, chunk_size)
    response = _Response(*_ranks(y64), _tie_keys(n, seed))

    remaining = list(range(p))
    selected: list[int] = []
    scores: list[float] = []
    kept: int | None = None
    dist_s, near_s = _conditioning(given, n, standardize, response.keys)
    while len(selected) < max_selected:
        step_scores = _step_scores(response, columns, remaining, dist_s, near_s, workspace)
        # remaining is increasing, so the first maximum is the lowest column index.
        position = int(torch.argmax(step_scores))
        best, best_score = remaining.pop(position), float(step_scores[position])
        if best_score <= 0 and kept is None:
            kept = len(selected)
            if stop_when_nonpositive:
                return FociResult(tuple(selected), tuple(scores), True, kept)
        selected.append(best)
        scores.append(best_score)
        dist_s = _candidate_distances(columns[:, best : best + 1], dist_s)[0]
        near_s = _nearest(dist_s.clone().unsqueeze(0), response.keys)[0]
    return FociResult(
        tuple(selected), tuple(scores), False, len(selected) if kept is None else kept
    )


def codec_scores(
    y: torch.Tensor,
    candidates: torch.Tensor,
    seed: int = 0,
    standardize: bool = True,
    chunk_size: int | None = None,
    given: torch.Tensor | None = None,
) -> torch.Tensor:
    """T(y, c_j), or T(y, c_j | given), for every candidate column: y ``(n,)``,
    candidates ``(n, p)``, given ``(n, g)`` or None -> ``(p,)``.

    Exactly the scores of FOCI's next step (the first, without ``given``) for the same
    arguments: the same code computes both. So ``argmax`` (first maximum) is the column
    FOCI picks next, and FOCI over any subset of the columns that holds it, with the
    same ``given`` and pre-standardized columns, picks it next too.
    """
    y64 = _explainable(y, candidates)
    n, p = candidates.shape
    columns = _candidate_columns(candidates, standardize)
    response = _Response(*_ranks(y64), _tie_keys(n, seed))
    dist_s, near_s = _conditioning(given, n, standardize, response.keys)
    workspace = _workspace(n, p, chunk_size)
    return _step_scores(response, columns, list(range(p)), dist_s, near_s, workspace)


def standardized(columns: torch.Tensor) -> torch.Tensor:
    """Each column of ``(n, p)`` z-scored (population std; constant columns become 0), as
    FOCI's ``standardize`` does. Standardizing once and passing ``standardize=False``
    makes scores over column subsets bit-identical to those over all columns."""
    return _standardized(columns.detach().to(device="cpu", dtype=torch.float64))


class _Response(NamedTuple):
    """What every step needs of ``y``: ranks R and L ``(n,)`` and the tie keys ``(n, n)``."""

    ranks: torch.Tensor
    larger: torch.Tensor
    keys: torch.Tensor


def _explainable(y: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``y`` as float64 after checking it varies and ``candidates`` is ``(n, p)``."""
    y64 = _response(y)
    n = y64.shape[0]
    if candidates.dim() != 2 or candidates.shape[0] != n:
        raise ValueError(f"candidates must have shape (n={n}, p); got {tuple(candidates.shape)}")
    if bool((y64 == y64[0]).all()):
        raise ValueError("y is constant: CODEC is undefined, there is nothing to explain")
    return y64


def _candidate_columns(candidates: torch.Tensor, standardize: bool) -> torch.Tensor:
    columns = candidates.detach().to(device="cpu", dtype=torch.float64)
    return _standardized(columns) if standardize else columns


def _conditioning(
    given: torch.Tensor | None, n: int, standardize: bool, keys: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Distances ``(n, n)`` and nearest neighbours ``(n,)`` of the ``given`` columns,
    summed in column order as FOCI's own steps add them; (None, None) without any."""
    if given is None or (given.dim() == 2 and given.shape[1] == 0):
        return None, None
    columns = _candidate_columns(_columns(given, n, "given"), standardize)
    dist = _squared_distances(columns)
    return dist, _nearest(dist.clone().unsqueeze(0), keys)[0]


def _workspace(n: int, p: int, chunk_size: int | None) -> torch.Tensor:
    """One ``(chunk, n, n)`` buffer for every block: fresh multi-MiB tensors per block cost
    page faults that outweigh the arithmetic."""
    chunk = max(1, min(p, chunk_size or _CHUNK_ELEMENTS // (n * n)))
    return torch.empty((chunk, n, n), dtype=torch.float64)


def _step_scores(
    response: _Response,
    columns: torch.Tensor,
    remaining: list[int],
    dist_s: torch.Tensor | None,
    near_s: torch.Tensor | None,
    workspace: torch.Tensor,
) -> torch.Tensor:
    """T of each remaining column ``(len(remaining),)``, given the chosen set's distances
    ``dist_s`` and neighbours ``near_s`` (None: the unconditional first step)."""
    n = columns.shape[0]
    if dist_s is not None and near_s is not None and n > 2 * _PRUNE_NEIGHBOURS:
        return _pruned_step_scores(response, columns, remaining, dist_s, near_s)
    chunk = workspace.shape[0]
    scores = torch.empty(len(remaining), dtype=torch.float64)
    for start in range(0, len(remaining), chunk):
        block = remaining[start : start + chunk]
        dist = _candidate_distances(columns[:, block], dist_s, out=workspace[: len(block)])
        near = _nearest(dist, response.keys)
        if near_s is None:
            numerator, denominator = _unconditional_terms(response.ranks, response.larger, near)
        else:
            numerator, denominator = _conditional_terms(response.ranks, near_s, near)
        scores[start : start + len(block)] = numerator.double() / max(int(denominator), 1)
    return scores


def _pruned_step_scores(
    response: _Response,
    columns: torch.Tensor,
    remaining: list[int],
    dist_s: torch.Tensor,
    near_s: torch.Tensor,
) -> torch.Tensor:
    """``_step_scores`` of a conditional step, the same values, from each row's
    ``_PRUNE_NEIGHBOURS`` nearest samples under the chosen set instead of all ``n``.

    A candidate only adds a square to ``dist_s``, so no sample outside row ``i``'s K
    nearest under the chosen set can come nearer than the (K+1)-th's distance there. Where
    the best of the K is strictly below that bound, it and every sample tied with it are
    among the K, and the tie rule picks the same winner; the other rows are searched
    whole. Each distance is the same sum as ``_candidate_distances`` forms, so the
    neighbours, and the scores, are bit-identical.
    """
    n = columns.shape[0]
    k = _PRUNE_NEIGHBOURS
    masked = dist_s.clone()
    masked.diagonal().fill_(float("inf"))
    values, order = torch.topk(masked, k + 1, dim=1, largest=False, sorted=True)
    base, order, bound = values[:, :k], order[:, :k], values[:, k]
    order_keys = response.keys.gather(1, order)  # (n, k)
    chunk = max(1, _CHUNK_ELEMENTS // (n * k))
    scores = torch.empty(len(remaining), dtype=torch.float64)
    for start in range(0, len(remaining), chunk):
        block = columns[:, remaining[start : start + chunk]].T  # (c, n)
        gaps = block[:, order] - block.unsqueeze(-1)  # (c, n, k): z_j - z_i
        dist = gaps.mul_(gaps).add_(base)
        nearest, _ = dist.min(dim=-1)
        tied = dist == nearest.unsqueeze(-1)
        pick = torch.where(tied, order_keys, 2.0).argmin(dim=-1)
        near = order.expand(len(block), -1, -1).gather(-1, pick.unsqueeze(-1)).squeeze(-1)
        unsure = (nearest >= bound).nonzero(as_tuple=True)
        if unsure[0].numel():
            near[unsure] = _nearest_in_rows(block, dist_s, response.keys, *unsure)
        numerator, denominator = _conditional_terms(response.ranks, near_s, near)
        scores[start : start + len(block)] = numerator.double() / max(int(denominator), 1)
    return scores


def _nearest_in_rows(
    block: torch.Tensor,
    dist_s: torch.Tensor,
    keys: torch.Tensor,
    cand: torch.Tensor,
    row: torch.Tensor,
) -> torch.Tensor:
    """Nearest other sample of row ``row[m]`` under candidate ``cand[m]`` added to
    ``dist_s``, over all ``n`` samples: ``(m,)`` indices, as ``_nearest`` picks them."""
    winners = torch.empty(len(row), dtype=torch.long)
    step = max(1, _CHUNK_ELEMENTS // block.shape[1])
    for start in range(0, len(row), step):
        c, i = cand[start : start + step], row[start : start + step]
        gaps = block[c] - block[c, i].unsqueeze(-1)  # (m, n): z_j - z_i
        dist = gaps.mul_(gaps).add_(dist_s[i])
        dist[torch.arange(len(i)), i] = float("inf")
        nearest = dist.min(dim=-1).values
        tied = dist == nearest.unsqueeze(-1)
        winners[start : start + step] = torch.where(tied, keys[i], 2.0).argmin(dim=-1)
    return winners


def _response(y: torch.Tensor) -> torch.Tensor:
    if y.dim() != 1 or y.shape[0] < 2:
        raise ValueError(f"y must have shape (n,) with n >= 2; got {tuple(y.shape)}")
    return y.detach().to(device="cpu", dtype=torch.float64).contiguous()


def _columns(t: torch.Tensor, n: int, name: str) -> torch.Tensor:
    t = t.detach().to(device="cpu", dtype=torch.float64)
    if t.dim() == 1:
        t = t.unsqueeze(1)
    if t.dim() != 2 or t.shape[0] != n or t.shape[1] == 0:
        raise ValueError(f"{name} must have shape (n={n},) or (n, d>=1); got {tuple(t.shape)}")
    return t


def _standardized(columns: torch.Tensor) -> torch.Tensor:
    centred = columns - columns.mean(dim=0)
    scale = centred.std(dim=0, unbiased=False)
    return centred / torch.where(scale > 0, scale, torch.ones_like(scale))


def _tie_keys(n: int, seed: int) -> torch.Tensor:
    """Random key of each ordered pair (i, j): the documented nearest-neighbour tie-breaker."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, n), generator=generator, dtype=torch.float64)


def _ranks(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R_i = #{j: y_j <= y_i} and L_i = #{j: y_j >= y_i}, ties counted, as int64 ``(n,)``."""
    ordered = torch.sort(y).values
    at_most = torch.searchsorted(ordered, y, right=True)
    below = torch.searchsorted(ordered, y, right=False)
    return at_most, y.shape[0] - below


def _squared_distances(columns: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise squared distances ``(n, n)`` summed column by column onto ``start``."""
    dist = start
    for k in range(columns.shape[1]):
        dist = _candidate_distances(columns[:, k : k + 1], dist)[0]
    assert dist is not None  # callers pass at least one column
    return dist


def _candidate_distances(
    columns: torch.Tensor, base: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``(c, n, n)``: for each of the ``c`` columns ``(n, c)``, ``base`` plus its squared gaps.

    ``(b_j - b_i)^2`` equals ``(b_i - b_j)^2`` bit for bit (IEEE subtraction is
    antisymmetric), and filling rows from the contiguous side is the fast layout.
    """
    block = columns.T
    dist = torch.sub(block.unsqueeze(-2), block.unsqueeze(-1), out=out)
    dist.mul_(dist)
    if base is not None:
        dist.add_(base)
    return dist


def _nearest(dist: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Nearest other sample of each row: ``(c, n, n)`` distances -> ``(c, n)`` indices.

    Overwrites ``dist``. Among the samples at the minimal distance the smallest key wins.
    """
    inf = float("inf")
    dist.diagonal(dim1=-2, dim2=-1).fill_(inf)
    nearest, winner = dist.min(dim=-1)
    # A tie shows as a second minimum equal to the first; only those rows consult keys,
    # which spares a full comparison pass over the block when ties are rare.
    dist.scatter_(-1, winner.unsqueeze(-1), inf)
    tied = dist.amin(dim=-1) == nearest
    if bool(tied.any()):
        block, row = tied.nonzero(as_tuple=True)
        dist.scatter_(-1, winner.unsqueeze(-1), nearest.unsqueeze(-1))
        candidates = dist[block, row] == nearest[block, row].unsqueeze(-1)
        # Keys lie in [0, 1), so 2 ranks every sample outside the tie last.
        winner[block, row] = torch.where(candidates, keys[row], 2.0).argmin(dim=-1)
    return winner


def _unconditional_terms(
    ranks: torch.Tensor, larger: torch.Tensor, near: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerators ``(c,)`` and the shared denominator of T(y, z) for neighbours ``(c, n)``."""
    n = ranks.shape[0]
    paired = torch.minimum(ranks, ranks[near]).sum(dim=1)
    numerator = n * paired - (larger * larger).sum()
    denominator = (larger * (n - larger)).sum()
    return numerator, denominator


def _conditional_terms(
    ranks: torch.Tensor, near_x: torch.Tensor, near_xz: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerators ``(c,)`` and the shared denominator of T(y, z | x)."""
    baseline = torch.minimum(ranks, ranks[near_x]).sum()
    numerator = torch.minimum(ranks, ranks[near_xz]).sum(dim=1) - baseline
    denominator = ranks.sum() - baseline
    return numerator, denominator
