"""DP-SGD: ghost-clipped sums against a per-example loop and Opacus, noise, accounting, training."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from utils import RTOL, KeywordNet, LazyDataset, assert_close

from influx import data, dp, models
from influx.errors import InfluxRuntimeError, InfluxValueError, UnsupportedModelError
from influx.grads.reference import naive_per_sample_grads
from influx.train import cross_entropy_per_example as ce
from influx.train import train

# ---------------------------------------------------------------------------------------------
# Models covering every path of the clipped sum: Linear and Conv (weight-gradient products),
# GroupNorm / LayerNorm / Embedding / a bare parameter (re-run of the module), weight tying.
# ---------------------------------------------------------------------------------------------


class Scale(nn.Module):
    """A module with a bare parameter (no influx rule): the torch.func fallback path."""

    def __init__(self, dim: int):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return torch.tanh(x * self.gain)


class Tied(nn.Module):
    """One Linear called twice, and one weight shared by two Linear modules."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.first = nn.Linear(6, 6, bias=False)
        self.second = nn.Linear(6, 6)
        self.second.weight = self.first.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inner(torch.tanh(self.inner(x))))
        return self.head(torch.tanh(self.second(torch.tanh(self.first(h)))))


class TokenModel(nn.Module):
    """Embedding + LayerNorm over a token axis, then a Linear applied per token."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.norm(self.embed(tokens)))).mean(1)


class AttentionModel(nn.Module):
    """Embedding, then a Transformer encoder layer (its attention reads out_proj's weight)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def case(name: str, dtype=torch.float64, n: int = 6):
    """(model, inputs, targets) of one model family, seeded."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(8, 7), Scale(7), nn.Linear(7, 3))
        x = torch.randn(n, 8, generator=generator)
    elif name == "cnn":
        model = models.cnn(in_channels=3, width=8)
        x = torch.randn(n, 3, 12, 12, generator=generator)
    elif name == "conv-variants":
        model = nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=1),
            nn.GroupNorm(2, 6),
            nn.Conv2d(6, 6, 3, padding="same", groups=2),
            nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect", bias=False),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, 3),
        )
        x = torch.randn(n, 3, 12, 12, generator=generator)
    elif name == "conv1d":
        model = nn.Sequential(
            nn.Conv1d(2, 4, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)
        )
        x = torch.randn(n, 2, 11, generator=generator)
    elif name == "resnet8":
        model = models.resnet(8, width=4)
        x = torch.randn(n, 3, 16, 16, generator=generator)
    elif name == "tied":
        model = Tied()
        x = torch.randn(n, 6, generator=generator)
    elif name == "tokens":
        model = TokenModel()
        x = torch.randint(0, 11, (n, 4), generator=generator)
    elif name == "attention":
        model = AttentionModel().eval()
        x = torch.randint(0, 11, (n, 4), generator=generator)
    elif name == "keywords":
        model = KeywordNet(width=8)
        x = torch.randn(n, 8, generator=generator)
    elif name == "weight-norm":
        model = nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the hook-based weight_norm
            torch.nn.utils.weight_norm(model[0])
        x = torch.randn(n, 8, generator=generator)
    else:
        raise ValueError(name)
    model = model.to(dtype)
    if x.is_floating_point():
        x = x.to(dtype)
    y = torch.randint(0, 3, (n,), generator=generator)
    return model, x, y


def loop_clipped_sum(model, x, y, max_grad_norm, loss_fn=ce):
    """The definition: per-example gradients one backward at a time, clipped, summed."""
    grads = naive_per_sample_grads(model, loss_fn, x, y)
    norms = torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()
    factors = torch.where(norms > max_grad_norm, max_grad_norm / norms, torch.ones_like(norms))
    return {k: (g * factors.view(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in grads.items()}, norms


MODELS = [
    "mlp", "cnn", "conv-variants", "conv1d", "resnet8", "tied", "tokens", "attention", "keywords",
    "weight-norm",
]  # fmt: skip


@pytest.mark.parametrize("name", MODELS)
def test_clipped_sum_equals_the_per_example_loop_in_float64(name):
    model, x, y = case(name)
    _, norms = loop_clipped_sum(model, x, y, 1.0)
    # a clipping norm between the smallest and largest per-example norm clips some, not all
    max_grad_norm = norms.median().item()
    expected, _ = loop_clipped_sum(model, x, y, max_grad_norm)
    got = dp.clipped_grad(model, ce, x, y, max_grad_norm=max_grad_norm)
    assert list(got) == list(expected)
    for key in expected:
        # float64; the same sums in another order (tests/utils.py): 1e-10
        assert_close(got[key], expected[key], name=f"{name} {key}")
    chunked = dp.clipped_grad(model, ce, x, y, max_grad_norm=max_grad_norm, chunk_size=4)
    for key in expected:
        assert_close(chunked[key], expected[key], name=f"{name} {key} chunked")


def test_zero_gradients_and_an_empty_batch():
    model, x, _ = case("mlp")
    y = torch.tensor([2, 0, 1, 2, 1, 0])

    def masked(outputs, targets):
        # class 2 (examples 0 and 3) has loss 0 for every parameter value: zero gradient and norm
        return ce(outputs, targets) * (targets != 2).to(outputs.dtype)

    expected, norms = loop_clipped_sum(model, x, y, 0.1, loss_fn=masked)
    assert norms[0] == 0 and norms[3] == 0
    got = dp.clipped_grad(model, masked, x, y, max_grad_norm=0.1)
    for key in expected:
        assert_close(got[key], expected[key], name=key)
    empty = dp.clipped_grad(model, ce, x[:0], y[:0], max_grad_norm=1.0)
    for key, p in model.named_parameters():
        assert torch.equal(empty[key], torch.zeros_like(p))


def test_a_huge_clipping_norm_gives_the_plain_summed_gradient():
    model, x, y = case("cnn")
    got = dp.clipped_grad(model, ce, x, y, max_grad_norm=1e12)
    expected = torch.autograd.grad(ce(model(x), y).sum(), list(model.parameters()))
    for (key, _), value in zip(model.named_parameters(), expected):
        assert_close(got[key], value, name=key)


def opacus_clipped_sum(model, x, y, max_grad_norm):
    """Opacus: GradSampleModule hooks + DPOptimizer's per-sample clipping, no noise."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    wrapped = GradSampleModule(model, loss_reduction="sum")
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
        max_grad_norm=max_grad_norm, expected_batch_size=x.shape[0], loss_reduction="sum",
    )  # fmt: skip
    optimizer.zero_grad()
    ce(wrapped(x), y).sum().backward()
    optimizer.pre_step()  # clip, accumulate, add (zero) noise: p.grad is the clipped sum
    out = {key: p.grad.detach().clone() for key, p in model.named_parameters()}
    wrapped._close()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_clipped_sum_matches_opacus(name, dtype):
    model, x, y = case(name, dtype=dtype, n=8)
    # norms of order 1 and more, so Opacus' C / (norm + 1e-6) is C / norm to ~1e-6 relative
    x = 3 * x
    max_grad_norm = 0.5
    ours = dp.clipped_grad(model, ce, x, y, max_grad_norm=max_grad_norm)
    theirs = opacus_clipped_sum(model, x, y, max_grad_norm)
    # float32: tests/utils.py 1e-5; float64: the 1e-6 in Opacus' denominator bounds the gap
    rtol = RTOL[torch.float32] if dtype == torch.float32 else 2e-6
    for key in theirs:
        assert_close(ours[key], theirs[key], rtol=rtol, name=f"{name} {key}")


