"""Curvature products on flat parameter vectors: gradients, Hessian- and GGN-vector products.

Everything here is matrix-free: a Hessian is never formed unless asked for explicitly
(:func:`dense_hessian`, for small models and tests). Products use forward-over-reverse
(``jvp`` of ``grad``), which costs about two backward passes per vector and vmaps over a
block of vectors.

Conventions: ``batch`` is ``(inputs, targets)``; the objective is the *mean* per-example loss over
the batch unless ``reduction="sum"``; vectors are flat over the selected parameters in the order
of :attr:`ParamSpace.names`: ``model.named_parameters()`` order when ``params`` is None, the
caller's order when ``params`` names them. The public products refuse an empty batch, NaN / inf
inputs or targets (naming the examples) and BatchNorm in train mode before any work.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.func
from torch import nn
from torch.func import functional_call, grad, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from influx.checks import check_damping, check_integer
from influx.errors import InfluxValueError
from influx.grads.common import (
    LossFn,
    check_batch,
    check_finite,
    check_model,
    check_per_example_losses,
    fixed_state,
    select_parameters,
)


def jvp(func, primals, tangents):
    """``torch.func.jvp``, without the FutureWarning torch raises on its own first use of it.

    On the first forward-mode product torch compiles its decompositions with
    ``torch.jit.script``, which recent versions deprecate with a warning the user can do nothing
    about; they are compiled here once with that warning silenced.
    """
    _load_forward_ad_decompositions()
    return torch.func.jvp(func, primals, tangents)


@functools.cache
def _load_forward_ad_decompositions() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
        )
        zero = torch.zeros(1, device="cpu")
        torch.func.jvp(torch.neg, (zero,), (zero,))


@dataclass(frozen=True)
class ParamSpace:
    """The flat coordinate system of a set of named parameters (P = total numel).

    ``names`` fixes the order of the blocks of a flat vector: ``model.named_parameters()`` order
    for the trainable parameters (``params=None``), else the order in which ``params`` names them.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module, params: Iterable[str] | None = None) -> ParamSpace:
        selected = select_parameters(model, params)
        return cls(tuple(selected), tuple(p.shape for p in selected.values()))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """name -> [..., *shape] (common leading dims) to [..., P]."""
        parts = []
        for name, shape in zip(self.names, self.shapes):
            t = tensors[name]
            lead = t.shape[: t.dim() - len(shape)]
            parts.append(t.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """[..., P] to name -> [..., *shape] (views)."""
        if vector.shape[-1] != self.size:
            raise InfluxValueError(
                f"vector has {vector.shape[-1]} entries; the parameters have {self.size}"
            )
        lead = vector.shape[:-1]
        pieces = torch.split(vector, self.numels, dim=-1)
        # One shape tuple: a 0-dim parameter of an unbatched vector has no dims at all.
        return {n: p.reshape((*lead, *s)) for n, p, s in zip(self.names, pieces, self.shapes)}

    def current(self, model: nn.Module) -> torch.Tensor:
        """The model's present values of these parameters as one detached flat vector [P]."""
        named = dict(model.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.names])


def batch_objective(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    params: Iterable[str] | None = None,
    reduction: str = "mean",
) -> tuple[Callable[[torch.Tensor], torch.Tensor], ParamSpace]:
    """Return ``f(theta_flat) -> scalar loss of the batch`` and the flat space of ``theta``.

    Parameters outside the selection and buffers are held fixed at their current values.
    """
    check_reduction(reduction)
    space = ParamSpace.of(model, params)
    inputs, targets = batch
    fixed = fixed_state(model, space.names)

    def objective(theta: torch.Tensor) -> torch.Tensor:
        out = twice_differentiable_call(model, {**fixed, **space.unflatten(theta)}, inputs)
        losses = loss_fn(out, targets)
        check_per_example_losses(losses, inputs.shape[0])
        return losses.mean() if reduction == "mean" else losses.sum()

    return objective, space


def check_reduction(reduction: str) -> None:
    """The objective is the mean or the sum of the per-example losses; anything else is refused."""
    if reduction not in ("mean", "sum"):
        raise InfluxValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")


