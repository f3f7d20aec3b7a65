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

Devices: features, preconditioners and scores live on the device of the model and data (dense
``values``, ``per_layer`` and ``top_k`` included); only ``store=`` writes to host memory (a file).
"""

from __future__ import annotations

import importlib
import time
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
    check_per_example_losses,
    select_parameters,
)
from influx.influence.base import Estimator, default_batch_size, options_with_batch_size
from influx.influence.scores import Scores, TrainBlock, check_top_k, stream_scores

# Train features are kept in memory after the first pass when they fit in this many bytes.
CACHE_BYTES = 1 << 30


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


def check_data(model: nn.Module, loss_fn, data, what: str, *, batch_size: int) -> None:
    """Before any expensive work: ``data`` is not empty and its inputs and losses are finite.

    Errors name the dataset indices of the offending examples. Costs one forward pass.
    """
    inputs, targets, indices = data
    if inputs.shape[0] == 0:
        raise InfluxValueError(
            f"the {what} set is empty: pass at least one example (inputs of shape [N, ...], N >= 1)"
        )
    if inputs.is_floating_point():
        check_finite(inputs, f"{what} inputs", indices=indices)
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            stop = start + batch_size
            try:
                outputs = model(inputs[start:stop])
            except RuntimeError as error:
                raise InfluxValueError(
                    f"the model fails on the {what} inputs: {error}; {_input_hint(model, inputs)}"
                ) from error
            losses = loss_fn(outputs, targets[start:stop])
            check_per_example_losses(losses, inputs[start:stop].shape[0])
            check_finite(losses, f"{what} losses", indices=indices[start:stop])


def _input_hint(model: nn.Module, inputs: torch.Tensor) -> str:
    """What to check when the model's forward fails on inputs that passed every other check."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if inputs.is_floating_point() and dtype is not None and inputs.dtype != dtype:
        return (
            f"the inputs are {inputs.dtype} and the model's parameters {dtype}: cast one to the "
            f"other (inputs.to({dtype}) or model.to({inputs.dtype}))"
        )
    return (
        f"check that one example, of shape {tuple(inputs.shape[1:])}, has the shape the model "
        "was built for"
    )


