"""Poisoned training sets and the batch orders that train on them.

Poisons (each returns a result object holding the poisoned dataset and everything an audit needs):

- :func:`gaussian` (Pawelczyk et al. 2024): ``x~ = x + xi``, ``xi ~ N(0, noise_std^2 I)``, on a
  seeded random subset; labels unchanged. The audit is :func:`influx.audit.gus.gus`.
- :func:`label_flip`: a seeded random subset gets a different, uniformly drawn class.
- :func:`adversarial`: clean-label FGSM poisons ``x + eps * sign(grad_x l(theta; x, y))``.

Data is a tuple, a Dataset or a DataLoader (whose dataset the examples are picked from); only
the chosen examples are read, each once, and the poisoned dataset reads the rest from the base
when asked. The poisoned dataset yields ``(input, target, index)`` with the original dataset
indices, so scores computed on it align with the clean data; ``result.forget`` and ``result.retain`` are its
poisoned and clean parts.

Batch schedules (:func:`interlaced`, :func:`concentrated`) fix how the poisoned examples are
spread over the mini-batches of each epoch: every batch partially poisoned, or as few batches as
possible fully poisoned, with the same poison count and epoch length. A schedule is the
trainer's sampling hook (``train.train(..., sampling=schedule)``) and a torch sampler of batches
(``DataLoader(dataset, batch_sampler=schedule)``).

Randomness is drawn on a CPU generator seeded by ``seed`` and moved to the data's device, so a
seed gives the same poisons on every device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from influx.checks import check_choice, check_integer, check_number, is_integer
from influx.data import LossFn, as_tensors, iter_batches, num_examples
from influx.errors import InfluxRuntimeError, InfluxValueError
from influx.grads.common import call_loss, check_finite

__all__ = [
    "AdversarialPoison",
    "BatchSchedule",
    "GaussianPoison",
    "LabelFlipPoison",
    "Poison",
    "PoisonedDataset",
    "adversarial",
    "concentrated",
    "gaussian",
    "input_gradients",
    "interlaced",
    "label_flip",
]


# ----------------------------------------------------------------------------------------------
# The poisoned dataset
# ----------------------------------------------------------------------------------------------


def _random_access(data):
    """``data`` as something examples can be picked from by position: a DataLoader's dataset
    (poisons choose positions, not batches)."""
    if isinstance(data, DataLoader):
        if num_examples(data) != len(data.dataset):
            raise InfluxValueError(
                f"the DataLoader visits {num_examples(data)} of its dataset's "
                f"{len(data.dataset)} examples, which cannot be picked by position: pass "
                "Subset(dataset, positions) (or a DataLoader over it)"
            )
        return data.dataset
    return data


def _num_examples(data) -> int:
    if not isinstance(data, (tuple, list, Dataset)):
        raise InfluxValueError(
            "data must be a tuple (inputs, targets), a torch Dataset or a DataLoader; got "
            f"{type(data).__name__}"
        )
    return num_examples(data)


def _tensor(value) -> torch.Tensor:
    """A tensor stays where it is; anything else (array, list, number) becomes a CPU tensor."""
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value, device="cpu")


def _tensor_triple(data: tuple | list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`influx.data.as_tensors` of a tuple, with the indices on the inputs' device."""
    inputs, targets, indices = as_tensors(data)
    return inputs, targets, indices.to(inputs.device)