def check_curvature_batch(model: nn.Module, batch) -> None:
    """The checks of a public product, before any work: the model (BatchNorm in train mode),
    a non-empty batch whose inputs and targets agree on its size, and finite values in both."""
    check_model(model)
    inputs, targets = batch
    check_batch(inputs, targets)
    if inputs.shape[0] == 0:
        raise InfluxValueError("batch is empty; pass at least one example")
    check_finite(inputs, "inputs")
    if isinstance(targets, torch.Tensor):
        check_finite(targets, "targets")


def twice_differentiable_call(model: nn.Module, state: Mapping, inputs: torch.Tensor):
    """``functional_call(model, state, (inputs,))`` with attention on torch's math kernel.

    Curvature products differentiate the forward twice (forward over reverse, or reverse over
    reverse). torch's fused attention kernels support neither (no forward-mode derivative, no
    double backward on the CPU's flash kernel), nor does the fused inference path of
    ``nn.TransformerEncoderLayer`` (which parameters swapped in by torch.func can trigger in eval
    mode), so a transformer's objective would fail there; the math kernel computes the same
    attention from differentiable operations.
    """
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            return functional_call(model, state, (inputs,))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def gradient(model, loss_fn, batch, *, params=None, reduction="mean", theta=None) -> torch.Tensor:
    """Flat gradient [P] of the batch objective at ``theta`` (default: current parameters)."""
    check_curvature_batch(model, batch)
    objective, space = batch_objective(model, loss_fn, batch, params=params, reduction=reduction)
    theta = space.current(model) if theta is None else theta
    return grad(objective)(theta)


def hvp(
    model, loss_fn, batch, vectors, *, params=None, reduction="mean", theta=None
) -> torch.Tensor:
    """Hessian-vector products H v of the batch objective; ``vectors`` is [P] or [K, P].

    Forward-over-reverse: ``jvp(grad(f), theta, v)``; a block of K vectors is vmapped.
    """
    check_curvature_batch(model, batch)
    return _hvp(model, loss_fn, batch, vectors, params=params, reduction=reduction, theta=theta)


def _hvp(model, loss_fn, batch, vectors, *, params, reduction, theta) -> torch.Tensor:
    objective, space = batch_objective(model, loss_fn, batch, params=params, reduction=reduction)
    theta = space.current(model) if theta is None else theta

    def single(v: torch.Tensor) -> torch.Tensor:
        return jvp(grad(objective), (theta,), (v,))[1]

    return single(vectors) if vectors.dim() == 1 else vmap(single)(vectors)


def ggn_vp(
    model, loss_fn, batch, vectors, *, params=None, reduction="mean", theta=None
) -> torch.Tensor:
    """Generalized Gauss-Newton products G v = J^T H_out J v; ``vectors`` is [P] or [K, P].

    J is the Jacobian of the model outputs w.r.t. the parameters and H_out the Hessian of the
    loss w.r.t. the outputs; G is positive semi-definite for convex losses (cross-entropy, MSE).
    """
    check_reduction(reduction)
    check_curvature_batch(model, batch)
    return _ggn_vp(model, loss_fn, batch, vectors, params=params, reduction=reduction, theta=theta)


def _ggn_vp(model, loss_fn, batch, vectors, *, params, reduction, theta) -> torch.Tensor:
    space = ParamSpace.of(model, params)
    inputs, targets = batch
    theta = space.current(model) if theta is None else theta
    fixed = fixed_state(model, space.names)
    scale = 1.0 / inputs.shape[0] if reduction == "mean" else 1.0

    def outputs_of(t: torch.Tensor) -> torch.Tensor:
        return twice_differentiable_call(model, {**fixed, **space.unflatten(t)}, inputs)

    def output_loss(out: torch.Tensor) -> torch.Tensor:
        return loss_fn(out, targets).sum() * scale

    out, pullback = vjp(outputs_of, theta)

    def single(v: torch.Tensor) -> torch.Tensor:
        _, jv = jvp(outputs_of, (theta,), (v,))
        _, hjv = jvp(grad(output_loss), (out.detach(),), (jv,))
        return pullback(hjv)[0]

    return single(vectors) if vectors.dim() == 1 else vmap(single)(vectors)