class Influence:
    """A fitted estimator with its training set: score queries, self-influence, per-layer shares.

    Build it with :func:`fit`. ``diagnostics`` holds the damping, the (estimated) spectrum, solver
    iterations and the fit time.
    """

    def __init__(
        self, method: str, estimator: Estimator, train, *, batch_size: int, model=None, loss_fn=None
    ):
        self.method = method
        self.estimator = estimator
        self.model, self.loss_fn = model, loss_fn
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
        """-1 for influence (I_up,loss), +1 for tracin / grad_dot / grad_cos."""
        return REGISTRY[self.method].sign

    def __repr__(self) -> str:
        shown = {
            k: v for k, v in self.diagnostics.items() if not isinstance(v, (list, torch.Tensor))
        }
        return f"Influence(method={self.method!r}, train={self.train_indices.numel()}, {shown})"

    def _checked(self, data, what: str):
        """``as_tensors(data)``, checked (non-empty, finite) when the model is known."""
        inputs, targets, indices = as_tensors(data)
        if self.model is not None:
            check_data(
                self.model,
                self.loss_fn,
                (inputs, targets, indices),
                what,
                batch_size=self.batch_size,
            )
        return inputs, targets, indices

    def _feature_block(self, inputs, targets, indices, what: str) -> torch.Tensor:
        block = self.estimator.features(inputs, targets)
        check_finite(block, f"{what} gradients", indices=indices)
        return block

    def _batches(self, train) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(inputs, targets, dataset indices) of each ``batch_size`` block of train examples."""
        if train is None:
            inputs, targets, indices = self.train_inputs, self.train_targets, self.train_indices
        else:
            inputs, targets, indices = self._checked(train, "train")
        for start in range(0, inputs.shape[0], self.batch_size):
            stop = start + self.batch_size
            yield inputs[start:stop], targets[start:stop], indices[start:stop]

    def _cacheable(self) -> bool:
        """Whether all the fitted set's features fit in :data:`CACHE_BYTES` (decided up front,
        so a pass that cannot keep them never holds a partial list)."""
        whole = self.train_indices.numel() * self.estimator.bytes_per_example()
        return whole <= CACHE_BYTES

    def _contracts(self, train) -> bool:
        """Whether a pass over ``train`` contracts layer by layer without forming its features:
        for estimators that can, unless the fitted set's features are (or will be) kept."""
        if not self.estimator.contracts_layers:
            return False
        return train is not None or (self._train_features is None and not self._cacheable())

    def _blocks(self, train) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Feature blocks [B, K] with dataset indices [B]; the fitted set's are cached when small."""
        if train is None and self._train_features is not None:
            for start in range(0, self._train_features.shape[0], self.batch_size):
                yield (
                    self._train_features[start : start + self.batch_size],
                    self.train_indices[start : start + self.batch_size],
                )
            return
        # Otherwise every pass streams, one block in memory, and the next one recomputes.
        kept: list[torch.Tensor] | None = [] if train is None and self._cacheable() else None
        for inputs, targets, indices in self._batches(train):
            block = self._feature_block(inputs, targets, indices, "train")
            if kept is not None:
                kept.append(block)
            yield block, indices
        if kept:
            self._train_features = torch.cat(kept)

    def _train_blocks(self, train, queries, *, per_layer: bool) -> Iterator[TrainBlock]:
        """What :func:`stream_scores` consumes: feature blocks, or score slabs [Q, B] from an
        estimator that contracts layer by layer (see :meth:`_contracts`)."""
        if not self._contracts(train):
            for features, indices in self._blocks(train):
                yield TrainBlock(indices, features=features)
            return
        for inputs, targets, indices in self._batches(train):
            slab, shares = self.estimator.score_batch(queries, inputs, targets, per_layer=per_layer)
            # The queries are finite (checked), so a train gradient's NaN / inf shows in its column.
            check_finite(slab.T, "train gradients", indices=indices)
            yield TrainBlock(indices, slab=slab, per_layer=shares)

    def _preconditioned_queries(self, data) -> tuple[torch.Tensor, torch.Tensor]:
        """precondition(f(q)) [Q, K] of every query, and their dataset indices [Q]. Estimators
        that contract layer by layer write each batch straight into one [Q, K] buffer; others
        hold one batch's features next to it at most."""
        inputs, targets, indices = self._checked(data, "query")
        streamed = self.estimator.contracts_layers
        out = self.estimator.new_features(inputs.shape[0], inputs) if streamed else None
        for start in range(0, inputs.shape[0], self.batch_size):
            stop = start + self.batch_size
            x, y = inputs[start:stop], targets[start:stop]
            check = partial(check_finite, what="query gradients", indices=indices[start:stop])
            if streamed:
                self.estimator.preconditioned_features(x, y, check, out=out[start:stop])
                continue
            block = self.estimator.preconditioned_features(x, y, check)
            if stop >= inputs.shape[0] and out is None:
                return block, indices  # one batch: no copy
            if out is None:
                out = block.new_empty(inputs.shape[0], block.shape[1])
            out[start:stop] = block
        return out, indices

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
        the k largest and smallest per query; ``store=path.npy`` also writes the matrix to a
        ``.npy`` memmap in the scores' dtype, with a ``.json`` manifest next to it;
        ``per_layer=True`` adds each layer's share (the shares sum to the total). Everything but
        the stored file stays on the device of the model and data.
        """
        check_top_k(top_k)
        preconditioned, query_indices = self._preconditioned_queries(query)
        num_train = self.train_indices.numel() if train is None else as_tensors(train)[0].shape[0]
        return stream_scores(
            self.method,
            preconditioned,
            query_indices,
            self._train_blocks(train, preconditioned, per_layer=per_layer),
            num_train,
            sign=self.sign,
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
        if not self._contracts(train):
            return torch.cat(
                [self.estimator.self_influence_of(features) for features, _ in self._blocks(train)]
            )
        parts = []
        for inputs, targets, indices in self._batches(train):
            values = self.estimator.self_influence_batch(inputs, targets)
            check_finite(values, "train gradients", indices=indices)
            parts.append(values)
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
    """Fit an influence estimator on ``train`` (a tuple (inputs, targets) or a Dataset).

    ``loss_fn(outputs, targets)`` returns per-example losses [N] (reduction='none'). ``method`` is
    one of exact, cg, lissa, arnoldi, kfac, ekfac, trak, tracin, grad_dot, grad_cos; ``options``
    are that method's (see ``influx.influence.describe(method)``). ``batch_size`` is the number
    of examples per forward/backward everywhere: the fit (curvature, factors, features) and the
    train blocks of scores. Default: each stage's own default; for scores, as many examples as
    fit their features in :data:`influx.influence.base.FEATURE_BATCH_BYTES`.

    Before any work the model is checked (no BatchNorm in train mode, a warning for active
    Dropout, at least one parameter selected) and so is the data (not empty; finite inputs and
    losses, else an error naming the offending dataset indices).
    """
    spec = method_of(method)
    if batch_size is not None and batch_size < 1:
        raise InfluxValueError(f"batch_size must be >= 1; got {batch_size}")
    check_model(model)
    select_parameters(model, options.get("params"))
    data = as_tensors(train)
    check_data(model, loss_fn, data, "train", batch_size=batch_size or 256)
    opts = options_with_batch_size(spec.load(spec.options), method, options, batch_size=batch_size)
    started = time.perf_counter()
    estimator = spec.load(spec.estimator)(model, loss_fn, data[0], data[1], opts, **spec.extra)
    estimator.diagnostics["fit_seconds"] = time.perf_counter() - started
    if batch_size is None:
        batch_size = default_batch_size(estimator.bytes_per_example())
    return Influence(method, estimator, train, batch_size=batch_size, model=model, loss_fn=loss_fn)


def describe(method: str) -> str:
    """The options of ``method`` with their defaults and help text."""
    spec = method_of(method)
    lines = [f"{method} options:"]
    for f in fields(spec.load(spec.options)):
        default = f.default if f.default is not MISSING else "(required)"
        lines.append(f"  {f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
