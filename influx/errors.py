"""Exceptions raised by influx.

Every error says what is wrong, what was expected and how to fix it. Each subclass also derives
from the matching builtin so callers can catch either.
"""

from __future__ import annotations


class InfluxError(Exception):
    """Base class of every error influx raises on purpose."""


class InfluxValueError(InfluxError, ValueError):
    """An argument has the wrong value, shape or type."""


class UnsupportedModelError(InfluxError, NotImplementedError):
    """The model contains something per-example analytics cannot handle as it stands."""


class InfluxRuntimeError(InfluxError, RuntimeError):
    """A computation failed at run time (numerics, storage, backend)."""