def dense_hessian(
    model, loss_fn, batch, *, params=None, reduction="mean", theta=None, kind="hessian"
):
    """The full P x P Hessian (``kind="hessian"``) or GGN (``kind="ggn"``): small models only."""
    product = {"hessian": _hvp, "ggn": _ggn_vp}.get(kind)
    if product is None:
        raise InfluxValueError(f"kind must be 'hessian' or 'ggn'; got {kind!r}")
    check_reduction(reduction)
    check_curvature_batch(model, batch)
    space = ParamSpace.of(model, params)
    theta = space.current(model) if theta is None else theta
    eye = torch.eye(space.size, dtype=theta.dtype, device=theta.device)
    columns = [
        product(model, loss_fn, batch, block, params=params, reduction=reduction, theta=theta)
        for block in eye.split(256)
    ]
    matrix = torch.cat(columns)
    return 0.5 * (matrix + matrix.T)


# --------------------------------------------------------------------------------------------------
# Spectrum, damping and the checks that go with it
# --------------------------------------------------------------------------------------------------


class CurvatureWarning(UserWarning):
    """Base category of the warnings about a curvature matrix (filter them all at once)."""


class NonPositiveDefiniteWarning(CurvatureWarning):
    """The damped curvature has non-positive eigenvalues: its inverse flips signs there."""


class IllConditionedWarning(CurvatureWarning):
    """The damped curvature is so ill-conditioned that solves with it lose most of their digits."""


# Relative damping used by every estimator when ``damping="auto"``: a tenth of the mean eigenvalue
# (tr(H) / P) of the curvature, the heuristic of EK-FAC implementations (George et al. 2018,
# Kronfluence). It is scale-free: multiplying the loss by c multiplies H and the damping by c, so
# scores only rescale. For an indefinite H (a Hessian away from a minimum: the digits-MLP has 1,405
# of 4,810 eigenvalues in [-8e-4, 0)) the damping is raised by |lambda_min| first, so the smallest
# damped eigenvalue is that tenth of the mean: H + damping I is positive definite and its condition
# number is at most 10 * lambda_max * P / tr(H) + 1.
DEFAULT_RELATIVE_DAMPING = 0.1
# Condition number above which a warning is raised: float64 solves keep about 16 - log10(cond)
# digits, float32 about 7 - log10(cond); beyond 1e7 a float32 solve has no digit left.
ILL_CONDITIONED_ABOVE = 1e7


@dataclass(frozen=True)
class Spectrum:
    """What an estimator knows of the spectrum of a P x P curvature matrix.

    ``mean`` is tr(H) / P; ``minimum`` / ``maximum`` are the extreme eigenvalues (exact, or
    estimated by Lanczos: see :func:`estimate_spectrum`); ``negative`` counts eigenvalues < 0
    (None if unknown); ``steps`` / ``resolved``: the Lanczos steps of an estimate and whether
    they resolved the extremes.
    """

    mean: float
    maximum: float
    minimum: float | None = None
    negative: int | None = None
    size: int | None = None
    steps: int | None = None
    resolved: bool | None = None

    def __repr__(self) -> str:
        parts = [f"mean={self.mean:.3e}", f"max={self.maximum:.3e}"]
        if self.minimum is not None:
            parts.append(f"min={self.minimum:.3e}")
        if self.negative is not None:
            parts.append(f"negative={self.negative}/{self.size}")
        if self.steps is not None:
            parts.append(f"steps={self.steps}{'' if self.resolved else ' (unresolved)'}")
        return f"Spectrum({', '.join(parts)})"

    @classmethod
    def of_eigenvalues(cls, eigenvalues: torch.Tensor) -> Spectrum:
        ev = eigenvalues.detach().to(torch.float64)
        return cls(
            mean=float(ev.mean()),
            maximum=float(ev.max()),
            minimum=float(ev.min()),
            negative=int((ev < 0).sum()),
            size=int(ev.numel()),
        )


def resolve_damping(
    damping: float | str, spectrum: Spectrum, *, relative: float = DEFAULT_RELATIVE_DAMPING
) -> float:
    """The damping to add to the curvature: a number as given, or ``"auto"``.

    ``"auto"`` is ``max(0, -lambda_min) + relative * tr(H) / P`` (see
    :data:`DEFAULT_RELATIVE_DAMPING`): the spectrum is shifted to be positive, then damped by a
    tenth of its mean eigenvalue. A mean eigenvalue <= 0 leaves nothing to scale from, so
    ``|max eigenvalue| * relative`` is used.
    """
    damping = check_damping(damping)
    if damping == "auto":
        scale = spectrum.mean if spectrum.mean > 0 else abs(spectrum.maximum)
        shift = max(0.0, -spectrum.minimum) if spectrum.minimum is not None else 0.0
        return float(shift + relative * scale)
    return damping


