"""Random projections: inner products preserved within the JL error, reproducible by seed."""

from __future__ import annotations

import math

import pytest
import torch

from expunge.defenses.projection import (
    TILE_ROWS,
    IdentityProjector,
    ProjectionConfig,
    ProjectionKind,
    Projector,
    RandomProjector,
    derive_seed,
)

KINDS: tuple[ProjectionKind, ...] = ("rademacher", "gaussian")
RTOL = 1e-5
ATOL = 1e-6


def _gradients(n: int, p: int, seed: int) -> torch.Tensor:
    """Rows with a shared direction, so the pairs have a spread of cosines, not all ~0."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(p, generator=generator, dtype=torch.float64)
    weights = torch.rand((n, 1), generator=generator, dtype=torch.float64) * 2 - 1
    return weights * common + torch.randn((n, p), generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_inner_products_keep_within_the_jl_error_for_k_1024(kind: ProjectionKind) -> None:
    k, p = 1024, 3000
    g = _gradients(40, p, seed=1)
    projected = RandomProjector(kind, p, k, seed=3, block_size=1000).project(g)
    norms = g.norm(dim=1)
    true = g @ g.T
    estimate = projected @ projected.T
    # Error of <Pa, Pb> in units of |a||b|; its standard deviation is at most
    # sqrt((1 + cos^2) / k) <= sqrt(2 / k) for both kinds.
    error = (estimate - true) / torch.outer(norms, norms)
    cosines = true / torch.outer(norms, norms)
    predicted_rms = torch.sqrt((1 + cosines**2) / k)
    off_diagonal = ~torch.eye(len(g), dtype=torch.bool)
    ratio = (error[off_diagonal] ** 2).mean().sqrt() / predicted_rms[off_diagonal].pow(
        2
    ).mean().sqrt()
    assert 0.7 < float(ratio) < 1.3, "the error does not scale as 1/sqrt(k)"
    assert float(error.abs().max()) < 6 / math.sqrt(k)
    # Squared norms: relative error of order sqrt(2 / k) (Rademacher rows a bit tighter).
    relative = projected.norm(dim=1) ** 2 / norms**2 - 1
    assert float(relative.abs().max()) < 5 * math.sqrt(2 / k)


@pytest.mark.parametrize("kind", KINDS)
def test_projection_is_unbiased_over_seeds(kind: ProjectionKind) -> None:
    k, p, seeds = 64, 300, 400
    g = _gradients(3, p, seed=2)
    true = g @ g.T
    projected = torch.stack(
        [RandomProjector(kind, p, k, seed=s).project(g) for s in range(seeds)]
    )  # (seeds, n, k)
    mean = torch.einsum("snk,smk->nm", projected, projected) / seeds
    scale = torch.outer(g.norm(dim=1), g.norm(dim=1))
    # The mean of `seeds` estimates has error sqrt(2 / (k * seeds)) ~ 0.009 at most.
    assert float(((mean - true) / scale).abs().max()) < 4 * math.sqrt(2 / (k * seeds))


@pytest.mark.parametrize("kind", KINDS)
def test_entries_have_the_stated_distribution(kind: ProjectionKind) -> None:
    k = 512
    matrix = RandomProjector(kind, 2 * TILE_ROWS, k, seed=0).matrix(dtype=torch.float64)
    assert matrix.shape == (2 * TILE_ROWS, k)
    if kind == "rademacher":
        assert torch.all((matrix * math.sqrt(k)).abs() == 1)
    assert abs(float(matrix.mean())) * math.sqrt(k) < 0.01
    assert abs(float((matrix**2).mean()) * k - 1) < 0.02


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_projection_other_seed_other_projection(kind: ProjectionKind) -> None:
    g = _gradients(5, 700, seed=3)
    a = RandomProjector(kind, 700, 32, seed=11).project(g)
    b = RandomProjector(kind, 700, 32, seed=11).project(g)
    c = RandomProjector(kind, 700, 32, seed=12).project(g)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(kind: ProjectionKind) -> None:
    """Blocks of R (and batches of samples) change memory, never results."""
    p, k = 1000, 48  # p not a multiple of the tile or the block
    g = _gradients(9, p, seed=4)
    dense = g @ RandomProjector(kind, p, k, seed=5).matrix(dtype=torch.float64)
    for block_size in (1, TILE_ROWS, 700, 10_000):
        streamed = RandomProjector(kind, p, k, seed=5, block_size=block_size, cache_bytes=0)
        torch.testing.assert_close(streamed.project(g), dense, rtol=RTOL, atol=ATOL)
    cached = RandomProjector(kind, p, k, seed=5)
    by_rows = torch.cat([cached.project(g[:4]), cached.project(g[4:])])
    torch.testing.assert_close(by_rows, dense, rtol=RTOL, atol=ATOL)


def test_rows_depend_on_seed_and_position_only() -> None:
    """A shorter input is a prefix of the same matrix: R does not depend on in_dim."""
    short = RandomProjector("gaussian", 300, 16, seed=9).matrix()
    long = RandomProjector("gaussian", 1000, 16, seed=9).matrix()
    assert torch.equal(short, long[:300])


def test_float32_and_half_inputs_come_back_in_their_dtype() -> None:
    g = _gradients(4, 500, seed=6)
    projector = RandomProjector("rademacher", 500, 32, seed=0)
    reference = projector.project(g)
    out32 = projector.project(g.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), reference, rtol=1e-4, atol=1e-4)
    out16 = projector.project(g.to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16


def test_protocol_and_identity() -> None:
    g = _gradients(3, 20, seed=7)
    identity = IdentityProjector(20)
    assert isinstance(identity, Projector)
    assert isinstance(RandomProjector("gaussian", 20, 4, seed=0), Projector)
    assert identity.project(g) is g
    with pytest.raises(ValueError, match=r"shape \(n, 20\)"):
        identity.project(g[:, :5])


def test_config_round_trip_and_validation() -> None:
    config = ProjectionConfig(kind="gaussian", out_dim=8, seed=4, block_size=300)
    projector = RandomProjector.from_config(config, 50)
    assert projector.config == config and projector.out_dim == 8 and projector.in_dim == 50
    with pytest.raises(ValueError, match="rademacher"):
        ProjectionConfig(kind="sparse")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RandomProjector("gaussian", 0, 4, seed=0)


def test_derived_seeds_differ_by_key_and_seed() -> None:
    seeds = {derive_seed(s, *keys) for s in range(4) for keys in [(), (0,), (1,), (0, 1), (1, 0)]}
    assert len(seeds) == 20
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_projection_matches_cpu(kind: ProjectionKind) -> None:
    g = _gradients(16, 3000, seed=8).float()
    projector = RandomProjector(kind, 3000, 64, seed=1, block_size=1024, cache_bytes=0)
    on_gpu = projector.project(g.cuda())
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), projector.project(g), rtol=1e-4, atol=1e-4)
    # Drawing on the device is reproducible too (a different matrix from the CPU one).
    target = RandomProjector(kind, 3000, 64, seed=1, rng_device="target")
    assert torch.equal(target.project(g.cuda()), target.project(g.cuda()))
