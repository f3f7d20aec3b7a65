"""The engine streams a Dataset or DataLoader: the values of the tensor call, each example read
once per pass, and no batch larger than the chunk ever reaches the model."""

from __future__ import annotations

import pytest
import torch
from grad_models import cross_entropy
from torch import nn
from torch.utils.data import DataLoader
from utils import LazyDataset, assert_close

from influx.dp import clipped_grad
from influx.errors import InfluxValueError
from influx.grads import per_sample_grads, per_sample_norms, per_sample_projected

DTYPE = torch.float64


class NoWholeSet(LazyDataset):
    """A lazy dataset that refuses to be materialized: streaming must never need it."""

    def tensors(self):
        raise AssertionError("the whole set was asked for")


class LargestBatch(nn.Module):
    """A model that records the largest batch it was run on."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.largest = inner, 0

    def forward(self, x):
        self.largest = max(self.largest, x.shape[0])
        return self.inner(x)


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).to(DTYPE)


def _reference(n: int):
    """The same examples as LazyDataset(n), in memory."""
    return LazyDataset(n).tensors()


@pytest.mark.parametrize("chunk_size", [None, 16, 50])
def test_norms_of_a_dataset_equal_the_tensor_call_and_read_each_example_once(chunk_size):
    n = 50
    dataset, model = NoWholeSet(n), _model()
    streamed = per_sample_norms(model, cross_entropy, dataset, chunk_size=chunk_size)
    assert torch.equal(dataset.reads, torch.ones(n, dtype=torch.long))
    inputs, targets = _reference(n)
    # the same chunks, the same arithmetic: equal bit for bit (None: 256 for a Dataset, all 50)
    expected = per_sample_norms(model, cross_entropy, inputs, targets, chunk_size=chunk_size)
    assert torch.equal(streamed, expected)
    # and against the per-example loop (a plain reference), elementwise in float64
    loop = torch.stack([
        torch.cat([g.flatten() for g in torch.autograd.grad(
            cross_entropy(model(inputs[i : i + 1]), targets[i : i + 1]).sum(), model.parameters()
        )]).norm()
        for i in range(n)
    ])  # fmt: skip
    assert_close(streamed, loop, rtol=1e-12, elementwise=True)


def test_a_dataset_reaches_the_model_one_chunk_at_a_time():
    n, chunk = 300, 32
    dataset, model = NoWholeSet(n), LargestBatch(_model())
    norms = per_sample_norms(model, cross_entropy, dataset, chunk_size=chunk)
    assert model.largest == chunk and norms.shape == (n,)
    assert torch.equal(dataset.reads, torch.ones(n, dtype=torch.long))
    # chunk_size=None streams a Dataset 256 at a time, never all of it
    model.largest = 0
    per_sample_norms(model, cross_entropy, NoWholeSet(n))
    assert model.largest == 256


def test_a_dataloader_is_iterated_as_built():
    n = 40
    dataset, model = LazyDataset(n), LargestBatch(_model())
    loader = DataLoader(dataset, batch_size=8, shuffle=False)
    norms = per_sample_norms(model, cross_entropy, loader, by_layer=True)
    assert model.largest == 8
    assert torch.equal(dataset.reads, torch.ones(n, dtype=torch.long))
    expected = per_sample_norms(
        LargestBatch(_model()), cross_entropy, *_reference(n), by_layer=True, chunk_size=8
    )
    for name, value in expected.items():
        assert torch.equal(norms[name], value), name


def test_grads_and_projections_of_a_dataset_equal_the_tensor_calls():
    n, model = 30, _model()
    inputs, targets = _reference(n)
    grads = per_sample_grads(model, cross_entropy, NoWholeSet(n), chunk_size=7)
    expected = per_sample_grads(model, cross_entropy, inputs, targets, chunk_size=7)
    for name, value in expected.items():
        assert torch.equal(grads[name], value), name
    for kind in ("kronecker", "dense"):
        projected = per_sample_projected(
            model, cross_entropy, NoWholeSet(n), dim=8, kind=kind, chunk_size=7
        )
        reference = per_sample_projected(
            model, cross_entropy, inputs, targets, dim=8, kind=kind, chunk_size=7
        )
        assert torch.equal(projected, reference), kind


def test_a_tuple_is_the_tensor_call():
    n, model = 20, _model()
    inputs, targets = _reference(n)
    for chunk_size in (None, 6):
        assert torch.equal(
            per_sample_norms(model, cross_entropy, (inputs, targets), chunk_size=chunk_size),
            per_sample_norms(model, cross_entropy, inputs, targets, chunk_size=chunk_size),
        )


def test_clipped_grad_of_a_dataset_equals_the_tensor_call():
    n, model = 40, _model()
    dataset = NoWholeSet(n)
    streamed = clipped_grad(model, cross_entropy, dataset, max_grad_norm=0.3, chunk_size=16)
    assert torch.equal(dataset.reads, torch.ones(n, dtype=torch.long))
    inputs, targets = _reference(n)
    expected = clipped_grad(model, cross_entropy, inputs, targets, max_grad_norm=0.3, chunk_size=16)
    for name, value in expected.items():
        assert torch.equal(streamed[name], value), name


def test_errors_of_a_streamed_set_name_dataset_indices():
    class Shifted(LazyDataset):
        """Items carry dataset indices 100 + position; example 103's input is NaN."""

        def __getitem__(self, index):
            x, y, i = super().__getitem__(index)
            return (x * float("nan") if i == 3 else x), y, 100 + i

    with pytest.raises(InfluxValueError, match=r"losses of 1 example.*indices \[103\]"):
        per_sample_norms(_model(), cross_entropy, Shifted(10), chunk_size=4)


def test_out_of_range_targets_name_the_examples_and_the_range():
    inputs, targets = _reference(12)
    targets[[2, 9]] = torch.tensor([3, 7])
    with pytest.raises(
        InfluxValueError, match=r"\[0, 3\).*2 do not, at example indices \[2, 9\].*targets \[3, 7\]"
    ):
        per_sample_norms(_model(), cross_entropy, inputs, targets)
    # a streamed set: its dataset indices
    with pytest.raises(InfluxValueError, match=r"example indices \[52, 59\]"):
        per_sample_norms(_model(), cross_entropy, (inputs, targets, torch.arange(50, 62)))


def test_targets_go_with_tensors_only():
    inputs, targets = _reference(5)
    with pytest.raises(InfluxValueError, match="need their targets"):
        per_sample_norms(_model(), cross_entropy, inputs)
    with pytest.raises(InfluxValueError, match="leave targets out"):
        per_sample_norms(_model(), cross_entropy, LazyDataset(5), targets)
