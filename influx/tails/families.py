"""The laws fitted to a score distribution (influx.tails' docstring has the details).

Maximum-likelihood fits of each family (closed forms where they exist; t and Cauchy on
standardized scores, so that every fit is scale-equivariant), the detection of fits collapsed
onto tied scores, parametric-bootstrap Kolmogorov-Smirnov p-values and the nested
likelihood-ratio tests (t vs normal, t vs Cauchy).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

FAMILIES = {
    "normal": stats.norm,
    "laplace": stats.laplace,
    "t": stats.t,
    "cauchy": stats.cauchy,
    "stable": stats.levy_stable,
    "lognormal": stats.lognorm,
    "gamma": stats.gamma,
    "exponential": stats.expon,
}
# The default families of each support (see choose_support): laws on the real line for signed
# scores, laws on (0, inf) (location fixed at 0) for non-negative ones.
SYMMETRIC_FAMILIES = ("normal", "laplace", "t", "cauchy")
POSITIVE_FAMILIES = ("lognormal", "gamma", "exponential")
# Indices of the parameters that must stay positive (optimized on the log scale).
_POSITIVE = {"t": (0, 2), "cauchy": (1,), "stable": (3,)}
# t and Cauchy are fitted on standardized scores (units of a robust spread). Their scale is kept
# above _SCALE_FLOOR: tied scores make these likelihoods grow without bound as the scale shrinks
# onto the tied value, and a fitted scale below _COLLAPSED_SCALE marks such a fit. nu = 1e12
# stands for the normal limit.
_SCALE_FLOOR, _COLLAPSED_SCALE = 1e-8, 1e-6
_NU_BOUNDS = (1e-3, 1e12)
_BOUNDS = {
    "t": (_NU_BOUNDS, (-np.inf, np.inf), (_SCALE_FLOOR, np.inf)),
    "cauchy": ((-np.inf, np.inf), (_SCALE_FLOOR, np.inf)),
}
# Bootstrap samples are drawn in blocks of at most this many numbers (memory bound: 160 MB).
_BLOCK_ELEMENTS = 2 * 10**7


@dataclass(frozen=True)
class FamilyFit:
    """One family's maximum-likelihood fit: ``params`` is scipy's tuple (shape(s), loc, scale).

    ``degenerate``: the fit collapsed onto tied scores, where its likelihood is unbounded (module
    docstring); it is left out of model selection and the tests, and gets no bootstrap p-value.
    """

    name: str
    params: tuple[float, ...]
    loglik: float
    aic: float
    bic: float
    ks_statistic: float
    ks_pvalue: float
    degenerate: bool = False

    @property
    def dist(self):
        """The fitted law as a frozen ``scipy.stats`` distribution."""
        return FAMILIES[self.name](*self.params)

    @property
    def num_params(self) -> int:
        """Free parameters: the location of the positive families is fixed at 0."""
        return len(self.params) - (self.name in POSITIVE_FAMILIES)


@dataclass(frozen=True)
class LikelihoodRatioTest:
    """``statistic = 2 (ll_alternative - ll_null)``; ``reference`` names the null law of it."""

    null: str
    alternative: str
    statistic: float
    pvalue: float
    reference: str


def _log_scale_optimizer(positive: Sequence[int], bounds: Sequence[tuple[float, float]]):
    """A scipy ``fit`` optimizer: L-BFGS-B over the parameters with ``positive`` ones on log scale,
    each kept within its ``bounds`` (natural units; ``(-inf, inf)`` for none).

    Nelder-Mead (scipy's default) crawls in nu for near-normal data; L-BFGS-B from a sensible
    start on standardized data is several times faster and at least as likely (tests check it).
    """
    positive = list(positive)
    lower, upper = np.array(bounds, dtype=np.float64).T
    with np.errstate(divide="ignore"):  # log(0) = -inf: no bound
        lower[positive], upper[positive] = np.log(lower[positive]), np.log(upper[positive])

    def to_natural(u):
        theta = np.array(u, dtype=np.float64)
        theta[positive] = np.exp(np.clip(theta[positive], -700, 700))
        return theta

    def run(func, x0, args=(), disp=0):
        u0 = np.array(x0, dtype=np.float64)
        u0[positive] = np.log(u0[positive])
        res = optimize.minimize(
            lambda u: func(to_natural(u), *args),
            np.clip(u0, lower, upper),
            method="L-BFGS-B",
            bounds=optimize.Bounds(lower, upper),
        )
        return to_natural(res.x)

    return run


def _centre_and_spread(x: np.ndarray) -> tuple[float, float]:
    """Median and a robust spread (half the interquartile range) of ``x``.

    More than half the scores tied make the interquartile range 0; the mean absolute deviation
    from the median is positive whenever the scores are not all equal.
    """
    centre = float(np.median(x))
    q1, q3 = np.quantile(x, [0.25, 0.75])
    spread = 0.5 * float(q3 - q1)
    if spread <= 0:
        spread = float(np.mean(np.abs(x - centre)))
    return centre, spread


def _standard_start(name: str, start: tuple[float, ...] | None, centre: float, spread: float):
    """Starting (shapes, loc, scale) on the standardized scale: ``start`` (data units) mapped
    there, else robust values (the quartiles of the standardized data are about -1 and 1)."""
    if start is not None:
        *shapes, loc, scale = start
        return tuple(shapes), (loc - centre) / spread, scale / spread
    if name == "t":
        return (4.0,), 0.0, 1.0 / stats.t.ppf(0.75, 4.0)
    return (), 0.0, 1.0


def _t_normal_limit(z: np.ndarray, fitted: tuple[float, ...]) -> tuple[float, ...]:
    """The better of the t fit and the normal limit nu -> inf (nu at its upper bound, normal
    mean and standard deviation): L-BFGS-B stalls as the likelihood flattens in nu, short of a
    normal fit that the t family contains."""
    limit = (_NU_BOUNDS[1], float(z.mean()), float(z.std()))
    if stats.t.logpdf(z, *limit).sum() > stats.t.logpdf(z, *fitted).sum():
        return limit
    return fitted


def _loglik(name: str, x: np.ndarray, params: tuple[float, ...]) -> float:
    if name == "laplace":
        # scipy's laplace.logpdf is log(exp(-|z|)/2): -inf once |x - loc| / scale > ~745.
        loc, scale = params
        return float(-x.size * np.log(2 * scale) - np.abs(x - loc).sum() / scale)
    return float(FAMILIES[name].logpdf(x, *params).sum())


def _fit_one(name: str, x: np.ndarray, start: tuple[float, ...] | None = None) -> tuple[float, ...]:
    """scipy MLE of one family; ``start`` = previous params (warm start for bootstrap refits).

    t and Cauchy are fitted to ``z = (x - median) / spread`` and mapped back
    (``loc = median + spread loc_z``, ``scale = spread scale_z``): the optimizer then sees the same
    numbers whatever the units of the scores (influence scores are often ~1e-6), and the fit
    of ``c x`` is the fit of ``x`` scaled by ``c``, its log-likelihood lower by ``n log c``.
    """
    family = FAMILIES[name]
    if name in ("normal", "laplace", "stable"):
        return tuple(float(v) for v in family.fit(x))
    if name in POSITIVE_FAMILIES:
        return _fit_positive(name, x)
    centre, spread = _centre_and_spread(x)
    z = (x - centre) / spread
    shapes, loc, scale = _standard_start(name, start, centre, spread)
    optimizer = _log_scale_optimizer(_POSITIVE[name], _BOUNDS[name])
    fitted = tuple(
        float(v) for v in family.fit(z, *shapes, loc=loc, scale=scale, optimizer=optimizer)
    )
    if name == "t":
        fitted = _t_normal_limit(z, fitted)
    *shapes, loc, scale = fitted
    return (*shapes, centre + spread * loc, spread * scale)


def _fit_positive(name: str, x: np.ndarray) -> tuple[float, ...]:
    """MLE with the location fixed at 0, all scale-equivariant: log-normal ``(sigma, 0, e^mu)``
    with mu, sigma the mean and (ddof 0) standard deviation of log x (= ``lognorm.fit(x,
    floc=0)``); exponential ``(0, mean)``; gamma by ``gamma.fit(x, floc=0)``, whose shape solves
    ``log a - digamma(a) = log mean(x) - mean(log x)`` (free of the units of x)."""
    if name == "lognormal":
        logs = np.log(x)
        return (float(logs.std()), 0.0, float(np.exp(logs.mean())))
    if name == "exponential":
        return (0.0, float(x.mean()))
    shape, _, scale = stats.gamma.fit(x, floc=0)
    return (float(shape), 0.0, float(scale))


def _collapsed(name: str, x: np.ndarray, params: tuple[float, ...]) -> bool:
    """Whether a t / Cauchy fit sits where its likelihood is unbounded: a scale shrunk onto a
    tied value (or nu at its lower bound), not a maximum of the likelihood."""
    if name not in ("t", "cauchy"):
        return False
    _, spread = _centre_and_spread(x)
    at_floor = params[-1] <= _COLLAPSED_SCALE * spread
    return at_floor or (name == "t" and params[0] <= 1.01 * _NU_BOUNDS[0])


def _refit_block(name: str, samples: np.ndarray, start: tuple[float, ...]) -> np.ndarray:
    """MLE of every row of ``samples`` [B, n] -> params [B, k]."""
    if name == "normal":
        # norm.fit: mean and the ddof=0 standard deviation.
        return np.stack([samples.mean(1), samples.std(1)], axis=1)
    if name == "laplace":
        # laplace.fit: the median and the mean absolute deviation from it.
        loc = np.median(samples, axis=1)
        return np.stack([loc, np.abs(samples - loc[:, None]).mean(1)], axis=1)
    if name == "lognormal":
        logs = np.log(samples)
        zeros = np.zeros(len(samples))
        return np.stack([logs.std(1), zeros, np.exp(logs.mean(1))], axis=1)
    if name == "exponential":
        return np.stack([np.zeros(len(samples)), samples.mean(1)], axis=1)
    return np.array([_fit_one(name, row, start) for row in samples])


def _ks_statistics(name: str, sorted_rows: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Two-sided KS statistic of each sorted row [B, n] against its own fitted law [B, k]."""
    n = sorted_rows.shape[1]
    cdf = FAMILIES[name].cdf(sorted_rows, *(params[:, j : j + 1] for j in range(params.shape[1])))
    upper = np.arange(1, n + 1) / n - cdf
    lower = cdf - np.arange(n) / n
    return np.maximum(upper.max(1), lower.max(1))


def _bootstrap_pvalue(
    name: str, params: tuple[float, ...], n: int, observed: float, draws: int, rng
) -> float:
    if draws == 0 or name == "stable":
        return float("nan")
    exceed = 0
    rows_per_block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, draws, rows_per_block):
        rows = min(rows_per_block, draws - start)
        samples = FAMILIES[name].rvs(*params, size=(rows, n), random_state=rng)
        refitted = _refit_block(name, samples, params)
        exceed += int((_ks_statistics(name, np.sort(samples, 1), refitted) >= observed).sum())
    return (1 + exceed) / (draws + 1)


