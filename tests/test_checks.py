"""influx.checks: numeric settings of any real type, never bools, finite, within their bounds."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from influx import grads
from influx.checks import (
    check_choice,
    check_count_or_none,
    check_damping,
    check_integer,
    check_number,
    is_integer,
    is_real,
)
from influx.errors import InfluxValueError


def test_real_and_integer_types():
    for value in (1, 2.5, np.float32(0.5), np.float64(-3.0), np.int64(7), math.inf, math.nan):
        assert is_real(value)
    for value in (True, np.bool_(True), "1", None, torch.tensor(1.0), 1 + 0j):
        assert not is_real(value)
    for value in (0, -4, np.int64(7), np.int32(2), np.uint8(3)):
        assert is_integer(value)
    for value in (False, 2.0, np.float32(2.0), "2", None):
        assert not is_integer(value)


def test_check_number_accepts_numpy_scalars_and_returns_python_floats():
    for value in (np.float32(0.25), np.float64(0.25), np.int64(3), 3):
        checked = check_number("rate", value, above=0)
        assert type(checked) is float and checked == float(value)


@pytest.mark.parametrize("bad", [True, False, "1", None, math.nan, math.inf, -math.inf, 10**400])
def test_check_number_refuses_bools_non_numbers_and_non_finite_values(bad):
    with pytest.raises(InfluxValueError, match="^rate must be a finite number; got "):
        check_number("rate", bad)
    with pytest.raises(InfluxValueError, match="rate must be a finite number >= 0; got"):
        check_number("rate", bad, at_least=0)


def test_check_number_message_names_setting_requirement_and_value():
    with pytest.raises(
        InfluxValueError, match=r"^max_grad_norm must be a finite number > 0; got inf$"
    ):
        check_number("max_grad_norm", math.inf, above=0)
    with pytest.raises(
        InfluxValueError, match=r"^tolerance must be a finite number >= 1e-06; got 0\.0 \(why\)$"
    ):
        check_number("tolerance", 0.0, at_least=1e-6, hint="why")
    with pytest.raises(InfluxValueError, match=r"^eta must be a finite number <= 2; got 3$"):
        check_number("eta", 3, at_most=2)


@pytest.mark.parametrize(
    "bounds, inside, outside, required",
    [
        (dict(above=0), [1e-12, 5], [0, -1], "be a finite number > 0"),
        (dict(at_least=0), [0, 0.0, 5], [-1e-12], "be a finite number >= 0"),
        (dict(below=1), [0.999, -5], [1, 2], "be a finite number < 1"),
        (dict(above=0, at_most=1), [1, 0.5], [0, 1.5], r"lie in \(0, 1\]"),
        (dict(above=0, below=1), [0.5], [0, 1], r"lie in \(0, 1\)"),
        (dict(at_least=0, below=0.5), [0, 0.25], [0.5, -0.1], r"lie in \[0, 0\.5\)"),
        (dict(at_least=0, at_most=1), [0, 1], [1.01, -0.01], r"lie in \[0, 1\]"),
    ],
)
def test_check_number_bounds_inclusive_and_exclusive(bounds, inside, outside, required):
    for value in inside:
        assert check_number("x", value, **bounds) == value
    for value in [*outside, math.nan, True]:
        with pytest.raises(InfluxValueError, match=f"^x must {required}; got"):
            check_number("x", value, **bounds)


def test_check_number_takes_one_bound_per_side():
    with pytest.raises(TypeError):
        check_number("x", 1, above=0, at_least=0)
    with pytest.raises(TypeError):
        check_number("x", 1, below=2, at_most=2)


def test_check_integer():
    checked = check_integer("count", np.int64(4), minimum=1)
    assert type(checked) is int and checked == 4
    assert check_integer("seed", 0, minimum=0) == 0
    assert check_integer("k", -3) == -3
    for bad in (True, False, 2.0, 2.5, np.float32(2.0), "2", None, math.inf):
        with pytest.raises(
            InfluxValueError, match=f"^count must be an integer >= 1; got {re.escape(repr(bad))}$"
        ):
            check_integer("count", bad, minimum=1)
    with pytest.raises(InfluxValueError, match=r"^steps must be an integer >= 0; got -1$"):
        check_integer("steps", -1, minimum=0)
    with pytest.raises(InfluxValueError, match=r"^k must be an integer; got 2\.5 \(a hint\)$"):
        check_integer("k", 2.5, hint="a hint")


def test_check_count_or_none():
    assert check_count_or_none("chunk_size", None) is None
    checked = check_count_or_none("chunk_size", np.int64(3))
    assert type(checked) is int and checked == 3
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(
            InfluxValueError,
            match=f"^chunk_size must be a positive integer or None; got {re.escape(repr(bad))}$",
        ):
            check_count_or_none("chunk_size", bad)


def test_per_sample_norms_refuses_a_fractional_chunk_size():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    inputs, targets = torch.randn(5, 4), torch.randint(0, 2, (5,))

    def loss_fn(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    with pytest.raises(
        InfluxValueError, match=r"chunk_size must be a positive integer or None; got 2\.5"
    ):
        grads.per_sample_norms(model, loss_fn, inputs, targets, chunk_size=2.5)
    norms = grads.per_sample_norms(model, loss_fn, inputs, targets, chunk_size=np.int64(2))
    assert torch.allclose(norms, grads.per_sample_norms(model, loss_fn, inputs, targets))


def test_check_choice_names_the_choices_and_the_value():
    check_choice("mode", "a", ("a", None))
    check_choice("mode", None, ("a", None))
    with pytest.raises(
        InfluxValueError, match=re.escape("mode must be one of ('a', 'b'); got 'c'")
    ):
        check_choice("mode", "c", iter(["a", "b"]))


def test_check_damping_accepts_real_numbers_and_auto_where_allowed():
    for value in (0, 0.0, 2, 1e-3, np.float32(0.5), np.float64(0.25), np.int64(3)):
        checked = check_damping(value)
        assert type(checked) is float and checked == float(value)
    assert check_damping("auto") == "auto"
    with pytest.raises(
        InfluxValueError, match=r"^damping must be a finite number >= 0; got 'auto'"
    ):
        check_damping("auto", auto=False)


@pytest.mark.parametrize(
    "bad", [True, False, np.bool_(True), -1e-9, math.inf, math.nan, "1", "Auto", None, 10**400]
)
def test_check_damping_refuses_bools_negatives_and_non_finite_values(bad):
    with pytest.raises(
        InfluxValueError, match=r"^damping must be a finite number >= 0 or 'auto'; got"
    ):
        check_damping(bad)
    with pytest.raises(InfluxValueError, match=r"^damping must be a finite number >= 0; got"):
        check_damping(bad, auto=False)


def _tiny_regression():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(12, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(12, 2, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    return nn.Linear(3, 2).double(), inputs, targets


def _newton(damping):
    from influx import unlearn
    from influx.train import mse_per_example

    model, inputs, targets = _tiny_regression()
    forget, retain = (inputs[:2], targets[:2]), (inputs[2:], targets[2:])
    return unlearn.newton(model, mse_per_example, forget, retain, damping=damping,
                          solver="dense", budget=math.inf, progress=False)  # fmt: skip


def _influence(damping):
    from influx import influence
    from influx.train import mse_per_example

    model, inputs, targets = _tiny_regression()
    return influence.fit(model, mse_per_example, (inputs, targets), method="exact", damping=damping)


def _resolve(damping):
    from influx.curvature import Spectrum, resolve_damping

    return resolve_damping(damping, Spectrum(mean=1.0, maximum=2.0, minimum=0.5))


@pytest.mark.parametrize("caller", [_newton, _influence, _resolve])
@pytest.mark.parametrize("bad", [True, math.inf, math.nan, -1.0])
def test_every_damping_follows_the_one_rule(caller, bad):
    with pytest.raises(InfluxValueError, match="damping must be a finite number >= 0"):
        caller(bad)


@pytest.mark.parametrize("caller", [_newton, _influence, _resolve])
def test_every_damping_takes_numpy_scalars(caller):
    caller(np.float64(0.5))
    caller(np.float32(0.5))