def test_batchnorm_and_non_finite_losses_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    with pytest.raises(UnsupportedModelError, match="convert_batchnorm"):
        dp.clipped_grad(model, ce, x, y, max_grad_norm=1.0)
    with pytest.raises(UnsupportedModelError, match="convert_batchnorm"):
        dp.train(model, (x, y), max_grad_norm=1.0, noise_multiplier=1.0, batch_size=2, epochs=1,
                 progress=False)  # fmt: skip
    model, x, y = case("mlp", dtype=torch.float32)
    x[2, 0] = math.inf
    with pytest.raises(InfluxValueError, match=r"inputs of examples \[2\]"):
        dp.clipped_grad(model, ce, x, y, max_grad_norm=1.0)

    def exploding(outputs, targets):
        losses = ce(outputs, targets)
        return torch.where(torch.arange(losses.shape[0]) == 4, losses * math.inf, losses)

    model, x, y = case("mlp", dtype=torch.float32)
    # (InfluxValueError where the engine's capture checks the losses itself)
    with pytest.raises((InfluxRuntimeError, InfluxValueError), match=r"losses.*\[4\]"):
        dp.clipped_grad(model, exploding, x, y, max_grad_norm=1.0)
    with pytest.raises(InfluxValueError, match="max_grad_norm must be a finite number > 0"):
        dp.clipped_grad(model, ce, x, y, max_grad_norm=0.0)


