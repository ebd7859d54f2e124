"""Gradient indexes against the brute-force oracle: search, deletion, filters, persistence."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from expunge.defenses.index import (
    ExactTorchIndex,
    FaissConfig,
    FaissIndex,
    GradientIndex,
    IndexBudgetError,
    IndexMetadata,
    SearchMode,
    SearchResult,
    TorchCudaIndex,
    check_index_fits,
    estimate_index_cost,
    load_index,
    merge_results,
    recall_at_k,
    recommended_faiss_kind,
)

DIM = 24
ATOL = 1e-4  # float32 dot products of length 24 summed in different orders
META = IndexMetadata(
    dim=DIM,
    embedding_kind="gas",
    projection_kind="rademacher",
    projection_seed=7,
    projection_dim=8,
    checkpoints=3,
    model_version="digits/2",
)

IndexFactory = Callable[[], GradientIndex]
FACTORIES: dict[str, IndexFactory] = {
    "exact": lambda: ExactTorchIndex(DIM, metadata=META),
    "faiss-flat": lambda: FaissIndex(DIM, FaissConfig(kind="flat"), metadata=META),
    # nprobe = nlist visits every list: IVF must then be exact too.
    "faiss-ivf-all-lists": lambda: FaissIndex(
        DIM, FaissConfig(kind="ivf", nlist=16, nprobe=16), metadata=META
    ),
    "torch-fp32": lambda: TorchCudaIndex(DIM, device="cpu", metadata=META, chunk_scores=997),
}


def _random(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids (shuffled, sparse), vectors ``(n, DIM)`` and labels in 0..4."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randperm(10 * n, generator=generator)[:n] + 1000
    vectors = torch.randn((n, DIM), generator=generator)
    labels = torch.randint(0, 5, (n,), generator=generator)
    return ids, vectors, labels


def _clustered(n: int, clusters: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn((clusters, DIM), generator=generator) * 3
    which = torch.randint(0, clusters, (n,), generator=generator)
    return centres[which] + torch.randn((n, DIM), generator=generator)


def _oracle(
    ids: torch.Tensor, vectors: torch.Tensor, labels: torch.Tensor | None = None
) -> ExactTorchIndex:
    index = ExactTorchIndex(DIM)
    index.add(ids, vectors, labels)
    return index


def assert_same_results(got: SearchResult, want: SearchResult, atol: float = ATOL) -> None:
    """Equal scores, and equal ids except where neighbouring scores tie within ``atol``."""
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=atol)
    differ = got.ids != want.ids
    if differ.any():
        gaps = (want.scores[:, 1:] - want.scores[:, :-1]).abs() <= atol
        near_tie = torch.zeros_like(differ)
        near_tie[:, 1:] |= gaps
        near_tie[:, :-1] |= gaps
        assert bool(near_tie[differ].all()), "ids differ where scores do not tie"


def test_the_oracle_is_a_brute_force_sort() -> None:
    ids, vectors, _ = _random(300, seed=0)
    queries = torch.randn((4, DIM), generator=torch.Generator().manual_seed(1))
    result = _oracle(ids, vectors).search(queries, 7)
    scores = (queries.double() @ vectors.double().T).numpy()
    for row in range(4):
        order = np.argsort(-scores[row], kind="stable")[:7]
        assert result.ids[row].tolist() == ids[order].tolist()
        np.testing.assert_allclose(result.scores[row].numpy(), scores[row, order], atol=ATOL)


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("mode", ["proponents", "opponents"])
def test_every_index_equals_the_oracle(name: str, mode: SearchMode) -> None:
    ids, vectors, labels = _random(2000, seed=2)
    index = FACTORIES[name]()
    assert isinstance(index, GradientIndex)
    index.add(ids[:1200], vectors[:1200], labels[:1200])
    index.add(ids[1200:], vectors[1200:], labels[1200:])  # in two batches
    assert len(index) == 2000 and sorted(index.ids().tolist()) == sorted(ids.tolist())
    queries = torch.randn((20, DIM), generator=torch.Generator().manual_seed(3))
    got = index.search(queries, 10, mode)
    want = _oracle(ids, vectors, labels).search(queries, 10, mode)
    assert got.ids.dtype == torch.int64 and got.scores.shape == (20, 10)
    assert_same_results(got, want)
    if mode == "opponents":
        assert bool((got.scores[:, 0] < 0).all()), "opponents come most negative first"


def test_ivf_recall_at_10_on_clustered_data() -> None:
    n = 6000
    vectors = _clustered(n, clusters=30, seed=4)
    ids = torch.arange(n)
    queries = _clustered(50, clusters=30, seed=4)[:50] + 0.1  # same centres, nearby points
    index = FaissIndex(DIM, FaissConfig(kind="ivf", seed=1))  # nlist = sqrt(n), default nprobe
    index.add(ids, vectors)
    assert index.nlist_ == round(n**0.5)
    assert index.nlist_ is not None and index.nprobe < index.nlist_
    truth = _oracle(ids, vectors).search(queries, 10)
    recall = recall_at_k(index.search(queries, 10).ids, truth.ids)
    assert recall >= 0.95, recall


@pytest.mark.parametrize("name", list(FACTORIES))
def test_removed_ids_never_come_back_and_the_rest_equals_the_oracle(name: str) -> None:
    ids, vectors, labels = _random(1500, seed=5)
    index = FACTORIES[name]()
    index.add(ids, vectors, labels)
    gone = ids[::3]
    unknown = torch.tensor([5, 6])  # never added: not counted
    assert index.remove(torch.cat([gone, unknown])) == len(gone)
    assert index.remove(gone) == 0
    assert len(index) == 1500 - len(gone)
    keep = torch.ones(1500, dtype=torch.bool)
    keep[::3] = False
    queries = torch.randn((15, DIM), generator=torch.Generator().manual_seed(6))
    modes: tuple[SearchMode, ...] = ("proponents", "opponents")
    for mode in modes:
        got = index.search(queries, 1500, mode)
        assert not bool(torch.isin(got.ids, gone).any())
        want = _oracle(ids[keep], vectors[keep], labels[keep]).search(queries, 1500, mode)
        assert_same_results(got, want)
    # Removed ids may be added again (e.g. a re-embedded sample).
    index.add(gone[:5], vectors[:5], labels[:5])
    assert len(index) == 1500 - len(gone) + 5


@pytest.mark.parametrize("name", list(FACTORIES))
def test_label_filter_searches_one_class_exactly(name: str) -> None:
    ids, vectors, labels = _random(1000, seed=7)
    index = FACTORIES[name]()
    index.add(ids, vectors, labels)
    index.remove(ids[:100])
    queries = torch.randn((10, DIM), generator=torch.Generator().manual_seed(8))
    oracle = _oracle(ids[100:], vectors[100:], labels[100:])
    modes: tuple[SearchMode, ...] = ("proponents", "opponents")
    for mode in modes:
        got = index.search(queries, 10, mode, label=3)
        label_of = dict(zip(ids.tolist(), labels.tolist(), strict=True))
        assert {label_of[i] for i in got.ids.flatten().tolist()} == {3}
        assert_same_results(got, oracle.search(queries, 10, mode, label=3))
    absent = index.search(queries, 4, label=99)
    assert bool((absent.ids == -1).all()) and bool(torch.isinf(absent.scores).all())


@pytest.mark.parametrize("name", list(FACTORIES))
def test_fewer_than_k_pads_with_minus_one_and_the_worst_score(name: str) -> None:
    ids, vectors, labels = _random(20, seed=9)
    index = FACTORIES[name]()
    if name == "faiss-ivf-all-lists":
        index = FaissIndex(DIM, FaissConfig(kind="ivf", nlist=4, nprobe=4))
    index.add(ids, vectors, labels)
    queries = torch.randn((2, DIM), generator=torch.Generator().manual_seed(10))
    got = index.search(queries, 25)
    assert bool((got.ids[:, 20:] == -1).all()) and bool((got.ids[:, :20] >= 0).all())
    assert bool((got.scores[:, 20:] == -torch.inf).all())
    opponents = index.search(queries, 25, "opponents")
    assert bool((opponents.scores[:, 20:] == torch.inf).all())


@pytest.mark.parametrize("name", list(FACTORIES))
def test_save_and_load_keep_results_and_metadata(name: str, tmp_path: Path) -> None:
    ids, vectors, labels = _random(800, seed=11)
    index = FACTORIES[name]()
    index.add(ids, vectors, labels)
    index.remove(ids[:50])
    queries = torch.randn((6, DIM), generator=torch.Generator().manual_seed(12))
    before = index.search(queries, 10, label=2)
    index.save(tmp_path / "index")
    document = json.loads((tmp_path / "index" / "index.json").read_text())
    assert document["metadata"]["projection_seed"] == 7 and document["count"] == 750
    loaded = load_index(tmp_path / "index")
    assert type(loaded) is type(index)
    assert loaded.metadata == META
    assert loaded.ids().tolist() == index.ids().tolist()
    after = loaded.search(queries, 10, label=2)
    assert torch.equal(after.ids, before.ids) and torch.equal(after.scores, before.scores)
    # The loaded index keeps working: deletion and addition.
    assert loaded.remove(ids[50:60]) == 10
    loaded.add(ids[:5], vectors[:5], labels[:5])
    assert len(loaded) == 745
    # Saved arrays are plain .npy files: no pickle is ever needed to read them.
    for file in (tmp_path / "index").glob("*.npy"):
        np.load(file, allow_pickle=False)


def test_loading_the_wrong_type_or_a_foreign_directory_fails_clearly(tmp_path: Path) -> None:
    ids, vectors, _ = _random(10, seed=13)
    index = ExactTorchIndex(DIM)
    index.add(ids, vectors)
    index.save(tmp_path / "exact")
    with pytest.raises(ValueError, match="use load_index"):
        FaissIndex.load(tmp_path / "exact")
    with pytest.raises(FileNotFoundError, match="not a saved gradient index"):
        load_index(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_torch_index_is_close_to_the_oracle(dtype: torch.dtype) -> None:
    ids, vectors, labels = _random(3000, seed=14)
    index = TorchCudaIndex(DIM, device="cpu", dtype=dtype, chunk_scores=5000)
    index.add(ids, vectors, labels)
    queries = torch.randn((20, DIM), generator=torch.Generator().manual_seed(15))
    got = index.search(queries, 10)
    want = _oracle(ids, vectors).search(queries, 10)
    assert recall_at_k(got.ids, want.ids) >= 0.9
    # Scores are float32 products of the stored (rounded) rows: within rounding of the truth.
    rounded = _oracle(ids, vectors.to(dtype).float()).search(queries, 10)
    assert_same_results(got, rounded, atol=1e-3)
    eps = torch.finfo(dtype).eps
    assert float((got.scores - want.scores).abs().max()) < 10 * eps * DIM**0.5 * 5


def test_torch_index_blocks_of_queries_and_rows_give_the_oracle_answer() -> None:
    """More queries than one block, rows in many small chunks: same results."""
    ids, vectors, labels = _random(500, seed=25)
    queries = torch.randn((1100, DIM), generator=torch.Generator().manual_seed(26))
    index = TorchCudaIndex(DIM, device="cpu", chunk_scores=3000)
    index.add(ids, vectors, labels)
    oracle = _oracle(ids, vectors, labels)
    assert_same_results(index.search(queries, 10), oracle.search(queries, 10))
    assert_same_results(index.search(queries, 7, label=4), oracle.search(queries, 7, label=4))


def test_shard_results_merge_into_the_whole() -> None:
    ids, vectors, _ = _random(900, seed=16)
    shards = [_oracle(ids[i::3], vectors[i::3]) for i in range(3)]
    queries = torch.randn((5, DIM), generator=torch.Generator().manual_seed(17))
    whole = _oracle(ids, vectors)
    modes: tuple[SearchMode, ...] = ("proponents", "opponents")
    for mode in modes:
        parts = [shard.search(queries, 10, mode) for shard in shards]
        assert_same_results(merge_results(parts, 10, mode), whole.search(queries, 10, mode))
    tiny = [
        _oracle(ids[:2], vectors[:2]).search(queries, 4),
        _oracle(ids[2:3], vectors[2:3]).search(queries, 4),
    ]
    merged = merge_results(tiny, 4, "proponents")
    assert bool((merged.ids[:, 3] == -1).all()) and bool((merged.ids[:, :3] >= 0).all())


def test_adds_that_break_the_rules_are_refused_and_change_nothing() -> None:
    ids, vectors, labels = _random(10, seed=18)
    too_few = FACTORIES["faiss-ivf-all-lists"]()
    with pytest.raises(ValueError, match="16 training vectors"):
        too_few.add(ids[:5], vectors[:5], labels[:5])
    assert len(too_few) == 0 and not too_few.ids().numel()
    small_ivf = FaissIndex(DIM, FaissConfig(kind="ivf", nlist=2), metadata=META)
    for index in [FACTORIES[name]() for name in ("exact", "faiss-flat", "torch-fp32")] + [
        small_ivf
    ]:
        index.add(ids[:5], vectors[:5], labels[:5])
        with pytest.raises(ValueError, match="already in the index"):
            index.add(ids[4:6], vectors[4:6], labels[4:6])
        with pytest.raises(ValueError, match="repeat"):
            index.add(ids[[6, 6]], vectors[:2], labels[:2])
        with pytest.raises(ValueError, match=f"shape \\(n, {DIM}\\)"):
            index.add(ids[6:8], vectors[6:8, :3], labels[6:8])
        with pytest.raises(ValueError, match="with labels"):
            index.add(ids[6:8], vectors[6:8])
        with pytest.raises(ValueError, match="NaN"):
            index.add(ids[6:7], torch.full((1, DIM), float("nan")), labels[6:7])
        assert len(index) == 5
        with pytest.raises(ValueError, match="mode"):
            index.search(vectors[:1], 3, "neighbours")  # type: ignore[arg-type]
    unlabelled = ExactTorchIndex(DIM)
    unlabelled.add(ids, vectors)
    with pytest.raises(ValueError, match="built with labels"):
        unlabelled.search(vectors[:1], 3, label=1)
    with pytest.raises(ValueError, match=r"metadata\.dim"):
        ExactTorchIndex(DIM + 1, metadata=META)
    with pytest.raises(ValueError, match="never HNSW"):
        FaissConfig(kind="hnsw")  # type: ignore[arg-type]


def test_cost_estimate_grows_with_size_and_refuses_an_oversize_build() -> None:
    small = estimate_index_cost(10_000, 128, "flat")
    large = estimate_index_cost(1_000_000, 128, "flat")
    assert large.memory_bytes > 99 * small.memory_bytes >= 99 * 10_000 * 128 * 4
    half = estimate_index_cost(1_000_000, 1024, "torch", "float16")
    assert half.memory_bytes < estimate_index_cost(1_000_000, 1024, "torch").memory_bytes
    assert (
        estimate_index_cost(1_000_000, 128, "ivf").build_seconds_estimate
        > large.build_seconds_estimate
    )
    with pytest.raises(IndexBudgetError, match=r"GiB, over the budget"):
        check_index_fits(10_000_000, 1024, "flat", "float32", memory_budget_bytes=8 << 30)
    assert check_index_fits(1000, 16, "exact", "float32", 1 << 20).memory_bytes < 1 << 20
    with pytest.raises(ValueError, match="store float32"):
        estimate_index_cost(10, 4, "flat", "float16")
    # An index with a budget refuses the add that would overflow it, and stays usable.
    ids, vectors, _ = _random(400, seed=19)
    budget = estimate_index_cost(300, DIM, "torch").memory_bytes
    index = TorchCudaIndex(DIM, device="cpu", memory_budget_bytes=budget)
    index.add(ids[:300], vectors[:300])
    with pytest.raises(IndexBudgetError):
        index.add(ids[300:], vectors[300:])
    assert len(index) == 300
    assert recommended_faiss_kind(10_000) == "flat" and recommended_faiss_kind(5_000_000) == "ivf"


def test_faiss_missing_gpu_is_an_actionable_error_when_asked_for() -> None:
    faiss = pytest.importorskip("faiss")
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss has a GPU here")
    ids, vectors, _ = _random(10, seed=20)
    index = FaissIndex(DIM, FaissConfig(use_gpu=True))
    index.add(ids, vectors)
    with pytest.raises(RuntimeError, match="faiss-gpu"):
        index.search(vectors[:1], 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_index_on_cuda_equals_the_oracle(dtype: torch.dtype) -> None:
    ids, vectors, labels = _random(5000, seed=21)
    index = TorchCudaIndex(DIM, device="cuda", dtype=dtype, chunk_scores=20_000)
    index.add(ids, vectors, labels)
    index.remove(ids[:500])
    queries = torch.randn((64, DIM), generator=torch.Generator().manual_seed(22))
    want = _oracle(ids[500:], vectors[500:], labels[500:]).search(queries, 10, label=1)
    got = index.search(queries, 10, label=1)
    if dtype == torch.float32:
        assert_same_results(got, want)
    else:
        assert recall_at_k(got.ids, want.ids) >= 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_faiss_gpu_replica_equals_the_oracle() -> None:
    faiss = pytest.importorskip("faiss")
    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        pytest.skip("faiss has no GPU support here (faiss-cpu)")
    ids, vectors, labels = _random(3000, seed=23)
    index = FaissIndex(DIM, FaissConfig(use_gpu=True))
    index.add(ids, vectors, labels)
    index.remove(ids[:100])
    queries = torch.randn((8, DIM), generator=torch.Generator().manual_seed(24))
    want = _oracle(ids[100:], vectors[100:], labels[100:])
    assert_same_results(index.search(queries, 10), want.search(queries, 10))
    assert_same_results(index.search(queries, 10, label=2), want.search(queries, 10, label=2))
