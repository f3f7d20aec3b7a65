"""Newton removal solves with the library's conjugate gradients, negative curvature included."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad
from utils import assert_close

from influx import unlearn
from influx.curvature import NonPositiveDefiniteWarning
from influx.errors import InfluxValueError
from influx.train import cross_entropy_per_example as LOSS


def _problem():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(40, 5, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (40,), generator=generator)
    return model, (inputs[:8], targets[:8]), (inputs[8:], targets[8:])


def _damped_newton(model, retain, damping: float) -> torch.Tensor:
    """theta - (H_R + damping I)^-1 grad L_R in float64, from a dense autograd Hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def objective(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return LOSS(functional_call(model, params, (retain[0],)), retain[1]).mean()

    hessian = torch.autograd.functional.hessian(objective, theta)
    hessian += damping * torch.eye(theta.numel(), dtype=theta.dtype)
    return theta - torch.linalg.solve(hessian, grad(objective)(theta))


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.slow
def test_negative_curvature_raises_the_damping_and_the_step_is_the_damped_formula_there():
    model, forget, retain = _problem()
    # At damping 0.05 the retain Hessian of this tanh MLP is indefinite (lambda_min ~ -0.27).
    with pytest.warns(NonPositiveDefiniteWarning, match="newton \\(cg\\).*raised to") as record:
        result = unlearn.newton(model, LOSS, forget, retain, damping=0.05, solver="cg",
                                budget=math.inf, progress=False)  # fmt: skip
    assert record[0].filename == __file__  # the warning points at the user's call
    solved = result.options["solved_damping"]
    # Raised at least above the negative curvature met: past 0.05 + 0.1 * 0.05.
    assert solved > 0.055
    # CG to a 1e-10 relative residual at the raised damping: the dense solve at that damping.
    assert_close(_flat(result.model), _damped_newton(model, retain, solved), rtol=1e-7,
                 name="newton (cg) at the raised damping")  # fmt: skip


@pytest.mark.slow
def test_every_restart_is_charged_to_the_same_budget():
    model, forget, retain = _problem()
    n = retain[0].shape[0]
    budget = n * (1 + 2 * 25)  # the gradient and 25 Hessian-vector products over R
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonPositiveDefiniteWarning)
        result = unlearn.newton(model, LOSS, forget, retain, damping=0.05, solver="cg",
                                budget=budget, progress=False)  # fmt: skip
    assert result.options["iterations"] == 25
    assert result.options["solved_damping"] > 0.05


@pytest.mark.slow
def test_a_positive_definite_solve_keeps_the_damping_and_matches_the_dense_step():
    model, forget, retain = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonPositiveDefiniteWarning)
        result = unlearn.newton(model, LOSS, forget, retain, damping=0.3, solver="cg",
                                budget=math.inf, progress=False)  # fmt: skip
    assert result.options["solved_damping"] == 0.3
    assert_close(_flat(result.model), _damped_newton(model, retain, 0.3), rtol=1e-7, name="newton")


@pytest.mark.parametrize("weight_decay", [True, math.inf, -0.1, "0.1"])
def test_newton_refuses_a_bad_weight_decay_and_solver(weight_decay):
    model, forget, retain = _problem()
    with pytest.raises(InfluxValueError, match="weight_decay must be a finite number >= 0"):
        unlearn.newton(model, LOSS, forget, retain, weight_decay=weight_decay, progress=False)
    with pytest.raises(InfluxValueError, match=r"solver must be one of \('auto', 'dense', 'cg'\)"):
        unlearn.newton(model, LOSS, forget, retain, solver="lu", progress=False)
