"""Combining results: the merge of per-shard top-k lists and recall against an oracle."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .protocol import SearchMode, SearchResult, _check_search, _empty_result, _padding


def merge_results(results: Sequence[SearchResult], k: int, mode: SearchMode) -> SearchResult:
    """Top ``k`` of the per-shard results of the same queries (ids disjoint across shards)."""
    _check_search(k, mode)
    if not results:
        raise ValueError("nothing to merge")
    ids = torch.cat([r.ids for r in results], dim=1)
    scores = torch.cat([r.scores for r in results], dim=1)
    # Padding already carries the worst score for the mode; ranking it by the key below
    # keeps it last even against real scores equal to +-inf.
    key = scores if mode == "proponents" else -scores
    key = key.masked_fill(ids < 0, -math.inf)
    take = min(k, ids.shape[1])
    _, where = key.topk(take, dim=1)
    merged = _empty_result(ids.shape[0], k, mode)
    merged.ids[:, :take] = ids.gather(1, where)
    merged.scores[:, :take] = scores.gather(1, where)
    merged.scores[merged.ids < 0] = _padding(mode)
    return merged


def recall_at_k(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean share of each query's true top-k ids ``(q, k)`` that ``found`` ``(q, k')`` holds."""
    if found.shape[0] != truth.shape[0]:
        raise ValueError("found and truth must have one row per query")
    hits = 0
    total = 0
    for got, want in zip(found.tolist(), truth.tolist(), strict=True):
        wanted = {i for i in want if i >= 0}
        hits += len(wanted & set(got))
        total += len(wanted)
    return hits / total if total else 1.0
