"""What every estimator provides: per-example features and a preconditioner on them.

All estimators in this package score a (query, train) pair the same way::

    score(q, z) = sign * <precondition(f(q)), f(z)>          f: [M, K] features of M examples

with f the per-example loss gradients (flat over P parameters, possibly several checkpoints or a
projection to K dims) and ``precondition`` a symmetric linear map: (H + damping I)^-1 for the
influence estimators (sign -1, Koh & Liang's I_up,loss), sum_t eta_t for TracIn and the identity
for gradient similarity (sign +1; the signs live in ``influx.influence.api.REGISTRY``). Self-influence is ``<f(z), precondition(f(z))>`` without the
sign: s(z) = grad L(z)^T H^-1 grad L(z) for influence, sum_t eta_t ||grad l(w_t, z)||^2 for TracIn.

The K feature coordinates are split into named blocks (one per parameter and checkpoint); the
per-layer score of a layer is the inner product restricted to its blocks, so the per-layer scores
of a pair sum to its score exactly.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from influx.checks import check_choice, check_damping  # noqa: F401 - re-exported
from influx.curvature import ParamSpace
from influx.errors import InfluxValueError
from influx.grads import per_sample_grads
from influx.grads.common import LossFn

# Default examples per feature / score batch: as many as keep one batch's per-example features
# (or the per-example gradients they are computed from) within this many bytes, at most
# MAX_DEFAULT_BATCH. 512 examples of K-FAC features on a ResNet-18 (11M parameters) would be 23 GB.
FEATURE_BATCH_BYTES = 512 << 20
MAX_DEFAULT_BATCH = 512


def default_batch_size(bytes_per_example: int, budget: int | None = None) -> int:
    """Examples per batch so that ``batch * bytes_per_example <= budget`` (at least 1)."""
    budget = FEATURE_BATCH_BYTES if budget is None else budget
    return int(max(1, min(MAX_DEFAULT_BATCH, budget // max(1, bytes_per_example))))


@dataclass(frozen=True)
class Block:
    """Feature coordinates [start, stop) that belong to ``layer`` (a module name)."""

    layer: str
    start: int
    stop: int


@dataclass(frozen=True)
class FeatureLayout:
    """How the K feature coordinates split into layers; ``layered`` is False for mixed features
    (a dense random projection or an eigenbasis), which have no per-layer split."""

    size: int
    blocks: tuple[Block, ...]
    layered: bool = True

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.layer for b in self.blocks))

    @classmethod
    def of_space(cls, space: ParamSpace, *, repeats: int = 1) -> FeatureLayout:
        """Blocks of a flat parameter vector, repeated ``repeats`` times (one per checkpoint)."""
        blocks, start = [], 0
        for _ in range(repeats):
            for name, numel in zip(space.names, space.numels, strict=True):
                blocks.append(Block(layer_of(name), start, start + numel))
                start += numel
        return cls(start, tuple(blocks))

    @classmethod
    def unlayered(cls, size: int) -> FeatureLayout:
        return cls(size, (Block("all", 0, size),), layered=False)


def layer_of(parameter_name: str) -> str:
    """The module that owns a parameter: ``"net.0.weight" -> "net.0"``."""
    return parameter_name.rsplit(".", 1)[0] if "." in parameter_name else parameter_name


class Estimator(abc.ABC):
    """A fitted estimator: features of a batch and the preconditioner applied to them.

    Constructors take ``(model, loss_fn, data, options, **method_specific)``, ``data`` a data
    argument (tuple, Dataset, DataLoader, or one checked by :mod:`influx.influence.stream`) that
    they read through :func:`influx.influence.stream.batches`, batch by batch, never whole.
    """

    layout: FeatureLayout
    #: numbers a user wants to see after fitting: damping, spectrum, iterations, timings.
    diagnostics: dict
    #: True when the estimator scores a train batch block by block without forming its [B, K]
    #: features (``score_batch``, ``self_influence_batch``), which bounds a pass's memory by one
    #: block instead of all of them, and preconditions queries into one buffer
    #: (``new_features``, ``preconditioned_features(..., out=)``).
    contracts_layers: bool = False

    def bytes_per_example(self) -> int:
        """Memory of one example's features (float64 bound), which sets default batch sizes."""
        return 8 * self.layout.size

    #: True when fitting reads nothing (tracin, grad_dot, grad_cos): ``fit`` then computes the
    #: train features in its one pass, where they fit the cache, so that the pass is not lost.
    fits_nothing: bool = False

    @abc.abstractmethod
    def features(
        self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn | None = None
    ) -> torch.Tensor:
        """Per-example features [B, K] of one batch: gradients of ``loss_fn`` (default: the
        training loss; a query's measurement otherwise)."""

    @abc.abstractmethod
    def precondition(self, features: torch.Tensor) -> torch.Tensor:
        """The symmetric preconditioner applied to rows: [M, K] -> [M, K]."""

    def preconditioned_features(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        check: Callable = lambda rows: None,
        *,
        loss_fn: LossFn | None = None,
    ) -> torch.Tensor:
        """``precondition(features(batch, loss_fn))`` [B, K], ``check`` (a finiteness guard
        naming rows) applied to the features before a solve can mix rows. Estimators that
        precondition block by block as the features arrive override it, so the raw features are
        never held whole."""
        features = self.features(inputs, targets, loss_fn)
        check(features)
        return self.precondition(features)

    def self_influence_of(self, features: torch.Tensor) -> torch.Tensor:
        """<f, precondition(f)> per row, [M]; estimators override it where that is cheaper
        than preconditioning (K-FAC: rotate once, no rotation back)."""
        return (features * self.precondition(features).to(features.dtype)).sum(1)


def per_example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    space: ParamSpace,
) -> torch.Tensor:
    """Flat per-example loss gradients [B, P] in the order of ``space`` (the hook engine)."""
    grads = per_sample_grads(model, loss_fn, inputs, targets, params=list(space.names))
    return space.flatten({name: grads[name] for name in space.names})


def build_options(options_type: type, method: str, options: dict):
    """Construct a frozen options dataclass, naming the valid keys when one is unknown."""
    valid = {f.name for f in fields(options_type)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise InfluxValueError(
            f"method {method!r} takes no option(s) {unknown}; its options are {sorted(valid)}"
        )
    return options_type(**options)


def options_with_batch_size(
    options_type: type, method: str, options: dict, *, batch_size: int | None
):
    """:func:`build_options` with ``fit``'s ``batch_size`` applied where the method has one."""
    if batch_size is not None and "batch_size" in {f.name for f in fields(options_type)}:
        options = {**options, "batch_size": batch_size}
    return build_options(options_type, method, options)


def option(default, help: str):  # noqa: A002 - mirrors argparse
    """A dataclass field that carries help text (shown by ``influx.influence.describe``)."""
    return field(default=default, metadata={"help": help})


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 deep copy of ``model`` for exact computations on a float32 model."""
    import copy

    return copy.deepcopy(model).to(torch.float64)


def cast_inputs(inputs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return inputs.to(dtype) if inputs.is_floating_point() else inputs
