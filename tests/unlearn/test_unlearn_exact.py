"""Closed forms and direct evaluations of the definitions, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import grad
from unlearn_helpers import LOSS, classification, flat, mean_loss_of, tiny_mlp
from utils import assert_close

from influx import unlearn
from influx.errors import InfluxValueError
from influx.train import mse_per_example


def _least_squares_problem():
    generator = torch.Generator(device="cpu").manual_seed(3)
    x = torch.randn(60, 4, generator=generator, dtype=torch.float64, device="cpu")
    y = torch.randn(60, 2, generator=generator, dtype=torch.float64, device="cpu")
    torch.manual_seed(5)
    model = nn.Linear(4, 2).double()
    return model, (x[:10], y[:10]), (x[10:], y[10:])


def _assert_least_squares(model, design, targets, solver: str) -> None:
    """The Linear ``model``'s [W b] is the least-squares solution of design [W^T; b^T] = targets."""
    solution = torch.linalg.lstsq(design, targets).solution  # [5, 2]
    # float64 solves of a 5x5 well-conditioned system: errors are a few ulps times cond (< 1e2).
    assert_close(model.weight, solution[:4].T, rtol=1e-10, name=f"W ({solver})")
    assert_close(model.bias, solution[4], rtol=1e-10, name=f"b ({solver})")


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_newton_without_damping_is_least_squares_retraining(solver):
    model, forget, retain = _least_squares_problem()
    result = unlearn.newton(model, mse_per_example, forget, retain, damping=0.0, solver=solver,
                            budget=math.inf, progress=False)  # fmt: skip
    # Retraining to convergence on R = the least-squares solution of [X 1] [W^T; b^T] = Y.
    x, y = retain
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
    _assert_least_squares(result.model, design, y, solver)
    assert result.options["solver"] == solver


def test_newton_step_with_damping_is_the_damped_formula():
    model = tiny_mlp(1)
    forget, retain = classification(8, 1), classification(40, 2)
    damping = 0.3
    result = unlearn.newton(model, LOSS, forget, retain, damping=damping, solver="dense",
                            budget=math.inf, progress=False)  # fmt: skip
    objective = mean_loss_of(model, LOSS, *retain)
    theta = flat(model)
    hessian = torch.autograd.functional.hessian(objective, theta)
    hessian += damping * torch.eye(theta.numel(), dtype=theta.dtype, device=theta.device)
    expected = theta - torch.linalg.solve(hessian, grad(objective)(theta))
    # Same linear system, assembled by two differentiation routes: float64 round-off only.
    assert_close(flat(result.model), expected, rtol=1e-10, name="damped Newton")
    cg = unlearn.newton(model, LOSS, forget, retain, damping=damping, solver="cg",
                        budget=math.inf, progress=False)  # fmt: skip
    # CG to a 1e-10 relative residual on a system with condition number < 1e3.
    assert_close(flat(cg.model), expected, rtol=1e-7, name="damped Newton (cg)")


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_newton_with_weight_decay_is_ridge_retraining(solver):
    model, forget, retain = _least_squares_problem()
    decay = 0.3
    result = unlearn.newton(model, mse_per_example, forget, retain, damping=0.0,
                            weight_decay=decay, solver=solver, budget=math.inf,
                            progress=False)  # fmt: skip
    # Retraining on R to convergence minimizes mean_R 0.5 ||W x + b - y||^2 + (decay / 2) ||theta||^2
    # over theta = (W, b): least squares of [D; sqrt(n decay) I] theta = [Y; 0], D = [X 1].
    x, y = retain
    n = x.shape[0]
    design = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], 1)
    ridge = math.sqrt(n * decay) * torch.eye(5, dtype=x.dtype, device=x.device)
    zeros = torch.zeros(5, 2, dtype=y.dtype, device=y.device)
    _assert_least_squares(result.model, torch.cat([design, ridge]), torch.cat([y, zeros]), solver)
    assert result.options["weight_decay"] == decay


