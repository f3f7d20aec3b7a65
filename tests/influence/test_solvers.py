"""The linear solvers behind ``cg`` and ``lissa`` on explicit float64 matrices."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close

from influx.influence.iterative import conjugate_gradients, largest_eigenvalue, lissa

SIZE, DAMPING = 40, 0.05


def spd_matrix(generator, size=SIZE, condition=200.0):
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), size)
    return (basis * eigenvalues.double()) @ basis.T


@pytest.fixture
def problem():
    generator = torch.Generator().manual_seed(0)
    a = spd_matrix(generator)
    rhs = torch.randn(3, SIZE, generator=generator, dtype=torch.float64)
    expected = torch.linalg.solve(a + DAMPING * torch.eye(SIZE, dtype=torch.float64), rhs.T).T
    # An approximate preconditioner: A + damping with its eigenvalues perturbed by up to 2x.
    noise = torch.rand(SIZE, generator=generator, dtype=torch.float64) + 0.5
    values, vectors = torch.linalg.eigh(a)
    approx_inverse = (vectors / (values * noise + DAMPING)) @ vectors.T
    return a, rhs, expected, lambda v: v @ approx_inverse


def test_cg_solves_to_the_tolerance_with_and_without_preconditioner(problem):
    a, rhs, expected, precondition = problem
    # Plain CG is exact after SIZE steps in exact arithmetic; a few more absorb the rounding.
    for preconditioner, cap in ((None, SIZE + 10), (precondition, 25)):
        solved, iterations, residual = conjugate_gradients(
            lambda v: v @ a,
            rhs,
            damping=DAMPING,
            max_iterations=cap,
            tolerance=1e-12,
            preconditioner=preconditioner,
        )
        assert residual <= 1e-12 and iterations < cap, (preconditioner, residual, iterations)
        # Forward error <= condition number (~4 here) x relative residual.
        assert_close(solved, expected, rtol=1e-10, name=f"cg {preconditioner}")


def test_lissa_is_the_neumann_series(problem):
    a, rhs, expected, precondition = problem
    damped = a + DAMPING * torch.eye(SIZE, dtype=torch.float64)
    scale = 1.1 * float(torch.linalg.eigvalsh(damped).max())
    # Three iterations from x_0 = 0 are the first three Neumann terms, sum_j (I - A/s)^j rhs / s.
    step = torch.eye(SIZE, dtype=torch.float64) - damped / scale
    series = sum(torch.linalg.matrix_power(step, j) for j in range(3)) @ rhs.T / scale
    three, iterations = lissa(
        lambda v: v @ a, rhs, damping=DAMPING, scale=scale, max_iterations=3, tolerance=1e-300
    )
    assert iterations == 3
    assert_close(three, series.T, rtol=1e-12, name="3 Neumann terms")
    # Converged: the error contracts by 1 - mu_min / scale ~ 0.93 per iteration.
    solved, _ = lissa(
        lambda v: v @ a, rhs, damping=DAMPING, scale=scale, max_iterations=600, tolerance=1e-15
    )
    assert_close(solved, expected, rtol=1e-10, name="lissa converged")


def test_preconditioned_lissa_converges_faster(problem):
    a, rhs, expected, precondition = problem
    damped = a + DAMPING * torch.eye(SIZE, dtype=torch.float64)
    # M^-1 (A + damping I) has eigenvalues in [1/1.5, 2] here: a scale of 1.1 * 2 suffices.
    preconditioned = lambda v: precondition(v @ damped)
    top = largest_eigenvalue(preconditioned, SIZE, iterations=200, seed=0, dtype=torch.float64)
    exact_top = float(torch.linalg.eigvals(precondition(damped)).real.max())
    assert top == pytest.approx(exact_top, rel=1e-6)
    errors = {}
    for name, preconditioner, scale in (
        ("plain", None, 1.1 * float(torch.linalg.eigvalsh(damped).max())),
        ("ekfac-like", precondition, 1.1 * top),
    ):
        solved, _ = lissa(
            lambda v: v @ a,
            rhs,
            damping=DAMPING,
            scale=scale,
            max_iterations=40,
            tolerance=1e-300,
            preconditioner=preconditioner,
        )
        errors[name] = float((solved - expected).norm() / expected.norm())
    assert errors["ekfac-like"] < 1e-8 < errors["plain"], errors
