"""The spectrum of a curvature operator: extreme eigenvalues, trace, and the damping they imply.

One power iteration (:func:`power_iteration`, and :func:`largest_eigenvalue` on its norm ratio),
one Lanczos (:class:`LanczosProcess`, :func:`lanczos`, and :func:`estimate_spectrum` run until the
extremes are resolved), Hutchinson's trace estimate, the ``'auto'`` damping rule
(:func:`resolve_damping`) and the warnings about a damped curvature that is not positive definite
or is badly conditioned. Operators are matrix-free: ``matvec_block`` maps a block of flat vectors
[K, P] to their products [K, P]; random starts and probes are drawn on the CPU, so a seed gives
the same numbers on every device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from influx.checks import check_choice, check_damping, check_integer
from influx.errors import InfluxValueError

__all__ = [
    "BREAKDOWN",
    "DEFAULT_RELATIVE_DAMPING",
    "ILL_CONDITIONED_ABOVE",
    "SPECTRUM_CHECK_EVERY",
    "SPECTRUM_STEPS",
    "SPECTRUM_TOLERANCE",
    "CurvatureWarning",
    "IllConditionedWarning",
    "LanczosProcess",
    "NonPositiveDefiniteWarning",
    "Spectrum",
    "check_damped_spectrum",
    "check_steps",
    "estimate_spectrum",
    "hutchinson_trace",
    "lanczos",
    "largest_eigenvalue",
    "power_iteration",
    "resolve_damping",
]


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
    start: torch.Tensor | None = None,
    quotient: str = "rayleigh",
) -> float | torch.Tensor:
    """Largest-magnitude eigenvalue of ``matvec - shift I`` (then + shift) by power iteration.

    ``quotient="rayleigh"`` reads it from the Rayleigh quotient v^T M v of the unit iterate v
    (symmetric operators; signed). With ``shift = lambda_max`` it returns the smallest eigenvalue.
    Rayleigh quotients converge quadratically in the eigenvector error, so 50 steps are plenty
    for damping and step-size choices (which need the order of magnitude, not the digits).
    ``quotient="norm"`` reads |mu_max| from the norm ratio ||M v|| instead, which needs no
    symmetry (no shift then).

    The start is ``start``, or a vector [P] drawn from ``generator`` on the CPU (the same on every
    device), then moved to ``device``. A start [N, P] runs N power iterations at once: ``matvec``
    maps [N, P] to [N, P] row by row (one operator for every row, or one per row, such as a
    vmapped per-example Hessian) and the result is a tensor [N]; otherwise it is a float. A row
    whose product is 0 stays 0 (its value is 0 + shift).
    """
    check_choice("quotient", quotient, ("rayleigh", "norm"))
    if quotient == "norm" and shift != 0:
        raise InfluxValueError(f"quotient='norm' takes no shift; got shift={shift!r}")
    if start is None:
        start = torch.randn(size, generator=generator, dtype=dtype, device="cpu").to(device)
    v = start / start.norm(dim=-1, keepdim=True)
    tiny = torch.finfo(v.dtype).tiny
    values = v.new_zeros(v.shape[:-1])
    for _ in range(iterations):
        w = matvec(v)
        if shift:
            w = w - shift * v
        norms = w.norm(dim=-1, keepdim=True)
        if quotient == "norm":
            values = norms[..., 0]
        else:
            values = v @ w if v.dim() == 1 else (v * w).sum(-1)
        v = w / norms.clamp_min(tiny)
    if values.dim() == 0:
        return float(values) + shift
    return values + shift


def largest_eigenvalue(
    matvec, size: int, *, iterations: int, seed: int, dtype, device: torch.device | str = "cpu"
) -> float:
    """|mu_max| of a (possibly non-symmetric) operator on [K, P] rows: :func:`power_iteration` on
    the norm ratio ||M v|| / ||v||, which, unlike the Rayleigh quotient, needs no symmetry, from
    a start drawn with ``seed`` on the CPU (the same on every device)."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(1, size, generator=generator, dtype=dtype, device="cpu").to(device)
    top = power_iteration(matvec, size, iterations=iterations, start=start, quotient="norm")
    return float(top[0])


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
