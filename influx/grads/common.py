"""Helpers every per-sample path shares: parameter selection, functional state, input checks.

The checks run before any expensive work and raise :class:`influx.errors.InfluxValueError` /
:class:`UnsupportedModelError` with a message that names the problem and the fix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from influx.data import LossFn  # noqa: F401 - re-exported: the one definition is in influx.data
from influx.errors import InfluxValueError, UnsupportedModelError

# At most this many offending example indices are listed in an error message.
SHOWN_INDICES = 10


class TrainModeDropoutWarning(UserWarning):
    """Dropout is active: per-example quantities change from call to call."""


def select_parameters(
    model: nn.Module, params: Iterable[str] | None = None
) -> dict[str, nn.Parameter]:
    """Map parameter names to parameters: the named ones, or all that require grad.

    Raises InfluxValueError for a name the model does not have (listing valid names), and when
    the selection is empty (no trainable parameter, or ``params=[]``).
    """
    named = dict(model.named_parameters())
    if params is None:
        selected = {name: p for name, p in named.items() if p.requires_grad}
        if not selected:
            raise InfluxValueError(
                f"{type(model).__name__} has no trainable parameter ({len(named)} parameters, all "
                "with requires_grad=False): unfreeze some, or name them with params=[...]"
            )
        return selected
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
            "params= selects no parameter: pass parameter names (see model.named_parameters()), "
            "or params=None for all trainable parameters"
        )
    return selected


def fixed_state(model: nn.Module, varied) -> dict[str, torch.Tensor]:
    """Detached parameters and buffers of ``model`` except the names in ``varied``.

    With the varied tensors added back, this is the full state ``functional_call`` needs.
    """
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: t.detach() for name, t in state.items() if name not in varied}


def flat_rows(per_sample: torch.Tensor) -> torch.Tensor:
    """[N, *shape] -> [N, prod(shape)]; a 0-dim parameter gives [N, 1], an empty batch [0, D]."""
    return per_sample.reshape(per_sample.shape[0], math.prod(per_sample.shape[1:]))


def flatten_per_sample(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate a name -> [N, *shape] mapping into one [N, P] matrix, in mapping order."""
    return torch.cat([flat_rows(g) for g in grads.values()], dim=1)


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


def refuse_batchnorm(model: nn.Module, *, trains: str | None = None) -> None:
    """The one BatchNorm refusal: batch statistics mix the examples of a batch, so per-example
    gradients, losses and budgets lose their meaning.

    By default a BatchNorm in train mode is refused (one in eval mode uses its running statistics
    and is fine). ``trains`` names a computation that will put the model in train mode itself
    (``"DP-SGD"``, ``"unlearning"``): then any BatchNorm is refused.
    """
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        where = f"{type(module).__name__} ({name or 'the root module'})"
        if trains is not None:
            raise UnsupportedModelError(
                f"model contains {where} and {trains} runs it in train mode, where batch "
                "statistics mix the examples of a batch: call "
                "influx.models.convert_batchnorm(model) to use GroupNorm"
            )
        if module.training:
            raise UnsupportedModelError(
                f"model contains {where} in train mode: per-sample gradients are ill-defined "
                "because batch statistics mix the examples; call "
                "influx.models.convert_batchnorm(model) to use GroupNorm, or model.eval() to use "
                "the running statistics"
            )


# the earlier name of the train-mode refusal
check_no_train_batchnorm = refuse_batchnorm


