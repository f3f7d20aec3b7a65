"""``fit`` and the fitted :class:`Influence`: one interface over every estimator.

Sign convention (Koh & Liang 2017). With H the Hessian (or GGN) of the *mean* training loss
L(theta) = (1/N) sum_i l(z_i; theta), no other normalization, plus ``damping`` times the identity:

    I_up,loss(z, z_test) = - grad l(z_test)^T (H + damping I)^-1 grad l(z)

Upweighting z by eps changes the test loss by eps * I_up,loss; *removing* z (eps = -1/N) changes
it by about ``-(1/N) I_up,loss``. So a negative score marks a helpful train point (removing it
raises the test loss) and a positive one a harmful point.
Self-influence: s(z) = grad l(z)^T (H + damping I)^-1 grad l(z) = -I_up,loss(z, z) (>= 0 for PSD H).
TracIn: TracIn(z, z') = sum_t eta_t grad l(w_t, z) . grad l(w_t, z'), and grad_dot / grad_cos the
same at the final weights; these have sign +1 (positive = helpful) and self-influence equal to the
diagonal of their scores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from torch import nn

from influx.data import as_tensors
from influx.errors import InfluxValueError
from influx.grads.functional import LossFn
from influx.influence.base import Estimator, options_with_batch_size
from influx.influence.scores import Scores, stream_scores

DEFAULT_SCORE_BATCH = 512
METHODS = (
    "exact",
    "cg",
    "lissa",
    "arnoldi",
    "kfac",
    "ekfac",
    "trak",
    "tracin",
    "grad_dot",
    "grad_cos",
)
# Train features are kept in memory after the first pass when they fit in this many bytes.
CACHE_BYTES = 1 << 30


def _build(
    method: str, model, loss_fn, inputs, targets, options: dict, batch_size: int | None
) -> Estimator:
    build_options = partial(options_with_batch_size, batch_size=batch_size)
    if method == "exact":
        from influx.influence.exact import ExactEstimator, ExactOptions

        return ExactEstimator(
            model, loss_fn, inputs, targets, build_options(ExactOptions, method, options)
        )
    if method in ("cg", "lissa", "arnoldi"):
        from influx.influence.iterative import IterativeEstimator, IterativeOptions

        opts = build_options(IterativeOptions, method, options)
        return IterativeEstimator(model, loss_fn, inputs, targets, opts, method=method)
    if method in ("kfac", "ekfac"):
        from influx.influence.kfac import KFACEstimator, KFACOptions

        opts = build_options(KFACOptions, method, options)
        return KFACEstimator(
            model, loss_fn, inputs, targets, opts, eigen_corrected=method == "ekfac"
        )
    if method == "trak":
        from influx.influence.trak import TRAKEstimator, TRAKOptions

        return TRAKEstimator(
            model, loss_fn, inputs, targets, build_options(TRAKOptions, method, options)
        )
    if method == "tracin":
        from influx.influence.tracin import TracInEstimator, TracInOptions

        return TracInEstimator(model, loss_fn, build_options(TracInOptions, method, options))
    if method in ("grad_dot", "grad_cos"):
        from influx.influence.graddot import GradDotEstimator, GradDotOptions

        opts = build_options(GradDotOptions, method, options)
        return GradDotEstimator(model, loss_fn, opts, normalize=method == "grad_cos")
    raise InfluxValueError(f"unknown method {method!r}; choose one of {METHODS}")


class Influence:
    """A fitted estimator with its training set: score queries, self-influence, per-layer shares.

    Build it with :func:`fit`. ``diagnostics`` holds the damping, the (estimated) spectrum, solver
    iterations and the fit time.
    """

    def __init__(self, method: str, estimator: Estimator, train, *, batch_size: int):
        self.method = method
        self.estimator = estimator
        self.train_inputs, self.train_targets, self.train_indices = as_tensors(train)
        self.batch_size = batch_size
        # Estimators that computed the train features while fitting (trak) hand them over.
        self._train_features: torch.Tensor | None = getattr(
            estimator, "fitted_train_features", None
        )

    @property
    def diagnostics(self) -> dict:
        return self.estimator.diagnostics

    @property
    def sign(self) -> float:
        return self.estimator.sign

    def __repr__(self) -> str:
        shown = {
            k: v for k, v in self.diagnostics.items() if not isinstance(v, (list, torch.Tensor))
        }
        return f"Influence(method={self.method!r}, train={self.train_indices.numel()}, {shown})"

    def _blocks(self, train) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Feature blocks [B, K] with dataset indices [B]; the fitted set's are cached when small."""
        if train is None and self._train_features is not None:
            for start in range(0, self._train_features.shape[0], self.batch_size):
                yield (
                    self._train_features[start : start + self.batch_size],
                    self.train_indices[start : start + self.batch_size],
                )
            return
        if train is None:
            inputs, targets, indices = self.train_inputs, self.train_targets, self.train_indices
        else:
            inputs, targets, indices = as_tensors(train)
        # Keep the fitted set's blocks only while they fit in CACHE_BYTES: past that, the pass
        # streams (memory stays one block) and the next one recomputes.
        kept: list[torch.Tensor] | None = [] if train is None else None
        kept_bytes = 0
        for start in range(0, inputs.shape[0], self.batch_size):
            stop = start + self.batch_size
            block = self.estimator.features(inputs[start:stop], targets[start:stop])
            if kept is not None:
                kept_bytes += block.numel() * block.element_size()
                if kept_bytes <= CACHE_BYTES:
                    kept.append(block)
                else:
                    kept = None
            yield block, indices[start:stop]
        if kept:
            self._train_features = torch.cat(kept)

    def _features(self, data) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets, indices = as_tensors(data)
        blocks = [
            self.estimator.features(
                inputs[s : s + self.batch_size], targets[s : s + self.batch_size]
            )
            for s in range(0, inputs.shape[0], self.batch_size)
        ]
        return torch.cat(blocks), indices

    def scores(
        self,
        query,
        train=None,
        *,
        dense: bool = True,
        top_k: int | None = None,
        per_layer: bool = False,
        store: str | Path | None = None,
    ) -> Scores:
        """Scores of every (query, train) pair, Q x N (see the module docstring for the sign).

        ``train`` defaults to the fitted training set. ``dense=False`` with ``top_k=k`` keeps only
        the k largest and smallest per query; ``store=path.npy`` writes the matrix to a memmap;
        ``per_layer=True`` adds each layer's share (the shares sum to the total).
        """
        query_features, query_indices = self._features(query)
        preconditioned = self.estimator.precondition(query_features)
        num_train = self.train_indices.numel() if train is None else as_tensors(train)[0].shape[0]
        return stream_scores(
            self.method,
            preconditioned,
            query_indices,
            self._blocks(train),
            num_train,
            sign=self.estimator.sign,
            layout=self.estimator.layout,
            dense=dense,
            top_k=top_k,
            per_layer=per_layer,
            store=store,
        )

    def self_influence(self, train=None) -> torch.Tensor:
        """s(z) = <f(z), precondition(f(z))> for every train point, [N], in O(N) (no Q x N matrix).

        For influence methods s(z) = grad l(z)^T (H + damping I)^-1 grad l(z) = -I_up,loss(z, z);
        for tracin / grad_dot / grad_cos it equals the score of z with itself.
        """
        parts = []
        for features, _ in self._blocks(train):
            parts.append(
                (features * self.estimator.precondition(features).to(features.dtype)).sum(1)
            )
        return torch.cat(parts)


