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
diagonal of their scores. Each method's sign is in :data:`REGISTRY` and travels with its
:class:`Scores`.

Measurements. ``scores(query, measurement=m)`` scores each query through ``m(outputs, targets)
-> [Q]`` (a logit, a margin, a log-probability) instead of its training loss: the query feature is
the gradient of m, the train feature stays the gradient of the loss, and the formulas keep their
sign. For the influence methods (sign -1), ``I(z, q) = - grad m(q)^T (H + damping I)^-1 grad l(z)``
is the rate at which m(q) changes when z is upweighted: positive = upweighting z raises m(q),
harmful for a loss, helpful for a margin or a log-probability (larger is better). For TracIn and
gradient similarity (sign +1), ``sum_t eta_t grad l(z) . grad m(q)`` is minus the change of m(q)
under a gradient step on z: positive = the step lowers m(q), helpful for a loss, harmful for a
margin. ``self_influence(measurement=m)`` is ``grad m(z)^T (H + damping I)^-1 grad l(z)`` (sum_t
eta_t grad m . grad l for TracIn): z measured by m against itself as a train point.

Data. ``train`` and ``query`` are data arguments (a tuple, a Dataset or a DataLoader) read batch by
batch (:mod:`influx.influence.stream`), never concatenated: each pass reads each example once, and
the checks of the data (finite inputs and losses, naming dataset indices) ride on the first pass.

