"""``fit``: every family of a support fitted to the scores, the tests between them, the Hill
index and (for non-negative scores) the power-law tail, gathered in a ``TailReport``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from influx.checks import check_integer
from influx.errors import InfluxValueError
from influx.tails import plots
from influx.tails.families import (
    FAMILIES,
    POSITIVE_FAMILIES,
    SYMMETRIC_FAMILIES,
    FamilyFit,
    LikelihoodRatioTest,
    fit_family,
    likelihood_ratio_tests,
    warn_degenerate,
)
from influx.tails.hill_index import HillEstimate, hill_estimate
from influx.tails.inputs import check_scores
from influx.tails.power_tail import PowerLawFit, power_law

SUPPORTS = ("auto", "positive", "real")


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
        return plots.draw(self, path, title=title)


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
    x = check_scores(scores)
    support = _resolve_support(x, support)
    families = _resolve_families(families, support, stable)
    bootstrap = check_integer("bootstrap", bootstrap, minimum=0)
    power_law_bootstrap = check_integer("power_law_bootstrap", power_law_bootstrap, minimum=0)
    fitted = _positive_part(x) if support == "positive" else x
    rng = np.random.default_rng(seed)
    sorted_fitted = np.sort(fitted)
    fits = {
        name: fit_family(name, fitted, sorted_fitted, stable_max_n, bootstrap, rng)
        for name in families
    }
    warn_degenerate(fitted, [f for f in fits.values() if f.degenerate])
    tail = None
    if support == "positive":
        tail = power_law(fitted, min_tail=min_tail, bootstrap=power_law_bootstrap, seed=seed)
    return TailReport(
        scores=x,
        fits=fits,
        tests=likelihood_ratio_tests(fits),
        hill=hill_estimate(x, hill_k),
        bootstrap=bootstrap,
        seed=seed,
        support=support,
        zero_fraction=float(np.mean(x == 0)),
        power_law=tail,
    )
