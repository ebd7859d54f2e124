"""Multi-shift Krylov solves against plain conjugate gradient and exact solves."""

from __future__ import annotations

import pytest
import torch

from expunge.defenses.newton.solvers import _ShiftedKrylov


def _plain_cg(a: torch.Tensor, b: torch.Tensor, iterations: int) -> torch.Tensor | None:
    """Textbook CG on A x = b (the reference): None on non-positive curvature."""
    x, r = torch.zeros_like(b), b.clone()
    d, rs = r.clone(), float(r @ r)
    for _ in range(iterations):
        if rs <= 1e-40:
            break
        ad = a @ d
        curvature = float(d @ ad)
        if curvature <= 0:
            return None
        alpha = rs / curvature
        x, r = x + alpha * d, r - alpha * ad
        rs_new = float(r @ r)
        d, rs = r + (rs_new / rs) * d, rs_new
    return x


def _matrix(p: int, smallest: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=generator, dtype=torch.float64))
    values = torch.linspace(smallest, 5.0, p, dtype=torch.float64)
    return (q * values) @ q.T


@pytest.mark.parametrize("iterations", [3, 6, 20])
@pytest.mark.parametrize("mu", [0.0, 0.1, 10.0])
def test_every_shift_equals_conjugate_gradient_on_the_shifted_system(
    iterations: int, mu: float
) -> None:
    h = _matrix(20, 0.05, seed=0)
    b = torch.randn(20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    krylov = _ShiftedKrylov(lambda v: h @ v, b, iterations, 1e-12)
    shifted = h + mu * torch.eye(20, dtype=torch.float64)
    got = krylov.solve(mu)
    expected = _plain_cg(shifted, b, iterations)
    assert got is not None and expected is not None
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    if iterations == 20:  # the whole space: the exact solution
        torch.testing.assert_close(got, torch.linalg.solve(shifted, b), rtol=1e-8, atol=1e-10)
    # The ratio test's curvature, without another Hessian-vector product.
    assert krylov.curvature(got) == pytest.approx(float(got @ h @ got), rel=1e-9)
    if iterations < 20:  # a step outside the Krylov space needs its own product
        assert krylov.curvature(torch.ones(20, dtype=torch.float64)) is None


def test_negative_curvature_is_refused_until_the_damping_lifts_it() -> None:
    h = _matrix(12, -1.0, seed=2)  # eigenvalues from -1 to 5
    b = torch.randn(12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    krylov = _ShiftedKrylov(lambda v: h @ v, b, 12, 1e-12)
    assert krylov.solve(0.0) is None and _plain_cg(h, b, 12) is None
    lifted = 2.0
    got = krylov.solve(lifted)
    assert got is not None
    shifted = h + lifted * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(got, torch.linalg.solve(shifted, b), rtol=1e-8, atol=1e-10)


def test_a_zero_right_hand_side_is_a_zero_step() -> None:
    krylov = _ShiftedKrylov(lambda v: v, torch.zeros(4, dtype=torch.float64), 5, 1e-12)
    assert torch.equal(krylov.solve(0.0), torch.zeros(4, dtype=torch.float64))
