"""Robust aggregation of M gradients (micro-batches, or clients in federated learning).

Each factory returns an :class:`Aggregator`, a callable that maps M gradients to one:

- a stack ``[M, P]`` -> ``[P]``;
- a mapping ``name -> [M, *shape]`` -> ``name -> [*shape]``;
- a sequence of M mappings ``name -> [*shape]`` -> ``name -> [*shape]``.

Mappings are flattened into one vector per gradient (in the first mapping's key order), so
distance-based rules (Krum) see the whole gradient, and coordinate-wise rules treat every entry
alike. Definitions, for gradients ``g_1 .. g_M``:

- ``mean()``: ``(1/M) sum_i g_i``.
- ``coordinate_median()``: per coordinate the median; for even M the mean of the two middle
  values (as ``numpy.median``).
- ``trimmed_mean(beta)``: per coordinate, sort the M values, drop the ``k`` smallest and the ``k``
  largest, average the remaining ``M - 2k`` (Yin et al. 2018). ``k = floor(beta * M)`` for a
  fraction ``0 <= beta < 1/2`` (so at least one value remains), or ``k = count`` given directly
  (which needs ``M > 2 * count``).
- ``krum(f)``: Blanchard et al. 2017. The score of g_i is the sum of squared distances
  ``||g_i - g_j||^2`` to its ``M - f - 2`` closest other gradients; Krum returns the g_i with the
  smallest score (the lowest index among equal scores). Needs ``M > 2f + 2``.
- ``multi_krum(f, m)``: the average of the ``m`` gradients with the smallest Krum scores,
  computed once on all M (ties broken by index). ``m = 1`` is Krum; ``m = M`` is the mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from influx.checks import check_integer, check_number
from influx.errors import InfluxValueError

__all__ = [
    "Aggregator",
    "coordinate_median",
    "krum",
    "krum_scores",
    "mean",
    "multi_krum",
    "trimmed_mean",
]

Gradients = torch.Tensor | Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class Aggregator:
    """A robust aggregation rule: ``rule`` maps a stack [M, P] to [P].

    ``min_inputs`` is the smallest M the rule accepts (callers can check it before any work; the
    rule itself raises on fewer); ``name`` reads like the call that built it.
    """

    name: str
    rule: Callable[[torch.Tensor], torch.Tensor]
    min_inputs: int = 1

    def __call__(self, gradients: Gradients):
        stack, unflatten = _as_stack(gradients)
        return unflatten(self.rule(stack))

    def __repr__(self) -> str:
        return self.name


def _as_stack(gradients: Gradients):
    """(stack [M, P], function mapping a [P] vector back to the input's form)."""
    if isinstance(gradients, torch.Tensor):
        if gradients.dim() != 2:
            raise InfluxValueError(
                f"a stack of gradients must have shape [M, P]; got {tuple(gradients.shape)}"
            )
        _check_finite(gradients)
        return gradients, lambda vector: vector
    if isinstance(gradients, Mapping):
        stacked = dict(gradients)
    elif isinstance(gradients, Sequence) and all(isinstance(g, Mapping) for g in gradients):
        if not gradients:
            raise InfluxValueError("no gradients to aggregate (M = 0)")
        names = list(gradients[0])
        if any(list(g) != names for g in gradients):
            raise InfluxValueError("every gradient mapping must have the same names in one order")
        stacked = {name: torch.stack([g[name] for g in gradients]) for name in names}
    else:
        raise InfluxValueError(
            "gradients must be a tensor [M, P], a mapping name -> [M, *shape] or a sequence of "
            f"mappings name -> tensor; got {type(gradients).__name__}"
        )
    if not stacked:
        raise InfluxValueError("no gradients to aggregate (an empty mapping)")
    unstacked = [name for name, value in stacked.items() if value.dim() == 0]
    if unstacked:
        raise InfluxValueError(
            f"entries {unstacked} are 0-dim: a mapping holds name -> [M, *shape], the M gradients "
            "stacked along dim 0 (pass a sequence of M mappings to aggregate 0-dim parameters)"
        )
    counts = {value.shape[0] for value in stacked.values()}
    if len(counts) != 1:
        raise InfluxValueError(
            f"every entry must stack the same number M of gradients; got {counts}"
        )
    shapes = {name: value.shape[1:] for name, value in stacked.items()}
    stack = torch.cat([_rows(value) for value in stacked.values()], dim=1)
    _check_finite(stack)

    def unflatten(vector: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [math.prod(shape) for shape in shapes.values()]
        parts = vector.split(sizes)
        return {name: part.reshape(shapes[name]) for name, part in zip(shapes, parts)}

    return stack, unflatten


def _rows(value: torch.Tensor) -> torch.Tensor:
    """[M, *shape] -> [M, prod(shape)]. Not ``flatten(1)``: the [M] stack of a 0-dim parameter
    (a learned temperature) has no dim 1."""
    return value.reshape(value.shape[0], math.prod(value.shape[1:]))


def _check_finite(stack: torch.Tensor) -> None:
    if stack.shape[0] == 0:
        raise InfluxValueError("no gradients to aggregate (M = 0)")
    bad = (~torch.isfinite(stack)).any(dim=1).nonzero().flatten()
    if bad.numel():
        raise InfluxValueError(
            f"gradients {bad.tolist()} (of M={stack.shape[0]}) contain NaN or inf: check the "
            "losses of those micro-batches or lower the learning rate"
        )


def mean() -> Aggregator:
    """The plain average ``(1/M) sum_i g_i``."""
    return Aggregator("mean()", lambda stack: stack.mean(0))


def _median(stack: torch.Tensor) -> torch.Tensor:
    ordered = stack.sort(dim=0).values
    m = stack.shape[0]
    # Both middle values (the same one when M is odd), averaged.
    return 0.5 * (ordered[(m - 1) // 2] + ordered[m // 2])


def coordinate_median() -> Aggregator:
    """Per-coordinate median (the mean of the two middle values when M is even)."""
    return Aggregator("coordinate_median()", _median)


def trimmed_mean(beta: float | None = None, *, count: int | None = None) -> Aggregator:
    """Per-coordinate mean after dropping the ``k`` smallest and ``k`` largest values.

    Give ``beta`` (a fraction in [0, 1/2): ``k = floor(beta * M)``) or ``count`` (``k`` itself).
    """
    if (beta is None) == (count is None):
        raise InfluxValueError(
            f"give exactly one of beta (a fraction) and count; got beta={beta!r}, count={count!r}"
        )
    if beta is not None:
        check_number("beta", beta, at_least=0, below=0.5, hint="so that some values remain")
        name = f"trimmed_mean(beta={beta:g})"
    else:
        count = check_integer("count", count, minimum=0)
        name = f"trimmed_mean(count={count})"

    def rule(stack: torch.Tensor) -> torch.Tensor:
        m = stack.shape[0]
        # beta * M can land a rounding error below an integer (0.29 * 100 = 28.999...): nudge it.
        k = count if count is not None else math.floor(beta * m + 1e-9)
        if 2 * k >= m:
            raise InfluxValueError(
                f"{name} drops {k} values from each end of M={m}, leaving none: need M > 2 * count"
            )
        return stack.sort(dim=0).values[k : m - k].mean(0)

    return Aggregator(name, rule, min_inputs=1 if count is None else 2 * count + 1)


def krum_scores(stack: torch.Tensor, f: int) -> torch.Tensor:
    """Krum scores [M] of a stack [M, P]: sum of squared distances to the M - f - 2 closest others.

    Needs ``M > 2f + 2``. Distances are computed from differences (not the Gram expansion), so
    equal gradients are at distance exactly 0 and equal scores stay equal.
    """
    m = stack.shape[0]
    f = _check_f(f, m)
    distances = torch.stack([(stack - stack[i]).square().sum(1) for i in range(m)])  # [M, M]
    # drop the zero distance of each gradient to itself, then keep the closest M - f - 2
    others = distances.masked_fill(torch.eye(m, dtype=torch.bool, device=stack.device), math.inf)
    closest = others.sort(dim=1).values[:, : m - f - 2]
    return closest.sum(1)


def _check_f(f: int, m: int | None = None) -> int:
    f = check_integer("f (the number of Byzantine gradients)", f, minimum=0)
    if m is not None and m <= 2 * f + 2:
        raise InfluxValueError(
            f"Krum with f={f} needs M > 2f + 2 = {2 * f + 2} gradients; got M={m}: "
            "use more micro-batches or a smaller f"
        )
    return f


def krum(f: int) -> Aggregator:
    """The gradient with the smallest Krum score (lowest index among ties). Needs M > 2f + 2."""
    f = _check_f(f)

    def rule(stack: torch.Tensor) -> torch.Tensor:
        return stack[krum_scores(stack, f).argmin()]

    return Aggregator(f"krum(f={f})", rule, min_inputs=2 * f + 3)


def multi_krum(f: int, m: int) -> Aggregator:
    """The mean of the ``m`` gradients with the smallest Krum scores. Needs M > 2f + 2, m <= M."""
    f = _check_f(f)
    m = check_integer("m (the number of gradients averaged)", m, minimum=1)
    name = f"multi_krum(f={f}, m={m})"

    def rule(stack: torch.Tensor) -> torch.Tensor:
        if m > stack.shape[0]:
            raise InfluxValueError(f"{name} averages m={m} of only M={stack.shape[0]} gradients")
        order = krum_scores(stack, f).sort(stable=True).indices
        return stack[order[:m]].mean(0)

    return Aggregator(name, rule, min_inputs=max(2 * f + 3, m))
