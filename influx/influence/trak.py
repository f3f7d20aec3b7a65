"""``method="trak"``: influence in a random projection of the gradients (Park et al. 2023).

Per checkpoint t, per-example loss gradients are projected to K dims, phi_t(z) = R_t grad l(w_t, z)
(``projection="dense"``: a seeded Gaussian R [K, P] / sqrt(K); ``"kronecker"``: per linear layer
P_out G P_in^T, never forming G's projection matrix, LoGra-style). With Phi_t [N, K] the train
features and F_t = Phi_t^T Phi_t / N (the Gauss-Newton / Fisher of the mean loss in the projected
space),

    score(z, z_test) = - (1/T) sum_t phi_t(z_test)^T (F_t + damping_t I)^-1 phi_t(z)

so TRAK is I_up,loss (sign -1) with H replaced by the projected empirical Fisher, averaged over T
checkpoints. Damping ``"auto"`` is 0.1 * tr(F_t) / K. Loss gradients are used directly (TRAK's
margin-gradient and 1 - p reweighting are folded into the cross-entropy gradient).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from influx.curvature import ParamSpace, Spectrum, check_damped_spectrum, lanczos, resolve_damping
from influx.errors import InfluxValueError
from influx.grads import capture_matmul_layers
from influx.grads.functional import LossFn
from influx.influence.base import (
    Block,
    Estimator,
    FeatureLayout,
    check_choice,
    check_damping,
    check_positive,
    option,
    per_example_gradients,
)
from influx.influence.tracin import model_at, resolve_checkpoints


@dataclass(frozen=True)
class TRAKOptions:
    dim: int = option(2048, "projection dimension K per checkpoint")
    projection: str = option(
        "dense", "'dense' (Gaussian) or 'kronecker' (per linear layer, per-layer scores)"
    )
    damping: float | str = option("auto", "number >= 0, or 'auto' = 0.1 * tr(F) / K")
    checkpoints: Sequence | None = option(
        None, "state dicts (or a training record); default: the model"
    )
    seed: int = option(0, "projection seed")
    batch_size: int = option(512, "train examples per feature batch")

    def __post_init__(self):
        check_positive("dim", self.dim)
        check_choice("projection", self.projection, ("dense", "kronecker"))
        check_damping(self.damping)
        check_positive("batch_size", self.batch_size)


class _DenseProjector:
    def __init__(self, model, loss_fn, dim: int, seed: int):
        self.model, self.loss_fn = model, loss_fn
        self.space = ParamSpace.of(model)
        generator = torch.Generator().manual_seed(seed)
        dtype = next(model.parameters()).dtype
        self.matrix = torch.randn(
            self.space.size, dim, generator=generator, dtype=dtype
        ) / math.sqrt(dim)  # [P, K]
        self.layout = FeatureLayout.unlayered(dim)

    def __call__(self, inputs, targets):
        return (
            per_example_gradients(self.model, self.loss_fn, inputs, targets, self.space)
            @ self.matrix
        )


class _KroneckerProjector:
    def __init__(self, model, loss_fn, dim: int, seed: int, example):
        self.model, self.loss_fn = model, loss_fn
        captures = capture_matmul_layers(model, loss_fn, *example)
        generator = torch.Generator().manual_seed(seed)
        share = max(1, dim // max(1, len(captures)))
        self.projections, blocks, start = {}, [], 0
        for name, cap in captures.items():
            d_in, d_out = cap.a.shape[-1], cap.b.shape[-1]
            k_out = min(d_out, max(1, round(math.sqrt(share))))
            k_in = min(d_in, max(1, share // k_out))
            dtype = cap.a.dtype
            p_out = torch.randn(k_out, d_out, generator=generator, dtype=dtype) / math.sqrt(k_out)
            p_in = torch.randn(k_in, d_in, generator=generator, dtype=dtype) / math.sqrt(k_in)
            self.projections[name] = (p_out, p_in)
            blocks.append(Block(name, start, start + k_out * k_in))
            start += k_out * k_in
        self.layout = FeatureLayout(start, tuple(blocks))

    def __call__(self, inputs, targets):
        captures = capture_matmul_layers(self.model, self.loss_fn, inputs, targets)
        parts = []
        for name, (p_out, p_in) in self.projections.items():
            cap = captures[name]
            # (b P_out^T)^T (a P_in^T): [N, k_out, k_in] without forming G = b^T a.
            parts.append(
                ((cap.b @ p_out.T).transpose(1, 2) @ (cap.a @ p_in.T)).reshape(inputs.shape[0], -1)
            )
        return torch.cat(parts, dim=1)


class TRAKEstimator(Estimator):
    sign = -1.0

    def __init__(self, model: nn.Module, loss_fn: LossFn, inputs, targets, options: TRAKOptions):
        checkpoints = (
            [model]
            if options.checkpoints is None
            else resolve_checkpoints(options.checkpoints, None)[0]
        )
        self.projectors = []
        for t, checkpoint in enumerate(checkpoints):
            at = model_at(model, checkpoint)
            if options.projection == "dense":
                self.projectors.append(_DenseProjector(at, loss_fn, options.dim, options.seed + t))
            else:
                self.projectors.append(
                    _KroneckerProjector(
                        at, loss_fn, options.dim, options.seed + t, (inputs[:2], targets[:2])
                    )
                )
        self.batch_size = options.batch_size
        sizes = [p.layout.size for p in self.projectors]
        layered = options.projection == "kronecker"
        blocks, offset = [], 0
        for p in self.projectors:
            blocks += [Block(b.layer, b.start + offset, b.stop + offset) for b in p.layout.blocks]
            offset += p.layout.size
        self.layout = FeatureLayout(offset, tuple(blocks), layered=layered)
        self.offsets = [sum(sizes[:t]) for t in range(len(sizes) + 1)]
        train_features = torch.cat(
            [
                self.features(inputs[s : s + self.batch_size], targets[s : s + self.batch_size])
                for s in range(0, inputs.shape[0], self.batch_size)
            ]
        )
        self.fitted_train_features = train_features
        self.factors, dampings = [], []
        for t in range(len(self.projectors)):
            phi = train_features[:, self.offsets[t] : self.offsets[t + 1]].to(torch.float64)
            fisher = phi.T @ phi / phi.shape[0]  # [K, K], positive semi-definite
            # F is PSD (lambda_min >= 0), so tr(F) / K and a short Lanczos run for lambda_max
            # give the damping and the conditioning check; a K x K eigendecomposition would cost
            # ~20x the Cholesky inverse below.
            ritz, _ = lanczos(lambda v, f=fisher: v @ f, fisher.shape[0], iterations=30, seed=t)
            spectrum = Spectrum(
                mean=float(torch.diagonal(fisher).mean()),
                maximum=float(ritz.max()),
                minimum=0.0,
                size=fisher.shape[0],
            )
            damping = resolve_damping(options.damping, spectrum)
            check_damped_spectrum(spectrum, damping, what=f"projected Fisher of checkpoint {t}")
            if damping <= 0:
                raise InfluxValueError(
                    "trak needs damping > 0: the projected Fisher is singular when K >= N or "
                    "gradients are degenerate; pass damping='auto' or a positive number"
                )
            eye = torch.eye(fisher.shape[0], dtype=fisher.dtype)
            # Keep the Cholesky factor and solve per query block: cheaper than forming the K x K
            # inverse when there are fewer queries than K, and better conditioned.
            self.factors.append(torch.linalg.cholesky(fisher + damping * eye))
            dampings.append(damping)
        self.diagnostics = {
            "dim": options.dim,
            "projection": options.projection,
            "checkpoints": len(self.projectors),
            "damping": dampings,
        }

    def features(self, inputs, targets):
        return torch.cat([p(inputs, targets) for p in self.projectors], dim=1)

    def precondition(self, features):
        out = torch.empty_like(features)
        for t, factor in enumerate(self.factors):
            sl = slice(self.offsets[t], self.offsets[t + 1])
            solved = torch.cholesky_solve(features[:, sl].T.to(factor.dtype), factor).T
            # average over checkpoints
            out[:, sl] = (solved / len(self.factors)).to(features.dtype)
        return out
