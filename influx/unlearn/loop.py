"""Machinery shared by the methods: input checks, the working copy, seeded batch streams, and the
budgeted step loop that records the trajectory.

The forget and retain sets are data arguments (tuples, Datasets or DataLoaders) and are streamed:
a batch stream gathers each mini-batch by position (:func:`influx.data.iter_ordered_batches`),
so a Dataset is never concatenated and each shuffled pass reads each example once. A set given
as a Dataset whose items carry dataset indices is read once up front for them, so that a forget
set that overlaps the retain set is refused before any step.

Every first-order method is a *plan*: an iterator of steps, each with its cost in per-example
gradient evaluations and a closure returning the objective to minimize. :meth:`Session.run` takes
a step only if the budget affords it, so no method can overspend.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from influx.checks import check_choice, check_integer, check_number, is_integer
from influx.data import Batch, LossFn, as_tensors, iter_batches, iter_ordered_batches, num_examples
from influx.errors import InfluxRuntimeError, InfluxValueError
from influx.grads.common import SHOWN_INDICES, call_loss, refuse_batchnorm
from influx.seeds import derive_seed
from influx.unlearn.budget import Meter, resolve_budget
from influx.unlearn.result import TrajectoryPoint, UnlearnResult

Callback = Callable[[nn.Module, int], dict]
_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class StepOptions:
    """Options shared by the gradient-step methods (all keyword arguments of the methods).

    - ``lr``, ``optimizer`` (``"sgd"`` or ``"adam"``), ``momentum`` (SGD only), ``weight_decay``.
    - ``batch_size``: examples per mini-batch of each set (a set smaller than it is used whole).
    - ``max_steps``: stop after this many steps even if budget is left (default: spend the budget).
    - ``seed``: drives the batch order, noise and any randomness in the model (dropout).
    - ``record_every``: record the trajectory at step 0, every ``k`` steps and at the last step;
      ``keep_states``: keep a CPU copy of the state at each record; ``on_checkpoint(model, step)``:
      a callback whose returned dict is stored with the record (the model is in eval mode then;
      its evaluations are not charged to the budget).
    - ``progress``: a tqdm bar; ``inplace``: unlearn the caller's model instead of a copy.
    """

    lr: float = 1e-2
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 64
    max_steps: int | None = None
    seed: int = 0
    record_every: int | None = None
    keep_states: bool = True
    on_checkpoint: Callback | None = None
    progress: bool = True
    inplace: bool = False

    def __post_init__(self):
        check_number("lr", self.lr, above=0)
        check_choice("optimizer", self.optimizer, _OPTIMIZERS)
        check_number("momentum", self.momentum, at_least=0)
        check_number("weight_decay", self.weight_decay, at_least=0)
        check_integer("batch_size", self.batch_size, minimum=1)
        if self.max_steps is not None and not (is_integer(self.max_steps) and self.max_steps >= 0):
            raise InfluxValueError(
                f"max_steps must be an integer >= 0 or None; got {self.max_steps!r}"
            )
        if self.record_every is not None:
            check_integer("record_every", self.record_every, minimum=1)
        if self.on_checkpoint is not None and not callable(self.on_checkpoint):
            raise InfluxValueError("on_checkpoint must be a callable (model, step) -> dict")

    @classmethod
    def of(cls, options: dict[str, Any]) -> StepOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InfluxValueError(
                f"unknown option(s) {unknown}; the shared options are {sorted(known)}"
            )
        return cls(**options)

    def describe(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it would deep-copy the callback and whatever it holds.
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        callback = self.on_checkpoint
        out["on_checkpoint"] = (
            None if callback is None else getattr(callback, "__name__", type(callback).__name__)
        )
        return out


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise InfluxValueError("the model has no parameters: nothing to unlearn")
    return parameter.device


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}


def carried_indices(data, n: int) -> torch.Tensor | None:
    """The dataset indices [n] the examples of ``data`` carry (a third item), or None when they
    carry none (their positions would be no identity to compare two sets by). A Dataset or
    DataLoader is read once for them, each example once."""
    if isinstance(data, (tuple, list)):
        return as_tensors(data)[2] if len(data) == 3 else None
    # a DataLoader draws its base seed from the global generator: leave the caller's alone
    with torch.random.fork_rng(devices=[]):
        if isinstance(data, DataLoader):
            batches = iter(data)
            first = next(batches)
            if not (isinstance(first, (tuple, list)) and len(first) == 3):
                return None
            rest = [torch.as_tensor(batch[2], device="cpu") for batch in batches]
            return torch.cat([torch.as_tensor(first[2], device="cpu"), *rest]).long()
        first = data[0]
        if not (isinstance(first, (tuple, list)) and len(first) == 3):
            return None
        rest = torch.arange(1, n, device="cpu")
        parts = [batch[2] for batch in iter_ordered_batches(data, rest, 1024)]
        return torch.cat([torch.tensor([int(first[2])], device="cpu"), *parts])


class UnlearnSet:
    """One set of an unlearning method (forget or retain): its size, the dataset indices its
    examples carry (None for positions), and batches gathered by position.

    A tuple is held as its tensors (views, no copy); a Dataset or DataLoader is read batch by
    batch when a batch is asked for, never concatenated (:meth:`whole` does that, for a method
    that needs the set in memory).
    """

    def __init__(self, data, what: str):
        self.what = what
        self.n = num_examples(data)
        if self.n == 0:
            raise InfluxValueError(
                f"the {what} set is empty: unlearning needs at least one {what} example"
            )
        if isinstance(data, DataLoader) and self.n != len(data.dataset):
            # batches are gathered by position in the loader's dataset
            raise InfluxValueError(
                f"the {what} DataLoader visits {self.n} of its dataset's {len(data.dataset)} "
                "examples, which cannot be drawn by position: pass Subset(dataset, positions) "
                "(or a DataLoader over it)"
            )
        self.source = data
        self.tensors = as_tensors(data) if isinstance(data, (tuple, list)) else None
        # a tuple as its (inputs, targets, indices); a Dataset or DataLoader as given
        self.data = self.tensors if self.tensors is not None else data
        self.indices = carried_indices(data, self.n)
        self._whole: Batch | None = None

    def gather(self, positions: torch.Tensor) -> Batch:
        """The examples at ``positions`` [B] (CPU LongTensor), in that order."""
        if self.tensors is not None:
            inputs, targets, indices = self.tensors
            on_device = positions.to(inputs.device)
            return inputs[on_device], targets[on_device], indices[positions]
        # a DataLoader draws its base seed from the global generator: kept out of the seeded
        # stream of the method (dropout), so that a Dataset trains as its tensors would
        with torch.random.fork_rng(devices=[]):
            return next(iter_ordered_batches(self.data, positions, positions.shape[0]))

    def batches(self, batch_size: int, positions: torch.Tensor | None = None):
        """Batches of at most ``batch_size`` examples, in order (of ``positions`` when given)."""
        if positions is None:
            return iter_batches(self.data, batch_size)
        return iter_ordered_batches(self.data, positions, batch_size)

    def whole(self) -> Batch:
        """The set in memory, concatenated once (for methods that need all of it at once)."""
        if self._whole is None:
            self._whole = self.tensors if self.tensors is not None else as_tensors(self.data)
        return self._whole


def refuse_overlap(forget: UnlearnSet, retain: UnlearnSet) -> None:
    """A forget example in the retain set would be trained on while it is being forgotten (and
    fine-tuning on a retain set equal to the forget set "unlearns" by learning it again)."""
    if forget.source is retain.source:
        raise InfluxValueError(
            "forget and retain are the same set: the retain set holds the examples to keep, "
            "without those to forget (e.g. poison.retain beside poison.forget)"
        )
    if forget.indices is None or retain.indices is None:
        return
    shared = forget.indices[torch.isin(forget.indices, retain.indices.to(forget.indices.device))]
    if shared.numel():
        raise InfluxValueError(
            f"the forget and retain sets share {shared.numel()} of the forget set's "
            f"{forget.n} dataset indices (e.g. {shared[:SHOWN_INDICES].tolist()}): the retain "
            "set must hold the examples to keep without those to forget; remove them from it"
        )


class BatchStream:
    """Endless fixed-size batches of one set: seeded shuffled passes, a batch may straddle two
    passes, so every batch has exactly ``size = min(batch_size, n)`` examples (and cost). Each
    batch is gathered by position: a Dataset is read batch by batch, each pass once."""

    def __init__(self, data: UnlearnSet, batch_size: int, seed: int):
        self.data = data
        self.n = data.n
        self.size = min(batch_size, self.n)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long, device="cpu")

    def next(self) -> PendingBatch:
        while self.order.shape[0] < self.size:
            fresh = torch.randperm(self.n, generator=self.generator, device="cpu")
            self.order = torch.cat([self.order, fresh])
        positions, self.order = self.order[: self.size], self.order[self.size :]
        return PendingBatch(self.data, positions)


class PendingBatch:
    """A batch whose examples are drawn but read only when it is first used, as
    ``(inputs, targets, indices)``: a step that the budget or ``max_steps`` stops reads nothing."""

    def __init__(self, data: UnlearnSet, positions: torch.Tensor):
        self.data, self.positions = data, positions
        self._batch: Batch | None = None

    def read(self) -> Batch:
        if self._batch is None:
            self._batch = self.data.gather(self.positions)
        return self._batch

    def __iter__(self):
        return iter(self.read())

    def __getitem__(self, item):
        return self.read()[item]

    def __len__(self) -> int:
        return 3


@dataclass(frozen=True)
class Step:
    """One step of a plan: its cost in evaluations and the objective (a scalar to minimize)."""

    cost: int
    objective: Callable[[], torch.Tensor]


class Session:
    """One method's run: the working model, its data, the budget meter and the options."""

    def __init__(
        self,
        method: str,
        model: nn.Module,
        loss_fn: LossFn,
        forget,
        retain,
        *,
        budget: float | None,
        train_compute: float | None,
        options: dict[str, Any],
        limited: bool = True,
    ):
        self.start = time.perf_counter()
        self.method = method
        self.options = StepOptions.of(options)
        if not callable(loss_fn):
            raise InfluxValueError("loss_fn must be a callable (outputs, targets) -> losses [N]")
        self.loss_fn = loss_fn
        self.device = model_device(model)
        budget_value = resolve_budget(budget, train_compute) if limited else math.inf
        refuse_batchnorm(model, trains="unlearning")
        self.forget_set = UnlearnSet(forget, "forget")
        self.retain_set = UnlearnSet(retain, "retain")
        refuse_overlap(self.forget_set, self.retain_set)
        self.meter = Meter(budget_value)
        self.was_training = model.training
        self.model = model if self.options.inplace else copy.deepcopy(model)
        self.trajectory: list[TrajectoryPoint] = []
        self.steps = 0

    @property
    def forget(self) -> Batch:
        """The forget set in memory (inputs, targets, indices), for a method that needs it whole."""
        return self.forget_set.whole()

    @property
    def retain(self) -> Batch:
        """The retain set in memory (inputs, targets, indices), for a method that needs it whole."""
        return self.retain_set.whole()

    def set_of(self, which: str) -> UnlearnSet:
        return self.forget_set if which == "forget" else self.retain_set

    def stream(self, which: str, offset: int = 0) -> BatchStream:
        return BatchStream(
            self.set_of(which), self.options.batch_size, derive_seed(self.options.seed, offset)
        )

    def batch_size_of(self, which: str) -> int:
        """Examples per batch of the ``"forget"`` or ``"retain"`` set (= cost of a pass over it)."""
        return min(self.options.batch_size, self.set_of(which).n)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``loss_fn`` on a batch's outputs, checked: per-example, finite, class targets in range
        (an error names the examples by dataset index)."""
        _, targets, indices = batch
        losses = call_loss(self.loss_fn, outputs, targets.to(self.device), indices=indices)
        return self.checked(losses, indices)

    def losses(self, batch: Batch, model: nn.Module | None = None) -> torch.Tensor:
        """Per-example losses [B] of a batch; non-finite ones are an error naming the examples."""
        outputs = (self.model if model is None else model)(batch[0].to(self.device))
        return self.loss(outputs, batch)

    def checked(self, losses: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if losses.dim() != 1 or losses.shape[0] != indices.shape[0]:
            raise InfluxValueError(
                f"loss_fn must return per-example losses of shape [{indices.shape[0]}]; got shape "
                f"{tuple(losses.shape)} (pass reduction='none', e.g. "
                "influx.train.cross_entropy_per_example)"
            )
        finite = torch.isfinite(losses.detach())
        if not bool(finite.all()):
            bad = indices[~finite.cpu()].tolist()
            raise InfluxRuntimeError(
                f"{self.method}: non-finite loss at step {self.steps} for examples {bad[:20]}"
                f"{' ...' if len(bad) > 20 else ''}; lower lr or check those inputs"
            )
        return losses

    def record(self) -> None:
        options = self.options
        state = state_copy(self.model) if options.keep_states else None
        metrics: dict[str, Any] = {}
        if options.on_checkpoint is not None:
            mode = self.model.training
            self.model.eval()
            try:
                metrics = dict(options.on_checkpoint(self.model, self.steps) or {})
            finally:
                self.model.train(mode)
        self.trajectory.append(TrajectoryPoint(self.steps, self.meter.spent, state, metrics))

    def make_optimizer(self, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
        o = self.options
        if o.optimizer == "adam":
            return torch.optim.Adam(parameters, lr=o.lr, weight_decay=o.weight_decay)
        return torch.optim.SGD(
            parameters, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
        )

    def run(
        self,
        plan: Iterable[Step],
        *,
        parameters: list[nn.Parameter] | None = None,
        after_backward: Callable[[], None] | None = None,
        typical_cost: int = 1,
        extra: dict[str, Any] | None = None,
    ) -> UnlearnResult:
        """Take the plan's steps while the budget affords the next one (and ``max_steps`` allows)."""
        o = self.options
        if math.isinf(self.meter.budget) and o.max_steps is None:
            raise InfluxValueError(
                f"{self.method} steps until its budget is spent: with budget=math.inf give "
                "max_steps= too"
            )
        if parameters is None:
            parameters = [p for p in self.model.parameters() if p.requires_grad]
        if not parameters:
            raise InfluxValueError(f"{self.method}: no trainable parameters to update")
        optimizer = self.make_optimizer(parameters)
        remaining = self.meter.remaining
        expected = math.inf if math.isinf(remaining) else remaining // max(typical_cost, 1)
        if o.max_steps is not None:
            expected = min(expected, o.max_steps)
        cuda = [self.device] if self.device.type == "cuda" else []
        self.model.train()
        bar = tqdm(
            total=None if math.isinf(expected) else int(expected),
            desc=self.method, unit="step", disable=not o.progress, leave=False,
        )  # fmt: skip
        try:
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(o.seed)
                if o.record_every is not None:
                    self.record()
                for step in self._affordable(plan):
                    optimizer.zero_grad(set_to_none=True)
                    objective = step.objective()
                    objective.backward()
                    if after_backward is not None:
                        after_backward()
                    optimizer.step()
                    self.meter.charge(step.cost)
                    self.steps += 1
                    bar.update(1)
                    if o.record_every is not None and self.steps % o.record_every == 0:
                        self.record()
                if o.record_every is not None and self.trajectory[-1].step != self.steps:
                    self.record()
        finally:
            bar.close()
            self.model.zero_grad(set_to_none=True)
            self.model.train(self.was_training)
        return self.result(extra)

    def finish_one_step(self, extra: dict[str, Any] | None = None) -> UnlearnResult:
        """Close a one-shot method (Newton, SSD) after its single update: count the step, record
        the model when ``record_every`` is set, restore the caller's train/eval mode."""
        self.steps = 1
        if self.options.record_every is not None:
            self.record()
        self.model.train(self.was_training)
        return self.result(extra)

    def _affordable(self, plan: Iterable[Step]) -> Iterator[Step]:
        steps = iter(plan)
        while self.options.max_steps is None or self.steps < self.options.max_steps:
            step = next(steps, None)
            if step is None or not self.meter.affords(step.cost):
                return
            yield step

    def result(self, extra: dict[str, Any] | None = None) -> UnlearnResult:
        return UnlearnResult(
            model=self.model,
            method=self.method,
            spent=self.meter.spent,
            budget=self.meter.budget,
            steps=self.steps,
            options={**self.options.describe(), **(extra or {})},
            trajectory=self.trajectory,
            seconds=time.perf_counter() - self.start,
        )
