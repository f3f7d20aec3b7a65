"""The per-sample gradient engine."""

from influx.grads import reference
from influx.grads.functional import flatten_per_sample, select_parameters

__all__ = ["flatten_per_sample", "reference", "select_parameters"]
