"""Accuracies of an unlearned model and the tug-of-war score against retraining.

Tug-of-war (Zhao et al. 2024, "What makes unlearning hard and what to do about it"):

    ToW = prod over S in {forget, retain, test} of (1 - |acc_S(unlearned) - acc_S(retrained)|),

1 when the unlearned model matches the retrained one on all three splits, lower the further it is
(accuracies as fractions in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from influx.audit.mia import _per_example
from influx.errors import InfluxValueError

__all__ = ["SPLITS", "accuracy", "correct", "splits_accuracy", "tug_of_war"]

SPLITS = ("forget", "retain", "test")


def _is_correct(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if outputs.dim() != 2:
        raise InfluxValueError(
            f"accuracy needs class scores [B, C] from the model; got shape {tuple(outputs.shape)}"
        )
    # Any other shape would broadcast against the [B] predictions without an error.
    if targets.shape != outputs.shape[:1]:
        raise InfluxValueError(
            f"accuracy needs class-index targets [B] = [{outputs.shape[0]}], one per example; got "
            f"shape {tuple(targets.shape)}: pass targets.squeeze(1) for a [N, 1] column or "
            "targets.argmax(1) for one-hot targets"
        )
    return outputs.argmax(dim=1) == targets


def correct(model: nn.Module, data, *, batch_size: int = 512) -> torch.Tensor:
    """[N] bool: whether the top-1 class of ``model`` (eval mode) is the target, in data order.

    On the device of the data's inputs; the model's train/eval mode is restored afterwards.
    """
    values, _ = _per_example(model, data, batch_size, _is_correct, classes=True)
    return values


def accuracy(model: nn.Module, data, *, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``data`` in eval mode, a fraction in [0, 1]."""
    return correct(model, data, batch_size=batch_size).double().mean().item()


def splits_accuracy(
    model: nn.Module, forget, retain, test, *, batch_size: int = 512
) -> dict[str, float]:
    """``{"forget": ..., "retain": ..., "test": ...}`` top-1 accuracies of ``model``."""
    return {
        name: accuracy(model, data, batch_size=batch_size)
        for name, data in zip(SPLITS, (forget, retain, test))
    }


def _check_accuracies(accs: Mapping[str, float], name: str) -> dict[str, float]:
    if not isinstance(accs, Mapping):
        raise InfluxValueError(
            f"{name} must be a mapping with keys {SPLITS} (e.g. from splits_accuracy); "
            f"got {type(accs).__name__}"
        )
    missing = [split for split in SPLITS if split not in accs]
    if missing:
        raise InfluxValueError(f"{name} lacks the accuracies of {missing}; it needs {SPLITS}")
    values = {split: float(accs[split]) for split in SPLITS}
    outside = {split: v for split, v in values.items() if not 0.0 <= v <= 1.0}
    if outside:
        raise InfluxValueError(
            f"{name}: accuracies must be fractions in [0, 1] (not percentages); got {outside}"
        )
    return values


def tug_of_war(unlearned_accs: Mapping[str, float], retrained_accs: Mapping[str, float]) -> float:
    """``prod_S (1 - |acc_S - acc_S^retrained|)`` over the forget, retain and test splits.

    Both arguments map ``"forget"``, ``"retain"``, ``"test"`` to accuracies in [0, 1] (other keys
    are ignored); see :func:`splits_accuracy`.
    """
    unlearned = _check_accuracies(unlearned_accs, "unlearned_accs")
    retrained = _check_accuracies(retrained_accs, "retrained_accs")
    score = 1.0
    for split in SPLITS:
        score *= 1.0 - abs(unlearned[split] - retrained[split])
    return score
