"""Robust aggregators against direct, loop-by-loop evaluations of their definitions."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from utils import assert_close

from influx import aggregate
from influx.errors import InfluxValueError


def stack(m: int, p: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def loop_coordinatewise(values: torch.Tensor, reduce) -> torch.Tensor:
    """Apply ``reduce`` (a function of a Python list) to every column of [M, P]."""
    return torch.tensor(
        [reduce(values[:, j].tolist()) for j in range(values.shape[1])], dtype=torch.float64
    )


def loop_trimmed(column: list[float], k: int) -> float:
    kept = sorted(column)[k : len(column) - k]
    return sum(kept) / len(kept)


def loop_krum_scores(values: torch.Tensor, f: int) -> list[float]:
    m = values.shape[0]
    scores = []
    for i in range(m):
        distances = sorted(
            sum((a - b) ** 2 for a, b in zip(values[i].tolist(), values[j].tolist()))
            for j in range(m)
            if j != i
        )
        scores.append(sum(distances[: m - f - 2]))
    return scores


def loop_multi_krum(values: torch.Tensor, f: int, m: int) -> torch.Tensor:
    scores = loop_krum_scores(values, f)
    # smallest score first, the lower index first among equal scores
    chosen = sorted(range(len(scores)), key=lambda i: (scores[i], i))[:m]
    return values[chosen].mean(0)


# All comparisons in float64; the loops sum in another order, so rtol 1e-10 (tests/utils.py).


@pytest.mark.parametrize("m", [1, 2, 5, 6])
def test_mean_and_median_match_the_loops(m):
    values = stack(m)
    assert_close(aggregate.mean()(values), loop_coordinatewise(values, lambda c: sum(c) / len(c)))
    # statistics.median averages the two middle values for even M, like the definition
    assert_close(
        aggregate.coordinate_median()(values), loop_coordinatewise(values, statistics.median)
    )


def test_median_with_ties():
    values = torch.tensor([[1.0, 2.0], [1.0, 5.0], [3.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    assert_close(aggregate.coordinate_median()(values), torch.tensor([1.0, 2.0]).double())


@pytest.mark.parametrize(
    "m, beta, k",
    [(10, 0.0, 0), (10, 0.19, 1), (10, 0.2, 2), (10, 0.49, 4), (7, 0.3, 2), (100, 0.29, 29)],
    ids=["beta0", "below-boundary", "at-boundary", "max", "odd", "rounding"],
)
def test_trimmed_mean_fraction_drops_floor_beta_m_from_each_end(m, beta, k):
    values = stack(m)
    expected = loop_coordinatewise(values, lambda c: loop_trimmed(c, k))
    assert_close(aggregate.trimmed_mean(beta)(values), expected)


@pytest.mark.parametrize("m, count", [(5, 0), (5, 1), (5, 2), (8, 3)])
def test_trimmed_mean_count(m, count):
    values = stack(m)
    expected = loop_coordinatewise(values, lambda c: loop_trimmed(c, count))
    assert_close(aggregate.trimmed_mean(count=count)(values), expected)
    # dropping (M - 1) / 2 from each end of an odd M is the median
    if 2 * count + 1 == m:
        assert_close(aggregate.trimmed_mean(count=count)(values), _median(values))


def _median(values):
    return loop_coordinatewise(values, statistics.median)


def test_trimmed_mean_with_ties_and_its_limits():
    values = torch.tensor([[0.0], [0.0], [0.0], [9.0], [-9.0]], dtype=torch.float64)
    assert aggregate.trimmed_mean(count=1)(values).item() == 0.0
    with pytest.raises(InfluxValueError, match=r"drops 2 values from each end of M=4"):
        aggregate.trimmed_mean(count=2)(stack(4))
    with pytest.raises(InfluxValueError, match=r"beta must lie in \[0, 0.5\)"):
        aggregate.trimmed_mean(0.5)
    with pytest.raises(InfluxValueError, match="exactly one of beta"):
        aggregate.trimmed_mean(0.1, count=1)
    assert aggregate.trimmed_mean(count=2).min_inputs == 5


@pytest.mark.parametrize("f, m", [(0, 3), (0, 6), (1, 5), (1, 8), (2, 7), (2, 12)])
def test_krum_scores_and_choice_match_the_definition(f, m):
    values = stack(m, seed=f * 100 + m)
    scores = loop_krum_scores(values, f)
    assert_close(aggregate.krum_scores(values, f), torch.tensor(scores, dtype=torch.float64))
    best = min(range(m), key=lambda i: (scores[i], i))
    assert torch.equal(aggregate.krum(f)(values), values[best])


def test_krum_at_the_limit_of_f():
    # M = 2f + 3 is the smallest M allowed: each score sums M - f - 2 = f + 1 distances.
    assert aggregate.krum(2).min_inputs == 7
    aggregate.krum(2)(stack(7))
    with pytest.raises(InfluxValueError, match=r"needs M > 2f \+ 2 = 6 gradients; got M=6"):
        aggregate.krum(2)(stack(6))
    with pytest.raises(InfluxValueError, match=r"M > 2f \+ 2"):
        aggregate.multi_krum(1, 2)(stack(4))
    with pytest.raises(InfluxValueError, match="must be an integer >= 0"):
        aggregate.krum(-1)


def test_krum_ties_go_to_the_lowest_index():
    # Gradients 1 and 3 are identical and central: equal scores, Krum returns gradient 1.
    values = torch.tensor(
        [[4.0, 0.0], [0.0, 0.0], [0.0, 4.0], [0.0, 0.0], [-4.0, 0.0], [0.0, -4.0]],
        dtype=torch.float64,
    )
    scores = aggregate.krum_scores(values, 1)
    assert scores[1] == scores[3] and scores.argmin() == 1
    assert torch.equal(aggregate.krum(1)(values), values[1])
    # multi-Krum with m = 2 averages exactly those two
    assert torch.equal(aggregate.multi_krum(1, 2)(values), values[1])


@pytest.mark.parametrize("f, m, keep", [(1, 6, 1), (1, 6, 3), (1, 6, 6), (2, 9, 4)])
def test_multi_krum_matches_the_definition(f, m, keep):
    values = stack(m, seed=m + keep)
    assert_close(aggregate.multi_krum(f, keep)(values), loop_multi_krum(values, f, keep))
    if keep == 1:
        assert torch.equal(aggregate.multi_krum(f, 1)(values), aggregate.krum(f)(values))
    if keep == m:
        assert_close(aggregate.multi_krum(f, m)(values), values.mean(0))
    with pytest.raises(InfluxValueError, match=f"averages m={m + 1} of only M={m}"):
        aggregate.multi_krum(f, m + 1)(values)


def test_krum_and_median_resist_byzantine_gradients_the_mean_does_not():
    honest = 0.1 * stack(7, p=20)
    byzantine = torch.full((2, 20), 100.0, dtype=torch.float64)
    values = torch.cat([honest, byzantine])
    assert aggregate.mean()(values).abs().max() > 10
    chosen = aggregate.krum(2)(values)
    assert any(torch.equal(chosen, row) for row in honest)
    assert aggregate.coordinate_median()(values).abs().max() < 1
    assert aggregate.trimmed_mean(count=2)(values).abs().max() < 1


@pytest.mark.parametrize(
    "rule",
    [aggregate.mean(), aggregate.coordinate_median(), aggregate.trimmed_mean(0.2),
     aggregate.krum(1), aggregate.multi_krum(1, 3)],
    ids=repr,
)  # fmt: skip
def test_mappings_are_flattened_into_one_vector(rule):
    values = stack(6, p=11)
    shapes = {"w": (2, 3), "b": (5,)}
    as_mapping = {"w": values[:, :6].reshape(6, 2, 3), "b": values[:, 6:]}
    as_list = [{"w": as_mapping["w"][i], "b": as_mapping["b"][i]} for i in range(6)]
    expected = rule(values)
    for form in (as_mapping, as_list):
        out = rule(form)
        assert {k: tuple(v.shape) for k, v in out.items()} == shapes
        assert torch.equal(torch.cat([out["w"].flatten(), out["b"]]), expected)


def test_repr_reads_like_the_call():
    assert repr(aggregate.krum(1)) == "krum(f=1)"
    assert repr(aggregate.multi_krum(1, 3)) == "multi_krum(f=1, m=3)"
    assert repr(aggregate.trimmed_mean(0.1)) == "trimmed_mean(beta=0.1)"


def test_bad_inputs_raise_clear_errors():
    values = stack(4)
    values[2, 1] = math.nan
    with pytest.raises(InfluxValueError, match=r"gradients \[2\] \(of M=4\) contain NaN"):
        aggregate.mean()(values)
    with pytest.raises(InfluxValueError, match="M = 0"):
        aggregate.mean()(torch.zeros(0, 3))
    with pytest.raises(InfluxValueError, match=r"shape \[M, P\]"):
        aggregate.mean()(torch.zeros(3))
    with pytest.raises(InfluxValueError, match="same names"):
        aggregate.mean()([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}])
    with pytest.raises(InfluxValueError, match="same number M"):
        aggregate.mean()({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)})
