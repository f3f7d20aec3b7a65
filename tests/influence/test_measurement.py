"""``scores(query, measurement=m)`` and ``self_influence(measurement=m)`` against the loop
definition in float64: the query feature is the gradient of ``m`` (per example, by
torch.autograd.grad), the train feature the gradient of the loss, and each method's
preconditioner is applied explicitly (the inverse of the dense Hessian for exact, the Kronecker
eigenbases for K-FAC / EK-FAC, the projected Fisher for TRAK, the learning rates for TracIn).

The measurement is the margin, which is not a loss: were the loss gradient used on the query
side, every comparison would fail (checked below)."""

from __future__ import annotations

import pytest
import torch
from test_estimators import PD_DAMPING, brute_force_hessian
from utils import assert_close

from influx import influence
from influx.errors import InfluxValueError
from influx.grads.projection import dense_project


def margin(outputs, targets):
    """Logit of the target minus the log-sum-exp of the other logits (larger = more confident)."""
    target = outputs.gather(1, targets[:, None]).squeeze(1)
    others = outputs.scatter(1, targets[:, None], float("-inf"))
    return target - torch.logsumexp(others, dim=1)


def loop_gradients(model, function, data) -> torch.Tensor:
    """Flat gradients [M, P] of ``function`` for each example alone, in parameter order."""
    params = list(model.parameters())
    rows = []
    for x, y in zip(*data, strict=True):
        value = function(model(x[None]), y[None]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def kronecker_preconditioned(estimator, model, grads: torch.Tensor) -> torch.Tensor:
    """(K-FAC or EK-FAC + damping I)^-1 applied to flat gradients [M, P] (parameter order),
    block by block from the fitted eigenbases and eigenvalues, as dense Kronecker matrices."""
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = (start, start + p.numel())
        start += p.numel()
    out = torch.zeros_like(grads)
    rows = grads.shape[0]
    for layer, f in estimator.factors.items():
        d_out = f.eigenvalues.shape[0]
        w, b = offsets[f.weight_name], offsets[f.bias_name]  # every layer here has a bias
        # [M, d_out, d_in + 1] with the bias as the last column, flattened row-major
        weight = grads[:, w[0] : w[1]].reshape(rows, d_out, -1)
        bias = grads[:, b[0] : b[1]].reshape(rows, d_out, 1)
        block = torch.cat([weight, bias], dim=2).flatten(1)
        basis = torch.kron(f.gradient_basis, f.activation_basis)
        inverse = basis @ torch.diag(1 / (f.eigenvalues.flatten() + estimator.dampings[layer]))
        solved = (block @ (inverse @ basis.T).T).reshape(rows, d_out, -1)
        out[:, w[0] : w[1]] = solved[:, :, :-1].flatten(1)
        out[:, b[0] : b[1]] = solved[:, :, -1]
    return out


def explicit_scores(method, fitted, model, loss_fn, train, query, options):
    """sign * <P grad m(q), grad l(z)> [Q, N] by the loop, P each method's preconditioner."""
    g_train = loop_gradients(model, loss_fn, train)
    g_query = loop_gradients(model, margin, query)
    if method == "exact":
        hessian = brute_force_hessian(model, loss_fn, train)
        eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
        return -g_query @ torch.linalg.solve(hessian + PD_DAMPING * eye, g_train.T)
    if method in ("cg", "lissa", "arnoldi"):
        # the solver's own (H + damping I)^-1, applied to the loop's measurement gradients
        return -fitted.estimator.precondition(g_query) @ g_train.T
    if method in ("kfac", "ekfac"):
        return -kronecker_preconditioned(fitted.estimator, model, g_query) @ g_train.T
    if method == "trak":
        phi_train = dense_project(g_train, options["dim"], seed=0)
        phi_query = dense_project(g_query, options["dim"], seed=0)
        fisher = phi_train.T @ phi_train / phi_train.shape[0]
        damping = fitted.diagnostics["damping"][0]
        eye = torch.eye(fisher.shape[0], dtype=fisher.dtype)
        return -phi_query @ torch.linalg.solve(fisher + damping * eye, phi_train.T)
    if method == "tracin":
        return sum(lr * g_query @ g_train.T for lr in options["learning_rates"])
    if method == "grad_cos":
        g_query = g_query / g_query.norm(dim=1, keepdim=True)
        g_train = g_train / g_train.norm(dim=1, keepdim=True)
    return g_query @ g_train.T


OPTIONS = {
    "exact": {"damping": PD_DAMPING},
    "cg": {"damping": PD_DAMPING, "tolerance": 1e-12, "max_iterations": 300},
    "lissa": {"damping": PD_DAMPING, "tolerance": 1e-14, "max_iterations": 2000},
    "arnoldi": {"damping": PD_DAMPING, "rank": 30},
    "kfac": {"fisher": "empirical"},
    "ekfac": {"fisher": "empirical"},
    "trak": {"dim": 24},
    "tracin": {"learning_rates": [0.3, 0.7]},
    "grad_dot": {},
    "grad_cos": {},
}
# cg / lissa solve each right-hand side to their tolerance; the others are closed forms.
RTOL = {"cg": 1e-8, "lissa": 1e-8}


@pytest.mark.parametrize(
    "method",
    [pytest.param(m, marks=pytest.mark.slow) if m in RTOL else m for m in influence.METHODS],
)
def test_a_measurement_scores_through_its_own_gradient(tiny_mlp, method):
    model, loss_fn, train, query = tiny_mlp
    options = dict(OPTIONS[method])
    if method == "tracin":
        options["checkpoints"] = [model.state_dict()] * 2
    fitted = influence.fit(model, loss_fn, train, method=method, **options)
    got = fitted.scores(query, measurement=margin).values
    expected = explicit_scores(method, fitted, model, loss_fn, train, query, options)
    rtol = RTOL.get(method, 1e-9)
    assert_close(got, expected, rtol=rtol, name=method)
    # the loss gradient on the query side gives other scores: the test can tell them apart
    plain = fitted.scores(query).values
    assert (plain - expected).abs().max() > 100 * rtol * expected.abs().max()
    # self-influence measured by m: grad m(z)^T P grad l(z), the diagonal of z against itself
    own = fitted.scores(train, measurement=margin).values
    assert_close(
        fitted.self_influence(measurement=margin),
        fitted.sign * torch.diagonal(own),
        rtol=rtol,
        name=f"{method} self-influence",
        elementwise=True,
        atol=1e-12 * own.abs().max(),
    )


def test_a_measurement_must_give_one_finite_value_per_query(tiny_mlp):
    model, loss_fn, train, query = tiny_mlp
    fitted = influence.fit(model, loss_fn, train, method="grad_dot")
    with pytest.raises(InfluxValueError, match="one loss per example|per-example"):
        fitted.scores(query, measurement=lambda outputs, targets: outputs.sum())

    def inf_at_3(outputs, targets):
        return margin(outputs, targets) / (torch.arange(len(targets)) != 3)

    with pytest.raises(InfluxValueError, match=r"query measurements of 1 example.*indices \[3\]"):
        fitted.scores(query, measurement=inf_at_3)
