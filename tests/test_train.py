"""The deterministic trainer: reproducibility, recorded orders, checkpoints, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from utils import assert_close

from influx import models
from influx.errors import InfluxValueError
from influx.train import cross_entropy_per_example, evaluate, train


def blobs(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian classes in 64 dimensions: inputs [n, 64], targets [n]."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 3
    centers = 3.0 * torch.randn(3, 64, generator=generator)
    return centers[targets] + torch.randn(n, 64, generator=generator), targets


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.mlp(64, (16,), 3)


def test_cross_entropy_per_example_is_unreduced():
    logits, targets = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    losses = cross_entropy_per_example(logits, targets)
    assert losses.shape == (5,)
    assert_close(losses, F.cross_entropy(logits, targets, reduction="none"))


def test_training_fits_and_reports_final_metrics():
    data = blobs()
    model = small_model()
    result = train(model, data, lr=1e-2, epochs=10, batch_size=16, progress=False)
    assert result.final_accuracy == 1.0
    assert result.losses[-5:].mean() < result.losses[:5].mean()
    loss, accuracy = evaluate(model, data)
    assert accuracy == result.final_accuracy and loss == pytest.approx(result.final_loss)
    assert result.steps == 10 * 4 and result.epochs == 10
    assert "final_accuracy=1" in repr(result)


@pytest.mark.parametrize(
    "optimizer, kwargs",
    [
        ("adam", {}),
        ("adam", {"weight_decay": 0.1}),
        ("sgd", {"momentum": 0.9, "weight_decay": 0.1}),
        ("sgd", {}),
    ],
    ids=["adam", "adam-decay", "sgd-momentum-decay", "sgd"],
)
def test_recorded_order_replays_the_run_with_torch_optim(optimizer, kwargs):
    data = blobs(24)
    ours, reference = small_model(), small_model()
    result = train(ours, data, optimizer=optimizer, lr=0.05, steps=6, batch_size=8,
                   progress=False, **kwargs)  # fmt: skip
    # Replay the recorded order with the torch optimizer.
    inputs, targets = data
    torch_class = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
    torch_optimizer = torch_class(reference.parameters(), lr=0.05, **kwargs)
    positions = torch.cat(result.epoch_orders)
    for start in range(0, 6 * 8, 8):
        batch = positions[start : start + 8]
        torch_optimizer.zero_grad()
        cross_entropy_per_example(reference(inputs[batch]), targets[batch]).mean().backward()
        torch_optimizer.step()
    for (name, value), expected in zip(
        ours.named_parameters(), reference.parameters(), strict=True
    ):
        assert_close(value, expected, name=name)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_same_seed_same_parameters_and_different_seed_different_order(optimizer):
    data = blobs()
    runs = []
    for seed in (0, 0, 1):
        model = small_model()
        result = train(
            model, data, optimizer=optimizer, lr=0.05, epochs=2, batch_size=8, seed=seed,
            momentum=0.9 if optimizer == "sgd" else 0.0, progress=False,
        )  # fmt: skip
        runs.append((model.state_dict(), result))
    (first, result_a), (second, result_b), (_, result_c) = runs
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between identical runs"
    assert torch.equal(result_a.losses, result_b.losses)
    assert result_a.epoch_seeds == result_b.epoch_seeds
    assert not torch.equal(result_a.epoch_orders[0], result_c.epoch_orders[0])
    # neighbouring seeds share no epoch's order (seed + epoch would repeat seed 0's second
    # epoch as seed 1's first, correlating the members of an ensemble)
    assert not torch.equal(result_a.epoch_orders[1], result_c.epoch_orders[0])
    assert set(result_a.epoch_seeds).isdisjoint(result_c.epoch_seeds)


def test_epoch_orders_are_permutations_of_dataset_indices():
    inputs, targets = blobs(20)
    # Indices carried by the data (here 100..119) are what the orders record.
    result = train(
        small_model(), (inputs, targets, torch.arange(100, 120)), epochs=3, batch_size=6,
        progress=False,
    )  # fmt: skip
    assert len(result.epoch_orders) == 3 and len(result.epoch_seeds) == 3
    for order in result.epoch_orders:
        assert torch.equal(order.sort().values, torch.arange(100, 120))
    assert not torch.equal(result.epoch_orders[0], result.epoch_orders[1])
    # An epoch's order is reproducible from its recorded seed alone.
    replay = torch.randperm(20, generator=torch.Generator().manual_seed(result.epoch_seeds[1]))
    assert torch.equal(replay + 100, result.epoch_orders[1])


def test_steps_mode_ends_with_a_partial_epoch():
    result = train(small_model(), blobs(20), steps=5, batch_size=6, progress=False)
    # 4 steps per epoch: one full epoch (20 examples), then one step of 6.
    assert [order.numel() for order in result.epoch_orders] == [20, 6]
    assert result.losses.shape == (5,) and result.epochs == pytest.approx(5 / 4)


def test_full_batch_when_batch_size_is_none():
    result = train(small_model(), blobs(20), epochs=4, batch_size=None, progress=False)
    assert result.steps == 4


def test_checkpoints_copy_parameters_with_their_learning_rate():
    data = blobs(20)
    model = small_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(
        model, data, optimizer="sgd", lr=0.1, epochs=3, batch_size=10,
        lr_schedule="cosine", checkpoints=[0, 3, 6], progress=False,
    )  # fmt: skip
    assert [c.step for c in result.checkpoints] == [0, 3, 6]
    assert [c.epoch for c in result.checkpoints] == [0, 1, 2]
    for name, value in initial.items():
        assert torch.equal(result.checkpoints[0].state_dict[name], value)
        assert torch.equal(result.checkpoints[-1].state_dict[name], model.state_dict()[name])
    # Cosine schedule over 6 steps; a checkpoint records the rate the next step would use.
    assert result.checkpoints[0].lr == pytest.approx(0.1)
    assert result.checkpoints[1].lr == pytest.approx(0.05)
    assert result.checkpoints[2].lr == pytest.approx(0.0, abs=1e-12)
    assert result.lrs[3].item() == pytest.approx(0.05)
    # Copies, not views: training further leaves them alone.
    snapshot = result.checkpoints[1].state_dict["1.weight"].clone()
    train(model, data, epochs=1, progress=False)
    assert torch.equal(result.checkpoints[1].state_dict["1.weight"], snapshot)


def test_checkpoints_every_epoch():
    result = train(small_model(), blobs(20), steps=10, batch_size=6, checkpoints="epochs",
                   progress=False)  # fmt: skip
    assert [c.step for c in result.checkpoints] == [0, 4, 8, 10]


def test_global_rng_is_left_untouched():
    model = small_model()
    state = torch.random.get_rng_state()
    train(model, blobs(20), epochs=1, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_trains_on_a_dataset_and_restores_the_mode(tmp_path):
    from influx import data

    digits = data.load("digits", max_examples=64)
    model = models.mlp()
    model.eval()
    result = train(model, digits, epochs=1, batch_size=32, progress=False)
    assert not model.training
    assert torch.equal(result.epoch_orders[0].sort().values, torch.arange(64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 1, "steps": 2}, "give exactly one of epochs and steps"),
        ({}, "give exactly one of epochs and steps"),
        ({"epochs": 1, "checkpoints": [7]}, r"checkpoint steps must lie in \[0, 2\]"),
        ({"epochs": 1, "checkpoints": "steps"}, "checkpoints must be step numbers or 'epochs'"),
        ({"epochs": 1, "optimizer": "lbfgs"}, "optimizer must be one of"),
        ({"epochs": 1, "loss_fn": "hinge"}, "loss_fn must be one of"),
        ({"epochs": 1, "batch_size": 0}, r"batch_size must be an integer >= 1; got 0 \(or None"),
        ({"epochs": 1, "batch_size": 8.0}, r"batch_size must be an integer >= 1"),
        ({"epochs": 1, "lr": 0.0}, "lr must be a finite number > 0"),
        ({"epochs": 1, "lr": math.inf}, "lr must be a finite number > 0"),
        ({"epochs": 1, "weight_decay": math.nan}, "weight_decay must be a finite number >= 0"),
        ({"epochs": 1, "momentum": -0.1}, "momentum must be a finite number >= 0"),
        ({"epochs": 1.5}, "epochs must be an integer >= 0"),
        ({"steps": 2.7}, "steps must be an integer >= 0"),
        ({"steps": True}, "steps must be an integer >= 0"),
        ({"steps": 4, "checkpoints": [2.5]}, "checkpoint step must be an integer"),
        ({"steps": 4, "checkpoints": 2}, r"for one step k, pass \[k\]"),
        ({"epochs": 1, "lr_schedule": "step"}, "lr_schedule must be one of"),
    ],
    ids=["both", "neither", "checkpoint-range", "checkpoint-string", "optimizer", "loss",
         "batch-size", "batch-size-float", "lr", "lr-inf", "weight-decay-nan", "momentum",
         "epochs-float", "steps-float", "steps-bool", "checkpoint-float", "checkpoint-int",
         "schedule"],
)  # fmt: skip
def test_invalid_settings_raise_clear_errors(kwargs, match):
    kwargs = {"batch_size": 10, "progress": False, **kwargs}
    with pytest.raises(InfluxValueError, match=match):
        train(small_model(), blobs(20), **kwargs)


def test_a_nan_example_or_a_diverging_loss_stops_training_by_name():
    inputs, targets = blobs(20)
    inputs[13, 5] = math.nan
    with pytest.raises(InfluxValueError, match=r"the losses of examples \[13\]"):
        train(small_model(), (inputs, targets), epochs=1, batch_size=20, progress=False)
    with pytest.raises(InfluxValueError, match="the loss diverged"):
        train(small_model(), blobs(20), optimizer="sgd", lr=1e38, epochs=3, batch_size=20,
              progress=False)  # fmt: skip


def mse_of_logits(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs - F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)).square().sum(1)


def test_loss_is_the_deprecated_name_of_loss_fn():
    data = blobs(30)
    settings = dict(epochs=2, batch_size=8, progress=False)
    new_model, old_model = small_model(), small_model()
    new = train(new_model, data, loss_fn=mse_of_logits, **settings)
    with pytest.warns(DeprecationWarning, match=r"train\(loss=...\) is deprecated: pass loss_fn="):
        old = train(old_model, data, loss=mse_of_logits, **settings)
    assert torch.equal(new.losses, old.losses) and new.config == old.config
    for (name, a), b in zip(new_model.state_dict().items(), old_model.state_dict().values()):
        assert torch.equal(a, b), name
    # The default stays cross-entropy; evaluate takes the same two names.
    assert train(small_model(), data, **settings).config["loss"] == "cross_entropy"
    with pytest.warns(DeprecationWarning, match=r"evaluate\(loss=...\)"):
        old_loss, old_accuracy = evaluate(new_model, data, loss=mse_of_logits)
    new_loss, new_accuracy = evaluate(new_model, data, loss_fn=mse_of_logits)
    assert old_loss == new_loss and math.isnan(old_accuracy) and math.isnan(new_accuracy)
    with pytest.raises(InfluxValueError, match="both loss_fn= and loss="):
        train(small_model(), data, loss_fn="mse", loss=mse_of_logits, **settings)


def test_ensemble_equals_independent_torch_optim_runs():
    from influx.ensembles import fit_weighted

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inputs = torch.randn(12, 4, dtype=torch.float64)
    targets = torch.randint(0, 3, (12,))
    weights = (torch.rand(3, 12) < 0.5).double()
    stacked = fit_weighted(
        model, cross_entropy_per_example, (inputs, targets), weights, steps=5, lr=0.05, chunk=2
    )
    for k in range(3):
        copy = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        copy.load_state_dict(model.state_dict())
        optimizer = torch.optim.Adam(copy.parameters(), lr=0.05)
        for _ in range(5):
            optimizer.zero_grad()
            (cross_entropy_per_example(copy(inputs), targets) * weights[k]).sum().backward()
            optimizer.step()
        for name, value in copy.named_parameters():
            assert_close(stacked[name][k], value, name=f"member {k} {name}")


# ---------------------------------------------------------------------------------------------
# Hooks: sampling, a per-batch gradient function, micro-batch aggregation.
# ---------------------------------------------------------------------------------------------


def sgd_settings(**extra):
    return dict(optimizer="sgd", lr=0.1, batch_size=16, seed=2, progress=False, **extra)


def test_the_mean_gradient_hook_is_the_plain_step():
    from influx.train import mean_gradient

    data = blobs(48)
    plain, hooked = small_model(), small_model()
    train(plain, data, epochs=2, **sgd_settings())
    result = train(hooked, data, epochs=2, gradient=mean_gradient, **sgd_settings())
    for (name, a), b in zip(plain.named_parameters(), hooked.parameters(), strict=True):
        assert_close(b, a, name=name)
    assert result.config["gradient"] == "mean_gradient"
    assert result.batch_sizes.tolist() == [16] * 6


def test_mean_of_equal_micro_batches_is_the_plain_step():
    from influx import aggregate

    data = blobs(48)
    plain, split = small_model(), small_model()
    train(plain, data, epochs=2, **sgd_settings())
    train(split, data, epochs=2, micro_batches=4, aggregator=aggregate.mean(), **sgd_settings())
    # the mean of four means of 4 examples is the mean of the 16: equal up to rounding (float32)
    for (name, a), b in zip(plain.named_parameters(), split.parameters(), strict=True):
        assert_close(b, a, name=name)


def test_krum_over_micro_batches_replays_by_hand():
    from influx import aggregate

    inputs, targets = blobs(40)
    ours, reference = small_model(), small_model()
    result = train(ours, (inputs, targets), steps=4, optimizer="sgd", lr=0.1, batch_size=20,
                   micro_batches=5, aggregator=aggregate.krum(f=1), progress=False)  # fmt: skip
    params = list(reference.parameters())
    positions = torch.cat(result.epoch_orders)
    for step in range(4):
        batch = positions[20 * step : 20 * (step + 1)]
        flat = []
        for part in batch.tensor_split(5):
            loss = cross_entropy_per_example(reference(inputs[part]), targets[part]).mean()
            flat.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        # Krum by its definition: sum of squared distances to the M - f - 2 = 2 closest others
        scores = []
        for i in range(5):
            distances = sorted(((flat[i] - flat[j]) ** 2).sum().item() for j in range(5) if j != i)
            scores.append(sum(distances[:2]))
        chosen = flat[min(range(5), key=lambda i: (scores[i], i))]
        with torch.no_grad():
            offset = 0
            for p in params:
                p -= 0.1 * chosen[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
    for (name, a), b in zip(ours.named_parameters(), params, strict=True):
        assert_close(a, b, name=name)
    assert result.config["aggregator"] == "krum(f=1)"


def test_poisson_sampling_draws_batches_of_random_size():
    inputs, targets = blobs(200)
    runs = [train(small_model(), (inputs, targets), steps=30, batch_size=20, sampling="poisson",
                  seed=4, progress=False) for _ in range(2)]  # fmt: skip
    first, second = runs
    assert torch.equal(first.batch_sizes, second.batch_sizes)
    sizes = first.batch_sizes
    assert len(set(sizes.tolist())) > 3
    # 30 steps of Binomial(200, 0.1): total 600, standard deviation sqrt(30 * 18) = 23
    assert abs(int(sizes.sum()) - 600) < 5 * 23
    assert int(sizes.sum()) == sum(order.numel() for order in first.epoch_orders)
    # 10 steps per epoch (ceil(N / batch_size)), as with shuffling
    assert len(first.epoch_orders) == 3


def test_a_sampler_sets_each_epoch_order():
    data = blobs(24)
    calls = []

    def reversed_order(epoch, epoch_seed):
        calls.append((epoch, epoch_seed))
        return torch.arange(23, -1, -1)

    result = train(small_model(), data, epochs=2, batch_size=8, sampling=reversed_order,
                   progress=False)  # fmt: skip
    assert [epoch for epoch, _ in calls] == [0, 1]
    assert [seed for _, seed in calls] == result.epoch_seeds
    for order in result.epoch_orders:
        assert torch.equal(order, torch.arange(23, -1, -1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampling": "stratified"}, "sampling must be one of"),
        ({"sampling": lambda epoch, seed: torch.arange(5)}, "must return 20 positions"),
        ({"micro_batches": 0}, "micro_batches must be a positive integer"),
        ({"micro_batches": 3, "sampling": "poisson"}, "micro_batches needs batches of a fixed"),
        ({"micro_batches": 4, "batch_size": 6}, "the last batch of each epoch holds 2"),
        # batches of 2 divide N = 20 already: the fix is a larger batch, not a divisor
        ({"micro_batches": 4, "batch_size": 2}, r"gives batches of 2: pick batch_size >= 4"),
        ({"micro_batches": 4, "aggregator": "krum"}, "aggregator must be callable"),
        ({"gradient": 3}, "gradient must be a callable"),
    ],
    ids=["sampling", "sampler-length", "micro-batches", "poisson-micro", "last-batch",
         "small-batches", "aggregator", "gradient"],
)  # fmt: skip
def test_invalid_hooks_raise_clear_errors(kwargs, match):
    kwargs = {"batch_size": 10, "epochs": 1, "progress": False, **kwargs}
    with pytest.raises(InfluxValueError, match=match):
        train(small_model(), blobs(20), **kwargs)


def test_too_few_micro_batches_for_krum_fail_before_training():
    from influx import aggregate

    with pytest.raises(InfluxValueError, match=r"krum\(f=1\) needs at least 5 gradients"):
        train(small_model(), blobs(20), epochs=1, batch_size=10, micro_batches=4,
              aggregator=aggregate.krum(f=1), progress=False)  # fmt: skip


def test_an_empty_poisson_batch_is_a_zero_gradient_step():
    # rate 1/20 over 20 examples: P(empty) = 0.95^20 = 0.36, so some of 30 steps are empty
    data = blobs(20)
    model = small_model()
    result = train(model, data, steps=30, batch_size=1, sampling="poisson", optimizer="sgd",
                   lr=0.1, progress=False)  # fmt: skip
    assert (result.batch_sizes == 0).any()
    assert torch.isnan(result.losses[result.batch_sizes == 0]).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
