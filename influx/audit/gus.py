"""The Gaussian Unlearning Score (Pawelczyk et al. 2024): does a model still carry its poisons?

A Gaussian poison is ``x~ = x + xi``, ``xi ~ N(0, sigma^2 I)`` with the label kept (see
:func:`influx.poison.gaussian`). For each poisoned point z with clean input ``x``, label ``y`` and
noise ``xi``, with ``g = grad_x l(theta; x, y)`` the input gradient of the loss at the *clean*
input,

    I_z = <xi, -g> / (sigma ||g||)

is exactly N(0, 1) when theta is independent of xi (``<xi, u>`` is N(0, sigma^2) for any fixed
unit vector u). A model that fit ``x + xi`` has a lower loss along xi, ``<xi, g> < 0``, so I_z
shifts up. Sign: the formula as usually written, ``<xi, g> / (sigma ||g||)``, is ``-I_z``
(docs/architecture.md); it has the same null, and a model trained on the poisons drives it below
0 (measured on a digits MLP: mean -0.26 at sigma = 0.3, -0.34 at sigma = 1). influx orients the
score so that "the poison is still there" reads as positive.

Statistics of n scores, reported by :func:`gus`:

- ``gus = mean_z I_z``; ``z = sqrt(n) gus`` is N(0, 1) under the null (independent points);
  ``p_value = P(N(0,1) >= z)``, one-sided.
- ``tpr_at_fpr``: the per-point test "reject when I_z > Phi^-1(1 - fpr)" has false-positive rate
  exactly ``fpr`` (0.01 by default) under the null; its TPR is the fraction of the n poisoned
  points it rejects.
- ``ks_p_value``: Kolmogorov-Smirnov test of the scores against N(0, 1) (computed when read).
- the same for the null: fresh noise ``xi'`` of the same sigma, seeded by ``null_seed`` and never
  used in training, scored against the same gradients (``null_scores``, ``null_gus``,
  ``null_z``, ``null_tpr_at_fpr`` = the empirical FPR, ...).

Input gradients of a batch come from ONE backward of the summed loss in eval mode (see
:func:`influx.poison.input_gradients`): exact, since each loss depends on its own input only.
A point whose input gradient is exactly 0 has no direction to test: its score is NaN, a warning
names its indices, and every statistic is taken over the other points (``n``).

Precision. A confident model has tiny input gradients, and two roundings would spoil them:

- In the softmax's backward the target logit's gradient is ``p_y - 1``: as ``1 - p_y`` nears the
  dtype's resolution it loses digits, and below it (6e-8 in float32, a logit gap near 17) ``p_y``
  rounds to 1 and the input gradient loses the term altogether (measured on a linear model at a
  logit gap of 14: float32 scores off by up to 1.4). The loss is therefore computed in
  ``loss_dtype``, float64 by default: the model's outputs are cast up, the backward through the
  model keeps its own dtype, and float32 scores then agree with float64 ones to ~1e-6. Float64
  has the same limit further out: ``1 - p_y`` below ~1e-13 (a logit gap near 30) costs it digits,
  below ~1e-16 the whole term.
- ``||g||^2`` loses digits in float32 once the entries of g are below ~1e-19 (a logit gap near
  44) and underflows to 0 near 4e-23, although g itself is representable down to ~1e-45: each
  row is divided by its largest ``|entry|`` before the norm and the dot products (``I_z`` does
  not change when g is scaled).
"""

from __future__ import annotations

import functools
import math
import statistics
import warnings
from dataclasses import dataclass

import torch
from scipy import stats
from torch import nn

from influx.checks import check_integer, check_number
from influx.data import LossFn, iter_batches, num_examples
from influx.errors import InfluxValueError
from influx.poison import GaussianPoison, gradient_batches

__all__ = ["GusResult", "gus", "gus_of"]


