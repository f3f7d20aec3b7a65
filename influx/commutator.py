"""Gradient steps neither commute nor invert: exact commutators, Lie brackets, order shifts.

An SGD step on a batch ``z`` is the map ``T_z(theta) = theta - lr * g_z(theta)``, where ``g_z`` is
the gradient of the *mean* per-example loss over ``z``. Two steps commute when
``T_1(T_2(theta)) == T_2(T_1(theta))``. Expanding to second order in ``lr``::

    T_1(T_2(theta)) = theta - lr g_2 - lr g_1(theta - lr g_2)
                    = theta - lr (g_1 + g_2) + lr^2 H_1 g_2 + O(lr^3)

so the commutator is ``C = T_1 T_2 - T_2 T_1 = lr^2 (H_1 g_2 - H_2 g_1) + O(lr^3)``. The bracket
``H_1 g_2 - H_2 g_1`` is computed with Hessian-vector products (forward-over-reverse), never
forming a Hessian. For linear regression (loss ``(theta.x - y)^2 / 2``) the steps are affine maps
and the second-order formula is exact.

Every function here is pure: it works on a flat copy of the parameters (see
:class:`influx.curvature.ParamSpace`) through ``torch.func``, so the model is left untouched.
Vectors are flat over the selected parameters (P entries) in
:attr:`influx.curvature.ParamSpace.names` order: ``model.named_parameters()`` order for
``params=None``, else the order of ``params``; ``B`` is a batch size, ``N`` a dataset size. Every
entry point refuses empty data and NaN / inf inputs or targets, naming the examples, before any
work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import grad, vmap

from influx import curvature
from influx.checks import check_integer, check_number
from influx.data import as_tensors, iter_batches, num_examples
from influx.errors import InfluxValueError
from influx.grads import per_sample_grads
from influx.grads.common import LossFn, check_finite, check_model

Pair = tuple[torch.Tensor, torch.Tensor]
FlatObjective = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "AscentResult",
    "CommutatorResult",
    "LabelSummary",
    "OrderShiftResult",
    "PairwiseResult",
    "ascent_residual",
    "bracket",
    "order_shift",
    "pairwise",
    "reference_bracket_norms",
    "step",
]


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommutatorResult:
    """A commutator of two steps, or their bracket.

    ``vector`` [P] is ``T_1(T_2(theta)) - T_2(T_1(theta))`` (``kind="step"``) or
    ``H_1 g_2 - H_2 g_1`` (``kind="bracket"``, ``lr`` is None); ``norm`` its Euclidean norm;
    ``grad_norms`` the norms of ``g_1`` and ``g_2`` at theta, for scale.
    """

    vector: torch.Tensor
    norm: float
    kind: str
    lr: float | None
    grad_norms: tuple[float, float]

    def __repr__(self) -> str:
        lr = "" if self.lr is None else f", lr={self.lr:g}"
        return (
            f"CommutatorResult(kind={self.kind!r}{lr}, norm={self.norm:.4e}, "
            f"P={self.vector.numel()}, "
            f"grad_norms=({self.grad_norms[0]:.3e}, {self.grad_norms[1]:.3e}))"
        )


@dataclass(frozen=True)
class LabelSummary:
    """Summary of the off-diagonal commutator norms over one group of pairs (i < j)."""

    mean: float
    median: float
    count: int

    def __repr__(self) -> str:
        return f"LabelSummary(mean={self.mean:.4e}, median={self.median:.4e}, count={self.count})"


@dataclass(frozen=True)
class PairwiseResult:
    """Commutator norms of every pair in a batch.

    ``norms`` [B, B] is symmetric with a zero diagonal (the vectors are antisymmetric);
    ``grad_norms`` [B] are the per-sample gradient norms, so ``norms / outer(grad_norms)`` is
    a scale-free version; ``same_label`` / ``different_label`` summarize pairs i < j whose
    targets are equal / differ.
    """

    norms: torch.Tensor
    grad_norms: torch.Tensor
    targets: torch.Tensor
    kind: str
    lr: float | None
    same_label: LabelSummary
    different_label: LabelSummary

    @property
    def normalized(self) -> torch.Tensor:
        """[B, B] commutator norms divided by ``||g_i|| ||g_j||`` (0 where a gradient is 0)."""
        scale = torch.outer(self.grad_norms, self.grad_norms)
        return torch.where(scale > 0, self.norms / scale.clamp_min(1e-300), torch.zeros_like(scale))

    def __repr__(self) -> str:
        lr = "" if self.lr is None else f", lr={self.lr:g}"
        return (
            f"PairwiseResult(kind={self.kind!r}{lr}, B={self.norms.shape[0]}, "
            f"same_label={self.same_label}, different_label={self.different_label})"
        )


@dataclass(frozen=True)
class OrderShiftResult:
    """Distance between SGD runs that differ only in the order of their batches.

    ``measured`` [R] is ``||theta_r - theta_ref||`` for each of the R permuted runs;
    ``predicted`` [R] the second-order prediction ``lr^2 ||sum of brackets||`` made at the
    starting point; ``displacement`` is ``||theta_ref - theta_0||`` (how far training moved).
    ``orders`` holds, per run, the batch sequence over all epochs.
    """

    measured: torch.Tensor
    predicted: torch.Tensor
    displacement: float
    lr: float
    epochs: int
    batch_size: int
    orders: list[list[int]] = field(repr=False)

    @property
    def relative_error(self) -> torch.Tensor:
        """[R] ``|predicted - measured| / measured``."""
        return (self.predicted - self.measured).abs() / self.measured.clamp_min(1e-300)

    def __repr__(self) -> str:
        return (
            f"OrderShiftResult(lr={self.lr:g}, epochs={self.epochs}, batch_size={self.batch_size}, "
            f"runs={self.measured.numel()}, measured_mean={self.measured.mean().item():.4e}, "
            f"predicted_mean={self.predicted.mean().item():.4e}, "
            f"displacement={self.displacement:.4e})"
        )


@dataclass(frozen=True)
class AscentResult:
    """How far gradient ascent after gradient descent lands from the start.

    ``residual`` holds ``||theta_end - theta_0||``: a 0-d tensor (``mode="dataset"``), [K] per
    batch (``"batch"``) or [N] per point (``"point"``); ``displacement`` the matching
    ``||theta_descent - theta_0||`` after descent alone. ``trajectory`` [ascent_epochs] (dataset
    mode only) is the residual after each ascent epoch; ``vector`` [P] the dataset-mode residual.
    ``indices`` [N] (point mode only) are the dataset indices of the points, aligned to
    ``residual``: a Dataset's third item or a tuple's third entry, else positions 0..N-1.
    """

    residual: torch.Tensor
    displacement: torch.Tensor
    mode: str
    order: str
    lr: float
    epochs: int
    ascent_epochs: int
    trajectory: torch.Tensor | None = None
    vector: torch.Tensor | None = field(default=None, repr=False)
    indices: torch.Tensor | None = field(default=None, repr=False)

    @property
    def relative(self) -> torch.Tensor:
        """``residual / displacement``: 0 would mean ascent undid descent exactly."""
        return self.residual / self.displacement.clamp_min(1e-300)

    def __repr__(self) -> str:
        res = self.residual
        summary = (
            f"{res.item():.4e}"
            if res.dim() == 0
            else f"mean {res.mean().item():.4e} over {res.numel()}"
        )
        return (
            f"AscentResult(mode={self.mode!r}, order={self.order!r}, lr={self.lr:g}, "
            f"epochs={self.epochs}, "
            f"ascent_epochs={self.ascent_epochs}, residual={summary})"
        )


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InfluxValueError(f"{name} must be one of {list(choices)}; got {value!r}")
    return value


def _as_tensor(value) -> torch.Tensor:
    """A tensor as it is (its device kept); anything else (numbers, lists) on the CPU."""
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value, device="cpu")


def _as_batch(z, name: str) -> Pair:
    """``(input, target)`` of one example (scalar target: a batch dim is added) or a batch."""
    if not isinstance(z, (tuple, list)) or len(z) not in (2, 3):
        raise InfluxValueError(
            f"{name} must be a pair (input, target) of one example or (inputs, targets) of a "
            "batch; "
            f"got {type(z).__name__}"
            + (f" of length {len(z)}" if isinstance(z, (tuple, list)) else "")
        )
    inputs, targets = _as_tensor(z[0]), _as_tensor(z[1])
    if targets.dim() == 0:
        # One example: a scalar target marks it; add the batch dimension to both.
        return inputs.unsqueeze(0), targets.unsqueeze(0)
    if inputs.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise InfluxValueError(
            f"{name}: inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} disagree on "
            "the batch size; a single example needs a scalar target (for vector targets pass a "
            "batch of one: (x[None], y[None]))"
        )
    if targets.shape[0] == 0:
        raise InfluxValueError(f"{name} is an empty batch; pass at least one example")
    _check_finite_data(inputs, targets, f"{name}: inputs", f"{name}: targets")
    return inputs, targets


def _check_finite_data(inputs, targets, what_inputs, what_targets, indices=None) -> None:
    """NaN / inf inputs or targets are refused by example (positions, or dataset ``indices``)."""
    check_finite(inputs, what_inputs, indices=indices)
    check_finite(targets, what_targets, indices=indices)


# Points per block when ascent_residual(mode="point") streams its data.
_POINT_BLOCK = 1024


def _streamed_examples(data, batch_size: int):
    """``(inputs, targets, indices)`` batches of ``data``, each checked finite; refuses empty data."""
    empty = True
    for inputs, targets, indices in iter_batches(data, batch_size):
        _check_finite_data(inputs, targets, "inputs", "targets", indices=indices)
        empty = False
        yield inputs, targets, indices
    if empty:
        raise InfluxValueError("data is empty; pass at least one example")


def _unique(indices: torch.Tensor) -> torch.Tensor:
    """Dataset indices gathered from batches, refused unless one distinct index per example."""
    if torch.unique(indices).numel() != indices.numel():
        raise InfluxValueError(
            "the dataset indices must be distinct: give each example its own index"
        )
    return indices


def _examples_of(data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs, targets, indices)`` of the whole of ``data``: non-empty and finite."""
    inputs, targets, indices = as_tensors(data)
    if inputs.shape[0] == 0:
        raise InfluxValueError("data is empty; pass at least one example")
    _check_finite_data(inputs, targets, "inputs", "targets", indices=indices)
    return inputs, targets, indices


