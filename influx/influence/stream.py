"""Reading a data argument batch by batch, with the checks influence owes it on the way.

Every estimator fits from :func:`batches` and every score streams through it: a tuple is sliced,
a Dataset or DataLoader is read through :func:`influx.data.iter_batches`, never concatenated.
:func:`checked` wraps a data argument so that its first complete pass also checks each batch as
it arrives (inputs finite, one finite loss per example, errors naming the dataset indices) and
records the dataset indices; later passes only read. So the checks cost no pass of their own:
each pass reads each example once, the first one included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from influx.data import Batch, as_tensors, iter_batches, num_examples
from influx.errors import InfluxValueError
from influx.grads.common import check_finite, check_per_example_losses

# Train features are kept in memory after their first pass when they fit in this many bytes.
CACHE_BYTES = 1 << 30


def fits_cache(examples: int, bytes_per_example: int) -> bool:
    """Whether the features of ``examples`` examples fit :data:`CACHE_BYTES` (decided up
    front, so a pass that cannot keep them never holds a partial list)."""
    return examples * bytes_per_example <= CACHE_BYTES


class Checked:
    """A data argument (``data``) whose first complete pass checks every batch with ``loss_fn``
    (the training loss, or a query's measurement) and records its dataset ``indices`` [N].

    ``what`` names the set in errors ("train", "query"); ``values`` names what ``loss_fn``
    returns ("losses", "measurements"). An empty set is refused when wrapped, before any work.
    Without a ``model`` nothing is checked, and the indices are still recorded.
    """

    def __init__(
        self, data, model: nn.Module, loss_fn: Callable, what: str, *, values: str = "losses"
    ):
        self.data, self.model, self.loss_fn = data, model, loss_fn
        self.what, self.values = what, values
        self.size = num_examples(data)
        if self.size == 0:
            raise _empty(what)
        self.indices: torch.Tensor | None = None
        self.passed = False  # a whole pass was read and checked
        if isinstance(data, (tuple, list)):
            # A tuple's indices are at hand (as_tensors only checks and slices it).
            self.indices = as_tensors(data)[2]

    def batches(self, batch_size: int) -> Iterator[Batch]:
        if self.passed:
            yield from iter_batches(self.data, batch_size)
            return
        seen = []
        for inputs, targets, indices in iter_batches(self.data, batch_size):
            if self.model is not None:
                check_batch(
                    self.model, self.loss_fn, inputs, targets, indices, self.what, self.values
                )
            seen.append(indices)
            yield inputs, targets, indices
        if not seen:
            raise _empty(self.what)
        self.indices = _distinct(torch.cat(seen), self.what)
        self.passed = True


def checked(data, model, loss_fn, what: str, *, values: str = "losses") -> Checked:
    """``data`` wrapped so that its first pass is checked (see :class:`Checked`); a
    :class:`Checked` is returned as it is, with what its passes found."""
    if isinstance(data, Checked):
        return data
    return Checked(data, model, loss_fn, what, values=values)


def batches(data, batch_size: int) -> Iterator[Batch]:
    """``(inputs, targets, indices)`` batches of ``data`` (a data argument or :class:`Checked`)
    of at most ``batch_size`` examples, in order: the batch boundaries of a tuple are those of
    slicing it every ``batch_size`` rows."""
    if isinstance(data, Checked):
        return data.batches(batch_size)
    return iter_batches(data, batch_size)


def size(data) -> int:
    """The number of examples of ``data`` (a data argument or :class:`Checked`), read from no
    example."""
    return data.size if isinstance(data, Checked) else num_examples(data)


def check_batch(
    model: nn.Module,
    loss_fn: Callable,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    indices: torch.Tensor,
    what: str,
    values: str = "losses",
) -> None:
    """One batch's inputs finite, and ``loss_fn`` one finite value per example (a forward pass
    without gradients); errors name the dataset indices of the offending examples."""
    if inputs.is_floating_point():
        check_finite(inputs, f"{what} inputs", indices=indices)
    with torch.no_grad():
        try:
            outputs = model(inputs)
        except RuntimeError as error:
            raise InfluxValueError(
                f"the model fails on the {what} inputs: {error}; {_input_hint(model, inputs)}"
            ) from error
        losses = loss_fn(outputs, targets)
    check_per_example_losses(losses, inputs.shape[0])
    check_finite(losses, f"{what} {values}", indices=indices)


def check_data(model: nn.Module, loss_fn, data, what: str, *, batch_size: int) -> None:
    """Check all of ``data`` (any data argument) now: not empty, finite inputs and losses.
    Costs one pass; influence's own entry points check on their first pass instead."""
    for _ in batches(checked(data, model, loss_fn, what), batch_size):
        pass


def _empty(what: str) -> InfluxValueError:
    return InfluxValueError(
        f"the {what} set is empty: pass at least one example (inputs of shape [N, ...], N >= 1)"
    )


def _distinct(indices: torch.Tensor, what: str) -> torch.Tensor:
    """The dataset indices of a whole pass: one per example, none repeated across batches."""
    unique, counts = torch.unique(indices, return_counts=True)
    if unique.numel() != indices.numel():
        repeated = unique[counts > 1]
        raise InfluxValueError(
            f"the {what} set's dataset indices repeat ({repeated.numel()} of them, e.g. "
            f"{repeated[:5].tolist()}): give each example its own index"
        )
    return indices


def _input_hint(model: nn.Module, inputs: torch.Tensor) -> str:
    """What to check when the model's forward fails on inputs that passed every other check."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if inputs.is_floating_point() and dtype is not None and inputs.dtype != dtype:
        return (
            f"the inputs are {inputs.dtype} and the model's parameters {dtype}: cast one to the "
            f"other (inputs.to({dtype}) or model.to({inputs.dtype}))"
        )
    return (
        f"check that one example, of shape {tuple(inputs.shape[1:])}, has the shape the model "
        "was built for"
    )
