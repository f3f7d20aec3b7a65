"""influx.ensembles: K models trained at once under vmap equal K models trained alone; each
model's randomness is its own; Datasets are read by position, not held whole."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from utils import LazyDataset, assert_close

from influx import data, ensembles, memorization, models
from influx.ensembles import _SeededDropout
from influx.train import cross_entropy_per_example, train_ensemble

LOSS = cross_entropy_per_example


@pytest.fixture(scope="module")
def digits_subset():
    inputs, targets, _ = data.as_tensors(data.load("digits"))
    return (inputs[:120], targets[:120]), (inputs[1500:1530], targets[1500:1530])


def _tiny_mlp():
    return models.mlp(64, (16,), 10)


def _fresh_batch(n=20, d=6, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, d, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, classes, (n,), generator=generator)
    return inputs, targets


@pytest.mark.slow
def test_ensemble_training_equals_one_model_at_a_time(digits_subset):
    """vmapped chunk == each model trained alone with the same id (float64, same arithmetic)."""
    inputs, targets = digits_subset[0]
    batch = (inputs.double(), targets)
    masks = ensembles.subset_masks(120, [4, 5, 6], 0.5, seed=1)
    assert torch.equal(masks[1:2], ensembles.subset_masks(120, [5], 0.5, seed=1))
    recipe = dict(epochs=2, lr=1e-2, batch_size=25, seed=1)
    together = ensembles.fit_ensemble(
        lambda: _tiny_mlp().double(), LOSS, batch, masks, model_ids=[4, 5, 6], **recipe
    )
    for k, model_id in enumerate([4, 5, 6]):
        alone = ensembles.fit_ensemble(
            lambda: _tiny_mlp().double(),
            LOSS,
            batch,
            masks[k : k + 1],
            model_ids=[model_id],
            **recipe,
        )
        for name, stacked in together.params.items():
            # Batched vs single matmuls differ in summation order only: float64 ulps, amplified
            # a little by Adam's division by sqrt(v); 1e-9 is far below any training effect.
            assert_close(stacked[k], alone.params[name][0], rtol=1e-9, name=name)


# --- dropout: masks seeded per model -------------------------------------------------------------


class _ReusedDropoutMLP(torch.nn.Module):
    """One nn.Dropout module called twice per forward (a common hand-written pattern)."""

    def __init__(self, d=6, width=16, classes=3, p=0.5):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, width), torch.nn.Linear(width, width)
        self.out, self.drop = torch.nn.Linear(width, classes), torch.nn.Dropout(p)

    def forward(self, x):
        x = self.drop(torch.relu(self.fc1(x)))
        return self.out(self.drop(torch.relu(self.fc2(x))))


class _FunctionalDropoutMLP(_ReusedDropoutMLP):
    def forward(self, x):
        x = torch.nn.functional.dropout(torch.relu(self.fc1(x)), 0.5, self.training)
        return self.out(torch.relu(self.fc2(x)))


def test_seeded_dropout_is_dropout_with_the_given_noise():
    x = torch.randn(4, 5, dtype=torch.float64, device="cpu")
    noise = torch.rand(2 * 20, device="cpu")
    module = _SeededDropout(0.3)
    module.noise = noise
    first, second = module(x), module(2 * x)  # two calls read consecutive noise
    keep = (noise >= 0.3).double().view(2, 4, 5)
    # Same elementwise products: exact up to the rounding of 1 / 0.7.
    assert_close(first, x * keep[0] / 0.7, rtol=1e-15, name="first call")
    assert_close(second, 2 * x * keep[1] / 0.7, rtol=1e-15, name="second call")
    assert torch.equal(module.eval()(x), x)


@pytest.mark.slow
def test_dropout_runs_do_not_depend_on_the_chunk():
    inputs, targets = _fresh_batch(n=40)
    batch = (inputs, targets)

    def model_fn():
        return _ReusedDropoutMLP().double()

    masks = ensembles.subset_masks(40, range(4), 0.5, seed=2)
    recipe = dict(epochs=3, lr=0.05, batch_size=8, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nn.Dropout alone: nothing drawn from a shared stream
        together = ensembles.fit_ensemble(model_fn, LOSS, batch, masks, **recipe)
        pair = ensembles.fit_ensemble(model_fn, LOSS, batch, masks[2:], model_ids=[2, 3], **recipe)
        alone = ensembles.fit_ensemble(model_fn, LOSS, batch, masks[2:3], model_ids=[2], **recipe)
    for name, stacked in together.params.items():
        # Batched vs single matmuls: float64 ulps amplified a little by Adam (as above); with
        # chunk-dependent masks model 2 differed by 0.56 here.
        assert_close(stacked[2:], pair.params[name], rtol=1e-9, name=name)
        assert_close(stacked[2], alone.params[name][0], rtol=1e-9, name=name)
    # Dropout is active: the same runs without it end elsewhere.
    plain = ensembles.fit_ensemble(
        lambda: _ReusedDropoutMLP(p=0.0).double(), LOSS, batch, masks, **recipe
    )
    assert not torch.allclose(plain.params["fc1.weight"], together.params["fc1.weight"])
    setup = dict(n_models=4, subset_frac=0.5, epochs=2, lr=0.05, batch_size=8, seed=2)
    with pytest.warns(UserWarning, match="never in"):
        by_four = memorization.estimate(model_fn, LOSS, batch, chunk=4, **setup)
    with pytest.warns(UserWarning, match="never in"):
        by_two = memorization.estimate(model_fn, LOSS, batch, chunk=2, **setup)
    _same_mem = torch.equal(by_four.mem.nan_to_num(9.0), by_two.mem.nan_to_num(9.0))
    assert _same_mem, (by_four.mem, by_two.mem)


def test_random_draws_outside_dropout_modules_are_warned():
    inputs, targets = _fresh_batch(n=16)
    masks = ensembles.subset_masks(16, range(2), 0.5, seed=0)
    with pytest.warns(UserWarning, match="outside nn.Dropout") as record:
        ensembles.fit_ensemble(
            lambda: _FunctionalDropoutMLP().double(), LOSS, (inputs, targets), masks, epochs=1,
            lr=0.05, batch_size=4,
        )  # fmt: skip
    assert record[0].filename == __file__  # the warning points at the user's call


# --- streaming: a Dataset is read by position --------------------------------------------------


def _same_params(a: ensembles.Ensemble, b: ensembles.Ensemble) -> None:
    assert a.params.keys() == b.params.keys()
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name


def test_a_dataset_trains_the_same_models_reading_only_the_subsets():
    lazy = LazyDataset(40, shape=(6,), classes=3, seed=1)
    tensors = lazy.tensors()
    masks = ensembles.subset_masks(40, range(3), 0.25, seed=4)
    recipe = dict(epochs=2, lr=0.05, batch_size=4, seed=4)

    def model_fn():
        return models.mlp(6, (8,), 3).double()

    streamed = ensembles.fit_ensemble(model_fn, LOSS, lazy, masks, **recipe)
    _same_params(streamed, ensembles.fit_ensemble(model_fn, LOSS, tensors, masks, **recipe))
    held = masks.any(0)
    # Never the whole set: an example in no subset is not read; one in s subsets is read at
    # most once per epoch for each (once per step, however many models take it that step), plus
    # once in the first batch, which a probe forward reads before training.
    assert (lazy.reads[~held] == 0).all() and (~held).any()
    assert (lazy.reads <= 2 * masks.sum(0) + 1).all() and (lazy.reads[held] >= 1).all()
    lazy.reads.zero_()
    correct = streamed.correct(lazy, batch_size=16)
    assert torch.equal(lazy.reads, torch.ones(40, dtype=torch.long))
    assert torch.equal(correct, streamed.correct(tensors))


def test_memorization_estimate_streams_a_dataset_to_the_same_numbers():
    lazy = LazyDataset(30, shape=(6,), classes=3, seed=2)
    test = LazyDataset(10, shape=(6,), classes=3, seed=3)
    setup = dict(n_models=4, subset_frac=0.5, epochs=2, lr=0.05, batch_size=5, seed=1, chunk=2)

    def model_fn():
        return models.mlp(6, (8,), 3).double()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few models: some examples never out
        streamed = memorization.estimate(model_fn, LOSS, lazy, test=test, **setup)
        held = memorization.estimate(model_fn, LOSS, lazy.tensors(), test=test.tensors(), **setup)
    for name in ("mem", "stderr", "influence"):
        x, y = getattr(streamed, name), getattr(held, name)
        assert torch.equal(x.nan_to_num(9.0), y.nan_to_num(9.0)), name
    # Each chunk reads its subsets by position and the whole set once for correctness: at most
    # epochs * (models holding i) + chunks reads, never a copy of the set per chunk.
    assert (lazy.reads <= 2 * 4 + 2).all()
    # The test set: one pass per chunk, and its first example once more for the target check.
    expected = torch.full((10,), 2, dtype=torch.long)
    expected[0] += 1
    assert torch.equal(test.reads, expected)


# --- the two recipes, one loop ------------------------------------------------------------------


def test_fit_weighted_is_train_ensemble_and_independent_adam_runs():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inputs = torch.randn(12, 4, dtype=torch.float64)
    targets = torch.randint(0, 3, (12,))
    weights = torch.rand(3, 12, dtype=torch.float64) * (torch.rand(3, 12) < 0.7)
    start = {k: v + 0.01 for k, v in model.named_parameters()}
    stacked = ensembles.fit_weighted(
        model, LOSS, (inputs, targets), weights, init=start, steps=4, lr=0.05, chunk=2
    )
    with pytest.warns(DeprecationWarning, match="ensembles.fit_weighted"):
        alias = train_ensemble(model, LOSS, inputs, targets, weights, init=start, steps=4,
                               lr=0.05, chunk=2)  # fmt: skip
    for name in stacked:
        assert torch.equal(stacked[name], alias[name])
    for k in range(3):
        copy = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        copy.load_state_dict({**model.state_dict(), **start})
        optimizer = torch.optim.Adam(copy.parameters(), lr=0.05)
        for _ in range(4):
            optimizer.zero_grad()
            (LOSS(copy(inputs), targets) * weights[k]).sum().backward()
            optimizer.step()
        for name, value in copy.named_parameters():
            # float64; batched and single matmuls differ in summation order only.
            assert_close(stacked[name][k], value, rtol=1e-12, name=f"member {k} {name}")


def test_the_old_memorization_fit_ensemble_is_deprecated_and_the_same():
    inputs, targets = _fresh_batch(n=16)
    masks = ensembles.subset_masks(16, range(2), 0.5, seed=0)
    recipe = dict(epochs=1, lr=0.05, batch_size=4)
    new = ensembles.fit_ensemble(_tiny_double, LOSS, (inputs, targets), masks, **recipe)
    with pytest.warns(DeprecationWarning, match=r"ensembles.fit_ensemble\(model_fn, loss_fn"):
        old = memorization.fit_ensemble(_tiny_double, (inputs, targets), masks, **recipe)
    _same_params(old, new)
    assert memorization.Ensemble is ensembles.Ensemble
    assert memorization.subset_masks is ensembles.subset_masks


def _tiny_double():
    return models.mlp(6, (5,), 3).double()
