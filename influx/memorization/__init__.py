"""Memorization: the Feldman–Zhang subsampled estimator over vmapped model ensembles, and proxies.

- :mod:`influx.memorization.estimate`: :func:`estimate` (trains the ensembles, resumable, split
  over ranks), :func:`merge`, :func:`from_runs` (the estimator on runs made elsewhere) and
  :class:`MemorizationResult`.
- :mod:`influx.memorization.proxies`: :func:`self_influence`, :func:`tracin_self_influence`,
  :func:`confidence`, :func:`cumulative_loss`, :func:`curvature`, :func:`final_loss`,
  :func:`margin`, and the :class:`TrainingRecord` the training-time ones read.
- :mod:`influx.memorization.compare`: :func:`compare` correlates each proxy with the estimate.

The ensembles themselves (:class:`Ensemble`, :func:`subset_masks`, the trainer) live in
:mod:`influx.ensembles`; they are re-exported here, and :func:`fit_ensemble` keeps its old
argument order here, deprecated.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from influx import ensembles
from influx.data import LossFn
from influx.ensembles import Ensemble, subset_masks
from influx.memorization.compare import LOW_MEANS_MEMORIZED, Comparison, compare
from influx.memorization.estimate import MemorizationResult, estimate, from_runs, merge
from influx.memorization.proxies import (
    TrainingRecord,
    confidence,
    cumulative_loss,
    curvature,
    final_loss,
    margin,
    record,
    self_influence,
    tracin_self_influence,
    train_and_record,
)
from influx.train import cross_entropy_per_example

__all__ = [
    "LOW_MEANS_MEMORIZED",
    "Comparison",
    "Ensemble",
    "MemorizationResult",
    "TrainingRecord",
    "compare",
    "confidence",
    "cumulative_loss",
    "curvature",
    "estimate",
    "final_loss",
    "fit_ensemble",
    "from_runs",
    "margin",
    "merge",
    "record",
    "self_influence",
    "subset_masks",
    "tracin_self_influence",
    "train_and_record",
]


def fit_ensemble(
    model_fn: Callable[[], nn.Module],
    train,
    masks: torch.Tensor,
    *,
    loss_fn: LossFn = cross_entropy_per_example,
    **options,
) -> Ensemble:
    """Deprecated: ``influx.ensembles.fit_ensemble(model_fn, loss_fn, train, masks, ...)``, the
    same trainer with the loss in its conventional place."""
    warnings.warn(
        "influx.memorization.fit_ensemble(model_fn, train, masks, loss_fn=...) is deprecated: "
        "call influx.ensembles.fit_ensemble(model_fn, loss_fn, train, masks, ...)",
        DeprecationWarning,
        stacklevel=2,
    )
    return ensembles.fit_ensemble(model_fn, loss_fn, train, masks, **options)
