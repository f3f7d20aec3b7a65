"""K-FAC, EK-FAC and diagonal Fisher factors, fitted from captured layer inputs and gradients.

The one fitter of Kronecker factors: the influence estimators (``influx.influence.kfac``, the
preconditioner of ``cg`` / ``lissa``) and the Fisher metric of ``influx.shift`` all accumulate
their factors here, batch by batch, from captures of a matmul layer's inputs a [N, T, d_in(+1)]
and output gradients b [N, T, d_out] (``influx.grads.capture_matmul_layers``), then finalize
them once (divide by N, eigendecompose). Sums over disjoint shards can be reduced across ranks
before finalizing (:func:`all_reduce_factor_sums`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from influx.data import iter_batches, num_examples
from influx.errors import InfluxValueError
from influx.grads import capture_matmul_layers
from influx.grads.common import check_finite

__all__ = [
    "FACTORED_LAYERS",
    "FISHER_DRAWS_TOTAL",
    "MAX_FISHER_DRAWS",
    "DiagonalFactors",
    "KroneckerFactors",
    "accumulate_diagonal_factors",
    "accumulate_ekfac_eigenvalues",
    "accumulate_kronecker_factors",
    "all_reduce_ekfac_sums",
    "all_reduce_factor_sums",
    "capture_dims",
    "eigenbasis_gradients",
    "finalize_diagonal_factors",
    "finalize_ekfac_eigenvalues",
    "finalize_kronecker_factors",
    "fisher_draws",
    "fit_sampled_kronecker_factors",
    "is_factored",
    "rotation_by_tokens_is_cheaper",
    "sample_labels",
]


@dataclass
class KroneckerFactors:
    """K-FAC factors of one matmul layer: F ~ A (x) S with a layer gradient laid out [d_out, d_in(+1)].

    ``activation`` A = (1/N) sum_n sum_t a_nt a_nt^T  [d_in(+1), d_in(+1)];
    ``gradient`` S = (1/N) sum_n (1/T) sum_t b_nt b_nt^T  [d_out, d_out].
    With T tokens (conv positions) per example, A (x) S = T E_t[a a^T] (x) E_t[b b^T], the
    Fisher block sum_t E[a_t a_t^T (x) b_t b_t^T] when positions are uncorrelated (KFC, Grosse &
    Martens 2016). Summing over positions in both factors would overstate it T-fold.
    After :meth:`eigendecompose`: ``activation_basis`` / ``gradient_basis`` are the eigenvectors and
    ``eigenvalues`` [d_out, d_in(+1)] the Kronecker products lambda_S[i] lambda_A[j]; EK-FAC replaces
    them with the corrected eigenvalues (1/N) sum_n ((Q_S^T G_n Q_A)_ij)^2.
    """

    weight_name: str
    bias_name: str | None
    activation: torch.Tensor
    gradient: torch.Tensor
    count: int = 0
    activation_basis: torch.Tensor | None = None
    gradient_basis: torch.Tensor | None = None
    eigenvalues: torch.Tensor | None = None

    def eigendecompose(self) -> None:
        a_vals, self.activation_basis = torch.linalg.eigh(self.activation)
        s_vals, self.gradient_basis = torch.linalg.eigh(self.gradient)
        # Round-off can make tiny eigenvalues of a PSD factor negative; they are 0.
        self.eigenvalues = torch.outer(s_vals.clamp_min(0), a_vals.clamp_min(0))

    def compact(self, dtype: torch.dtype) -> None:
        """Hold the factors and eigenbases in ``dtype`` (a float32 model's scores are computed in
        float32 anyway) once the float64 eigendecomposition is done; eigenvalues stay float64.
        On a ResNet-18 this keeps 8 bytes per factor entry instead of 20 (float64 factors and
        bases plus a float32 copy of the bases for scoring)."""
        for field in ("activation", "gradient", "activation_basis", "gradient_basis"):
            setattr(self, field, getattr(self, field).to(dtype))

    def rotate(self, layer_grads: torch.Tensor) -> torch.Tensor:
        """[M, d_out, d_in(+1)] -> the same in the Kronecker eigenbasis: Q_S^T G Q_A."""
        return self.gradient_basis.T @ layer_grads @ self.activation_basis

    def unrotate(self, rotated: torch.Tensor) -> torch.Tensor:
        return self.gradient_basis @ rotated @ self.activation_basis.T


def accumulate_kronecker_factors(
    factors: dict[str, KroneckerFactors],
    captures: Mapping[str, object],
    *,
    dtype: torch.dtype = torch.float64,
) -> None:
    """Add one batch's sum_n sum_t a a^T and b b^T to ``factors`` (created on first use).

    ``captures`` maps module names to objects with ``.a`` [N, T, d_in(+1)], ``.b`` [N, T, d_out],
    ``.weight_name`` and ``.bias_name`` (see ``influx.grads.capture_matmul_layers``). Call
    :func:`finalize_kronecker_factors` after the last batch to divide by N.
    """
    for name, cap in captures.items():
        # Each batch's products in the capture's dtype (no float64 copy of the unfolded inputs);
        # the running sums over batches and the eigendecompositions in ``dtype``. A capture may
        # form sum a^T a itself (``activation_gram``: no copy of a with a bias column).
        if hasattr(cap, "activation_gram"):
            gram = cap.activation_gram()
        else:
            a = cap.a.reshape(-1, cap.a.shape[-1])
            gram = a.T @ a
        b = cap.b.reshape(-1, cap.b.shape[-1])
        if name not in factors:
            factors[name] = KroneckerFactors(
                cap.weight_name,
                cap.bias_name,
                gram.new_zeros(gram.shape, dtype=dtype),
                b.new_zeros(b.shape[1], b.shape[1], dtype=dtype),
            )
        factors[name].activation += gram.to(dtype)
        factors[name].gradient += (b.T @ b).to(dtype) / cap.b.shape[1]  # mean over tokens
        factors[name].count += cap.b.shape[0]


def finalize_kronecker_factors(
    factors: Mapping[str, KroneckerFactors], *, compact: torch.dtype | None = None
) -> None:
    """Divide the accumulated sums by the number of examples and eigendecompose each factor;
    with ``compact`` each layer is :meth:`KroneckerFactors.compact`-ed right after, so no more
    than one layer's float64 eigenbases are alive at a time."""
    for f in factors.values():
        if f.count == 0:
            raise InfluxValueError(f"no examples were accumulated for layer {f.weight_name}")
        if not (torch.isfinite(f.activation).all() and torch.isfinite(f.gradient).all()):
            raise InfluxValueError(
                f"the K-FAC factors of {f.weight_name} hold NaN / inf: some example has a "
                "non-finite input, loss or gradient; check the data and the model"
            )
        f.activation /= f.count
        f.gradient /= f.count
        f.eigendecompose()
        if compact is not None:
            f.compact(compact)