@dataclass(frozen=True, repr=False)
class GusResult:
    """Per-point Gaussian scores and their statistics, for the poisons and for fresh noise.

    Tensors [n_points] live on the data's device; ``indices`` are the points' dataset indices.
    ``n`` counts the points with a nonzero input gradient (the others score NaN).
    """

    scores: torch.Tensor
    null_scores: torch.Tensor
    indices: torch.Tensor
    noise_std: float
    fpr: float
    threshold: float
    null_seed: int
    n: int
    gus: float
    z: float
    p_value: float
    tpr_at_fpr: float
    null_gus: float
    null_z: float
    null_p_value: float
    null_tpr_at_fpr: float

    # The KS tests cost about as much as the input gradients of a small model: computed when read.
    @functools.cached_property
    def ks_p_value(self) -> float:
        """Kolmogorov-Smirnov p-value of the (finite) scores against N(0, 1)."""
        return _ks_p_value(self.scores)

    @functools.cached_property
    def null_ks_p_value(self) -> float:
        """Kolmogorov-Smirnov p-value of the null scores against N(0, 1)."""
        return _ks_p_value(self.null_scores)

    def __repr__(self) -> str:
        return (
            f"GusResult(n={self.n}, gus={self.gus:.4g}, z={self.z:.3g}, p={self.p_value:.3g}, "
            f"tpr@{self.fpr:g}={self.tpr_at_fpr:.3g}; null: gus={self.null_gus:.4g}, "
            f"z={self.null_z:.3g}, tpr@{self.fpr:g}={self.null_tpr_at_fpr:.3g})"
        )


def _finite(scores: torch.Tensor) -> torch.Tensor:
    return scores[~torch.isnan(scores)].detach().to(device="cpu", dtype=torch.float64)


def _ks_p_value(scores: torch.Tensor) -> float:
    return float(stats.kstest(_finite(scores).numpy(), "norm").pvalue)


def _statistics(scores: torch.Tensor, threshold: float) -> tuple[float, float, float, float]:
    """(gus, z, one-sided p-value, fraction above threshold) of the finite scores."""
    finite = _finite(scores)
    mean = finite.mean().item()
    z = math.sqrt(finite.shape[0]) * mean
    # P(N(0, 1) >= z) in closed form (erfc keeps its relative accuracy deep in the tail).
    p_value = 0.5 * math.erfc(z / math.sqrt(2.0))
    return mean, z, p_value, (finite > threshold).double().mean().item()


def _check_settings(noise_std, fpr, null_seed, loss_dtype) -> None:
    check_number("noise_std", noise_std, above=0, hint="the std the noise was drawn with")
    check_number("fpr", fpr, above=0, below=1)
    check_integer("null_seed", null_seed, minimum=0)
    if loss_dtype is not None and not (
        isinstance(loss_dtype, torch.dtype) and loss_dtype.is_floating_point
    ):
        raise InfluxValueError(
            f"loss_dtype must be a floating-point torch.dtype or None; got {loss_dtype!r}"
        )


def _check_tensors(base_inputs, targets, noise, indices) -> None:
    """The checks of the tensor form, all before any gradient."""
    if not isinstance(base_inputs, torch.Tensor) or not base_inputs.is_floating_point():
        raise InfluxValueError("base_inputs must be a floating-point tensor [n, *input_shape]")
    if base_inputs.dim() < 2:
        raise InfluxValueError(
            f"base_inputs must be [n, *input_shape] with one row per point; got shape "
            f"{tuple(base_inputs.shape)} (for scalar inputs pass base_inputs[:, None])"
        )
    if base_inputs.shape[0] == 0:
        raise InfluxValueError("GUS needs at least one poisoned point; base_inputs is empty")
    if not isinstance(noise, torch.Tensor) or noise.shape != base_inputs.shape:
        got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise InfluxValueError(
            f"noise must be a tensor shaped like base_inputs {tuple(base_inputs.shape)}; got {got}"
        )
    if not isinstance(targets, torch.Tensor) or targets.shape[:1] != base_inputs.shape[:1]:
        got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise InfluxValueError(
            f"targets must be a tensor with {base_inputs.shape[0]} rows (one per point); got {got}"
        )
    if indices is not None and (
        not isinstance(indices, torch.Tensor) or indices.shape != base_inputs.shape[:1]
    ):
        raise InfluxValueError(
            f"indices must be a tensor of shape [{base_inputs.shape[0]}] (one per point)"
        )
    if not torch.isfinite(noise).all():
        bad = torch.nonzero(~torch.isfinite(noise.flatten(1)).all(dim=1)).flatten().tolist()
        raise InfluxValueError(f"noise has NaN/inf at points {bad[:10]}")


