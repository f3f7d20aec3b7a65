"""torch.func path: the reference for every fast path, and the fallback for unsupported layers.

``vmap(grad(functional_call))`` gives per-sample gradients of any model whose examples do not
interact inside the forward pass. It is slower and hungrier than the hook engine but obviously
correct, so the engine's results are tested against it. ``naive_per_sample_grads`` is the plainer
still per-example loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from influx.grads.common import LossFn, check_batch, fixed_state, select_parameters


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    params: Iterable[str] | None = None,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients with ``vmap(grad(functional_call))``: name -> [N, *param.shape]."""
    check_batch(inputs, targets)
    selected = select_parameters(model, params)
    frozen = fixed_state(model, selected)

    def example_loss(weights: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        out = functional_call(model, {**frozen, **weights}, (x.unsqueeze(0),))
        loss = loss_fn(out, y.unsqueeze(0))
        return loss.sum()

    weights = {name: p.detach() for name, p in selected.items()}
    if inputs.shape[0] == 0:
        return {name: p.new_zeros((0, *p.shape)) for name, p in weights.items()}
    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)
    return per_example(weights, inputs, targets)


def naive_per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    params: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The obviously correct loop: one backward per example. For tests and checks only."""
    check_batch(inputs, targets)
    selected = select_parameters(model, params)
    names = list(selected)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for i in range(inputs.shape[0]):
        loss = loss_fn(model(inputs[i : i + 1]), targets[i : i + 1]).sum()
        example_grads = torch.autograd.grad(loss, [selected[n] for n in names], allow_unused=True)
        for name, g in zip(names, example_grads):
            rows[name].append(torch.zeros_like(selected[name]) if g is None else g)
    return {
        name: torch.stack(rows[name])
        if rows[name]
        else selected[name].new_zeros((0, *selected[name].shape))
        for name in names
    }
