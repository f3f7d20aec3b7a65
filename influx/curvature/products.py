"""Curvature products on flat parameter vectors: gradients, Hessian- and GGN-vector products.

Everything here is matrix-free: a Hessian is never formed unless asked for explicitly
(:func:`dense_hessian`, for small models and tests). Products use forward-over-reverse
(``jvp`` of ``grad``), which costs about two backward passes per vector and vmaps over a
block of vectors.

Conventions: ``batch`` is ``(inputs, targets)``; the objective is the *mean* per-example loss over
the batch unless ``reduction="sum"``; vectors are flat over the selected parameters in the order
of :attr:`ParamSpace.names`: ``model.named_parameters()`` order when ``params`` is None, the
caller's order when ``params`` names them. The public products refuse an empty batch, NaN / inf
inputs or targets (naming the examples) and BatchNorm in train mode before any work.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.func
from torch import nn
from torch.func import functional_call, grad, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from influx.checks import check_choice
from influx.errors import InfluxValueError
from influx.grads.common import (
    LossFn,
    check_batch,
    check_finite,
    check_model,
    check_per_example_losses,
    fixed_state,
    select_parameters,
)

__all__ = [
    "ParamSpace",
    "batch_objective",
    "check_curvature_batch",
    "check_reduction",
    "dense_hessian",
    "ggn_vp",
    "gradient",
    "hvp",
    "jvp",
    "twice_differentiable_call",
]


def jvp(func, primals, tangents):
    """``torch.func.jvp``, without the FutureWarning torch raises on its own first use of it.

    On the first forward-mode product torch compiles its decompositions with
    ``torch.jit.script``, which recent versions deprecate with a warning the user can do nothing
    about; they are compiled here once with that warning silenced.
    """
    _load_forward_ad_decompositions()
    return torch.func.jvp(func, primals, tangents)


@functools.cache
def _load_forward_ad_decompositions() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
        )
        zero = torch.zeros(1, device="cpu")
        torch.func.jvp(torch.neg, (zero,), (zero,))


@dataclass(frozen=True)
class ParamSpace:
    """The flat coordinate system of a set of named parameters (P = total numel).

    ``names`` fixes the order of the blocks of a flat vector: ``model.named_parameters()`` order
    for the trainable parameters (``params=None``), else the order in which ``params`` names them.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module, params: Iterable[str] | None = None) -> ParamSpace:
        selected = select_parameters(model, params)
        return cls(tuple(selected), tuple(p.shape for p in selected.values()))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """name -> [..., *shape] (common leading dims) to [..., P]."""
        parts = []
        for name, shape in zip(self.names, self.shapes):
            t = tensors[name]
            lead = t.shape[: t.dim() - len(shape)]
            parts.append(t.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """[..., P] to name -> [..., *shape] (views)."""
        if vector.shape[-1] != self.size:
            raise InfluxValueError(
                f"vector has {vector.shape[-1]} entries; the parameters have {self.size}"
            )
        lead = vector.shape[:-1]
        pieces = torch.split(vector, self.numels, dim=-1)
        # One shape tuple: a 0-dim parameter of an unbatched vector has no dims at all.
        return {n: p.reshape((*lead, *s)) for n, p, s in zip(self.names, pieces, self.shapes)}

    def current(self, model: nn.Module) -> torch.Tensor:
        """The model's present values of these parameters as one detached flat vector [P]."""
        named = dict(model.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.names])


def batch_objective(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    params: Iterable[str] | None = None,
    reduction: str = "mean",
) -> tuple[Callable[[torch.Tensor], torch.Tensor], ParamSpace]:
    """Return ``f(theta_flat) -> scalar loss of the batch`` and the flat space of ``theta``.

    Parameters outside the selection and buffers are held fixed at their current values.
    """
    check_reduction(reduction)
    space = ParamSpace.of(model, params)
    inputs, targets = batch
    fixed = fixed_state(model, space.names)

    def objective(theta: torch.Tensor) -> torch.Tensor:
        out = twice_differentiable_call(model, {**fixed, **space.unflatten(theta)}, inputs)
        losses = loss_fn(out, targets)
        check_per_example_losses(losses, inputs.shape[0])
        return losses.mean() if reduction == "mean" else losses.sum()

    return objective, space


def check_reduction(reduction: str) -> None:
    """The objective is the mean or the sum of the per-example losses; anything else is refused."""
    check_choice("reduction", reduction, ("mean", "sum"))


def check_curvature_batch(model: nn.Module, batch) -> None:
    """The checks of a public product, before any work: the model (BatchNorm in train mode),
    a non-empty batch whose inputs and targets agree on its size, and finite values in both."""
    check_model(model)
    inputs, targets = batch
    check_batch(inputs, targets)
    if inputs.shape[0] == 0:
        raise InfluxValueError("batch is empty; pass at least one example")
    check_finite(inputs, "inputs")
    if isinstance(targets, torch.Tensor):
        check_finite(targets, "targets")


