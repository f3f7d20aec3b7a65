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

from influx.tails.families import (
    FAMILIES,
    POSITIVE_FAMILIES,
    SYMMETRIC_FAMILIES,
    FamilyFit,
    LikelihoodRatioTest,
)
from influx.tails.fitting import SUPPORTS, TailReport, choose_support, fit
from influx.tails.hill_index import HillEstimate, hill
from influx.tails.power_tail import PowerLawFit, VuongTest, power_law, vuong

__all__ = [
    "FAMILIES",
    "POSITIVE_FAMILIES",
    "SUPPORTS",
    "SYMMETRIC_FAMILIES",
    "FamilyFit",
    "HillEstimate",
    "LikelihoodRatioTest",
    "PowerLawFit",
    "TailReport",
    "VuongTest",
    "choose_support",
    "fit",
    "hill",
    "power_law",
    "vuong",
]
