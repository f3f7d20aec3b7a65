"""Validation of numeric settings (rates, sizes, counts, seeds), shared by every module.

A number setting is a real number of any type (Python or numpy scalars) but never a bool (a bool
is an int to Python, never a setting); it must be finite. An integer setting is an integral
number of any type, again never a bool. A bad value raises
:class:`~influx.errors.InfluxValueError` naming the setting, what is required and the value got,
e.g. ``max_grad_norm must be a finite number > 0; got inf``. The checks return the value as a
Python ``float`` / ``int``, so numpy scalars do not meet tensors in numpy's terms downstream.

Two rules shared by many modules live here too: :func:`check_choice` (a setting that names one of
a few options) and :func:`check_damping` (the one rule for a curvature damping).

A leaf: imports nothing from influx but :mod:`influx.errors`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import NoReturn

from influx.errors import InfluxValueError

__all__ = [
    "check_choice",
    "check_count_or_none",
    "check_damping",
    "check_integer",
    "check_number",
    "is_integer",
    "is_real",
]


def is_real(value) -> bool:
    """Whether ``value`` is a real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """Whether ``value`` is an integral number (numpy integers included), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_number(
    name: str,
    value,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    hint: str = "",
) -> float:
    """``value`` as a float if it is a finite real number within the bounds given, else an error.

    Give at most one lower bound (``above``: > it, ``at_least``: >= it) and at most one upper
    bound (``below``: <, ``at_most``: <=). ``hint`` is appended to the message in parentheses.
    The message reads ``{name} must be a finite number > 0; got ...`` for a lower bound alone and
    ``{name} must lie in (0, 1]; got ...`` for an interval.
    """
    if (above is not None and at_least is not None) or (below is not None and at_most is not None):
        raise TypeError("give at most one of above/at_least and at most one of below/at_most")
    ok = (
        is_real(value)
        and _finite(value)
        and (above is None or value > above)
        and (at_least is None or value >= at_least)
        and (below is None or value < below)
        and (at_most is None or value <= at_most)
    )
    if not ok:
        low = above if above is not None else at_least
        high = below if below is not None else at_most
        if low is not None and high is not None:
            opening, closing = "(" if above is not None else "[", ")" if below is not None else "]"
            required = f"lie in {opening}{_show(low)}, {_show(high)}{closing}"
        elif low is not None:
            required = f"be a finite number {'>' if above is not None else '>='} {_show(low)}"
        elif high is not None:
            required = f"be a finite number {'<' if below is not None else '<='} {_show(high)}"
        else:
            required = "be a finite number"
        _refuse(name, required, value, hint)
    return float(value)


def check_integer(name: str, value, *, minimum: int | None = None, hint: str = "") -> int:
    """``value`` as an int if it is an integer (>= ``minimum`` when given), else an error:
    ``{name} must be an integer >= {minimum}; got ...``."""
    if not (is_integer(value) and (minimum is None or value >= minimum)):
        _refuse(name, "be an integer" + ("" if minimum is None else f" >= {minimum}"), value, hint)
    return int(value)


def check_count_or_none(name: str, value) -> int | None:
    """``None`` or an integer >= 1, as an int: a chunk size (``None``: everything at once), a
    top-k (``None``: no ranking)."""
    if value is None:
        return None
    if not (is_integer(value) and value >= 1):
        _refuse(name, "be a positive integer or None", value)
    return int(value)


def check_choice(name: str, value, choices: Iterable) -> None:
    """Refuse ``value`` unless it is one of ``choices``:
    ``{name} must be one of ('a', 'b'); got 'c'``."""
    choices = tuple(choices)
    if value not in choices:
        raise InfluxValueError(f"{name} must be one of {choices}; got {value!r}")


def check_damping(value, *, auto: bool = True, name: str = "damping") -> float | str:
    """The one rule for a damping added to a curvature matrix (``H + damping I``).

    A damping is a finite real number >= 0 (numpy scalars accepted, returned as a Python float;
    bools, NaN and inf refused: an infinite damping is no solve at all), or the string ``'auto'``
    where the caller estimates one from the spectrum (``auto=True``; returned as is). Anything
    else raises ``damping must be a finite number >= 0 or 'auto'; got ...``.
    """
    if auto and isinstance(value, str) and value == "auto":
        return value
    if not (is_real(value) and _finite(value) and value >= 0):
        _refuse(name, "be a finite number >= 0" + (" or 'auto'" if auto else ""), value)
    return float(value)


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _show(bound) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def _refuse(name: str, required: str, value, hint: str = "") -> NoReturn:
    suffix = f" ({hint})" if hint else ""
    raise InfluxValueError(f"{name} must {required}; got {value!r}{suffix}")
