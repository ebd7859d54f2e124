"""Seeded random projections of per-sample gradients (DESIGN 4.9).

A projection maps gradients ``g`` ``(n, p)`` to ``g @ R`` ``(n, k)`` with ``R`` a ``(p, k)``
matrix of independent entries, ``+-1/sqrt(k)`` (Rademacher) or ``N(0, 1/k)`` (Gaussian),
so that ``E[<g_a R, g_b R>] = <g_a, g_b>`` (Johnson-Lindenstrauss: the relative error of
an inner product is of order ``1/sqrt(k)``).

``R`` is never held whole unless it is small: it is generated in *tiles* of
``TILE_ROWS`` rows, tile ``j`` from its own ``torch.Generator`` seeded with
``derive_seed(seed, j)``. Row ``r`` of ``R`` therefore depends only on
``(kind, out_dim, seed, r)``: not on ``in_dim``, on the block size used to apply it, on
how many samples are projected at once, or on which process projects them. That is
what lets a shard of the training set be featurised anywhere (DESIGN 8) and a test
input be projected later with the same matrix, from the seed alone.

Tiles are drawn on the CPU by default, so CPU and CUDA projections use the same ``R``.
``rng_device="target"`` draws them on the device of the gradients (faster on a GPU),
which ties ``R`` to the device type: every side of a comparison must then use the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

__all__ = [
    "TILE_ROWS",
    "IdentityProjector",
    "ProjectionConfig",
    "ProjectionKind",
    "Projector",
    "RandomProjector",
    "derive_seed",
]

ProjectionKind = Literal["rademacher", "gaussian"]

# Rows of R drawn from one generator. Part of the definition of R (changing it changes
# every projection ever stored), so it is a constant, not a setting. 256 rows keep the
# per-generator set-up cost (~10 us) small next to drawing 256 * k numbers.
TILE_ROWS = 256

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for a sub-stream keyed by ``keys`` (SplitMix64 finaliser, chained).

    Plain ``seed + key`` would make ``(seed=1, key=0)`` and ``(seed=0, key=1)`` share a
    stream; mixing the seed before each key keeps sub-streams of different seeds and
    keys unrelated, and the key count ends the chain so ``(s,)`` and ``(s, 0)`` differ.
    """
    state = _splitmix(seed & _MASK64)
    for key in (*keys, len(keys)):
        state = _splitmix((state + 0x9E3779B97F4A7C15 + (key & _MASK64)) & _MASK64)
    return state >> 1  # torch.Generator.manual_seed takes a non-negative int64


def _splitmix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@runtime_checkable
class Projector(Protocol):
    """Maps gradients ``(n, in_dim)`` to ``(n, out_dim)``, preserving inner products in expectation."""

    @property
    def in_dim(self) -> int: ...

    @property
    def out_dim(self) -> int: ...

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        """``(n, in_dim)`` -> ``(n, out_dim)`` on the device and in the dtype of the input."""
        ...


@dataclass(frozen=True)
class ProjectionConfig:
    """What defines a random projection besides its input size; stored beside the index."""

    kind: ProjectionKind = field(
        default="rademacher", metadata={"help": "rademacher (+-1/sqrt(k)) or gaussian (N(0, 1/k))"}
    )
    out_dim: int = field(default=256, metadata={"help": "k, the projected dimension"})
    seed: int = field(default=0, metadata={"help": "seeds every tile of the matrix"})
    block_size: int = field(
        default=8192,
        metadata={"help": "input rows of R generated and applied at once (memory, not results)"},
    )
    rng_device: Literal["cpu", "target"] = field(
        default="cpu",
        metadata={"help": "cpu: one R everywhere; target: draw on the gradients' device"},
    )
    cache_bytes: int = field(
        default=256 << 20,
        metadata={"help": "keep R on the device once drawn when it is at most this large"},
    )

    def __post_init__(self) -> None:
        if self.kind not in ("rademacher", "gaussian"):
            raise ValueError(
                f"projection kind must be 'rademacher' or 'gaussian', got {self.kind!r}"
            )
        if self.out_dim < 1 or self.block_size < 1:
            raise ValueError("out_dim and block_size must be positive")
        if self.rng_device not in ("cpu", "target"):
            raise ValueError("rng_device must be 'cpu' or 'target'")
        if self.cache_bytes < 0:
            raise ValueError("cache_bytes must be >= 0")


class IdentityProjector:
    """No projection (``k = p``): the exact reference for tests and for tiny models."""

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError("dim must be positive")
        self._dim = dim

    @property
    def in_dim(self) -> int:
        return self._dim

    @property
    def out_dim(self) -> int:
        return self._dim

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        """``(n, p)`` -> the same ``(n, p)`` tensor."""
        _check_input(gradients, self._dim)
        return gradients


