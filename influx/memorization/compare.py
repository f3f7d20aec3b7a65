"""How well each memorization proxy agrees with the estimate: correlations with bootstrap
intervals, cosine similarity and the top-k overlap (ties shared fractionally)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from influx.errors import InfluxValueError
from influx.memorization.estimate import MemorizationResult, _as_float64

__all__ = ["LOW_MEANS_MEMORIZED", "Comparison", "compare"]

#: Proxies for which a LOW value marks a memorized example (top-k takes their k smallest).
LOW_MEANS_MEMORIZED = ("confidence", "margin")


@dataclass(frozen=True)
class Comparison:
    """One row per proxy: Spearman and Pearson with the estimate, their bootstrap percentile
    confidence intervals, cosine similarity, the top-k overlap and the examples used."""

    rows: list[dict[str, Any]]
    k: int | None
    n_boot: int
    level: float

    def to_markdown(self) -> str:
        lines = [
            "| proxy | spearman | CI | pearson | CI | cosine | top-k overlap | n |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['proxy']} | {r['spearman']:.3f} | [{r['spearman_ci'][0]:.3f}, "
                f"{r['spearman_ci'][1]:.3f}] | {r['pearson']:.3f} | [{r['pearson_ci'][0]:.3f}, "
                f"{r['pearson_ci'][1]:.3f}] | {r['cosine']:.3f} | {r['topk_overlap']:.3f} | "
                f"{r['n']} |"
            )
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        body = ", ".join(
            f"{r['proxy']}: rho={r['spearman']:.3f} r={r['pearson']:.3f}" for r in self.rows
        )
        return f"Comparison(k={self.k}, n_boot={self.n_boot}, {body})"


def _pearson_along(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson correlation along ``axis`` (vectorized over bootstrap resamples)."""
    x = x - x.mean(axis, keepdims=True)
    y = y - y.mean(axis, keepdims=True)
    return (x * y).sum(axis) / np.sqrt((x * x).sum(axis) * (y * y).sum(axis))


def _spearman_along(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    from scipy import stats

    return _pearson_along(stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis), axis)


def _top_weights(values: np.ndarray, k: int) -> np.ndarray:
    """Membership of each example in the top k of ``values`` [n]: 1 above the k-th largest value,
    and for the examples tied at it, their share of the places left (t tied for r places: r / t
    each), so that the weights sum to k and do not depend on the order of the examples."""
    threshold = np.sort(values)[::-1][k - 1]
    above = values > threshold
    tied = values == threshold
    return above + tied * (k - above.sum()) / tied.sum()


def compare(
    estimate,
    proxies: Mapping[str, Any],
    *,
    k: int | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    low_means_memorized: Sequence[str] = LOW_MEANS_MEMORIZED,
) -> Comparison:
    """Correlate each proxy [N] with the memorization estimate [N] (a :class:`MemorizationResult`
    or an array).

    Spearman and Pearson come from ``scipy.stats``; their ``level`` confidence intervals from a
    seeded paired bootstrap (``scipy.stats.bootstrap``, percentile method, ``n_boot``
    resamples). ``cosine`` is the uncentred cosine similarity (the statistic Ravikumar et al.
    report beside Pearson). ``topk_overlap`` = |top-k of proxy ∩ top-k of mem| / k, default
    k = 10% of the examples; proxies named in ``low_means_memorized`` rank by their smallest
    values. Ties at the k-th value (memorization estimates take few values) share the places
    left: t examples tied for r places each count r / t, and the overlap is
    ``sum_i w_proxy(i) w_mem(i) / k``, the expected overlap when each side's ties are broken at
    random; it does not depend on the order of the examples. Correlations keep their sign.
    Examples where either value is not finite are dropped (``n`` says how many remain).
    """
    from scipy import stats

    mem = estimate.mem if isinstance(estimate, MemorizationResult) else estimate
    mem = _as_float64(mem, "estimate").numpy()
    if not 0 < level < 1:
        raise InfluxValueError(f"level must lie in (0, 1); got {level}")
    if not proxies:
        raise InfluxValueError("proxies is empty: pass {name: scores [N]}")
    rows = []
    for name, values in proxies.items():
        proxy = _as_float64(values, f"proxy {name!r}").numpy()
        if proxy.shape != mem.shape:
            raise InfluxValueError(
                f"proxy {name!r} has shape {proxy.shape}; the estimate has {mem.shape}"
            )
        keep = np.isfinite(proxy) & np.isfinite(mem)
        x, y = proxy[keep], mem[keep]
        if x.size < 3:
            raise InfluxValueError(f"proxy {name!r}: fewer than 3 examples with finite values")
        top = k if k is not None else max(1, round(0.1 * x.size))
        top = min(top, x.size)
        oriented = -x if name in low_means_memorized else x
        overlap = float(_top_weights(oriented, top) @ _top_weights(y, top)) / top
        rng = np.random.default_rng(seed)
        intervals = {}
        for stat, fn in (("spearman", _spearman_along), ("pearson", _pearson_along)):
            boot = stats.bootstrap(
                (x, y), fn, paired=True, vectorized=True, n_resamples=n_boot,
                confidence_level=level, method="percentile", random_state=rng,
            )  # fmt: skip
            intervals[stat] = (
                float(boot.confidence_interval.low),
                float(boot.confidence_interval.high),
            )
        rows.append(
            dict(
                proxy=name,
                spearman=float(stats.spearmanr(x, y).statistic),
                spearman_ci=intervals["spearman"],
                pearson=float(stats.pearsonr(x, y).statistic),
                pearson_ci=intervals["pearson"],
                cosine=float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))),
                topk_overlap=float(overlap),
                k=top,
                n=int(x.size),
            )
        )
    return Comparison(rows, k, n_boot, level)