def _likelihood_ratio_statistic(alternative: FamilyFit, null: FamilyFit) -> float:
    """``2 (ll_alternative - ll_null)``; NaN when either fit is degenerate (no maximum)."""
    if alternative.degenerate or null.degenerate:
        return float("nan")
    return 2.0 * (alternative.loglik - null.loglik)


def _boundary_pvalue(statistic: float) -> float:
    """``P(LR >= statistic)`` under the 50:50 mixture of chi2_0 and chi2_1."""
    if np.isnan(statistic):
        return float("nan")
    return 0.5 * float(stats.chi2.sf(statistic, 1)) if statistic > 0 else 1.0


def _interior_pvalue(statistic: float) -> float:
    """``P(LR >= statistic)`` under chi2_1."""
    if np.isnan(statistic):
        return float("nan")
    return float(stats.chi2.sf(max(statistic, 0.0), 1))


def likelihood_ratio_tests(fits: dict[str, FamilyFit]) -> dict[str, LikelihoodRatioTest]:
    tests = {}
    if "t" in fits and "normal" in fits:
        statistic = _likelihood_ratio_statistic(fits["t"], fits["normal"])
        tests["t_vs_normal"] = LikelihoodRatioTest(
            "normal",
            "t",
            statistic,
            _boundary_pvalue(statistic),
            "0.5 chi2_0 + 0.5 chi2_1 (nu -> inf is a boundary point)",
        )
    if "t" in fits and "cauchy" in fits:
        statistic = _likelihood_ratio_statistic(fits["t"], fits["cauchy"])
        tests["t_vs_cauchy"] = LikelihoodRatioTest(
            "cauchy",
            "t",
            statistic,
            _interior_pvalue(statistic),
            "chi2_1 (nu = 1)",
        )
    return tests