def accumulate_ekfac_eigenvalues(
    factors: Mapping[str, KroneckerFactors],
    captures: Mapping[str, object],
    sums: dict[str, torch.Tensor],
) -> None:
    """Add sum_n (Q_S^T G_n Q_A)^2 of one batch, with G_n = b_n^T a_n [d_out, d_in(+1)].

    Computed in the capture's dtype (see :func:`eigenbasis_gradients`), summed in the factors'.
    """
    for name, cap in captures.items():
        f = factors[name]
        rotated = eigenbasis_gradients(cap, f.gradient_basis, f.activation_basis)
        sums[name] = sums.get(name, 0) + rotated.square().sum(0).to(f.eigenvalues.dtype)


def rotation_by_tokens_is_cheaper(tokens: int, d_in: int, d_out: int) -> bool:
    """Whether (b Q_S)^T (a Q_A) (cost T (d_in^2 + d_out^2 + d_in d_out) per example) is cheaper
    than forming G = b^T a and rotating it (T d_in d_out + d_in d_out (d_in + d_out))."""
    return tokens * (d_in**2 + d_out**2) <= d_in * d_out * (d_in + d_out)


def eigenbasis_gradients(capture, gradient_basis, activation_basis) -> torch.Tensor:
    """Per-example layer gradients in the Kronecker eigenbasis, Q_S^T (b_n^T a_n) Q_A [N, d_out,
    d_in(+1)], by the cheaper route, in the capture's dtype (the bases are cast to it).

    ``capture`` has ``.a`` [N, T, d_in(+1)] and ``.b`` [N, T, d_out]; when it also has
    ``.gradients()`` (G_n computed without unfolding a conv's input) that serves the
    contract-first route. With few tokens the per-example gradient is never formed: it is
    (b Q_S)^T (a Q_A), a product of the rotated captures.
    """
    tokens, d_in, d_out = capture_dims(capture)
    if rotation_by_tokens_is_cheaper(tokens, d_in, d_out):
        a, b = capture.a, capture.b
        q_a, q_s = activation_basis.to(a.dtype), gradient_basis.to(b.dtype)
        return (b @ q_s).transpose(1, 2) @ (a @ q_a)
    # Many tokens (conv positions): contract to G_n first, then rotate the small matrix.
    grads = capture.gradients() if hasattr(capture, "gradients") else capture.b.mT @ capture.a
    q_a, q_s = activation_basis.to(grads.dtype), gradient_basis.to(grads.dtype)
    return q_s.T @ grads @ q_a


