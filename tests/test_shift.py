"""influx.shift against closed forms and direct evaluations of the definitions, in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from utils import assert_close

from influx import shift, unlearn
from influx.curvature import ParamSpace
from influx.errors import InfluxValueError
from influx.grads import capture_matmul_layers, per_sample_grads
from influx.models import cnn
from influx.train import cross_entropy_per_example, mse_per_example


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _with_params(model: nn.Module, vector: torch.Tensor) -> nn.Module:
    out = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(vector.clone(), out.parameters())
    return out


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _direct(d_p: torch.Tensor, d_u: torch.Tensor) -> dict[str, float]:
    """The definitions, written out once more."""
    c = (d_u @ d_p) / (d_p @ d_p)
    return {
        "removed_fraction": float(-(d_u @ d_p) / (d_p @ d_p)),
        "cosine": float(-(d_u @ d_p) / (d_u.norm() * d_p.norm())),
        "orthogonal_norm": float((d_u - c * d_p).norm()),
        "remaining_distance": float((d_p + d_u).norm()),
        "poison_norm": float(d_p.norm()),
        "update_norm": float(d_u.norm()),
    }


def _check_fields(result, expected: dict[str, float], rtol: float, name: str):
    for key, value in expected.items():
        assert getattr(result, key) == pytest.approx(value, rel=rtol, abs=1e-14), f"{name}: {key}"


# --------------------------------------------------------------------------------------------------
# Euclidean decomposition
# --------------------------------------------------------------------------------------------------


def test_decompose_random_vectors_equals_formulas():
    generator = torch.Generator(device="cpu").manual_seed(1)
    ref, poi, unl = torch.randn(3, 200, generator=generator, dtype=torch.float64, device="cpu")
    result = shift.decompose(ref, poi, unl)
    # The same dot products in another order: float64 round-off, relative 1e-13 at most.
    _check_fields(result, _direct(poi - ref, unl - poi), 1e-12, "random vectors")
    assert result.per_layer is None and result.metric == "euclidean" and result.kl_poison is None


def test_per_layer_parts_sum_to_totals_and_inputs_agree():
    models = [_mlp(s) for s in range(3)]
    by_model = shift.decompose(*models)
    by_state = shift.decompose(*(m.state_dict() for m in models))
    by_vector = shift.decompose(*(_flat(m) for m in models))
    mixed = shift.decompose(models[0], models[1].state_dict(), _flat(models[2]))
    expected = _direct(_flat(models[1]) - _flat(models[0]), _flat(models[2]) - _flat(models[1]))
    for name, result in [("models", by_model), ("state dicts", by_state),
                         ("vectors", by_vector), ("mixed", mixed)]:  # fmt: skip
        _check_fields(result, expected, 1e-12, name)
    layers = by_model.per_layer
    assert list(layers) == [n for n, _ in models[0].named_parameters()]
    total = lambda key: sum(getattr(layer, key) for layer in layers.values())
    # Sums of four float64 parts: round-off only.
    assert total("poison_sq") == pytest.approx(by_model.poison_norm**2, rel=1e-12)
    assert total("update_sq") == pytest.approx(by_model.update_norm**2, rel=1e-12)
    assert total("remaining_sq") == pytest.approx(by_model.remaining_distance**2, rel=1e-12)
    assert total("orthogonal_sq") == pytest.approx(by_model.orthogonal_norm**2, rel=1e-12)
    assert total("removed_share") == pytest.approx(by_model.removed_fraction, rel=1e-12)
    inner = -(_flat(models[2]) - _flat(models[1])) @ (_flat(models[1]) - _flat(models[0]))
    assert total("inner") == pytest.approx(float(inner), rel=1e-12)
    # A layer's own numbers are its slice's definitions.
    d_p = models[1][0].weight - models[0][0].weight
    d_u = models[2][0].weight - models[1][0].weight
    own = _direct(d_p.detach().reshape(-1), d_u.detach().reshape(-1))
    assert layers["0.weight"].removed_fraction == pytest.approx(own["removed_fraction"], rel=1e-12)
    assert layers["0.weight"].cosine == pytest.approx(own["cosine"], rel=1e-12)


# --------------------------------------------------------------------------------------------------
# Least squares: Newton removal and one ascent step in closed form
# --------------------------------------------------------------------------------------------------


def _poisoned_least_squares():
    """Linear regression with Gaussian-poisoned forget inputs; models at the exact minimizers."""
    generator = torch.Generator(device="cpu").manual_seed(3)
    kw = dict(generator=generator, dtype=torch.float64, device="cpu")
    x, w = torch.randn(80, 4, **kw), torch.randn(4, 2, **kw)
    y = x @ w + 0.1 * torch.randn(80, 2, **kw)
    x[:12] += 2.0 * torch.randn(12, 4, **kw)  # the poisons: inputs shifted, labels kept
    forget, retain = (x[:12], y[:12]), (x[12:], y[12:])

    def fitted(inputs, targets):
        design = torch.cat([inputs, torch.ones(inputs.shape[0], 1, dtype=inputs.dtype)], 1)
        solution = torch.linalg.lstsq(design, targets).solution  # [5, 2]
        model = nn.Linear(4, 2).double()
        with torch.no_grad():
            model.weight.copy_(solution[:4].T)
            model.bias.copy_(solution[4])
        return model

    return fitted(*retain), fitted(x, y), forget, retain


def _design(inputs):
    return torch.cat([inputs, torch.ones(inputs.shape[0], 1, dtype=inputs.dtype)], 1)


def _as_vector(theta: torch.Tensor) -> torch.Tensor:
    """[5, 2] = [W^T; b] -> the flat named_parameters() order (weight row-major, then bias)."""
    return torch.cat([theta[:4].T.reshape(-1), theta[4]])


def test_newton_removal_removes_exactly_the_poisoning_shift():
    reference, poisoned, forget, retain = _poisoned_least_squares()
    # Newton step on the mean retain loss with its exact Hessian, by hand:
    # theta <- theta - H^-1 grad, H = D^T D / n, grad = D^T (D theta - Y) / n.
    design = _design(retain[0])
    theta = torch.cat([poisoned.weight.detach().T, poisoned.bias.detach()[None]])
    n = design.shape[0]
    hessian, gradient = design.T @ design / n, design.T @ (design @ theta - retain[1]) / n
    by_hand = _as_vector(theta - torch.linalg.solve(hessian, gradient))
    lab = unlearn.newton(poisoned, mse_per_example, forget, retain, damping=0.0, solver="dense",
                         budget=math.inf, progress=False).model  # fmt: skip
    for name, unlearned in [("closed form", by_hand), ("unlearn.newton", lab)]:
        result = shift.decompose(reference, poisoned, unlearned)
        assert result.poison_norm > 0.05  # a real shift to remove
        # A 5x5 solve with condition number < 1e2 in float64: 1e-10 holds with margin.
        assert abs(result.removed_fraction - 1) < 1e-10, name
        assert abs(result.cosine - 1) < 1e-10, name
        assert result.orthogonal_norm < 1e-10, name
        assert result.remaining_distance < 1e-10, name


def test_one_ascent_step_update_is_its_closed_form():
    reference, poisoned, forget, retain = _poisoned_least_squares()
    lr = 0.05
    result = unlearn.gradient_ascent(poisoned, mse_per_example, forget, retain, budget=12, lr=lr,
                                     progress=False)  # fmt: skip
    assert result.steps == 1
    # grad of the mean forget loss 0.5 ||W x + b - y||^2: D^T (D theta - Y) / m.
    design = _design(forget[0])
    theta = torch.cat([poisoned.weight.detach().T, poisoned.bias.detach()[None]])
    d_u = _as_vector(lr * design.T @ (design @ theta - forget[1]) / design.shape[0])
    # One axpy on the same gradient summed in another order: float64 round-off.
    assert_close(_flat(result.model) - _flat(poisoned), d_u, rtol=1e-12, name="ascent update")
    decomposition = shift.decompose(reference, poisoned, result.model)
    d_p = _flat(poisoned) - _flat(reference)
    _check_fields(decomposition, _direct(d_p, d_u), 1e-10, "ascent step")


# --------------------------------------------------------------------------------------------------
# Fisher metric
# --------------------------------------------------------------------------------------------------


def _probe(n: int = 40, seed: int = 2):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, 5, generator=generator, dtype=torch.float64, device="cpu")
    y = torch.randint(0, 3, (n,), generator=generator, device="cpu")
    return x, y


def test_exact_fisher_products_equal_the_definition():
    model, (x, y) = _mlp(), _probe()
    metric = shift.fisher(model, model, (x, y), batch_size=16)  # three uneven batches
    space = ParamSpace.of(model)
    theta = space.current(model)

    def logits(t):
        return functional_call(model, space.unflatten(t), (x,))

    jac = jacrev(logits)(theta)  # [N, C, P]
    p = torch.softmax(logits(theta), -1)
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    dense = torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / x.shape[0]
    v = torch.randn(2, space.size, dtype=torch.float64, device="cpu")
    # Matrix-free jvp/vjp products vs an explicit Jacobian contraction: round-off only.
    assert_close(metric.apply(v), v @ dense, rtol=1e-10, name="F v")


def test_half_fisher_quadratic_is_the_kl_to_second_order():
    model, probe = _mlp(), _probe(60)
    metric = shift.fisher(model, model, probe)
    theta = _flat(model)
    direction = torch.randn(theta.numel(), dtype=torch.float64, device="cpu")
    direction *= 3.0 / direction.norm()
    errors = []
    for scale in (0.1, 0.01, 0.001):
        moved = theta + scale * direction
        quadratic = metric.decompose(model, moved, moved).kl_poison
        exact = shift.predictive_kl(model, model, moved, probe)
        errors.append(abs(quadratic / exact - 1))
    # KL = 0.5 d^T F d + O(|d|^3), so |ratio - 1| = O(scale): each tenfold shrink cuts it ~10x
    # (>= 5x asked, leaving room for the next-order term); measured 6e-3, 7e-4, 7e-5.
    assert errors[0] > 1e-3, errors  # the shift is large enough for the cubic term to show
    for bigger, smaller in zip(errors, errors[1:]):
        assert smaller < bigger / 5, errors
    assert errors[-1] < 1e-3, errors


def test_fisher_decomposition_is_the_euclidean_one_in_the_fisher_metric():
    model, probe = _mlp(), _probe()
    metric = shift.fisher(model, model, probe)
    generator = torch.Generator(device="cpu").manual_seed(4)
    theta = _flat(model)
    poisoned = theta + 0.1 * torch.randn(theta.numel(), generator=generator, dtype=torch.float64)
    unlearned = poisoned + 0.1 * torch.randn(
        theta.numel(), generator=generator, dtype=torch.float64
    )
    result = metric.decompose(model, poisoned, unlearned)
    d_p, d_u = poisoned - theta, unlearned - poisoned
    f_p, f_u = metric.apply(d_p), metric.apply(d_u)
    c = (d_u @ f_p) / (d_p @ f_p)
    orth = d_u - c * d_p
    expected = {
        "removed_fraction": float(-(d_u @ f_p) / (d_p @ f_p)),
        "cosine": float(-(d_u @ f_p) / torch.sqrt((d_u @ f_u) * (d_p @ f_p))),
        "orthogonal_norm": float(torch.sqrt(orth @ metric.apply(orth))),
        "remaining_distance": float(torch.sqrt((d_p + d_u) @ metric.apply(d_p + d_u))),
        "kl_poison": float(0.5 * d_p @ f_p),
        "kl_update": float(0.5 * d_u @ f_u),
    }
    # Separate products of the same symmetric F: agreement to round-off (1e-10 relative).
    _check_fields(result, expected, 1e-10, "fisher")
    layers = result.per_layer
    assert sum(v.poison_sq for v in layers.values()) == pytest.approx(
        2 * result.kl_poison, rel=1e-10
    )
    assert result.metric == "fisher-exact"


def _layer_matrix_of_per_sample(factor, grads, i):
    weight = grads[factor.weight_name][i]
    matrix = weight.reshape(weight.shape[0], -1)
    if factor.bias_name:
        matrix = torch.cat([matrix, grads[factor.bias_name][i].reshape(-1, 1)], 1)
    return matrix


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_kronecker_products_use_the_layer_layout(curvature):
    # The K-FAC product maps parameter deltas to [d_out, d_in(+1)]; per-sample gradients mapped
    # the same way must equal the captured b_n^T a_n (Conv patches included), and the metric's
    # product must equal the factors' Kronecker form on that layout.
    torch.manual_seed(0)
    model = cnn(1, 3, width=4).double().eval()
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64, device="cpu")
    y = torch.randint(0, 3, (5,), device="cpu")
    with pytest.warns(UserWarning, match="K-FAC covers Linear/Conv layers only") as record:
        metric = shift.fisher(model, model, (x, y), curvature=curvature)
    assert record[0].filename == __file__  # the warning points at the user's call
    grads = per_sample_grads(model, cross_entropy_per_example, x, y)
    captures = capture_matmul_layers(model, cross_entropy_per_example, x, y)
    for name, factor in metric.factors.items():
        captured = captures[name].b.transpose(1, 2) @ captures[name].a
        for i in range(x.shape[0]):
            mapped = shift._layer_matrix(factor, {k: v[i] for k, v in grads.items()})
            assert_close(mapped, captured[i], name=f"{name} layout")
    space = ParamSpace.of(model)
    v = torch.randn(space.size, dtype=torch.float64, device="cpu")
    product = space.unflatten(metric.apply(v))
    named = space.unflatten(v)
    for factor in metric.factors.values():
        matrix = shift._layer_matrix(factor, named)
        expected = factor.unrotate(factor.rotate(matrix) * factor.eigenvalues)
        assert_close(shift._layer_matrix(factor, product), expected, name=factor.weight_name)
    for name in metric.excluded:
        assert torch.all(product[name] == 0)
    shifted = space.current(model) + 0.01 * v
    assert "fisher" in metric.decompose(model, shifted, model).metric


# --------------------------------------------------------------------------------------------------
# Predictions, reports, trajectories
# --------------------------------------------------------------------------------------------------


def test_analyze_kl_and_entropy_are_direct_evaluations():
    models = [_mlp(s) for s in range(3)]
    probes = {"forget": _probe(10, 5), "test": _probe(30, 6)}
    report = shift.analyze(models[0], *models, probes)
    for name, (x, _) in probes.items():
        logp = [torch.log_softmax(m(x), -1).detach() for m in models]
        entropy = [float(-(lp.exp() * lp).sum(-1).mean()) for lp in logp]
        kl = lambda a, b, logp=logp: float((logp[a].exp() * (logp[a] - logp[b])).sum(-1).mean())
        assert report.entropy[name]["unlearned"] == pytest.approx(entropy[2], rel=1e-12)
        assert report.entropy_change[name] == pytest.approx(entropy[2] - entropy[1], rel=1e-10)
        assert report.kl[name]["reference||poisoned"] == pytest.approx(kl(0, 1), rel=1e-12)
        assert report.kl[name]["poisoned||unlearned"] == pytest.approx(kl(1, 2), rel=1e-12)
    assert report.fisher is None
    assert report.as_dict()["euclidean"]["cosine"] == report.euclidean.cosine


def test_trajectory_from_unlearn_result_and_from_states():
    reference, poisoned = _mlp(0), _mlp(1)
    forget, retain = _probe(8, 7), _probe(30, 8)
    result = unlearn.gradient_ascent(poisoned, cross_entropy_per_example, forget, retain,
                                     budget=32, lr=0.1, record_every=1, progress=False)  # fmt: skip
    metric = shift.fisher(reference, reference, retain)
    probes = {"forget": forget}
    path = shift.trajectory(reference, reference, poisoned, result, probes, metric=metric)
    assert path.steps == [p.step for p in result.trajectory] == [0, 1, 2, 3, 4]
    # Step 0 is the poisoned model itself: nothing removed, the full shift remains.
    assert path.series("euclidean.update_norm")[0] == 0
    assert path.series("kl.forget.poisoned||unlearned")[0] == pytest.approx(0, abs=1e-15)
    last = shift.analyze(reference, reference, poisoned, result.model, probes, metric=metric)
    assert path.series("euclidean.cosine")[-1] == pytest.approx(last.euclidean.cosine, rel=1e-12)
    assert path.series("fisher.kl_remaining")[-1] == pytest.approx(
        last.fisher.kl_remaining, rel=1e-12
    )
    states = [p.state_dict for p in result.trajectory]
    again = shift.trajectory(reference, reference, poisoned, states, probes)
    assert again.steps == [0, 1, 2, 3, 4]
    assert again.series("euclidean.removed_fraction") == path.series("euclidean.removed_fraction")


def test_bad_input():
    model = _mlp()
    with pytest.raises(InfluxValueError, match="1-D"):
        shift.decompose(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(InfluxValueError, match="named_parameters"):
        shift.decompose(model, torch.zeros(7), model)
    with pytest.raises(InfluxValueError, match="lacks parameters"):
        shift.decompose(model, {"0.weight": model[0].weight}, model)
    with pytest.raises(InfluxValueError, match="state must be"):
        shift.decompose(model, [1, 2], model)
    with pytest.raises(InfluxValueError, match="curvature"):
        shift.fisher(model, model, _probe(), curvature="diag")
    with pytest.raises(InfluxValueError, match="integer class targets"):
        shift.fisher(model, model, (torch.zeros(4, 5, dtype=torch.float64), torch.zeros(4, 2)))
    with pytest.raises(InfluxValueError, match="kept no states"):
        shift.trajectory(model, model, model, unlearn.UnlearnResult(model, "x", 0, 0, 0, {}))


# --------------------------------------------------------------------------------------------------
# Each state's own frozen parameters and buffers; eval mode; the model left alone
# --------------------------------------------------------------------------------------------------


def _batchnorm_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).double()


def _hand_kl(p: nn.Module, q: nn.Module, x: torch.Tensor) -> float:
    """KL(p || q) of two eval-mode copies, by direct forward passes."""
    with torch.no_grad():
        log_p = torch.log_softmax(copy.deepcopy(p).eval()(x), -1)
        log_q = torch.log_softmax(copy.deepcopy(q).eval()(x), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def _frozen_and_buffer_shift():
    """A model with a frozen first layer and BatchNorm, and a copy differing only there."""
    reference = _batchnorm_mlp()
    reference[0].weight.requires_grad_(False)
    shifted = copy.deepcopy(reference)
    generator = torch.Generator(device="cpu").manual_seed(9)
    with torch.no_grad():
        shifted[0].weight.add_(0.3 * torch.randn(7, 5, generator=generator, dtype=torch.float64))
        shifted[1].running_mean.add_(1.0)
        shifted[1].running_var.mul_(3.0)
    return reference, shifted


def test_predictions_use_each_states_frozen_parameters_and_buffers():
    reference, shifted = _frozen_and_buffer_shift()
    probe = _probe(40, 3)
    expected = _hand_kl(reference, shifted, probe[0])
    assert expected > 0.01  # the frozen weight and the running statistics move the predictions
    every_param = torch.cat([p.detach().reshape(-1) for p in shifted.parameters()])
    for name, state in [("model", shifted), ("state dict", shifted.state_dict())]:
        # The same float64 forward passes: round-off only.
        got = shift.predictive_kl(reference, reference, state, probe)
        assert got == pytest.approx(expected, rel=1e-12), name
    # A flat vector holds parameters only: the buffers are the template's.
    buffers_kept = copy.deepcopy(shifted)
    buffers_kept[1].load_state_dict(reference[1].state_dict())
    got = shift.predictive_kl(reference, reference, every_param, probe)
    assert got == pytest.approx(_hand_kl(reference, buffers_kept, probe[0]), rel=1e-12)
    report = shift.analyze(reference, reference, shifted, shifted, {"probe": probe})
    assert report.kl["probe"]["reference||poisoned"] == pytest.approx(expected, rel=1e-12)
    assert report.kl["probe"]["poisoned||unlearned"] == 0.0
    # Euclidean quantities count the frozen weight; the Fisher ones the trainable parameters.
    frozen_shift = (shifted[0].weight - reference[0].weight).norm().item()
    assert report.euclidean.poison_norm == pytest.approx(frozen_shift, rel=1e-12)
    metric = shift.fisher(reference, reference, probe)
    assert metric.decompose(reference, shifted, shifted).kl_poison == 0.0


def test_predictions_run_in_eval_mode_and_leave_the_model_alone():
    torch.manual_seed(0)
    dropout = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(0.5), nn.Linear(7, 3)).double()
    dropout[1].eval()  # a mixed mode, to be restored as it was
    probe = _probe(30, 4)
    # Dropout in train mode would make a model differ from itself.
    assert shift.predictive_kl(dropout, dropout, dropout, probe) == 0.0
    with torch.no_grad():
        log_p = torch.log_softmax(copy.deepcopy(dropout).eval()(probe[0]), -1)
    by_hand = float(-(log_p.exp() * log_p).sum(-1).mean())
    assert shift.predictive_entropy(dropout, dropout, probe) == pytest.approx(by_hand, rel=1e-12)
    assert [m.training for m in dropout] == [True, False, True, True]

    reference, shifted = _frozen_and_buffer_shift()  # both in train mode
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    expected = _hand_kl(reference, shifted, probe[0])
    assert shift.predictive_kl(reference, reference, shifted, probe) == pytest.approx(
        expected, rel=1e-12
    )
    shift.analyze(reference, reference, shifted, shifted, {"probe": probe},
                  metric=shift.fisher(reference, reference, probe))  # fmt: skip
    # Running statistics and num_batches_tracked untouched, train mode kept.
    for key, value in reference.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(m.training for m in reference.modules())


def test_fisher_is_taken_at_the_states_own_frozen_parameters_and_buffers():
    reference, shifted = _frozen_and_buffer_shift()  # the template stays in train mode
    probe = _probe(40, 5)
    metric = shift.fisher(reference, shifted, probe, batch_size=16)
    # Dense F by hand at the shifted model in eval mode: a Jacobian over its trainable
    # parameters, with its own frozen weight and running statistics.
    at = copy.deepcopy(shifted).eval()
    space = ParamSpace.of(at)

    def logits(t):
        return functional_call(at, space.unflatten(t), (probe[0],))

    theta = space.current(at)
    jac = jacrev(logits)(theta)
    p = torch.softmax(logits(theta), -1).detach()
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    dense = torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / probe[0].shape[0]
    v = torch.randn(2, space.size, dtype=torch.float64, device="cpu")
    # Matrix-free products vs an explicit Jacobian contraction: round-off only.
    assert_close(metric.apply(v), v @ dense, rtol=1e-10, name="F v at the state")
    assert reference.training and metric.names == list(space.names)


# --------------------------------------------------------------------------------------------------
# Sampled K-FAC / EK-FAC against a brute-force fit; refusals; streaming
# --------------------------------------------------------------------------------------------------


def _brute_force_kronecker(model, x, seed: int, batch_size: int, eigen_corrected: bool):
    """Layer -> F applied to [d_out, d_in + 1] matrices, fitted by hand in float64: labels drawn
    per batch as influx.curvature.sample_labels draws them (fisher_draws('auto') per example,
    fresh draws for the EK-FAC refit), every per-example gradient from torch.func."""
    from influx.curvature import fisher_draws

    n, draws = x.shape[0], fisher_draws("auto", x.shape[0], model, x)
    generator = torch.Generator().manual_seed(seed)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def layer_grads(xi, yi):  # per layer: G = [dW | db] [d_out, d_in + 1]
        def loss(p):
            return cross_entropy_per_example(functional_call(model, p, (xi[None],)), yi[None])[0]

        g = torch.func.grad(loss)(params)
        return {
            layer: torch.cat([g[f"{layer}.weight"], g[f"{layer}.bias"][:, None]], 1)
            for layer in ("0", "2")
        }

    def draw_pass():  # (example, label) for every batch and draw, in the fitter's order
        out = []
        for s in range(0, n, batch_size):
            xb = x[s : s + batch_size]
            p = torch.softmax(model(xb).detach().to(torch.float64), -1)
            labels = torch.multinomial(p, draws, replacement=True, generator=generator).T
            out += [(s + i, labels[d, i]) for d in range(draws) for i in range(xb.shape[0])]
        return out

    first = draw_pass()
    hidden = torch.tanh(model[0](x)).detach()
    inputs = {"0": x, "2": hidden}
    result = {}
    grads_first = [layer_grads(x[i], y) for i, y in first]
    for layer in ("0", "2"):
        a = torch.cat([inputs[layer], torch.ones(n, 1, dtype=torch.float64)], 1)
        activation = a.T @ a / n
        b = torch.stack([g[layer][:, -1] for g in grads_first])  # the bias gradient is b (T = 1)
        gradient = b.T @ b / (n * draws)
        result[layer] = (activation, gradient)
    if not eigen_corrected:
        return {layer: (lambda v, A=A, S=S: S @ v @ A) for layer, (A, S) in result.items()}
    grads_second = [layer_grads(x[i], y) for i, y in draw_pass()]
    out = {}
    for layer, (A, S) in result.items():
        q_a, q_s = torch.linalg.eigh(A)[1], torch.linalg.eigh(S)[1]
        values = sum((q_s.T @ g[layer] @ q_a) ** 2 for g in grads_second) / (n * draws)
        out[layer] = lambda v, q_a=q_a, q_s=q_s, values=values: (
            q_s @ ((q_s.T @ v @ q_a) * values) @ q_a.T
        )
    return out


@pytest.mark.parametrize("curvature", ["kfac", pytest.param("ekfac", marks=pytest.mark.slow)])
def test_sampled_kronecker_fisher_equals_a_brute_force_fit(curvature):
    # Labels drawn as influence's K-FAC draws them (several per example on a small probe, fresh
    # ones for the EK-FAC refit), factors from per-example gradients written out by hand.
    model, (x, _) = _mlp(3), _probe(6, 4)
    metric = shift.fisher(model, model, (x, torch.zeros(6, dtype=torch.long)),
                          curvature=curvature, batch_size=4, seed=11)  # fmt: skip
    expected = _brute_force_kronecker(model, x, 11, 4, curvature == "ekfac")
    space = ParamSpace.of(model)
    v = torch.randn(space.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    product, named = space.unflatten(metric.apply(v)), space.unflatten(v)
    for layer, apply in expected.items():
        matrix = torch.cat([named[f"{layer}.weight"], named[f"{layer}.bias"][:, None]], 1)
        got = torch.cat([product[f"{layer}.weight"], product[f"{layer}.bias"][:, None]], 1)
        # The same float64 sums in another order (and eigh's basis up to signs): round-off.
        assert_close(got, apply(matrix), rtol=1e-10, name=f"layer {layer}")


def test_decompose_refuses_a_zero_poisoning_shift():
    reference, unlearned = _mlp(0), _mlp(1)
    with pytest.raises(
        InfluxValueError, match="^shift.decompose: the poisoning shift is zero.*poisoned=$"
    ):
        shift.decompose(reference, copy.deepcopy(reference), unlearned)
    metric = shift.fisher(reference, reference, _probe(20, 1))
    with pytest.raises(InfluxValueError, match="the poisoning shift is zero"):
        metric.decompose(reference, reference.state_dict(), unlearned)


@pytest.mark.parametrize("role", [0, 1, 2])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_decompose_refuses_nan_or_inf_parameters(role, bad):
    states = [_mlp(s) for s in range(3)]
    with torch.no_grad():
        states[role][2].bias[1] = bad
    which = ("reference", "poisoned", "unlearned")[role]
    message = f"^shift.decompose: the {which} parameters hold NaN or inf \\(2.bias\\); pass a model"
    with pytest.raises(InfluxValueError, match=message):
        shift.decompose(*states)
    metric = shift.fisher(_mlp(0), _mlp(0), _probe(20, 1))
    with pytest.raises(InfluxValueError, match=message):
        metric.decompose(*states)


def test_a_dataset_probe_streams_and_gives_the_tensor_numbers():
    from utils import LazyDataset

    models = [_mlp(s) for s in range(3)]
    data = LazyDataset(30, shape=(5,), classes=3, seed=1)
    tensors = data.tensors()
    by_tensors = shift.fisher(models[0], models[0], tensors, batch_size=8)
    streamed = shift.fisher(models[0], models[0], data, batch_size=8)
    assert data.reads.max() <= 1  # the first batch's check reads no more than that batch
    expected = by_tensors.decompose(*models).as_dict()
    before = data.reads.clone()
    assert streamed.decompose(*models).as_dict() == expected  # the same batches: bit for bit
    assert torch.equal(data.reads - before, torch.full((30,), 1))  # one pass per product block
    before = data.reads.clone()
    report = shift.analyze(models[0], *models, {"probe": data}, batch_size=8)
    assert torch.equal(data.reads - before, torch.full((30,), 1))
    assert report.kl == shift.analyze(models[0], *models, {"probe": tensors}, batch_size=8).kl
    assert shift.predictive_kl(models[0], models[0], models[1], data, batch_size=8) == (
        shift.predictive_kl(models[0], models[0], models[1], tensors, batch_size=8)
    )
    with pytest.raises(InfluxValueError, match="the probe data is empty"):
        shift.predictive_entropy(models[0], models[0], LazyDataset(0, shape=(5,)))


def test_kronecker_fisher_leaves_a_grouped_convolution_out_like_influence_does():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3)).double()
    x = torch.randn(6, 2, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"parameters \['0.weight', '0.bias'\] are left out"):
        metric = shift.fisher(model, model, (x, torch.zeros(6, dtype=torch.long)), curvature="kfac")
    assert metric.excluded == ("0.weight", "0.bias") and list(metric.factors) == ["2"]
