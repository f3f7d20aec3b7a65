"""Commutators of SGD steps: closed forms, the second-order expansion, pairwise matrices, errors."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from utils import IndexedDataset, LazyDataset, assert_close, tiny_transformer

from influx import commutator
from influx.errors import InfluxValueError, UnsupportedModelError

DTYPE = torch.float64
CLOSED_FORM_RTOL = 1e-12


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(theta.x - y)^2 / 2 per example, for a model with one output."""
    return 0.5 * (outputs.squeeze(-1) - targets) ** 2


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DTYPE)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).to(DTYPE)


def linear_regression(dim: int = 4) -> nn.Module:
    model = nn.Linear(dim, 1, bias=False).to(DTYPE)
    nn.init.normal_(model.weight)
    return model


def classification_batch(size: int = 6, shape=(5,)):
    return torch.randn(size, *shape, dtype=DTYPE), torch.randint(0, 3, (size,))


def theta_of(model: nn.Module) -> torch.Tensor:
    return model.weight.detach().reshape(-1).clone()


def affine_commutator(theta, x1, y1, x2, y2, lr):
    """T_1(T_2 theta) - T_2(T_1 theta) with T_i theta = (I - lr x_i x_i^T) theta + lr y_i x_i."""

    def step(t, x, y):
        return t - lr * x * (t @ x) + lr * y * x

    return step(step(theta, x2, y2), x1, y1) - step(step(theta, x1, y1), x2, y2)


# ------------------------------------------------------------------ second-order expansion


def test_bracket_is_the_lr_squared_term_with_error_linear_in_lr():
    model = small_mlp()
    x, y = classification_batch(2)
    z1, z2 = (x[0], y[0]), (x[1], y[1])
    second_order = commutator.bracket(model, cross_entropy, z1, z2).vector
    errors = {}
    for lr in (1e-2, 1e-3):
        exact = commutator.step(model, cross_entropy, z1, z2, lr=lr).vector
        errors[lr] = (exact / lr**2 - second_order).norm().item()
    # O(lr^3) remainder: dividing lr by 10 divides the error of exact / lr^2 by about 10.
    ratio = errors[1e-2] / errors[1e-3]
    assert 8.0 < ratio < 12.5, f"error ratio {ratio:.3f} (errors {errors})"
    assert errors[1e-3] < 1e-2 * second_order.norm().item()


def test_bracket_for_batches_matches_step():
    model = small_cnn()
    x, y = classification_batch(6, shape=(1, 6, 6))
    z1, z2 = (x[:3], y[:3]), (x[3:], y[3:])
    second_order = commutator.bracket(model, cross_entropy, z1, z2).vector
    exact = commutator.step(model, cross_entropy, z1, z2, lr=1e-4).vector
    assert_close(exact / 1e-8, second_order, rtol=1e-3, name="batch commutator / lr^2")


# ------------------------------------------------------------------ linear regression closed forms


def test_linear_regression_commutator_matches_affine_closed_form():
    model = linear_regression()
    x, y = torch.randn(2, 4, dtype=DTYPE), torch.randn(2, dtype=DTYPE)
    theta, lr = theta_of(model), 0.3
    result = commutator.step(model, half_squared_error, (x[0], y[0]), (x[1], y[1]), lr=lr)
    assert_close(
        result.vector,
        affine_commutator(theta, x[0], y[0], x[1], y[1], lr),
        rtol=CLOSED_FORM_RTOL,
        name="step vs affine maps",
    )
    # lr^2 (x1.x2) [(theta.x2 - y2) x1 - (theta.x1 - y1) x2]; the bracket is exact (quadratic loss).
    residual = x @ theta - y
    formula = lr**2 * (x[0] @ x[1]) * (residual[1] * x[0] - residual[0] * x[1])
    assert_close(result.vector, formula, rtol=CLOSED_FORM_RTOL, name="step vs formula")
    bracket = commutator.bracket(model, half_squared_error, (x[0], y[0]), (x[1], y[1]))
    assert_close(lr**2 * bracket.vector, formula, rtol=CLOSED_FORM_RTOL, name="bracket vs formula")


def test_one_point_descent_then_ascent_matches_closed_form():
    model = linear_regression()
    x, y = torch.randn(1, 4, dtype=DTYPE), torch.randn(1, dtype=DTYPE)
    theta, lr = theta_of(model), 0.2
    result = commutator.ascent_residual(model, half_squared_error, (x, y), lr=lr)
    expected = -(lr**2) * (theta @ x[0] - y[0]) * (x[0] @ x[0]) * x[0]
    assert_close(result.vector, expected, rtol=CLOSED_FORM_RTOL, name="theta_2 - theta_0")
    assert result.residual.item() > 0


