"""Curvature products on flat parameter vectors: gradients, Hessian- and GGN-vector products.

Everything here is matrix-free: a Hessian is never formed unless asked for explicitly
(:func:`dense_hessian`, for small models and tests). Products use forward-over-reverse
(``jvp`` of ``grad``), which costs about two backward passes per vector and vmaps over a
block of vectors.

Conventions: ``batch`` is ``(inputs, targets)``; the objective is the *mean* per-example loss over
the batch unless ``reduction="sum"``; vectors are flat over the selected parameters in
``model.named_parameters()`` order (see :class:`ParamSpace`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from influx.errors import InfluxValueError
from influx.grads.functional import LossFn, check_per_example_losses, select_parameters


@dataclass(frozen=True)
class ParamSpace:
    """The flat coordinate system of a set of named parameters (P = total numel)."""

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
            raise InfluxValueError(f"vector has {vector.shape[-1]} entries; the parameters have {self.size}")
        lead = vector.shape[:-1]
        pieces = torch.split(vector, self.numels, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, pieces, self.shapes)}

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
    if reduction not in ("mean", "sum"):
        raise InfluxValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    space = ParamSpace.of(model, params)
    inputs, targets = batch
    fixed = {
        name: t.detach()
        for name, t in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()
        if name not in space.names
    }

    def objective(theta: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**fixed, **space.unflatten(theta)}, (inputs,))
        losses = loss_fn(out, targets)
        check_per_example_losses(losses, inputs.shape[0])
        return losses.mean() if reduction == "mean" else losses.sum()

    return objective, space


def gradient(model, loss_fn, batch, *, params=None, reduction="mean", theta=None) -> torch.Tensor:
    """Flat gradient [P] of the batch objective at ``theta`` (default: current parameters)."""
    objective, space = batch_objective(model, loss_fn, batch, params=params, reduction=reduction)
    theta = space.current(model) if theta is None else theta
    return grad(objective)(theta)


def hvp(model, loss_fn, batch, vectors, *, params=None, reduction="mean", theta=None) -> torch.Tensor:
    """Hessian-vector products H v of the batch objective; ``vectors`` is [P] or [K, P].

    Forward-over-reverse: ``jvp(grad(f), theta, v)``; a block of K vectors is vmapped.
    """
    objective, space = batch_objective(model, loss_fn, batch, params=params, reduction=reduction)
    theta = space.current(model) if theta is None else theta

    def single(v: torch.Tensor) -> torch.Tensor:
        return jvp(grad(objective), (theta,), (v,))[1]

    return single(vectors) if vectors.dim() == 1 else vmap(single)(vectors)


def ggn_vp(model, loss_fn, batch, vectors, *, params=None, reduction="mean", theta=None) -> torch.Tensor:
    """Generalized Gauss-Newton products G v = J^T H_out J v; ``vectors`` is [P] or [K, P].

    J is the Jacobian of the model outputs w.r.t. the parameters and H_out the Hessian of the
    loss w.r.t. the outputs; G is positive semi-definite for convex losses (cross-entropy, MSE).
    """
    space = ParamSpace.of(model, params)
    inputs, targets = batch
    theta = space.current(model) if theta is None else theta
    fixed = {
        name: t.detach()
        for name, t in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()
        if name not in space.names
    }
    scale = 1.0 / inputs.shape[0] if reduction == "mean" else 1.0

    def outputs_of(t: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**fixed, **space.unflatten(t)}, (inputs,))

    def output_loss(out: torch.Tensor) -> torch.Tensor:
        return loss_fn(out, targets).sum() * scale

    out, pullback = vjp(outputs_of, theta)

    def single(v: torch.Tensor) -> torch.Tensor:
        _, jv = jvp(outputs_of, (theta,), (v,))
        _, hjv = jvp(grad(output_loss), (out.detach(),), (jv,))
        return pullback(hjv)[0]

    return single(vectors) if vectors.dim() == 1 else vmap(single)(vectors)


def dense_hessian(model, loss_fn, batch, *, params=None, reduction="mean", theta=None, kind="hessian"):
    """The full P x P Hessian (``kind="hessian"``) or GGN (``kind="ggn"``): small models only."""
    space = ParamSpace.of(model, params)
    theta = space.current(model) if theta is None else theta
    eye = torch.eye(space.size, dtype=theta.dtype, device=theta.device)
    product = {"hessian": hvp, "ggn": ggn_vp}.get(kind)
    if product is None:
        raise InfluxValueError(f"kind must be 'hessian' or 'ggn'; got {kind!r}")
    columns = [
        product(model, loss_fn, batch, block, params=params, reduction=reduction, theta=theta)
        for block in eye.split(256)
    ]
    matrix = torch.cat(columns)
    return 0.5 * (matrix + matrix.T)
