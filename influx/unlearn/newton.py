"""Newton removal: one Newton step on the retain objective with the damped Hessian.

With ``L_R(theta) = (1/|R|) sum_{z in R} l(z; theta) + (weight_decay / 2) ||theta||^2`` the *mean*
retain loss plus the L2 penalty the model was trained with, and ``H_R`` its Hessian at the current
parameters,

    theta <- theta - (H_R + damping I)^-1 grad L_R(theta),

where the penalty adds ``weight_decay * theta`` to the gradient and ``weight_decay I`` to the
Hessian (torch's ``weight_decay=`` of SGD is this penalty, over the parameters stepped; ``theta``
is those parameters). The damping only regularizes the solve: it is added to the Hessian of the
mean objective (a sum loss would need |R| x the damping for the same step). With ``damping=0`` the
step does not depend on mean vs sum, and for least squares (a loss quadratic in theta, e.g. a
linear model with ``mse_per_example``) it lands exactly on the minimizer of the retain objective,
i.e. on the model retrained on R to convergence (ridge regression with ``weight_decay``). For a
trained model this is the influence-function removal of the forget set (Koh & Liang 2017), taken
from theta.

``loss_fn(outputs, targets)`` must be the per-example data loss, a function of the outputs:
gradients and Hessian products swap the parameters in while the model runs
(``torch.func.functional_call``), so a term that reads the parameters inside ``loss_fn`` (an L2
penalty written there) would count as a constant. Such a ``loss_fn`` is refused; pass the
penalty's coefficient as ``weight_decay``.

Solvers: ``"dense"`` forms H_R exactly (:func:`influx.curvature.dense_hessian`, P Hessian-vector
products; small models) and solves in float64; ``"cg"`` runs the library's conjugate gradients
(:func:`influx.curvature.conjugate_gradients`) on Hessian-vector products
(:func:`influx.curvature.hvp`), stopping at ``tolerance`` (relative residual), ``max_iterations``
or the budget. ``"auto"`` picks dense when P <= 5,000 and it fits the budget, else cg. H_R may be
indefinite away from a minimum: the dense solver warns
(:class:`influx.curvature.NonPositiveDefiniteWarning`) and solves as asked; cg, meeting a
direction v of non-positive damped curvature, raises the damping to 1.1 |v^T H v| / v^T v, warns
with the new value and solves again from 0 (at most 20 times) within the same budget, as the ``cg`` influence estimator does
(:func:`influx.curvature.solve_with_positive_damping`). The damping it solved at is
``options["solved_damping"]``.

Budget: the gradient costs |R|; a Hessian-vector product over R costs 2 |R| (forward-over-reverse),
so dense costs |R| (1 + 2 P) and cg |R| (1 + 2 x iterations). A budget that cannot afford the
gradient and one product leaves the model unchanged (with a warning). Evaluated in eval mode.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from influx.checks import check_choice, check_damping, check_number
from influx.curvature import (
    ParamSpace,
    Spectrum,
    check_damped_spectrum,
    dense_hessian,
    gradient,
    hvp,
)
from influx.curvature.solvers import conjugate_gradients, solve_with_positive_damping
from influx.errors import InfluxValueError
from influx.unlearn.loop import LossFn, Session
from influx.unlearn.result import UnlearnResult

__all__ = ["DENSE_MAX_PARAMETERS", "newton"]

# A dense float64 Hessian of 5,000 parameters takes 200 MB and an eigendecomposition of seconds.
DENSE_MAX_PARAMETERS = 5000
_SOLVERS = ("auto", "dense", "cg")


class _RetainObjective:
    """Gradient and Hessian products of the mean retain loss, summed over chunks of R."""

    def __init__(self, model, loss_fn, inputs, targets, params, chunk: int, device):
        self.model, self.loss_fn, self.params = model, loss_fn, params
        self.chunks = [
            (inputs[s : s + chunk].to(device), targets[s : s + chunk].to(device))
            for s in range(0, inputs.shape[0], chunk)
        ]
        self.n = inputs.shape[0]

    def gradient(self) -> torch.Tensor:
        return (
            sum(
                gradient(self.model, self.loss_fn, batch, params=self.params, reduction="sum")
                for batch in self.chunks
            )
            / self.n
        )

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        return (
            sum(
                hvp(self.model, self.loss_fn, batch, vector, params=self.params, reduction="sum")
                for batch in self.chunks
            )
            / self.n
        )

    def hessian(self) -> torch.Tensor:
        return (
            sum(
                dense_hessian(self.model, self.loss_fn, batch, params=self.params, reduction="sum")
                for batch in self.chunks
            )
            / self.n
        )


def _solve_by_cg(objective, grad, shift: float, *, cap: int, affordable: float, tolerance: float):
    """(H_R + shift I)^-1 grad by the library's conjugate gradients: at most ``cap``
    Hessian-vector products per solve and ``affordable`` in all; returns (step, shift used,
    products used).

    A direction of non-positive curvature raises the shift above it (a
    :class:`~influx.curvature.NonPositiveDefiniteWarning` names the new value) and the solve
    starts again from 0, its products charged to the same budget."""
    used = 0

    def product(rows: torch.Tensor) -> torch.Tensor:
        nonlocal used
        used += 1
        return objective.hvp(rows[0]).detach()[None]

    def solve_at(damping: float) -> torch.Tensor:
        limit = int(min(cap, affordable - used))
        solved, _, _ = conjugate_gradients(
            product, grad[None], damping=damping, max_iterations=limit, tolerance=tolerance
        )
        return solved[0]

    # The warning points at the user's call of newton (through this function and newton).
    step, shift = solve_with_positive_damping(
        solve_at, shift, margin=None, what="newton (cg)", stacklevel=4
    )
    return step, shift, used


def _refuse_a_loss_reading_parameters(
    work: nn.Module, caller: nn.Module, loss_fn: LossFn, batch, names
) -> None:
    """Refuse a ``loss_fn`` whose value depends on the stepped parameters other than through the
    model's outputs (one forward of a few examples, outputs detached). Those of the caller's
    model are watched too: a ``loss_fn`` written around it reads them, not the working copy's."""
    watched = []
    for model in {id(work): work, id(caller): caller}.values():
        named = dict(model.named_parameters())
        watched += [(name, named[name]) for name in names if named[name].requires_grad]
    inputs, targets = batch
    with torch.no_grad():
        outputs = work(inputs)
    with torch.enable_grad():
        losses = loss_fn(outputs, targets)
    if not losses.requires_grad:
        return
    grads = torch.autograd.grad(losses.sum(), [p for _, p in watched], allow_unused=True)
    reading = sorted({name for (name, _), g in zip(watched, grads) if g is not None})
    if reading:
        raise InfluxValueError(
            f"newton: loss_fn reads the parameters {reading[:5]} itself (e.g. an L2 penalty), "
            "which the Newton step would take as constant; pass the per-example data loss as "
            "loss_fn and the penalty's coefficient as weight_decay="
        )