def capture_dims(capture) -> tuple[int, int, int]:
    """(T, d_in(+1), d_out) of a capture, from ``.dims`` when it has them (no unfolding)."""
    if hasattr(capture, "dims"):
        return capture.dims
    return capture.a.shape[1], capture.a.shape[2], capture.b.shape[2]


def finalize_ekfac_eigenvalues(
    factors: Mapping[str, KroneckerFactors], sums: Mapping[str, torch.Tensor]
) -> None:
    for name, f in factors.items():
        f.eigenvalues = sums[name] / f.count


def all_reduce_ekfac_sums(
    sums: Mapping[str, torch.Tensor], reduce_sum: Callable[[torch.Tensor], None]
) -> None:
    """Sum the EK-FAC eigenvalue sums over ranks, in place (layers in sorted order)."""
    for name in sorted(sums):
        reduce_sum(sums[name])


@dataclass
class DiagonalFactors:
    """A diagonal Fisher block for parameters outside Kronecker-factored layers (GroupNorm /
    LayerNorm affine parameters, a bias whose weight is not selected, ...).

    ``diagonal`` [numel] is (1/N) sum_n g_n^2 over the flat per-example gradients g_n of
    ``names`` (concatenated in that order; ``numels`` are their sizes): the Fisher restricted to
    its diagonal, which is also what EK-FAC's eigenvalue refit gives in the identity basis.
    Before :func:`finalize_diagonal_factors` it holds the running sum.
    """

    names: tuple[str, ...]
    numels: tuple[int, ...]
    diagonal: torch.Tensor
    count: int = 0

    @property
    def eigenvalues(self) -> torch.Tensor:
        return self.diagonal


def accumulate_diagonal_factors(
    factors: dict[str, DiagonalFactors],
    name: str,
    names: tuple[str, ...],
    numels: tuple[int, ...],
    grads: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
) -> None:
    """Add one batch's sum_n g_n^2 of the flat per-example gradients ``grads`` [N, numel] of
    ``names`` (sizes ``numels``) to the block ``name`` (created on first use)."""
    if name not in factors:
        factors[name] = DiagonalFactors(
            names, numels, grads.new_zeros(grads.shape[1], dtype=dtype), 0
        )
    factors[name].diagonal += grads.square().sum(0).to(dtype)
    factors[name].count += grads.shape[0]


def finalize_diagonal_factors(factors: Mapping[str, DiagonalFactors]) -> None:
    """Divide the accumulated sums by the number of examples."""
    for f in factors.values():
        if not torch.isfinite(f.diagonal).all():
            raise InfluxValueError(
                f"the diagonal Fisher of {list(f.names)} holds NaN / inf: some example has a "
                "non-finite input, loss or gradient; check the data and the model"
            )
        f.diagonal /= max(f.count, 1)


def all_reduce_factor_sums(
    kronecker: Mapping[str, KroneckerFactors],
    diagonal: Mapping[str, DiagonalFactors],
    reduce_sum: Callable[[torch.Tensor], None],
) -> None:
    """Sum the accumulated (not yet finalized) factors over ranks, in place.

    Factors are sums over examples, so the sums of disjoint shards, reduced, then finalized,
    equal the one-process fit (up to the order of float64 additions). ``reduce_sum`` is e.g.
    ``torch.distributed.all_reduce`` (sum); layers are visited in sorted order on every rank.
    """
    for name in sorted(kronecker):
        f = kronecker[name]
        count = torch.tensor([float(f.count)], dtype=torch.float64, device=f.activation.device)
        for tensor in (f.activation, f.gradient, count):
            reduce_sum(tensor)
        f.count = int(count.item())
    for name in sorted(diagonal):
        f = diagonal[name]
        count = torch.tensor([float(f.count)], dtype=torch.float64, device=f.diagonal.device)
        reduce_sum(f.diagonal)
        reduce_sum(count)
        f.count = int(count.item())


