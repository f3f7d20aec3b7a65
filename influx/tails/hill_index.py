"""The Hill estimator of the tail index of |scores| (influx.tails' docstring has the details)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from influx.checks import check_integer
from influx.errors import InfluxValueError
from influx.tails.inputs import check_scores


@dataclass(frozen=True)
class HillEstimate:
    """Hill tail index of |scores|: ``alpha`` at ``k`` upper order statistics, and the whole curve
    ``alphas[k - 1]`` for k = 1..len(alphas) (the stability plot)."""

    k: int
    alpha: float
    stderr: float
    alphas: np.ndarray = field(repr=False)


def hill(scores, k: int | None = None) -> HillEstimate:
    """Hill estimator of the tail index of ``|scores|`` at ``k`` upper order statistics.

    ``k`` must lie in 1 .. (number of nonzero |scores|) - 1; the default round(n^(2/3)) is
    clamped to that range. Warns when the k + 1 largest |scores| are tied (alpha is infinite).
    """
    return hill_estimate(check_scores(scores), k)


def _hill_curve(magnitudes: np.ndarray) -> np.ndarray:
    """``alpha_k`` for k = 1 .. len - 1 from positive magnitudes sorted in decreasing order.

    ``k / alpha_k = sum_{i<=k} (log X_(i) - log X_(k+1)) = sum_{j<=k} j (log X_(j) - log X_(j+1))``:
    a sum of non-negative spacings, exactly 0 (alpha = inf) when the k + 1 largest are tied,
    where the mean of k logs minus the next log would leave rounding noise (alpha ~ 1e15).
    """
    logs = np.log(magnitudes)
    ks = np.arange(1, magnitudes.size)
    with np.errstate(divide="ignore"):
        return ks / np.cumsum(ks * (logs[:-1] - logs[1:]))


def _hill_k(k, n: int, largest: int) -> int:
    if k is None:
        return min(int(round(n ** (2 / 3))), largest)
    k = check_integer("Hill's k (hill_k)", k)
    if not 1 <= k <= largest:
        raise InfluxValueError(
            f"Hill's k (hill_k) must lie in [1, {largest}] (the number of nonzero |scores| "
            f"minus 1); got {k}"
        )
    return k


def hill_estimate(x: np.ndarray, k: int | None) -> HillEstimate:
    magnitudes = np.sort(np.abs(x))[::-1]
    magnitudes = magnitudes[magnitudes > 0]
    if magnitudes.size < 3:
        raise InfluxValueError("fewer than 3 nonzero |scores|: no tail to estimate")
    k = _hill_k(k, x.size, magnitudes.size - 1)
    alphas = _hill_curve(magnitudes)
    alpha = float(alphas[k - 1])
    if np.isinf(alpha):
        tied = int(np.sum(magnitudes == magnitudes[0]))
        problem = (
            f"the {tied} largest |scores| are tied at {magnitudes[0]:g}: the Hill estimate is "
            f"infinite for k < {tied} (got k = {k}); pass hill_k >= {tied}"
            if tied < magnitudes.size
            else f"all {tied} nonzero |scores| equal {magnitudes[0]:g}: the Hill estimate is "
            "infinite at every k (there is no power tail)"
        )
        # stacklevel 3: the user's call of hill() or fit().
        warnings.warn(problem, stacklevel=3)
    return HillEstimate(k=k, alpha=alpha, stderr=alpha / np.sqrt(k), alphas=alphas)
