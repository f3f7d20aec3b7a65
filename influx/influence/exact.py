"""``method="exact"``: the full P x P Hessian (or GGN) of the mean training loss, in float64.

    H = (1/N) sum_{i<N} hess l(z_i)          (or the GGN J^T H_out J, same normalization)
    I_up,loss(z, z_test) = - grad l(z_test)^T (H + damping I)^-1 grad l(z)

H is formed in float64 and solved exactly in float64, by one of two solvers:

* ``solver="cholesky"`` (default): the extreme eigenvalues come from Lanczos on the dense matrix
  (300 steps, each one P x P matrix-vector product) and tr(H) is exact; H + damping I is
  Cholesky-factored (P^3 / 3 flops, well below a full eigendecomposition's). Lanczos'
  smallest Ritz value lies above the true lambda_min, so with ``damping="auto"`` a failed
  factorization raises the damping by another 0.1 * tr(H) / P and tries again.
* ``solver="eigh"``: the full float64 eigendecomposition, the exact spectrum (number of negative
  eigenvalues included), and an inverse that still exists when H + damping I is indefinite.

Either way the spectrum sets the default damping and drives the positive-definiteness and
conditioning warnings. For small models only: memory P^2 * 8 bytes and time O(P^3).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from influx.checks import check_integer
from influx.curvature import (
    DEFAULT_RELATIVE_DAMPING,
    NonPositiveDefiniteWarning,
    ParamSpace,
    Spectrum,
    check_damped_spectrum,
    dense_hessian,
    lanczos,
    resolve_damping,
)
from influx.errors import InfluxRuntimeError, InfluxValueError
from influx.grads.common import LossFn, check_model
from influx.influence import stream
from influx.influence.base import (
    Estimator,
    FeatureLayout,
    cast_inputs,
    check_choice,
    check_damping,
    float64_copy,
    option,
    per_example_gradients,
)

# Above this many parameters the dense Hessian no longer fits comfortably in memory or time.
MAX_EXACT_PARAMETERS = 20_000
# Lanczos steps for the spectrum of the dense matrix: the extremes converge in tens of steps; 300
# also resolves a cluster of small negative eigenvalues to within a few percent (digits-MLP).
LANCZOS_STEPS = 300
MAX_DAMPING_RAISES = 8


@dataclass(frozen=True)
class ExactOptions:
    curvature: str = option(
        "hessian", "'hessian' (may be indefinite) or 'ggn' (PSD for convex losses)"
    )
    damping: float | str = option(
        "auto", "number >= 0, or 'auto' = max(0, -lambda_min) + 0.1 * tr(H) / P"
    )
    solver: str = option(
        "cholesky", "'cholesky' (Lanczos spectrum, fast) or 'eigh' (full spectrum)"
    )
    batch_size: int = option(2048, "train examples per Hessian accumulation batch")
    params: tuple[str, ...] | None = option(
        None, "parameter names to differentiate (default: all trainable)"
    )

    def __post_init__(self):
        check_choice("curvature", self.curvature, ("hessian", "ggn"))
        check_damping(self.damping)
        check_integer("batch_size", self.batch_size, minimum=1)
        check_choice("solver", self.solver, ("cholesky", "eigh"))


def dense_curvature(
    model, loss_fn, data, *, kind: str, batch_size: int, params=None, dtype=None
) -> torch.Tensor:
    """The P x P curvature of the mean loss over all N examples of ``data``, accumulated batch
    by batch as the data streams (one pass); floating inputs are cast to ``dtype`` if given."""
    total = stream.size(data)
    matrix = None
    for inputs, targets, _ in stream.batches(data, batch_size):
        batch = (inputs if dtype is None else cast_inputs(inputs, dtype), targets)
        part = dense_hessian(model, loss_fn, batch, params=params, kind=kind) * (
            batch[0].shape[0] / total
        )
        matrix = part if matrix is None else matrix + part
    return matrix


class ExactEstimator(Estimator):
    """(H + damping I)^-1 from the dense float64 curvature; features: flat gradients [B, P]."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, data, options: ExactOptions):
        check_model(model)
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
            data,
            kind=options.curvature,
            batch_size=options.batch_size,
            params=list(self.space.names),
            dtype=torch.float64,
        )
        self.cholesky = self.eigenvalues = self.eigenvectors = None
        if options.solver == "cholesky":
            self._fit_cholesky(curvature, options)
        else:
            self._fit_eigh(curvature, options)
        self.diagnostics = {
            "spectrum": self.spectrum,
            "damping": self.damping,
            "curvature": options.curvature,
            "solver": options.solver,
        }

    def _fit_eigh(self, curvature: torch.Tensor, options: ExactOptions) -> None:
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(curvature)
        self.spectrum = Spectrum.of_eigenvalues(self.eigenvalues)
        self.damping = resolve_damping(options.damping, self.spectrum)
        check_damped_spectrum(self.spectrum, self.damping, what=options.curvature)

    def _fit_cholesky(self, curvature: torch.Tensor, options: ExactOptions) -> None:
        size = curvature.shape[0]
        ritz, _ = lanczos(
            lambda v: v @ curvature,
            size,
            iterations=min(size, LANCZOS_STEPS),
            device=curvature.device,
        )
        mean = float(torch.diagonal(curvature).mean())
        self.spectrum = Spectrum(
            mean=mean, maximum=float(ritz.max()), minimum=float(ritz.min()), size=size
        )
        self.damping = resolve_damping(options.damping, self.spectrum)
        eye = torch.eye(size, dtype=curvature.dtype, device=curvature.device)
        for _ in range(MAX_DAMPING_RAISES):
            factor, info = torch.linalg.cholesky_ex(curvature + self.damping * eye)
            if int(info) == 0:
                break
            if options.damping != "auto":
                # A requested damping that leaves H indefinite: keep it, take the slow exact route.
                warnings.warn(
                    f"H + damping I is not positive definite (Cholesky failed at pivot {int(info)}); "
                    "falling back to solver='eigh'",
                    NonPositiveDefiniteWarning,
                    stacklevel=4,
                )
                self._fit_eigh(curvature, options)
                return
            self.damping += DEFAULT_RELATIVE_DAMPING * mean
        else:
            raise InfluxRuntimeError(
                f"H + damping I stayed indefinite after {MAX_DAMPING_RAISES} damping raises "
                f"(damping {self.damping:.3e}); use solver='eigh' to see the spectrum"
            )
        self.cholesky = factor
        check_damped_spectrum(self.spectrum, self.damping, what=options.curvature)

    def features(self, inputs, targets, loss_fn=None):
        return per_example_gradients(
            self.model,
            loss_fn or self.loss_fn,
            cast_inputs(inputs, torch.float64),
            targets,
            self.space,
        )

    def precondition(self, features):
        if self.cholesky is not None:
            # [M, P] -> solve (H + d I) X^T = F^T with the Cholesky factor, float64 throughout.
            return torch.cholesky_solve(features.to(torch.float64).T, self.cholesky).T
        # [M, P] -> eigenbasis [M, P] -> scaled -> back; (H + d I)^-1 = U diag(1/(l + d)) U^T.
        rotated = features.to(torch.float64) @ self.eigenvectors
        return (rotated / (self.eigenvalues + self.damping)) @ self.eigenvectors.T