# --------------------------------------------------------------------------------------------------
# The true Fisher of softmax cross-entropy: Kronecker factors from labels drawn from the model
# --------------------------------------------------------------------------------------------------

# Layers whose weight gradient is b^T a per example (the engine's rules match exact types, so
# subclasses are not included). Grouped convolutions have no single Kronecker factorization.
FACTORED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
# Labels drawn per example for a sampled Fisher ('auto', see :func:`fisher_draws`): at most
# FISHER_DRAWS_TOTAL per pass over the data and MAX_FISHER_DRAWS per example, and more than one
# only while examples x forward multiply-adds per example x draws stays within FISHER_DRAWS_WORK.
FISHER_DRAWS_TOTAL = 8192
MAX_FISHER_DRAWS = 8
FISHER_DRAWS_WORK = 2**28


def is_factored(module: nn.Module) -> bool:
    """Whether ``module`` gets a Kronecker block (a Linear / Conv1d / Conv2d of one group)."""
    return type(module) in FACTORED_LAYERS and getattr(module, "groups", 1) == 1


def _multiply_adds_per_example(model: nn.Module, example: torch.Tensor) -> int:
    """Forward multiply-adds of ``model`` on one example (``example`` [1, ...]): every Linear /
    Conv output times the products it sums, and at least the parameter count (each parameter is
    used once per example). One forward pass under no_grad, the random state kept (Dropout)."""
    total = 0

    def count(module, _inputs, output) -> None:
        nonlocal total
        total += output.numel() * module.weight[0].numel()

    hooks = [
        module.register_forward_hook(count)
        for module in model.modules()
        if isinstance(module, FACTORED_LAYERS)
    ]
    devices = [example.device] if example.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return max(total, sum(p.numel() for p in model.parameters()))


