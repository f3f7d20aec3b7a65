"""influx.poison: Gaussian / label-flip / adversarial poisons and the batch schedules.

Every poison is checked against a direct re-derivation of its definition (the documented seeded
draws, a per-example gradient loop in float64), every schedule against its invariants, exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from utils import LazyDataset, assert_close

from influx import data, models, poison, train
from influx.errors import InfluxRuntimeError, InfluxValueError

DTYPE = torch.float64
LOSS = train.cross_entropy_per_example


def _tuple_data(n=40, shape=(3, 4), classes=3, seed=0, dtype=DTYPE):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, *shape, generator=generator, dtype=dtype)
    targets = torch.randint(0, classes, (n,), generator=generator)
    return inputs, targets


def _mlp(in_features=12, classes=3, dropout=False):
    torch.manual_seed(1)
    layers = [nn.Flatten(), nn.Linear(in_features, 9), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(0.5))
    return nn.Sequential(*layers, nn.Linear(9, classes)).to(DTYPE)


# ----------------------------------------------------------------------------------------------
# gaussian
# ----------------------------------------------------------------------------------------------


def test_gaussian_follows_its_documented_draws_exactly():
    inputs, targets = _tuple_data()
    result = poison.gaussian((inputs, targets), count=7, noise_std=0.3, seed=5)
    # The contract: a CPU generator seeded by `seed` permutes the positions, keeps the first k
    # (sorted), then draws the float64 noise from the same stream.
    generator = torch.Generator().manual_seed(5)
    chosen = torch.randperm(40, generator=generator)[:7].sort().values
    noise = 0.3 * torch.randn(7, 3, 4, generator=generator, dtype=torch.float64)
    assert torch.equal(result.indices, chosen)
    assert torch.equal(result.mask, torch.isin(torch.arange(40), chosen))
    assert torch.equal(result.noise, noise)
    assert torch.equal(result.base_inputs, inputs[chosen])
    assert torch.equal(result.targets, targets[chosen])
    assert result.noise_std == 0.3 and result.count == 7 and result.seed == 5
    assert torch.equal(result.poisoned_inputs, inputs[chosen] + noise)


def test_gaussian_dataset_changes_only_the_poisoned_inputs():
    inputs, targets = _tuple_data()
    indices = 100 + torch.arange(40)
    result = poison.gaussian((inputs, targets, indices), fraction=0.25, noise_std=0.5, seed=2)
    assert result.count == 10  # round(0.25 * 40)
    got_inputs, got_targets, got_indices = data.as_tensors(result.dataset)
    expected = inputs.clone()
    expected[result.mask] += result.noise
    assert torch.equal(got_inputs, expected)
    assert torch.equal(got_targets, targets)
    # The carried dataset indices survive, and `indices` reports them.
    assert torch.equal(got_indices, indices)
    assert torch.equal(result.indices, indices[result.mask])
    assert torch.equal(result.dataset.targets, targets)


def test_gaussian_noise_is_the_same_draw_for_every_dtype():
    inputs, targets = _tuple_data()
    wide = poison.gaussian((inputs, targets), count=9, noise_std=0.7, seed=3)
    narrow = poison.gaussian((inputs.float(), targets), count=9, noise_std=0.7, seed=3)
    assert narrow.noise.dtype == torch.float32
    assert torch.equal(narrow.noise, wide.noise.float())


def test_gaussian_noise_has_the_requested_distribution():
    inputs, targets = _tuple_data(n=1000, shape=(64,))
    result = poison.gaussian((inputs, targets), fraction=1.0, noise_std=0.25, seed=0)
    draws = result.noise.flatten()
    # 64,000 draws: the sample std has relative standard error 1/sqrt(2 * 64000) = 0.28%, the
    # mean a standard error 0.25/253 ~ 1e-3; 1.2% and 4e-3 are ~4 standard errors.
    assert abs(draws.std().item() / 0.25 - 1) < 0.012
    assert abs(draws.mean().item()) < 4e-3


def test_gaussian_seeds_reproduce_and_differ():
    batch = _tuple_data()
    first = poison.gaussian(batch, count=5, noise_std=1.0, seed=11)
    again = poison.gaussian(batch, count=5, noise_std=1.0, seed=11)
    other = poison.gaussian(batch, count=5, noise_std=1.0, seed=12)
    assert torch.equal(first.indices, again.indices) and torch.equal(first.noise, again.noise)
    assert not torch.equal(first.noise, other.noise)


def test_gaussian_on_an_influx_dataset_trains_and_splits():
    dataset = data.load("digits", max_examples=200)
    result = poison.gaussian(dataset, fraction=0.05, noise_std=0.5, seed=0)
    assert result.dataset.num_classes == 10 and result.dataset.input_shape == (1, 8, 8)
    forget_inputs, forget_targets, forget_indices = data.as_tensors(result.forget)
    assert torch.equal(forget_indices, result.indices)
    assert torch.equal(forget_inputs, result.poisoned_inputs)
    assert torch.equal(forget_targets, result.targets)
    retain_inputs, _, retain_indices = data.as_tensors(result.retain)
    assert torch.equal(retain_indices, torch.nonzero(~result.mask).flatten())
    assert torch.equal(retain_inputs, dataset.inputs[:200][~result.mask])
    model = models.mlp(64, (8,), 10)
    run = train.train(model, result.dataset, epochs=1, batch_size=64, progress=False)
    assert sorted(run.epoch_orders[0].tolist()) == list(range(200))


# ----------------------------------------------------------------------------------------------
# label_flip
# ----------------------------------------------------------------------------------------------


def test_label_flip_matches_influx_data_flip_labels():
    # influx.data.flip_labels documents the same draws (permutation, then shifts in 1..C-1).
    flipped = data.load("digits", max_examples=300, flip_fraction=0.1, seed=4)
    result = poison.label_flip(data.load("digits", max_examples=300), fraction=0.1, seed=4)
    assert torch.equal(result.indices, flipped.flipped)
    assert torch.equal(result.dataset.targets, flipped.targets)
    assert torch.equal(result.new_targets, flipped.targets[flipped.flipped])
    assert torch.equal(result.targets, flipped.clean_targets[flipped.flipped])


def test_label_flip_changes_only_the_chosen_labels():
    inputs, targets = _tuple_data(n=500, classes=4)
    result = poison.label_flip((inputs, targets), count=400, num_classes=4, seed=1)
    assert (result.new_targets != result.targets).all()
    assert ((0 <= result.new_targets) & (result.new_targets < 4)).all()
    # Every shift 1..3 is drawn (400 draws of a uniform over 3 values).
    shifts = (result.new_targets - result.targets) % 4
    assert set(shifts.tolist()) == {1, 2, 3}
    got_inputs, got_targets, _ = data.as_tensors(result.dataset)
    assert torch.equal(got_inputs, inputs)
    expected = targets.clone()
    expected[result.mask] = result.new_targets
    assert torch.equal(got_targets, expected)


# ----------------------------------------------------------------------------------------------
# input gradients and adversarial poisons
# ----------------------------------------------------------------------------------------------


def _loop_input_gradients(model, inputs, targets):
    """Reference: one backward per example, in eval mode."""
    model.eval()
    rows = []
    for x, y in zip(inputs, targets):
        x = x.unsqueeze(0).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(LOSS(model(x), y.unsqueeze(0)).sum(), x)
        rows.append(grad[0])
    return torch.stack(rows)


def test_input_gradients_equal_a_per_example_loop_and_restore_the_mode():
    inputs, targets = _tuple_data(n=23)
    model = _mlp(dropout=True).train()
    grads = poison.input_gradients(model, LOSS, inputs, targets, batch_size=8)
    assert model.training
    expected = _loop_input_gradients(model, inputs, targets)
    # Same float64 products summed in a different order: a few ulps of the largest entry.
    assert_close(grads, expected, rtol=1e-12)


def test_input_gradients_name_non_finite_examples():
    inputs, targets = _tuple_data(n=20)
    inputs[13, 0, 0] = float("nan")
    with pytest.raises(InfluxRuntimeError, match=r"non-finite loss at example positions \[13\]"):
        poison.input_gradients(_mlp(), LOSS, inputs, targets, batch_size=8)


def test_input_gradients_refuse_reduced_losses():
    inputs, targets = _tuple_data(n=6)
    mean_loss = lambda out, y: nn.functional.cross_entropy(out, y)
    with pytest.raises(InfluxValueError, match=r"per-example losses of shape \[6\]"):
        poison.input_gradients(_mlp(), mean_loss, inputs, targets)


def test_adversarial_is_fgsm_at_the_clean_inputs():
    inputs, targets = _tuple_data(n=30)
    model = _mlp(dropout=True).train()
    result = poison.adversarial(model, LOSS, (inputs, targets), count=12, eps=0.05, seed=3)
    assert model.training
    chosen = torch.randperm(30, generator=torch.Generator().manual_seed(3))[:12].sort().values
    assert torch.equal(result.indices, chosen)
    signs = _loop_input_gradients(model, inputs[chosen], targets[chosen]).sign()
    assert torch.equal(result.perturbation, 0.05 * signs)
    got_inputs, got_targets, _ = data.as_tensors(result.dataset)
    expected = inputs.clone()
    expected[chosen] += 0.05 * signs
    assert torch.equal(got_inputs, expected)
    assert torch.equal(got_targets, targets)  # clean label
    # The poison raises each poisoned example's loss (first order: eps * ||grad||_1 > 0).
    model.eval()
    with torch.no_grad():
        before = LOSS(model(inputs[chosen]), targets[chosen])
        after = LOSS(model(expected[chosen]), targets[chosen])
    assert (after > before).all()


def test_adversarial_clip_keeps_the_data_range():
    inputs, targets = _tuple_data(n=30)
    inputs = inputs.sigmoid()
    result = poison.adversarial(_mlp(), LOSS, (inputs, targets), count=30, eps=0.5, clip=(0, 1))
    poisoned = data.as_tensors(result.dataset)[0]
    assert poisoned.min() >= 0 and poisoned.max() <= 1
    signs = _loop_input_gradients(_mlp(), inputs, targets).sign()
    assert torch.equal(poisoned, (inputs + 0.5 * signs).clamp(0, 1))


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fraction=0.0), r"fraction must lie in \(0, 1\]"),
        (dict(fraction=1.5), r"fraction must lie in \(0, 1\]"),
        (dict(fraction=0.001), "rounds to 0 poisoned examples"),
        (dict(count=0), r"count must be an integer in \[1, 40\]"),
        (dict(count=41), r"count must be an integer in \[1, 40\]"),
        (dict(count=2.0), r"count must be an integer"),
        (dict(fraction=0.5, count=3), "exactly one of fraction and count"),
        (dict(), "exactly one of fraction and count"),
        (dict(count=3, noise_std=0.0), "noise_std must be a finite number > 0"),
        (dict(count=3, noise_std=-1.0), "noise_std must be a finite number > 0"),
        (dict(count=3, noise_std=math.nan), "noise_std must be a finite number > 0"),
        (dict(count=3, seed=-1), "seed must be an integer >= 0"),
        (dict(fraction=True), r"fraction must lie in \(0, 1\]"),
        (dict(count=True), r"count must be an integer"),
        (dict(count=3, noise_std=True), "noise_std must be a finite number > 0"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_gaussian_rejects_bad_arguments(kwargs, message):
    kwargs = {"noise_std": 0.1, **kwargs}
    with pytest.raises(InfluxValueError, match=message):
        poison.gaussian(_tuple_data(), **kwargs)


def test_gaussian_takes_numpy_scalars_like_python_numbers():
    batch = _tuple_data()
    ours = poison.gaussian(batch, fraction=np.float32(0.25), noise_std=np.float32(0.5), seed=2)
    theirs = poison.gaussian(batch, fraction=0.25, noise_std=0.5, seed=2)
    assert torch.equal(ours.indices, theirs.indices) and torch.equal(ours.noise, theirs.noise)


def _with_non_finite_inputs():
    """40 examples with dataset indices 7 i + 11; those of positions 5 and 30 hold NaN / inf."""
    inputs, targets = _tuple_data()
    inputs[5, 1, 2] = math.nan
    inputs[30, 0, 0] = -math.inf
    return inputs, targets, 7 * torch.arange(40) + 11


def test_gaussian_refuses_non_finite_inputs_naming_their_dataset_indices():
    with pytest.raises(InfluxValueError, match=r"inputs of 2 example\(s\).*indices \[46, 221\]"):
        poison.gaussian(_with_non_finite_inputs(), fraction=1.0, noise_std=0.1)


def test_adversarial_refuses_non_finite_inputs_naming_their_dataset_indices():
    with pytest.raises(InfluxValueError, match=r"inputs of 2 example\(s\).*indices \[46, 221\]"):
        poison.adversarial(_mlp(), LOSS, _with_non_finite_inputs(), fraction=1.0, eps=0.1)


def test_gaussian_rejects_integer_inputs():
    inputs = torch.zeros(5, 3, dtype=torch.uint8)
    with pytest.raises(InfluxValueError, match="floating-point inputs"):
        poison.gaussian((inputs, torch.zeros(5, dtype=torch.long)), count=2, noise_std=1.0)


def test_label_flip_rejects_bad_arguments():
    batch = _tuple_data(classes=3)
    with pytest.raises(InfluxValueError, match="pass num_classes"):
        poison.label_flip(batch, count=3)
    with pytest.raises(InfluxValueError, match="num_classes must be >= 2"):
        poison.label_flip(batch, count=3, num_classes=1)
    with pytest.raises(InfluxValueError, match=r"targets must lie in \[0, 2\)"):
        poison.label_flip(batch, fraction=1.0, num_classes=2)
    with pytest.raises(InfluxValueError, match="integer class targets"):
        poison.label_flip((batch[0], batch[0]), count=3, num_classes=3)


def test_adversarial_rejects_bad_arguments():
    batch = _tuple_data()
    with pytest.raises(InfluxValueError, match="eps must be a finite number > 0"):
        poison.adversarial(_mlp(), LOSS, batch, count=3, eps=0.0)
    with pytest.raises(InfluxValueError, match="clip must be"):
        poison.adversarial(_mlp(), LOSS, batch, count=3, eps=0.1, clip=(1, 0))


# ----------------------------------------------------------------------------------------------
# batch schedules
# ----------------------------------------------------------------------------------------------


def _mask(n, k, seed=0):
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]] = True
    return mask


def _fewest_batches(sizes: list[int], k: int) -> int:
    """Fewest batches that can hold k poisons: the largest ones first."""
    total, used = 0, 0
    for size in sorted(sizes, reverse=True):
        if total >= k:
            break
        total, used = total + size, used + 1
    return used


GRID = [(n, bs) for n in (1, 7, 10, 23) for bs in (1, 3, 5, 10, 25)]


@pytest.mark.parametrize("n, batch_size", GRID, ids=[f"n{n}-bs{b}" for n, b in GRID])
def test_schedule_invariants_hold_exactly(n, batch_size):
    expected_sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    for k in range(n + 1):
        mask = _mask(n, k, seed=k)
        spread = poison.interlaced(mask, batch_size, seed=k)
        packed = poison.concentrated(mask, batch_size, seed=k)
        for schedule in (spread, packed):
            assert len(schedule) == len(expected_sizes)
            for epoch in (0, 1):
                order = schedule.epoch_order(epoch)
                # A permutation of the positions, cut into the batches of a shuffled epoch.
                assert sorted(order.tolist()) == list(range(n))
                batches = order.split(batch_size)
                assert [len(b) for b in batches] == expected_sizes
                counts = [int(mask[b].sum()) for b in batches]
                assert counts == schedule.poison_counts(epoch).tolist()
                assert sum(counts) == k
                if schedule is spread:
                    # Every batch holds its share k s / n of the poisons, rounded down or up.
                    for size, count in zip(expected_sizes, counts):
                        assert math.floor(k * size / n) <= count <= math.ceil(k * size / n)
                else:
                    touched = [c for c in counts if c]
                    assert len(touched) == _fewest_batches(expected_sizes, k)
                    partial = [c for c, s in zip(counts, expected_sizes) if 0 < c < s]
                    assert len(partial) <= 1


def test_interlaced_poisons_every_batch_and_concentrated_fills_whole_batches():
    mask = _mask(640, 64)
    spread = poison.interlaced(mask, 32, seed=0).poison_counts(0)
    packed = poison.concentrated(mask, 32, seed=0).poison_counts(0)
    # 20 batches of 32, quota 64 * 32 / 640 = 3.2 each: sixteen batches of 3 and four of 4.
    assert sorted(spread.tolist()) == [3] * 16 + [4] * 4
    assert sorted(packed.tolist()) == [0] * 18 + [32, 32]


def test_schedule_epochs_are_fresh_and_reproducible():
    mask = _mask(200, 30)
    for make in (poison.interlaced, poison.concentrated):
        schedule = make(mask, 16, seed=3)
        assert torch.equal(schedule.epoch_order(2), make(mask, 16, seed=3).epoch_order(2))
        assert not torch.equal(schedule.epoch_order(0), schedule.epoch_order(1))
        assert not torch.equal(schedule.epoch_order(0), make(mask, 16, seed=4).epoch_order(0))
        # Where the poisons sit changes between epochs too (not only the clean order).
        assert not torch.equal(mask[schedule.epoch_order(0)], mask[schedule.epoch_order(1)])


def test_schedule_drives_a_dataloader_and_ordered_batches():
    dataset = data.load("digits", max_examples=100)
    mask = _mask(100, 12)
    schedule = poison.concentrated(mask, 16, seed=1)
    schedule.set_epoch(3)
    expected = [b.tolist() for b in schedule.epoch_order(3).split(16)]
    assert list(schedule) == expected
    loader = DataLoader(dataset, batch_sampler=schedule)
    assert [indices.tolist() for _, _, indices in loader] == expected
    # The trainer's replay path (consecutive batch_size chunks of an order) gives the same batches.
    ordered = data.iter_ordered_batches(dataset, schedule.epoch_order(3), 16)
    assert [indices.tolist() for _, _, indices in ordered] == expected


@pytest.mark.parametrize("make", [poison.interlaced, poison.concentrated], ids=lambda f: f.__name__)
def test_schedule_drives_the_trainer(make):
    dataset = data.load("digits", max_examples=96)
    result = poison.gaussian(dataset, count=16, noise_std=0.5, seed=0)
    schedule = make(result.mask, 16, seed=0)
    run = train.train(
        models.mlp(64, (4,), 10), result.dataset, sampling=schedule, batch_size=16, epochs=2,
        progress=False,
    )  # fmt: skip
    for seed, visited in zip(run.epoch_seeds, run.epoch_orders, strict=True):
        # The recorded epoch seed replays the epoch; each batch holds the scheduled poisons.
        assert torch.equal(visited, schedule.order(seed))
        counts = sorted(int(result.mask[batch].sum()) for batch in visited.split(16))
        # 6 batches of 16: quota 16 * 16 / 96 = 2.67 each, or one whole batch of poisons.
        expected = [2, 2, 3, 3, 3, 3] if make is poison.interlaced else [0] * 5 + [16]
        assert counts == expected


def test_schedule_rejects_bad_arguments():
    with pytest.raises(InfluxValueError, match="mask must be a bool tensor of shape"):
        poison.interlaced(torch.zeros(5), 2)
    with pytest.raises(InfluxValueError, match="mask must be a bool tensor of shape"):
        poison.interlaced(torch.zeros(5, 2, dtype=torch.bool), 2)
    with pytest.raises(InfluxValueError, match="mask is empty"):
        poison.concentrated(torch.zeros(0, dtype=torch.bool), 2)
    with pytest.raises(InfluxValueError, match="batch_size must be >= 1"):
        poison.concentrated(_mask(5, 1), 0)
    with pytest.raises(InfluxValueError, match="kind must be one of"):
        poison.BatchSchedule(_mask(5, 1), 2, kind="random")
    with pytest.raises(InfluxValueError, match="epoch must be >= 0"):
        poison.interlaced(_mask(5, 1), 2).epoch_order(-1)


def test_poisons_read_only_the_chosen_examples_of_a_dataset_or_dataloader():
    dataset = LazyDataset(50, shape=(4,), classes=3)
    result = poison.gaussian(dataset, count=6, noise_std=0.5, seed=2)
    chosen = result.mask.nonzero().flatten()
    assert torch.equal(dataset.reads[chosen], torch.ones(6, dtype=torch.long))
    assert int(dataset.reads.sum()) == 6
    inputs, targets = LazyDataset(50, shape=(4,), classes=3).tensors()
    expected = poison.gaussian((inputs, targets), count=6, noise_std=0.5, seed=2)
    assert torch.equal(result.noise, expected.noise)
    assert torch.equal(result.base_inputs, expected.base_inputs)
    by_loader = poison.gaussian(DataLoader(dataset, batch_size=8), count=6, noise_std=0.5, seed=2)
    assert torch.equal(by_loader.noise, expected.noise) and torch.equal(by_loader.indices, chosen)


def test_a_dataloader_over_part_of_its_dataset_is_refused():
    from torch.utils.data import SubsetRandomSampler

    loader = DataLoader(LazyDataset(20), sampler=SubsetRandomSampler(range(10)), batch_size=4)
    with pytest.raises(InfluxValueError, match="visits 10 of its dataset's 20.*Subset"):
        poison.gaussian(loader, count=2, noise_std=0.1)