def _noise_of(noise, n: int):
    """``noise`` as a function (positions [b], dataset indices [b]) -> rows [b, ...]: a tensor
    [n, ...] by position, a callable by dataset index."""
    if callable(noise) and not isinstance(noise, torch.Tensor):
        return lambda positions, indices: noise(indices)
    if not isinstance(noise, torch.Tensor) or noise.dim() < 1 or noise.shape[0] != n:
        got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise InfluxValueError(
            f"noise must be a tensor [n = {n}, *input_shape] (row p: the noise of the p-th "
            f"point) or a callable (dataset indices [b]) -> [b, *input_shape]; got {got}"
        )
    return lambda positions, indices: noise[positions.to(noise.device)]


def _noise_batch(noise_of, positions, indices, inputs: torch.Tensor) -> torch.Tensor:
    """One batch of the training noise, checked against its inputs."""
    rows = noise_of(positions, indices)
    if not isinstance(rows, torch.Tensor) or rows.shape != inputs.shape:
        got = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise InfluxValueError(
            f"noise must give rows shaped like the inputs {tuple(inputs.shape)}; got {got}"
        )
    bad = ~torch.isfinite(rows.flatten(1)).all(dim=1)
    if bad.any():
        raise InfluxValueError(
            f"noise has NaN/inf at points {indices[bad.cpu()][:10].tolist()} (dataset indices)"
        )
    return rows


# The null noise is drawn in blocks of this many values (a multiple of 16): torch's CPU normal
# sampler transforms uniform draws in groups of 16, so blocks of whole groups continue one
# generator exactly as a single draw of the whole [n, *input_shape] would.
_NULL_BLOCK = 16 * 65_536


class _NullNoise:
    """The draws of ``noise_std * randn(total)`` from one CPU generator, handed out in pieces
    without ever holding all of them: equal, value for value, to one draw of the whole."""

    def __init__(self, total: int, dtype: torch.dtype, seed: int):
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.total, self.dtype, self.drawn = total, dtype, 0
        self.block = torch.empty(0, dtype=dtype, device="cpu")
        self.used = 0  # values of ``block`` handed out

    def take(self, count: int) -> torch.Tensor:
        # Copied out of fixed-size blocks into one new tensor: allocations of a few fixed sizes,
        # which the allocator reuses, so resident memory stays flat over any number of points.
        piece = torch.empty(count, dtype=self.dtype, device="cpu")
        filled = 0
        while filled < count:
            if self.used == self.block.numel():
                left = self.total - self.drawn
                # the last draw takes all that is left (at least 16 when the whole would): it is
                # the one that ends the sequence, as the single draw does
                size = left if left <= 2 * _NULL_BLOCK else _NULL_BLOCK
                self.block = torch.randn(size, generator=self.generator, dtype=self.dtype,
                                         device="cpu")  # fmt: skip
                self.drawn, self.used = self.drawn + size, 0
            step = min(count - filled, self.block.numel() - self.used)
            piece[filled : filled + step] = self.block[self.used : self.used + step]
            filled, self.used = filled + step, self.used + step
        return piece


