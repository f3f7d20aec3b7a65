"""influx.stats against hand computations and scipy, and the protocol on constructed inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from influx import stats
from influx.errors import InfluxValueError


def test_summarize_matches_the_t_interval_by_hand():
    values = [2.1, 3.4, 1.9, 2.8, 3.0, 2.2, 2.6, 3.9]
    s = stats.summarize(values)
    n, mean, sd = 8, sum(values) / 8, float(np.std(values, ddof=1))
    half = 2.364624251592785 * sd / math.sqrt(n)  # t_{0.975, 7}
    assert s.mean == pytest.approx(mean, rel=1e-15)
    assert s.sd == pytest.approx(sd, rel=1e-15)
    assert (s.low, s.high) == pytest.approx((mean - half, mean + half), rel=1e-12)
    assert s.values == tuple(values) and s.n == 8


@pytest.mark.slow
def test_summarize_interval_agrees_with_scipy_and_covers_at_its_level():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(2000):
        x = rng.normal(1.0, 2.0, size=8)
        s = stats.summarize(x, confidence=0.9)
        low, high = sps.t.interval(0.9, 7, loc=x.mean(), scale=sps.sem(x))
        assert (s.low, s.high) == pytest.approx((low, high), rel=1e-12, abs=1e-12)
        covered += s.low <= 1.0 <= s.high
    # 2,000 draws at 90%: the binomial sd of the coverage is 0.0067; 4 sd either side.
    assert abs(covered / 2000 - 0.9) < 0.027


def test_one_seed_has_no_interval_and_constant_values_a_zero_width_one():
    one = stats.summarize([3.0])
    assert one.mean == 3.0 and math.isnan(one.low) and math.isnan(one.high)
    flat = stats.summarize([2.0, 2.0, 2.0])
    assert (flat.low, flat.high, flat.sd) == (2.0, 2.0, 0.0)


def test_nonfinite_values_are_refused_by_position():
    with pytest.raises(InfluxValueError, match=r"positions \[1\]"):
        stats.summarize([1.0, float("nan"), 2.0])
    with pytest.raises(InfluxValueError, match="non-empty"):
        stats.summarize([])
    with pytest.raises(InfluxValueError, match="confidence"):
        stats.summarize([1.0, 2.0], confidence=1.0)


def test_paired_difference_is_the_paired_t_test():
    rng = np.random.default_rng(1)
    a = rng.normal(size=10)
    b = a - 0.5 + 0.3 * rng.normal(size=10)
    d = stats.paired_difference(a, b)
    assert d.values == pytest.approx(tuple(a - b), abs=0)
    assert d.p_value == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-12)
    assert d.wilcoxon_p == pytest.approx(sps.wilcoxon(a - b).pvalue, rel=1e-12)
    low, high = sps.t.interval(0.95, 9, loc=(a - b).mean(), scale=sps.sem(a - b))
    assert (d.low, d.high) == pytest.approx((low, high), rel=1e-12)


def test_pairing_matters_where_unpaired_intervals_overlap():
    # A shared per-seed offset hides a constant gain from an unpaired comparison.
    offsets = np.array([0.0, 5.0, -3.0, 8.0, 1.0, -6.0, 2.0, 4.0])
    trained, unlearned = offsets + 3.0, offsets + 2.0 + 0.01 * np.arange(8)
    a, b = stats.summarize(trained), stats.summarize(unlearned)
    assert a.low < b.high  # unpaired intervals overlap
    d = stats.paired_difference(trained, unlearned)
    assert d.low > 0.9 and d.high < 1.0 and d.p_value < 1e-10


def test_paired_difference_edge_cases():
    same = stats.paired_difference([1.0, 2.0], [1.0, 2.0])
    assert same.p_value == 1.0 and same.wilcoxon_p == 1.0 and same.mean == 0.0
    shifted = stats.paired_difference([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    assert shifted.p_value == 0.0 and shifted.low == shifted.high == 2.0
    with pytest.raises(InfluxValueError, match="one entry per seed"):
        stats.paired_difference([1.0, 2.0], [1.0])


def test_proportion_is_clopper_pearson():
    p = stats.proportion(0, 32)
    assert p.rate == 0 and p.low == 0
    assert p.high == pytest.approx(1 - 0.025 ** (1 / 32), rel=1e-9)  # closed form at k = 0
    q = stats.proportion(7, 20)
    assert q.low == pytest.approx(sps.beta.ppf(0.025, 7, 14), rel=1e-9)
    assert q.high == pytest.approx(sps.beta.ppf(0.975, 8, 13), rel=1e-9)
    with pytest.raises(InfluxValueError, match="0 <= k <= n"):
        stats.proportion(3, 2)


def test_fraction_significant_counts_p_at_or_below_alpha():
    f = stats.fraction_significant([0.001, 0.01, 0.02, 0.5, 0.009], alpha=0.01)
    assert (f.k, f.n) == (3, 5)
    with pytest.raises(InfluxValueError, match="alpha"):
        stats.fraction_significant([0.1], alpha=0)


def test_z_test_one_and_two_sided():
    out = stats.z_test(2.3263478740408408)  # Phi^-1(0.99)
    assert out["p_one_sided"] == pytest.approx(0.01, rel=1e-12)
    assert out["p_two_sided"] == pytest.approx(0.02, rel=1e-12)
    over = stats.z_test(-3.0)  # overshooting: one-sided says nothing, two-sided flags it
    assert over["p_one_sided"] > 0.99 and over["p_two_sided"] == pytest.approx(0.0027, abs=1e-4)
    assert over["abs_z"] == 3.0


def test_summarize_records_walks_nested_numbers_and_rates():
    records = [
        {"z": 3.0, "acc": {"test": 0.9}, "detected": True, "name": "a", "extra": 1.0},
        {"z": 2.0, "acc": {"test": 0.8}, "detected": False, "name": "b"},
        {"z": 4.0, "acc": {"test": 0.85}, "detected": True, "name": "c"},
    ]
    out = stats.summarize_records(records)
    assert out["z"]["mean"] == 3.0 and out["z"]["values"] == [3.0, 2.0, 4.0]
    assert out["acc"]["test"]["mean"] == pytest.approx(0.85)
    assert (out["detected"]["k"], out["detected"]["n"]) == (2, 3)
    assert "name" not in out and "extra" not in out
    with pytest.raises(InfluxValueError, match="'acc.test'"):
        stats.summarize_records([{"acc": {"test": 1.0}}, {"acc": {"test": float("inf")}}])
