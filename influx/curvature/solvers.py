"""Iterative solvers of damped curvature systems (A + damping I) X^T = RHS^T on flat vectors.

``operator`` maps a block of rows [M, P] to their products [M, P] (a Hessian- or GGN-vector
product over a data set, a dense matrix in tests); every right-hand side is a row and is solved
on its own. Both solvers detect an indefinite A + damping I from the directions they meet and
raise :class:`NegativeCurvature`; :func:`solve_with_positive_damping` turns that into a raised
damping, a warning and a fresh solve.

* :func:`conjugate_gradients`: (preconditioned) CG, exact in at most P iterations on a positive
  definite system; the one CG, used by the ``cg`` influence estimator and by Newton removal.
* :func:`lissa`: the Neumann series of Agarwal et al. (2017), i.e. Richardson iteration.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from influx.curvature.spectrum import DEFAULT_RELATIVE_DAMPING, NonPositiveDefiniteWarning
from influx.errors import InfluxRuntimeError, InfluxValueError

__all__ = [
    "DIVERGENCE_GROWTH",
    "MAX_DAMPING_RAISES",
    "NegativeCurvature",
    "conjugate_gradients",
    "lissa",
    "solve_with_positive_damping",
]

# Damping raises (each by at least the 'auto' margin) before a solver gives up.
MAX_DAMPING_RAISES = 20
# lissa stops as diverging when a step grows this many times past the smallest step so far.
DIVERGENCE_GROWTH = 1e3


class NegativeCurvature(InfluxRuntimeError):
    """A solver met a direction v with v^T (H + damping I) v <= 0: H + damping I is indefinite.

    ``rayleigh`` is the least v^T H v / v^T v over the directions met (<= -damping, and an upper
    bound on lambda_min(H)); ``iteration`` the iteration that met it.
    """

    def __init__(self, rayleigh: float, damping: float, iteration: int):
        super().__init__(
            f"non-positive curvature at iteration {iteration}: v^T H v / v^T v = {rayleigh:.3e} "
            f"<= -damping = {-damping:.3e}"
        )
        self.rayleigh, self.damping, self.iteration = rayleigh, damping, iteration


def _least_rayleigh(vectors, products, bad, damping: float) -> float:
    """min over the rows in ``bad`` of v^T H v / v^T v, from products (H + damping I) v."""
    quotients = (vectors * products).sum(1) / (vectors * vectors).sum(1)
    return float(quotients[bad].min()) - damping


def conjugate_gradients(
    operator,
    rhs: torch.Tensor,
    *,
    damping: float,
    max_iterations: int,
    tolerance: float,
    preconditioner=None,
):
    """Solve (A + damping I) X^T = RHS^T for every row of ``rhs`` [M, P]; returns (X, iterations,
    residual): ``iterations`` operator calls (at most ``max_iterations``; 0 when every row of
    ``rhs`` is 0) and the largest relative residual ||r|| / ||rhs|| left.

    Each row runs its own (preconditioned) CG with its own step sizes; a row stops once its
    relative residual is at most ``tolerance`` and is frozen while the others go on. A search direction p with p^T (A + damping I) p <= 0 proves A + damping I indefinite
    (CG's pivots are those of the Lanczos tridiagonal matrix, so this is met as soon as the
    Krylov space holds a negative Ritz value): :class:`NegativeCurvature` is raised, carrying the
    Rayleigh quotient of A along p (see :func:`solve_with_positive_damping`).
    """
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    # Preconditioned CG: z = M^-1 r; without a preconditioner z = r and this is plain CG.
    apply = preconditioner if preconditioner is not None else (lambda v: v)
    z = apply(r)
    p = z.clone()
    rs = (r * z).sum(1)
    norms = rhs.norm(dim=1)
    active = norms > 0  # a zero right-hand side is solved by x = 0
    norms = norms.clamp_min(torch.finfo(rhs.dtype).tiny)
    iterations = 0  # operator calls, each on every active row
    while iterations < max_iterations and active.any():
        iterations += 1
        ap = operator(p) + damping * p
        curvature = (p * ap).sum(1)
        bad = active & (curvature <= 0)
        if bad.any():
            raise NegativeCurvature(_least_rayleigh(p, ap, bad, damping), damping, iterations)
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
    1 - mu_min / scale per iteration; the residual is updated with the product of the step (one
    operator call per iteration). The steps concentrate on the slowest modes, those nearest 0 or
    below it, so a step s with s^T (A + damping I) s <= 0 is how an indefinite A + damping I shows:
    :class:`NegativeCurvature` is raised, as in :func:`conjugate_gradients`. A step that grows
    :data:`DIVERGENCE_GROWTH`-fold (``scale`` below the largest eigenvalue) raises an
    :class:`InfluxRuntimeError`. Returns (X, iterations).
    """
    apply = preconditioner if preconditioner is not None else (lambda v: v)
    estimate = torch.zeros_like(rhs)
    residual = rhs.clone()
    smallest = float("inf")
    iterations = 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007 - returned after the loop
        step = apply(residual) / scale
        product = operator(step) + damping * step
        bad = ((step * product).sum(1) <= 0) & ((step * step).sum(1) > 0)
        if bad.any():
            raise NegativeCurvature(
                _least_rayleigh(step, product, bad, damping), damping, iterations
            )
        estimate += step
        residual -= product
        size = float(step.norm())
        if not size < DIVERGENCE_GROWTH * smallest:  # also catches NaN / inf
            raise InfluxRuntimeError(
                f"lissa diverged at iteration {iterations} (step norm {size:.3e}, "
                f"{DIVERGENCE_GROWTH:.0e} times its smallest): scale {scale:.3e} is below the "
                "largest eigenvalue of the (preconditioned) damped curvature; use method='cg'"
            )
        smallest = min(smallest, size)
        if size < tolerance * float(estimate.norm()):
            break
    return estimate, iterations


