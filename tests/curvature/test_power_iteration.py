"""The one power iteration: signed Rayleigh quotients, norm ratios and many operators at once."""

from __future__ import annotations

import pytest
import torch

from influx.curvature import largest_eigenvalue, power_iteration
from influx.errors import InfluxValueError

DTYPE = torch.float64


def _symmetric(count: int, size: int, seed: int) -> torch.Tensor:
    """[count, size, size] symmetric matrices with a well-separated top eigenvalue."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(count, size, size, generator=generator, dtype=DTYPE))[0]
    values = torch.linspace(-1.0, 0.5, size, dtype=DTYPE).repeat(count, 1)
    values[:, 0] = torch.tensor([-3.0, 2.0, 4.0, -5.0][:count], dtype=DTYPE)  # the top |eigenvalue|
    return basis @ torch.diag_embed(values) @ basis.mT


def test_rows_are_independent_power_iterations_each_equal_to_a_single_one():
    matrices = _symmetric(4, 9, seed=0)
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(4, 9, generator=generator, dtype=DTYPE)
    rows = power_iteration(
        lambda v: (matrices @ v[..., None])[..., 0], 9, iterations=200, start=start
    )
    assert rows.shape == (4,)
    for k in range(4):
        single = power_iteration(lambda v, m=matrices[k]: m @ v, 9, iterations=200, start=start[k])
        assert isinstance(single, float)
        # The same arithmetic row by row: the batched run is the single run to a few ulps.
        assert abs(float(rows[k]) - single) <= 1e-13 * abs(single)
    # The signed eigenvalue of largest magnitude: a gap of 1.5 or more converges in far fewer
    # than 200 steps, to rounding.
    expected = torch.tensor([-3.0, 2.0, 4.0, -5.0], dtype=DTYPE)
    assert torch.allclose(rows, expected, rtol=1e-12, atol=0)


def test_shift_gives_the_smallest_eigenvalue_of_a_symmetric_operator():
    matrix = _symmetric(1, 9, seed=2)[0]  # spectrum: -3 and [-1, 0.5]
    top = power_iteration(lambda v: matrix @ v, 9, iterations=300, shift=0.5, dtype=DTYPE)
    assert abs(top - (-3.0)) <= 1e-10


def test_the_norm_ratio_needs_no_symmetry():
    generator = torch.Generator().manual_seed(3)
    basis = torch.randn(8, 8, generator=generator, dtype=DTYPE)
    values = torch.tensor([-6.0, 1.0, 0.5, 0.3, -0.2, 0.1, 0.05, 0.01], dtype=DTYPE)
    matrix = basis @ torch.diag(values) @ torch.linalg.inv(basis)  # not symmetric, |mu_max| = 6
    block = lambda v: v @ matrix.T  # noqa: E731 - rows [K, P] -> (M v)^T
    top = largest_eigenvalue(block, 8, iterations=200, seed=0, dtype=DTYPE)
    assert abs(top - 6.0) <= 1e-9 * 6.0
    start = torch.randn(1, 8, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    same = power_iteration(block, 8, iterations=200, start=start, quotient="norm")
    assert float(same[0]) == top


def test_a_zero_operator_gives_zero_not_nan():
    assert power_iteration(lambda v: 0 * v, 5, iterations=3, shift=0.0) == 0.0
    rows = power_iteration(lambda v: 0 * v, 5, iterations=3, start=torch.ones(2, 5))
    assert torch.equal(rows, torch.zeros(2))
    assert largest_eigenvalue(lambda v: 0 * v, 5, iterations=3, seed=0, dtype=DTYPE) == 0.0


def test_bad_settings_are_refused():
    with pytest.raises(InfluxValueError, match=r"quotient must be one of \('rayleigh', 'norm'\)"):
        power_iteration(lambda v: v, 3, quotient="ratio")
    with pytest.raises(InfluxValueError, match="quotient='norm' takes no shift"):
        power_iteration(lambda v: v, 3, quotient="norm", shift=1.0)