def test_newton_with_weight_decay_is_the_regularised_damped_formula():
    model = tiny_mlp(1)
    forget, retain = classification(8, 1), classification(40, 2)
    damping, decay = 0.1, 0.3
    data_loss = mean_loss_of(model, LOSS, *retain)

    def objective(theta):
        return data_loss(theta) + 0.5 * decay * theta.square().sum()

    theta = flat(model)
    hessian = torch.autograd.functional.hessian(objective, theta)
    hessian += damping * torch.eye(theta.numel(), dtype=theta.dtype, device=theta.device)
    expected = theta - torch.linalg.solve(hessian, grad(objective)(theta))
    # The cg path is checked against ridge regression above.
    result = unlearn.newton(model, LOSS, forget, retain, damping=damping, weight_decay=decay,
                            solver="dense", budget=math.inf, progress=False)  # fmt: skip
    # Same linear system, assembled by two differentiation routes: float64 round-off only.
    assert_close(flat(result.model), expected, rtol=1e-10, name="decayed Newton")


@pytest.mark.parametrize("inplace", [False, True])
def test_newton_refuses_a_loss_that_reads_the_parameters(inplace):
    # The penalty would be differentiated as a constant: the step would miss it (measured: 2.0
    # relative error against the regularised step) without a word.
    model = tiny_mlp(1)
    forget, retain = classification(8, 1), classification(40, 2)

    def penalised(outputs, targets):
        return LOSS(outputs, targets) + 0.05 * model[0].weight.square().sum()

    with pytest.raises(
        InfluxValueError, match=r"reads the parameters \['0.weight'\].*weight_decay"
    ):
        unlearn.newton(model, penalised, forget, retain, budget=math.inf, inplace=inplace,
                       progress=False)  # fmt: skip
    with pytest.raises(InfluxValueError, match="weight_decay must be a finite number >= 0"):
        unlearn.newton(model, LOSS, forget, retain, budget=math.inf, weight_decay=-1.0,
                       progress=False)  # fmt: skip


def test_one_gradient_ascent_step_is_its_closed_form():
    model = tiny_mlp()
    forget, retain = classification(7, 1), classification(20, 2)
    lr = 0.1
    # batch_size >= |F|: the step uses the whole forget set; the budget affords exactly one step.
    result = unlearn.gradient_ascent(model, LOSS, forget, retain, budget=7, lr=lr, progress=False)
    theta = flat(model)
    expected = theta + lr * grad(mean_loss_of(model, LOSS, *forget))(theta)
    assert result.steps == 1 and result.spent == 7
    # One axpy in float64 on the same gradient (batch order differs: summation order only).
    assert_close(flat(result.model), expected, rtol=1e-12, name="ascent step")


def test_neggrad_plus_with_beta_one_is_fine_tuning():
    model = tiny_mlp()
    forget, retain = classification(6, 1), classification(30, 2)
    kwargs = dict(budget=math.inf, max_steps=3, batch_size=8, lr=0.2, progress=False)
    tuned = unlearn.fine_tune(model, LOSS, forget, retain, **kwargs)
    negated = unlearn.neggrad_plus(model, LOSS, forget, retain, beta=1.0, **kwargs)
    # Same retain batches (same seed), forget term weighted by 0: identical arithmetic.
    assert_close(flat(negated.model), flat(tuned.model), rtol=1e-12, name="beta = 1")


