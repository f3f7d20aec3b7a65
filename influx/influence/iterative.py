"""Matrix-free estimators: ``cg``, ``lissa`` and ``arnoldi``, built on Hessian/GGN-vector products.

All three approximate (H + damping I)^-1 with H the Hessian (or GGN) of the *mean* training loss,
(1/N) sum_i l(z_i), and score I_up,loss(z, z_test) = - grad l(z_test)^T (H + damping I)^-1 grad l(z).

* ``cg``: conjugate gradients on all Q right-hand sides at once (one vmapped HVP per iteration).
  Exact in at most P iterations when H + damping I is positive definite. ``preconditioner="ekfac"``
  (or ``"kfac"``) preconditions with the factored curvature + the same damping: on digits-MLP it
  reaches the exact solve's ranking in ~25 iterations where plain CG needs well over 100.
* ``lissa``: the Neumann series v <- g + (I - (H + damping I) / scale) v (Agarwal et al. 2017), with
  scale 10% above the largest eigenvalue (Lanczos estimate) so the series converges; it needs
  about cond(H + damping I) iterations, so it suits well-damped problems. With a
  ``preconditioner`` it runs the same series on M^-1 (H + damping I), which needs about
  cond(M^-1 (H + damping I)) iterations instead (on digits-MLP, EK-FAC-preconditioned: 0.96
  Spearman vs the exact solve after 400 iterations; plain: 0.54 after 200).
* ``arnoldi``: Lanczos (Arnoldi on a symmetric operator) builds the top-``rank`` eigenpairs of H;
  the inverse is taken in that subspace only (Schioppa et al. 2022).

``damping="auto"`` is max(0, -lambda_min) + 0.1 * tr(H) / P with tr(H) from Hutchinson probes and
the extreme eigenvalues from a short Lanczos run; they also feed the warnings of
:func:`influx.curvature.check_damped_spectrum`. Lanczos' smallest Ritz value lies above the true
lambda_min, so an indefinite H may need an explicit larger damping (CG warns when it meets
non-positive curvature).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from influx.curvature import (
    NonPositiveDefiniteWarning,
    ParamSpace,
    Spectrum,
    check_damped_spectrum,
    estimate_spectrum,
    ggn_vp,
    hvp,
    lanczos,
    resolve_damping,
)
from influx.errors import InfluxRuntimeError
from influx.grads.common import LossFn, check_model
from influx.influence.base import (
    Estimator,
    FeatureLayout,
    cast_inputs,
    check_choice,
    check_damping,
    check_positive,
    option,
    per_example_gradients,
)


class TrainCurvature:
    """The operator V [K, P] -> (H V^T)^T with H the curvature of the mean loss over the train set."""

    def __init__(self, model, loss_fn, inputs, targets, *, kind: str, batch_size: int, params):
        self.model, self.loss_fn, self.kind = model, loss_fn, kind
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.params = batch_size, params
        self.space = ParamSpace.of(model, params)
        self.theta = self.space.current(model)
        self.products = 0

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        product = hvp if self.kind == "hessian" else ggn_vp
        total = self.inputs.shape[0]
        out = torch.zeros_like(vectors)
        vectors = vectors.to(self.theta.dtype)
        for start in range(0, total, self.batch_size):
            batch = (
                self.inputs[start : start + self.batch_size],
                self.targets[start : start + self.batch_size],
            )
            part = product(
                self.model, self.loss_fn, batch, vectors, params=self.params, theta=self.theta
            )
            out += part.to(out.dtype) * (batch[0].shape[0] / total)
        self.products += vectors.shape[0]
        return out


@dataclass(frozen=True)
class IterativeOptions:
    curvature: str = option("hessian", "'hessian' or 'ggn'")
    damping: float | str = option(
        "auto", "number >= 0, or 'auto' = max(0, -lambda_min) + 0.1 * tr(H) / P (estimated)"
    )
    batch_size: int = option(2048, "train examples per curvature-product batch")
    max_iterations: int = option(200, "cg / lissa iteration cap")
    tolerance: float = option(
        1e-6, "relative residual at which cg stops; lissa stops on relative change"
    )
    rank: int = option(100, "arnoldi: eigenpairs kept")
    lanczos_iterations: int | None = option(None, "arnoldi: Lanczos steps (default 2 * rank)")
    spectrum_iterations: int = option(30, "Lanczos steps for the extreme eigenvalues")
    trace_samples: int = option(32, "Hutchinson probes for tr(H) (sets the 'auto' damping)")
    query_block: int = option(256, "right-hand sides solved at once")
    preconditioner: str | None = option(
        None,
        "cg / lissa: None, 'kfac' or 'ekfac' (precondition with the factored curvature + damping)",
    )
    seed: int = option(0, "seed of the random probes")
    params: tuple[str, ...] | None = option(
        None, "parameter names to differentiate (default: all trainable)"
    )

    def __post_init__(self):
        check_choice("curvature", self.curvature, ("hessian", "ggn"))
        check_damping(self.damping)
        for name in (
            "batch_size",
            "max_iterations",
            "rank",
            "spectrum_iterations",
            "trace_samples",
            "query_block",
        ):
            check_positive(name, getattr(self, name))
        check_positive("tolerance", self.tolerance)
        check_choice("preconditioner", self.preconditioner, (None, "kfac", "ekfac"))


def conjugate_gradients(
    operator,
    rhs: torch.Tensor,
    *,
    damping: float,
    max_iterations: int,
    tolerance: float,
    preconditioner=None,
):
    """Solve (A + damping I) X^T = RHS^T for every row of ``rhs`` [M, P]; returns (X, iterations, residual).

    Each row runs its own CG (its own step sizes); rows that converged are frozen. A row whose
    curvature p^T A p is <= 0 met a non-positive direction: it stops there with a warning.
    """
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    # Preconditioned CG: z = M^-1 r; without a preconditioner z = r and this is plain CG.
    apply = preconditioner if preconditioner is not None else (lambda v: v)
    z = apply(r)
    p = z.clone()
    rs = (r * z).sum(1)
    norms = rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
    active = torch.ones(rhs.shape[0], dtype=torch.bool, device=rhs.device)
    iterations = 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007 - returned after the loop
        ap = operator(p) + damping * p
        curvature = (p * ap).sum(1)
        bad = active & (curvature <= 0)
        if bad.any():
            warnings.warn(
                f"cg met a direction of non-positive curvature for {int(bad.sum())} right-hand side(s): "
                "the damped curvature is not positive definite; increase damping or use curvature='ggn'",
                NonPositiveDefiniteWarning,
                stacklevel=4,
            )
            active &= ~bad
        alpha = torch.where(active, rs / curvature.where(active, torch.ones_like(curvature)), 0.0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        active &= r.norm(dim=1) / norms > tolerance
        if not active.any():
            break
        z = apply(r)
        rs_new = (r * z).sum(1)
        beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), 0.0)
        p = z + beta[:, None] * p
        rs = rs_new
    return x, iterations, float((r.norm(dim=1) / norms).max())


def lissa(
    operator,
    rhs: torch.Tensor,
    *,
    damping: float,
    scale: float,
    max_iterations: int,
    tolerance: float,
    preconditioner=None,
):
    """(A + damping I)^-1 rhs by the Neumann series, written as the Richardson iteration
    ``x <- x + M^-1 (rhs - (A + damping I) x) / scale`` (x_0 = 0; M = I is Agarwal et al.'s LiSSA).

    It converges when every eigenvalue of M^-1 (A + damping I) lies in (0, 2 * scale), at the rate
    1 - mu_min / scale per iteration. Returns (X, iterations).
    """
    apply = preconditioner if preconditioner is not None else (lambda v: v)
    estimate = torch.zeros_like(rhs)
    iterations = 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007 - returned after the loop
        step = apply(rhs - operator(estimate) - damping * estimate) / scale
        estimate = estimate + step
        change = step.norm() / estimate.norm().clamp_min(torch.finfo(rhs.dtype).tiny)
        if not torch.isfinite(change):
            raise InfluxRuntimeError(
                "lissa diverged (non-finite iterate): H + damping I is not positive definite or "
                "scale is below its largest eigenvalue; increase damping or use method='cg'"
            )
        if change < tolerance:
            break
    return estimate, iterations


def largest_eigenvalue(
    matvec, size: int, *, iterations: int, seed: int, dtype, device: torch.device | str = "cpu"
) -> float:
    """|mu_max| of a (possibly non-symmetric) operator on [K, P] rows, by power iteration on the
    norm ratio ||M v|| / ||v||, which, unlike the Rayleigh quotient, needs no symmetry. The start
    vector is drawn on the CPU (the same on every device), then moved to ``device``."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(1, size, generator=generator, dtype=dtype, device="cpu").to(device)
    value = 0.0
    for _ in range(iterations):
        v = v / v.norm()
        v = matvec(v)
        value = float(v.norm())
    return value


class FactoredPreconditioner:
    """(K-FAC or EK-FAC + damping I)^-1 on flat vectors in a :class:`ParamSpace` layout.

    K-FAC factors a layer gradient as [d_out, d_in + 1] (bias as the last column); flat vectors
    hold the weight [d_out, d_in] and the bias [d_out] as separate parameters, so each block is
    gathered, preconditioned and scattered back. Parameters outside linear layers pass unchanged.
    """

    def __init__(
        self, model, loss_fn, inputs, targets, space: ParamSpace, damping: float, kind: str
    ):
        from influx.influence.kfac import KFACEstimator, KFACOptions, factored_parameters

        self.kfac = KFACEstimator(
            model,
            loss_fn,
            inputs,
            targets,
            KFACOptions(damping=damping, params=factored_parameters(model, space.names)),
            eigen_corrected=kind == "ekfac",
        )
        offsets, start = {}, 0
        for name, numel in zip(space.names, space.numels, strict=True):
            offsets[name] = (start, start + numel)
            start += numel
        self.offsets = offsets

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        out = vectors.clone()
        m = vectors.shape[0]
        for name, factors in self.kfac.factors.items():
            d_out, d_in = self.kfac.shapes[name]
            w0, w1 = self.offsets[factors.weight_name]
            parts = [vectors[:, w0:w1].reshape(m, d_out, -1)]
            if factors.bias_name is not None:
                b0, b1 = self.offsets[factors.bias_name]
                parts.append(vectors[:, b0:b1].reshape(m, d_out, 1))
            grads = torch.cat(parts, dim=2).to(factors.activation.dtype)
            rotated = factors.rotate(grads) / (factors.eigenvalues + self.kfac.dampings[name])
            solved = factors.unrotate(rotated).to(vectors.dtype)
            weight_columns = d_in - 1 if factors.bias_name is not None else d_in
            out[:, w0:w1] = solved[:, :, :weight_columns].reshape(m, -1)
            if factors.bias_name is not None:
                out[:, b0:b1] = solved[:, :, -1]
        return out


class IterativeEstimator(Estimator):
    """(H + damping I)^-1 by cg / lissa / arnoldi on curvature-vector products; features [B, P]."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs,
        targets,
        options: IterativeOptions,
        *,
        method: str,
    ):
        check_model(model)
        self.model, self.loss_fn, self.options, self.method = model, loss_fn, options, method
        dtype = next(model.parameters()).dtype
        self.operator = TrainCurvature(
            model,
            loss_fn,
            cast_inputs(inputs, dtype),
            targets,
            kind=options.curvature,
            batch_size=options.batch_size,
            params=options.params,
        )
        self.space = self.operator.space
        self.device = self.operator.theta.device
        self.layout = FeatureLayout.of_space(self.space)
        self.spectrum = estimate_spectrum(
            self.operator,
            self.space.size,
            iterations=options.spectrum_iterations,
            trace_samples=options.trace_samples,
            seed=options.seed,
            dtype=dtype,
            device=self.device,
        )
        self.damping = resolve_damping(options.damping, self.spectrum)
        self.diagnostics = {
            "spectrum": self.spectrum,
            "damping": self.damping,
            "curvature": options.curvature,
        }
        self.kfac_preconditioner = None
        if method in ("cg", "lissa") and options.preconditioner is not None:
            self.kfac_preconditioner = FactoredPreconditioner(
                model, loss_fn, inputs, targets, self.space, self.damping, options.preconditioner
            )
        if method == "lissa":
            self.lissa_scale = self._lissa_scale(dtype)
        if method == "arnoldi":
            self._fit_arnoldi(dtype)
        else:
            check_damped_spectrum(
                self.spectrum, self.damping, what=f"{options.curvature} (estimated)"
            )

    def _lissa_scale(self, dtype) -> float:
        """10% above the largest eigenvalue of M^-1 (H + damping I): the series converges for
        eigenvalues in (0, 2 * scale), and the margin covers the estimate's error."""
        if self.kfac_preconditioner is None:
            return 1.1 * (self.spectrum.maximum + self.damping)
        preconditioned = lambda v: self.kfac_preconditioner(self.operator(v) + self.damping * v)
        top = largest_eigenvalue(
            preconditioned,
            self.space.size,
            iterations=self.options.spectrum_iterations,
            seed=self.options.seed,
            dtype=dtype,
            device=self.device,
        )
        return 1.1 * top

    def _fit_arnoldi(self, dtype) -> None:
        opts = self.options
        steps = opts.lanczos_iterations or 2 * opts.rank
        values, vectors = lanczos(
            self.operator,
            self.space.size,
            iterations=steps,
            seed=opts.seed,
            dtype=dtype,
            device=self.device,
        )
        # Keep the top-rank eigenvalues (the directions Lanczos resolves first and best).
        keep = torch.argsort(values, descending=True)[: opts.rank]
        self.eigenvalues, self.eigenvectors = values[keep], vectors[:, keep]
        kept = Spectrum.of_eigenvalues(self.eigenvalues)
        check_damped_spectrum(
            kept, self.damping, what=f"{opts.curvature} (top-{opts.rank} subspace)"
        )
        self.diagnostics.update(rank=int(keep.numel()), lanczos_iterations=steps)

    def features(self, inputs, targets):
        return per_example_gradients(self.model, self.loss_fn, inputs, targets, self.space)

    def precondition(self, features):
        opts = self.options
        out = []
        for block in features.split(opts.query_block):
            if self.method == "cg":
                solved, iterations, residual = conjugate_gradients(
                    self.operator,
                    block,
                    damping=self.damping,
                    max_iterations=opts.max_iterations,
                    tolerance=opts.tolerance,
                    preconditioner=self.kfac_preconditioner,
                )
                self.diagnostics.update(iterations=iterations, residual=residual)
            elif self.method == "lissa":
                solved, iterations = lissa(
                    self.operator,
                    block,
                    damping=self.damping,
                    scale=self.lissa_scale,
                    max_iterations=opts.max_iterations,
                    tolerance=opts.tolerance,
                    preconditioner=self.kfac_preconditioner,
                )
                self.diagnostics.update(iterations=iterations, scale=self.lissa_scale)
            else:
                coefficients = block.to(self.eigenvectors.dtype) @ self.eigenvectors
                solved = (coefficients / (self.eigenvalues + self.damping)) @ self.eigenvectors.T
            out.append(solved.to(features.dtype))
        return torch.cat(out) if out else features.clone()
