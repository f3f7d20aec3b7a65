"""Unlearning on streamed sets, and the inputs every method refuses: a forget set inside the
retain set, a budget that is not a number, an unknown method name, out-of-range labels."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from unlearn_helpers import LOSS, tiny_mlp
from utils import LazyDataset

from influx import unlearn
from influx.errors import InfluxValueError, UnsupportedModelError

ALL = sorted(unlearn.METHODS) + ["retrain"]
SETTINGS = {"retrain": {"epochs": 1}, "newton": {"damping": 0.5}}


def _lazy(n: int = 40) -> LazyDataset:
    return LazyDataset(n, shape=(5,), classes=3)


def _call(name, forget, retain, **extra):
    method = unlearn.retrain if name == "retrain" else unlearn.METHODS[name]
    settings = {"budget": 10**6, "progress": False, **SETTINGS.get(name, {}), **extra}
    if name in ("ssd", "newton"):  # one-step methods: no batches of their own
        settings.pop("batch_size", None)
    elif name != "retrain":
        settings.setdefault("max_steps", 2)
    return method(tiny_mlp(), LOSS, forget, retain, **settings)


@pytest.mark.parametrize("name", ALL)
def test_a_forget_set_inside_the_retain_set_is_refused(name):
    dataset = _lazy()
    forget = Subset(dataset, list(range(5)))
    with pytest.raises(
        InfluxValueError, match=r"share 5 of the forget set's 5 .*\[0, 1, 2, 3, 4\]"
    ):
        _call(name, forget, dataset)
    # tensors carrying indices: the same refusal, counting the shared ones
    inputs, targets = dataset.tensors()
    forget = (inputs[:6], targets[:6], torch.arange(6))
    retain = (inputs[4:], targets[4:], torch.arange(4, 40))
    with pytest.raises(InfluxValueError, match=r"share 2 of the forget set's 6 .*\[4, 5\]"):
        _call(name, forget, retain)
    # one set given as both
    with pytest.raises(InfluxValueError, match="forget and retain are the same set"):
        _call(name, retain, retain)


@pytest.mark.parametrize("budget", [True, "100", float("nan"), -1, None])
def test_a_budget_that_is_not_a_number_is_refused(budget):
    dataset = _lazy()
    forget, retain = Subset(dataset, [0, 1]), Subset(dataset, list(range(2, 40)))
    if budget is None:  # no budget and no train_compute
        with pytest.raises(InfluxValueError, match="no budget"):
            unlearn.fine_tune(tiny_mlp(), LOSS, forget, retain, progress=False)
        return
    with pytest.raises(InfluxValueError, match=r"budget must be a number >= 0.*got"):
        unlearn.fine_tune(tiny_mlp(), LOSS, forget, retain, budget=budget, progress=False)
    with pytest.raises(InfluxValueError, match="train_compute must be a finite number >= 0"):
        unlearn.fine_tune(tiny_mlp(), LOSS, forget, retain, train_compute=True, progress=False)


def test_an_unknown_method_names_the_closest_and_all():
    with pytest.raises(KeyError, match=r"no unlearning method 'scurb': did you mean 'scrub'\?.*"):
        unlearn.METHODS["scurb"]
    with pytest.raises(unlearn.UnknownMethodError, match=r"the methods are \['cf_k'"):
        unlearn.METHODS["zzz"]
    assert "scrub" in unlearn.METHODS and "scurb" not in unlearn.METHODS
    assert unlearn.METHODS.get("scurb") is None


def test_out_of_range_labels_name_the_examples():
    inputs, targets = _lazy().tensors()
    targets[[7, 30]] = torch.tensor([5, -1])
    forget = (inputs[:4], targets[:4], torch.arange(4))
    retain = (inputs[4:], targets[4:], torch.arange(4, 40))
    with pytest.raises(InfluxValueError, match=r"\[0, 3\).*example indices \[7, 30\]"):
        unlearn.fine_tune(tiny_mlp(), LOSS, forget, retain, budget=400, batch_size=36,
                          progress=False)  # fmt: skip


def test_batchnorm_is_refused_by_the_one_refusal():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double().eval()
    dataset = _lazy()
    with pytest.raises(UnsupportedModelError, match=r"unlearning runs it in train mode.*convert_"):
        unlearn.fine_tune(model, LOSS, Subset(dataset, [0]), Subset(dataset, [1, 2]), budget=4)


@pytest.mark.parametrize("name", ALL)
def test_a_streamed_set_unlearns_as_its_tensors_do(name):
    n, cut = 40, 8
    dataset = _lazy(n)
    inputs, targets = dataset.tensors()
    by_tensors = _call(
        name, (inputs[:cut], targets[:cut], torch.arange(cut)),
        (inputs[cut:], targets[cut:], torch.arange(cut, n)), batch_size=16,
    )  # fmt: skip
    by_dataset = _call(
        name, Subset(dataset, list(range(cut))), Subset(dataset, list(range(cut, n))),
        batch_size=16,
    )  # fmt: skip
    for key, value in by_tensors.model.state_dict().items():
        assert torch.equal(by_dataset.model.state_dict()[key], value), key
    assert by_dataset.spent == by_tensors.spent


def test_a_stream_reads_each_example_once_per_pass():
    n, cut, size = 40, 8, 16
    dataset = _lazy(n)
    retain = Subset(dataset, list(range(cut, n)))
    passes = 3
    steps = passes * (n - cut) // size  # 32 retain examples: exactly 2 batches per pass
    unlearn.fine_tune(tiny_mlp(), LOSS, Subset(dataset, list(range(cut))), retain,
                      budget=math.inf, max_steps=steps, batch_size=size, progress=False)  # fmt: skip
    # one read for the indices, then one per pass
    assert torch.equal(dataset.reads[cut:], torch.full((n - cut,), 1 + passes))
    assert torch.equal(dataset.reads[:cut], torch.ones(cut, dtype=torch.long))


def test_a_dataloader_is_a_set_too():
    dataset = _lazy()
    forget = DataLoader(Subset(dataset, [0, 1, 2]), batch_size=2)
    retain = DataLoader(Subset(dataset, list(range(3, 40))), batch_size=8)
    result = unlearn.gradient_ascent(tiny_mlp(), LOSS, forget, retain, budget=6, batch_size=3,
                                     progress=False)  # fmt: skip
    assert result.spent == 6
    with pytest.raises(InfluxValueError, match="share 3"):
        unlearn.scrub(tiny_mlp(), LOSS, forget, DataLoader(dataset), budget=6, progress=False)


def test_a_dataloader_over_part_of_its_dataset_is_refused():
    from torch.utils.data import SubsetRandomSampler

    dataset = _lazy()
    retain = DataLoader(dataset, sampler=SubsetRandomSampler(list(range(5, 40))), batch_size=4)
    with pytest.raises(InfluxValueError, match="visits 35 of its dataset's 40.*Subset"):
        unlearn.fine_tune(tiny_mlp(), LOSS, Subset(dataset, [0]), retain, budget=8)
