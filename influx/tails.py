"""Heavy-tailed fits of a score distribution (numpy / scipy only).

``fit(scores)`` answers "which family describes these scores, and how heavy is their tail?".
The families follow the sign of the scores (``support="auto"``, :func:`choose_support`; pass
``support="positive"`` or ``"real"`` to override):

- non-negative scores (self-influence, losses, gradient norms), where a law on the real line can
  only misfit: the log-normal, gamma and exponential families with location fixed at 0 (2, 2 and
  1 parameters), fitted to the positive scores (exact zeros are allowed and reported as
  ``zero_fraction``), and a continuous power law on the tail, fitted as Clauset, Shalizi &
  Newman (2009, "Power-law distributions in empirical data"): for each candidate ``x_min`` (a
  distinct value leaving at least ``min_tail`` points above it) the MLE
  ``alpha = 1 + n_tail / sum log(x_i / x_min)`` (s.e. ``(alpha - 1) / sqrt(n_tail)``), and the
  ``x_min`` whose fit has the smallest KS distance to the tail; optionally their semi-parametric
  bootstrap p-value; and Vuong's normalized log-likelihood-ratio test (as in CSN and the
  ``powerlaw`` package) of the power law against the log-normal and the exponential, each
  fitted to the same tail (truncated at x_min). All positive fits are scale-equivariant.
  ``plot`` draws log-log survival functions;
- signed scores (the per-point Gaussian test I_z, GUS): the symmetric families below.

For either support:

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

The power law describes the tail only, so it is compared with the other families by Vuong's test
on that tail, not by AIC over all scores. Its density exponent ``alpha`` and Hill's survival
index are related by ``hill ~ alpha - 1`` where both see the same tail.

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

from influx.checks import check_integer, check_number
from influx.errors import InfluxValueError

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
SUPPORTS = ("auto", "positive", "real")
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
    """Result of :func:`fit`: ``fits[name]``, ``tests[name]``, ``hill``, ``best`` (AIC).

    ``support`` is ``"positive"`` (families fitted to the positive scores, ``zero_fraction`` of
    the scores exactly 0, ``power_law`` the CSN tail fit) or ``"real"`` (families fitted to all
    scores, ``power_law`` None). ``scores`` holds every score given.
    """

    scores: np.ndarray = field(repr=False)
    fits: dict[str, FamilyFit]
    tests: dict[str, LikelihoodRatioTest]
    hill: HillEstimate
    bootstrap: int
    seed: int
    support: str = "real"
    zero_fraction: float = 0.0
    power_law: PowerLawFit | None = None

    @property
    def fitted_scores(self) -> np.ndarray:
        """The scores the families were fitted to: the positive ones for positive support."""
        return self.scores[self.scores > 0] if self.support == "positive" else self.scores

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
            "support": self.support,
            "zero_fraction": self.zero_fraction,
            "power_law": None if self.power_law is None else self.power_law.summary(),
        }

    def __repr__(self) -> str:
        rows = ", ".join(
            f"{n}: aic={f.aic:.1f} ks_p={f.ks_pvalue:.3g}{' (degenerate)' if f.degenerate else ''}"
            for n, f in self.fits.items()
        )
        power = self.power_law
        tail = "" if power is None else (
            f", power_law_alpha={power.alpha:.3g}±{power.stderr:.2g} x_min={power.x_min:.3g}"
        )  # fmt: skip
        return (
            f"TailReport(n={self.scores.size}, support={self.support!r}, best={self.best!r}, "
            f"best_bic={self.best_bic!r}, {rows}, hill_alpha={self.hill.alpha:.3g}"
            f"±{self.hill.stderr:.2g} at k={self.hill.k}{tail})"
        )

    def plot(self, path=None, *, title: str | None = None):
        """Diagnostic figure; returns the matplotlib Figure and saves it to ``path`` when given.

        Positive support: log-log survival P(X > x) of the positive scores with each fitted
        survival function and the power law above x_min, the density of log10 x, the Hill plot,
        and one log-log QQ plot per family. Real support: histogram with fitted densities
        (linear axis), log-log survival of |x|, Hill plot, one QQ plot per family.
        """
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        ncols = max(3, len(self.fits))
        fig, axes = plt.subplots(2, ncols, figsize=(3.6 * ncols, 7), squeeze=False)
        if self.support == "positive":
            self._plot_positive(axes)
        else:
            self._plot_real(axes)
        self._plot_hill(axes[0, 2])
        for ax in axes[0, 3:]:
            ax.axis("off")
        for ax in axes[1, len(self.fits) :]:
            ax.axis("off")
        axes[1, 0].set_ylabel("sample quantile")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig

    def _plot_positive(self, axes) -> None:
        x = np.sort(self.fitted_scores)
        n = x.size
        ax = axes[0, 0]
        survival = 1.0 - np.arange(n) / n  # P(X >= x_(i)) among the positive scores
        ax.loglog(x, survival, "k.", ms=2, label="empirical")
        levels = np.geomspace(x[0], x[-1], 200)
        for f in self.fits.values():
            ax.loglog(levels, f.dist.sf(levels), label=f"{f.name} (AIC {f.aic:.0f})")
        power = self.power_law
        if power is not None:
            above = levels[levels >= power.x_min]
            ax.loglog(above, power.tail_fraction * power.sf(above), "k--", lw=1.2,
                      label=f"power law, alpha={power.alpha:.2f}")  # fmt: skip
            ax.axvline(power.x_min, color="0.5", ls=":", lw=1)
        zeros = f", {self.zero_fraction:.0%} zeros left out" if self.zero_fraction else ""
        ax.set(title=f"P(X > x), positive scores{zeros}", xlabel="x", ylim=(0.5 / n, 1.1))
        ax.legend(fontsize=7)

        ax = axes[0, 1]
        logs = np.log10(x)
        ax.hist(logs, bins=60, density=True, color="0.8")
        grid = np.linspace(logs[0], logs[-1], 400)
        for f in self.fits.values():
            # density of log10 X: f(10^y) 10^y ln 10
            ax.plot(grid, f.dist.pdf(10**grid) * 10**grid * np.log(10), label=f.name)
        ax.set(title="density of log10 x", xlabel="log10 score")
        ax.legend(fontsize=7)

        positions = (np.arange(1, n + 1) - 0.5) / n
        for ax, f in zip(axes[1], self.fits.values()):
            ax.loglog(f.dist.ppf(positions), x, "k.", ms=2)
            ax.loglog([x[0], x[-1]], [x[0], x[-1]], "C3-", lw=1)
            ax.set(title=f"QQ {f.name} (KS p={f.ks_pvalue:.2g})", xlabel="fitted quantile")

    def _plot_real(self, axes) -> None:
        x = np.sort(self.scores)
        n = x.size
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

        positions = (np.arange(1, n + 1) - 0.5) / n
        for ax, f in zip(axes[1], self.fits.values()):
            theoretical = f.dist.ppf(positions)
            ax.plot(theoretical, x, "k.", ms=2)
            ax.plot([x[0], x[-1]], [x[0], x[-1]], "C3-", lw=1)
            ax.set(title=f"QQ {f.name} (KS p={f.ks_pvalue:.2g})", xlabel="fitted quantile")
            ax.set_xlim(x[0] - 0.1 * (x[-1] - x[0]), x[-1] + 0.1 * (x[-1] - x[0]))

    def _plot_hill(self, ax) -> None:
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


# --- Power-law tail (Clauset, Shalizi & Newman 2009) ---------------------------------------------


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
    x = _check_scores(scores)
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


def choose_support(scores) -> str:
    """``"positive"`` when every score is >= 0 (self-influence, losses, gradient norms: a law on
    the real line can only misfit them), else ``"real"`` (signed scores such as I_z or GUS)."""
    return "positive" if np.min(np.asarray(scores, dtype=np.float64)) >= 0 else "real"


def _resolve_support(x: np.ndarray, support: str) -> str:
    if support not in SUPPORTS:
        raise InfluxValueError(f"support must be one of {SUPPORTS}; got {support!r}")
    if support == "auto":
        return choose_support(x)
    if support == "positive" and x.min() < 0:
        raise InfluxValueError(
            f"support='positive' needs scores >= 0; {int(np.sum(x < 0))} are negative "
            "(use support='real' for signed scores)"
        )
    return support


def _resolve_families(families, support: str, stable: bool) -> list[str]:
    default = POSITIVE_FAMILIES if support == "positive" else SYMMETRIC_FAMILIES
    families = list(default if families is None else families)
    families += ["stable"] if stable and "stable" not in families else []
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise InfluxValueError(
            f"unknown families {unknown or families}; choose from {sorted(FAMILIES)}"
        )
    if support == "real" and any(f in POSITIVE_FAMILIES for f in families):
        raise InfluxValueError(
            f"the families {[f for f in families if f in POSITIVE_FAMILIES]} live on (0, inf) "
            "and these scores are signed (support='real')"
        )
    return families


def _positive_part(x: np.ndarray) -> np.ndarray:
    body = x[x > 0]
    if body.size < 10 or np.ptp(body) == 0:
        raise InfluxValueError(
            f"need at least 10 positive scores, not all equal, to fit positive families; got "
            f"{body.size} (the other {x.size - body.size} are 0)"
        )
    return body


def _fit_family(name: str, x: np.ndarray, sorted_x: np.ndarray, stable_max_n: int,
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


def fit(
    scores,
    families: Sequence[str] | None = None,
    *,
    support: str = "auto",
    stable: bool = False,
    bootstrap: int = 100,
    seed: int = 0,
    hill_k: int | None = None,
    stable_max_n: int = 500,
    power_law_bootstrap: int = 0,
    min_tail: int = 10,
) -> TailReport:
    """Fit each family to ``scores`` [N] by maximum likelihood and compare them (module docstring).

    ``support``: ``"auto"`` (default) picks ``"positive"`` when every score is >= 0 and
    ``"real"`` otherwise (:func:`choose_support`); either can be forced. ``families`` defaults to
    :data:`POSITIVE_FAMILIES` (fitted to the positive scores; zeros are counted in
    ``zero_fraction``, and a CSN power law is fitted to the tail) or :data:`SYMMETRIC_FAMILIES`.
    ``bootstrap``: parametric-bootstrap samples per family for the KS p-values (0 skips them);
    ``power_law_bootstrap``: CSN bootstrap draws for the power law's p-value; ``seed`` seeds
    both. ``stable=True`` adds the alpha-stable family, fitted by ``levy_stable.fit`` on an
    evenly spaced subsample of at most ``stable_max_n`` sorted scores (its log-likelihood and
    AIC are then evaluated on all scores).
    """
    x = _check_scores(scores)
    support = _resolve_support(x, support)
    families = _resolve_families(families, support, stable)
    bootstrap = check_integer("bootstrap", bootstrap, minimum=0)
    power_law_bootstrap = check_integer("power_law_bootstrap", power_law_bootstrap, minimum=0)
    fitted = _positive_part(x) if support == "positive" else x
    rng = np.random.default_rng(seed)
    sorted_fitted = np.sort(fitted)
    fits = {
        name: _fit_family(name, fitted, sorted_fitted, stable_max_n, bootstrap, rng)
        for name in families
    }
    _warn_degenerate(fitted, [f for f in fits.values() if f.degenerate])
    tail = None
    if support == "positive":
        tail = power_law(fitted, min_tail=min_tail, bootstrap=power_law_bootstrap, seed=seed)
    return TailReport(
        scores=x,
        fits=fits,
        tests=_likelihood_ratio_tests(fits),
        hill=_hill_estimate(x, hill_k),
        bootstrap=bootstrap,
        seed=seed,
        support=support,
        zero_fraction=float(np.mean(x == 0)),
        power_law=tail,
    )