def _item(data, position: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(input, target, index)`` of ``data`` at ``position``; the index defaults to it."""
    if isinstance(data, tuple):
        inputs, targets, indices = data
        return inputs[position], targets[position], int(indices[position])
    item = data[position]
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise InfluxValueError(
            "a dataset item must be (input, target) or (input, target, index); "
            f"got {type(item).__name__}"
        )
    index = int(item[2]) if len(item) == 3 else position
    return _tensor(item[0]), _tensor(item[1]), index


def _gather(data, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs [k, ...], targets [k] and dataset indices [k] of the examples at ``positions``."""
    if isinstance(data, tuple):
        inputs, targets, indices = data
        chosen = positions.to(inputs.device)
        return inputs[chosen], targets[chosen], indices[chosen]
    items = [_item(data, int(p)) for p in positions.tolist()]
    inputs = torch.stack([x for x, _, _ in items])
    targets = torch.stack([y for _, y, _ in items])
    indices = torch.tensor([i for _, _, i in items], dtype=torch.long, device=inputs.device)
    return inputs, targets, indices


class PoisonedDataset(Dataset):
    """``base`` with the inputs and/or targets of the examples at ``positions`` replaced.

    Items are ``(input, target, index)`` where ``index`` is the base's dataset index (the third
    item of a base item, else its position), so scores on the poisoned data align with the clean
    data. Carries ``mask`` [N] (bool, True where poisoned) and, when the base has them,
    ``num_classes``, ``input_shape`` and ``targets`` [N] (with any replaced labels).
    """

    def __init__(
        self,
        base,
        positions: torch.Tensor,
        inputs: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ):
        base = _random_access(base)
        self.base = _tensor_triple(base) if isinstance(base, (tuple, list)) else base
        n = _num_examples(base)
        positions = positions.detach().cpu().long()
        self.positions = positions
        self.poisoned_inputs = inputs
        self.poisoned_targets = targets
        # row[p] = which replacement belongs to position p (-1: none).
        self._row = torch.full((n,), -1, dtype=torch.long, device="cpu")
        self._row[positions] = torch.arange(positions.shape[0], device="cpu")
        self.mask = self._row >= 0
        for name in ("num_classes", "input_shape"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))
        base_targets = (
            self.base[1] if isinstance(self.base, tuple) else getattr(base, "targets", None)
        )
        if isinstance(base_targets, torch.Tensor) and base_targets.shape[:1] == (n,):
            full = base_targets.clone()
            if targets is not None:
                full[positions.to(full.device)] = targets.to(full.device, full.dtype)
            self.targets = full

    def __len__(self) -> int:
        return self._row.shape[0]

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        position = int(position)
        if not -len(self) <= position < len(self):
            raise IndexError(f"index {position} out of range for a dataset of {len(self)} examples")
        position %= len(self)
        x, y, index = _item(self.base, position)
        row = int(self._row[position])
        if row >= 0:
            if self.poisoned_inputs is not None:
                x = self.poisoned_inputs[row]
            if self.poisoned_targets is not None:
                y = self.poisoned_targets[row]
        return x, y, index

    def __repr__(self) -> str:
        return f"PoisonedDataset(n={len(self)}, poisoned={self.positions.shape[0]})"


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Poison:
    """A poisoned training set.

    - ``dataset``: the poisoned data, items ``(input, target, index)`` with the original indices;
    - ``mask`` [N] bool, True at the positions of the poisoned examples;
    - ``indices`` [k]: the dataset indices of the poisoned examples, sorted by position;
    - ``seed``: the seed that chose them (and drew any noise).

    ``forget`` / ``retain`` are the poisoned / clean parts of ``dataset`` (torch Subsets, indices
    preserved), the usual forget and retain sets of an unlearning experiment.
    """

    dataset: PoisonedDataset
    mask: torch.Tensor
    indices: torch.Tensor
    seed: int

    @property
    def count(self) -> int:
        return int(self.indices.shape[0])

    @property
    def forget(self) -> Subset:
        return Subset(self.dataset, self.dataset.positions.tolist())

    @property
    def retain(self) -> Subset:
        return Subset(self.dataset, torch.nonzero(~self.dataset.mask).flatten().tolist())

    def _describe(self) -> str:
        return f"count={self.count} of {self.mask.shape[0]}, seed={self.seed}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"


@dataclass(frozen=True, repr=False)
class GaussianPoison(Poison):
    """Gaussian poisons ``x~ = base_inputs + noise``: ``base_inputs`` [k, ...] the clean inputs,
    ``targets`` [k] their (unchanged) labels, ``noise`` [k, ...] the draws of N(0, noise_std^2 I)."""

    base_inputs: torch.Tensor
    targets: torch.Tensor
    noise: torch.Tensor
    noise_std: float

    @property
    def poisoned_inputs(self) -> torch.Tensor:
        return self.base_inputs + self.noise

    def _describe(self) -> str:
        return f"{super()._describe()}, noise_std={self.noise_std:g}"


