"""The diagnostic figure of a fit (``TailReport.plot``): survival functions, densities, the
Hill plot and one QQ plot per family."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from influx.tails.fitting import TailReport


def draw(report: TailReport, path=None, *, title: str | None = None):
    """The figure of ``TailReport.plot`` (its docstring), saved to ``path`` when given."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ncols = max(3, len(report.fits))
    fig, axes = plt.subplots(2, ncols, figsize=(3.6 * ncols, 7), squeeze=False)
    if report.support == "positive":
        _positive_panels(report, axes)
    else:
        _real_panels(report, axes)
    _hill_panel(report, axes[0, 2])
    for ax in axes[0, 3:]:
        ax.axis("off")
    for ax in axes[1, len(report.fits) :]:
        ax.axis("off")
    axes[1, 0].set_ylabel("sample quantile")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _positive_panels(report, axes) -> None:
    x = np.sort(report.fitted_scores)
    n = x.size
    ax = axes[0, 0]
    survival = 1.0 - np.arange(n) / n  # P(X >= x_(i)) among the positive scores
    ax.loglog(x, survival, "k.", ms=2, label="empirical")
    levels = np.geomspace(x[0], x[-1], 200)
    for f in report.fits.values():
        ax.loglog(levels, f.dist.sf(levels), label=f"{f.name} (AIC {f.aic:.0f})")
    power = report.power_law
    if power is not None:
        above = levels[levels >= power.x_min]
        ax.loglog(above, power.tail_fraction * power.sf(above), "k--", lw=1.2,
                  label=f"power law, alpha={power.alpha:.2f}")  # fmt: skip
        ax.axvline(power.x_min, color="0.5", ls=":", lw=1)
    zeros = f", {report.zero_fraction:.0%} zeros left out" if report.zero_fraction else ""
    ax.set(title=f"P(X > x), positive scores{zeros}", xlabel="x", ylim=(0.5 / n, 1.1))
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    logs = np.log10(x)
    ax.hist(logs, bins=60, density=True, color="0.8")
    grid = np.linspace(logs[0], logs[-1], 400)
    for f in report.fits.values():
        # density of log10 X: f(10^y) 10^y ln 10
        ax.plot(grid, f.dist.pdf(10**grid) * 10**grid * np.log(10), label=f.name)
    ax.set(title="density of log10 x", xlabel="log10 score")
    ax.legend(fontsize=7)

    positions = (np.arange(1, n + 1) - 0.5) / n
    for ax, f in zip(axes[1], report.fits.values()):
        ax.loglog(f.dist.ppf(positions), x, "k.", ms=2)
        ax.loglog([x[0], x[-1]], [x[0], x[-1]], "C3-", lw=1)
        ax.set(title=f"QQ {f.name} (KS p={f.ks_pvalue:.2g})", xlabel="fitted quantile")


def _real_panels(report, axes) -> None:
    x = np.sort(report.scores)
    n = x.size
    low, high = np.quantile(x, [0.005, 0.995])
    grid = np.linspace(low, high, 400)
    ax = axes[0, 0]
    ax.hist(x[(x >= low) & (x <= high)], bins=60, density=True, color="0.8")
    for f in report.fits.values():
        ax.plot(grid, f.dist.pdf(grid), label=f"{f.name} (AIC {f.aic:.0f})")
    ax.set(title="density (0.5-99.5% range)", xlabel="score")
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    magnitudes = np.sort(np.abs(x))
    survival = 1.0 - np.arange(n) / n
    positive = magnitudes > 0
    ax.loglog(magnitudes[positive], survival[positive], "k.", ms=2, label="empirical")
    levels = np.geomspace(max(magnitudes[positive][0], 1e-12), magnitudes[-1], 200)
    for f in report.fits.values():
        ax.loglog(levels, f.dist.sf(levels) + f.dist.cdf(-levels), label=f.name)
    ax.set(title="P(|X| > x)", xlabel="x", ylim=(0.5 / n, 1.1))
    ax.legend(fontsize=7)

    positions = (np.arange(1, n + 1) - 0.5) / n
    for ax, f in zip(axes[1], report.fits.values()):
        theoretical = f.dist.ppf(positions)
        ax.plot(theoretical, x, "k.", ms=2)
        ax.plot([x[0], x[-1]], [x[0], x[-1]], "C3-", lw=1)
        ax.set(title=f"QQ {f.name} (KS p={f.ks_pvalue:.2g})", xlabel="fitted quantile")
        ax.set_xlim(x[0] - 0.1 * (x[-1] - x[0]), x[-1] + 0.1 * (x[-1] - x[0]))


def _hill_panel(report, ax) -> None:
    ks = np.arange(1, report.hill.alphas.size + 1)
    ax.plot(ks, report.hill.alphas, "k-", lw=1)
    ax.fill_between(
        ks,
        report.hill.alphas * (1 - 2 / np.sqrt(ks)),
        report.hill.alphas * (1 + 2 / np.sqrt(ks)),
        color="0.85",
    )
    ax.axvline(
        report.hill.k, color="C3", ls="--", label=f"k={report.hill.k}: {report.hill.alpha:.2f}"
    )
    ax.set(title="Hill tail index of |x| (±2 s.e.)", xlabel="k", xscale="log")
    finite = report.hill.alphas[np.isfinite(report.hill.alphas)]
    if finite.size:
        ax.set_ylim(0, min(4 * np.median(finite), finite.max()) * 1.1)
    ax.legend(fontsize=7)
