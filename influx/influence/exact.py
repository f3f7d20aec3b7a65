"""``method="exact"``: the full P x P Hessian (or GGN) of the mean training loss, in float64.

    H = (1/N) sum_{i<N} hess l(z_i)          (or the GGN J^T H_out J, same normalization)
    I_up,loss(z, z_test) = - grad l(z_test)^T (H + damping I)^-1 grad l(z)

H is eigendecomposed once (``torch.linalg.eigh`` in float64); the spectrum sets the default
damping and drives the positive-definiteness and conditioning warnings. For small models only:
memory P^2 * 8 bytes and time O(P^3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from influx.curvature import (
    ParamSpace,
    Spectrum,
    check_damped_spectrum,
    dense_hessian,
    resolve_damping,
)
from influx.errors import InfluxValueError
from influx.grads.functional import LossFn
from influx.influence.base import (
    Estimator,
    FeatureLayout,
    cast_inputs,
    check_choice,
    check_damping,
    check_positive,
    float64_copy,
    option,
    per_example_gradients,
)

# Above this many parameters the dense Hessian no longer fits comfortably in memory or time.
MAX_EXACT_PARAMETERS = 20_000


@dataclass(frozen=True)
class ExactOptions:
    curvature: str = option(
        "hessian", "'hessian' (may be indefinite) or 'ggn' (PSD for convex losses)"
    )
    damping: float | str = option(
        "auto", "number >= 0, or 'auto' = max(0, -lambda_min) + 0.1 * tr(H) / P"
    )
    batch_size: int = option(512, "train examples per Hessian accumulation batch")
    params: tuple[str, ...] | None = option(
        None, "parameter names to differentiate (default: all trainable)"
    )

    def __post_init__(self):
        check_choice("curvature", self.curvature, ("hessian", "ggn"))
        check_damping(self.damping)
        check_positive("batch_size", self.batch_size)


def dense_curvature(
    model, loss_fn, inputs, targets, *, kind: str, batch_size: int, params=None
) -> torch.Tensor:
    """The P x P curvature of the mean loss over all N examples, accumulated over batches."""
    total = inputs.shape[0]
    matrix = None
    for start in range(0, total, batch_size):
        batch = (inputs[start : start + batch_size], targets[start : start + batch_size])
        part = dense_hessian(model, loss_fn, batch, params=params, kind=kind) * (
            batch[0].shape[0] / total
        )
        matrix = part if matrix is None else matrix + part
    return matrix


class ExactEstimator(Estimator):
    sign = -1.0

    def __init__(self, model: nn.Module, loss_fn: LossFn, inputs, targets, options: ExactOptions):
        self.model = float64_copy(model)
        self.loss_fn = loss_fn
        self.space = ParamSpace.of(self.model, options.params)
        if self.space.size > MAX_EXACT_PARAMETERS:
            raise InfluxValueError(
                f"method='exact' forms a {self.space.size} x {self.space.size} matrix; it is meant for "
                f"models up to {MAX_EXACT_PARAMETERS} parameters: use method='cg', 'ekfac' or 'arnoldi', "
                "or select fewer parameters with params=[...]"
            )
        self.layout = FeatureLayout.of_space(self.space)
        curvature = dense_curvature(
            self.model,
            loss_fn,
            cast_inputs(inputs, torch.float64),
            targets,
            kind=options.curvature,
            batch_size=options.batch_size,
            params=list(self.space.names),
        )
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(curvature)
        self.spectrum = Spectrum.of_eigenvalues(self.eigenvalues)
        self.damping = resolve_damping(options.damping, self.spectrum)
        check_damped_spectrum(self.spectrum, self.damping, what=options.curvature)
        self.diagnostics = {
            "spectrum": self.spectrum,
            "damping": self.damping,
            "curvature": options.curvature,
        }

    def features(self, inputs, targets):
        return per_example_gradients(
            self.model, self.loss_fn, cast_inputs(inputs, torch.float64), targets, self.space
        )

    def precondition(self, features):
        # [M, P] -> eigenbasis [M, P] -> scaled -> back; (H + d I)^-1 = U diag(1/(l + d)) U^T.
        rotated = features.to(torch.float64) @ self.eigenvectors
        return (rotated / (self.eigenvalues + self.damping)) @ self.eigenvectors.T
