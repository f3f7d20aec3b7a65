"""The linear solvers behind ``cg`` and ``lissa`` on explicit float64 matrices, their reaction
to an indefinite matrix, and the Lanczos spectrum estimate behind ``damping="auto"``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from utils import assert_close, tiny_transformer

from influx.curvature import (
    NegativeCurvature,
    NonPositiveDefiniteWarning,
    Spectrum,
    conjugate_gradients,
    estimate_spectrum,
    lanczos,
    largest_eigenvalue,
    lissa,
    resolve_damping,
    solve_with_positive_damping,
)
from influx.errors import InfluxValueError

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


def symmetric(eigenvalues: torch.Tensor, generator) -> torch.Tensor:
    size = eigenvalues.numel()
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return (basis * eigenvalues) @ basis.T


@pytest.fixture
def indefinite():
    """A 40 x 40 matrix with 6 eigenvalues in [-0.3, -0.05] below 34 in [0.01, 2]."""
    generator = torch.Generator().manual_seed(1)
    eigenvalues = torch.cat(
        [torch.linspace(-0.3, -0.05, 6), torch.logspace(-2, 0.3, SIZE - 6)]
    ).double()
    rhs = torch.randn(3, SIZE, generator=generator, dtype=torch.float64)
    return symmetric(eigenvalues, generator), eigenvalues, rhs


def _direct(a, rhs, damping):
    return torch.linalg.solve(a + damping * torch.eye(a.shape[0], dtype=a.dtype), rhs.T).T


@pytest.mark.parametrize("solver", ["cg", "lissa"])
def test_solvers_meet_negative_curvature_and_solve_the_raised_damping(indefinite, solver):
    a, eigenvalues, rhs = indefinite
    top = float(eigenvalues.max())
    margin = 0.2

    def solve_at(damping):
        if solver == "cg":
            return conjugate_gradients(
                lambda v: v @ a, rhs, damping=damping, max_iterations=200, tolerance=1e-13
            )[0]
        # scale 10% above the top damped eigenvalue; the damped minimum is >= ~margin once
        # raised, so the error contracts by <= 1 - 0.2 / 2.6 per step: 600 steps reach 1e-20.
        return lissa(
            lambda v: v @ a,
            rhs,
            damping=damping,
            scale=1.1 * (top + damping),
            max_iterations=600,
            tolerance=1e-16,
        )[0]

    # At damping 0.01 the matrix is indefinite: the solver refuses to go on silently.
    with pytest.raises(NegativeCurvature) as met:
        solve_at(0.01)
    # The witness is a Rayleigh quotient of A: between lambda_min and -damping.
    assert float(eigenvalues.min()) - 1e-12 <= met.value.rayleigh <= -0.01
    with pytest.warns(NonPositiveDefiniteWarning, match="damping raised to"):
        solved, damping = solve_with_positive_damping(solve_at, 0.01, margin=margin, what=solver)
    # The system solved is the damped one, positive definite, and solved to full precision
    # (forward error <= cond(A + damping I) ~ 1e2 x the 1e-13 residual).
    assert float(eigenvalues.min()) + damping > 0
    assert damping <= -float(eigenvalues.min()) + margin + 1e-12
    assert_close(solved, _direct(a, rhs, damping), rtol=1e-9, name=f"{solver} raised damping")


def test_a_raise_without_a_margin_lands_a_tenth_above_the_curvature_met(indefinite):
    a, eigenvalues, rhs = indefinite
    met = []

    def solve_at(damping):
        try:
            return conjugate_gradients(
                lambda v: v @ a, rhs, damping=damping, max_iterations=200, tolerance=1e-13
            )[0]
        except NegativeCurvature as error:
            met.append(error.rayleigh)
            raise

    with pytest.warns(NonPositiveDefiniteWarning, match="damping raised to"):
        solved, damping = solve_with_positive_damping(solve_at, 0.01, margin=None, what="cg")
    # Every raise lands at 1.1 |rho| of the direction met; the last one is the damping solved at.
    assert met and damping == pytest.approx(1.1 * abs(met[-1]), rel=1e-15)
    assert_close(solved, _direct(a, rhs, damping), rtol=1e-9, name="cg, margin=None")
    with pytest.raises(InfluxValueError, match="margin must be > 0 or None"):
        solve_with_positive_damping(solve_at, 0.01, margin=0.0, what="cg")


def test_conjugate_gradients_counts_products_and_leaves_zero_rows_at_zero(problem):
    a, rhs, expected, _ = problem
    calls = []

    def operator(v):
        calls.append(v.shape[0])
        return v @ a

    zero = torch.zeros_like(rhs)
    solved, iterations, residual = conjugate_gradients(
        operator, zero, damping=DAMPING, max_iterations=10, tolerance=1e-12
    )
    assert iterations == 0 and not calls and torch.equal(solved, zero) and residual == 0.0
    mixed = torch.cat([rhs[:1], zero[:1]])
    solved, iterations, _ = conjugate_gradients(
        operator, mixed, damping=DAMPING, max_iterations=SIZE + 10, tolerance=1e-12
    )
    assert iterations == len(calls) and torch.equal(solved[1], zero[0])
    assert_close(solved[0], expected[0], rtol=1e-10, name="cg beside a zero row")


def test_positive_definite_problems_keep_their_damping(problem):
    a, rhs, expected, _ = problem
    solve_at = lambda d: conjugate_gradients(
        lambda v: v @ a, rhs, damping=d, max_iterations=SIZE + 10, tolerance=1e-12
    )[0]
    solved, damping = solve_with_positive_damping(solve_at, DAMPING, margin=0.1, what="cg")
    assert damping == DAMPING
    assert_close(solved, expected, rtol=1e-10, name="cg, no raise")


def test_spectrum_estimate_resolves_a_cluster_of_small_negative_eigenvalues():
    """The digits-MLP shape: ~30% of the spectrum in [-1e-3, 0) below a spectrum reaching 2.
    30 Lanczos steps leave lambda_min far too high (the damping then leaves H indefinite); the
    estimate runs until its Ritz residual is 5% of the damping, which bounds the error here."""
    generator = torch.Generator().manual_seed(2)
    size = 300
    eigenvalues = torch.cat(
        [-torch.logspace(-3, -5, 90), torch.logspace(-5, 0.3, size - 90)]
    ).double()
    h = symmetric(eigenvalues, generator)
    block = lambda v: v @ h
    true_damping = -float(eigenvalues.min()) + 0.1 * float(eigenvalues.mean())
    short, _ = lanczos(block, size, iterations=30)
    assert float(short.min()) > 0.5 * float(eigenvalues.min())  # 30 steps: off by > 50%
    spectrum = estimate_spectrum(block, size, trace_samples=64)
    assert spectrum.resolved and spectrum.steps < size
    # the residual margin keeps the estimate at or below lambda_min, within 5% of the damping
    assert spectrum.minimum <= float(eigenvalues.min()) + 1e-12
    assert float(eigenvalues.min()) - spectrum.minimum <= 0.05 * true_damping
    assert spectrum.maximum == pytest.approx(float(eigenvalues.max()), rel=1e-6)


def test_curvature_products_of_a_transformer_match_finite_differences():
    # torch's fused attention has no forward-mode derivative and no double backward on the CPU:
    # the objectives run attention on the math kernel: H v must match finite differences of the
    # gradient, G v be finite and positive semi-definite
    from influx.curvature import batch_objective, ggn_vp, gradient, hvp

    torch.manual_seed(0)
    model = tiny_transformer(tokens=5)
    batch = (torch.randn(4, 5, 8, dtype=torch.float64), torch.randint(0, 3, (4,)))
    loss = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    _, space = batch_objective(model, loss, batch)
    theta = space.current(model)
    v = torch.randn(theta.shape, dtype=torch.float64)
    step = 1e-5
    difference = (
        gradient(model, loss, batch, theta=theta + step * v)
        - gradient(model, loss, batch, theta=theta - step * v)
    ) / (2 * step)
    # central differences in float64: error O(step^2 |g'''|) + O(eps / step), about 1e-9 here
    torch.testing.assert_close(hvp(model, loss, batch, v), difference, rtol=1e-6, atol=1e-8)
    gv = ggn_vp(model, loss, batch, v)
    assert torch.isfinite(gv).all() and float(v @ gv) >= 0  # G is PSD for cross-entropy


@pytest.mark.slow
def test_first_curvature_product_raises_no_warning_from_torch_internals():
    # torch compiles its forward-AD decompositions with the deprecated torch.jit.script on first
    # use; a fresh interpreter shows whether a user would see that warning from an HVP
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('error')\n"
        "from influx import curvature\n"
        "model = torch.nn.Linear(3, 2)\n"
        "loss = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction='none')\n"
        "batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))\n"
        "curvature.hvp(model, loss, batch, torch.ones(8))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def tanh_mlp_hessian() -> torch.Tensor:
    """The dense Hessian (torch.autograd.functional) of a 66-parameter tanh MLP's mean squared
    error: eigenvalues -1.312, -1.222, ... up to 2.376, and a start vector that barely touches
    lambda_min's eigenvector, so the smallest Ritz value rests near lambda_2 for ~12 steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)
    ).double()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    targets = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    numels = [p.numel() for p in model.parameters()]

    def loss(flat):
        state = {n: p.view(s) for n, p, s in zip(names, flat.split(numels), shapes)}
        outputs = torch.func.functional_call(model, state, (inputs,))
        return ((outputs - targets) ** 2).sum(1).mean() / 2

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.autograd.functional.hessian(loss, theta)


