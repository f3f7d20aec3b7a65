"""Forgetting quality against a direct, per-example, per-threshold evaluation of its definition.

The reference below walks the competition's rules one example and one threshold at a time
(comparisons of every model's signal with every threshold, the grids built by numpy / torch
linspace calls, epsilon by ``math.log``); the library counts by binary search over sorted signals,
builds the grids in one vectorized expression and reads epsilons from a table of counts.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from influx.audit.forgetting import (
    EPSILON_CAP,
    _interval_counts,
    _numpy_linspace,
    _roles,
    _single_counts,
    bucket_points,
    bucket_scores,
    example_epsilons,
    final_score,
    forgetting_quality,
)
from influx.errors import InfluxValueError

DELTA = 1e-5


def direct_threshold_epsilon(false_pos: int, false_neg: int, n: int, delta: float):
    """Epsilon of one threshold, or None when the rules discard it."""
    if false_pos == 0 and false_neg == 0:
        return math.inf
    if false_pos == 0 or false_neg == 0:
        return None
    fpr, fnr = false_pos / n, false_neg / n
    terms = []
    for rate, other in ((fpr, fnr), (fnr, fpr)):
        remaining = 1 - delta - rate
        if remaining > 0:
            terms.append(math.log(remaining) - math.log(other))
        elif remaining == 0:
            terms.append(-math.inf)
    return max(0.0, max(terms)) if terms else None


def direct_pairs(unlearned: np.ndarray, retrained: np.ndarray):
    """One example's (false positives, false negatives) of every threshold of each rule.

    Returns the multisets (Counter of pairs) for the single-threshold and the interval rule, or None when the spread rule
    gives the cap.
    """
    n = len(unlearned)
    if np.median(retrained) > np.median(unlearned):
        pos, neg = retrained, unlearned
    else:
        pos, neg = unlearned, retrained
    pos_range, neg_range = np.ptp(pos), np.ptp(neg)
    large, small = max(pos_range, neg_range), min(pos_range, neg_range)
    if large > 0 and small / large < 0.01:
        return None
    # Single threshold: signal >= t predicted positive; float32 torch.linspace over both groups.
    single = Counter()
    low, high = min(pos.min(), neg.min()), max(pos.max(), neg.max())
    count = int(math.ceil((high - low) * 100))
    grid = torch.linspace(torch.tensor(low), torch.tensor(high), count, dtype=torch.float32)
    for t in grid.double().tolist():
        single[int(np.sum(neg >= t)), int(np.sum(pos < t))] += 1
    # Interval: the peakier group (ties: the negatives) is positive when inside [left, right].
    false_pos, false_neg = [], []
    peaky, other = (neg, pos) if pos_range >= neg_range else (pos, neg)
    a, b = peaky.min() + small - 2.0, peaky.max() + 2.0
    for right in np.linspace(a, b, int(np.ceil((b - a) * 100))):
        lefts = np.linspace(right - small - 2.0, right - small + 2.0, 400)[:, None]
        false_pos.extend(np.sum((lefts <= other) & (other <= right), axis=1))
        false_neg.extend(n - np.sum((lefts <= peaky) & (peaky <= right), axis=1))
    interval = Counter(zip(np.array(false_pos).tolist(), np.array(false_neg).tolist()))
    return single, interval


def direct_epsilon(unlearned: np.ndarray, retrained: np.ndarray, delta: float = DELTA) -> float:
    """One example's epsilon from [N] signals, following the rules step by step."""
    pairs = direct_pairs(unlearned, retrained)
    if pairs is None:
        return EPSILON_CAP
    n = len(unlearned)
    found = (direct_threshold_epsilon(fp, fn, n, delta) for fp, fn in pairs[0] | pairs[1])
    kept = [e for e in found if e is not None]
    return min(EPSILON_CAP, max(kept)) if kept else 0.0


def direct_scores(epsilons, num_models: int) -> list[float]:
    """Bucket scores by the literal rule: the first bucket whose upper end exceeds epsilon."""
    top = math.ceil(math.log(num_models - 1))
    starts, points, start, p = [], [], 0.0, 1.0
    while start + 0.5 <= top:
        starts.append(start)
        points.append(p)
        start, p = start + 0.5, p / 2
    scores = []
    for e in epsilons:
        scores.append(next((q for s, q in zip(starts, points) if e < s + 0.5), 0.0))
    return scores


