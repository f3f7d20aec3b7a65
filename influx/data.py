"""Datasets and the data-argument convention.

Every data argument in influx (``train``, ``query``, ``forget``, ...) accepts either a tuple
``(inputs, targets)`` of tensors or a torch ``Dataset`` yielding ``(input, target)`` or
``(input, target, index)``. :func:`as_tensors` and :func:`iter_batches` turn any of them into
batches that carry the dataset indices, so every score can be aligned to its example.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from influx.errors import InfluxValueError

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs [B, ...], targets [B, ...], indices [B]


def _with_index(item: Any, position: int) -> tuple:
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise InfluxValueError(
            f"a dataset item must be (input, target) or (input, target, index); got {type(item).__name__}"
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


def _check_pair(data: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    if len(data) not in (2, 3):
        raise InfluxValueError(
            f"data given as a tuple must be (inputs, targets) or (inputs, targets, indices); got {len(data)} items"
        )
    inputs, targets = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    if inputs.shape[0] != targets.shape[0]:
        raise InfluxValueError(
            f"inputs and targets disagree on the number of examples: {inputs.shape[0]} vs {targets.shape[0]}"
        )
    return inputs, targets


def as_tensors(data) -> Batch:
    """Return ``(inputs, targets, indices)`` holding the whole of ``data`` in memory."""
    if isinstance(data, (tuple, list)):
        inputs, targets = _check_pair(data)
        if len(data) == 3:
            indices = torch.as_tensor(data[2], dtype=torch.long)
        else:
            indices = torch.arange(inputs.shape[0])
        return inputs, targets, indices
    if isinstance(data, Dataset):
        batches = list(iter_batches(data, batch_size=1024))
        if not batches:
            raise InfluxValueError("the dataset is empty")
        return tuple(torch.cat(parts) for parts in zip(*batches))  # type: ignore[return-value]
    raise InfluxValueError(
        f"data must be a tuple (inputs, targets) or a torch Dataset; got {type(data).__name__}"
    )


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
            yield inputs, targets, torch.as_tensor(indices, dtype=torch.long)
        return
    raise InfluxValueError(
        f"data must be a tuple (inputs, targets) or a torch Dataset; got {type(data).__name__}"
    )


def num_examples(data) -> int:
    """Number of examples in a data argument."""
    if isinstance(data, (tuple, list)):
        return _check_pair(data)[0].shape[0]
    return len(data)