def warn_degenerate(x: np.ndarray, degenerate: list[FamilyFit]) -> None:
    if not degenerate:
        return
    values, counts = np.unique(x, return_counts=True)
    nearest = int(np.argmin(np.abs(values - degenerate[0].params[-2])))
    names = " and ".join(f"{f.name} (scale {f.params[-1]:.3g})" for f in degenerate)
    plural = len(degenerate) > 1
    warnings.warn(
        f"the {names} fit{'s' if plural else ''} collapsed onto the score {values[nearest]:g}, "
        f"which {counts[nearest]} of {x.size} scores equal: tied scores make a continuous "
        "likelihood grow without bound as the scale shrinks, so this is no maximum-likelihood "
        f"fit. {'They are' if plural else 'It is'} left out of best / best_bic and of the "
        "likelihood-ratio tests (NaN). Fit the scores without the tied value "
        f"(scores[scores != {values[nearest]:g}]) or model it as a separate atom.",
        stacklevel=3,
    )


def fit_family(name: str, x: np.ndarray, sorted_x: np.ndarray, stable_max_n: int,
                bootstrap: int, rng) -> FamilyFit:  # fmt: skip
    n = x.size
    if name == "stable":
        picks = np.linspace(0, n - 1, min(n, stable_max_n)).round().astype(int)
        params = _fit_one(name, sorted_x[picks])
    else:
        params = _fit_one(name, x)
    loglik = _loglik(name, x, params)
    k = len(params) - (name in POSITIVE_FAMILIES)  # a location fixed at 0 is no parameter
    observed = float(_ks_statistics(name, sorted_x[None], np.array([params]))[0])
    degenerate = _collapsed(name, x, params)
    draws = 0 if degenerate else bootstrap
    return FamilyFit(
        name=name,
        params=params,
        loglik=loglik,
        aic=2 * k - 2 * loglik,
        bic=k * np.log(n) - 2 * loglik,
        ks_statistic=observed,
        ks_pvalue=_bootstrap_pvalue(name, params, n, observed, draws, rng),
        degenerate=degenerate,
    )