def check_damped_spectrum(spectrum: Spectrum, damping: float, *, what: str = "curvature") -> None:
    """Warn when ``H + damping I`` is not positive definite or is badly conditioned."""
    if spectrum.minimum is None:
        return
    low, high = spectrum.minimum + damping, spectrum.maximum + damping
    if low <= 0:
        count = (
            f"{spectrum.negative} of {spectrum.size} eigenvalues are negative; "
            if spectrum.negative
            else ""
        )
        warnings.warn(
            f"the damped {what} is not positive definite: {count}smallest eigenvalue {spectrum.minimum:.3e} "
            f"+ damping {damping:.3e} = {low:.3e} <= 0, so its inverse flips the sign of scores along "
            f"those directions; pass damping > {-spectrum.minimum:.3e} or curvature='ggn' "
            "(positive semi-definite for convex losses)",
            NonPositiveDefiniteWarning,
            stacklevel=3,
        )
        return
    condition = high / low
    if condition > ILL_CONDITIONED_ABOVE:
        warnings.warn(
            f"the damped {what} is ill-conditioned: condition number {condition:.2e} > "
            f"{ILL_CONDITIONED_ABOVE:.0e} (eigenvalues {low:.3e} .. {high:.3e}); increase damping "
            f"(e.g. damping={high / 1e6:.3e} gives 1e6)",
            IllConditionedWarning,
            stacklevel=3,
        )


