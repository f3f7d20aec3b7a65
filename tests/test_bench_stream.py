"""The stream suite at a small scale: its lazily generated dataset, each example read once per
pass by EK-FAC self-influence, per-sample gradient norms and GUS with the values of the same data as
tensors, and (slow) peak memory that does not grow from 2,000 to 20,000 examples. Times are not
checked."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close

from benchmarks.suites import stream
from influx import influence
from influx.audit import gus
from influx.grads import per_sample_norms
from influx.train import cross_entropy_per_example

FACTOR_BATCH = 512  # EK-FAC's default factor batch: the first batch is also read by the checks


def tensors_of(dataset: stream.IndexedSynthetic) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    dataset.reads.zero_()
    return torch.stack([x for x, _, _ in items]), torch.stack([y for _, y, _ in items])


def test_examples_are_generated_from_their_index_and_counted():
    dataset = stream.IndexedSynthetic(10)
    first, again = dataset[3], dataset[3]
    assert torch.equal(first[0], again[0]) and int(first[1]) == int(again[1]) and first[2] == 3
    assert first[0].shape == stream.INPUT_SHAPE
    assert not torch.equal(dataset[4][0], first[0])
    assert dataset.reads.tolist() == [0, 0, 0, 2, 1, 0, 0, 0, 0, 0]
    # no tensor of all inputs: the dataset holds its read counts only
    assert [k for k, v in vars(dataset).items() if torch.is_tensor(v)] == ["reads"]


def test_per_sample_norms_read_each_example_once():
    model = stream.build_model()
    dataset = stream.IndexedSynthetic(700)
    reference = per_sample_norms(model, cross_entropy_per_example, tensors_of(dataset))
    norms = per_sample_norms(model, cross_entropy_per_example, dataset)
    assert dataset.reads.tolist() == [1] * 700
    assert_close(norms, reference)


def test_gus_reads_each_example_once_and_equals_the_tensor_call():
    model = stream.build_model()
    dataset = stream.IndexedSynthetic(600)
    inputs, targets = tensors_of(dataset)
    noise = stream.noise_of(torch.arange(600))
    reference = gus(model, cross_entropy_per_example, inputs, targets, noise, stream.GUS_NOISE_STD)
    streamed = gus(model, cross_entropy_per_example, dataset, stream.noise_of, stream.GUS_NOISE_STD)
    assert dataset.reads.tolist() == [1] * 600
    assert torch.equal(streamed.scores, reference.scores)
    assert streamed.z == reference.z


@pytest.mark.slow
def test_ekfac_self_influence_reads_each_example_once_per_pass():
    model = stream.build_model()
    dataset = stream.IndexedSynthetic(1300)
    expected = influence.fit(
        model, cross_entropy_per_example, tensors_of(dataset), method="ekfac"
    ).self_influence()
    values = influence.fit(model, cross_entropy_per_example, dataset, method="ekfac")
    values = values.self_influence()
    # Past the first batch (which the input checks also read) every example is read equally
    # often: once per pass (factors, eigenvalue refit, self-influence), whatever the label draws.
    later = dataset.reads[FACTOR_BATCH:]
    assert int(later.min()) == int(later.max()) <= 3
    assert int(dataset.reads.max()) <= int(later.max()) + 2
    assert_close(values, expected)


@pytest.mark.slow
@pytest.mark.parametrize("work", stream.WORKS)
def test_peak_memory_does_not_grow_with_the_number_of_examples(work, monkeypatch):
    monkeypatch.setenv("INFLUX_STREAM_THREADS", "1")
    small, large = stream.child(work, 2_000), stream.child(work, 20_000)
    assert "peak_rss_mb" in small and "peak_rss_mb" in large, (small, large)
    # The inputs of 18,000 more examples are 211 MB: holding them would fail this by far.
    assert large["peak_rss_mb"] < 1.1 * small["peak_rss_mb"], (small, large)
    assert large["reads_min"] >= 1 and large["reads_max"] <= small["reads_max"]


def test_fit_rows_give_seconds_per_thousand_and_memory_growth():
    rows = [
        {"work": "w", "train": n, "seconds": 1 + n / 2000, "peak_rss_mb": mb}
        for n, mb in ((10_000, 600.0), (20_000, 606.0), (40_000, 630.0))
    ]
    fit = stream.slope_row("w", rows)
    assert fit["train"] == "fit" and abs(fit["seconds_per_1000"] - 0.5) < 1e-9
    assert [r["rss_vs_smallest"] for r in stream.with_growth(rows)] == [1.0, 1.01, 1.05]


def test_gus_of_a_loader_that_drops_its_last_batch_scores_the_points_it_yields():
    model = stream.build_model()
    dataset = stream.IndexedSynthetic(10)
    inputs, targets = tensors_of(dataset)
    noise = stream.noise_of(torch.arange(10))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, drop_last=True)
    dropped = gus(model, cross_entropy_per_example, loader, stream.noise_of, stream.GUS_NOISE_STD)
    whole = gus(model, cross_entropy_per_example, inputs, targets, noise, stream.GUS_NOISE_STD)
    assert dropped.indices.tolist() == list(range(8))
    assert torch.equal(dropped.scores, whole.scores[:8])