def solve_with_positive_damping(
    solve_at: Callable[[float], object],
    damping: float,
    *,
    margin: float | None,
    what: str,
    max_raises: int = MAX_DAMPING_RAISES,
    stacklevel: int = 3,
) -> tuple[object, float]:
    """``solve_at(damping)``, raising the damping each time the solve meets non-positive curvature.

    When ``solve_at`` raises :class:`NegativeCurvature` with Rayleigh quotient rho (<= -damping),
    the damping becomes ``-rho + margin``, so the damped curvature along that direction is
    ``margin`` > 0, and the solve starts again; a :class:`NonPositiveDefiniteWarning` names the new
    value. Each raise adds at least ``margin``. A caller that knows no curvature scale passes
    ``margin=None``: each raise then lands at (1 + :data:`DEFAULT_RELATIVE_DAMPING`) |rho|, at
    least 1.1 times the damping before it. ``stacklevel`` points the warning at a caller's caller
    (3: the caller of the function that calls this one). Returns (the solve's result, the
    damping it used).
    """
    if margin is not None and not margin > 0:
        raise InfluxValueError(f"margin must be > 0 or None; got {margin!r}")
    for _ in range(max_raises + 1):
        try:
            return solve_at(damping), damping
        except NegativeCurvature as met:
            step = margin
            if step is None:  # a flat direction (rho = 0) still moves the damping
                step = max(DEFAULT_RELATIVE_DAMPING * abs(met.rayleigh), torch.finfo().eps)
            raised = max(damping, -met.rayleigh) + step
            warnings.warn(
                f"{what} met non-positive curvature at iteration {met.iteration}: "
                f"v^T H v / v^T v = {met.rayleigh:.3e} along a search direction, below -damping "
                f"= {-damping:.3e}, so H + damping I is not positive definite; damping raised to "
                f"{raised:.3e} and the solve restarted",
                NonPositiveDefiniteWarning,
                stacklevel=stacklevel,
            )
            damping = raised
    raise InfluxRuntimeError(
        f"{what} still met non-positive curvature after {max_raises} damping raises (damping "
        f"{damping:.3e}): check the curvature product, or pass a larger damping"
    )
