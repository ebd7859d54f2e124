"""The sample-space Gauss-Newton system: float32 factors refined to float64 accuracy, and
the float64 factorisation where float32 cannot resolve the system."""

from __future__ import annotations

import torch

from expunge.defenses.newton.sample_space import _SampleSpaceSystem


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_refinement_reaches_float64_accuracy_from_float32_factors() -> None:
    generator = torch.Generator().manual_seed(3)
    f = torch.randn(40, 100, generator=generator, dtype=torch.float64) * 3.0
    b = torch.randn(40, generator=generator, dtype=torch.float64)
    system = _SampleSpaceSystem(f)
    y = system.solve(b, 1e-3)
    expected = torch.linalg.solve(f @ f.T + 1e-3 * torch.eye(40, dtype=f.dtype), b)
    assert y is not None and y.dtype == torch.float64
    # float32 alone is good to about 1e-6 here; the refinement restores float64.
    assert _relative(y, expected) < 1e-10
    assert system._wide_gram is None, "refinement converged: no float64 Gram matrix formed"


def test_a_system_float32_cannot_resolve_is_factored_in_float64() -> None:
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(10, 60, generator=generator, dtype=torch.float64)
    f = torch.cat([base, base * (1 + 1e-9)])  # every row twice: F F^T is singular
    b = torch.randn(20, generator=generator, dtype=torch.float64)
    gram = f @ f.T
    d = 1e-9 * float(gram.diagonal().max())  # below float32's resolution of F F^T
    system = _SampleSpaceSystem(f)
    y = system.solve(b, d)
    expected = torch.linalg.solve(gram + d * torch.eye(20, dtype=f.dtype), b)
    assert y is not None
    assert system._wide_gram is not None, "float32 could not resolve it: float64 was used"
    assert _relative(system.product(y, d), b) < 1e-6
    assert _relative(y, expected) < 1e-4


def test_a_singular_system_has_no_solution() -> None:
    system = _SampleSpaceSystem(torch.zeros(3, 5, dtype=torch.float64))
    assert system.solve(torch.ones(3, dtype=torch.float64), 0.0) is None
