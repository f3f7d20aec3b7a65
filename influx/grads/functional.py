"""torch.func path: the reference for every fast path, and the fallback for unsupported layers.

``vmap(grad(functional_call))`` gives per-sample gradients of any model whose examples do not
interact inside the forward pass. It is slower and hungrier than the hook engine but obviously
correct, so the engine's results are tested against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from influx.errors import InfluxValueError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def select_parameters(
    model: nn.Module, params: Iterable[str] | None = None
) -> dict[str, nn.Parameter]:
    """Map parameter names to parameters: the named ones, or all that require grad.

    Raises InfluxValueError for a name the model does not have, listing the closest valid names.
    """
    named = dict(model.named_parameters())
    if params is None:
        return {name: p for name, p in named.items() if p.requires_grad}
    if isinstance(params, str):
        params = [params]
    selected = {}
    for name in params:
        if name not in named:
            raise InfluxValueError(
                f"model has no parameter named {name!r}; valid names include "
                f"{sorted(named)[:8]}{' ...' if len(named) > 8 else ''} (see model.named_parameters())"
            )
        selected[name] = named[name]
    if not selected:
        raise InfluxValueError(
            "no parameters selected: pass parameter names or unfreeze some parameters"
        )
    return selected


def fixed_state(model: nn.Module, varied) -> dict[str, torch.Tensor]:
    """Detached parameters and buffers of ``model`` except the names in ``varied``.

    With the varied tensors added back, this is the full state ``functional_call`` needs.
    """
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: t.detach() for name, t in state.items() if name not in varied}


def check_per_example_losses(losses: torch.Tensor, batch_size: int) -> None:
    """loss_fn must return one loss per example, shape [N]; a reduced loss is a common mistake."""
    if losses.dim() != 1 or losses.shape[0] != batch_size:
        hint = (
            "it looks reduced: pass reduction='none' (e.g. F.cross_entropy(out, y, reduction='none'))"
            if losses.dim() == 0
            else "return one loss per example"
        )
        raise InfluxValueError(
            f"loss_fn must return per-example losses of shape [{batch_size}]; got shape "
            f"{tuple(losses.shape)}: {hint}"
        )


def check_batch(inputs: torch.Tensor, targets: torch.Tensor) -> None:
    if inputs.shape[0] != targets.shape[0]:
        raise InfluxValueError(
            f"inputs and targets disagree on the batch size: {inputs.shape[0]} vs {targets.shape[0]}"
        )


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


def flatten_per_sample(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate a name -> [N, *shape] mapping into one [N, P] matrix, in mapping order."""
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)
