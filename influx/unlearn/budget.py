"""The unlearning budget, counted in per-example gradient evaluations.

One forward + backward pass of one example costs 1; a mini-batch of B examples costs B. Methods
compared at the same budget have spent the same compute. Pawelczyk et al. (2024) allow unlearning
up to 10% of the compute of training, and so does influx by default: pass ``train_compute`` (the
per-example gradient evaluations of training, ``epochs * N_train`` for plain mini-batch training)
and the budget is ``floor(0.1 * train_compute)``; or pass ``budget`` directly (``math.inf`` for no
limit).

What counts, for every method (conservative where a pass is cheaper than forward + backward):

- a forward + backward of an example: 1 (also when only the last layers receive gradients);
- a forward alone (the SCRUB teacher): 1;
- a Hessian-vector product over an example (forward-over-reverse): 2.
"""

from __future__ import annotations

import math

from influx.checks import check_number, is_real
from influx.errors import InfluxValueError

__all__ = ["DEFAULT_BUDGET_FRACTION", "Meter", "resolve_budget"]

# Pawelczyk et al. (2024) give every unlearning method at most 10% of the training compute.
DEFAULT_BUDGET_FRACTION = 0.1


def resolve_budget(
    budget: float | None,
    train_compute: float | None,
    *,
    fraction: float = DEFAULT_BUDGET_FRACTION,
) -> float:
    """The budget in per-example gradient evaluations: ``budget`` as given, else
    ``floor(fraction * train_compute)``. Exactly one of the two must be given."""
    if budget is not None and train_compute is not None:
        raise InfluxValueError(
            f"give budget or train_compute, not both; got budget={budget!r}, "
            f"train_compute={train_compute!r}"
        )
    if budget is None and train_compute is None:
        raise InfluxValueError(
            "no budget: pass budget= (per-example gradient evaluations, math.inf for no limit) or "
            "train_compute= (the per-example gradient evaluations of training, e.g. epochs * N); "
            f"the default budget is {DEFAULT_BUDGET_FRACTION:g} x train_compute (Pawelczyk et al. 2024)"
        )
    if budget is not None:
        # a number, not a bool or a string: True would be a budget of 1, "100" a typo for 100
        if not (is_real(budget) and budget >= 0):
            raise InfluxValueError(
                f"budget must be a number >= 0 of per-example gradient evaluations (math.inf for "
                f"no limit); got {budget!r}"
            )
        value = float(budget)
        return value if math.isinf(value) else float(math.floor(value))
    compute = check_number("train_compute", train_compute, at_least=0)
    if not 0 < fraction <= 1:
        raise InfluxValueError(f"fraction must lie in (0, 1]; got {fraction!r}")
    return float(math.floor(fraction * compute))


class Meter:
    """Counts the evaluations spent against a budget; a method asks before every step."""

    def __init__(self, budget: float):
        self.budget = budget
        self.spent = 0

    @property
    def remaining(self) -> float:
        return self.budget - self.spent

    def affords(self, cost: int) -> bool:
        return self.spent + cost <= self.budget

    def charge(self, cost: int) -> None:
        if not self.affords(cost):
            # A method must ask first: reaching this is a bug in the method, not bad input.
            raise RuntimeError(f"step of cost {cost} exceeds the remaining budget {self.remaining}")
        self.spent += int(cost)