def test_per_point_mode_matches_closed_form_for_every_point():
    model = linear_regression()
    x, y = torch.randn(5, 4, dtype=DTYPE), torch.randn(5, dtype=DTYPE)
    theta, lr = theta_of(model), 0.1
    result = commutator.ascent_residual(
        model, half_squared_error, (x, y), lr=lr, mode="point", chunk_size=2
    )
    expected = lr**2 * (x @ theta - y).abs() * (x * x).sum(1) * x.norm(dim=1)
    assert_close(result.residual, expected, rtol=CLOSED_FORM_RTOL, name="per-point residuals")
    batch_mode = commutator.ascent_residual(
        model, half_squared_error, (x, y), lr=lr, mode="batch", batch_size=1
    )
    assert_close(
        batch_mode.residual, expected, rtol=CLOSED_FORM_RTOL, name="batch mode, batches of one"
    )
    assert_close(
        result.displacement, lr * (x @ theta - y).abs() * x.norm(dim=1), name="descent displacement"
    )


def test_orthogonal_inputs_commute_exactly():
    model = linear_regression()
    x1 = torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=DTYPE)
    x2 = torch.tensor([0.0, 0.0, -3.0, 0.5], dtype=DTYPE)
    y1, y2 = torch.tensor(0.7, dtype=DTYPE), torch.tensor(-1.1, dtype=DTYPE)
    result = commutator.step(model, half_squared_error, (x1, y1), (x2, y2), lr=0.4)
    assert result.norm == 0.0
    # Proportional examples (x2, y2) = c (x1, y1) commute too (up to rounding).
    scaled = commutator.step(model, half_squared_error, (x1, y1), (2.5 * x1, 2.5 * y1), lr=0.4)
    assert scaled.norm < 1e-14


# ------------------------------------------------------------------ structure


@pytest.mark.parametrize("function", ["step", "bracket"])
def test_commutator_is_antisymmetric_and_zero_on_the_diagonal(function):
    model = small_mlp()
    x, y = classification_batch(2)
    z1, z2 = (x[0], y[0]), (x[1], y[1])
    kwargs = {"lr": 0.05} if function == "step" else {}
    forward = getattr(commutator, function)(model, cross_entropy, z1, z2, **kwargs)
    backward = getattr(commutator, function)(model, cross_entropy, z2, z1, **kwargs)
    assert_close(backward.vector, -forward.vector, name="C(z2, z1) = -C(z1, z2)")
    assert getattr(commutator, function)(model, cross_entropy, z1, z1, **kwargs).norm == 0.0
    assert forward.kind == function and "norm=" in repr(forward)


@pytest.mark.parametrize("lr", [None, 0.05], ids=["bracket", "step"])
@pytest.mark.parametrize(
    "make_model, shape", [(small_mlp, (5,)), (small_cnn, (1, 6, 6))], ids=["mlp", "cnn"]
)
def test_pairwise_matrix_equals_per_pair_calls(make_model, shape, lr):
    model = make_model()
    x, y = classification_batch(5, shape=shape)
    # chunk_size 4 gives tiles of 2 x 2 pairs: 5 examples leave a ragged last block.
    result = commutator.pairwise(model, cross_entropy, (x, y), lr=lr, chunk_size=4)
    expected = torch.zeros(5, 5, dtype=DTYPE)
    for i in range(5):
        for j in range(i + 1, 5):
            pair = (x[i], y[i]), (x[j], y[j])
            call = (
                commutator.bracket(model, cross_entropy, *pair)
                if lr is None
                else commutator.step(model, cross_entropy, *pair, lr=lr)
            )
            expected[i, j] = expected[j, i] = call.norm
    assert_close(result.norms, expected, rtol=1e-9, name="pairwise vs per-pair")


def test_pairwise_label_summaries():
    model = small_mlp()
    x = torch.randn(6, 5, dtype=DTYPE)
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    result = commutator.pairwise(model, cross_entropy, (x, y))
    same = [result.norms[i, j] for i in range(6) for j in range(i + 1, 6) if y[i] == y[j]]
    different = [result.norms[i, j] for i in range(6) for j in range(i + 1, 6) if y[i] != y[j]]
    assert result.same_label.count == len(same) == 4
    assert result.different_label.count == len(different) == 11
    assert result.same_label.mean == pytest.approx(torch.stack(same).mean().item(), rel=1e-12)
    assert result.different_label.median == pytest.approx(
        torch.stack(different).median().item(), rel=1e-12
    )
    assert_close(
        result.normalized.diagonal(), torch.zeros(6, dtype=DTYPE), name="normalized diagonal"
    )


