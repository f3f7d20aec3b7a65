"""Unlearning methods behind one signature, compared at equal compute.

``unlearn.<method>(model, loss_fn, forget, retain, *, budget=None, train_compute=None, ...)``
returns an :class:`UnlearnResult` (the unlearned copy, the per-example gradient evaluations spent,
the budget, the options, a trajectory on request). The budget is counted in per-example gradient
evaluations (:mod:`influx.unlearn.budget`); by default it is 10% of ``train_compute`` (Pawelczyk et
al. 2024). No method spends more than its budget: each stops before the step that would exceed it.

- :func:`gradient_ascent`, :func:`fine_tune`, :func:`noisy_gd`, :func:`neggrad_plus`,
  :func:`eu_k`, :func:`cf_k` (:mod:`influx.unlearn.methods`)
- :func:`scrub` (Kurmanji et al. 2023), :func:`ssd` (Foster et al. 2023)
- :func:`newton` (one damped Newton step on the retain loss)
- :func:`retrain` (the oracle; not budgeted, its compute is recorded)
"""

from influx.unlearn.budget import DEFAULT_BUDGET_FRACTION, resolve_budget
from influx.unlearn.loop import StepOptions
from influx.unlearn.methods import (
    cf_k,
    eu_k,
    fine_tune,
    gradient_ascent,
    last_layers,
    neggrad_plus,
    noisy_gd,
)
from influx.unlearn.newton import newton
from influx.unlearn.registry import Methods, UnknownMethodError
from influx.unlearn.result import TrajectoryPoint, UnlearnResult
from influx.unlearn.retrain import reinitialize, retrain
from influx.unlearn.scrub import distillation_kl, scrub
from influx.unlearn.ssd import fisher_diagonal, ssd

# The budgeted methods by name (the retrain oracle is apart: it ignores the budget). A name that
# is not there raises a KeyError naming the closest method and all of them.
METHODS = Methods(
    {
        "gradient_ascent": gradient_ascent,
        "fine_tune": fine_tune,
        "noisy_gd": noisy_gd,
        "neggrad_plus": neggrad_plus,
        "eu_k": eu_k,
        "cf_k": cf_k,
        "scrub": scrub,
        "ssd": ssd,
        "newton": newton,
    }
)

__all__ = [
    "DEFAULT_BUDGET_FRACTION",
    "METHODS",
    "Methods",
    "StepOptions",
    "TrajectoryPoint",
    "UnknownMethodError",
    "UnlearnResult",
    "cf_k",
    "distillation_kl",
    "eu_k",
    "fine_tune",
    "fisher_diagonal",
    "gradient_ascent",
    "last_layers",
    "neggrad_plus",
    "newton",
    "noisy_gd",
    "reinitialize",
    "resolve_budget",
    "retrain",
    "scrub",
    "ssd",
]
