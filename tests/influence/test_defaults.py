"""cg and lissa at their defaults agree with the exact solve at its default on a nonconvex MLP.

The model is the digits-MLP reference task shrunk (12 hidden units, 300 train examples, 910
parameters): trained to a point where its Hessian is indefinite, as the full task's is. No option
is passed, so the 'auto' damping, the spectrum estimate, the damping raises and the default
preconditioner are what is checked; benchmarks/suites/defaults.py measures the full-size task.
"""

from __future__ import annotations

import warnings

import pytest
from scipy.stats import spearmanr

from benchmarks.tasks import digits_mlp
from influx import influence

# The target of the defaults on nonconvex networks (the full task reaches >= 0.97).
FLOOR = 0.95


@pytest.fixture(scope="module")
def task():
    return digits_mlp(
        seed=1, hidden=12, num_train=300, num_queries=10, steps=200, checkpoint_steps=(200,)
    )


@pytest.fixture(scope="module")
def exact(task):
    fitted = influence.fit(task.model, task.loss_fn, task.train, method="exact")
    return fitted, fitted.scores(task.query).values.double()


@pytest.mark.slow
def test_the_task_is_nonconvex(exact):
    fitted, _ = exact
    # cholesky at 'auto' damping: the Lanczos spectrum of the dense Hessian shows the shift
    assert fitted.diagnostics["spectrum"].minimum < 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cg", "lissa"])
def test_defaults_agree_with_the_exact_solve(task, exact, method):
    _, reference = exact
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        fitted = influence.fit(task.model, task.loss_fn, task.train, method=method)
    scores = fitted.scores(task.query).values.double()
    rho = spearmanr(scores.flatten().numpy(), reference.flatten().numpy()).statistic
    assert rho >= FLOOR, (method, rho, fitted.diagnostics)