def test_order_shift_with_two_batches_is_the_step_commutator():
    model = small_mlp()
    x, y = classification_batch(4)
    lr = 1e-3
    result = commutator.order_shift(
        model, cross_entropy, (x, y), lr=lr, epochs=1, perms=6, batch_size=2
    )
    swap = commutator.step(model, cross_entropy, (x[:2], y[:2]), (x[2:], y[2:]), lr=lr).norm
    second_order = (
        lr**2 * commutator.bracket(model, cross_entropy, (x[:2], y[:2]), (x[2:], y[2:])).norm
    )
    for order, measured, predicted in zip(
        result.orders, result.measured, result.predicted, strict=True
    ):
        swapped = order == [1, 0]
        assert measured.item() == pytest.approx(swap if swapped else 0.0, rel=1e-9, abs=1e-18)
        assert predicted.item() == pytest.approx(
            second_order if swapped else 0.0, rel=1e-9, abs=1e-18
        )
    assert {tuple(o) for o in result.orders} == {(0, 1), (1, 0)}


def test_order_shift_prediction_is_accurate_at_small_lr():
    model = small_mlp()
    x, y = classification_batch(8)
    result = commutator.order_shift(
        model, cross_entropy, (x, y), lr=1e-3, epochs=2, perms=3, batch_size=2
    )
    # A random order may repeat the reference order (shift exactly 0); judge the others.
    moved = result.measured > 0
    assert moved.sum() >= 2
    assert result.relative_error[moved].max() < 0.05, repr(result)


def test_reversed_ascent_tracks_each_epoch():
    model = small_mlp()
    x, y = classification_batch(6)
    result = commutator.ascent_residual(
        model,
        cross_entropy,
        (x, y),
        lr=0.1,
        epochs=2,
        ascent_epochs=3,
        batch_size=2,
        order="reversed",
    )
    assert result.trajectory.shape == (3,)
    assert result.trajectory[-1].item() == result.residual.item()
    # Reversed ascent undoes descent to second order; after exactly `epochs` ascent epochs it is
    # far closer to the start than descent went.
    assert result.trajectory[1] < 0.2 * result.displacement


def test_parameters_and_buffers_are_untouched():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = classification_batch(4, shape=(1, 6, 6))
    commutator.step(model, cross_entropy, (x[:2], y[:2]), (x[2:], y[2:]), lr=0.1)
    commutator.bracket(model, cross_entropy, (x[0], y[0]), (x[1], y[1]))
    commutator.pairwise(model, cross_entropy, (x, y), lr=0.1)
    commutator.order_shift(model, cross_entropy, (x, y), lr=0.1, epochs=1, perms=1, batch_size=2)
    commutator.ascent_residual(model, cross_entropy, (x, y), lr=0.1, mode="point")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ against dense Hessians


def layer_norm_mlp() -> nn.Module:
    """Linear -> LayerNorm (affine weight and bias far from their 1 / 0 start) -> Tanh -> Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    with torch.no_grad():
        model[1].weight.copy_(1 + 0.5 * torch.randn(5, dtype=DTYPE))
        model[1].bias.copy_(0.5 * torch.randn(5, dtype=DTYPE))
    return model


class LearnedTemperature(nn.Module):
    """A classifier whose hidden pre-activations are scaled by a learned 0-dim parameter."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(5, 4)
        self.temperature = nn.Parameter(torch.tensor(0.7))
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x) * self.temperature))