def newton(
    model: nn.Module,
    loss_fn: LossFn,
    forget,
    retain,
    *,
    budget=None,
    train_compute=None,
    damping: float = 1e-3,
    weight_decay: float = 0.0,
    solver: str = "auto",
    max_iterations: int | None = None,
    tolerance: float = 1e-10,
    chunk_size: int = 1024,
    params=None,
    inplace: bool = False,
    progress: bool = True,
    record_every: int | None = None,
    keep_states: bool = True,
    on_checkpoint=None,
) -> UnlearnResult:
    """One damped Newton step on the mean retain objective (module doc). ``forget`` is only
    checked.

    ``weight_decay``: the L2 coefficient of the training objective (``loss_fn`` is the data loss
    alone); ``params`` restricts the step to these parameter names (default: all trainable);
    ``chunk_size`` retain examples per product. Pass ``budget=math.inf`` for an unlimited solve.
    """
    damping = check_damping(damping, auto=False)
    weight_decay = check_number("weight_decay", weight_decay, at_least=0)
    check_choice("solver", solver, _SOLVERS)
    options = dict(inplace=inplace, progress=progress, record_every=record_every,
                   keep_states=keep_states, on_checkpoint=on_checkpoint, batch_size=chunk_size)  # fmt: skip
    session = Session("newton", model, loss_fn, forget, retain, budget=budget,
                      train_compute=train_compute, options=options)  # fmt: skip
    work = session.model
    space = ParamSpace.of(work, params)
    n, size = session.retain[0].shape[0], space.size
    dense_cost = n * (1 + 2 * size)
    if solver == "auto":
        solver = (
            "dense" if size <= DENSE_MAX_PARAMETERS and session.meter.affords(dense_cost) else "cg"
        )
    if solver == "dense" and not session.meter.affords(dense_cost):
        raise InfluxValueError(
            f"the dense Newton step costs {dense_cost} evaluations (|R| = {n}, P = {size}); the "
            f"budget is {session.meter.budget:.0f}: pass solver='cg' or a larger budget"
        )
    affordable = (session.meter.remaining - n) // (2 * n)
    cap = size if max_iterations is None else max_iterations  # per solve; restarts add up
    iterations = int(min(cap, affordable)) if solver == "cg" else 0
    extra = {"damping": damping, "weight_decay": weight_decay, "solver": solver,
             "tolerance": tolerance, "params": list(space.names)}  # fmt: skip
    if record_every is not None:
        session.record()
    if solver == "cg" and iterations < 1:
        warnings.warn(
            f"newton: the budget {session.meter.budget:.0f} cannot afford the gradient and one "
            f"Hessian-vector product ({3 * n} evaluations); the model is left unchanged",
            stacklevel=2,
        )
        return session.result(extra)
    work.eval()
    few = tuple(t[:8].to(session.device) for t in session.retain[:2])
    _refuse_a_loss_reading_parameters(work, model, loss_fn, few, space.names)
    objective = _RetainObjective(work, loss_fn, session.retain[0], session.retain[1],
                                 list(space.names), chunk_size, session.device)  # fmt: skip
    theta = space.current(work)
    grad = objective.gradient().detach() + weight_decay * theta
    if not bool(torch.isfinite(grad).all()):
        raise InfluxValueError(
            "newton: the retain gradient is not finite; check the model and data"
        )
    # The penalty's Hessian is weight_decay I; the damping comes on top (cg shifts by both).
    if solver == "dense":
        hessian = objective.hessian().detach().to(torch.float64)
        hessian.diagonal().add_(weight_decay)
        eigenvalues = torch.linalg.eigvalsh(hessian)
        check_damped_spectrum(Spectrum.of_eigenvalues(eigenvalues), float(damping),
                              what="retain Hessian")  # fmt: skip
        hessian.diagonal().add_(damping)
        step = torch.linalg.solve(hessian, grad.to(torch.float64)).to(theta.dtype)
        spent = dense_cost
        extra["iterations"] = size
    else:
        step, shift, used = _solve_by_cg(objective, grad, damping + weight_decay, cap=int(cap),
                                         affordable=affordable, tolerance=tolerance)  # fmt: skip
        spent = n * (1 + 2 * used)
        extra["iterations"] = used
        extra["solved_damping"] = shift - weight_decay
    session.meter.charge(spent)
    with torch.no_grad():
        named = dict(work.named_parameters())
        for name, value in space.unflatten(theta - step).items():
            named[name].copy_(value)
    extra["step_norm"] = float(step.norm())
    return session.finish_one_step(extra)
