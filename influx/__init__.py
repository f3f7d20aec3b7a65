"""influx: fast per-example gradient analytics.

Submodules are imported on first use (``influx.influence``, ``influx.commutator``, ...) so that
``import influx`` stays cheap and a missing optional dependency only affects the part that needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from influx.errors import InfluxError, InfluxValueError, UnsupportedModelError

__version__ = "0.1.0"

_SUBMODULES = (
    "aggregate",
    "audit",
    "commutator",
    "curvature",
    "data",
    "distributed",
    "dp",
    "ensembles",
    "grads",
    "influence",
    "kernels",
    "memorization",
    "models",
    "poison",
    "provenance",
    "report",
    "shift",
    "stats",
    "store",
    "tails",
    "train",
    "unlearn",
    "unlearnable",
)

__all__ = ["InfluxError", "InfluxValueError", "UnsupportedModelError", "__version__", *_SUBMODULES]

if TYPE_CHECKING:  # pragma: no cover
    from influx import (  # noqa: F401
        aggregate,
        audit,
        commutator,
        curvature,
        data,
        distributed,
        dp,
        ensembles,
        grads,
        influence,
        kernels,
        memorization,
        models,
        poison,
        report,
        shift,
        store,
        tails,
        train,
        unlearn,
        unlearnable,
    )


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"influx.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'influx' has no attribute {name!r}")