@dataclass(frozen=True, repr=False)
class LabelFlipPoison(Poison):
    """Label flips: ``targets`` [k] the original labels, ``new_targets`` [k] the flipped ones
    (each differs from its original), among ``num_classes`` classes."""

    targets: torch.Tensor
    new_targets: torch.Tensor
    num_classes: int


@dataclass(frozen=True, repr=False)
class AdversarialPoison(Poison):
    """Clean-label FGSM poisons ``base_inputs + perturbation``, ``perturbation`` [k, ...] =
    ``eps * sign(grad_x l(theta; x, y))`` (clipped when asked); ``targets`` [k] unchanged."""

    base_inputs: torch.Tensor
    targets: torch.Tensor
    perturbation: torch.Tensor
    eps: float

    def _describe(self) -> str:
        return f"{super()._describe()}, eps={self.eps:g}"


# ----------------------------------------------------------------------------------------------
# Poisons
# ----------------------------------------------------------------------------------------------


def _check_seed(seed) -> int:
    return check_integer("seed", seed, minimum=0)


def _poison_count(n: int, fraction: float | None, count: int | None) -> int:
    """The number of examples to poison: ``count``, or ``round(fraction * n)``."""
    if (fraction is None) == (count is None):
        raise InfluxValueError(
            f"give exactly one of fraction and count; got fraction={fraction!r}, count={count!r}"
        )
    if n == 0:
        raise InfluxValueError("cannot poison empty data")
    if fraction is not None:
        check_number("fraction", fraction, above=0, at_most=1)
        count = round(fraction * n)
        if count == 0:
            raise InfluxValueError(
                f"fraction={fraction} of {n} examples rounds to 0 poisoned examples; "
                "raise the fraction or give count"
            )
        return count
    if not (is_integer(count) and 1 <= count <= n):
        raise InfluxValueError(
            f"count must be an integer in [1, {n}] (the data size); got {count!r}"
        )
    return int(count)


