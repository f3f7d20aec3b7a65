"""A continuous power-law tail, fitted as Clauset, Shalizi & Newman (2009): x_min by the
smallest KS distance, alpha by maximum likelihood, the semi-parametric bootstrap p-value, and
Vuong's test against the log-normal and exponential tails (influx.tails' docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

from influx.checks import check_integer, check_number
from influx.errors import InfluxValueError
from influx.tails.inputs import check_scores


@dataclass(frozen=True)
class VuongTest:
    """Vuong's non-nested likelihood-ratio test of the power law against ``alternative`` on the
    tail ``x >= x_min``, both fitted to the tail by maximum likelihood (CSN 2009, sec. 5).

    With pointwise ``d_i = log p_power(x_i) - log p_alt(x_i)``: ``ratio = R = sum_i d_i``,
    ``normalized_ratio = R / (sigma sqrt(n_tail))`` with sigma the (ddof 0) standard deviation of
    ``d``, asymptotically N(0, 1) when both fit equally well, and the two-sided
    ``pvalue = erfc(|R| / (sigma sqrt(2 n_tail)))``. R > 0 favours the power law; a large p-value
    means the data cannot tell the two apart. ``params`` are the alternative's tail parameters.
    """

    alternative: str
    params: tuple[float, ...]
    ratio: float
    normalized_ratio: float
    pvalue: float

    @property
    def favours(self) -> str:
        """The family with the larger tail likelihood (whatever the p-value)."""
        return "power_law" if self.ratio > 0 else self.alternative


@dataclass(frozen=True)
class PowerLawFit:
    """Continuous power law ``p(x) = (alpha - 1) / x_min (x / x_min)^-alpha`` for ``x >= x_min``.

    ``alpha`` is the MLE ``1 + n_tail / sum_{x_i >= x_min} log(x_i / x_min)`` with standard
    error ``(alpha - 1) / sqrt(n_tail)``; ``x_min`` minimizes the KS distance ``ks_statistic``
    between the tail and its fit over the candidate values (``candidates``, ``distances``);
    ``ks_pvalue`` is the semi-parametric bootstrap p-value (NaN without bootstrap);
    ``comparisons[name]`` Vuong's test against the log-normal and exponential tails. The survival
    exponent is ``alpha - 1``: ``P(X > x) = (x / x_min)^-(alpha - 1)`` on the tail, the quantity
    the Hill estimator estimates.
    """

    alpha: float
    x_min: float
    n_tail: int
    n: int
    stderr: float
    ks_statistic: float
    ks_pvalue: float
    bootstrap: int
    comparisons: dict[str, VuongTest]
    candidates: np.ndarray = field(repr=False)
    distances: np.ndarray = field(repr=False)

    @property
    def tail_fraction(self) -> float:
        return self.n_tail / self.n

    def sf(self, x) -> np.ndarray:
        """``P(X > x | X >= x_min)`` for ``x >= x_min``."""
        return (np.asarray(x, dtype=np.float64) / self.x_min) ** (1.0 - self.alpha)

    def summary(self) -> dict:
        return {
            "alpha": self.alpha,
            "stderr": self.stderr,
            "x_min": self.x_min,
            "n_tail": self.n_tail,
            "tail_fraction": self.tail_fraction,
            "ks_statistic": self.ks_statistic,
            "ks_pvalue": None if np.isnan(self.ks_pvalue) else self.ks_pvalue,
            "bootstrap": self.bootstrap,
            "comparisons": {
                name: {
                    "params": list(v.params),
                    "ratio": v.ratio,
                    "normalized_ratio": v.normalized_ratio,
                    "pvalue": v.pvalue,
                    "favours": v.favours,
                }
                for name, v in self.comparisons.items()
            },
        }


def _power_law_alpha(tail_logs: np.ndarray, log_x_min: float) -> float:
    """``1 + n / sum log(x / x_min)`` (inf when every tail value equals x_min)."""
    total = float(np.sum(tail_logs - log_x_min))
    return 1.0 + tail_logs.size / total if total > 0 else np.inf


def _power_law_ks(tail_logs: np.ndarray, log_x_min: float, alpha: float) -> float:
    """KS distance between sorted tail values (as logs) and the power law: fitted
    ``F(x) = 1 - (x / x_min)^(1 - alpha)`` against the empirical CDF's steps (as
    ``scipy.stats.kstest``)."""
    m = tail_logs.size
    cdf = -np.expm1((1.0 - alpha) * (tail_logs - log_x_min))
    steps = np.arange(m + 1) / m
    return float(max(np.max(steps[1:] - cdf), np.max(cdf - steps[:-1])))


def _candidate_starts(sorted_x: np.ndarray, min_tail: int, max_candidates: int) -> np.ndarray:
    """Indices (into ascending ``sorted_x``) of the first occurrence of each distinct value that
    leaves at least ``min_tail`` points at or above it; evenly thinned to ``max_candidates``."""
    _, first = np.unique(sorted_x, return_index=True)
    first = first[sorted_x.size - first >= min_tail]
    if first.size > max_candidates:
        first = first[np.linspace(0, first.size - 1, max_candidates).round().astype(int)]
    return first


def _scan_x_min(sorted_x: np.ndarray, min_tail: int, max_candidates: int):
    """CSN's choice of x_min: the candidate whose power-law fit of the tail has the smallest KS
    distance. Returns (index of x_min in sorted_x, alpha, D, candidate values, their D)."""
    logs = np.log(sorted_x)
    starts = _candidate_starts(sorted_x, min_tail, max_candidates)
    distances = np.full(starts.size, np.inf)
    for j, i in enumerate(starts):
        alpha = _power_law_alpha(logs[i:], logs[i])
        if np.isfinite(alpha):
            distances[j] = _power_law_ks(logs[i:], logs[i], alpha)
    if not np.isfinite(distances).any():
        raise InfluxValueError(
            f"no x_min leaves {min_tail} or more distinct-enough tail values: no power law to fit"
        )
    best = int(np.argmin(distances))
    i = int(starts[best])
    return (
        i,
        _power_law_alpha(logs[i:], logs[i]),
        float(distances[best]),
        sorted_x[starts],
        distances,
    )


def _power_law_samples(alpha: float, x_min: float, size: int, rng) -> np.ndarray:
    """Inverse-CDF draws ``x_min (1 - U)^(-1 / (alpha - 1))``."""
    return x_min * (1.0 - rng.random(size)) ** (-1.0 / (alpha - 1.0))


def _fixed_x_min_fit(sorted_x: np.ndarray, x_min: float) -> tuple[int, float, float]:
    """(index of the first value >= x_min, alpha, KS distance) of the tail above a given x_min."""
    start = int(np.searchsorted(sorted_x, x_min, side="left"))
    logs = np.log(sorted_x[start:])
    alpha = _power_law_alpha(logs, float(np.log(x_min)))
    return start, alpha, _power_law_ks(logs, float(np.log(x_min)), alpha)


def _power_law_bootstrap(sorted_x, start, alpha, x_min, observed, draws, rng, refit):
    """CSN's semi-parametric bootstrap p-value of the KS distance: each of ``draws`` samples of
    size n takes Binomial(n, n_tail / n) points from the fitted power law and the rest uniformly
    from the observed values below x_min, and is refitted by ``refit(sorted sample) -> D``
    (the x_min scan included when x_min was chosen); ``p = (1 + #{D_b >= D}) / (draws + 1)``.
    A sample that cannot be refitted (too few distinct tail values) counts as not exceeding."""
    if draws == 0:
        return float("nan")
    n = sorted_x.size
    body = sorted_x[:start]
    exceed = 0
    for _ in range(draws):
        in_tail = n if body.size == 0 else int(rng.binomial(n, (n - start) / n))
        from_body = rng.choice(body, n - in_tail) if in_tail < n else np.empty(0)
        sample = np.sort(np.r_[_power_law_samples(alpha, x_min, in_tail, rng), from_body])
        try:
            exceed += refit(sample) >= observed
        except InfluxValueError:
            continue
    return (1 + exceed) / (draws + 1)


def _truncated_lognormal(tail: np.ndarray, x_min: float) -> tuple[tuple[float, float], np.ndarray]:
    """MLE of the log-normal truncated to ``x >= x_min`` and its pointwise log-density.

    ``log p(x) = -log x - log sigma - log(2 pi) / 2 - (log x - mu)^2 / (2 sigma^2)
    - log P(log X >= log x_min)``. Fitted on ``u = log(x / x_min)`` with ``m = mu - log x_min``
    (scale-free); L-BFGS-B over (m, log sigma) from the moments of u. Returns
    ((mu, sigma), log-densities).
    """
    u = np.log(tail / x_min)
    spread = max(float(u.std()), 1e-12)

    def negative_mean_loglik(theta):
        m, log_sigma = theta
        sigma = np.exp(log_sigma)
        z = (u - m) / sigma
        return float(np.mean(0.5 * z * z) + log_sigma + stats.norm.logsf(-m / sigma))

    bounds = [
        (-1e3 * (1 + spread), 1e3 * (1 + spread)),
        (np.log(1e-6 * spread), np.log(1e6 * spread)),
    ]
    result = optimize.minimize(
        negative_mean_loglik, [float(u.mean()), np.log(spread)], method="L-BFGS-B", bounds=bounds
    )
    m, sigma = float(result.x[0]), float(np.exp(result.x[1]))
    z = (u - m) / sigma
    logpdf = -np.log(tail) - np.log(sigma) - 0.5 * np.log(2 * np.pi) - 0.5 * z * z
    return (m + float(np.log(x_min)), sigma), logpdf - stats.norm.logsf(-m / sigma)


def _truncated_exponential(tail: np.ndarray, x_min: float):
    """MLE of ``p(x) = lambda exp(-lambda (x - x_min))`` on ``x >= x_min``: lambda = 1 / mean
    excess. Returns ((lambda,), log-densities)."""
    rate = 1.0 / float(np.mean(tail - x_min))
    return (rate,), np.log(rate) - rate * (tail - x_min)


def _power_law_logpdf(tail: np.ndarray, alpha: float, x_min: float) -> np.ndarray:
    return np.log(alpha - 1.0) - np.log(x_min) - alpha * np.log(tail / x_min)


def vuong(loglik_a: np.ndarray, loglik_b: np.ndarray) -> tuple[float, float, float]:
    """Vuong's test of pointwise log-likelihoods a against b on the same points:
    (R = sum(a - b), R / (sigma sqrt(n)), two-sided p = erfc(|R| / (sigma sqrt(2 n))));
    sigma is the ddof-0 standard deviation of a - b (as in CSN and the ``powerlaw`` package).
    Identical fits give (0, 0, 1)."""
    difference = np.asarray(loglik_a, dtype=np.float64) - np.asarray(loglik_b, dtype=np.float64)
    ratio, sigma = float(difference.sum()), float(difference.std())
    if sigma == 0:
        return ratio, 0.0, 1.0
    normalized = ratio / (sigma * np.sqrt(difference.size))
    return ratio, normalized, float(2 * stats.norm.sf(abs(normalized)))


def _tail_comparisons(tail: np.ndarray, alpha: float, x_min: float) -> dict[str, VuongTest]:
    power = _power_law_logpdf(tail, alpha, x_min)
    out = {}
    for name, alternative in (("lognormal", _truncated_lognormal),
                              ("exponential", _truncated_exponential)):  # fmt: skip
        params, logpdf = alternative(tail, x_min)
        out[name] = VuongTest(name, params, *vuong(power, logpdf))
    return out


def power_law(
    scores,
    *,
    x_min: float | None = None,
    min_tail: int = 10,
    max_candidates: int = 2000,
    bootstrap: int = 0,
    seed: int = 0,
) -> PowerLawFit:
    """Clauset-Shalizi-Newman fit of a continuous power-law tail to the positive ``scores``.

    ``x_min``: given, or chosen among the distinct values (at most ``max_candidates`` of them,
    each leaving at least ``min_tail`` points above) by the smallest KS distance between the
    tail and its fitted power law. ``bootstrap``: draws of CSN's semi-parametric bootstrap for
    the goodness-of-fit p-value (each refits x_min, so it costs ``bootstrap`` scans). Zeros and
    negative scores are refused: pass the positive part.
    """
    x = check_scores(scores)
    if x.min() <= 0:
        raise InfluxValueError(
            f"a power law needs positive scores; {int(np.sum(x <= 0))} are <= 0: pass "
            "scores[scores > 0]"
        )
    min_tail = check_integer("min_tail", min_tail, minimum=2)
    max_candidates = check_integer("max_candidates", max_candidates, minimum=1)
    bootstrap = check_integer("bootstrap", bootstrap, minimum=0)
    sorted_x = np.sort(x)
    if x_min is None:
        start, alpha, distance, candidates, distances = _scan_x_min(
            sorted_x, min_tail, max_candidates
        )
        x_min = float(sorted_x[start])
        refit = lambda sample: _scan_x_min(sample, min_tail, max_candidates)[2]  # noqa: E731
    else:
        x_min = check_number("x_min", x_min)
        if not 0 < x_min or np.sum(sorted_x >= x_min) < min_tail:
            raise InfluxValueError(
                f"x_min must be positive with at least {min_tail} scores >= it; got {x_min:g}"
            )
        start, alpha, distance = _fixed_x_min_fit(sorted_x, x_min)
        candidates, distances = np.array([x_min]), np.array([distance])
        refit = lambda sample: _fixed_x_min_fit(sample, x_min)[2]  # noqa: E731
    if not np.isfinite(alpha):
        raise InfluxValueError(f"every score >= x_min = {x_min:g} equals it: no power law to fit")
    tail = sorted_x[start:]
    rng = np.random.default_rng(seed)
    pvalue = _power_law_bootstrap(sorted_x, start, alpha, x_min, distance, bootstrap, rng, refit)
    return PowerLawFit(
        alpha=float(alpha),
        x_min=x_min,
        n_tail=int(tail.size),
        n=int(x.size),
        stderr=float((alpha - 1) / np.sqrt(tail.size)),
        ks_statistic=distance,
        ks_pvalue=pvalue,
        bootstrap=bootstrap,
        comparisons=_tail_comparisons(tail, alpha, x_min),
        candidates=candidates,
        distances=distances,
    )
