"""Matrix-free solvers and TRAK against closed forms, with assert_close in float64.

Rank correlations forgive a constant factor in the curvature or the damping; these comparisons do
not: a 1% error anywhere fails them (checked by the last test).
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_close

from influx import influence
from influx.grads.functional import naive_per_sample_grads
from influx.grads.projection import gaussian_matrix

# H + 0.5 I is positive definite on the tiny MLP (its lowest Hessian eigenvalue is about -0.04).
DAMPING = 0.5
SOLVERS = {
    # cg: relative residual 1e-13 and cond(H + 0.5 I) < 1e2 bound the forward error by ~1e-11.
    "cg": ({"max_iterations": 300, "tolerance": 1e-13}, 1e-9),
    # lissa: contracts by 1 - mu_min / scale < 0.9 per step; 300 steps leave < 1e-13 of the error.
    "lissa": ({"max_iterations": 300, "tolerance": 1e-15}, 1e-8),
    # arnoldi at full rank (57 = P) with full reorthogonalization is an eigendecomposition.
    "arnoldi": ({"rank": 57, "lanczos_iterations": 57}, 1e-8),
}


def flat_grads(model, loss_fn, data):
    grads = naive_per_sample_grads(model, loss_fn, *data)
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


@pytest.fixture(scope="module")
def exact_scores(tiny_mlp):
    model, loss_fn, train, query = tiny_mlp
    fitted = influence.fit(model, loss_fn, train, method="exact", damping=DAMPING, solver="eigh")
    return fitted.scores(query).values


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SOLVERS))
def test_solver_scores_equal_the_exact_solve(tiny_mlp, exact_scores, method):
    model, loss_fn, train, query = tiny_mlp
    options, rtol = SOLVERS[method]
    fitted = influence.fit(model, loss_fn, train, method=method, damping=DAMPING, **options)
    assert_close(fitted.scores(query).values, exact_scores, rtol=rtol, name=method)


def test_a_one_percent_damping_error_fails_the_comparison(tiny_mlp, exact_scores):
    model, loss_fn, train, query = tiny_mlp
    options, rtol = SOLVERS["cg"]
    off = influence.fit(model, loss_fn, train, method="cg", damping=1.01 * DAMPING, **options)
    with pytest.raises(AssertionError, match="max abs err"):
        assert_close(off.scores(query).values, exact_scores, rtol=rtol, name="cg, damping +1%")


def test_trak_scores_follow_their_formula(tiny_mlp):
    """-(1/T) sum_t phi_t(q)^T (Phi_t^T Phi_t / N + d_t I)^-1 phi_t(z), d_t = 0.1 tr(F_t) / K."""
    model, loss_fn, train, query = tiny_mlp
    dim, seed = 16, 3
    other = {k: v + 0.05 for k, v in model.state_dict().items()}
    fitted = influence.fit(
        model, loss_fn, train, method="trak", dim=dim, seed=seed,
        checkpoints=[model.state_dict(), other],
    )  # fmt: skip
    shifted = torch.nn.Sequential(
        torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    shifted.load_state_dict(other)
    expected = 0
    for t, at in enumerate((model, shifted)):
        g_train, g_query = flat_grads(at, loss_fn, train), flat_grads(at, loss_fn, query)
        # the seeding rule: one N(0, 1/K) block per 4,096 parameter columns, named by its start
        projection = gaussian_matrix(
            dim, g_train.shape[1], seed=seed + t, name="dense:0", dtype=torch.float64, device="cpu"
        )
        phi, phi_q = g_train @ projection.T, g_query @ projection.T
        fisher = phi.T @ phi / phi.shape[0]
        damping = 0.1 * torch.trace(fisher) / dim
        assert fitted.diagnostics["damping"][t] == pytest.approx(float(damping), rel=1e-12)
        inverse = torch.linalg.inv(fisher + damping * torch.eye(dim, dtype=torch.float64))
        expected = expected - phi_q @ inverse @ phi.T / 2
    # float64 throughout; the 16 x 16 solve is well conditioned (damping = 10% of the mean
    # eigenvalue), so the two orders of summation agree to ~1e-13.
    assert_close(fitted.scores(query).values, expected, rtol=1e-10, name="trak formula")