def _loss_in(loss_fn: LossFn, dtype: torch.dtype | None) -> LossFn:
    """``loss_fn`` on the model's outputs cast to ``dtype`` (the backward casts the gradient back
    to the outputs' dtype); ``None`` leaves it as it is."""
    if dtype is None:
        return loss_fn

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.dtype == dtype or not outputs.is_floating_point():
            return loss_fn(outputs, targets)
        try:
            return loss_fn(outputs.to(dtype), targets)
        except (RuntimeError, TypeError) as exc:
            # If the outputs' own dtype fails too, the error is not the cast's: raise that one.
            loss_fn(outputs, targets)
            raise InfluxValueError(
                f"loss_fn fails on {dtype} outputs ({exc}); pass loss_dtype=None to compute the "
                "loss in the model's dtype (less precise for confident models)"
            ) from exc

    return loss


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row [n, d] divided by its largest |entry| (zero rows stay 0): norms and dot products
    of the result neither underflow nor overflow, and I_z is unchanged by scaling a row."""
    peak = rows.abs().amax(dim=1, keepdim=True)
    return rows / torch.where(peak > 0, peak, torch.ones_like(peak))


def gus(
    model: nn.Module,
    loss_fn: LossFn,
    data,
    targets: torch.Tensor | None = None,
    noise=None,
    noise_std: float | None = None,
    *,
    indices: torch.Tensor | None = None,
    fpr: float = 0.01,
    null_seed: int = 0,
    batch_size: int = 256,
    loss_dtype: torch.dtype | None = torch.float64,
) -> GusResult:
    """Gaussian Unlearning Score of ``model`` on n Gaussian poisons (module docstring).

    Two forms. ``gus(model, loss_fn, base_inputs, targets, noise, noise_std)``: the clean inputs
    [n, *input_shape], their labels [n] and the draws of N(0, noise_std^2 I) added in training
    [n, *input_shape]; ``indices`` [n] (distinct; default ``arange(n)``) label the points.
    ``gus(model, loss_fn, data, noise, noise_std)``: ``data`` the clean points as a tuple
    ``(inputs, targets[, indices])``, a Dataset or a DataLoader, streamed ``batch_size`` points
    at a time (each read once; the result is labelled by the dataset indices they carry), and
    ``noise`` a tensor [n, *input_shape] (row p for the p-th point) or a callable mapping a
    batch's dataset indices [b] to its noise [b, *input_shape], so that no tensor of all points
    need exist.

    Gradients are taken in eval mode, ``batch_size`` points per backward, and the model's mode
    is restored. The null noise is drawn on a CPU generator seeded by ``null_seed`` (the same
    draw on every device), in float64 for float64 data and in float32 otherwise (4-5x cheaper:
    for a CIFAR-sized batch the float64 draw costs a tenth of the input gradients on CPU), then
    cast to the data's device and dtype; it is drawn batch by batch, equal to one draw of all
    points. The loss is computed in ``loss_dtype`` (default float64, see Precision in the module
    docstring); ``None`` computes it in the outputs' dtype, for a ``loss_fn`` that only works
    there.
    """
    if not isinstance(data, torch.Tensor) and noise_std is None:
        # gus(model, loss_fn, data, noise, noise_std): the data carries its own targets
        targets, noise, noise_std = None, targets, noise
    _check_settings(noise_std, fpr, null_seed, loss_dtype)
    batch_size = check_integer("batch_size", batch_size, minimum=1)
    if isinstance(data, torch.Tensor):
        _check_tensors(data, targets, noise, indices)
        # distinct indices are checked here; positions when none are given
        data = (data, targets) if indices is None else (data, targets, indices)
    elif targets is not None or indices is not None:
        raise InfluxValueError(
            "data given as a tuple, Dataset or DataLoader carries its own targets and indices: "
            "call gus(model, loss_fn, data, noise, noise_std)"
        )
    n_points = num_examples(data)
    if n_points == 0:
        raise InfluxValueError("GUS needs at least one poisoned point; the data is empty")
    noise_of = _noise_of(noise, n_points)
    loss = _loss_in(loss_fn, loss_dtype)
    threshold = statistics.NormalDist().inv_cdf(1.0 - fpr)
    # Written into [n] outputs allocated once: small per-batch results kept alive between the
    # batches' large buffers would fragment the heap and grow resident memory with n.
    columns: tuple[torch.Tensor, ...] = ()
    null = None
    position = 0
    for inputs, _, labels, grads in gradient_batches(model, loss, iter_batches(data, batch_size)):
        if inputs.dim() < 2:
            raise InfluxValueError(
                f"inputs must be [n, *input_shape] with one row per point; got shape "
                f"{tuple(inputs.shape)} (for scalar inputs give inputs[:, None])"
            )
        positions = torch.arange(position, position + inputs.shape[0], device="cpu")
        position += inputs.shape[0]
        train_noise = _noise_batch(noise_of, positions, labels, inputs)
        if null is None:
            wide = inputs.dtype == torch.float64
            null = _NullNoise(
                n_points * inputs[0].numel(), torch.float64 if wide else torch.float32, null_seed
            )
        null_noise = (noise_std * null.take(inputs.numel())).view(inputs.shape)
        null_noise = null_noise.to(device=inputs.device, dtype=inputs.dtype)
        descent = _unit_rows(-grads.flatten(1))  # [b, d], rescaled: I_z is scale-invariant per row
        norms = descent.norm(dim=1)  # [b]
        # Zero-norm rows give 0 / 0 = NaN, as documented.
        scale = noise_std * norms
        scores = (train_noise.flatten(1).to(descent) * descent).sum(dim=1) / scale
        null_scores = (null_noise.flatten(1) * descent).sum(dim=1) / scale
        found = (scores, null_scores, norms == 0, labels.to(inputs.device))
        if not columns:
            columns = tuple(part.new_empty(n_points) for part in found)
        for column, part in zip(columns, found, strict=True):
            column[positions[0] : positions[-1] + 1] = part
    if not columns:
        raise InfluxValueError("GUS needs at least one poisoned point; the data yielded none")
    # a DataLoader that drops its last batch yields fewer points than its sampler counts
    scores, null_scores, zero, labels = (column[:position] for column in columns)
    if zero.all():
        raise InfluxValueError(
            "every point has a zero input gradient (the loss is flat at all of them): GUS is "
            "undefined; check the model and loss_fn"
        )
    if zero.any():
        warnings.warn(
            f"{int(zero.sum())} point(s) have a zero input gradient, so no direction to test: "
            f"their scores are NaN and the statistics exclude them (indices "
            f"{labels[zero].tolist()[:10]})",
            RuntimeWarning,
            stacklevel=2,
        )
    gus_, z, p, tpr = _statistics(scores, threshold)
    null_gus, null_z, null_p, null_tpr = _statistics(null_scores, threshold)
    return GusResult(
        scores=scores,
        null_scores=null_scores,
        indices=labels,
        noise_std=float(noise_std),
        fpr=float(fpr),
        threshold=threshold,
        null_seed=null_seed,
        n=int((~zero).sum()),
        gus=gus_,
        z=z,
        p_value=p,
        tpr_at_fpr=tpr,
        null_gus=null_gus,
        null_z=null_z,
        null_p_value=null_p,
        null_tpr_at_fpr=null_tpr,
    )


def gus_of(model: nn.Module, loss_fn: LossFn, poison: GaussianPoison, **kwargs) -> GusResult:
    """:func:`gus` on the points of a :func:`influx.poison.gaussian` result (its clean inputs,
    labels, noise, noise_std and dataset indices); keyword arguments go to :func:`gus`."""
    if not isinstance(poison, GaussianPoison):
        raise InfluxValueError(
            f"gus_of needs the result of influx.poison.gaussian; got {type(poison).__name__}. "
            "For other data call gus(model, loss_fn, base_inputs, targets, noise, noise_std)."
        )
    return gus(
        model,
        loss_fn,
        poison.base_inputs,
        poison.targets,
        poison.noise,
        poison.noise_std,
        indices=poison.indices,
        **kwargs,
    )
