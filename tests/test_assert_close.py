"""The shared comparison helper: the element-wise criterion catches what the norm-wise one cannot."""

import pytest
import torch
from utils import assert_close


def _wide_range_with_error(relative_error: float):
    """Scores spanning six orders of magnitude, the smallest one off by ``relative_error``."""
    expected = torch.tensor([1.0, -3.0e-2, 2.0e-4, 5.0e-6], dtype=torch.float64)
    actual = expected.clone()
    actual[3] *= 1 + relative_error
    return actual, expected


def test_a_wrong_small_entry_passes_normwise_and_fails_elementwise():
    actual, expected = _wide_range_with_error(1e-3)  # abs error 5e-9, far below 1e-5 * 1.0
    assert_close(actual, expected, rtol=1e-5, name="norm-wise")
    with pytest.raises(AssertionError, match=r"worst at index \(3,\)"):
        assert_close(actual, expected, rtol=1e-5, elementwise=True, name="element-wise")


def test_elementwise_passes_within_each_entrys_own_bound():
    actual, expected = _wide_range_with_error(1e-6)
    assert_close(actual, expected, rtol=1e-5, elementwise=True)


def test_elementwise_names_the_entry_that_exceeds_its_bound_most():
    expected = torch.tensor([[1.0, 2.0], [1e-3, 4.0]], dtype=torch.float64)
    actual = expected.clone()
    actual[0, 1] += 1e-4  # 5e-5 relative: 5x the bound
    actual[1, 0] += 1e-6  # 1e-3 relative: 100x the bound, the worst
    with pytest.raises(AssertionError) as info:
        assert_close(actual, expected, rtol=1e-5, elementwise=True, name="m")
    message = str(info.value)
    assert "2 of 4 entries" in message and "worst at index (1, 0)" in message


def test_elementwise_zero_expected_entry_needs_atol():
    expected = torch.tensor([1.0, 0.0], dtype=torch.float64)
    actual = torch.tensor([1.0, 1e-12], dtype=torch.float64)
    with pytest.raises(AssertionError, match=r"worst at index \(1,\)"):
        assert_close(actual, expected, rtol=1e-10, elementwise=True)
    assert_close(actual, expected, rtol=1e-10, atol=1e-11, elementwise=True)


def test_default_dtype_tolerance_and_nan_still_apply_elementwise():
    expected = torch.tensor([1.0, 2.0], dtype=torch.float32)
    assert_close(expected * (1 + 1e-6), expected, elementwise=True)
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(torch.tensor([1.0, float("nan")]), expected, elementwise=True)
