"""``method="trak"``: influence in a random projection of the gradients (Park et al. 2023).

Per checkpoint t, per-example loss gradients are projected to K dims, phi_t(z) = R_t grad l(w_t, z),
by ``influx.grads.per_sample_projected`` (one projection code path and one seeding rule for the
whole package, seed ``seed + t``): ``projection="dense"`` is a seeded Gaussian R [K, P] with
N(0, 1/K) entries, generated block by block (never P x K at once); ``"kronecker"`` projects each
Linear / Conv layer as P_out G P_in^T without forming G (LoGra-style) and every other selected
parameter densely, so no parameter is left out. With Phi_t [N, K] the train features and
F_t = Phi_t^T Phi_t / N (the Gauss-Newton / Fisher of the mean loss in the projected space),

    score(z, z_test) = - (1/T) sum_t phi_t(z_test)^T (F_t + damping_t I)^-1 phi_t(z)

so TRAK is I_up,loss (sign -1) with H replaced by the projected empirical Fisher, averaged over T
checkpoints. Damping ``"auto"`` is 0.1 * tr(F_t) / K. Loss gradients are used directly. For
cross-entropy they are TRAK's margin gradients, f = log(p_y / (1 - p_y)), times -(1 - p_y), so the
1 - p weight that TRAK applies to each train score separately sits here inside the features on
both sides and inside F_t. The scores are therefore not traker's, even with one projection
(``benchmarks/results/trak_scale*.md`` measures how far they agree).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from influx.checks import check_integer
from influx.curvature import ParamSpace, Spectrum, check_damped_spectrum, lanczos, resolve_damping
from influx.errors import InfluxValueError
from influx.grads import per_sample_projected
from influx.grads.common import LossFn, check_model, select_parameters
from influx.grads.engine import plan_layers
from influx.influence import stream
from influx.influence.base import (
    Block,
    Estimator,
    FeatureLayout,
    check_choice,
    check_damping,
    default_batch_size,
    option,
)
from influx.influence.tracin import model_at, resolve_checkpoints


@dataclass(frozen=True)
class TRAKOptions:
    dim: int = option(2048, "projection dimension K per checkpoint")
    projection: str = option(
        "dense", "'dense' (Gaussian) or 'kronecker' (per layer, per-layer scores)"
    )
    damping: float | str = option("auto", "number >= 0, or 'auto' = 0.1 * tr(F) / K")
    checkpoints: Sequence | None = option(
        None, "state dicts (or a training record); default: the model"
    )
    seed: int = option(0, "projection seed (checkpoint t uses seed + t)")
    batch_size: int | None = option(
        None, "train examples per feature batch (default: from the per-example memory budget)"
    )
    params: tuple[str, ...] | None = option(
        None, "parameter names to differentiate (default: all trainable)"
    )

    def __post_init__(self):
        check_integer("dim", self.dim, minimum=1)
        check_choice("projection", self.projection, ("dense", "kronecker"))
        check_damping(self.damping)
        if self.batch_size is not None:
            check_integer("batch_size", self.batch_size, minimum=1)


class TRAKEstimator(Estimator):
    """(F_t + damping_t I)^-1 / T per checkpoint; features: projected gradients [B, T K]."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, data, options: TRAKOptions):
        check_model(model)
        self.loss_fn, self.options = loss_fn, options
        checkpoints = (
            [model]
            if options.checkpoints is None
            else resolve_checkpoints(options.checkpoints, None)[0]
        )
        self.models = [model_at(model, c) for c in checkpoints]
        # A dense projection forms one parameter's per-example gradients at a time (plus a
        # transient copy in the conv rule): the largest parameter bounds its memory.
        space = ParamSpace.of(model, options.params)
        self.num_parameters, self.largest_parameter = space.size, max(space.numels)
        self.modules = len(plan_layers(model, select_parameters(model, options.params)))
        self.layout: FeatureLayout | None = None
        self.checkpoint_size = 0
        grams, kept = self._fit_pass(data)
        self.fitted_train_features = torch.cat(kept) if kept is not None else None
        self.factors, dampings = [], []
        num_train = stream.size(data)
        size = self.checkpoint_size
        for t in range(len(self.models)):
            if self.fitted_train_features is not None:
                phi = self.fitted_train_features[:, t * size : (t + 1) * size].to(torch.float64)
                gram = phi.T @ phi
            else:
                gram = grams[t]
            factor, damping = self._fit_fisher(gram / num_train, t)
            self.factors.append(factor)
            dampings.append(damping)
        self.diagnostics = {
            "dim": options.dim,
            "projection": options.projection,
            "checkpoints": len(self.models),
            "damping": dampings,
        }

    def _fit_pass(self, data) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """One pass over the train set: the projected features of every batch, kept when they
        fit :data:`influx.influence.stream.CACHE_BYTES` (scores then reuse them), else only their
        Gram matrices Phi_t^T Phi_t [K, K] (float64), summed batch by batch."""
        batch_size = self.options.batch_size or default_batch_size(self.bytes_per_example())
        keep = stream.fits_cache(stream.size(data), self.bytes_per_example())
        kept: list[torch.Tensor] | None = [] if keep else None
        grams: list[torch.Tensor] = []
        for inputs, targets, _ in stream.batches(data, batch_size):
            if self.layout is None:
                self.layout = self._layout(inputs[:1], targets[:1])
                self.checkpoint_size = self.layout.size // len(self.models)
            features = self.features(inputs, targets)
            if kept is not None:
                kept.append(features)
                continue
            for t in range(len(self.models)):
                sl = slice(t * self.checkpoint_size, (t + 1) * self.checkpoint_size)
                phi = features[:, sl].to(torch.float64)
                if len(grams) <= t:
                    grams.append(phi.T @ phi)
                else:
                    grams[t] += phi.T @ phi
        return grams, kept

    def _project(self, model, inputs, targets, t: int, *, by_layer: bool = False, loss_fn=None):
        return per_sample_projected(
            model,
            loss_fn or self.loss_fn,
            inputs,
            targets,
            dim=self.options.dim,
            seed=self.options.seed + t,
            kind=self.options.projection,
            params=self.options.params,
            by_layer=by_layer,
        )

    def _layout(self, inputs, targets) -> FeatureLayout:
        """Feature blocks of every checkpoint: one per module (Kronecker) or one mixed block."""
        if self.options.projection == "dense":
            return FeatureLayout(
                self.options.dim * len(self.models),
                tuple(
                    Block("all", t * self.options.dim, (t + 1) * self.options.dim)
                    for t in range(len(self.models))
                ),
                layered=False,
            )
        widths = {
            name: block.shape[1]
            for name, block in self._project(
                self.models[0], inputs, targets, 0, by_layer=True
            ).items()
        }
        blocks, start = [], 0
        for _ in self.models:
            for name, width in widths.items():
                blocks.append(Block(name, start, start + width))
                start += width
        return FeatureLayout(start, tuple(blocks))

    def _fit_fisher(self, fisher: torch.Tensor, t: int) -> tuple[torch.Tensor, float]:
        """Cholesky factor of F_t + damping_t I (float64) and damping_t, from F_t = Phi_t^T
        Phi_t / N [K, K] (positive semi-definite)."""
        # F is PSD (lambda_min >= 0), so tr(F) / K and a short Lanczos run for lambda_max
        # give the damping and the conditioning check without a K x K eigendecomposition.
        ritz, _ = lanczos(
            lambda v, f=fisher: v @ f, fisher.shape[0], iterations=30, seed=t, device=fisher.device
        )
        spectrum = Spectrum(
            mean=float(torch.diagonal(fisher).mean()),
            maximum=float(ritz.max()),
            minimum=0.0,
            size=fisher.shape[0],
        )
        damping = resolve_damping(self.options.damping, spectrum)
        check_damped_spectrum(spectrum, damping, what=f"projected Fisher of checkpoint {t}")
        if damping <= 0:
            raise InfluxValueError(
                "trak needs damping > 0: the projected Fisher is singular when K >= N or "
                "gradients are degenerate; pass damping='auto' or a positive number"
            )
        eye = torch.eye(fisher.shape[0], dtype=fisher.dtype, device=fisher.device)
        # Keep the Cholesky factor and solve per query block: cheaper than forming the K x K
        # inverse when there are fewer queries than K, and better conditioned.
        return torch.linalg.cholesky(fisher + damping * eye), damping

    def bytes_per_example(self) -> int:
        if self.options.projection == "dense":
            return 8 * max(self.options.dim * len(self.models), 2 * self.largest_parameter)
        if self.layout is None:
            # Before the first batch: each checkpoint's Kronecker features hold at most dim
            # coordinates, or one per module when dim is smaller.
            return 8 * max(self.options.dim, self.modules) * len(self.models)
        return 8 * self.layout.size

    def features(self, inputs, targets, loss_fn=None):
        return torch.cat(
            [
                self._project(m, inputs, targets, t, loss_fn=loss_fn)
                for t, m in enumerate(self.models)
            ],
            dim=1,
        )

    def precondition(self, features):
        out = torch.empty_like(features)
        size = self.checkpoint_size
        for t, factor in enumerate(self.factors):
            sl = slice(t * size, (t + 1) * size)
            solved = torch.cholesky_solve(features[:, sl].T.to(factor.dtype), factor).T
            # average over checkpoints
            out[:, sl] = (solved / len(self.factors)).to(features.dtype)
        return out