def twice_differentiable_call(model: nn.Module, state: Mapping, inputs: torch.Tensor):
    """``functional_call(model, state, (inputs,))`` with attention on torch's math kernel.

    Curvature products differentiate the forward twice (forward over reverse, or reverse over
    reverse). torch's fused attention kernels support neither (no forward-mode derivative, no
    double backward on the CPU's flash kernel), nor does the fused inference path of
    ``nn.TransformerEncoderLayer`` (which parameters swapped in by torch.func can trigger in eval
    mode), so a transformer's objective would fail there; the math kernel computes the same
    attention from differentiable operations.
    """
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            return functional_call(model, state, (inputs,))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def gradient(model, loss_fn, batch, *, params=None, reduction="mean", theta=None) -> torch.Tensor:
    """Flat gradient [P] of the batch objective at ``theta`` (default: current parameters)."""
    check_curvature_batch(model, batch)
    objective, space = batch_objective(model, loss_fn, batch, params=params, reduction=reduction)
    theta = space.current(model) if theta is None else theta
    return grad(objective)(theta)


def hvp(
    model, loss_fn, batch, vectors, *, params=None, reduction="mean", theta=None
) -> torch.Tensor:
    """Hessian-vector products H v of the batch objective; ``vectors`` is [P] or [K, P].

    Forward-over-reverse: ``jvp(grad(f), theta, v)``; a block of K vectors is vmapped.
    """
    check_curvature_batch(model, batch)
    return _hvp(model, loss_fn, batch, vectors, params=params, reduction=reduction, theta=theta)


def _hvp(model, loss_fn, batch, vectors, *, params, reduction, theta) -> torch.Tensor:
    objective, space = batch_objective(model, loss_fn, batch, params=params, reduction=reduction)
    theta = space.current(model) if theta is None else theta

    def single(v: torch.Tensor) -> torch.Tensor:
        return jvp(grad(objective), (theta,), (v,))[1]

    return single(vectors) if vectors.dim() == 1 else vmap(single)(vectors)


def ggn_vp(
    model, loss_fn, batch, vectors, *, params=None, reduction="mean", theta=None
) -> torch.Tensor:
    """Generalized Gauss-Newton products G v = J^T H_out J v; ``vectors`` is [P] or [K, P].

    J is the Jacobian of the model outputs w.r.t. the parameters and H_out the Hessian of the
    loss w.r.t. the outputs; G is positive semi-definite for convex losses (cross-entropy, MSE).
    """
    check_reduction(reduction)
    check_curvature_batch(model, batch)
    return _ggn_vp(model, loss_fn, batch, vectors, params=params, reduction=reduction, theta=theta)


def _ggn_vp(model, loss_fn, batch, vectors, *, params, reduction, theta) -> torch.Tensor:
    space = ParamSpace.of(model, params)
    inputs, targets = batch
    theta = space.current(model) if theta is None else theta
    fixed = fixed_state(model, space.names)
    scale = 1.0 / inputs.shape[0] if reduction == "mean" else 1.0

    def outputs_of(t: torch.Tensor) -> torch.Tensor:
        return twice_differentiable_call(model, {**fixed, **space.unflatten(t)}, inputs)

    def output_loss(out: torch.Tensor) -> torch.Tensor:
        return loss_fn(out, targets).sum() * scale

    out, pullback = vjp(outputs_of, theta)

    def single(v: torch.Tensor) -> torch.Tensor:
        _, jv = jvp(outputs_of, (theta,), (v,))
        _, hjv = jvp(grad(output_loss), (out.detach(),), (jv,))
        return pullback(hjv)[0]

    return single(vectors) if vectors.dim() == 1 else vmap(single)(vectors)


def dense_hessian(
    model, loss_fn, batch, *, params=None, reduction="mean", theta=None, kind="hessian"
):
    """The full P x P Hessian (``kind="hessian"``) or GGN (``kind="ggn"``): small models only."""
    check_choice("kind", kind, ("hessian", "ggn"))
    product = {"hessian": _hvp, "ggn": _ggn_vp}[kind]
    check_reduction(reduction)
    check_curvature_batch(model, batch)
    space = ParamSpace.of(model, params)
    theta = space.current(model) if theta is None else theta
    eye = torch.eye(space.size, dtype=theta.dtype, device=theta.device)
    columns = [
        product(model, loss_fn, batch, block, params=params, reduction=reduction, theta=theta)
        for block in eye.split(256)
    ]
    matrix = torch.cat(columns)
    return 0.5 * (matrix + matrix.T)