def test_a_resolved_minimum_is_not_a_ritz_value_resting_on_lambda_2():
    h = tanh_mlp_hessian()
    eigenvalues = torch.linalg.eigvalsh(h)
    spectrum = estimate_spectrum(lambda v: v @ h, h.shape[0])
    assert spectrum.resolved
    # the margin of the residual keeps the estimate at or below lambda_min (to rounding)...
    assert spectrum.minimum <= float(eigenvalues.min()) + 1e-12
    # ... so 'auto' damping makes H + damping I positive definite
    assert float(eigenvalues.min()) + resolve_damping("auto", spectrum) > 0


@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e-13])
def test_lanczos_explores_a_tiny_curvature_as_far_as_a_unit_one(scale):
    # breakdown is relative to the operator's scale: at 1e-13 an absolute 1e-12 threshold stopped
    # after one step, with 'exact' extremes 2.4x too small
    generator = torch.Generator().manual_seed(0)
    eigenvalues = torch.linspace(-9.0, 7.0, 40, dtype=torch.float64) * scale
    h = symmetric(eigenvalues, generator)
    values, _ = lanczos(lambda v: v @ h, 40, iterations=40)
    assert values.numel() == 40
    # full reorthogonalization in float64: every Ritz value to ~1e-14 of the spectrum's scale
    assert_close(values, eigenvalues, rtol=1e-12, name=f"Ritz values at scale {scale:g}")
    spectrum = estimate_spectrum(lambda v: v @ h, 40)
    assert spectrum.minimum <= float(eigenvalues.min()) * (1 - 1e-12)


def test_zero_iterations_and_infinite_damping_are_refused():
    with pytest.raises(InfluxValueError, match="iterations must be an integer >= 1"):
        lanczos(lambda v: v, 5, iterations=0)
    with pytest.raises(InfluxValueError, match="iterations must be an integer >= 1"):
        estimate_spectrum(lambda v: v, 5, iterations=0)
    for damping in (float("inf"), float("nan"), -1.0):
        with pytest.raises(InfluxValueError, match="damping must be a finite number >= 0"):
            resolve_damping(damping, Spectrum(mean=1.0, maximum=2.0))
