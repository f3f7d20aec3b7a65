"""Robust aggregators against direct, loop-by-loop evaluations of their definitions."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from torch import nn
from utils import assert_close

from influx import aggregate
from influx.errors import InfluxValueError
from influx.train import cross_entropy_per_example, mean_gradient, train


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


# ---------------------------------------------------------------------------------------------
# A model with a 0-dim parameter: its M micro-batch gradients stack to [M], which has no dim 1.
# ---------------------------------------------------------------------------------------------


class TemperatureNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3).double()
        self.temperature = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x):
        return self.fc(x) / self.temperature


def numpy_krum_scores(values: np.ndarray, f: int) -> np.ndarray:
    distances = ((values[:, None, :] - values[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    return np.sort(distances, axis=1)[:, : values.shape[0] - f - 2].sum(1)


NUMPY_RULES = {
    "mean()": lambda v: v.mean(0),
    "coordinate_median()": lambda v: np.median(v, axis=0),
    # M = 7: floor(0.2 * 7) = 1 dropped from each end
    "trimmed_mean(beta=0.2)": lambda v: np.sort(v, axis=0)[1:-1].mean(0),
    "krum(f=1)": lambda v: v[np.argmin(numpy_krum_scores(v, 1))],
    "multi_krum(f=1, m=3)": lambda v: v[
        np.argsort(numpy_krum_scores(v, 1), kind="stable")[:3]
    ].mean(0),
}
RULES = [aggregate.mean(), aggregate.coordinate_median(), aggregate.trimmed_mean(0.2),
         aggregate.krum(1), aggregate.multi_krum(1, 3)]  # fmt: skip
M = 7


def temperature_data():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(3 * M, 4, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(0, 3, (3 * M,), generator=generator)


def micro_batch_gradients(model, inputs, targets) -> list[dict[str, torch.Tensor]]:
    return [
        mean_gradient(model, cross_entropy_per_example, x, y)[1]
        for x, y in zip(inputs.tensor_split(M), targets.tensor_split(M))
    ]


def numpy_aggregate(rule, gradients: list[dict[str, torch.Tensor]]) -> np.ndarray:
    values = np.stack([np.concatenate([g.numpy().ravel() for g in grads.values()])
                       for grads in gradients])  # fmt: skip
    return NUMPY_RULES[repr(rule)](values)


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_each_rule_aggregates_a_0_dim_parameter_like_numpy(rule):
    gradients = micro_batch_gradients(TemperatureNet(), *temperature_data())
    stacked = {name: torch.stack([g[name] for g in gradients]) for name in gradients[0]}
    assert stacked["temperature"].shape == (M,)
    expected = torch.from_numpy(numpy_aggregate(rule, gradients))
    for form in (stacked, gradients):
        out = rule(form)
        assert out["temperature"].shape == ()
        assert_close(torch.cat([v.reshape(-1) for v in out.values()]), expected, name=repr(rule))


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_micro_batch_training_steps_on_a_model_with_a_0_dim_parameter(rule):
    model = TemperatureNet()
    inputs, targets = temperature_data()
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    step = torch.from_numpy(numpy_aggregate(rule, micro_batch_gradients(model, inputs, targets)))
    train(model, (inputs, targets), steps=1, batch_size=3 * M, optimizer="sgd", lr=0.1,
          sampling=lambda epoch, seed: torch.arange(3 * M), micro_batches=M, aggregator=rule,
          progress=False)  # fmt: skip
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert_close(after, before - 0.1 * step, name=repr(rule))


def test_a_stacked_mapping_needs_the_m_dimension_and_counts_are_not_booleans():
    with pytest.raises(InfluxValueError, match=r"entries \['t'\] are 0-dim"):
        aggregate.mean()({"t": torch.tensor(1.0)})
    with pytest.raises(InfluxValueError, match="count must be an integer >= 0; got True"):
        aggregate.trimmed_mean(count=True)
    with pytest.raises(InfluxValueError, match="beta must lie in"):
        aggregate.trimmed_mean(False)
    # numpy scalars are numbers like any other
    values = stack(5)
    assert_close(aggregate.trimmed_mean(count=np.int64(1))(values),
                 aggregate.trimmed_mean(count=1)(values))  # fmt: skip
    assert_close(aggregate.trimmed_mean(np.float32(0.25))(values),
                 aggregate.trimmed_mean(0.25)(values))  # fmt: skip
