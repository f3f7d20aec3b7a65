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

``fisher="sampled"`` draws labels from softmax(outputs), so the factors estimate the true Fisher =
the GGN of *softmax cross-entropy* (and only of that loss); ``"empirical"`` uses the training
labels and fits any loss. ``"auto"`` checks the loss rather than assuming it: ``loss_fn`` is
evaluated on the first batch and compared with ``F.cross_entropy``; when they agree it samples,
with real-valued targets it takes the empirical Fisher, and with class targets under another loss
it raises and asks for the choice. ``params=`` restricts the factors to the named Linear/Conv
weights (and biases), as for every other method; a selected parameter outside Linear/Conv
layers is refused. Damping ``"auto"`` is 0.1 times the mean eigenvalue of each layer's block.
Scores are I_up,loss (sign -1), as for the other influence estimators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
from influx.grads.common import LossFn, check_finite, check_model, select_parameters
from influx.influence.base import (
    Block,
    Estimator,
    FeatureLayout,
    check_choice,
    check_damping,
    check_positive,
    option,
)

# Layers whose weight gradient is b^T a per example (captured by capture_matmul_layers; the
# engine's rules match exact types, so subclasses are not included).
FACTORED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def factored_parameters(model: nn.Module, names) -> tuple[str, ...]:
    """The names among ``names`` that K-FAC factors: Linear/Conv weights, and their biases when
    the weight is among ``names`` too."""
    names, kept = set(names), []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if type(module) in FACTORED_LAYERS and f"{prefix}weight" in names:
            kept += [n for n in (f"{prefix}weight", f"{prefix}bias") if n in names]
    return tuple(kept)


@dataclass(frozen=True)
class KFACOptions:
    damping: float | str = option(
        "auto", "number >= 0, or 'auto' = 0.1 * mean eigenvalue per layer"
    )
    fisher: str = option(
        "auto",
        "'sampled' (labels from softmax(outputs): the GGN of softmax cross-entropy), 'empirical' "
        "(train labels, any loss) or 'auto' (sampled when loss_fn is checked to be cross-entropy)",
    )
    batch_size: int = option(512, "train examples per factor-estimation batch")
    seed: int = option(0, "seed for the sampled labels")
    params: tuple[str, ...] | None = option(
        None, "Linear/Conv parameter names to differentiate (default: all trainable)"
    )

    def __post_init__(self):
        check_damping(self.damping)
        check_choice("fisher", self.fisher, ("auto", "sampled", "empirical"))
        check_positive("batch_size", self.batch_size)


def _is_cross_entropy(model, loss_fn, inputs, targets) -> bool:
    """Whether ``loss_fn`` is softmax cross-entropy on this batch (outputs [B, C], labels [B])."""
    if targets.is_floating_point() or targets.dim() != 1 or inputs.shape[0] == 0:
        return False
    with torch.no_grad():
        outputs = model(inputs)
        if outputs.dim() != 2:
            return False
        losses = loss_fn(outputs, targets)
        reference = F.cross_entropy(outputs, targets, reduction="none")
    return losses.shape == reference.shape and bool(
        torch.allclose(losses, reference, rtol=1e-5, atol=1e-6)
    )


def resolve_fisher(fisher: str, model, loss_fn, inputs, targets) -> str:
    """'sampled' or 'empirical' for ``fisher`` (see the module docstring for ``'auto'``)."""
    if fisher == "sampled" and (targets.is_floating_point() or targets.dim() != 1):
        raise InfluxValueError(
            "fisher='sampled' draws class labels from softmax(outputs) and needs integer class "
            f"targets [N]; got {targets.dtype} of shape {tuple(targets.shape)}: use fisher='empirical'"
        )
    if fisher != "auto":
        return fisher
    if targets.is_floating_point():
        return "empirical"
    if _is_cross_entropy(model, loss_fn, inputs, targets):
        return "sampled"
    raise InfluxValueError(
        "fisher='auto' samples labels from softmax(outputs), which is the Fisher of softmax "
        "cross-entropy only, and loss_fn does not match F.cross_entropy(outputs, targets, "
        "reduction='none') on the first batch: pass fisher='empirical' (the train labels, any "
        "loss) or fisher='sampled' (if the loss is a softmax cross-entropy after all)"
    )


def _sample_targets(model, inputs, targets, generator, offset: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(inputs)
    check_finite(logits.detach(), "model outputs", offset=offset)
    # Sampled on the CPU generator (reproducible on any device), then moved to the targets' device.
    probabilities = torch.softmax(logits.to(device="cpu", dtype=torch.float64), dim=-1)
    sampled = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
    return sampled.to(device=targets.device, dtype=targets.dtype)


class KFACEstimator(Estimator):
    """(K-FAC or EK-FAC + damping I)^-1 per layer; features: layer gradients [B, sum d_out d_in]."""

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
        check_model(model)
        self.model, self.loss_fn, self.params = model, loss_fn, options.params
        self._check_parameters(model)
        if inputs.shape[0] == 0:
            raise InfluxValueError("the training set is empty: K-FAC needs at least one example")
        batch_size = options.batch_size
        fisher = resolve_fisher(
            options.fisher, model, loss_fn, inputs[:batch_size], targets[:batch_size]
        )
        generator = torch.Generator().manual_seed(options.seed)
        batches = []
        for start in range(0, inputs.shape[0], batch_size):
            x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
            if fisher == "sampled":
                y = _sample_targets(model, x, y, generator, start)
            batches.append((start, x, y))
        self.factors: dict[str, KroneckerFactors] = {}
        for start, x, y in batches:
            accumulate_kronecker_factors(self.factors, self._capture(x, y, start))
        finalize_kronecker_factors(self.factors)
        if eigen_corrected:
            sums: dict[str, torch.Tensor] = {}
            for start, x, y in batches:
                accumulate_ekfac_eigenvalues(self.factors, self._capture(x, y, start), sums)
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

    def _capture(self, inputs, targets, offset: int = 0):
        return capture_matmul_layers(
            self.model, self.loss_fn, inputs, targets, params=self.params, offset=offset
        )

    def _check_parameters(self, model: nn.Module) -> None:
        """Before any work: every selected parameter is the weight (or the bias, with its
        weight) of a Linear / Conv layer; K-FAC has no factors for anything else."""
        selected = select_parameters(model, self.params)
        covered = set(factored_parameters(model, selected))
        others = [name for name in selected if name not in covered]
        if others:
            raise UnsupportedModelError(
                f"K-FAC covers Linear/Conv weights (and their biases) only; selected parameters "
                f"{others[:5]} are not: freeze them (requires_grad_(False)), leave them out with "
                "params=[...], or use method='cg' / 'trak'"
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
        captures = self._capture(inputs, targets)
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