def fit(
    model: nn.Module,
    loss_fn: LossFn | Callable,
    train,
    *,
    method: str,
    batch_size: int | None = None,
    **options,
) -> Influence:
    """Fit an influence estimator on ``train`` (a tuple (inputs, targets) or a Dataset).

    ``loss_fn(outputs, targets)`` returns per-example losses [N] (reduction='none'). ``method`` is
    one of exact, cg, lissa, arnoldi, kfac, ekfac, trak, tracin, grad_dot, grad_cos; ``options``
    are that method's (see ``influx.influence.describe(method)``). ``batch_size`` is the number
    of examples per forward/backward everywhere: the fit (curvature, factors, features) and the
    train blocks of scores. Default: each stage's own default (512 for scores).
    """
    if method not in METHODS:
        raise InfluxValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if batch_size is not None and batch_size < 1:
        raise InfluxValueError(f"batch_size must be >= 1; got {batch_size}")
    inputs, targets, _ = as_tensors(train)
    started = time.perf_counter()
    estimator = _build(method, model, loss_fn, inputs, targets, options, batch_size)
    estimator.diagnostics["fit_seconds"] = time.perf_counter() - started
    return Influence(method, estimator, train, batch_size=batch_size or DEFAULT_SCORE_BATCH)


def describe(method: str) -> str:
    """The options of ``method`` with their defaults and help text."""
    from dataclasses import MISSING, fields

    option_types = {
        "exact": "influx.influence.exact:ExactOptions",
        "cg": "influx.influence.iterative:IterativeOptions",
        "lissa": "influx.influence.iterative:IterativeOptions",
        "arnoldi": "influx.influence.iterative:IterativeOptions",
        "kfac": "influx.influence.kfac:KFACOptions",
        "ekfac": "influx.influence.kfac:KFACOptions",
        "trak": "influx.influence.trak:TRAKOptions",
        "tracin": "influx.influence.tracin:TracInOptions",
        "grad_dot": "influx.influence.graddot:GradDotOptions",
        "grad_cos": "influx.influence.graddot:GradDotOptions",
    }
    if method not in option_types:
        raise InfluxValueError(f"unknown method {method!r}; choose one of {METHODS}")
    import importlib

    module, name = option_types[method].split(":")
    cls = getattr(importlib.import_module(module), name)
    lines = [f"{method} options:"]
    for f in fields(cls):
        default = f.default if f.default is not MISSING else "(required)"
        lines.append(f"  {f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