# --------------------------------------------------------------------------------------------
# Functional building blocks on flat parameters
# --------------------------------------------------------------------------------------------


def _descent_step(objective: FlatObjective, theta: torch.Tensor, lr: float) -> torch.Tensor:
    """``T_z(theta) = theta - lr g_z(theta)``; ascent is the same with ``-lr``."""
    return theta - lr * grad(objective)(theta)


def _bracket_vector(obj_1: FlatObjective, obj_2: FlatObjective, theta: torch.Tensor):
    """``(H_1 g_2 - H_2 g_1, g_1, g_2)`` at theta, by forward-over-reverse HVPs."""
    g_1, g_2 = grad(obj_1)(theta), grad(obj_2)(theta)
    h1_g2 = curvature.jvp(grad(obj_1), (theta,), (g_2,))[1]
    h2_g1 = curvature.jvp(grad(obj_2), (theta,), (g_1,))[1]
    return h1_g2 - h2_g1, g_1, g_2


def _example_objective(model: nn.Module, loss_fn: LossFn, params):
    """``f(theta [P], x, y) -> loss of the single example (x, y)``; vmappable over examples."""

    def loss_of_example(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        objective, _ = curvature.batch_objective(
            model, loss_fn, (x.unsqueeze(0), y.unsqueeze(0)), params=params
        )
        return objective(theta)

    return loss_of_example


def _per_sample_grads(
    model: nn.Module, loss_fn: LossFn, inputs, targets, space, params
) -> torch.Tensor:
    """[B, P] per-sample gradients from the engine; NaN / inf ones are named and refused."""
    result = per_sample_grads(model, loss_fn, inputs, targets, params=params)
    flat = space.flatten({name: result[name] for name in space.names})
    check_finite(flat, "per-sample gradients")
    return flat


def _pair_indices(batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper-triangle pairs (i < j): two index vectors of length B (B - 1) / 2."""
    upper = torch.triu_indices(batch_size, batch_size, offset=1, device=device)
    return upper[0], upper[1]


def _tile_side(chunk_size: int) -> int:
    """Side of the square tiles of pairs: about ``chunk_size`` products per vmapped call."""
    return max(1, math.isqrt(chunk_size))


def _tiled_pair_norms(cross, combine, size: int, chunk_size: int, like: torch.Tensor):
    """[B, B] norms of ``combine(cross(I, J)[j, i], cross(J, I)[i, j], i, j)`` over all pairs.

    ``cross(rows, cols)`` returns ``[len(cols), len(rows), P]``, the product of example ``i``
    (in ``rows``) with the vector of example ``j`` (in ``cols``) at ``[j, i]``. The batch is cut
    into blocks of ``_tile_side(chunk_size)``; each block pair (a <= b) takes one or two calls,
    so every ordered pair is evaluated exactly once and memory stays ~ 2 chunk_size x P.
    """
    side = _tile_side(chunk_size)
    blocks = [
        torch.arange(s, min(s + side, size), device=like.device) for s in range(0, size, side)
    ]
    norms = like.new_zeros(size, size)
    for a, rows in enumerate(blocks):
        for cols in blocks[a:]:
            # forward[j, i]: example i (rows) with vector j (cols); backward[i, j]: the reverse.
            forward = cross(rows, cols)
            backward = forward if cols is rows else cross(cols, rows)
            vectors = combine(forward.transpose(0, 1), backward, rows, cols)  # [|rows|, |cols|, P]
            norms[rows[:, None], cols[None, :]] = vectors.norm(dim=-1)
    norms = torch.triu(norms, diagonal=1)
    return norms + norms.T


def _pair_bracket_norms(example_loss, theta, inputs, targets, per_grads, chunk_size):
    """[B, B] norms of ``H_i g_j - H_j g_i``, by tiles of per-example HVPs.

    Each product is ``jvp(grad(loss_i), theta, g_j)``, vmapped over the vectors of one block and
    the examples of the other: the primal forward and backward pass of an example is shared by
    all the vectors of the tile. The vmaps wrap the jvp, never the reverse: torch's forward-mode
    derivative of a vmapped gradient is wrong through ``layer_norm`` with an affine weight when
    its input depends on theta (0.1-1% in float64), while a jvp of one example's gradient is not.
    """
    example_grad = grad(example_loss)

    def example_hvp(x, y, v):
        return curvature.jvp(lambda t: example_grad(t, x, y), (theta,), (v,))[1]

    over_examples = vmap(example_hvp, in_dims=(0, 0, None))
    over_vectors = vmap(over_examples, in_dims=(None, None, 0))

    def cross(rows, cols):
        return over_vectors(inputs[rows], targets[rows], per_grads[cols])

    def combine(h_i_g_j, h_j_g_i, rows, cols):
        return h_i_g_j - h_j_g_i

    return _tiled_pair_norms(cross, combine, inputs.shape[0], chunk_size, theta)


def _pair_step_norms(example_loss, theta, inputs, targets, per_grads, lr, chunk_size):
    """[B, B] norms of the exact commutators ``T_i T_j - T_j T_i``, by tiles.

    With ``T_j theta = theta - lr g_j`` known from the per-sample gradients,
    ``T_i T_j - T_j T_i = lr [(g_i(theta) - g_i(theta - lr g_j))
    - (g_j(theta) - g_j(theta - lr g_i))]``; a tile evaluates the gradients of one block's
    examples at the points ``theta - lr g_j`` of the other block's examples.
    """
    per_example_grad = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def cross(rows, cols):
        moved = theta - lr * per_grads[cols]
        return vmap(per_example_grad, in_dims=(0, None, None))(moved, inputs[rows], targets[rows])

    def combine(g_i_moved, g_j_moved, rows, cols):
        # g_i_moved[i, j] = g_i(theta - lr g_j); g_j_moved[i, j] = g_j(theta - lr g_i).
        return lr * (
            (per_grads[rows][:, None] - g_i_moved) - (per_grads[cols][None, :] - g_j_moved)
        )

    return _tiled_pair_norms(cross, combine, inputs.shape[0], chunk_size, theta)


def _label_summaries(norms: torch.Tensor, targets: torch.Tensor, first, second):
    flat_targets = targets.reshape(targets.shape[0], -1)
    same = (flat_targets[first] == flat_targets[second]).all(dim=1)
    pair_norms = norms[first, second]

    def summary(mask: torch.Tensor) -> LabelSummary:
        values = pair_norms[mask]
        if values.numel() == 0:
            return LabelSummary(math.nan, math.nan, 0)
        return LabelSummary(values.mean().item(), values.median().item(), int(values.numel()))

    return summary(same), summary(~same)


# --------------------------------------------------------------------------------------------
# Public API: two steps
# --------------------------------------------------------------------------------------------


def step(
    model: nn.Module,
    loss_fn: LossFn,
    z1,
    z2,
    *,
    lr: float,
    params: Iterable[str] | None = None,
) -> CommutatorResult:
    """Exact commutator ``T_1(T_2(theta)) - T_2(T_1(theta))`` of two SGD steps at the current theta.

    ``z1``, ``z2``: ``(input, target)`` of one example (scalar target; a batch dimension is added)
    or ``(inputs [B, ...], targets [B, ...])`` of a batch; each step descends the mean loss of its
    batch with learning rate ``lr``. ``loss_fn(outputs, targets)`` returns per-example losses [B].
    Returns a :class:`CommutatorResult` whose ``vector`` is [P]; about ``lr^2 * bracket(...)``.
    """
    lr = check_number("lr", lr, above=0)
    check_model(model)
    obj_1, space = curvature.batch_objective(model, loss_fn, _as_batch(z1, "z1"), params=params)
    obj_2, _ = curvature.batch_objective(model, loss_fn, _as_batch(z2, "z2"), params=params)
    theta = space.current(model)
    # g_1, g_2 at theta serve both the first steps and the reported norms: 4 gradients in all.
    g_1, g_2 = grad(obj_1)(theta), grad(obj_2)(theta)
    one_after_two = _descent_step(obj_1, theta - lr * g_2, lr)
    two_after_one = _descent_step(obj_2, theta - lr * g_1, lr)
    vector = one_after_two - two_after_one
    grad_norms = (g_1.norm().item(), g_2.norm().item())
    return CommutatorResult(vector, vector.norm().item(), "step", lr, grad_norms)


def bracket(
    model: nn.Module,
    loss_fn: LossFn,
    z1,
    z2,
    *,
    params: Iterable[str] | None = None,
) -> CommutatorResult:
    """Second-order term of the step commutator: ``H_1 g_2 - H_2 g_1`` [P] at the current theta.

    ``step(..., lr=eta) = eta^2 * bracket(...) + O(eta^3)``; exact for quadratic losses. Uses two
    Hessian-vector products (forward-over-reverse); no Hessian is formed. Arguments as in
    :func:`step`.
    """
    check_model(model)
    obj_1, space = curvature.batch_objective(model, loss_fn, _as_batch(z1, "z1"), params=params)
    obj_2, _ = curvature.batch_objective(model, loss_fn, _as_batch(z2, "z2"), params=params)
    vector, g_1, g_2 = _bracket_vector(obj_1, obj_2, space.current(model))
    return CommutatorResult(
        vector, vector.norm().item(), "bracket", None, (g_1.norm().item(), g_2.norm().item())
    )


# --------------------------------------------------------------------------------------------
# Public API: every pair of a batch
# --------------------------------------------------------------------------------------------


def pairwise(
    model: nn.Module,
    loss_fn: LossFn,
    batch,
    *,
    lr: float | None = None,
    chunk_size: int = 256,
    params: Iterable[str] | None = None,
) -> PairwiseResult:
    """[B, B] commutator norms of the single-example steps of every pair in ``batch``.

    ``lr=None``: bracket norms ``||H_i g_j - H_j g_i||``; ``lr`` given: exact step commutator norms
    ``||T_i T_j - T_j T_i||``. Per-sample gradients [B, P] come from the gradient engine. Each
    pair needs ``H_i g_j`` and ``H_j g_i`` (or ``g_i(theta - lr g_j)`` and ``g_j(theta - lr g_i)``):
    the B x B products are evaluated in square tiles of about ``chunk_size`` (side
    ``isqrt(chunk_size)``), one vmapped call per tile that shares the forward and backward pass
    at theta across the tile's vectors (memory ~ 2 chunk_size x P plus activations; lower it
    for large models). Same-label / different-label pairs are summarized.
    """
    lr = None if lr is None else check_number("lr", lr, above=0)
    chunk_size = check_integer("chunk_size", chunk_size, minimum=1)
    check_model(model)
    inputs, targets = _as_batch(batch, "batch")
    space = curvature.ParamSpace.of(model, params)
    theta = space.current(model)
    per_grads = _per_sample_grads(model, loss_fn, inputs, targets, space, params).to(theta.dtype)
    example_loss = _example_objective(model, loss_fn, params)
    first, second = _pair_indices(inputs.shape[0], theta.device)
    if lr is None:
        norms = _pair_bracket_norms(example_loss, theta, inputs, targets, per_grads, chunk_size)
    else:
        norms = _pair_step_norms(example_loss, theta, inputs, targets, per_grads, lr, chunk_size)
    same, different = _label_summaries(norms, targets, first, second)
    kind = "bracket" if lr is None else "step"
    return PairwiseResult(norms, per_grads.norm(dim=1), targets, kind, lr, same, different)


# Per-example [B, P] buffers of reference_bracket_norms stay under this many floats by default.
REFERENCE_BRACKET_FLOATS = 1 << 25
_REFERENCE_BRACKET_BATCH = 256


def reference_bracket_norms(
    model: nn.Module,
    loss_fn: LossFn,
    data,
    reference,
    *,
    batch_size: int | None = None,
    params: Iterable[str] | None = None,
) -> torch.Tensor:
    """``||H_i g_R - H_R g_i||`` for every example i of ``data`` [N], in the data's order.

    The bracket (see :func:`bracket`) of one SGD step on example i with one on the batch
    ``reference`` R (mean loss): the commutator of the two steps is ``lr^2`` times this vector
    plus O(lr^3), so a large value means that training on i before or after a typical batch
    leads to different parameters. ``data`` (a tuple, Dataset or DataLoader) is streamed in
    batches of ``batch_size`` (default: at most 256, and at most
    :data:`REFERENCE_BRACKET_FLOATS` per [B, P] buffer). Each example's ``(g_i, H_i g_R)`` comes
    from one jvp of its own gradient along ``g_R``, vmapped over the batch; ``H_R g_i`` [B, P]
    from a vmapped Hessian-vector product. Equals ``bracket(model, loss_fn, z_i, reference).norm``
    example by example.
    """
    check_model(model)
    reference = _as_batch(reference, "reference")
    objective, space = curvature.batch_objective(model, loss_fn, reference, params=params)
    theta = space.current(model)
    if batch_size is None:
        batch_size = max(
            1, min(_REFERENCE_BRACKET_BATCH, REFERENCE_BRACKET_FLOATS // max(1, theta.numel()))
        )
    batch_size = check_integer("batch_size", batch_size, minimum=1)
    g_reference = grad(objective)(theta)
    example_grad = grad(_example_objective(model, loss_fn, params))

    def gradient_and_product(x: torch.Tensor, y: torch.Tensor):
        # The vmap wraps the jvp: a jvp of vmapped gradients is wrong through LayerNorm in torch
        # (see _pair_bracket_norms).
        return curvature.jvp(lambda t: example_grad(t, x, y), (theta,), (g_reference,))

    over_examples = vmap(gradient_and_product)
    reference_products = vmap(lambda v: curvature.jvp(grad(objective), (theta,), (v,))[1])
    norms = []
    for inputs, targets, indices in iter_batches(data, batch_size):
        _check_finite_data(inputs, targets, "inputs", "targets", indices=indices)
        gradients, h_i_g_reference = over_examples(inputs, targets)
        norms.append((h_i_g_reference - reference_products(gradients)).norm(dim=1))
    if not norms:
        raise InfluxValueError("data is empty; pass at least one example")
    return torch.cat(norms)


# --------------------------------------------------------------------------------------------
# Public API: whole runs
# --------------------------------------------------------------------------------------------


def _batches_of(data, batch_size: int | None) -> list[Pair]:
    inputs, targets, _ = _examples_of(data)
    size = (
        inputs.shape[0]
        if batch_size is None
        else check_integer("batch_size", batch_size, minimum=1)
    )
    return [(x, y) for x, y, _ in iter_batches((inputs, targets), size)]


def _run_sgd(
    objectives: Sequence[FlatObjective], sequence: Iterable[int], theta, lr: float
) -> torch.Tensor:
    for index in sequence:
        theta = _descent_step(objectives[index], theta, lr)
    return theta


def _predicted_order_shift(objectives, gradients, theta, sequence, reference, lr) -> torch.Tensor:
    """Second-order prediction of ``theta(sequence) - theta(reference)`` [P] at the start theta.

    A run applying steps ``s_1, s_2, ...`` ends at ``theta - lr sum_k g_k + lr^2 sum_{k<l} H_l g_k
    + O(lr^3)``. Grouping by batch: ``sum_b H_b (sum_a c_ab g_a)`` with ``c_ab`` the number of
    times batch a precedes batch b, so K HVPs suffice whatever the sequence length.
    """
    counts = _precedence_counts(sequence, len(objectives)) - _precedence_counts(
        reference, len(objectives)
    )
    # preceding[b] = sum_a c_ab g_a: [K, P] (the counts are tallied on the CPU)
    preceding = counts.T.to(gradients) @ gradients
    total = torch.zeros_like(theta)
    for b, objective in enumerate(objectives):
        if preceding[b].abs().max() > 0:
            total = total + curvature.jvp(grad(objective), (theta,), (preceding[b],))[1]
    return lr**2 * total


def _precedence_counts(sequence: Sequence[int], num_batches: int) -> torch.Tensor:
    """[K, K] ``c[a, b]`` = number of position pairs p < q with batch a at p and b at q."""
    counts = torch.zeros(num_batches, num_batches, dtype=torch.float64, device="cpu")
    seen = torch.zeros(num_batches, dtype=torch.float64, device="cpu")
    for b in sequence:
        counts[:, b] += seen
        seen[b] += 1
    return counts


def order_shift(
    model: nn.Module,
    loss_fn: LossFn,
    data,
    *,
    lr: float,
    epochs: int,
    perms: int,
    batch_size: int,
    seed: int = 0,
    params: Iterable[str] | None = None,
) -> OrderShiftResult:
    """How far SGD lands when only the order of the batches changes, measured and predicted.

    ``data`` is cut into K fixed batches of ``batch_size`` in its given order. The reference run
    visits them in order for ``epochs`` epochs; each of ``perms`` runs visits the same batches in
    a fresh random order every epoch (seeded). Both start at the model's parameters, which stay
    untouched. The prediction sums brackets at the start point (see :func:`bracket`): it is the
    ``lr^2`` term and degrades as ``lr * steps * curvature`` grows. Every run revisits all K
    batches, so ``data`` is held whole (it is read once).
    """
    lr = check_number("lr", lr, above=0)
    epochs = check_integer("epochs", epochs, minimum=1)
    perms = check_integer("perms", perms, minimum=1)
    check_model(model)
    batches = _batches_of(data, batch_size)
    objectives = [curvature.batch_objective(model, loss_fn, b, params=params)[0] for b in batches]
    theta = curvature.ParamSpace.of(model, params).current(model)
    gradients = torch.stack([grad(objective)(theta) for objective in objectives])  # [K, P]
    reference = list(range(len(batches))) * epochs
    reference_end = _run_sgd(objectives, reference, theta, lr)
    generator = torch.Generator().manual_seed(seed)
    measured, predicted, orders = [], [], []
    for _ in range(perms):
        sequence = [
            i
            for _ in range(epochs)
            for i in torch.randperm(len(batches), generator=generator, device="cpu").tolist()
        ]
        end = _run_sgd(objectives, sequence, theta, lr)
        measured.append((end - reference_end).norm())
        predicted.append(
            _predicted_order_shift(objectives, gradients, theta, sequence, reference, lr).norm()
        )
        orders.append(sequence)
    displacement = (reference_end - theta).norm().item()
    return OrderShiftResult(
        torch.stack(measured), torch.stack(predicted), displacement, lr, epochs, batch_size, orders
    )


def _descent_then_ascent(objectives, theta, lr, epochs, ascent_epochs, order):
    """Descent then ascent over ``objectives``.

    Returns (end [P], after_descent [P], residual after each ascent epoch [ascent_epochs]).
    """
    descent_sequence = list(range(len(objectives)))
    ascent_sequence = descent_sequence if order == "same" else descent_sequence[::-1]
    after_descent = _run_sgd(objectives, descent_sequence * epochs, theta, lr)
    current, trajectory = after_descent, []
    for _ in range(ascent_epochs):
        current = _run_sgd(objectives, ascent_sequence, current, -lr)
        trajectory.append((current - theta).norm())
    return current, after_descent, torch.stack(trajectory)


def _per_point_residuals(
    model, loss_fn, inputs, targets, theta, lr, epochs, ascent_epochs, params, chunk_size
):
    """[N] residuals and [N] descent displacements: one GD-then-GA run per point, vmapped."""
    example_loss = _example_objective(model, loss_fn, params)
    example_grad = grad(example_loss)

    def one_point(x, y):
        current = theta
        for _ in range(epochs):
            current = current - lr * example_grad(current, x, y)
        after_descent = current
        for _ in range(ascent_epochs):
            current = current + lr * example_grad(current, x, y)
        return (current - theta).norm(), (after_descent - theta).norm()

    return vmap(one_point, chunk_size=chunk_size)(inputs, targets)


def ascent_residual(
    model: nn.Module,
    loss_fn: LossFn,
    data,
    *,
    lr: float,
    epochs: int = 1,
    batch_size: int | None = None,
    order: str = "same",
    mode: str = "dataset",
    ascent_epochs: int | None = None,
    chunk_size: int | None = 64,
    params: Iterable[str] | None = None,
) -> AscentResult:
    """Gradient descent on ``data``, then ascent on the same examples: ``||theta_end - theta_0||``.

    Descent runs ``epochs`` epochs of steps ``theta - lr g_b`` over the batches of ``data``
    (``batch_size=None``: the whole dataset is one batch); ascent runs ``ascent_epochs`` (default
    ``epochs``) epochs of ``theta + lr g_b`` over the same batches, in the same order
    (``order="same"``) or reversed (``"reversed"``, the order an exact inverse would need).

    ``mode``: ``"dataset"`` one run over all batches (residual 0-d, plus the per-ascent-epoch
    ``trajectory``); ``"batch"`` one independent run per batch ([K]); ``"point"`` one independent
    run per example ([N] in the data's order, its dataset indices in ``indices``; vmapped
    ``chunk_size`` points at a time; ``batch_size`` and ``order`` play no role). For linear
    regression and one point, ``theta_end - theta_0 = -lr^2 (theta_0.x - y) ||x||^2 x``: ascent
    never undoes descent unless the residual is 0.

    ``"point"`` and ``"batch"`` stream ``data`` (each run needs its own examples only);
    ``"dataset"`` holds every batch, since its run revisits each of them every epoch.
    """
    lr = check_number("lr", lr, above=0)
    epochs = check_integer("epochs", epochs, minimum=1)
    ascent_epochs = (
        epochs
        if ascent_epochs is None
        else check_integer("ascent_epochs", ascent_epochs, minimum=1)
    )
    order = _check_choice(order, "order", ("same", "reversed"))
    mode = _check_choice(mode, "mode", ("dataset", "batch", "point"))
    check_model(model)
    theta = curvature.ParamSpace.of(model, params).current(model)
    common = dict(mode=mode, order=order, lr=lr, epochs=epochs, ascent_epochs=ascent_epochs)
    if mode == "point":
        # Every point is its own run: the data is streamed, a block of points at a time.
        parts = []
        for inputs, targets, indices in _streamed_examples(data, _POINT_BLOCK):
            residual, displacement = _per_point_residuals(
                model, loss_fn, inputs, targets, theta, lr, epochs, ascent_epochs, params,
                chunk_size,
            )  # fmt: skip
            parts.append((residual, displacement, indices))
        residual, displacement, indices = (torch.cat(p) for p in zip(*parts, strict=True))
        return AscentResult(residual, displacement, indices=_unique(indices), **common)
    if mode == "batch":
        # Every batch is its own run: the data is streamed, a batch at a time.
        size = (
            max(1, num_examples(data))
            if batch_size is None
            else check_integer("batch_size", batch_size, minimum=1)
        )
        runs = []
        for inputs, targets, _ in _streamed_examples(data, size):
            batch = (inputs, targets)
            objective = curvature.batch_objective(model, loss_fn, batch, params=params)[0]
            runs.append(_descent_then_ascent([objective], theta, lr, epochs, ascent_epochs, order))
        residual = torch.stack([(end - theta).norm() for end, _, _ in runs])
        displacement = torch.stack([(mid - theta).norm() for _, mid, _ in runs])
        return AscentResult(residual, displacement, **common)
    # One run revisits every batch each epoch: the batches are held whole.
    batches = _batches_of(data, batch_size)
    objectives = [curvature.batch_objective(model, loss_fn, b, params=params)[0] for b in batches]
    end, after_descent, trajectory = _descent_then_ascent(
        objectives, theta, lr, epochs, ascent_epochs, order
    )
    return AscentResult(
        (end - theta).norm(),
        (after_descent - theta).norm(),
        trajectory=trajectory,
        vector=end - theta,
        **common,
    )