def test_noise_has_the_stated_mean_and_standard_deviation():
    model, x, y = case("mlp", dtype=torch.float64)
    sigma, clip, batch = 1.3, 0.7, 4.0
    clipped = dp.clipped_grad(model, ce, x, y, max_grad_norm=clip)
    hook = dp.DPGradient(clip, sigma, batch, seed=5)
    draws = []
    for _ in range(40):
        _, grads = hook(model, ce, x, y)
        draws.append(torch.cat([(grads[k] * batch - clipped[k]).flatten() for k in clipped]))
    noise = torch.stack(draws)  # [40, P] of N(0, (sigma * clip)^2), about 40 * 90 draws
    count, std = noise.numel(), sigma * clip
    # mean within 5 standard errors; the sample std within 5 of its standard errors (~1/sqrt(2n))
    assert abs(noise.mean().item()) < 5 * std / math.sqrt(count)
    assert abs(noise.std().item() / std - 1) < 5 / math.sqrt(2 * count)
    # seeded: the same seed replays the same noise, another seed does not
    _, first = dp.DPGradient(clip, sigma, batch, seed=5)(model, ce, x, y)
    _, again = dp.DPGradient(clip, sigma, batch, seed=5)(model, ce, x, y)
    _, other = dp.DPGradient(clip, sigma, batch, seed=6)(model, ce, x, y)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)


def blobs(n: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 3
    centers = 3.0 * torch.randn(3, 10, generator=generator)
    return centers[targets] + torch.randn(n, 10, generator=generator), targets


def test_without_noise_or_clipping_dp_training_is_plain_training():
    data_ = blobs(64)
    torch.manual_seed(0)
    plain, private = models.mlp(10, (8,), 3), models.mlp(10, (8,), 3)
    private.load_state_dict(plain.state_dict())
    settings = dict(optimizer="sgd", lr=0.1, epochs=2, batch_size=16, seed=3, progress=False)
    train(plain, data_, **settings)
    result = dp.train(private, data_, max_grad_norm=1e9, noise_multiplier=0.0,
                      sampling="shuffle", **settings)  # fmt: skip
    for (key, a), b in zip(plain.named_parameters(), private.parameters()):
        assert_close(b, a, name=key)
    assert result.privacy["epsilon"] == math.inf


@pytest.mark.slow
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_recorded_epsilon_equals_opacus_privacy_engine_on_the_same_schedule(accountant):
    from opacus import PrivacyEngine

    inputs, targets = blobs(64)
    sigma, clip, batch, epochs, delta = 1.1, 1.0, 16, 2, 1e-5
    torch.manual_seed(0)
    ours = dp.train(models.mlp(10, (8,), 3), (inputs, targets), max_grad_norm=clip,
                    noise_multiplier=sigma, batch_size=batch, epochs=epochs, delta=delta,
                    accountant=accountant, optimizer="sgd", lr=0.1, progress=False)  # fmt: skip
    # Opacus end to end: its Poisson loader (rate 1 / len(loader) = 16 / 64), its optimizer hook
    torch.manual_seed(0)
    model = models.mlp(10, (8,), 3)
    engine = PrivacyEngine(accountant=accountant)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, targets), batch_size=batch
    )
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=sigma, max_grad_norm=clip, poisson_sampling=True,
    )  # fmt: skip
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            if x.shape[0]:
                F.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert ours.privacy["steps"] == 8 and ours.privacy["sample_rate"] == 0.25
    assert ours.privacy["epsilon"] == pytest.approx(engine.get_epsilon(delta), rel=1e-9)
    assert ours.privacy["epsilon"] == dp.epsilon(sigma, 0.25, 8, delta, accountant=accountant)


@pytest.mark.slow
def test_noise_multiplier_for_a_target_epsilon():
    sigma = dp.noise_multiplier_for(3.0, 0.05, 200, 1e-5)
    spent = dp.epsilon(sigma, 0.05, 200, 1e-5)
    assert 3.0 - 0.01 <= spent <= 3.0
    assert dp.epsilon(sigma, 0.05, 0, 1e-5) == 0.0
    with pytest.raises(InfluxValueError, match="exactly one of noise_multiplier and target_eps"):
        dp.train(models.mlp(10, (8,), 3), blobs(), max_grad_norm=1.0, batch_size=8, epochs=1)
    with pytest.raises(InfluxValueError, match="accountant must be one of"):
        dp.epsilon(1.0, 0.1, 10, 1e-5, accountant="gdp-ish")
    with pytest.raises(InfluxValueError, match="do not pass micro_batches"):
        dp.train(models.mlp(10, (8,), 3), blobs(), max_grad_norm=1.0, noise_multiplier=1.0,
                 batch_size=8, epochs=1, micro_batches=2)  # fmt: skip


