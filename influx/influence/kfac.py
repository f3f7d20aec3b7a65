"""``method="kfac"`` / ``"ekfac"``: Kronecker-factored curvature per matmul layer.

For a Linear / Conv layer (inputs a and output gradients b captured by
``influx.grads.capture_matmul_layers``; a Conv's a holds unfolded patches, T positions per example)
with per-example gradient G_n = b_n^T a_n ([d_out, d_in(+1)], a bias folded in as a
column of ones), the Fisher / GGN block of the mean loss is approximated by A (x) S with
A = (1/N) sum_n a_n^T a_n and S = (1/(N T)) sum_n b_n^T b_n (K-FAC, Martens & Grosse 2015; the
1/T over a conv's positions as in KFC, Grosse & Martens 2016; Kronfluence divides both factors
by N T, which scales each conv block down T-fold and so reweights layers in K-FAC). EK-FAC
(George et al. 2018) keeps the Kronecker eigenbasis Q_S, Q_A but refits the eigenvalues to
(1/N) sum_n ((Q_S^T G_n Q_A)_ij)^2. Layers are independent (block-diagonal curvature), so
per-layer scores are exact shares of the total.

``fisher="sampled"`` (default for integer class targets) draws labels from the model's predictive
distribution, so the factors estimate the true Fisher = the GGN of cross-entropy; ``"empirical"``
uses the training labels. Damping ``"auto"`` is 0.1 times the mean eigenvalue of each layer's block.
Scores are I_up,loss (sign -1), as for the other influence estimators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from influx.curvature import (
    KroneckerFactors,
    Spectrum,
    accumulate_ekfac_eigenvalues,
    accumulate_kronecker_factors,
    check_damped_spectrum,
    finalize_ekfac_eigenvalues,
    finalize_kronecker_factors,
    resolve_damping,
)
from influx.errors import InfluxValueError, UnsupportedModelError
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
)


@dataclass(frozen=True)
class KFACOptions:
    damping: float | str = option(
        "auto", "number >= 0, or 'auto' = 0.1 * mean eigenvalue per layer"
    )
    fisher: str = option(
        "auto", "'sampled' (true Fisher = GGN), 'empirical' (train labels) or 'auto'"
    )
    batch_size: int = option(512, "train examples per factor-estimation batch")
    seed: int = option(0, "seed for the sampled labels")

    def __post_init__(self):
        check_damping(self.damping)
        check_choice("fisher", self.fisher, ("auto", "sampled", "empirical"))
        check_positive("batch_size", self.batch_size)


def _sample_targets(model, inputs, targets, generator) -> torch.Tensor:
    with torch.no_grad():
        logits = model(inputs)
    # Sampled on the CPU generator (reproducible on any device), then moved to the targets' device.
    probabilities = torch.softmax(logits.to(device="cpu", dtype=torch.float64), dim=-1)
    sampled = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
    return sampled.to(device=targets.device, dtype=targets.dtype)


class KFACEstimator(Estimator):
    sign = -1.0

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs,
        targets,
        options: KFACOptions,
        *,
        eigen_corrected: bool,
    ):
        self.model, self.loss_fn = model, loss_fn
        fisher = options.fisher
        if fisher == "auto":
            fisher = (
                "sampled" if not targets.is_floating_point() and targets.dim() == 1 else "empirical"
            )
        if fisher == "sampled" and (targets.is_floating_point() or targets.dim() != 1):
            raise InfluxValueError(
                "fisher='sampled' draws class labels from softmax(outputs) and needs integer class "
                f"targets [N]; got {targets.dtype} of shape {tuple(targets.shape)}: use fisher='empirical'"
            )
        generator = torch.Generator().manual_seed(options.seed)
        batches = []
        for start in range(0, inputs.shape[0], options.batch_size):
            x, y = (
                inputs[start : start + options.batch_size],
                targets[start : start + options.batch_size],
            )
            if fisher == "sampled":
                y = _sample_targets(model, x, y, generator)
            batches.append((x, y))
        self.factors: dict[str, KroneckerFactors] = {}
        for x, y in batches:
            accumulate_kronecker_factors(self.factors, capture_matmul_layers(model, loss_fn, x, y))
        finalize_kronecker_factors(self.factors)
        self._check_parameters(model)
        if eigen_corrected:
            sums: dict[str, torch.Tensor] = {}
            for x, y in batches:
                accumulate_ekfac_eigenvalues(
                    self.factors, capture_matmul_layers(model, loss_fn, x, y), sums
                )
            finalize_ekfac_eigenvalues(self.factors, sums)
        self.dampings = {}
        for name, f in self.factors.items():
            spectrum = Spectrum.of_eigenvalues(f.eigenvalues.flatten())
            self.dampings[name] = resolve_damping(options.damping, spectrum)
            check_damped_spectrum(spectrum, self.dampings[name], what=f"K-FAC block of {name}")
        self.layout, self.shapes = self._layout()
        self.diagnostics = {
            "fisher": fisher,
            "damping": self.dampings,
            "layers": list(self.factors),
        }

    def _check_parameters(self, model: nn.Module) -> None:
        covered = set()
        for f in self.factors.values():
            covered |= {f.weight_name} | ({f.bias_name} if f.bias_name else set())
        others = [n for n, p in model.named_parameters() if p.requires_grad and n not in covered]
        if others:
            raise UnsupportedModelError(
                f"K-FAC covers Linear/Conv layers only; trainable parameters {others[:5]} belong to "
                "other layers: freeze them (requires_grad_(False)) or use method='cg' / 'trak'"
            )

    def _layout(self):
        blocks, shapes, start = [], {}, 0
        for name, f in self.factors.items():
            shape = (f.gradient.shape[0], f.activation.shape[0])
            size = shape[0] * shape[1]
            blocks.append(Block(name, start, start + size))
            shapes[name] = shape
            start += size
        return FeatureLayout(start, tuple(blocks)), shapes

    def features(self, inputs, targets):
        """Per-example layer gradients G_n = b_n^T a_n [d_out, d_in(+1)], flat, layer by layer."""
        captures = capture_matmul_layers(self.model, self.loss_fn, inputs, targets)
        out = None
        for blk in self.layout.blocks:
            cap = captures[blk.layer]
            if out is None:
                out = cap.a.new_empty(inputs.shape[0], self.layout.size)
            out[:, blk.start : blk.stop] = (cap.b.transpose(1, 2) @ cap.a).flatten(1)
        return out

    def precondition(self, features):
        out = torch.empty_like(features)
        for blk in self.layout.blocks:
            f = self.factors[blk.layer]
            grads = (
                features[:, blk.start : blk.stop]
                .reshape(-1, *self.shapes[blk.layer])
                .to(f.activation.dtype)
            )
            rotated = f.rotate(grads) / (f.eigenvalues + self.dampings[blk.layer])
            out[:, blk.start : blk.stop] = (
                f.unrotate(rotated).reshape(features.shape[0], -1).to(features.dtype)
            )
        return out