def flat_example_loss(model: nn.Module):
    """``(f(theta, x, y), theta)``: one example's loss over the flat parameters, split here."""
    named = dict(model.named_parameters())
    shapes = [p.shape for p in named.values()]
    numels = [p.numel() for p in named.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def loss_of(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        state = {n: p.view(s) for n, p, s in zip(named, flat.split(numels), shapes)}
        return cross_entropy(torch.func.functional_call(model, state, (x[None],)), y[None])[0]

    return loss_of, theta


def dense_hessians_and_gradients(model: nn.Module, inputs, targets):
    """[B, P, P] Hessians and [B, P] gradients of each example's loss, by
    torch.autograd.functional."""
    loss_of, theta = flat_example_loss(model)
    hessians, gradients = [], []
    for x, y in zip(inputs, targets):
        loss = functools.partial(loss_of, x=x, y=y)
        hessians.append(torch.autograd.functional.hessian(loss, theta))
        gradients.append(torch.autograd.functional.jacobian(loss, theta))
    return torch.stack(hessians), torch.stack(gradients)


def dense_bracket_norms(hessians: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """[B, B] ``||H_i g_j - H_j g_i||`` from dense per-example Hessians."""
    h_i_g_j = torch.einsum("ipq,jq->ijp", hessians, gradients)
    return (h_i_g_j - h_i_g_j.transpose(0, 1)).norm(dim=-1)


# float64 products summed in another order than the dense brute force: ~1e-15 relative. The
# forward-mode error these guard against (torch's jvp of a vmapped gradient through layer_norm)
# is 1e-3.
DENSE_RTOL = 1e-10


def test_pairwise_brackets_through_layer_norm_match_dense_hessians():
    model = layer_norm_mlp()
    x, y = classification_batch(5, shape=(4,))
    expected = dense_bracket_norms(*dense_hessians_and_gradients(model, x, y))
    # chunk_size 4: tiles of 2 x 2, a ragged last block, and tiles with rows != cols.
    result = commutator.pairwise(model, cross_entropy, (x, y), chunk_size=4)
    assert_close(result.norms, expected, rtol=DENSE_RTOL, name="pairwise vs dense, LayerNorm")


def test_reference_bracket_norms_through_layer_norm_match_dense_hessians():
    model = layer_norm_mlp()
    x, y = classification_batch(7, shape=(4,))
    hessians, gradients = dense_hessians_and_gradients(model, x, y)
    # Examples 0..3 are scored against the reference batch 4..6 (mean loss).
    h_reference, g_reference = hessians[4:].mean(0), gradients[4:].mean(0)
    expected = (hessians[:4] @ g_reference - gradients[:4] @ h_reference).norm(dim=1)
    # batch_size 3: a ragged last batch
    norms = commutator.reference_bracket_norms(
        model, cross_entropy, (x[:4], y[:4]), (x[4:], y[4:]), batch_size=3
    )
    assert_close(norms, expected, rtol=DENSE_RTOL, name="reference brackets vs dense, LayerNorm")


def test_reference_bracket_norms_are_the_bracket_norms_example_by_example():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    inputs, targets = torch.randn(6, 5, dtype=DTYPE), torch.randint(0, 3, (6,))
    reference = (torch.randn(4, 5, dtype=DTYPE), torch.randint(0, 3, (4,)))
    norms = commutator.reference_bracket_norms(model, cross_entropy, (inputs, targets), reference)
    expected = torch.tensor([
        commutator.bracket(model, cross_entropy, (x[None], y[None]), reference).norm
        for x, y in zip(inputs, targets)
    ], dtype=DTYPE)  # fmt: skip
    # float64, the same HVPs in another arrangement: a few hundred ulps.
    assert_close(norms, expected, rtol=1e-10, name="reference brackets vs bracket")


def test_reference_bracket_norms_stream_a_dataset_reading_each_example_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    data = LazyDataset(23, shape=(6,), classes=3)
    reference = (torch.randn(4, 6, dtype=DTYPE), torch.tensor([0, 1, 2, 0]))
    streamed = commutator.reference_bracket_norms(
        model, cross_entropy, data, reference, batch_size=5
    )
    assert data.reads.tolist() == [1] * 23, "one read per example, no concatenation"
    whole = commutator.reference_bracket_norms(model, cross_entropy, data.tensors(), reference)
    assert torch.equal(streamed, whole), "batches change nothing: each row is its own example"
    with pytest.raises(InfluxValueError, match="data is empty"):
        empty = (torch.zeros(0, 6, dtype=DTYPE), torch.zeros(0, dtype=torch.long))
        commutator.reference_bracket_norms(model, cross_entropy, empty, reference)


def test_pairwise_through_a_transformer_layer_matches_reverse_mode_products():
    # A TransformerEncoderLayer holds two LayerNorms; H_i g_j by double backward (reverse mode
    # only, on torch's math attention kernel, which has one) is independent of the jvp used.
    torch.manual_seed(0)
    model = tiny_transformer(tokens=3, width=4)
    x, y = torch.randn(4, 3, 4, dtype=DTYPE), torch.randint(0, 3, (4,))
    loss_of, theta = flat_example_loss(model)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            points = [theta.clone().requires_grad_(True) for _ in range(4)]
            grads = [
                torch.autograd.grad(loss_of(t, x[i], y[i]), t, create_graph=True)[0]
                for i, t in enumerate(points)
            ]
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    plain = torch.stack([g.detach() for g in grads])
    h_i_g_j = torch.stack([
        torch.stack([torch.autograd.grad(g @ v, t, retain_graph=True)[0] for v in plain])
        for t, g in zip(points, grads)
    ])  # fmt: skip
    expected = (h_i_g_j - h_i_g_j.transpose(0, 1)).norm(dim=-1)
    result = commutator.pairwise(model, cross_entropy, (x, y))
    assert_close(result.norms, expected, rtol=DENSE_RTOL, name="pairwise vs reverse mode")


def test_a_zero_dim_parameter_gets_brute_force_brackets_and_steps():
    torch.manual_seed(0)
    model = LearnedTemperature().to(DTYPE)
    x, y = classification_batch(4)
    hessians, gradients = dense_hessians_and_gradients(model, x, y)
    assert_close(commutator.pairwise(model, cross_entropy, (x, y)).norms,
                 dense_bracket_norms(hessians, gradients), rtol=DENSE_RTOL,
                 name="pairwise brackets")  # fmt: skip
    bracket = commutator.bracket(model, cross_entropy, (x[0], y[0]), (x[1], y[1]))
    assert_close(bracket.vector, hessians[0] @ gradients[1] - hessians[1] @ gradients[0],
                 rtol=DENSE_RTOL, name="bracket")  # fmt: skip
    loss_of, theta = flat_example_loss(model)

    def sgd_step(t, i, lr=0.1):
        return t - lr * torch.autograd.functional.jacobian(lambda s: loss_of(s, x[i], y[i]), t)

    expected = sgd_step(sgd_step(theta, 1), 0) - sgd_step(sgd_step(theta, 0), 1)
    step = commutator.step(model, cross_entropy, (x[0], y[0]), (x[1], y[1]), lr=0.1)
    assert_close(step.vector, expected, rtol=DENSE_RTOL, name="step")


# ------------------------------------------------------------------ errors


def test_errors_say_what_is_wrong():
    model = small_mlp()
    x, y = classification_batch(4)
    z = (x[0], y[0])
    with pytest.raises(InfluxValueError, match="lr must be a finite number > 0"):
        commutator.step(model, cross_entropy, z, z, lr=0.0)
    with pytest.raises(InfluxValueError, match="z2 must be a pair"):
        commutator.step(model, cross_entropy, z, x, lr=0.1)
    with pytest.raises(InfluxValueError, match="disagree on the batch size"):
        commutator.bracket(model, cross_entropy, (x, y[:2]), z)
    with pytest.raises(InfluxValueError, match="empty batch"):
        commutator.bracket(model, cross_entropy, (x[:0], y[:0]), z)
    with pytest.raises(InfluxValueError, match="per-example losses"):
        commutator.bracket(model, lambda o, t: F.cross_entropy(o, t), z, z)
    with pytest.raises(InfluxValueError, match="chunk_size must be an integer >= 1"):
        commutator.pairwise(model, cross_entropy, (x, y), chunk_size=0)
    with pytest.raises(InfluxValueError, match="order must be one of"):
        commutator.ascent_residual(model, cross_entropy, (x, y), lr=0.1, order="backwards")
    with pytest.raises(InfluxValueError, match="mode must be one of"):
        commutator.ascent_residual(model, cross_entropy, (x, y), lr=0.1, mode="points")
    with pytest.raises(InfluxValueError, match="epochs must be an integer >= 1"):
        commutator.order_shift(
            model, cross_entropy, (x, y), lr=0.1, epochs=0, perms=1, batch_size=2
        )
    with pytest.raises(InfluxValueError, match="data is empty"):
        commutator.ascent_residual(model, cross_entropy, (x[:0], y[:0]), lr=0.1)
    with pytest.raises(InfluxValueError, match="batch_size must be an integer >= 1"):
        commutator.order_shift(
            model, cross_entropy, (x, y), lr=0.1, epochs=1, perms=1, batch_size=0
        )


SHUFFLED_INDICES = [50, 3, 17, 99, 8, 21]


def test_point_residuals_carry_the_dataset_indices():
    model = linear_regression()
    x, y = torch.randn(6, 4, dtype=DTYPE), torch.randn(6, dtype=DTYPE)
    theta, lr = theta_of(model), 0.1
    data = IndexedDataset(x, y, SHUFFLED_INDICES)
    result = commutator.ascent_residual(model, half_squared_error, data, lr=lr, mode="point")
    assert result.indices.tolist() == SHUFFLED_INDICES
    expected = lr**2 * (x @ theta - y).abs() * (x * x).sum(1) * x.norm(dim=1)
    assert_close(result.residual, expected, rtol=CLOSED_FORM_RTOL, name="aligned to indices")
    plain = commutator.ascent_residual(model, half_squared_error, (x, y), lr=lr, mode="point")
    assert plain.indices.tolist() == list(range(6))


def test_every_entry_point_refuses_non_finite_data_naming_the_examples():
    model = small_mlp()
    x, y = classification_batch(6)
    x[2, 0] = float("nan")
    clean = (x[3], y[3])
    named_by_position = r"inputs of 1 example\(s\) hold NaN or inf: example indices \[2\]"
    with pytest.raises(InfluxValueError, match="z1: " + named_by_position):
        commutator.step(model, cross_entropy, (x, y), clean, lr=0.1)
    with pytest.raises(InfluxValueError, match="z2: " + named_by_position):
        commutator.bracket(model, cross_entropy, clean, (x, y))
    with pytest.raises(InfluxValueError, match="batch: " + named_by_position):
        commutator.pairwise(model, cross_entropy, (x, y))
    data = IndexedDataset(x, y, SHUFFLED_INDICES)
    named_by_index = r"inputs of 1 example\(s\) hold NaN or inf: example indices \[17\]"
    with pytest.raises(InfluxValueError, match=named_by_index):
        commutator.order_shift(model, cross_entropy, data, lr=0.1, epochs=1, perms=1, batch_size=2)
    for mode in ("dataset", "batch", "point"):
        with pytest.raises(InfluxValueError, match=named_by_index):
            commutator.ascent_residual(model, cross_entropy, data, lr=0.1, mode=mode)
    inputs = torch.randn(3, 5, dtype=DTYPE)
    targets = torch.tensor([0.1, float("inf"), 0.2], dtype=DTYPE)
    with pytest.raises(InfluxValueError, match=r"z1: targets of 1 example.*indices \[1\]"):
        commutator.step(linear_regression(5), half_squared_error, (inputs, targets),
                        (inputs[:1], targets[:1]), lr=0.1)  # fmt: skip


def test_training_batchnorm_is_rejected_with_the_fix():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).to(DTYPE)
    x, y = classification_batch(4)
    with pytest.raises(
        UnsupportedModelError, match=r"BatchNorm1d \(1\) in train mode.*convert_batchnorm"
    ):
        commutator.pairwise(model, cross_entropy, (x, y))
    model.eval()
    assert commutator.pairwise(model, cross_entropy, (x, y)).norms.shape == (4, 4)


# ------------------------------------------------------------------ scientific checks


@pytest.mark.slow
def test_linear_model_commutes_at_convergence_on_realizable_data():
    """O3, small: on noiseless linear regression every residual -> 0, so every commutator -> 0."""
    torch.manual_seed(1)
    model = linear_regression(6)
    x = torch.randn(32, 6, dtype=DTYPE)
    y = x @ torch.randn(6, dtype=DTYPE)
    start = commutator.pairwise(model, half_squared_error, (x, y)).norms.mean().item()
    optimum = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.reshape(1, 6)
    with torch.no_grad():
        model.weight.copy_(optimum)
    end = commutator.pairwise(model, half_squared_error, (x, y)).norms.mean().item()
    assert end < 1e-10 * start


def test_point_and_batch_residuals_stream_a_dataset_reading_each_example_once():
    model = nn.Sequential(nn.Linear(6, 3)).double()
    data = LazyDataset(11, shape=(6,), classes=3)
    whole = data.tensors()
    for mode, batch_size in (("point", None), ("batch", 4), ("batch", None)):
        data.reads.zero_()
        streamed = commutator.ascent_residual(
            model, cross_entropy, data, lr=0.1, mode=mode, batch_size=batch_size
        )
        assert data.reads.tolist() == [1] * 11, f"{mode}: one read per example"
        held = commutator.ascent_residual(
            model, cross_entropy, whole, lr=0.1, mode=mode, batch_size=batch_size
        )
        assert torch.equal(streamed.residual, held.residual), mode
        assert streamed.residual.shape == (
            (11,) if mode == "point" else (-(-11 // (batch_size or 11)),)
        )