@pytest.fixture
def accountants_unreachable(monkeypatch):
    """Opacus' accountants loop forever on some arguments: here a call that reaches them fails at
    once, so a test that the arguments are refused first cannot hang."""
    import opacus.accountants
    import opacus.accountants.utils

    def unreachable(*args, **kwargs):
        raise AssertionError("the arguments reached Opacus' accountant without being checked")

    monkeypatch.setattr(opacus.accountants, "create_accountant", unreachable)
    monkeypatch.setattr(opacus.accountants.utils, "get_noise_multiplier", unreachable)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("sigma", [math.nan, math.inf, -1.0], ids=["nan", "inf", "negative"])
def test_epsilon_refuses_a_noise_multiplier_that_is_not_finite_and_non_negative(
    sigma, accountant, accountants_unreachable
):
    with pytest.raises(InfluxValueError, match="noise_multiplier must be a finite number >= 0"):
        dp.epsilon(sigma, 0.01, 10, 1e-5, accountant=accountant)


@pytest.mark.parametrize(
    "target, steps, tolerance, message",
    [
        (3.0, 0, 0.01, "at least one step"),
        (math.inf, 10, 0.01, "target_epsilon must be a finite number > 0"),
        (math.nan, 10, 0.01, "target_epsilon must be a finite number > 0"),
        (3.0, 10, 0.0, "tolerance must be a finite number >= 1e-06"),
        (3.0, 10, 1e-14, "tolerance must be a finite number >= 1e-06"),
    ],
    ids=["no-steps", "infinite-target", "nan-target", "zero-tolerance", "tiny-tolerance"],
)
def test_noise_multiplier_for_refuses_what_its_search_cannot_end_on(
    target, steps, tolerance, message, accountants_unreachable
):
    with pytest.raises(InfluxValueError, match=message):
        dp.noise_multiplier_for(target, 0.01, steps, 1e-5, tolerance=tolerance)


def test_dp_training_refuses_a_target_epsilon_without_steps_and_an_infinite_noise(
    accountants_unreachable,
):
    settings = dict(max_grad_norm=1.0, batch_size=8, progress=False)
    with pytest.raises(InfluxValueError, match="at least one step"):
        dp.train(models.mlp(10, (8,), 3), blobs(), target_epsilon=1.0, epochs=0, **settings)
    with pytest.raises(InfluxValueError, match="noise_multiplier must be a finite number >= 0"):
        dp.train(models.mlp(10, (8,), 3), blobs(), noise_multiplier=math.inf, epochs=1, **settings)


def test_an_unreachable_target_epsilon_names_the_target_and_the_fix():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Opacus: "optimal order is the largest alpha"
        with pytest.raises(InfluxValueError, match=r"target_epsilon=0.001 is out of reach.*raise"):
            dp.noise_multiplier_for(1e-3, 0.05, 10, 1e-5)


def test_dp_settings_must_be_finite_numbers_or_integers():
    model, x, y = case("mlp", dtype=torch.float64)
    for sigma, clip, batch, message in [
        (math.inf, 1.0, 4.0, "noise_multiplier must be a finite number >= 0"),
        (math.nan, 1.0, 4.0, "noise_multiplier must be a finite number >= 0"),
        (1.0, math.inf, 4.0, "max_grad_norm must be a finite number > 0"),
        (1.0, True, 4.0, "max_grad_norm must be a finite number > 0"),
        (1.0, 1.0, math.inf, "expected_batch_size must be a finite number > 0"),
    ]:
        with pytest.raises(InfluxValueError, match=message):
            dp.DPGradient(clip, sigma, batch)
    for chunk_size in (2.5, True, 0):
        with pytest.raises(InfluxValueError, match="chunk_size must be a positive integer"):
            dp.clipped_grad(model, ce, x, y, max_grad_norm=1.0, chunk_size=chunk_size)
        with pytest.raises(InfluxValueError, match="chunk_size must be a positive integer"):
            dp.DPGradient(1.0, 1.0, 4.0, chunk_size=chunk_size)
    with pytest.raises(InfluxValueError, match="steps must be an integer >= 0; got True"):
        dp.epsilon(1.0, 0.01, True, 1e-5)
    with pytest.raises(InfluxValueError, match="sample_rate must lie in"):
        dp.epsilon(1.0, True, 10, 1e-5)
    with pytest.raises(InfluxValueError, match="batch_size must be an integer"):
        dp.train(models.mlp(10, (8,), 3), blobs(), max_grad_norm=1.0, noise_multiplier=1.0,
                 batch_size=True, epochs=1, progress=False)  # fmt: skip