Devices: features, preconditioners and scores live on the device of the model and data (dense
``values``, ``per_layer`` and ``top_k`` included); only ``store=`` writes to host memory (a file).
"""

from __future__ import annotations

import importlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
from torch import nn

from influx.data import as_tensors
from influx.errors import InfluxValueError
from influx.grads.common import (
    LossFn,
    check_finite,
    check_model,
    select_parameters,
)
from influx.influence import stream
from influx.influence.base import Estimator, default_batch_size, options_with_batch_size
from influx.influence.scores import (
    Scores,
    TrainBlock,
    check_scores_path,
    check_top_k,
    stream_scores,
)
from influx.influence.stream import CACHE_BYTES, check_data  # noqa: F401 - importable from here


@dataclass(frozen=True)
class Method:
    """One estimator: its options class and estimator class (``module:Name``, imported on first
    use), the sign of its scores, and the keyword arguments its estimator takes for this name."""

    options: str
    estimator: str
    sign: float
    extra: dict = field(default_factory=dict)

    def load(self, path: str):
        module, name = path.split(":")
        return getattr(importlib.import_module(f"influx.influence.{module}"), name)


REGISTRY: dict[str, Method] = {
    "exact": Method("exact:ExactOptions", "exact:ExactEstimator", -1.0),
    **{
        name: Method(
            "iterative:IterativeOptions", "iterative:IterativeEstimator", -1.0, {"method": name}
        )
        for name in ("cg", "lissa", "arnoldi")
    },
    "kfac": Method("kfac:KFACOptions", "kfac:KFACEstimator", -1.0, {"eigen_corrected": False}),
    "ekfac": Method("kfac:KFACOptions", "kfac:KFACEstimator", -1.0, {"eigen_corrected": True}),
    "trak": Method("trak:TRAKOptions", "trak:TRAKEstimator", -1.0),
    "tracin": Method("tracin:TracInOptions", "tracin:TracInEstimator", 1.0),
    "grad_dot": Method("graddot:GradDotOptions", "graddot:GradDotEstimator", 1.0, {"normalize": False}),
    "grad_cos": Method("graddot:GradDotOptions", "graddot:GradDotEstimator", 1.0, {"normalize": True}),
}  # fmt: skip
METHODS = tuple(REGISTRY)


def method_of(name: str) -> Method:
    if name not in REGISTRY:
        raise InfluxValueError(f"unknown method {name!r}; choose one of {METHODS}")
    return REGISTRY[name]


class Influence:
    """A fitted estimator with its training set: score queries, self-influence, per-layer shares.

    Build it with :func:`fit`. ``diagnostics`` holds the damping, the (estimated) spectrum, solver
    iterations and the fit time. ``train`` is the data argument it was fitted on, kept as given
    and read batch by batch by every pass (never concatenated).
    """

    def __init__(
        self, method: str, estimator: Estimator, train, *, batch_size: int, model=None, loss_fn=None
    ):
        self.method = method
        self.estimator = estimator
        self.model, self.loss_fn = model, loss_fn
        # Checked on its first pass (the fit's, unless the fit read nothing) when the model is known.
        self.train = stream.checked(train, model, loss_fn, "train")
        self.num_train = self.train.size
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
        """-1 for influence (I_up,loss), +1 for tracin / grad_dot / grad_cos."""
        return REGISTRY[self.method].sign

    @property
    def train_indices(self) -> torch.Tensor:
        """The dataset indices [N] of the training set, in order: a tuple's at once, a Dataset's
        from the first pass over it (read now if no pass has run yet)."""
        if self.train.indices is None:
            for _ in stream.batches(self.train, self.batch_size):
                pass
        return self.train.indices

    @property
    def train_inputs(self) -> torch.Tensor:
        """Deprecated: the whole training set's inputs, concatenated."""
        return self._whole_train("train_inputs")[0]

    @property
    def train_targets(self) -> torch.Tensor:
        """Deprecated: the whole training set's targets, concatenated."""
        return self._whole_train("train_targets")[1]

    def _whole_train(self, name: str):
        warnings.warn(
            f"Influence.{name} is deprecated: the training set is kept as given "
            "(Influence.train.data) and streamed; read it with influx.data.iter_batches",
            DeprecationWarning,
            stacklevel=3,
        )
        return as_tensors(self.train.data)

    def __repr__(self) -> str:
        shown = {
            k: v for k, v in self.diagnostics.items() if not isinstance(v, (list, torch.Tensor))
        }
        return f"Influence(method={self.method!r}, train={self.num_train}, {shown})"

    def _checked(self, data, what: str, measurement: LossFn | None = None) -> stream.Checked:
        """``data`` checked on its first pass (non-empty, finite inputs and losses, or
        measurements) when the model is known."""
        if measurement is None:
            return stream.checked(data, self.model, self.loss_fn, what)
        return stream.checked(data, self.model, measurement, what, values="measurements")

    def _feature_block(self, inputs, targets, indices, what: str) -> torch.Tensor:
        block = self.estimator.features(inputs, targets)
        check_finite(block, f"{what} gradients", indices=indices)
        return block

    def _train_data(self, train) -> stream.Checked:
        return self.train if train is None else self._checked(train, "train")

    def _cacheable(self) -> bool:
        """Whether all the fitted set's features fit in :data:`CACHE_BYTES` (decided up front,
        so a pass that cannot keep them never holds a partial list)."""
        return stream.fits_cache(self.num_train, self.estimator.bytes_per_example())

    def _contracts(self, train) -> bool:
        """Whether a pass over ``train`` contracts layer by layer without forming its features:
        for estimators that can, unless the fitted set's features are (or will be) kept."""
        if not self.estimator.contracts_layers:
            return False
        return train is not None or (self._train_features is None and not self._cacheable())

    def _blocks(self, train) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Feature blocks [B, K] with dataset indices [B]; the fitted set's are cached when small."""
        if train is None and self._train_features is not None:
            indices = self.train_indices
            for start in range(0, self._train_features.shape[0], self.batch_size):
                yield (
                    self._train_features[start : start + self.batch_size],
                    indices[start : start + self.batch_size],
                )
            return
        # Otherwise every pass streams, one block in memory, and the next one recomputes.
        kept: list[torch.Tensor] | None = [] if train is None and self._cacheable() else None
        for inputs, targets, indices in stream.batches(self._train_data(train), self.batch_size):
            block = self._feature_block(inputs, targets, indices, "train")
            if kept is not None:
                kept.append(block)
            yield block, indices
        if kept:
            self._train_features = torch.cat(kept)

    def keep_train_features(self) -> None:
        """Compute the fitted set's features now and keep them, when they fit the cache: what
        :func:`fit` does for estimators that fit nothing, so that their one pass over the
        training set (which checks it) also serves every later score and self-influence."""
        if self._train_features is None and self._cacheable():
            for _ in self._blocks(None):
                pass

    def _train_blocks(self, train, queries, *, per_layer: bool) -> Iterator[TrainBlock]:
        """What :func:`stream_scores` consumes: feature blocks, or score slabs [Q, B] from an
        estimator that contracts layer by layer (see :meth:`_contracts`)."""
        if not self._contracts(train):
            for features, indices in self._blocks(train):
                yield TrainBlock(indices, features=features)
            return
        for inputs, targets, indices in stream.batches(self._train_data(train), self.batch_size):
            slab, shares = self.estimator.score_batch(queries, inputs, targets, per_layer=per_layer)
            # The queries are finite (checked), so a train gradient's NaN / inf shows in its column.
            check_finite(slab.T, "train gradients", indices=indices)
            yield TrainBlock(indices, slab=slab, per_layer=shares)

    def _preconditioned(self, inputs, targets, indices, *, measurement, out=None) -> torch.Tensor:
        """precondition(f(q)) [B, K] of one batch, f the gradient of ``measurement`` (default:
        the training loss), written into ``out`` by estimators that contract layer by layer."""
        check = partial(check_finite, what="query gradients", indices=indices)
        if out is not None:
            return self.estimator.preconditioned_features(
                inputs, targets, check, out=out, loss_fn=measurement
            )
        return self.estimator.preconditioned_features(inputs, targets, check, loss_fn=measurement)

    def _preconditioned_queries(
        self, data, measurement: LossFn | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """precondition(f(q)) [Q, K] of every query, and their dataset indices [Q], as the queries
        stream. Estimators that contract layer by layer write each batch straight into one
        [Q, K] buffer; others hold one batch's features next to it at most."""
        query = self._checked(data, "query", measurement)
        streamed = self.estimator.contracts_layers
        out, start = None, 0
        for inputs, targets, indices in stream.batches(query, self.batch_size):
            stop = start + inputs.shape[0]
            if streamed:
                if out is None:
                    out = self.estimator.new_features(query.size, inputs)
                self._preconditioned(
                    inputs, targets, indices, measurement=measurement, out=out[start:stop]
                )
            else:
                block = self._preconditioned(inputs, targets, indices, measurement=measurement)
                if out is None:
                    # one batch holds every query: no copy
                    out = (
                        block if stop >= query.size else block.new_empty(query.size, block.shape[1])
                    )
                if out is not block:
                    out[start:stop] = block
            start = stop
        return out, query.indices

    def scores(
        self,
        query,
        train=None,
        *,
        measurement: LossFn | None = None,
        dense: bool = True,
        top_k: int | None = None,
        per_layer: bool = False,
        store: str | Path | None = None,
        overwrite: bool = False,
    ) -> Scores:
        """Scores of every (query, train) pair, Q x N (see the module docstring for the sign).

        ``train`` defaults to the fitted training set; both sets stream batch by batch.
        ``measurement(outputs, targets) -> [Q]`` scores each query through that function (a
        logit, a margin, a log-probability) instead of its training loss: the query feature is
        its gradient, the train feature stays the loss gradient (module docstring, "Measurements").
        ``dense=False`` with ``top_k=k`` keeps only the k largest and smallest per query;
        ``store=path.npy`` also writes the matrix to a ``.npy`` file in the scores' dtype, with a
        ``.json`` manifest next to it (:mod:`influx.store`): a path holding files influx did not
        write, or finished scores of another question (queries, train set, method), is refused
        unless ``overwrite=True``. ``per_layer=True`` adds each layer's share (the shares sum to
        the total). Everything but the stored file stays on the device of the model and data.
        """
        check_top_k(top_k)
        if store is not None:
            check_scores_path(store)
        train_data = self._train_data(train)
        preconditioned, query_indices = self._preconditioned_queries(query, measurement)
        known = train_data.indices  # a tuple's, or the fitted set's after its first pass
        return stream_scores(
            self.method,
            preconditioned,
            query_indices,
            self._train_blocks(train, preconditioned, per_layer=per_layer),
            train_data.size,
            sign=self.sign,
            layout=self.estimator.layout,
            dense=dense,
            top_k=top_k,
            per_layer=per_layer,
            store=store,
            overwrite=overwrite,
            train_indices=known,
        )

    def self_influence(self, train=None, *, measurement: LossFn | None = None) -> torch.Tensor:
        """s(z) = <f(z), precondition(f(z))> for every train point, [N], in O(N) (no Q x N matrix).

        For influence methods s(z) = grad l(z)^T (H + damping I)^-1 grad l(z) = -I_up,loss(z, z);
        for tracin / grad_dot / grad_cos it equals the score of z with itself. With
        ``measurement=m`` the first gradient is that of m: s(z) = grad m(z)^T (H + damping I)^-1
        grad l(z), i.e. ``sign *`` the score of z as a query measured by m against itself as a
        train point (each batch is read once and differentiated twice).
        """
        if measurement is not None:
            return self._measured_self_influence(train, measurement)
        if not self._contracts(train):
            return torch.cat(
                [self.estimator.self_influence_of(features) for features, _ in self._blocks(train)]
            )
        parts = []
        for inputs, targets, indices in stream.batches(self._train_data(train), self.batch_size):
            values = self.estimator.self_influence_batch(inputs, targets)
            check_finite(values, "train gradients", indices=indices)
            parts.append(values)
        return torch.cat(parts)

    def _measured_self_influence(self, train, measurement: LossFn) -> torch.Tensor:
        # This pass checks the measurement (finite, one per example) on the examples it reads.
        data = self._checked(self.train.data if train is None else train, "train", measurement)
        parts = []
        for inputs, targets, indices in stream.batches(data, self.batch_size):
            measured = self._preconditioned(inputs, targets, indices, measurement=measurement)
            features = self._feature_block(inputs, targets, indices, "train")
            parts.append((measured * features.to(measured.dtype)).sum(1))
        return torch.cat(parts)

    def save(self, path: str | Path) -> None:
        """Write the fitted K-FAC / EK-FAC factors and eigenbases to a safetensors file, so that
        :func:`influx.influence.load` can score new queries without refitting."""
        from influx.influence import factors_io

        factors_io.save(self, path)


def fit(
    model: nn.Module,
    loss_fn: LossFn | Callable,
    train,
    *,
    method: str,
    batch_size: int | None = None,
    **options,
) -> Influence:
    """Fit an influence estimator on ``train`` (a tuple (inputs, targets), a Dataset or a
    DataLoader), read batch by batch.

    ``loss_fn(outputs, targets)`` returns per-example losses [N] (reduction='none'). ``method`` is
    one of exact, cg, lissa, arnoldi, kfac, ekfac, trak, tracin, grad_dot, grad_cos; ``options``
    are that method's (see ``influx.influence.describe(method)``). ``batch_size`` is the number
    of examples per forward/backward everywhere: the fit (curvature, factors, features) and the
    train blocks of scores. Default: each stage's own default; for scores, as many examples as
    fit their features in :data:`influx.influence.base.FEATURE_BATCH_BYTES`.

    Before any work the model is checked (no BatchNorm in train mode, a warning for active
    Dropout, at least one parameter selected) and the data is not empty; its inputs and losses
    are checked finite batch by batch on the first pass (an error names the offending dataset
    indices). tracin / grad_dot / grad_cos fit nothing: their fit computes and keeps the train
    features when they fit :data:`influx.influence.stream.CACHE_BYTES` (that pass checks the
    data and serves every later score); otherwise it reads nothing and the first score checks.
    """
    spec = method_of(method)
    if batch_size is not None and batch_size < 1:
        raise InfluxValueError(f"batch_size must be >= 1; got {batch_size}")
    check_model(model)
    select_parameters(model, options.get("params"))
    data = stream.checked(train, model, loss_fn, "train")
    opts = options_with_batch_size(spec.load(spec.options), method, options, batch_size=batch_size)
    started = time.perf_counter()
    estimator = spec.load(spec.estimator)(model, loss_fn, data, opts, **spec.extra)
    estimator.diagnostics["fit_seconds"] = time.perf_counter() - started
    if batch_size is None:
        batch_size = default_batch_size(estimator.bytes_per_example())
    fitted = Influence(method, estimator, data, batch_size=batch_size, model=model, loss_fn=loss_fn)
    if getattr(estimator, "fits_nothing", False):
        fitted.keep_train_features()
    return fitted


def load(
    path: str | Path,
    model: nn.Module,
    loss_fn: LossFn,
    train,
    *,
    batch_size: int | None = None,
) -> Influence:
    """The fitted :class:`Influence` that ``fitted.save(path)`` wrote, for ``model`` and its
    training set ``train``, without refitting (see :mod:`influx.influence.factors_io`).

    ``batch_size`` defaults to the saved fit's. Refused before any work: a file that is not an
    influx K-FAC file, and a model whose scored parameters differ from the saved fit's; then,
    in one pass over ``train`` that also checks it, a training set other than the fit's.
    """
    from influx.influence import factors_io

    saved = factors_io.read(path, model, loss_fn, train, batch_size=batch_size)
    return Influence(
        saved.method,
        saved.estimator,
        saved.train,
        batch_size=saved.batch_size,
        model=model,
        loss_fn=loss_fn,
    )


def describe(method: str) -> str:
    """The options of ``method`` with their defaults and help text."""
    spec = method_of(method)
    lines = [f"{method} options:"]
    for f in fields(spec.load(spec.options)):
        default = f.default if f.default is not MISSING else "(required)"
        lines.append(f"  {f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