def _choose(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct positions of ``range(n)``, seeded, sorted; a CPU LongTensor."""
    return torch.randperm(n, generator=generator, device="cpu")[:count].sort().values


def _base(dataset):
    return _tensor_triple(dataset) if isinstance(dataset, (tuple, list)) else dataset


def _pick(dataset, n: int, k: int, seed: int):
    """The seeded subset every poison starts from: ``(base, generator, positions, (inputs,
    targets, indices) of the chosen examples)``; the generator goes on to draw any noise."""
    base = _base(dataset)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    positions = _choose(n, k, generator)
    return base, generator, positions, _gather(base, positions)


def _common(poisoned: PoisonedDataset, device, indices: torch.Tensor, seed: int) -> dict:
    """The :class:`Poison` fields every poison fills the same way."""
    return dict(dataset=poisoned, mask=poisoned.mask.to(device), indices=indices, seed=seed)


def gaussian(
    dataset,
    *,
    fraction: float | None = None,
    count: int | None = None,
    noise_std: float,
    seed: int = 0,
) -> GaussianPoison:
    """Add ``xi ~ N(0, noise_std^2 I)`` to the inputs of a seeded random subset; labels unchanged.

    Give exactly one of ``fraction`` (in (0, 1]; ``round(fraction * N)`` examples) and ``count``.
    The subset is the first ``k`` entries of a seeded permutation of the N positions; the noise is
    then drawn from the same CPU generator in float64 and cast to the inputs' device and dtype.
    A chosen example whose input holds NaN or inf is refused, named by its dataset index.
    """
    dataset = _random_access(dataset)
    n = _num_examples(dataset)
    k = _poison_count(n, fraction, count)
    noise_std = check_number("noise_std", noise_std, above=0)
    seed = _check_seed(seed)
    base, generator, positions, (base_inputs, targets, indices) = _pick(dataset, n, k, seed)
    if not base_inputs.is_floating_point():
        raise InfluxValueError(
            f"Gaussian poisons need floating-point inputs; got {base_inputs.dtype}. Convert the "
            "inputs to float (e.g. scale uint8 images to [0, 1]) first."
        )
    check_finite(base_inputs, "inputs", indices=indices)
    noise = noise_std * torch.randn(
        base_inputs.shape, generator=generator, dtype=torch.float64, device="cpu"
    )
    noise = noise.to(device=base_inputs.device, dtype=base_inputs.dtype)
    poisoned = PoisonedDataset(base, positions, inputs=base_inputs + noise)
    return GaussianPoison(
        **_common(poisoned, base_inputs.device, indices, seed),
        base_inputs=base_inputs,
        targets=targets,
        noise=noise,
        noise_std=float(noise_std),
    )


def _num_classes(dataset, num_classes: int | None) -> int:
    if num_classes is None:
        num_classes = getattr(dataset, "num_classes", None)
    if num_classes is None:
        raise InfluxValueError(
            "the number of classes is unknown: pass num_classes (the dataset has no .num_classes)"
        )
    if not is_integer(num_classes):
        raise InfluxValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
    if num_classes < 2:
        raise InfluxValueError(
            f"num_classes must be >= 2 to flip a label to a different class; got {num_classes}"
        )
    return int(num_classes)


def label_flip(
    dataset,
    *,
    fraction: float | None = None,
    count: int | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> LabelFlipPoison:
    """Give a seeded random subset a different label, drawn uniformly from the other classes.

    The subset is chosen as in :func:`gaussian`; then ``new = (y + s) mod C`` with ``s`` uniform
    on ``{1, ..., C - 1}`` from the same generator. ``num_classes`` defaults to the dataset's.
    """
    dataset = _random_access(dataset)
    n = _num_examples(dataset)
    k = _poison_count(n, fraction, count)
    classes = _num_classes(dataset, num_classes)
    seed = _check_seed(seed)
    base, generator, positions, (_, targets, indices) = _pick(dataset, n, k, seed)
    if targets.dim() != 1 or targets.is_floating_point() or targets.is_complex():
        raise InfluxValueError(
            f"label flips need integer class targets of shape [N]; got {targets.dtype} of shape "
            f"[N, {', '.join(map(str, targets.shape[1:]))}]"
        )
    out_of_range = targets[(targets < 0) | (targets >= classes)]
    if out_of_range.numel():
        raise InfluxValueError(
            f"targets must lie in [0, {classes}) (num_classes={classes}); got "
            f"{sorted(set(out_of_range.tolist()))[:5]}"
        )
    shift = torch.randint(1, classes, (k,), generator=generator, device="cpu")
    new_targets = (targets + shift.to(targets.device)) % classes
    poisoned = PoisonedDataset(base, positions, targets=new_targets)
    return LabelFlipPoison(
        **_common(poisoned, targets.device, indices, seed),
        targets=targets,
        new_targets=new_targets,
        num_classes=classes,
    )


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else fallback


def input_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    data,
    targets: torch.Tensor | None = None,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-example input gradients ``grad_x l(theta; x_i, y_i)`` [N, *input_shape], in eval mode.

    One backward of the summed batch loss gives them all: in eval mode (no dropout, BatchNorm on
    its running statistics) loss ``i`` depends on input ``i`` only, so
    ``d(sum_j l_j)/d x_i = d l_i / d x_i`` exactly. No parameter gradient is computed or stored.
    The model's train/eval mode is restored afterwards; the result is on the inputs' device and
    dtype. ``data`` is the inputs with ``targets`` next, or one data argument (a tuple, Dataset
    or DataLoader; ``targets`` left out), streamed ``batch_size`` examples at a time. A
    non-finite loss or gradient raises an error naming the examples (positions in the inputs,
    or the dataset indices a data argument carries).
    """
    batch_size = check_integer("batch_size", batch_size, minimum=1)
    if isinstance(data, torch.Tensor):
        if targets is None or data.shape[0] != targets.shape[0]:
            got = "no targets" if targets is None else f"{targets.shape[0]} targets"
            raise InfluxValueError(
                f"inputs and targets disagree on the number of examples: {data.shape[0]} inputs, "
                f"{got}"
            )
        if not data.is_floating_point():
            raise InfluxValueError(f"input gradients need floating-point inputs; got {data.dtype}")
        grads = torch.empty_like(data)
        for start, (_, _, _, grad) in zip(
            range(0, data.shape[0], batch_size),
            gradient_batches(model, loss_fn, _slices(data, targets, batch_size), by="positions"),
        ):
            grads[start : start + grad.shape[0]] = grad.to(grads.device)
        return grads
    if targets is not None:
        raise InfluxValueError(
            "targets goes with inputs given as a tensor; data given as a tuple, Dataset or "
            "DataLoader carries its own targets: leave targets out"
        )
    parts = [grad for *_, grad in gradient_batches(model, loss_fn, iter_batches(data, batch_size))]
    if not parts:
        raise InfluxValueError("the data is empty: pass at least one example")
    return torch.cat(parts)


def _slices(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int):
    """Batches of a tensor pair, named by position."""
    positions = torch.arange(inputs.shape[0], device="cpu")
    for start in range(0, inputs.shape[0], batch_size):
        stop = start + batch_size
        yield inputs[start:stop], targets[start:stop], positions[start:stop]


def gradient_batches(model: nn.Module, loss_fn: LossFn, batches, *, by: str = "indices"):
    """``(inputs, targets, indices, input gradients)`` of each batch of ``batches`` in turn, the
    gradients on the inputs' device (see :func:`input_gradients`). The model is in eval mode
    until the batches are exhausted (or the iterator is closed); errors name the examples by
    their ``indices``, called ``by`` in the message ("indices" or "positions")."""
    was_training = model.training
    model.eval()
    try:
        for inputs, targets, indices in batches:
            if not inputs.is_floating_point():
                raise InfluxValueError(
                    f"input gradients need floating-point inputs; got {inputs.dtype}"
                )
            device = _model_device(model, inputs.device)
            with torch.enable_grad():
                x = inputs.detach().to(device).requires_grad_(True)
                losses = call_loss(loss_fn, model(x), targets.to(device), indices=indices)
                if losses.shape != (x.shape[0],):
                    raise InfluxValueError(
                        f"loss_fn must return per-example losses of shape [{x.shape[0]}]; got "
                        f"shape {tuple(losses.shape)} (pass reduction='none')"
                    )
                _check_finite(losses, indices, "loss", by)
                (grad,) = torch.autograd.grad(losses.sum(), x)
            _check_finite(grad.flatten(1), indices, "input gradient", by)
            yield inputs, targets, indices, grad.to(inputs.device)
    finally:
        model.train(was_training)


def _check_finite(values: torch.Tensor, indices: torch.Tensor, what: str, by: str) -> None:
    if torch.isfinite(values).all():
        return
    bad = ~torch.isfinite(values)
    if bad.dim() > 1:
        bad = bad.any(dim=1)
    if bad.any():
        named = indices[torch.nonzero(bad).flatten().cpu()].tolist()
        raise InfluxRuntimeError(
            f"non-finite {what} at example {by} {named[:10]}"
            + (f" and {len(named) - 10} more" if len(named) > 10 else "")
            + ": check those inputs and the model's numerics"
        )


def adversarial(
    model: nn.Module,
    loss_fn: LossFn,
    dataset,
    *,
    fraction: float | None = None,
    count: int | None = None,
    eps: float,
    clip: tuple[float, float] | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> AdversarialPoison:
    """Clean-label FGSM poisons: ``x + eps * sign(grad_x l(theta; x, y))``, labels unchanged.

    The subset is chosen as in :func:`gaussian`; the gradients come from
    :func:`input_gradients` (eval mode, one backward of the summed loss per batch of
    ``batch_size``). ``clip=(low, high)`` clamps the poisoned inputs to the valid data range;
    ``perturbation`` is then the clamped difference.
    """
    dataset = _random_access(dataset)
    n = _num_examples(dataset)
    k = _poison_count(n, fraction, count)
    check_number("eps", eps, above=0)
    if clip is not None and not (len(clip) == 2 and clip[0] < clip[1]):
        raise InfluxValueError(f"clip must be (low, high) with low < high; got {clip!r}")
    seed = _check_seed(seed)
    base, _, positions, (base_inputs, targets, indices) = _pick(dataset, n, k, seed)
    # here, not in input_gradients: it knows positions in the subset, not dataset indices
    check_finite(base_inputs, "inputs", indices=indices)
    grads = input_gradients(model, loss_fn, base_inputs, targets, batch_size=batch_size)
    perturbation = eps * grads.sign()
    poisoned_inputs = base_inputs + perturbation
    if clip is not None:
        poisoned_inputs = poisoned_inputs.clamp(clip[0], clip[1])
        perturbation = poisoned_inputs - base_inputs
    poisoned = PoisonedDataset(base, positions, inputs=poisoned_inputs)
    return AdversarialPoison(
        **_common(poisoned, base_inputs.device, indices, seed),
        base_inputs=base_inputs,
        targets=targets,
        perturbation=perturbation,
        eps=float(eps),
    )


# ----------------------------------------------------------------------------------------------
# Batch schedules
# ----------------------------------------------------------------------------------------------

_KINDS = ("interlaced", "concentrated")


class BatchSchedule(Sampler):
    """Batches of positions that place the poisoned examples (``mask``) in a chosen pattern.

    Every epoch is a fresh seeded permutation of the N positions cut into batches of
    ``batch_size`` (the last one holds ``N mod batch_size`` when that is not 0), exactly as a
    shuffled epoch would be; only where the k poisoned positions fall differs:

    - ``interlaced``: batch b of size s_b gets ``floor(k s_b / N)`` or ``ceil(k s_b / N)`` poisons
      (largest remainders first, ties at random), so every batch has the data's poison fraction
      up to rounding; every batch is partially poisoned when ``k s_b >= N`` and
      ``(N - k) s_b >= N`` for all b.
    - ``concentrated``: batches are filled with poisons in order of size (ties at random), so the
      poisons occupy the fewest batches possible: ``ceil(k / batch_size)`` when they fit in the
      full-size batches, all of them fully poisoned but at most one.

    Within a batch, poisoned and clean examples are in random order. Three ways to use it:

    - ``influx.train.train(model, data, sampling=schedule, batch_size=schedule.batch_size)``: the
      schedule is the trainer's sampler ``(epoch, epoch_seed) -> positions [N]``;
    - ``DataLoader(dataset, batch_sampler=schedule)``: iterating yields the batches (lists of
      positions) of the epoch set by :meth:`set_epoch`, as with ``DistributedSampler``;
    - :meth:`epoch_order` / :meth:`order`: one epoch as positions [N] whose consecutive
      ``batch_size`` chunks are its batches, from the schedule's seed or a given epoch seed.
    """

    def __init__(self, mask: torch.Tensor, batch_size: int, *, seed: int = 0, kind: str):
        mask = _tensor(mask)
        if mask.dim() != 1 or mask.dtype != torch.bool:
            raise InfluxValueError(
                f"mask must be a bool tensor of shape [N]; got {mask.dtype} of shape "
                f"{tuple(mask.shape)}"
            )
        if mask.shape[0] == 0:
            raise InfluxValueError("mask is empty: there is no data to schedule")
        if not is_integer(batch_size):
            raise InfluxValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        if batch_size < 1:
            raise InfluxValueError(f"batch_size must be >= 1; got {batch_size}")
        check_choice("kind", kind, _KINDS)
        self.mask = mask.detach().cpu()
        self.batch_size = int(batch_size)
        self.seed = _check_seed(seed)
        self.kind = kind
        self.epoch = 0
        n = self.num_examples
        full, rest = divmod(n, self.batch_size)
        # [batches]: the size of each batch of an epoch, in order.
        self.batch_sizes = torch.tensor(
            [self.batch_size] * full + ([rest] if rest else []), dtype=torch.long, device="cpu"
        )
        self._poisoned = torch.nonzero(self.mask).flatten()
        self._clean = torch.nonzero(~self.mask).flatten()

    @property
    def num_examples(self) -> int:
        return int(self.mask.shape[0])

    @property
    def num_poisoned(self) -> int:
        return int(self._poisoned.shape[0])

    def __len__(self) -> int:
        return int(self.batch_sizes.shape[0])

    def set_epoch(self, epoch: int) -> None:
        """Make iteration yield the batches of ``epoch``."""
        self.epoch = int(epoch)

    def epoch_seed(self, epoch: int) -> int:
        """The seed of epoch ``epoch``: an independent stream per (seed, epoch)."""
        if epoch < 0:
            raise InfluxValueError(f"epoch must be >= 0; got {epoch}")
        state = np.random.SeedSequence([self.seed, int(epoch)]).generate_state(1, np.uint64)
        return int(state[0] >> np.uint64(1))

    def _counts(self, generator: torch.Generator) -> torch.Tensor:
        """Poisons per batch [batches] for one epoch."""
        sizes, k, n = self.batch_sizes, self.num_poisoned, self.num_examples
        counts = torch.zeros_like(sizes)
        if self.kind == "interlaced":
            # Largest-remainder apportionment of k over the batches in proportion to their sizes.
            counts = (k * sizes) // n
            remainders = (k * sizes) % n
            shuffled = torch.randperm(len(self), generator=generator, device="cpu")
            ranked = shuffled[torch.sort(-remainders[shuffled], stable=True).indices]
            counts[ranked[: k - int(counts.sum())]] += 1
            return counts
        # Concentrated: fill the largest batches first (ties in random order).
        shuffled = torch.randperm(len(self), generator=generator, device="cpu")
        ranked = shuffled[torch.sort(-sizes[shuffled], stable=True).indices]
        remaining = k
        for b in ranked.tolist():
            counts[b] = min(int(sizes[b]), remaining)
            remaining -= int(counts[b])
            if remaining == 0:
                break
        return counts

    def poison_counts(self, epoch: int) -> torch.Tensor:
        """Number of poisoned examples in each batch of ``epoch`` [batches]."""
        return self._counts(torch.Generator(device="cpu").manual_seed(self.epoch_seed(epoch)))

    def order(self, epoch_seed: int) -> torch.Tensor:
        """Positions [N] of the epoch drawn from ``epoch_seed``, batches in consecutive chunks."""
        generator = torch.Generator(device="cpu").manual_seed(int(epoch_seed))
        counts = self._counts(generator)
        poisoned = self._poisoned[
            torch.randperm(self.num_poisoned, generator=generator, device="cpu")
        ]
        clean = self._clean[torch.randperm(self._clean.shape[0], generator=generator, device="cpu")]
        # One flag per slot of the epoch: within each batch, its poisoned slots at random.
        slots = [
            (torch.randperm(int(size), generator=generator, device="cpu") < count)
            for size, count in zip(self.batch_sizes.tolist(), counts.tolist(), strict=True)
        ]
        is_poisoned = torch.cat(slots)
        order = torch.empty(self.num_examples, dtype=torch.long, device="cpu")
        order[is_poisoned] = poisoned
        order[~is_poisoned] = clean
        return order

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Positions [N] of epoch ``epoch`` (seeded by :meth:`epoch_seed`)."""
        return self.order(self.epoch_seed(epoch))

    def __call__(self, epoch: int, epoch_seed: int) -> torch.Tensor:
        """The trainer's sampling hook: ``influx.train.train(..., sampling=schedule)`` asks for
        each epoch's order with its own epoch seed (recorded in ``TrainResult.epoch_seeds``, so
        ``schedule.order(seed)`` replays the epoch). The trainer cuts the order into chunks of its
        own ``batch_size``: make it ``schedule.batch_size``, or ``M * schedule.batch_size`` with
        ``micro_batches=M`` so that each micro-batch is one scheduled batch."""
        return self.order(epoch_seed)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.epoch_order(self.epoch).split(self.batch_size):
            yield batch.tolist()

    def __repr__(self) -> str:
        return (
            f"BatchSchedule(kind={self.kind!r}, n={self.num_examples}, "
            f"poisoned={self.num_poisoned}, batch_size={self.batch_size}, seed={self.seed})"
        )


def interlaced(mask: torch.Tensor, batch_size: int, seed: int = 0) -> BatchSchedule:
    """Spread the poisoned examples evenly over every batch (see :class:`BatchSchedule`)."""
    return BatchSchedule(mask, batch_size, seed=seed, kind="interlaced")


def concentrated(mask: torch.Tensor, batch_size: int, seed: int = 0) -> BatchSchedule:
    """Pack the poisoned examples into as few (fully poisoned) batches as possible."""
    return BatchSchedule(mask, batch_size, seed=seed, kind="concentrated")