def warn_train_dropout(model: nn.Module) -> None:
    """Dropout in train mode draws a new mask per call: per-example numbers become random."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            warnings.warn(
                f"model contains {type(module).__name__}(p={module.p}) ({name}) in train mode: "
                "per-example gradients, norms and scores change from call to call; call "
                "model.eval() first (it only switches dropout and normalization to inference)",
                TrainModeDropoutWarning,
                stacklevel=3,
            )
            return


def check_model(model: nn.Module) -> None:
    """The checks on a model that every per-example computation needs, before any work."""
    refuse_batchnorm(model)
    warn_train_dropout(model)


def nonfinite_rows(values: torch.Tensor) -> torch.Tensor:
    """Positions [M] of the rows of ``values`` [N, ...] holding a NaN or an infinity."""
    if values.numel() == 0 or not (values.is_floating_point() or values.is_complex()):
        return torch.zeros(0, dtype=torch.long, device=values.device)
    flat = values.reshape(values.shape[0], -1)
    if values.is_complex():
        return (~torch.isfinite(flat).all(1)).nonzero().flatten()
    # A row holding NaN / inf has a non-finite sum, so the sums screen the rows in one pass with
    # no [N, K] temporaries (torch.isfinite of a ResNet-18's [50, P] features allocates 3.8 GB).
    # A finite row's sum can still overflow: candidates are confirmed element by element.
    wide = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else values.dtype
    candidates = (~torch.isfinite(flat.sum(1, dtype=wide))).nonzero().flatten()
    bad = [int(i) for i in candidates.tolist() if not torch.isfinite(flat[i]).all()]
    return torch.tensor(bad, dtype=torch.long, device=values.device)


def check_finite(
    values: torch.Tensor, what: str, *, indices: torch.Tensor | None = None, offset: int = 0
) -> None:
    """Raise InfluxValueError naming the examples whose row of ``values`` [N, ...] is not finite.

    ``indices`` [N] are the dataset indices of the rows (default: ``offset + position``).
    """
    positions = nonfinite_rows(values)
    if positions.numel() == 0:
        return
    raise InfluxValueError(
        f"{what} of {positions.numel()} example(s) hold NaN or inf: example indices "
        f"{example_names(positions, indices, offset)}; "
        "remove or repair those examples (check the data loading, the loss and the model's "
        "parameters for NaN / inf)"
    )


def example_names(positions: torch.Tensor, indices: torch.Tensor | None, offset: int = 0) -> str:
    """The dataset indices of the rows at ``positions`` (``indices[positions]``, or ``offset +
    position`` without indices), the first :data:`SHOWN_INDICES` of them, as message text."""
    named = (positions + offset) if indices is None else indices.to(positions.device)[positions]
    more = positions.numel() - SHOWN_INDICES
    return f"{named[:SHOWN_INDICES].tolist()}" + (f" and {more} more" if more > 0 else "")


def check_class_targets(
    outputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    indices: torch.Tensor | None = None,
    offset: int = 0,
) -> None:
    """Refuse integer class targets [B] outside ``[0, C)`` for outputs [B, C, ...], naming the
    examples (dataset ``indices`` of the rows, else ``offset + position``) and the valid range.
    Targets of any other kind (floats, other shapes) are left alone."""
    if (
        outputs.dim() < 2
        or targets.dim() != 1
        or targets.shape[0] != outputs.shape[0]
        or targets.is_floating_point()
        or targets.is_complex()
        or targets.dtype == torch.bool
    ):
        return
    classes = outputs.shape[1]
    outside = ((targets < 0) | (targets >= classes)).nonzero().flatten()
    if outside.numel():
        raise InfluxValueError(
            f"class targets must lie in [0, {classes}) for outputs of {classes} classes; "
            f"{outside.numel()} do not, at example indices {example_names(outside, indices, offset)} "
            f"(targets {targets[outside][:SHOWN_INDICES].tolist()}): fix those labels, or give "
            "the model as many outputs as there are classes"
        )


def call_loss(
    loss_fn: LossFn,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    indices: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """``loss_fn(outputs, targets)``; when it fails on class targets outside ``[0, C)`` (torch's
    bare IndexError of a cross-entropy), the error names the examples (dataset ``indices`` of
    the rows, else ``offset + position``), their targets and the valid range. Targets are only
    inspected when the loss fails: a loss may give them another meaning (an ignore index)."""
    try:
        return loss_fn(outputs, targets)
    except (IndexError, RuntimeError) as error:
        try:
            check_class_targets(outputs, targets, indices=indices, offset=offset)
        except InfluxValueError as named:
            raise named from error
        raise
