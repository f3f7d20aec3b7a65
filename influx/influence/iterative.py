"""Matrix-free estimators: ``cg``, ``lissa`` and ``arnoldi``, built on Hessian/GGN-vector products.

All three approximate (H + damping I)^-1 with H the Hessian (or GGN) of the *mean* training loss,
(1/N) sum_i l(z_i), and score I_up,loss(z, z_test) = - grad l(z_test)^T (H + damping I)^-1 grad l(z).

* ``cg``: conjugate gradients on all Q right-hand sides at once (one vmapped HVP per iteration),
  preconditioned by default (see below). Exact in at most P iterations when H + damping I is
  positive definite.
* ``lissa``: the Neumann series v <- g + (I - M^-1 (H + damping I) / scale) v (Agarwal et al.
  2017; M = I is plain LiSSA), i.e. Richardson iteration on M^-1 (H + damping I), with scale 10%
  above the largest eigenvalue of that operator so the series converges. It needs about
  cond(M^-1 (H + damping I)) iterations: plain LiSSA suits only well-damped problems.
* ``arnoldi``: Lanczos (Arnoldi on a symmetric operator) builds the top-``rank`` eigenpairs of H;
  the inverse is taken in that subspace only (Schioppa et al. 2022).

Defaults that hold on nonconvex networks. Away from a minimum the Hessian is indefinite (on the
digits-MLP reference task about 1,400 of 4,810 eigenvalues lie in [-1e-3, 0)), and a solver that
is handed an indefinite H + damping I solves the wrong system without a word. So:

1. ``damping="auto"`` is max(0, -lambda_min) + 0.1 * tr(H) / P (:func:`resolve_damping`), with
   tr(H) from Hutchinson probes and lambda_min from Lanczos run until its smallest Ritz value is
   resolved to 5% of the damping it implies and has stopped moving over the last 10 steps
   (:func:`influx.curvature.estimate_spectrum`; a fixed 30 steps missed the negative cluster,
   leaving the damping at 40% of the exact solve's). Resolved is evidence, not proof: no Krylov
   method sees an eigenvector nearly orthogonal to its start, which is what item 2 is for.
2. Inside the solvers, a direction v (a cg search direction, a lissa step) with
   v^T (H + damping I) v <= 0 proves H + damping I indefinite. The damping then rises to
   ``-rho + 0.1 * tr(H) / P`` with rho = v^T H v / v^T v (so the new smallest damped eigenvalue
   along v is the 'auto' margin), a :class:`NonPositiveDefiniteWarning` names the new value, and
   every right-hand side is solved again at it: all scores share one damping
   (``diagnostics["damping"]``, ``diagnostics["damping_raises"]``).
3. ``preconditioner="auto"`` preconditions cg and lissa with EK-FAC + the same damping (Kronecker
   blocks for Linear / Conv layers, diagonal Fisher blocks for other parameters). It pays most
   for lissa: on digits-MLP, at the exact solve's damping, plain lissa reaches Spearman 0.54 vs
   the exact solve in 200 iterations and preconditioned lissa 0.96 in 400 (its default cap is
   500). For cg it helps less (193 iterations to a 1e-6 residual, where plain cg has 4e-5 left
   after 200: EK-FAC models the GGN, not the Hessian's negative part). The fit costs a few passes
   over the train set (see ``fisher_draws`` of ``method="ekfac"``).

``benchmarks/suites/defaults.py`` measures these defaults against the exact solve over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from influx.checks import check_integer, check_number
from influx.curvature import (
    DEFAULT_RELATIVE_DAMPING,
    SPECTRUM_STEPS,
    SPECTRUM_TOLERANCE,
    ParamSpace,
    Spectrum,
    check_damped_spectrum,
    estimate_spectrum,
    ggn_vp,
    hvp,
    lanczos,
    largest_eigenvalue,
    resolve_damping,
)

# The solvers live in influx.curvature.solvers; their names stay importable from here.
from influx.curvature.solvers import DIVERGENCE_GROWTH as DIVERGENCE_GROWTH
from influx.curvature.solvers import MAX_DAMPING_RAISES as MAX_DAMPING_RAISES
from influx.curvature.solvers import NegativeCurvature as NegativeCurvature
from influx.curvature.solvers import (
    conjugate_gradients,
    lissa,
    solve_with_positive_damping,
)
from influx.errors import UnsupportedModelError
from influx.grads.common import LossFn, check_model
from influx.influence import stream
from influx.influence.base import (
    Estimator,
    FeatureLayout,
    cast_inputs,
    check_choice,
    check_damping,
    option,
    per_example_gradients,
)

# Iteration caps when max_iterations is not given: preconditioned cg reaches a 1e-6 residual in
# tens of iterations on digits-MLP; lissa contracts at 1 - mu_min / scale per iteration, slower.
DEFAULT_ITERATIONS = {"cg": 200, "lissa": 500}


class TrainCurvature:
    """The operator V [K, P] -> (H V^T)^T with H the curvature of the mean loss over the train set.

    Every call streams the train set (``data``, any data argument) once, batch by batch, its
    floating inputs cast to the model's dtype: ``passes`` counts the calls, ``products`` the
    vectors."""

    def __init__(self, model, loss_fn, data, *, kind: str, batch_size: int, params):
        self.model, self.loss_fn, self.kind = model, loss_fn, kind
        self.data, self.total = data, stream.size(data)
        self.batch_size, self.params = batch_size, params
        self.space = ParamSpace.of(model, params)
        self.theta = self.space.current(model)
        self.products = self.passes = 0

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        product = hvp if self.kind == "hessian" else ggn_vp
        out = torch.zeros_like(vectors)
        vectors = vectors.to(self.theta.dtype)
        for inputs, targets, _ in stream.batches(self.data, self.batch_size):
            batch = (cast_inputs(inputs, self.theta.dtype), targets)
            part = product(
                self.model, self.loss_fn, batch, vectors, params=self.params, theta=self.theta
            )
            out += part.to(out.dtype) * (batch[0].shape[0] / self.total)
        self.products += vectors.shape[0]
        self.passes += 1
        return out


@dataclass(frozen=True)
class IterativeOptions:
    curvature: str = option("hessian", "'hessian' or 'ggn'")
    damping: float | str = option(
        "auto",
        "number >= 0, or 'auto' = max(0, -lambda_min) + 0.1 * tr(H) / P (estimated); raised "
        "with a warning if a solver meets non-positive curvature",
    )
    batch_size: int = option(2048, "train examples per curvature-product batch")
    max_iterations: int | None = option(
        None, f"cg / lissa iteration cap (default {DEFAULT_ITERATIONS})"
    )
    tolerance: float = option(
        1e-6, "relative residual at which cg stops; lissa stops on relative change"
    )
    rank: int = option(100, "arnoldi: eigenpairs kept")
    lanczos_iterations: int | None = option(None, "arnoldi: Lanczos steps (default 2 * rank)")
    spectrum_iterations: int = option(
        SPECTRUM_STEPS, "Lanczos steps at most for the extreme eigenvalues (stops once resolved)"
    )
    spectrum_tolerance: float = option(
        SPECTRUM_TOLERANCE,
        "Ritz residual, relative to the damping it implies, at which lambda_min counts as resolved",
    )
    trace_samples: int = option(32, "Hutchinson probes for tr(H) (sets the 'auto' damping)")
    query_block: int = option(256, "right-hand sides solved at once")
    preconditioner: str | None = option(
        "auto",
        "cg / lissa: 'auto' (EK-FAC, or none where it cannot be fitted), 'ekfac', 'kfac' or None "
        "(the factored curvature + the same damping)",
    )
    seed: int = option(0, "seed of the random probes")
    params: tuple[str, ...] | None = option(
        None, "parameter names to differentiate (default: all trainable)"
    )

    def __post_init__(self):
        check_choice("curvature", self.curvature, ("hessian", "ggn"))
        check_damping(self.damping)
        for name in ("batch_size", "rank", "spectrum_iterations", "trace_samples", "query_block"):
            check_integer(name, getattr(self, name), minimum=1)
        for name in ("spectrum_tolerance", "tolerance"):
            check_number(name, getattr(self, name), above=0)
        if self.max_iterations is not None:
            check_integer("max_iterations", self.max_iterations, minimum=1)
        check_choice("preconditioner", self.preconditioner, ("auto", None, "kfac", "ekfac"))


class FactoredPreconditioner:
    """(K-FAC or EK-FAC + damping I)^-1 on flat vectors in a :class:`ParamSpace` layout.

    Kronecker blocks factor a layer gradient as [d_out, d_in + 1] (bias as the last column); flat
    vectors hold the weight [d_out, d_in] and the bias [d_out] as separate parameters, so each
    block is gathered, rotated into the eigenbasis, divided by eigenvalues + damping, rotated back
    and scattered. Every other parameter (norm affine parameters, lone biases) sits in a diagonal
    Fisher block and is divided by its diagonal + damping. ``damping`` is one value for every
    block, the solver's, and may be changed after construction.
    """

    def __init__(
        self,
        model,
        loss_fn,
        data,
        space: ParamSpace,
        damping: float,
        kind: str,
        *,
        fisher: str = "auto",
        batch_size: int = 512,
        fisher_fallback: str | None = None,
    ):
        from influx.influence.kfac import KFACEstimator, KFACOptions

        self.kfac = KFACEstimator(
            model,
            loss_fn,
            data,
            KFACOptions(
                damping=damping, fisher=fisher, batch_size=batch_size, params=tuple(space.names)
            ),
            eigen_corrected=kind == "ekfac",
            fisher_fallback=fisher_fallback,
        )
        self.damping = damping
        self.offsets, start = {}, 0
        for name, numel in zip(space.names, space.numels, strict=True):
            self.offsets[name] = (start, start + numel)
            start += numel

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        out = vectors.clone()
        m = vectors.shape[0]
        for factors in self.kfac.factors.values():
            d_out, d_in = factors.eigenvalues.shape
            w0, w1 = self.offsets[factors.weight_name]
            parts = [vectors[:, w0:w1].reshape(m, d_out, -1)]
            if factors.bias_name is not None:
                b0, b1 = self.offsets[factors.bias_name]
                parts.append(vectors[:, b0:b1].reshape(m, d_out, 1))
            grads = torch.cat(parts, dim=2).to(factors.activation.dtype)
            rotated = factors.rotate(grads) / (factors.eigenvalues + self.damping).to(grads.dtype)
            solved = factors.unrotate(rotated).to(vectors.dtype)
            weight_columns = d_in - 1 if factors.bias_name is not None else d_in
            out[:, w0:w1] = solved[:, :, :weight_columns].reshape(m, -1)
            if factors.bias_name is not None:
                out[:, b0:b1] = solved[:, :, -1]
        for block in self.kfac.diagonal.values():
            spans = [self.offsets[name] for name in block.names]
            flat = torch.cat([vectors[:, a:b] for a, b in spans], dim=1).to(block.diagonal.dtype)
            solved = (flat / (block.diagonal + self.damping)).to(vectors.dtype)
            for (a, b), part in zip(spans, solved.split(block.numels, dim=1), strict=True):
                out[:, a:b] = part
        return out


def fit_preconditioner(
    model,
    loss_fn,
    data,
    space: ParamSpace,
    damping: float,
    kind: str | None,
    *,
    batch_size: int = 512,
) -> tuple[FactoredPreconditioner | None, str | None]:
    """The factored preconditioner for ``kind`` ('auto' = EK-FAC, or none where K-FAC cannot be
    fitted) and the kind fitted. Labels are sampled from the model (the Fisher) for a softmax
    cross-entropy loss and the train labels used otherwise (decided on the first batch of the
    fit's first pass): a preconditioner only has to be close."""
    if kind is None:
        return None, None
    fitted = "ekfac" if kind == "auto" else kind
    try:
        preconditioner = FactoredPreconditioner(
            model,
            loss_fn,
            data,
            space,
            damping,
            fitted,
            fisher="auto",
            batch_size=batch_size,
            fisher_fallback="empirical",
        )
    except UnsupportedModelError:
        if kind != "auto":
            raise
        return None, None
    return preconditioner, fitted


class IterativeEstimator(Estimator):
    """(H + damping I)^-1 by cg / lissa / arnoldi on curvature-vector products; features [B, P]."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data,
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
            data,
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
            tolerance=options.spectrum_tolerance,
            trace_samples=options.trace_samples,
            seed=options.seed,
            dtype=dtype,
            device=self.device,
        )
        self.damping = resolve_damping(options.damping, self.spectrum)
        # A raise leaves the damped curvature along the direction met at the 'auto' margin.
        scale = self.spectrum.mean if self.spectrum.mean > 0 else abs(self.spectrum.maximum)
        self.margin = max(DEFAULT_RELATIVE_DAMPING * scale, torch.finfo(dtype).eps)
        self.max_iterations = options.max_iterations or DEFAULT_ITERATIONS.get(method, 1)
        self.preconditioner, fitted = None, None
        if method in ("cg", "lissa"):
            self.preconditioner, fitted = fit_preconditioner(
                model,
                loss_fn,
                data,
                self.space,
                self.damping,
                options.preconditioner,
                batch_size=options.batch_size,
            )
        self.diagnostics = {
            "spectrum": self.spectrum,
            "damping": self.damping,
            "initial_damping": self.damping,
            "curvature": options.curvature,
            "preconditioner": fitted,
        }
        self._scale_damping: float | None = None
        if method == "arnoldi":
            self._fit_arnoldi(dtype)
        else:
            check_damped_spectrum(
                self.spectrum, self.damping, what=f"{options.curvature} (estimated)"
            )

    def _lissa_scale(self, damping: float) -> float:
        """10% above the largest eigenvalue of M^-1 (H + damping I): the series converges for
        eigenvalues in (0, 2 * scale), and the margin covers the estimate's error."""
        if self.preconditioner is None:
            return 1.1 * (self.spectrum.maximum + damping)
        preconditioned = lambda v: self.preconditioner(self.operator(v) + damping * v)
        top = largest_eigenvalue(
            preconditioned,
            self.space.size,
            iterations=30,
            seed=self.options.seed,
            dtype=self.operator.theta.dtype,
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

    def features(self, inputs, targets, loss_fn=None):
        return per_example_gradients(
            self.model, loss_fn or self.loss_fn, inputs, targets, self.space
        )

    def _solve_at(self, block: torch.Tensor, damping: float) -> torch.Tensor:
        """One block of right-hand sides solved at ``damping`` (may raise NegativeCurvature)."""
        if self.preconditioner is not None:
            self.preconditioner.damping = damping
        if self.method == "cg":
            solved, iterations, residual = conjugate_gradients(
                self.operator,
                block,
                damping=damping,
                max_iterations=self.max_iterations,
                tolerance=self.options.tolerance,
                preconditioner=self.preconditioner,
            )
            self.diagnostics.update(iterations=iterations, residual=residual)
            return solved
        if self._scale_damping != damping:
            self.lissa_scale, self._scale_damping = self._lissa_scale(damping), damping
        solved, iterations = lissa(
            self.operator,
            block,
            damping=damping,
            scale=self.lissa_scale,
            max_iterations=self.max_iterations,
            tolerance=self.options.tolerance,
            preconditioner=self.preconditioner,
        )
        self.diagnostics.update(iterations=iterations, scale=self.lissa_scale)
        return solved

    def precondition(self, features):
        if self.method == "arnoldi":
            out = []
            for block in features.split(self.options.query_block):
                coefficients = block.to(self.eigenvectors.dtype) @ self.eigenvectors
                solved = (coefficients / (self.eigenvalues + self.damping)) @ self.eigenvectors.T
                out.append(solved.to(features.dtype))
            return torch.cat(out) if out else features.clone()
        blocks = list(features.split(self.options.query_block))
        solved: list[torch.Tensor | None] = [None] * len(blocks)
        used: list[float | None] = [None] * len(blocks)
        # A block that raises the damping leaves the blocks solved before it at the old value:
        # solve those again, so that every score shares one damping.
        while any(u != self.damping for u in used):
            for i, block in enumerate(blocks):
                if used[i] == self.damping:
                    continue
                result, damping = solve_with_positive_damping(
                    lambda d, block=block: self._solve_at(block, d),
                    self.damping,
                    margin=self.margin,
                    what=self.method,
                )
                solved[i], used[i], self.damping = result.to(features.dtype), damping, damping
        self.diagnostics["damping"] = self.damping
        return torch.cat(solved) if solved else features.clone()
