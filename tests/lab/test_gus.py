"""influx.audit.gus: per-point scores against a per-example loop; the statistics against their
definitions; and the science: N(0, 1) under the null, a clear shift on a model trained on the
poisons, and back to the null for the model retrained without them."""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader
from utils import LazyDataset, assert_close

from influx import data, models, poison, train
from influx.audit.gus import GusResult, gus, gus_of
from influx.errors import InfluxRuntimeError, InfluxValueError

DTYPE = torch.float64
LOSS = train.cross_entropy_per_example
# the module (influx.audit re-exports its function under the same name)
gus_module = importlib.import_module("influx.audit.gus")


def _points(n=29, shape=(2, 5), classes=4, std=0.4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, *shape, generator=generator, dtype=DTYPE)
    targets = torch.randint(0, classes, (n,), generator=generator)
    noise = std * torch.randn(n, *shape, generator=generator, dtype=DTYPE)
    return inputs, targets, noise


def _model(in_features=10, classes=4):
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_features, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, classes)
    ).to(DTYPE)


def _loop_scores(model, inputs, targets, noise, std):
    """Reference: one backward per point (eval mode), then the definition of I_z."""
    model.eval()
    scores = []
    for x, y, xi in zip(inputs, targets, noise):
        x = x.unsqueeze(0).clone().requires_grad_(True)
        (g,) = torch.autograd.grad(LOSS(model(x), y.unsqueeze(0)).sum(), x)
        scores.append(torch.dot(xi.flatten(), -g.flatten()) / (std * g.norm()))
    return torch.stack(scores)


