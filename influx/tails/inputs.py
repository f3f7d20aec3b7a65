"""The one check of the scores every fit of influx.tails takes: finite, one-dimensional, at
least 10 of them, not all equal."""

from __future__ import annotations

import numpy as np

from influx.errors import InfluxValueError


def check_scores(scores) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1:
        raise InfluxValueError(
            f"scores must be one-dimensional [N]; got shape {x.shape}: pass scores.ravel()"
        )
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise InfluxValueError(
            f"scores contain {bad.size} NaN/inf values at indices {bad[:10].tolist()}"
            f"{' ...' if bad.size > 10 else ''}: drop or fix those examples before fitting"
        )
    if x.size < 10:
        raise InfluxValueError(f"need at least 10 scores to fit tails; got {x.size}")
    if np.ptp(x) == 0:
        raise InfluxValueError("all scores are equal: no distribution can be fitted")
    return x