def power_iteration(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    *,
    iterations: int = 50,
    shift: float = 0.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> float:
    """Largest-magnitude eigenvalue of ``matvec - shift I`` (then + shift) by power iteration.

    With ``shift = lambda_max`` it returns the smallest eigenvalue of a symmetric operator.
    Rayleigh quotients converge quadratically in the eigenvector error, so 50 steps are plenty
    for damping and step-size choices (which need the order of magnitude, not the digits).
    The start vector is drawn on the CPU (the same on every device), then moved to ``device``.
    """
    v = torch.randn(size, generator=generator, dtype=dtype, device="cpu").to(device)
    v = v / v.norm()
    value = 0.0
    for _ in range(iterations):
        w = matvec(v) - shift * v
        value = float(v @ w)
        norm = w.norm()
        if norm == 0:
            break
        v = w / norm
    return value + shift


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


def hutchinson_trace(
    matvec_block: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    *,
    samples: int = 32,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> float:
    """Unbiased estimate of tr(H) with Rademacher probes; ``matvec_block`` maps [K, P] -> [K, P].

    Probes are drawn on the CPU (the same on every device), then moved to ``device``.
    """
    probes = torch.randint(0, 2, (samples, size), generator=generator, device="cpu")
    probes = probes.to(device=device, dtype=dtype) * 2 - 1
    return float((probes * _finite_product(matvec_block, probes)).sum() / samples)


def _finite_product(matvec_block, vectors: torch.Tensor) -> torch.Tensor:
    """``matvec_block(vectors)``, refusing NaN / inf (they would poison every later estimate)."""
    product = matvec_block(vectors)
    if not torch.isfinite(product).all():
        raise InfluxValueError(
            "a curvature-vector product is NaN or inf: some training example has a non-finite "
            "input, loss or gradient, or the parameters hold NaN / inf; check the data and the model"
        )
    return product


# An off-diagonal beta this small relative to the largest |alpha| or beta so far is round-off of
# an exhausted Krylov space (an invariant subspace was found).
BREAKDOWN = 1e-12


def check_steps(iterations, name: str = "iterations") -> int:
    return check_integer(name, iterations, minimum=1, hint="Lanczos steps to take")


class LanczosProcess:
    """Lanczos on a symmetric operator (``matvec_block`` maps [K, P] -> [K, P]), one step at a
    time, with full reorthogonalization; the Ritz pairs of the steps so far on demand.

    The extreme Ritz values converge first, far faster than power iteration. A Ritz value theta
    with Ritz vector y has residual ||H y - theta y|| = |beta_m s_m| (beta_m the next off-diagonal,
    s_m the last entry of its eigenvector of the tridiagonal matrix): some eigenvalue of H lies
    within it. The start vector is drawn on the CPU (the same on every device); the basis lives on
    ``device`` and grows with the steps taken (memory: steps x P values of ``dtype``).
    """

    CHUNK = 32  # basis rows allocated at a time

    def __init__(
        self,
        matvec_block: Callable[[torch.Tensor], torch.Tensor],
        size: int,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ):
        self.matvec_block, self.size, self.dtype, self.device = matvec_block, size, dtype, device
        generator = torch.Generator().manual_seed(seed)
        v = torch.randn(size, generator=generator, dtype=dtype, device="cpu").to(device)
        self.next = v / v.norm()
        self.basis = torch.zeros(0, size, dtype=dtype, device=device)
        self.alphas: list[float] = []
        self.betas: list[float] = []  # betas[j] couples steps j and j + 1
        self.scale = 0.0  # largest |alpha| or beta so far: a lower bound on ||H||
        self.exhausted = False  # an invariant subspace was found: the Ritz values are exact

    @property
    def steps(self) -> int:
        return len(self.alphas)

    def step(self) -> bool:
        """One more Lanczos step; False (and nothing done) once the Krylov space is exhausted."""
        if self.exhausted or self.steps >= self.size:
            return False
        j = self.steps
        if j == self.basis.shape[0]:
            grown = self.basis.new_zeros(j + self.CHUNK, self.size)
            grown[:j] = self.basis
            self.basis = grown
        v = self.next
        self.basis[j] = v
        w = _finite_product(self.matvec_block, v.unsqueeze(0))[0].to(self.dtype)
        alpha = float(w @ v)
        # Full reorthogonalization (twice is enough): Lanczos vectors lose orthogonality fast.
        for _ in range(2):
            w -= self.basis[: j + 1].T @ (self.basis[: j + 1] @ w)
        beta = float(w.norm())
        self.alphas.append(alpha)
        self.betas.append(beta)
        # Breakdown is judged against the operator's own scale, so that a curvature of norm 1e-13
        # is explored as far as one of norm 1 (a zero operator breaks down at once: 0 <= 0).
        self.scale = max(self.scale, abs(alpha), beta)
        if beta <= BREAKDOWN * self.scale or j + 1 == self.size:
            self.exhausted = True
        else:
            self.next = w / beta
        return True

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ritz values [m] (ascending), their residual norms [m], and their eigenvectors of the
        tridiagonal matrix [m, m] (Ritz vectors are ``basis[:m].T @ those``)."""
        m = self.steps
        tridiagonal = torch.diag(torch.tensor(self.alphas, dtype=self.dtype, device=self.device))
        if m > 1:
            off = torch.tensor(self.betas[: m - 1], dtype=self.dtype, device=self.device)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        last = 0.0 if self.exhausted else self.betas[m - 1]
        return values, (last * vectors[-1]).abs(), vectors

    def ritz_vectors(self, coefficients: torch.Tensor) -> torch.Tensor:
        return self.basis[: self.steps].T @ coefficients


def lanczos(
    matvec_block: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    *,
    iterations: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz pairs (values [m], vectors [P, m]) of ``m <= iterations`` Lanczos steps on a symmetric
    operator (``matvec_block`` maps [K, P] -> [K, P]); see :class:`LanczosProcess`."""
    check_steps(iterations)
    process = LanczosProcess(matvec_block, size, seed=seed, dtype=dtype, device=device)
    while process.steps < iterations and process.step():
        pass
    values, _, vectors = process.ritz()
    return values, process.ritz_vectors(vectors)


# Lanczos steps at most for the extreme eigenvalues, the residual (relative to the damping it
# implies) at which they count as resolved, and how often that is checked. On digits-MLP Hessians
# (a cluster of ~1,400 eigenvalues in [-1e-3, 0) below a spectrum that reaches 1.7) the smallest
# Ritz value needs 100-150 steps to resolve lambda_min within a few percent; 30 steps leave it at
# -2e-5, so 'auto' damping left H + damping I indefinite. The residual tracks the error from
# above (3-10x its size there), so a 5% residual leaves the damping within ~1% of its value at
# the true lambda_min. A small residual alone is not enough: it bounds the distance to *some*
# eigenvalue, and a Ritz value can settle on lambda_2 while lambda_min, whose eigenvector the start
# vector barely touches, has not yet entered the Krylov space (a 66-parameter tanh MLP: residual
# 2.7e-2 at -1.222 after 10 steps, lambda_min -1.312 appearing from step 14). So the extremes
# must also have stopped moving over the last SPECTRUM_CHECK_EVERY steps.
SPECTRUM_STEPS = 300
SPECTRUM_TOLERANCE = 0.05
SPECTRUM_CHECK_EVERY = 10


def estimate_spectrum(
    matvec_block: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    *,
    iterations: int = SPECTRUM_STEPS,
    tolerance: float = SPECTRUM_TOLERANCE,
    trace_samples: int = 32,
    relative: float = DEFAULT_RELATIVE_DAMPING,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Spectrum:
    """Mean eigenvalue tr(H) / P (Hutchinson, one block of probes) and extreme eigenvalues
    (Lanczos, run until they are resolved, at most ``iterations`` steps).

    Lanczos' smallest Ritz value theta lies *above* lambda_min, and on an indefinite Hessian with
    a cluster of small negative eigenvalues it gets there slowly. Every
    :data:`SPECTRUM_CHECK_EVERY` steps the extremes count as resolved when (1) the smallest Ritz
    value's residual r is at most ``tolerance`` times the damping it implies,
    ``max(0, -theta) + relative * tr(H) / P`` (the ``"auto"`` rule), and the largest Ritz value's
    residual at most ``tolerance`` times that value, and (2) since the previous check neither
    extreme Ritz value moved by more than those same amounts. A residual only bounds the distance
    to *some* eigenvalue; (2) catches a Ritz value resting on lambda_2 while lambda_min is still
    emerging. It is evidence, not proof: no Krylov method sees an eigenvector its start vector
    is (nearly) orthogonal to, so lambda_min may still lie lower, and the iterative solvers raise
    the damping when they meet negative curvature. The reported extremes carry the residual as a
    safety margin: ``minimum = theta_min - r_min`` when theta_min < 0 (a negative Ritz value
    proves H indefinite), ``maximum = theta_max + r_max``. ``steps`` says how many were taken;
    ``resolved`` whether the criterion was met (otherwise a :class:`CurvatureWarning`).
    """
    check_steps(iterations)
    generator = torch.Generator().manual_seed(seed + 1)
    trace = hutchinson_trace(
        matvec_block, size, samples=trace_samples, generator=generator, dtype=dtype, device=device
    )
    mean = trace / size
    process = LanczosProcess(matvec_block, size, seed=seed, dtype=dtype, device=device)
    resolved, previous = False, None
    while process.steps < iterations and process.step():
        if process.steps % SPECTRUM_CHECK_EVERY and not process.exhausted:
            continue
        values, residuals, _ = process.ritz()
        low, high = float(values[0]), float(values[-1])
        scale = mean if mean > 0 else abs(high)
        low_tolerance = tolerance * (max(0.0, -low) + relative * scale)
        high_tolerance = tolerance * abs(high)
        small = float(residuals[0]) <= low_tolerance and float(residuals[-1]) <= high_tolerance
        # The Ritz values move outwards only: low down towards lambda_min, high up to lambda_max.
        settled = previous is not None and (
            previous[0] - low <= low_tolerance and high - previous[1] <= high_tolerance
        )
        resolved = process.exhausted or (small and settled)
        if resolved:
            break
        previous = (low, high)
    values, residuals, _ = process.ritz()
    low, high = float(values[0]), float(values[-1])
    if not resolved:
        warnings.warn(
            f"Lanczos did not resolve the extreme eigenvalues in {process.steps} steps (smallest "
            f"Ritz value {low:.3e}, residual {float(residuals[0]):.1e}): lambda_min may lie "
            "lower, so 'auto' damping may be too small (the solvers raise it if they meet "
            "non-positive curvature); raise spectrum_iterations or pass damping explicitly",
            CurvatureWarning,
            stacklevel=3,
        )
    return Spectrum(
        mean=mean,
        maximum=high + float(residuals[-1]),
        minimum=low - float(residuals[0]) if low < 0 else low,
        size=size,
        steps=process.steps,
        resolved=resolved,
    )


# --------------------------------------------------------------------------------------------------
# K-FAC and EK-FAC factors from captured layer inputs a and output gradients b
# --------------------------------------------------------------------------------------------------


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