def test_numpy_scalars_are_settings_like_python_numbers():
    model, x, y = case("mlp", dtype=torch.float64)
    # values exact in float32, so both forms are the same number
    ours = dp.clipped_grad(model, ce, x, y, max_grad_norm=np.float32(0.5))
    assert all(torch.equal(ours[k], v) for k, v in dp.clipped_grad(model, ce, x, y,
               max_grad_norm=0.5).items())  # fmt: skip
    _, numpy_set = dp.DPGradient(np.float32(0.5), np.float32(1.25), np.float32(4.0), seed=3,
                                 chunk_size=np.int64(2))(model, ce, x, y)  # fmt: skip
    _, python_set = dp.DPGradient(0.5, 1.25, 4.0, seed=3, chunk_size=2)(model, ce, x, y)
    for key, value in python_set.items():
        assert isinstance(numpy_set[key], torch.Tensor) and numpy_set[key].dtype == value.dtype
        assert_close(numpy_set[key], value, name=key)
    assert dp.epsilon(np.float64(1.1), np.float32(0.25), np.int64(8), 1e-5) == dp.epsilon(
        1.1, 0.25, 8, 1e-5
    )


@pytest.mark.slow
def test_poisson_dp_training_is_reproducible_and_records_its_batches():
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = models.mlp(10, (8,), 3)
        result = dp.train(model, blobs(64), max_grad_norm=1.0, noise_multiplier=1.0,
                          batch_size=16, steps=6, seed=1, noise_seed=2, progress=False)  # fmt: skip
        runs.append((model.state_dict(), result))
    (first, a), (second, b) = runs
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(a.batch_sizes, b.batch_sizes)
    # Poisson batches: sizes vary around q N = 16 and add up to what the orders list
    assert len(set(a.batch_sizes.tolist())) > 1
    assert int(a.batch_sizes.sum()) == sum(order.numel() for order in a.epoch_orders)
    assert "epsilon=" in repr(a)


@pytest.mark.slow
def test_the_default_noise_follows_the_training_seed():
    noise = {}
    for seed in (0, 0, 1):
        torch.manual_seed(0)
        model = models.mlp(10, (8,), 3)
        result = dp.train(model, blobs(64), max_grad_norm=1.0, noise_multiplier=1.0,
                          batch_size=16, steps=1, seed=seed, progress=False)  # fmt: skip
        noise.setdefault(seed, set()).add(result.privacy["noise_seed"])
    assert len(noise[0]) == 1 and noise[0] != noise[1]


@pytest.mark.slow
def test_dp_training_on_digits_reaches_a_sane_accuracy():
    from influx.train import evaluate

    train_set = data.load("digits")
    test_set = data.load("digits", split="test")
    torch.manual_seed(0)
    model = models.mlp()
    result = dp.train(model, train_set, max_grad_norm=1.0, target_epsilon=4.0, batch_size=64,
                      epochs=6, lr=5e-3, progress=False)  # fmt: skip
    assert result.privacy["epsilon"] <= 4.0
    _, accuracy = evaluate(model, test_set)
    # non-private training of this MLP reaches ~0.95; eps = 4 costs a few points, chance is 0.1
    assert accuracy > 0.75


@pytest.mark.parametrize("sampling", ["poisson", "shuffle"])
def test_dp_training_on_a_dataset_equals_training_on_its_tensors(sampling):
    def run(train_data):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        result = dp.train(
            model, train_data, max_grad_norm=1.0, noise_multiplier=1.0, batch_size=8, epochs=2,
            sampling=sampling, progress=False, seed=3, lr=0.1,
        )  # fmt: skip
        return model, result

    dataset = LazyDataset(40)
    streamed, streamed_run = run(dataset)
    in_memory, in_memory_run = run(LazyDataset(40).tensors())
    for a, b in zip(streamed.parameters(), in_memory.parameters(), strict=True):
        assert torch.equal(a, b)
    assert streamed_run.privacy == in_memory_run.privacy
    if sampling == "shuffle":  # each of the 2 epochs reads each example once, then the
        # trainer's final evaluation pass
        assert torch.equal(dataset.reads, torch.full((40,), 3))