class RandomProjector:
    """Chunked seeded random projection ``g -> g @ R``, ``R`` of shape ``(in_dim, out_dim)``.

    The projection runs in ``block_size``-row blocks of ``R``, so at most
    ``block_size * out_dim`` entries of ``R`` exist at once, unless the whole of ``R``
    fits in ``cache_bytes``; then it is drawn once per device and dtype and kept.
    """

    def __init__(
        self,
        kind: ProjectionKind,
        in_dim: int,
        out_dim: int,
        seed: int,
        block_size: int = 8192,
        *,
        rng_device: Literal["cpu", "target"] = "cpu",
        cache_bytes: int = 256 << 20,
    ) -> None:
        config = ProjectionConfig(kind, out_dim, seed, block_size, rng_device, cache_bytes)
        if in_dim < 1:
            raise ValueError("in_dim must be positive")
        self.config = config
        self._in_dim = in_dim
        # A whole number of tiles per block, so a block never splits a tile.
        self._block_rows = TILE_ROWS * math.ceil(block_size / TILE_ROWS)
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def from_config(cls, config: ProjectionConfig, in_dim: int) -> RandomProjector:
        """The projector that ``config`` describes for gradients of ``in_dim`` entries."""
        return cls(
            config.kind,
            in_dim,
            config.out_dim,
            config.seed,
            config.block_size,
            rng_device=config.rng_device,
            cache_bytes=config.cache_bytes,
        )

    @property
    def in_dim(self) -> int:
        return self._in_dim

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        """``(n, in_dim)`` -> ``(n, out_dim)``, on the input's device.

        float64 inputs are projected in float64; everything else accumulates in float32
        (half-precision sums over millions of coordinates lose the signal) and is cast
        back to the input dtype.
        """
        _check_input(gradients, self._in_dim)
        compute = torch.float64 if gradients.dtype == torch.float64 else torch.float32
        g = gradients.to(compute)
        device = g.device
        cached = self._cached_matrix(device, compute)
        if cached is not None:
            return (g @ cached).to(gradients.dtype)
        out = torch.zeros((g.shape[0], self.out_dim), dtype=compute, device=device)
        for start in range(0, self._in_dim, self._block_rows):
            stop = min(start + self._block_rows, self._in_dim)
            out.addmm_(g[:, start:stop], self.rows(start, stop, device, compute))
        return out.to(gradients.dtype)

    def rows(
        self,
        start: int,
        stop: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Rows ``start:stop`` of ``R``: ``(stop - start, out_dim)``; ``start`` a tile boundary."""
        if start % TILE_ROWS or not 0 <= start <= stop <= self._in_dim:
            raise ValueError(f"bad row range {start}:{stop} for in_dim={self._in_dim}")
        device = torch.device(device)
        rng_device = device if self.config.rng_device == "target" else torch.device("cpu")
        tiles = [
            self._tile(index, min(TILE_ROWS, stop - index * TILE_ROWS), rng_device)
            for index in range(start // TILE_ROWS, math.ceil(stop / TILE_ROWS))
        ]
        block = torch.cat(tiles) if tiles else torch.zeros((0, self.out_dim))
        # Scaled after the cast, so float64 entries are exactly +-1/sqrt(k) in float64.
        return block.to(device=device, dtype=dtype) * (1.0 / math.sqrt(self.out_dim))

    def matrix(
        self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The whole of ``R``, ``(in_dim, out_dim)``: for tests and small models only."""
        return self.rows(0, self._in_dim, device, dtype)

    def _tile(self, index: int, rows: int, device: torch.device) -> torch.Tensor:
        """Tile ``index`` of ``sqrt(k) R``: its first ``rows`` rows, ``(rows, k)`` float32.

        The full tile is always drawn, so a truncated last tile holds the same numbers as
        the corresponding rows of a longer matrix.
        """
        generator = torch.Generator(device=device)
        generator.manual_seed(derive_seed(self.config.seed, index))
        k = self.out_dim
        if self.config.kind == "rademacher":
            signs = torch.randint(0, 2, (TILE_ROWS, k), generator=generator, device=device)
            tile = (signs * 2 - 1).to(torch.float32)
        else:
            tile = torch.randn((TILE_ROWS, k), generator=generator, device=device)
        return tile[:rows]

    def _cached_matrix(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        size = self._in_dim * self.out_dim * torch.finfo(dtype).bits // 8
        if size > self.config.cache_bytes:
            return None
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = self.matrix(device, dtype)
        return self._cache[key]


def _check_input(gradients: torch.Tensor, in_dim: int) -> None:
    if gradients.ndim != 2 or gradients.shape[1] != in_dim:
        raise ValueError(f"expected gradients of shape (n, {in_dim}), got {tuple(gradients.shape)}")
    if not gradients.is_floating_point():
        raise TypeError(f"gradients must be floating point, got {gradients.dtype}")
