"""Heavy-tailed fits of a score distribution (numpy / scipy only).

``fit(scores)`` answers "which family describes these scores, and how heavy is their tail?":

- maximum-likelihood fits (``scipy.stats``) of the normal, Laplace, Student-t and Cauchy families
  (and, with ``stable=True``, the alpha-stable family), each with its log-likelihood
  ``ll = sum_i log f(x_i; params)``, ``AIC = 2k - 2 ll`` and ``BIC = k log n - 2 ll`` (k = number of
  parameters: 2, 2, 3, 2, 4). Normal and Laplace are closed forms. t and Cauchy are fitted by
  L-BFGS-B (on log nu, loc, log scale) to the standardized scores ``z = (x - median) / s``, with
  ``s`` half the interquartile range (the mean absolute deviation from the median when more than
  half the scores are tied), and mapped back: every fit is scale-equivariant, so the fit of
  ``c x`` is the fit of ``x`` scaled by ``c`` and its ll is lower by exactly ``n log c`` (influence
  scores of ~1e-6 fit like scores of ~1). nu is kept in [1e-3, 1e12]. nu = 1e12 is the normal
  limit (its ll differs from the normal one by n (kurtosis - 3) / (4 nu), ~1e-13 n), and the t
  fit is never below it: L-BFGS-B alone stalls short of it as the likelihood flattens in nu;
- degenerate fits: tied scores (Feldman-Zhang memorization scores are often exactly 0) make the
  Cauchy likelihood unbounded once more than half the scores share a value, and the t
  likelihood unbounded with fewer (as nu -> 0); the optimizer then drives the scale onto the
  tied value. A fit whose scale ends below 1e-6 s (the scale is kept above 1e-8 s), or whose nu
  ends at its lower bound, is marked ``degenerate`` with a warning: it is left out of ``best`` /
  ``best_bic``, its tests are NaN and it gets no bootstrap p-value;
- nested likelihood-ratio tests, statistic ``LR = 2 (ll_alternative - ll_null)``:
  t vs normal (the normal is the limit nu -> inf, a boundary point of the t family: LR is
  referred to the 50:50 mixture of chi2_0 and chi2_1 (Self & Liang 1987), so
  ``p = 0.5 P(chi2_1 >= LR)`` for LR > 0 and 1 otherwise) and t vs Cauchy (nu = 1, an interior
  point: chi2_1);
- parametric-bootstrap Kolmogorov-Smirnov p-values: ``B`` samples of size n are drawn from each
  fitted law and refitted, and ``p = (1 + #{D_b >= D}) / (B + 1)``; refitting is what makes the
  p-value honest (KS with estimated parameters is far from its textbook null law). Normal and
  Laplace refits are closed forms vectorized over all B samples (they equal ``norm.fit`` /
  ``laplace.fit`` exactly); t and Cauchy refits loop over samples with scipy's ``fit`` started at
  the fitted parameters;
- the Hill estimator of the tail index alpha of ``|scores|`` (``P(|X| > x) ~ x^-alpha``): with the
  order statistics ``X_(1) >= X_(2) >= ...`` of ``|scores|``,
  ``1 / alpha_k = (1/k) sum_{i<=k} log X_(i) - log X_(k+1)``, asymptotic standard error
  ``alpha_k / sqrt(k)``, reported for every k (the stability plot) and at ``k = round(n^(2/3))``
  unless given. For Student-t scores alpha = nu; for Cauchy alpha = 1; for normal / Laplace it
  grows without bound as k shrinks (no power tail). Zeros are left out; a given k must be an
  integer in 1 .. (nonzero scores) - 1, the default is clamped to that range. alpha_k is summed
  from the spacings of the logs, so it is exactly inf when the k + 1 largest |scores| are tied
  (with a warning naming the smallest k that is finite), never rounding noise.

Model selection: ``TailReport.best`` is the family with the lowest AIC, ``best_bic`` the lowest BIC,
degenerate fits left out. With nested truths AIC cannot pick the smaller family reliably: for
Cauchy data the t fit beats it on AIC whenever LR > 2, which happens with probability
P(chi2_1 > 2) = 0.157 however large n is (0.079 for normal data); BIC's penalty log n makes that
chance vanish as n grows.

Cost (n = 10^4, one shared CPU core, noisy): normal / Laplace fits well under 1 ms, Cauchy ~40 ms,
t 0.03-0.5 s (slowest for near-normal data; scipy's default Nelder-Mead took 0.25-4 s);
bootstrap refits cost about the same per sample, so ``bootstrap=100`` adds ~25 s at n = 10^4 and
~1 s at n = 10^3. ``scipy.stats.levy_stable.fit`` is far slower: on 1,000 Cauchy points it had not
finished after 5 minutes of CPU, so the stable family is off by default, is fitted on at most
``stable_max_n`` points, and gets no bootstrap p-value (NaN).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

from influx.checks import check_integer
from influx.errors import InfluxValueError

FAMILIES = {
    "normal": stats.norm,
    "laplace": stats.laplace,
    "t": stats.t,
    "cauchy": stats.cauchy,
    "stable": stats.levy_stable,
}
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
        return len(self.params)


@dataclass(frozen=True)
class LikelihoodRatioTest:
    """``statistic = 2 (ll_alternative - ll_null)``; ``reference`` names the null law of it."""

    null: str
    alternative: str
    statistic: float
    pvalue: float
    reference: str


@dataclass(frozen=True)
class HillEstimate:
    """Hill tail index of |scores|: ``alpha`` at ``k`` upper order statistics, and the whole curve
    ``alphas[k - 1]`` for k = 1..len(alphas) (the stability plot)."""

    k: int
    alpha: float
    stderr: float
    alphas: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class TailReport:
    """Result of :func:`fit`: ``fits[name]``, ``tests[name]``, ``hill``, ``best`` (AIC)."""

    scores: np.ndarray = field(repr=False)
    fits: dict[str, FamilyFit]
    tests: dict[str, LikelihoodRatioTest]
    hill: HillEstimate
    bootstrap: int
    seed: int

    @property
    def best(self) -> str:
        """The family with the lowest AIC among the fits that are not degenerate."""
        return min(self._selectable(), key=lambda f: f.aic).name

    @property
    def best_bic(self) -> str:
        """The family with the lowest BIC (consistent for nested truths, unlike AIC), among the
        fits that are not degenerate."""
        return min(self._selectable(), key=lambda f: f.bic).name

    def _selectable(self) -> list[FamilyFit]:
        # Only t / Cauchy can degenerate; with those alone, fall back to all (fit() warned).
        proper = [f for f in self.fits.values() if not f.degenerate]
        return proper or list(self.fits.values())

    def summary(self) -> dict:
        """A JSON-ready dict of every number in the report."""
        return {
            "n": int(self.scores.size),
            "best_aic": self.best,
            "best_bic": self.best_bic,
            "fits": {
                name: {
                    "params": list(f.params),
                    "loglik": f.loglik,
                    "aic": f.aic,
                    "bic": f.bic,
                    "ks_statistic": f.ks_statistic,
                    "ks_pvalue": None if np.isnan(f.ks_pvalue) else f.ks_pvalue,
                    "degenerate": f.degenerate,
                }
                for name, f in self.fits.items()
            },
            "tests": {
                name: {
                    "statistic": None if np.isnan(t.statistic) else t.statistic,
                    "pvalue": None if np.isnan(t.pvalue) else t.pvalue,
                    "reference": t.reference,
                }
                for name, t in self.tests.items()
            },
            "hill": {"k": self.hill.k, "alpha": self.hill.alpha, "stderr": self.hill.stderr},
            "bootstrap": self.bootstrap,
            "seed": self.seed,
        }

    def __repr__(self) -> str:
        rows = ", ".join(
            f"{n}: aic={f.aic:.1f} ks_p={f.ks_pvalue:.3g}{' (degenerate)' if f.degenerate else ''}"
            for n, f in self.fits.items()
        )
        return (
            f"TailReport(n={self.scores.size}, best={self.best!r}, best_bic={self.best_bic!r}, "
            f"{rows}, hill_alpha={self.hill.alpha:.3g}±{self.hill.stderr:.2g} at k={self.hill.k})"
        )

    def plot(self, path=None, *, title: str | None = None):
        """Histogram with fitted densities, log-log survival of |x|, Hill plot, one QQ plot per family.

        Returns the matplotlib Figure; saves it to ``path`` when given.
        """
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        x = np.sort(self.scores)
        n = x.size
        ncols = max(3, len(self.fits))
        fig, axes = plt.subplots(2, ncols, figsize=(3.6 * ncols, 7), squeeze=False)
        low, high = np.quantile(x, [0.005, 0.995])
        grid = np.linspace(low, high, 400)
        ax = axes[0, 0]
        ax.hist(x[(x >= low) & (x <= high)], bins=60, density=True, color="0.8")
        for f in self.fits.values():
            ax.plot(grid, f.dist.pdf(grid), label=f"{f.name} (AIC {f.aic:.0f})")
        ax.set(title="density (0.5-99.5% range)", xlabel="score")
        ax.legend(fontsize=7)

        ax = axes[0, 1]
        magnitudes = np.sort(np.abs(x))
        survival = 1.0 - np.arange(n) / n
        positive = magnitudes > 0
        ax.loglog(magnitudes[positive], survival[positive], "k.", ms=2, label="empirical")
        levels = np.geomspace(max(magnitudes[positive][0], 1e-12), magnitudes[-1], 200)
        for f in self.fits.values():
            ax.loglog(levels, f.dist.sf(levels) + f.dist.cdf(-levels), label=f.name)
        ax.set(title="P(|X| > x)", xlabel="x", ylim=(0.5 / n, 1.1))
        ax.legend(fontsize=7)

        ax = axes[0, 2]
        ks = np.arange(1, self.hill.alphas.size + 1)
        ax.plot(ks, self.hill.alphas, "k-", lw=1)
        ax.fill_between(
            ks,
            self.hill.alphas * (1 - 2 / np.sqrt(ks)),
            self.hill.alphas * (1 + 2 / np.sqrt(ks)),
            color="0.85",
        )
        ax.axvline(
            self.hill.k, color="C3", ls="--", label=f"k={self.hill.k}: {self.hill.alpha:.2f}"
        )
        ax.set(title="Hill tail index of |x| (±2 s.e.)", xlabel="k", xscale="log")
        finite = self.hill.alphas[np.isfinite(self.hill.alphas)]
        if finite.size:
            ax.set_ylim(0, min(4 * np.median(finite), finite.max()) * 1.1)
        ax.legend(fontsize=7)
        for ax in axes[0, 3:]:
            ax.axis("off")

        positions = (np.arange(1, n + 1) - 0.5) / n
        for ax, f in zip(axes[1], self.fits.values()):
            theoretical = f.dist.ppf(positions)
            ax.plot(theoretical, x, "k.", ms=2)
            ax.plot([x[0], x[-1]], [x[0], x[-1]], "C3-", lw=1)
            ax.set(title=f"QQ {f.name} (KS p={f.ks_pvalue:.2g})", xlabel="fitted quantile")
            ax.set_xlim(x[0] - 0.1 * (x[-1] - x[0]), x[-1] + 0.1 * (x[-1] - x[0]))
        for ax in axes[1, len(self.fits) :]:
            ax.axis("off")
        axes[1, 0].set_ylabel("sample quantile")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig


def _check_scores(scores) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1:
        raise InfluxValueError(
            f"scores must be one-dimensional [N]; got shape {x.shape}: pass scores.ravel()"
        )
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise InfluxValueError(
            f"scores contain {bad.size} NaN/inf values at indices {bad[:10].tolist()}"
            f"{' ...' if bad.size > 10 else ''}: drop or fix those examples before fitting"
        )
    if x.size < 10:
        raise InfluxValueError(f"need at least 10 scores to fit tails; got {x.size}")
    if np.ptp(x) == 0:
        raise InfluxValueError("all scores are equal: no distribution can be fitted")
    return x


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


def hill(scores, k: int | None = None) -> HillEstimate:
    """Hill estimator of the tail index of ``|scores|`` at ``k`` upper order statistics.

    ``k`` must lie in 1 .. (number of nonzero |scores|) - 1; the default round(n^(2/3)) is
    clamped to that range. Warns when the k + 1 largest |scores| are tied (alpha is infinite).
    """
    return _hill_estimate(_check_scores(scores), k)


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


def _hill_estimate(x: np.ndarray, k: int | None) -> HillEstimate:
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


def _likelihood_ratio_tests(fits: dict[str, FamilyFit]) -> dict[str, LikelihoodRatioTest]:
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


def _warn_degenerate(x: np.ndarray, degenerate: list[FamilyFit]) -> None:
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


def fit(
    scores,
    families: Sequence[str] = ("normal", "laplace", "t", "cauchy"),
    *,
    stable: bool = False,
    bootstrap: int = 100,
    seed: int = 0,
    hill_k: int | None = None,
    stable_max_n: int = 500,
) -> TailReport:
    """Fit each family to ``scores`` [N] by maximum likelihood and compare them (module docstring).

    ``bootstrap``: parametric-bootstrap samples per family for the KS p-values (0 skips them);
    ``seed`` seeds them. ``stable=True`` adds the alpha-stable family, fitted by
    ``levy_stable.fit`` on an evenly spaced subsample of at most ``stable_max_n`` sorted scores
    (its log-likelihood and AIC are then evaluated on all scores).
    """
    x = _check_scores(scores)
    families = list(families) + (["stable"] if stable and "stable" not in families else [])
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise InfluxValueError(
            f"unknown families {unknown or families}; choose from {sorted(FAMILIES)}"
        )
    bootstrap = check_integer("bootstrap", bootstrap, minimum=0)
    rng = np.random.default_rng(seed)
    n = x.size
    sorted_x = np.sort(x)
    fits = {}
    for name in families:
        if name == "stable":
            picks = np.linspace(0, n - 1, min(n, stable_max_n)).round().astype(int)
            params = _fit_one(name, sorted_x[picks])
        else:
            params = _fit_one(name, x)
        loglik = _loglik(name, x, params)
        k = len(params)
        observed = float(_ks_statistics(name, sorted_x[None], np.array([params]))[0])
        degenerate = _collapsed(name, x, params)
        draws = 0 if degenerate else bootstrap
        fits[name] = FamilyFit(
            name=name,
            params=params,
            loglik=loglik,
            aic=2 * k - 2 * loglik,
            bic=k * np.log(n) - 2 * loglik,
            ks_statistic=observed,
            ks_pvalue=_bootstrap_pvalue(name, params, n, observed, draws, rng),
            degenerate=degenerate,
        )
    _warn_degenerate(x, [f for f in fits.values() if f.degenerate])
    return TailReport(
        scores=x,
        fits=fits,
        tests=_likelihood_ratio_tests(fits),
        hill=_hill_estimate(x, hill_k),
        bootstrap=bootstrap,
        seed=seed,
    )