def test_scores_equal_a_per_example_loop():
    inputs, targets, noise = _points()
    model = _model().train()
    result = gus(model, LOSS, inputs, targets, noise, 0.4, batch_size=7, null_seed=5)
    assert model.training  # mode restored
    # float64, the same products summed in a different order: a few ulps of O(1) scores.
    assert_close(result.scores, _loop_scores(model, inputs, targets, noise, 0.4), rtol=1e-12)
    # The null noise is the documented draw: float64 on a CPU generator seeded by null_seed.
    fresh = 0.4 * torch.randn(
        inputs.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    expected_null = _loop_scores(model, inputs, targets, fresh, 0.4)
    assert_close(result.null_scores, expected_null, rtol=1e-12)
    assert torch.equal(result.indices, torch.arange(29))


def test_float32_data_draws_the_null_in_float32():
    inputs, targets, noise = _points()
    model = _model().float()
    result = gus(model, LOSS, inputs.float(), targets, noise.float(), 0.4, null_seed=5)
    fresh = 0.4 * torch.randn(inputs.shape, generator=torch.Generator().manual_seed(5))
    expected = _loop_scores(model, inputs.float(), targets, fresh, 0.4)
    # float32 scores of order 1 from sums over 10 products: within 1e-5 relative.
    assert result.null_scores.dtype == torch.float32
    assert_close(result.null_scores, expected, rtol=1e-5)


def test_statistics_follow_their_definitions():
    inputs, targets, noise = _points(n=50, std=2.0)
    result = gus(_model(), LOSS, inputs, targets, noise, 2.0, fpr=0.05)
    for scores, prefix in ((result.scores, ""), (result.null_scores, "null_")):
        values = scores.numpy()
        mean = values.mean()
        z = math.sqrt(50) * mean
        assert getattr(result, f"{prefix}gus") == pytest.approx(mean, rel=1e-12)
        assert getattr(result, f"{prefix}z") == pytest.approx(z, rel=1e-12)
        assert getattr(result, f"{prefix}p_value") == pytest.approx(stats.norm.sf(z), rel=1e-10)
        threshold = stats.norm.ppf(0.95)
        assert getattr(result, f"{prefix}tpr_at_fpr") == (values > threshold).mean()
        ks = stats.kstest(values, "norm").pvalue
        assert getattr(result, f"{prefix}ks_p_value") == pytest.approx(ks, rel=1e-10)
    assert result.threshold == pytest.approx(1.6448536269514722, rel=1e-12)
    assert result.n == 50 and result.fpr == 0.05 and result.noise_std == 2.0
    assert "GusResult(n=50" in repr(result)


def test_gus_of_a_gaussian_poison_equals_gus_on_its_fields():
    inputs, targets, _ = _points(n=40)
    poisoned = poison.gaussian((inputs, targets, 100 + torch.arange(40)), count=11, noise_std=0.3)
    model = _model()
    direct = gus(
        model, LOSS, poisoned.base_inputs, poisoned.targets, poisoned.noise, 0.3, null_seed=2
    )
    result = gus_of(model, LOSS, poisoned, null_seed=2)
    assert isinstance(result, GusResult)
    assert torch.equal(result.scores, direct.scores)
    assert torch.equal(result.null_scores, direct.null_scores)
    assert torch.equal(result.indices, poisoned.indices)
    assert result.z == direct.z


def test_zero_input_gradients_score_nan_with_a_warning():
    inputs, _, noise = _points(n=12)
    # Loss = weight_i * sum(outputs_i): a zero weight makes that point's input gradient exactly 0.
    weights = torch.ones(12, dtype=DTYPE)
    weights[[2, 7]] = 0.0
    weighted = lambda outputs, w: outputs.sum(dim=1) * w
    model = _model()
    with pytest.warns(RuntimeWarning, match=r"2 point\(s\) have a zero input gradient.*\[2, 7\]"):
        result = gus(model, weighted, inputs, weights, noise, 0.4)
    assert torch.isnan(result.scores[[2, 7]]).all()
    assert torch.isfinite(result.scores[weights > 0]).all()
    assert result.n == 10
    assert result.gus == pytest.approx(result.scores[weights > 0].mean().item(), rel=1e-12)
    with pytest.raises(InfluxValueError, match="every point has a zero input gradient"):
        gus(model, weighted, inputs, torch.zeros(12, dtype=DTYPE), noise, 0.4)


def _confident_linear(weight: torch.Tensor, gap: float) -> nn.Linear:
    """A float32 linear model whose class-0 logit leads the others by about ``gap``."""
    model = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.zero_()
        model.bias[0] = gap
    return model


def _analytic_scores(model: nn.Linear, inputs, noise, std) -> torch.Tensor:
    """I_z in float64 from grad_x l = sum_{j != y} p_j (W_j - W_y) (targets y = 0), with p from a
    float64 log-softmax of float64 logits: no autograd, no softmax backward."""
    weight = model.weight.detach().double()
    logits = inputs.double() @ weight.T + model.bias.detach().double()
    p = torch.exp(logits - torch.logsumexp(logits, dim=1, keepdim=True))
    gradient = p[:, 1:] @ (weight[1:] - weight[0])
    return (noise.double() * -gradient).sum(1) / (std * gradient.norm(dim=1))


@pytest.mark.parametrize("gap", [48.0, 50.0, 52.0, 54.0, 56.0])
def test_float32_scores_of_a_very_confident_model_match_float64(gap):
    # Only class 1 reads the input, so grad_x l = p_1 w: entries ~e^-gap (1e-21 .. 5e-25) are
    # representable in float32, their squares (< 1e-42) are not.
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(8, 4, generator=generator)
    noise = 0.5 * torch.randn(8, 4, generator=generator)
    weight = torch.zeros(3, 4)
    weight[1] = torch.randn(4, generator=generator)
    model = _confident_linear(weight, gap)
    targets = torch.zeros(8, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no point may be taken for a zero gradient
        result = gus(model, LOSS, inputs, targets, noise, 0.5)
    expected = _analytic_scores(model, inputs, noise, 0.5)
    assert result.n == 8
    # The direction is w up to float32 rounding of each entry of p_1 w: ~1e-7 relative.
    assert_close(result.scores, expected, rtol=1e-6, name=f"gap {gap}")
    assert result.gus == pytest.approx(expected.mean().item(), rel=1e-6)


@pytest.mark.parametrize("gap", [10.0, 14.0, 20.0])
def test_float32_keeps_the_target_class_term_of_a_confident_softmax(gap):
    # Every class reads the input: in a float32 softmax backward p_0 rounds to 1 from a gap of
    # ~17 on and p_0 - 1 loses its digits before, dropping the -W_0 (1 - p_0) term of grad_x l.
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(32, 4, generator=generator)
    noise = 0.5 * torch.randn(32, 4, generator=generator)
    model = _confident_linear(torch.randn(3, 4, generator=generator), gap)
    targets = torch.zeros(32, dtype=torch.long)
    result = gus(model, LOSS, inputs, targets, noise, 0.5)
    # float32 logits near `gap` carry an absolute rounding of ~gap * 6e-8 (1e-6 at 20), which
    # enters each p_j as a relative error: scores of order 1 agree to a few 1e-6.
    assert_close(result.scores, _analytic_scores(model, inputs, noise, 0.5), atol=1e-5, rtol=0)


def test_a_loss_that_only_runs_in_float32_is_told_to_pass_loss_dtype_none():
    weights = torch.ones(4)  # float32 class weights: cross_entropy refuses float64 outputs

    def weighted(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets, weight=weights, reduction="none")

    inputs, targets, noise = _points()
    model = _model().float()
    arguments = (model, weighted, inputs.float(), targets, noise.float(), 0.4)
    with pytest.raises(InfluxValueError, match="fails on torch.float64 outputs.*loss_dtype=None"):
        gus(*arguments)
    expected = gus(model, LOSS, *arguments[2:], loss_dtype=None)
    assert torch.equal(gus(*arguments, loss_dtype=None).scores, expected.scores)


def test_non_finite_inputs_name_the_point():
    inputs, targets, noise = _points(n=10)
    inputs[6, 1, 2] = float("nan")
    with pytest.raises(InfluxRuntimeError, match=r"example indices \[6\]"):
        gus(_model(), LOSS, inputs, targets, noise, 0.4)
    # with dataset indices, the point is named by its own
    with pytest.raises(InfluxRuntimeError, match=r"example indices \[106\]"):
        gus(_model(), LOSS, inputs, targets, noise, 0.4, indices=torch.arange(100, 110))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(noise=torch.zeros(29, 10, dtype=DTYPE)), "noise must be a tensor shaped like"),
        (dict(targets=torch.zeros(28, dtype=torch.long)), "targets must be a tensor with 29 rows"),
        (dict(noise_std=0.0), "noise_std must be a finite number > 0"),
        (dict(noise_std=-0.4), "noise_std must be a finite number > 0"),
        (dict(fpr=0.0), r"fpr must lie in \(0, 1\)"),
        (dict(fpr=1.0), r"fpr must lie in \(0, 1\)"),
        (dict(null_seed=-1), "null_seed must be an integer >= 0"),
        (dict(indices=torch.arange(5)), r"indices must be a tensor of shape \[29\]"),
        (dict(base_inputs=torch.zeros(0, 2, 5, dtype=DTYPE)), "at least one poisoned point"),
        (dict(base_inputs=torch.zeros(29, 2, 5, dtype=torch.long)), "floating-point tensor"),
        (dict(base_inputs=torch.zeros(29, dtype=DTYPE)), r"base_inputs must be \[n, \*input"),
        (dict(loss_dtype=torch.long), "loss_dtype must be a floating-point torch.dtype"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else "",
)
def test_bad_arguments_are_refused(change, message):
    inputs, targets, noise = _points()
    arguments = dict(base_inputs=inputs, targets=targets, noise=noise, noise_std=0.4)
    arguments.update(change)
    names = ("fpr", "null_seed", "indices", "loss_dtype")
    keywords = {k: arguments.pop(k) for k in names if k in arguments}
    with pytest.raises(InfluxValueError, match=message):
        gus(
            _model(), LOSS, arguments["base_inputs"], arguments["targets"], arguments["noise"],
            arguments["noise_std"], **keywords,
        )  # fmt: skip


def test_gus_of_refuses_other_poisons():
    inputs, targets, _ = _points(n=20)
    flipped = poison.label_flip((inputs, targets), count=3, num_classes=4)
    with pytest.raises(InfluxValueError, match="needs the result of influx.poison.gaussian"):
        gus_of(_model(), LOSS, flipped)


# ----------------------------------------------------------------------------------------------
# The science, on the digits with a small MLP (under a second of training each).
# ----------------------------------------------------------------------------------------------

POISONS, NOISE_STD = 400, 1.0


def _train(dataset, seed=0):
    # Held as tensors: the trainer then slices batches instead of collating items one by one.
    inputs, targets, _ = data.as_tensors(dataset)
    torch.manual_seed(seed)
    model = models.mlp(64, (128,), 10, activation="relu")
    train.train(
        model, (inputs, targets), epochs=6, batch_size=128, lr=3e-3, seed=seed, progress=False
    )
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.fixture(scope="module")
def poisoned(digits):
    return poison.gaussian(digits, count=POISONS, noise_std=NOISE_STD, seed=0)


@pytest.fixture(scope="module")
def oracle(poisoned):
    """The retrain oracle: trained from scratch on the clean points only."""
    return _train(poisoned.retain)


@pytest.mark.slow
def test_a_model_never_trained_on_the_noise_gives_standard_normal_scores(digits, oracle):
    # 1,000 fresh noise draws (seed 7) the oracle has never seen.
    fresh = poison.gaussian(digits, count=1000, noise_std=NOISE_STD, seed=7)
    result = gus_of(oracle, LOSS, fresh)
    # I_z is exactly N(0, 1) here: a fixed-seed draw passes these 1%-level checks.
    assert result.ks_p_value > 0.01
    assert abs(result.gus) < 4 / math.sqrt(1000)
    assert result.null_ks_p_value > 0.01 and abs(result.null_gus) < 4 / math.sqrt(1000)


@pytest.mark.slow
def test_a_model_trained_on_the_poisons_carries_them(poisoned):
    result = gus_of(_train(poisoned.dataset), LOSS, poisoned)
    # Measured z ~ 8 (GUS ~ 0.4 over 400 points); the fresh-noise null stays near 0.
    assert result.z > 3 and result.p_value < 1e-3
    assert abs(result.null_z) < 4


@pytest.mark.slow
def test_the_retrain_oracle_returns_to_the_null(poisoned, oracle):
    result = gus_of(oracle, LOSS, poisoned)
    assert abs(result.z) < 4
    assert result.ks_p_value > 0.01


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


class NoWholeSet(LazyDataset):
    """Points generated from their index on every read; never materialized."""

    def tensors(self):
        raise AssertionError("the whole set was asked for")


def _lazy_noise(indices: torch.Tensor) -> torch.Tensor:
    """The training noise of each point, generated from its dataset index (no [n, d] tensor)."""
    rows = [
        0.4 * torch.randn(2, 5, generator=torch.Generator().manual_seed(7_919 * int(i) + 1),
                          dtype=DTYPE)
        for i in indices
    ]  # fmt: skip
    return torch.stack(rows)


class Batches(nn.Module):
    """Records the largest batch the model sees."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.largest = inner, 0

    def forward(self, x):
        self.largest = max(self.largest, x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize("batch_size", [7, 256])
def test_gus_of_a_dataset_equals_the_tensor_call_and_reads_each_point_once(batch_size):
    n = 61
    dataset = NoWholeSet(n, shape=(2, 5), classes=4)
    model = Batches(_model())
    result = gus(model, LOSS, dataset, _lazy_noise, 0.4, batch_size=batch_size, null_seed=5)
    assert torch.equal(dataset.reads, torch.ones(n, dtype=torch.long))
    assert model.largest == min(batch_size, n)
    inputs, targets = LazyDataset(n, shape=(2, 5), classes=4).tensors()
    noise = _lazy_noise(torch.arange(n))
    expected = gus(model, LOSS, inputs, targets, noise, 0.4, batch_size=batch_size, null_seed=5)
    # the same batches, the same arithmetic, the null drawn block by block: bit for bit
    assert torch.equal(result.scores, expected.scores)
    assert torch.equal(result.null_scores, expected.null_scores)
    assert torch.equal(result.indices, expected.indices)
    assert (result.gus, result.z, result.null_gus) == (expected.gus, expected.z, expected.null_gus)
    # and against the per-point loop
    assert_close(result.scores, _loop_scores(model, inputs, targets, noise, 0.4), rtol=1e-12)


def test_gus_of_a_tuple_or_dataloader_labels_points_by_their_dataset_indices():
    inputs, targets, noise = _points(n=20)
    expected = gus(_model(), LOSS, inputs, targets, noise, 0.4, indices=torch.arange(20) + 100)
    streamed = gus(_model(), LOSS, (inputs, targets, torch.arange(20) + 100), noise, 0.4)
    assert torch.equal(streamed.scores, expected.scores)
    assert torch.equal(streamed.null_scores, expected.null_scores)
    assert torch.equal(streamed.indices, torch.arange(20) + 100)
    loader = DataLoader(list(zip(inputs, targets)), batch_size=6, shuffle=False)
    by_loader = gus(_model(), LOSS, loader, noise=noise, noise_std=0.4, batch_size=6)
    by_tensors = gus(_model(), LOSS, inputs, targets, noise, 0.4, batch_size=6)
    assert torch.equal(by_loader.scores, by_tensors.scores)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("total", [1, 15, 16, 17, 33, 100, 4099])
def test_the_null_noise_drawn_in_blocks_is_one_draw_of_the_whole(monkeypatch, dtype, total):
    # small blocks, so that every case crosses several of them
    monkeypatch.setattr(gus_module, "_NULL_BLOCK", 32)
    whole = torch.randn(total, generator=torch.Generator().manual_seed(9), dtype=dtype)
    stream = gus_module._NullNoise(total, dtype, 9)
    pieces, left = [], total
    for size in [3, 40, 1, 17] * total:
        if left == 0:
            break
        pieces.append(stream.take(min(size, left)))
        left -= pieces[-1].numel()
    assert torch.equal(torch.cat(pieces), whole)


def test_repeated_indices_are_refused():
    inputs, targets, noise = _points(n=6)
    with pytest.raises(InfluxValueError, match=r"indices must be distinct; 1 repeat.*\[0\]"):
        gus(_model(), LOSS, inputs, targets, noise, 0.4, indices=torch.zeros(6, dtype=torch.long))


def test_noise_that_does_not_fit_the_points_is_refused():
    dataset = LazyDataset(8, shape=(2, 5), classes=4)
    with pytest.raises(InfluxValueError, match=r"noise must be a tensor \[n = 8"):
        gus(_model(), LOSS, dataset, torch.zeros(7, 2, 5, dtype=DTYPE), 0.4)
    with pytest.raises(InfluxValueError, match="rows shaped like the inputs"):
        gus(_model(), LOSS, dataset, lambda indices: torch.zeros(len(indices), 10), 0.4)
