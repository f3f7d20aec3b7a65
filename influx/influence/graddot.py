"""``method="grad_dot"`` / ``"grad_cos"``: gradient similarity at the final parameters.

    grad_dot(z, z') = grad l(z) . grad l(z')          grad_cos = the same on unit-norm gradients

No curvature (H = I) and sign +1: a positive score means a step on z lowers the loss of z'.
Self-influence is ||grad l(z)||^2 (grad_dot) or 1 (grad_cos).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from influx.curvature import ParamSpace
from influx.grads.common import LossFn, check_model
from influx.influence.base import Estimator, FeatureLayout, option, per_example_gradients


@dataclass(frozen=True)
class GradDotOptions:
    params: tuple[str, ...] | None = option(
        None, "parameter names to differentiate (default: all trainable)"
    )


class GradDotEstimator(Estimator):
    """No preconditioner (H = I); features: flat gradients [B, P], unit-norm for grad_cos."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data,
        options: GradDotOptions,
        *,
        normalize: bool,
    ):
        # Nothing is fitted: the training set is only scored against.
        check_model(model)
        self.model, self.loss_fn, self.normalize = model, loss_fn, normalize
        self.space = ParamSpace.of(model, options.params)
        self.layout = FeatureLayout.of_space(self.space)
        self.diagnostics = {"normalize": normalize}

    fits_nothing = True

    def features(self, inputs, targets, loss_fn=None):
        g = per_example_gradients(self.model, loss_fn or self.loss_fn, inputs, targets, self.space)
        if self.normalize:
            # A zero gradient has no direction; its cosine with anything is taken as 0.
            g = g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
        return g

    def precondition(self, features):
        return features