def _direct_fisher(model, inputs, targets):
    """Mean squared per-example gradient by a loop of single-example backward passes."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in zip(inputs, targets):
        loss = LOSS(model(x[None]), y[None]).sum()
        for t, g in zip(total, torch.autograd.grad(loss, list(model.parameters()))):
            t += g.square()
    return [t / inputs.shape[0] for t in total]


def test_ssd_is_its_rule():
    model = tiny_mlp(2)
    forget, retain = classification(4, 1), classification(36, 2)
    alpha, dampening = 2.0, 0.7
    result = unlearn.ssd(model, LOSS, forget, retain, budget=math.inf, alpha=alpha,
                         dampening=dampening, progress=False)  # fmt: skip
    everything = (torch.cat([forget[0], retain[0]]), torch.cat([forget[1], retain[1]]))
    expected = []
    for p, i_f, i_d in zip(model.parameters(), _direct_fisher(model, *forget),
                           _direct_fisher(model, *everything)):  # fmt: skip
        selected = i_f > alpha * i_d
        beta = torch.clamp(dampening * i_d / i_f, max=1.0)
        expected.append(torch.where(selected, p.detach() * beta, p.detach()).reshape(-1))
    assert result.options["dampened"] > 0, "the test must exercise the dampening"
    assert result.spent == 40
    # Per-example gradients by the engine vs a loop: float64 round-off in the squares' sums.
    assert_close(flat(result.model), torch.cat(expected), rtol=1e-10, name="ssd")


def test_distillation_kl_is_the_kl_of_the_tempered_softmaxes():
    generator = torch.Generator(device="cpu").manual_seed(0)
    student = torch.randn(9, 4, generator=generator, dtype=torch.float64, device="cpu") * 3
    teacher = torch.randn(9, 4, generator=generator, dtype=torch.float64, device="cpu") * 3
    temperature = 2.5
    p = torch.distributions.Categorical(logits=teacher / temperature)
    q = torch.distributions.Categorical(logits=student / temperature)
    expected = torch.distributions.kl_divergence(p, q) * temperature**2
    assert_close(unlearn.distillation_kl(student, teacher, temperature), expected, rtol=1e-12)


@pytest.mark.parametrize("phase", ["max", "min"])
def test_one_scrub_step_is_its_closed_form(phase):
    student, teacher = tiny_mlp(0), tiny_mlp(1)
    forget, retain = classification(5, 1), classification(12, 2)
    lr, temperature, kl_weight, ce_weight = 0.3, 2.0, 0.4, 0.6
    # Each set fits one batch; the budget affords exactly one step (cost 2 per example).
    batch, budget = (forget, 10) if phase == "max" else (retain, 24)
    result = unlearn.scrub(
        student, LOSS, forget, retain, budget=budget, lr=lr, teacher=teacher,
        temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight,
        max_rounds=1 if phase == "max" else 0, progress=False,
    )  # fmt: skip
    assert result.steps == 1 and result.spent == budget
    inputs, targets = batch
    with torch.no_grad():
        teacher_probs = torch.softmax(teacher(inputs) / temperature, 1)

    def objective(theta):
        names = [n for n, _ in student.named_parameters()]
        sizes = [p.numel() for p in student.parameters()]
        params = {n: t.reshape(p.shape) for n, t, p in
                  zip(names, torch.split(theta, sizes), student.parameters())}  # fmt: skip
        logits = torch.func.functional_call(student, params, (inputs,))
        log_q = torch.log_softmax(logits / temperature, 1)
        kl = (teacher_probs * (teacher_probs.log() - log_q)).sum(1).mean() * temperature**2
        if phase == "max":
            return -kl
        return kl_weight * kl + ce_weight * LOSS(logits, targets).mean()

    theta = flat(student)
    expected = theta - lr * grad(objective)(theta)
    assert_close(flat(result.model), expected, rtol=1e-12, name=f"scrub {phase}-step")


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_first_scrub_max_step_moves_the_student_only_under_dropout(dropout):
    # The student steps in train mode and the teacher runs in eval mode (the authors' code): with
    # dropout their logits differ, d > 0 and the very first max-step has a gradient.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3))
    model = model.double()
    forget, retain = classification(10, 1), classification(30, 2)
    # One forget batch of 10 at cost 2 per example: the budget affords exactly the max-step.
    result = unlearn.scrub(model, LOSS, forget, retain, budget=20, batch_size=10, lr=0.05,
                           progress=False)  # fmt: skip
    assert result.steps == 1
    change = (flat(result.model) - flat(model)).abs().max().item()
    if dropout:
        assert change > 1e-4  # measured 3.9e-3
    else:
        # Only rounding: sum_j softmax_j differs from 1 by a few ulps (measured 3.5e-18).
        assert change < 1e-15
