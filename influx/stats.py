"""Statistics of experiments repeated over independent seeds: intervals, paired differences, rates.

A finding is a quantity measured once per seed (a GUS z, an accuracy, a cosine). It is reported as
its mean, a 95% interval for that mean and the per-seed values; a comparison of two conditions run
on the same seeds is the per-seed difference (paired), and a test applied in every seed is
summarized by the fraction of seeds in which it rejects, with an exact interval for that fraction.

- :func:`summarize`: mean, Student-t interval of the mean, standard deviation, per-seed values.
- :func:`paired_difference`: the same of ``a - b`` seed by seed, with the paired t-test's and the
  Wilcoxon signed-rank test's two-sided p-values.
- :func:`proportion`: ``k`` of ``n`` with its Clopper-Pearson (exact binomial) interval; used for
  the fraction of significant seeds and for a TPR counted over ``n`` positives.
- :func:`fraction_significant`: how many seeds reject at level ``alpha``.
- :func:`z_test`: one-sided and two-sided p-values and ``|z|`` of an N(0, 1) statistic.
- :func:`summarize_records`: every numeric leaf of a list of per-seed dicts, summarized.

scipy.stats does the distribution work (``t.ppf``, ``ttest_rel``, ``wilcoxon``, ``binomtest``);
this module only fixes one convention for every experiment. Non-finite values are refused: a seed
that produced NaN is a failed run to investigate, not a number to average.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from influx.checks import check_number
from influx.errors import InfluxValueError

__all__ = [
    "Proportion",
    "Summary",
    "fraction_significant",
    "paired_difference",
    "proportion",
    "summarize",
    "summarize_records",
    "z_test",
]


@dataclass(frozen=True)
class Summary:
    """A quantity over seeds: ``mean`` with its ``confidence`` interval ``[low, high]``.

    ``p_value`` is set by :func:`paired_difference` (paired t-test, two-sided) and
    ``wilcoxon_p`` by the signed-rank test on the same differences; both are NaN otherwise.
    With one seed the interval is ``[nan, nan]``: one run says nothing about its spread.
    """

    mean: float
    low: float
    high: float
    sd: float
    n: int
    values: tuple[float, ...]
    confidence: float = 0.95
    p_value: float = math.nan
    wilcoxon_p: float = math.nan

    def to_dict(self) -> dict:
        out = {"mean": self.mean, "low": self.low, "high": self.high, "sd": self.sd, "n": self.n,
               "values": list(self.values)}  # fmt: skip
        if not math.isnan(self.p_value):
            out.update(p_value=self.p_value, wilcoxon_p=self.wilcoxon_p)
        return out

    def __str__(self) -> str:
        return f"{self.mean:.3g} [{self.low:.3g}, {self.high:.3g}]"


@dataclass(frozen=True)
class Proportion:
    """``k`` successes of ``n`` trials, ``rate = k / n``, exact interval ``[low, high]``."""

    k: int
    n: int
    rate: float
    low: float
    high: float
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return {"k": self.k, "n": self.n, "rate": self.rate, "low": self.low, "high": self.high}

    def __str__(self) -> str:
        return f"{self.k}/{self.n} [{self.low:.2f}, {self.high:.2f}]"


def _finite_vector(values: Iterable[float], name: str) -> np.ndarray:
    array = np.asarray([float(v) for v in values], dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise InfluxValueError(f"{name} must be a non-empty sequence of numbers (one per seed)")
    if not np.isfinite(array).all():
        bad = np.flatnonzero(~np.isfinite(array)).tolist()
        raise InfluxValueError(
            f"{name} has non-finite values at positions {bad}; a seed that produced NaN or inf "
            "is a failed run: fix or drop it before summarizing"
        )
    return array


def _check_confidence(confidence: float) -> float:
    confidence = check_number("confidence", confidence)
    if not 0.0 < confidence < 1.0:
        raise InfluxValueError(f"confidence must be in (0, 1), got {confidence}")
    return confidence


def summarize(values: Iterable[float], confidence: float = 0.95) -> Summary:
    """Mean of per-seed ``values`` with its Student-t interval (``mean +- t sd / sqrt(n)``).

    The t interval assumes the seeds are independent draws; it is exact for normal values and
    close for the sums and means that experiments report. A constant vector has a zero-width
    interval.
    """
    confidence = _check_confidence(confidence)
    array = _finite_vector(values, "values")
    n, mean = array.size, float(array.mean())
    if n == 1:
        return Summary(mean, math.nan, math.nan, math.nan, 1, (mean,), confidence)
    sd = float(array.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Summary(mean, mean - half, mean + half, sd, n, tuple(array.tolist()), confidence)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Summary:
    """``a - b`` seed by seed (``a[k]`` and ``b[k]`` come from seed k), summarized, with the
    two-sided p-values of the paired t-test and of the Wilcoxon signed-rank test (NaN with fewer
    than two seeds; the Wilcoxon p is 1 when every difference is 0)."""
    first, second = _finite_vector(a, "a"), _finite_vector(b, "b")
    if first.shape != second.shape:
        raise InfluxValueError(
            f"paired values need one entry per seed on both sides, got {first.size} and "
            f"{second.size}"
        )
    difference = first - second
    summary = summarize(difference, confidence)
    if difference.size < 2:
        return summary
    if np.all(difference == 0):
        t_p = w_p = 1.0
    else:
        t_p = float(stats.ttest_1samp(difference, 0.0).pvalue)
        if math.isnan(t_p):  # constant nonzero differences: the t statistic is infinite
            t_p = 0.0
        w_p = float(stats.wilcoxon(difference).pvalue)
    return Summary(summary.mean, summary.low, summary.high, summary.sd, summary.n,
                   summary.values, confidence, t_p, w_p)  # fmt: skip


def proportion(k: int, n: int, confidence: float = 0.95) -> Proportion:
    """``k`` of ``n`` with the Clopper-Pearson interval (scipy's ``binomtest(...).proportion_ci``).

    Exact, hence conservative: with 0 of 32 positives detected the interval is [0, 0.11], which
    is how much a TPR measured on 32 members can say.
    """
    confidence = _check_confidence(confidence)
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise InfluxValueError(f"a proportion needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    interval = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return Proportion(k, n, k / n, float(interval.low), float(interval.high), confidence)


def fraction_significant(
    p_values: Iterable[float], alpha: float = 0.01, confidence: float = 0.95
) -> Proportion:
    """The fraction of seeds whose test rejects at level ``alpha`` (``p <= alpha``)."""
    alpha = check_number("alpha", alpha)
    if not 0.0 < alpha < 1.0:
        raise InfluxValueError(f"alpha must be in (0, 1), got {alpha}")
    array = _finite_vector(p_values, "p_values")
    return proportion(int((array <= alpha).sum()), array.size, confidence)


def z_test(z: float) -> dict:
    """P-values of a statistic that is N(0, 1) under the null.

    ``p_one_sided = P(N >= z)`` reads "larger than chance" (e.g. poisons still remembered);
    ``p_two_sided = P(|N| >= |z|)`` also flags a statistic driven far below 0 (a model
    anti-correlated with the noise: overshooting, not forgetting). ``abs_z`` is ``|z|``.
    """
    z = float(z)
    return {"z": z, "abs_z": abs(z), "p_one_sided": float(stats.norm.sf(z)),
            "p_two_sided": float(2 * stats.norm.sf(abs(z)))}  # fmt: skip


def summarize_records(records: Sequence[Mapping], confidence: float = 0.95) -> dict:
    """Summaries of every numeric leaf of per-seed dicts that share a structure.

    ``records[k]`` is seed k's result (nested dicts of numbers); the output has the same nesting
    with each number replaced by :meth:`Summary.to_dict`. Booleans are rates (the fraction of
    seeds where it holds, as a :class:`Proportion`); strings, lists and keys missing from some
    records are left out. Non-finite leaves raise, naming their key.
    """
    if not records:
        raise InfluxValueError("summarize_records needs at least one record")

    def walk(nodes: list, path: str):
        first = nodes[0]
        if isinstance(first, Mapping):
            shared = [key for key in first if all(isinstance(n, Mapping) and key in n
                                                   for n in nodes)]  # fmt: skip
            out = {}
            for key in shared:
                value = walk([n[key] for n in nodes], f"{path}.{key}" if path else str(key))
                if value is not None:
                    out[key] = value
            return out
        if all(isinstance(n, bool) for n in nodes):
            return proportion(sum(nodes), len(nodes), confidence).to_dict()
        if all(isinstance(n, (int, float, np.integer, np.floating)) and not isinstance(n, bool)
               for n in nodes):  # fmt: skip
            values = [float(n) for n in nodes]
            if not all(math.isfinite(v) for v in values):
                raise InfluxValueError(f"record key {path!r} has non-finite values {values}")
            return summarize(values, confidence).to_dict()
        return None

    return walk(list(records), "")