def grid_tie_column(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A peaky group spanning [0, 1] and a wider one spanning [-1, 2.5], on the rules' grids.

    Single-threshold grid: float32 linspace(-1, 2.5, 350). Interval rule (peaky range w = 1): right
    ends numpy linspace(-1, 3, 400), left ends linspace(right - 3, right + 1, 400).
    """
    single = torch.linspace(-1.0, 2.5, 350, dtype=torch.float32).double().numpy()
    rights = np.linspace(-1.0, 3.0, 400)
    lefts = np.concatenate([np.linspace(r - 3.0, r + 1.0, 400) for r in rights[::37]])
    inner = single[(single > 0) & (single < 1)]
    peaky = np.concatenate([[0.0, 1.0], rng.choice(inner, n - 2)])
    pool = np.concatenate([single, rights, lefts])
    pool = pool[(pool > -1.0) & (pool < 2.5)]
    other = np.concatenate([[-1.0, 2.5], rng.choice(pool, n - 2)])
    return peaky, other


def synthetic_signals(num_models: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns of known kinds: same law, shifted laws, narrow-in-wide, lattice values with ties."""
    rng = np.random.default_rng(seed)
    n = num_models
    columns_u, columns_r = [], []
    for shift in (0.0, 0.3, 1.0, 3.0, -1.5):
        columns_u.append(rng.normal(shift, 1.0, n))
        columns_r.append(rng.normal(0.0, 1.0, n))
    # Narrow unlearned inside wide retrained (the interval rule's case), and the reverse.
    columns_u.append(rng.normal(0.0, 0.1, n))
    columns_r.append(rng.normal(0.0, 2.0, n))
    columns_u.append(rng.normal(0.5, 3.0, n))
    columns_r.append(rng.normal(0.0, 0.2, n))
    # Lattice values (steps of 0.25): many ties between models and with grid points.
    columns_u.append(rng.integers(-4, 5, n) / 4)
    columns_r.append(rng.integers(-2, 7, n) / 4)
    # A long-tailed pair with a wide single-threshold grid.
    columns_u.append(rng.standard_t(2, n) * 3)
    columns_r.append(rng.standard_t(2, n) * 3 + 2)
    # Equal medians (0), skewed opposite ways: the tie rule decides which group is positive.
    below, zeros = (n - 1) // 2, n - 2 * ((n - 1) // 2)
    for low, high in ((-3.0, 0.5), (-0.5, 3.0)):
        column = np.concatenate(
            [rng.uniform(low, -0.01, below), np.zeros(zeros), rng.uniform(0.01, high, below)]
        )
        (columns_u if low < -1 else columns_r).append(column)
    # Signals exactly on threshold grid points, where "<" vs "<=" decides the counts.
    peaky, other = grid_tie_column(n, rng)
    columns_u.append(peaky)
    columns_r.append(other)
    return np.stack(columns_u, axis=1), np.stack(columns_r, axis=1)


@pytest.mark.slow
def test_threshold_counts_match_direct_definition():
    # Every (false positive, false negative) pair each rule reaches, example by example: this is
    # where "<" vs "<=", the float32 grid and the roles of the groups show, signals on grid points
    # included (the last column).
    unlearned, retrained = synthetic_signals(9, seed=5)
    pos, neg, pos_range, neg_range = _roles(
        torch.from_numpy(unlearned), torch.from_numpy(retrained)
    )
    for i in range(unlearned.shape[1]):
        expected = direct_pairs(unlearned[:, i], retrained[:, i])
        if expected is None:
            continue
        rows = pos[i : i + 1], neg[i : i + 1]
        for counts, want in (
            (_single_counts(*rows), expected[0]),
            (_interval_counts(*rows, pos_range[i : i + 1], neg_range[i : i + 1]), expected[1]),
        ):
            false_pos, false_neg, valid = (part[0] for part in counts)
            got = Counter(zip(false_pos[valid].tolist(), false_neg[valid].tolist()))
            assert got == want, f"example {i}"


@pytest.mark.slow
@pytest.mark.parametrize("num_models", [8, 33])
def test_epsilons_match_direct_definition(num_models):
    unlearned, retrained = synthetic_signals(num_models, seed=num_models)
    # chunk_size=2 mixes examples with different grid sizes in one chunk.
    epsilons, _ = example_epsilons(unlearned, retrained, chunk_size=2)
    expected = [direct_epsilon(unlearned[:, i], retrained[:, i]) for i in range(unlearned.shape[1])]
    # The same counts enter the same formula; math.log and torch.log differ by an ulp at most.
    np.testing.assert_allclose(epsilons.numpy(), expected, rtol=1e-12, atol=0)
    quality = forgetting_quality(unlearned, retrained)
    assert quality.score == pytest.approx(np.mean(direct_scores(expected, num_models)), abs=1e-15)


def test_identical_signals_give_the_top_bucket():
    signals = np.random.default_rng(0).normal(size=(64, 20))
    quality = forgetting_quality(signals, signals.copy())
    # Same samples: FPR = 1 - FNR at every threshold, so both log ratios are <= 0 and floor to 0.
    assert torch.equal(quality.epsilons, torch.zeros(20, dtype=torch.float64))
    assert quality.score == 1.0
    assert quality.bucket_counts[0] == 20


def test_separated_distributions_give_the_cap():
    rng = np.random.default_rng(1)
    unlearned = rng.normal(0.0, 1.0, (32, 10))
    retrained = rng.normal(20.0, 1.0, (32, 10))
    quality = forgetting_quality(unlearned, retrained)
    # A threshold between the groups has FPR = FNR = 0: infinite epsilon, clipped to the cap.
    assert torch.equal(quality.epsilons, torch.full((10,), EPSILON_CAP, dtype=torch.float64))
    assert not quality.spread_capped.any()
    assert quality.score == 0.0
    assert quality.bucket_counts[-1] == 10


def test_hand_calculation_partial_overlap():
    # N = 4. Retrained {1.5, 2.5, 3.5, 4.5} (median 3) is positive against unlearned {0, 1, 2, 3}.
    # Best thresholds leave one error on each side (t in (2, 2.5], or the interval [<=0, 2.x]):
    # FPR = FNR = 1/4, eps = log((1 - 1/4 - delta) / (1/4)); every other threshold is lower or
    # discarded. With 4 models the buckets cover [0, ceil(ln 3)) = [0, 2): eps ~ 1.0986 scores 1/4.
    unlearned = np.array([[0.0, 1.0, 2.0, 3.0]]).T
    retrained = unlearned + 1.5
    expected = math.log((0.75 - DELTA) / 0.25)
    for u, r in ((unlearned, retrained), (retrained, unlearned)):
        quality = forgetting_quality(u, r)
        assert quality.epsilons.item() == pytest.approx(expected, rel=1e-14)
        assert quality.score == 0.25
        assert quality.bucket_points.tolist() == [1.0, 0.5, 0.25, 0.125]


def test_hand_calculation_interval_rule():
    # Narrow unlearned {-0.3, -0.1, 0.1, 0.3} inside wide retrained {-3, -1, 1, 3}, equal medians
    # (the unlearned group is then positive). Single thresholds reach at most
    # FNR = 1/4, FPR = 1/2: eps = log((1 - 1/2 - delta) / (1/4)). The interval [-0.5, 0.5] holds all
    # unlearned and no retrained signal (FPR = FNR = 0), so eps is the cap.
    unlearned = np.array([[-0.3, -0.1, 0.1, 0.3]]).T
    retrained = np.array([[-3.0, -1.0, 1.0, 3.0]]).T
    assert direct_epsilon(unlearned[:, 0], retrained[:, 0]) == EPSILON_CAP
    assert forgetting_quality(unlearned, retrained).epsilons.item() == EPSILON_CAP
    # Without the inner gap, both rules leave errors: move a retrained signal into the narrow band.
    retrained = np.array([[-3.0, 0.0, 1.0, 3.0]]).T
    epsilon = forgetting_quality(unlearned, retrained).epsilons.item()
    assert epsilon == pytest.approx(direct_epsilon(unlearned[:, 0], retrained[:, 0]), rel=1e-12)
    assert epsilon < EPSILON_CAP


def test_spread_rule():
    rng = np.random.default_rng(2)
    retrained = rng.normal(0.0, 1.0, (16, 1))
    width = np.ptp(retrained)
    # Unlearned range just under / just over 1% of the retrained range, overlapping it.
    narrow = np.linspace(0.0, 0.0099 * width, 16)[:, None]
    wider = np.linspace(0.0, 0.0101 * width, 16)[:, None]
    capped = forgetting_quality(narrow, retrained)
    assert capped.spread_capped.item() and capped.epsilons.item() == EPSILON_CAP
    free = forgetting_quality(wider, retrained)
    assert not free.spread_capped.item()
    assert free.epsilons.item() == pytest.approx(direct_epsilon(wider[:, 0], retrained[:, 0]))


def test_constant_groups():
    same = np.full((5, 1), 2.0)
    # Both ranges 0: the spread ratio is 0/0 and does not fire. Equal constants: no threshold is
    # kept (each has FPR or FNR 0 but not both) -> 0. Different constants: perfectly separated.
    assert forgetting_quality(same, same).epsilons.item() == 0.0
    assert forgetting_quality(same, same + 1).epsilons.item() == EPSILON_CAP
    assert direct_epsilon(same[:, 0], same[:, 0]) == 0.0


def test_buckets():
    assert bucket_points(512).numel() == 14  # ceil(ln 511) = 7
    assert bucket_points(3).tolist() == [1.0, 0.5]  # ceil(ln 2) = 1
    assert bucket_points(2).numel() == 0
    epsilons = [0.0, 0.49, 0.5, 0.99, 1.0, 6.49, 6.5, 6.99, 7.0, 12.0, 50.0]
    for n in (3, 4, 100, 512):
        assert bucket_scores(epsilons, n).tolist() == direct_scores(epsilons, n)
    with pytest.warns(UserWarning, match="no epsilon bucket"):
        assert forgetting_quality(np.zeros((2, 3)), np.ones((2, 3))).score == 0.0


@pytest.mark.parametrize("num_models", [3, 512])
def test_infinite_and_huge_epsilons_score_zero(num_models):
    # Beyond 2^63 / 2 (and inf) floor(2 e) has no int64 value; such epsilons are far past B/2.
    epsilons = [4e18, 5e18, 1e19, 1e300, math.inf]
    assert bucket_scores(epsilons, num_models).tolist() == [0.0] * 5
    assert bucket_scores(epsilons, num_models).tolist() == direct_scores(epsilons, num_models)
    with pytest.raises(InfluxValueError, match="epsilons must be >= 0"):
        bucket_scores([0.3, -math.inf], num_models)


def test_numpy_linspace_is_bit_exact():
    rng = np.random.default_rng(3)
    starts = rng.normal(0.0, 10.0, 50)
    stops = starts + rng.uniform(0.5, 8.0, 50)
    nums = rng.integers(2, 500, 50)
    values, valid = _numpy_linspace(
        torch.from_numpy(starts), torch.from_numpy(stops), torch.from_numpy(nums), int(nums.max())
    )
    for i in range(50):
        row = values[i][valid[i]].numpy()
        assert np.array_equal(row, np.linspace(starts[i], stops[i], nums[i]))


def test_final_score_averages_accuracies_over_models():
    retain_u, retain_r = [0.9, 0.8, 0.85], [0.95, 0.97]
    test_u, test_r = np.array([0.7, 0.72, 0.68]), torch.tensor([0.8, 0.78])
    expected = 0.6 * (np.mean(retain_u) / np.mean(retain_r)) * (np.mean(test_u) / 0.79)
    assert final_score(0.6, retain_u, retain_r, test_u, test_r) == pytest.approx(expected, rel=1e-7)
    quality = forgetting_quality(np.zeros((4, 1)), np.zeros((4, 1)))
    assert final_score(quality, 0.9, 0.9, 0.8, 0.8) == quality.score


def test_tensor_inputs_keep_their_device_and_accept_float32():
    unlearned, retrained = synthetic_signals(8, seed=4)
    from_numpy = forgetting_quality(unlearned, retrained)
    from_torch = forgetting_quality(torch.from_numpy(unlearned), torch.from_numpy(retrained))
    assert torch.equal(from_numpy.epsilons, from_torch.epsilons)
    assert from_torch.epsilons.device == torch.device("cpu")
    single = forgetting_quality(torch.from_numpy(unlearned).float(), torch.from_numpy(retrained))
    assert single.epsilons.dtype == torch.float64


def test_errors():
    good = np.zeros((4, 3))
    with pytest.raises(InfluxValueError, match="same shape"):
        forgetting_quality(good, np.zeros((5, 3)))
    with pytest.raises(InfluxValueError, match=r"\[models, examples\]"):
        forgetting_quality(np.zeros(4), np.zeros(4))
    bad = good.copy()
    bad[1, 2] = np.nan
    with pytest.raises(InfluxValueError, match=r"positions \[2\]"):
        forgetting_quality(good, bad)
    with pytest.raises(InfluxValueError, match="at least 2 models"):
        forgetting_quality(np.zeros((1, 3)), np.zeros((1, 3)))
    with pytest.raises(InfluxValueError, match="delta"):
        forgetting_quality(good, good, delta=1.5)
    with pytest.raises(InfluxValueError, match="chunk_size"):
        forgetting_quality(good, good, chunk_size=0)
    with pytest.raises(InfluxValueError, match="must be > 0"):
        final_score(0.5, 0.9, 0.0, 0.8, 0.8)
    with pytest.raises(InfluxValueError, match="at least one forget example"):
        forgetting_quality(np.zeros((4, 0)), np.zeros((4, 0)))


@pytest.mark.parametrize(
    "accuracies",
    [(90.0, 95.0, 80.0, 85.0), (0.9, 95.0, 0.8, 0.85), (0.9, [0.95, 97.0], 0.8, 0.85),
     (0.9, 0.95, -0.1, 0.85)],
    ids=["percentages", "one percentage", "a percentage among models", "negative"],
)  # fmt: skip
def test_final_score_takes_accuracies_as_fractions_like_tug_of_war(accuracies):
    with pytest.raises(InfluxValueError, match=r"fractions in \[0, 1\] \(not percentages\)"):
        final_score(0.5, *accuracies)


@pytest.mark.parametrize("forgetting", [-0.1, 1.5, math.nan])
def test_final_score_refuses_a_forgetting_quality_outside_zero_one(forgetting):
    with pytest.raises(InfluxValueError, match=r"score F in \[0, 1\]"):
        final_score(forgetting, 0.9, 0.9, 0.8, 0.8)