def fisher_draws(option_value, examples: int, model: nn.Module, inputs: torch.Tensor) -> int:
    """Labels drawn per example and factor pass: ``option_value`` when it is a number; for 'auto'
    one, and more only where the extra passes over the data cost little.

    'auto' = ``min(MAX_FISHER_DRAWS, ceil(FISHER_DRAWS_TOTAL / examples), FISHER_DRAWS_WORK //
    (examples * m))``, at least 1, where m is the model's forward multiply-adds per example
    (counted on ``inputs[:1]``). Each draw costs two forward + backward passes over the data
    (factors and eigenvalue refit), about 6 m multiply-adds per example, so the draws of
    'auto' stay within about 6 x 2^28 = 1.6e9 multiply-adds: a second or so of one CPU core.

    Why (``benchmarks/results/ekfac_draws-cpu.md``; Spearman pooled over query x train pairs
    for 1 / 2 / 4 / 8 draws):

    - Multilayer perceptrons gain from every draw. digits MLP (1,600 train x 50 queries, 4,810
      parameters; two models, two label seeds each): against a 32-draw fit 0.71-0.72 /
      0.77-0.79 / 0.82 / 0.85; against the exact solve 0.338-0.361 / 0.354-0.384 / 0.359-0.391
      / 0.368-0.400, where Kronfluence's EK-FAC (one draw) reaches 0.236-0.243 at its default
      damping and 0.344-0.372 at influx's damping rule, so one draw would trail it at the same
      damping. 'auto' draws 6 (the 8,192-per-pass bound), for under 0.1 s more fit.
      With 256 hidden units (19,210 parameters), against a 32-draw fit: 0.56 / 0.58 / 0.63 /
      0.63; 'auto' draws 6.
    - Convolutional networks gain nothing measurable and pay two passes per draw. GroupNorm
      ResNet-8 on 1,000 CIFAR-shaped examples, against a 16-draw fit: width 8 (4.2M
      multiply-adds per example) 0.9985 / 0.9991 / 0.9995 / 0.9996 trained, 0.9991 / 0.9995 /
      0.9998 (1 / 2 / 4) after 8 Adam steps (mean top-class probability 0.12: the noisiest
      labels); width 16 (16M) against an 8-draw fit 0.9962 / 0.9980 (1 / 2). Kronfluence's
      fit + scores at its defaults is about three passes, and influx's with one draw about
      half its time: a second draw (two more passes) would cost more than the margin to 0.7x.
      'auto' draws 1 on every ResNet-8 of width >= 2 from 1,000 examples on.
    """
    if option_value != "auto":
        return int(option_value)
    by_noise = -(-FISHER_DRAWS_TOTAL // max(examples, 1))
    per_pass = max(examples, 1) * _multiply_adds_per_example(model, inputs[:1])
    return max(1, min(MAX_FISHER_DRAWS, by_noise, FISHER_DRAWS_WORK // per_pass))


def sample_labels(model: nn.Module, inputs: torch.Tensor, generator: torch.Generator, *,
                  draws: int = 1, offset: int = 0) -> torch.Tensor:  # fmt: skip
    """``draws`` class labels per example from softmax(model(inputs)), [draws, B] (int64, on the
    inputs' device), from one forward pass. Drawn in float64 on the CPU ``generator`` (the same
    labels on every device); NaN / inf outputs are refused naming the example (``offset`` is the
    batch's position in the data)."""
    with torch.no_grad():
        logits = model(inputs)
    check_finite(logits.detach(), "model outputs", offset=offset)
    probabilities = torch.softmax(logits.to(device="cpu", dtype=torch.float64), dim=-1)
    sampled = torch.multinomial(probabilities, draws, replacement=True, generator=generator).T
    return sampled.to(inputs.device)


def fit_sampled_kronecker_factors(
    model: nn.Module,
    loss_fn,
    data,
    *,
    batch_size: int,
    seed: int,
    eigen_corrected: bool,
    draws="auto",
) -> dict[str, KroneckerFactors]:
    """K-FAC (or EK-FAC) factors of the Fisher of softmax cross-entropy over the inputs of
    ``data`` (its labels are not used), from labels drawn from the model.

    Every trainable Linear / Conv layer of one group (:func:`is_factored`) gets a block over its
    weight and, when trainable, its bias; other parameters get none. ``draws`` labels are drawn
    per example (:func:`fisher_draws`) by :func:`sample_labels` on one generator seeded by
    ``seed``, batch by batch as ``data`` streams; the factors are means over examples and draws.
    The EK-FAC eigenvalues are refitted in a second pass on fresh draws: refitted on the draws
    that chose the eigenbasis they would re-measure those draws' noise (a sample covariance's
    eigenvalues are spread wider than the Fisher's). ``loss_fn`` must be per-example softmax
    cross-entropy; the factors are held in float64.
    """
    covered = [
        f"{name}.{leaf}" if name else leaf
        for name, module in model.named_modules()
        if is_factored(module)
        for leaf, parameter in module.named_parameters(recurse=False)
        if leaf in ("weight", "bias") and parameter.requires_grad
    ]
    factors: dict[str, KroneckerFactors] = {}
    if not covered:
        return factors
    generator = torch.Generator().manual_seed(seed)
    per_example = None  # set at the first batch: fisher_draws runs the model on one example

    def passes():
        """(offset, inputs, drawn labels) for every batch and draw: fresh draws each pass."""
        nonlocal per_example
        start = 0
        for x, _, _ in iter_batches(data, batch_size):
            if per_example is None:
                per_example = fisher_draws(draws, num_examples(data), model, x)
            for labels in sample_labels(model, x, generator, draws=per_example, offset=start):
                yield start, x, labels
            start += x.shape[0]

    def captures(x, labels, start):
        return capture_matmul_layers(model, loss_fn, x, labels, params=covered, offset=start)

    for start, x, labels in passes():
        accumulate_kronecker_factors(factors, captures(x, labels, start))
    for f in factors.values():  # sums over examples and draws -> sums over examples
        f.activation, f.gradient = f.activation / per_example, f.gradient / per_example
        f.count //= per_example
    finalize_kronecker_factors(factors)
    if eigen_corrected:
        sums: dict[str, torch.Tensor] = {}
        for start, x, labels in passes():
            accumulate_ekfac_eigenvalues(factors, captures(x, labels, start), sums)
        finalize_ekfac_eigenvalues(factors, {k: v / per_example for k, v in sums.items()})
    return factors
