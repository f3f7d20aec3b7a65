"""``method="tracin"``: TracIn-CP (Pruthi et al. 2020) over saved checkpoints.

    TracIn(z, z') = sum_t eta_t grad l(w_t, z) . grad l(w_t, z')

eta_t is the learning rate of the step taken *from* w_t (the step after the checkpoint), as
``influx.train.Checkpoint.lr`` records it: the term of w_t estimates what that step did. A
checkpoint with eta_t = 0 contributes nothing (no step follows it, as for the last checkpoint of a
cosine schedule, which decays to 0): it is skipped. Negative or non-finite rates are refused, and so
are checkpoints whose rates are all 0 (every score would be 0).

Features are the per-checkpoint gradients scaled by sqrt(eta_t) and concatenated ([B, T*P]), so a
plain inner product gives the sum; sign +1 (a positive score: training on z lowered the loss of z').
Self-influence is sum_t eta_t ||grad l(w_t, z)||^2.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from influx.curvature import ParamSpace
from influx.errors import InfluxValueError
from influx.grads.common import LossFn, check_model
from influx.influence.base import Estimator, FeatureLayout, option, per_example_gradients


@dataclass(frozen=True)
class TracInOptions:
    checkpoints: Sequence = option(
        None, "state dicts or models w_t (or a training record with .checkpoints)"
    )
    learning_rates: Sequence[float] | float | None = option(
        None,
        "eta_t per checkpoint (the rate of the step taken from w_t; 0 skips it), or one number "
        "for all (default: the record's, else 1)",
    )
    params: tuple[str, ...] | None = option(
        None, "parameter names to differentiate (default: all trainable)"
    )

    def __post_init__(self):
        if self.checkpoints is None:
            raise InfluxValueError(
                "method='tracin' needs checkpoints=[state_dict, ...] (the parameters w_t saved during "
                "training) and learning_rates=[eta_t, ...]; influx.train.train records both"
            )


def resolve_checkpoints(checkpoints, learning_rates) -> tuple[list, list[float]]:
    """State dicts / models w_t and learning rates eta_t from what a user has at hand.

    Accepts a list of state dicts or models; a list of checkpoint records with ``.state_dict``
    and ``.lr`` (``influx.train.Checkpoint``); or a training record with ``.checkpoints`` (and
    ``.learning_rates``), such as the ``TrainResult`` that ``influx.train.train`` returns.
    Learning rates given explicitly win over the recorded ones.
    """
    if hasattr(checkpoints, "checkpoints"):
        record = checkpoints
        checkpoints = list(record.checkpoints)
        if learning_rates is None:
            learning_rates = getattr(record, "learning_rates", None)
    checkpoints = list(checkpoints)
    if checkpoints and all(hasattr(c, "state_dict") and hasattr(c, "lr") for c in checkpoints):
        if not any(isinstance(c, nn.Module) for c in checkpoints):
            if learning_rates is None:
                learning_rates = [float(c.lr) for c in checkpoints]
            checkpoints = [c.state_dict for c in checkpoints]
    if not checkpoints:
        raise InfluxValueError("checkpoints is empty: pass at least one state dict")
    if learning_rates is None:
        learning_rates = [1.0] * len(checkpoints)
    elif isinstance(learning_rates, (int, float)):
        learning_rates = [float(learning_rates)] * len(checkpoints)
    learning_rates = [float(x) for x in learning_rates]
    if len(learning_rates) != len(checkpoints):
        raise InfluxValueError(
            f"got {len(checkpoints)} checkpoints but {len(learning_rates)} learning rates: pass one "
            "eta_t per checkpoint (or a single number)"
        )
    if any(not (0 <= lr < math.inf) for lr in learning_rates):
        raise InfluxValueError(
            f"learning rates must be finite and >= 0 (0: no step follows the checkpoint); got "
            f"{learning_rates}"
        )
    return checkpoints, learning_rates


def stepped_checkpoints(checkpoints: list, learning_rates: list[float]) -> tuple[list, list[float]]:
    """The checkpoints with eta_t > 0 and their rates: a zero-rate one adds nothing to the sum."""
    if not any(lr > 0 for lr in learning_rates):
        raise InfluxValueError(
            f"every learning rate is 0 ({learning_rates}), so every TracIn score would be 0: pass "
            "checkpoints from which a training step was taken (eta_t > 0)"
        )
    kept = [(c, lr) for c, lr in zip(checkpoints, learning_rates, strict=True) if lr > 0]
    return [c for c, _ in kept], [lr for _, lr in kept]


def model_at(model: nn.Module, checkpoint) -> nn.Module:
    """A copy of ``model`` holding the checkpoint's parameters."""
    if isinstance(checkpoint, nn.Module):
        return checkpoint
    if not isinstance(checkpoint, Mapping):
        raise InfluxValueError(
            f"a checkpoint must be a state dict or an nn.Module; got {type(checkpoint).__name__}"
        )
    at = copy.deepcopy(model)
    at.load_state_dict(checkpoint)
    return at


class TracInEstimator(Estimator):
    """sum_t eta_t over checkpoints; features: sqrt(eta_t) grad l(w_t, z) concatenated [B, T P]."""

    fits_nothing = True

    def __init__(self, model: nn.Module, loss_fn: LossFn, data, options: TracInOptions):
        # Nothing is fitted: the training set is only scored against.
        check_model(model)
        given, rates = resolve_checkpoints(options.checkpoints, options.learning_rates)
        checkpoints, self.learning_rates = stepped_checkpoints(given, rates)
        self.models = [model_at(model, c) for c in checkpoints]
        self.loss_fn = loss_fn
        self.space = ParamSpace.of(model, options.params)
        self.layout = FeatureLayout.of_space(self.space, repeats=len(self.models))
        self.diagnostics = {
            "checkpoints": len(self.models),
            "learning_rates": self.learning_rates,
            "skipped_zero_rate": len(given) - len(self.models),
        }

    def features(self, inputs, targets, loss_fn=None):
        loss_fn = loss_fn or self.loss_fn
        parts = [
            math.sqrt(lr) * per_example_gradients(m, loss_fn, inputs, targets, self.space)
            for m, lr in zip(self.models, self.learning_rates, strict=True)
        ]
        return torch.cat(parts, dim=1)

    def precondition(self, features):
        return features
