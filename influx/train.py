"""A small deterministic trainer that records what later analyses need to replay training.

:func:`train` records, per epoch, the seed and the order in which examples were visited, and at the
requested steps a copy of the parameters with the learning rate then in effect (TracIn sums
``eta_t grad l(w_t, z) . grad l(w_t, z')`` over such checkpoints). The same model, data and seed
give the same parameters, bit for bit, on the same machine.

Three hooks change how a step's gradient is formed, for DP-SGD and robust aggregation:

- ``sampling``: ``"shuffle"`` (a seeded permutation per epoch, cut into batches),
  ``"poisson"`` (each step takes every example independently with probability
  ``batch_size / N``), or a callable ``(epoch, epoch_seed) -> positions [N]`` giving the
  epoch's order (e.g. a poison-interlacing schedule), cut into batches of ``batch_size``.
- ``gradient``: a :data:`GradientFn` ``(model, loss_fn, inputs, targets) -> (losses [n],
  {name: gradient})`` that replaces the plain gradient of the mean loss (``influx.dp`` provides
  the clipped, noised DP-SGD gradient).
- ``micro_batches`` / ``aggregator``: each batch is split into M contiguous micro-batches, each
  gets its own gradient, and an ``influx.aggregate`` rule (mean, median, Krum, ...) combines the
  M gradients before the optimizer steps.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from influx.aggregate import Aggregator
from influx.aggregate import mean as _mean_aggregator
from influx.checks import check_choice, check_integer, check_number
from influx.data import LossFn, iter_batches, iter_ordered_batches, num_examples
from influx.errors import InfluxValueError
from influx.seeds import derive_seed

# (model, loss_fn, inputs, targets) -> (per-example losses [n] detached, {name: gradient})
GradientFn = Callable[
    [nn.Module, LossFn, torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, Mapping[str, torch.Tensor]],
]
Sampler = Callable[[int, int], torch.Tensor]

__all__ = [
    "Checkpoint",
    "GradientFn",
    "TrainResult",
    "cross_entropy_per_example",
    "evaluate",
    "mean_gradient",
    "total_steps",
    "train",
]


def cross_entropy_per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The standard ``loss_fn``: logits [N, C] and class targets [N] -> per-example losses [N]."""
    return F.cross_entropy(outputs, targets, reduction="none")


def mse_per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Half squared error summed over output dimensions: [N, ...] and [N, ...] -> [N]."""
    targets = targets.to(outputs.dtype).reshape(outputs.shape)
    return 0.5 * (outputs - targets).pow(2).flatten(1).sum(1)


_LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy_per_example, "mse": mse_per_example}
_OPTIMIZERS = ("adam", "sgd")
_SCHEDULES = ("constant", "cosine")
_SAMPLINGS = ("shuffle", "poisson")


@dataclass(frozen=True)
class Checkpoint:
    """Parameters after ``step`` optimizer steps (``step`` 0 = the initial model).

    ``lr`` is the learning rate in effect at that moment, i.e. the one the next step uses.
    ``state_dict`` is a detached copy on the CPU.
    """

    step: int
    epoch: int
    lr: float
    state_dict: dict[str, torch.Tensor] = field(repr=False)


@dataclass
class TrainResult:
    """What :func:`train` did.

    - ``epoch_seeds[e]``: the seed of the permutation of epoch ``e``;
      ``epoch_orders[e]`` [N]: the dataset indices in the order they were visited (a final partial
      epoch, when training by ``steps``, lists only the visited ones).
    - ``losses`` [steps]: the mean mini-batch loss at each step (NaN for an empty Poisson batch);
      ``lrs`` [steps]: its learning rate; ``batch_sizes`` [steps]: the number of examples of each
      step (batch boundaries within ``epoch_orders``, which under Poisson sampling may repeat or
      skip examples).
    - ``checkpoints``: one :class:`Checkpoint` per requested step, in step order.
    - ``final_loss`` / ``final_accuracy``: over the whole training set, eval mode, after training
      (accuracy is NaN for losses other than cross-entropy).
    - ``privacy``: set by ``influx.dp.train``: the noise multiplier, clipping norm, sample rate,
      steps, delta and the spent epsilon of the accountant; None for non-private training.
    """

    steps: int
    epochs: float
    epoch_seeds: list[int]
    epoch_orders: list[torch.Tensor]
    losses: torch.Tensor
    lrs: torch.Tensor
    checkpoints: list[Checkpoint]
    final_loss: float
    final_accuracy: float
    seconds: float
    config: dict[str, Any]
    batch_sizes: torch.Tensor = field(
        default_factory=lambda: torch.zeros(0, dtype=torch.long, device="cpu")
    )
    privacy: dict[str, Any] | None = None

    def __repr__(self) -> str:
        private = "" if self.privacy is None else f"epsilon={self.privacy['epsilon']:.3g}, "
        return (
            f"TrainResult(steps={self.steps}, epochs={self.epochs:g}, "
            f"final_loss={self.final_loss:.4g}, final_accuracy={self.final_accuracy:.4g}, "
            f"{private}checkpoints={[c.step for c in self.checkpoints]}, "
            f"seconds={self.seconds:.2f})"
        )


def _resolve_loss(loss_fn: str | LossFn) -> LossFn:
    if callable(loss_fn):
        return loss_fn
    if loss_fn not in _LOSSES:
        raise InfluxValueError(
            f"loss_fn must be one of {sorted(_LOSSES)} or a callable "
            f"(outputs, targets) -> losses [N]; got {loss_fn!r}"
        )
    return _LOSSES[loss_fn]


def _renamed_loss(loss_fn: str | LossFn, loss: str | LossFn | None, function: str):
    """``loss_fn``, or the deprecated ``loss=`` of ``function`` when that was given instead."""
    if loss is None:
        return loss_fn
    if loss_fn != "cross_entropy":
        raise InfluxValueError(f"{function}() got both loss_fn= and loss=: pass loss_fn= only")
    warnings.warn(
        f"{function}(loss=...) is deprecated: pass loss_fn=... (the name every influx function "
        "uses)",
        DeprecationWarning,
        stacklevel=3,
    )
    return loss


def total_steps(n: int, batch_size: int, epochs: int | None, steps: int | None) -> int:
    """The number of optimizer steps :func:`train` takes: ``epochs * ceil(n / batch_size)`` or
    ``steps`` (exactly one given)."""
    if (epochs is None) == (steps is None):
        raise InfluxValueError(
            f"give exactly one of epochs and steps; got epochs={epochs!r}, steps={steps!r}"
        )
    if epochs is not None:
        return check_integer("epochs", epochs, minimum=0) * math.ceil(n / batch_size)
    return check_integer("steps", steps, minimum=0)


def _checkpoint_steps(
    checkpoints: Iterable[int] | str, total: int, steps_per_epoch: int
) -> list[int]:
    if checkpoints == "epochs":
        # The initial model and the end of every (possibly partial) epoch.
        return sorted({0, *range(steps_per_epoch, total + 1, steps_per_epoch), total})
    if isinstance(checkpoints, str):
        raise InfluxValueError(
            f"checkpoints must be step numbers or 'epochs'; got the string {checkpoints!r}"
        )
    if not isinstance(checkpoints, Iterable):
        raise InfluxValueError(
            f"checkpoints must be step numbers or 'epochs'; got {checkpoints!r} (for one step k, "
            "pass [k])"
        )
    wanted = sorted({check_integer("checkpoint step", step) for step in checkpoints})
    out_of_range = [step for step in wanted if not 0 <= step <= total]
    if out_of_range:
        raise InfluxValueError(
            f"checkpoint steps must lie in [0, {total}] (the number of training steps); "
            f"got {out_of_range}"
        )
    return wanted


def _make_optimizer(
    name: str, parameters: list[nn.Parameter], lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    check_choice("optimizer", name, _OPTIMIZERS)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _lr_at(step: int, total: int, lr: float, schedule: str) -> float:
    if schedule == "constant" or total == 0:
        return lr
    # Cosine decay from lr at step 0 to 0 after the last step.
    return 0.5 * lr * (1.0 + math.cos(math.pi * step / total))


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data,
    *,
    loss_fn: str | LossFn = "cross_entropy",
    batch_size: int = 512,
    device: str | torch.device | None = None,
    loss: str | LossFn | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``data`` in eval mode.

    ``loss_fn`` is ``"cross_entropy"``, ``"mse"`` or a callable giving per-example losses
    (``loss=`` is its deprecated name). Accuracy compares ``argmax`` of the outputs [N, C] with
    the targets [N]; it is NaN for a loss other than cross-entropy. The model's train/eval mode is
    restored afterwards.
    """
    loss_fn = _resolve_loss(_renamed_loss(loss_fn, loss, "evaluate"))
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for inputs, targets, _ in iter_batches(data, batch_size):
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = model(inputs)
            total_loss += loss_fn(outputs, targets).sum().item()
            if loss_fn is cross_entropy_per_example:
                correct += (outputs.argmax(dim=1) == targets).sum().item()
            count += targets.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise InfluxValueError("cannot evaluate on empty data")
    accuracy = correct / count if loss_fn is cross_entropy_per_example else float("nan")
    return total_loss / count, accuracy


def _epoch_seed(seed: int, epoch: int) -> int:
    # One independent stream per (seed, epoch), so a single epoch's order can be replayed on its
    # own and runs with neighbouring seeds share no epoch's order.
    return derive_seed(seed, epoch)


def mean_gradient(
    model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The plain :data:`GradientFn`: per-example losses [n] and the gradient of their mean.

    An empty batch gives zero gradients (and no losses).
    """
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if inputs.shape[0] == 0:
        return inputs.new_zeros(0), {name: torch.zeros_like(p) for name, p in trainable.items()}
    losses = loss_fn(model(inputs), targets)
    grads = torch.autograd.grad(losses.mean(), list(trainable.values()), allow_unused=True)
    return losses.detach(), {
        name: torch.zeros_like(p) if g is None else g
        for (name, p), g in zip(trainable.items(), grads)
    }


def _check_hooks(
    n: int,
    batch_size: int,
    sampling: str | Sampler,
    gradient: GradientFn | None,
    aggregator: Callable | None,
    micro_batches: int,
) -> None:
    if not callable(sampling) and sampling not in _SAMPLINGS:
        raise InfluxValueError(
            f"sampling must be one of {_SAMPLINGS} or a callable (epoch, epoch_seed) -> "
            f"positions [N]; got {sampling!r}"
        )
    if gradient is not None and not callable(gradient):
        raise InfluxValueError(
            "gradient must be a callable (model, loss_fn, inputs, targets) -> (losses, grads); "
            f"got {type(gradient).__name__}"
        )
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise InfluxValueError(f"micro_batches must be a positive integer; got {micro_batches!r}")
    if aggregator is not None and not callable(aggregator):
        raise InfluxValueError(f"aggregator must be callable; got {type(aggregator).__name__}")
    if micro_batches == 1:
        return
    if sampling == "poisson":
        raise InfluxValueError(
            "micro_batches needs batches of a fixed size: use sampling='shuffle' or a sampler"
        )
    needed = getattr(aggregator, "min_inputs", 1)
    if micro_batches < needed:
        raise InfluxValueError(
            f"aggregator {aggregator!r} needs at least {needed} gradients; got "
            f"micro_batches={micro_batches}"
        )
    if min(batch_size, n) < micro_batches:
        raise InfluxValueError(
            f"every batch must hold at least micro_batches={micro_batches} examples, but "
            f"batch_size={batch_size} (N={n}) gives batches of {min(batch_size, n)}: pick "
            f"batch_size >= {micro_batches}, or fewer micro-batches"
        )
    if n % batch_size and n % batch_size < micro_batches:
        raise InfluxValueError(
            f"every batch must hold at least micro_batches={micro_batches} examples, but the last "
            f"batch of each epoch holds {n % batch_size} (N={n}, batch_size={batch_size}): pick a "
            "batch_size that divides N, or fewer micro-batches"
        )


def train(
    model: nn.Module,
    data,
    *,
    loss_fn: str | LossFn = "cross_entropy",
    optimizer: Literal["adam", "sgd"] = "adam",
    lr: float = 1e-3,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int | None = 128,
    seed: int = 0,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    lr_schedule: Literal["constant", "cosine"] = "constant",
    checkpoints: Iterable[int] | str = (),
    sampling: Literal["shuffle", "poisson"] | Sampler = "shuffle",
    gradient: GradientFn | None = None,
    micro_batches: int = 1,
    aggregator: Aggregator | Callable | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    loss: str | LossFn | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` with mini-batches in a seeded random order.

    Give exactly one of ``epochs`` and ``steps``. ``batch_size=None`` trains on the full batch.
    ``loss_fn`` is ``"cross_entropy"``, ``"mse"`` or a callable mapping (outputs, targets) to
    per-example losses [N] (``loss=`` is its deprecated name); each step minimizes their mean. ``checkpoints`` lists the steps
    (0 = before training, up to the total number of steps) at which to keep a parameter copy, or
    ``"epochs"`` for the initial model and the end of every epoch. ``lr_schedule="cosine"`` decays
    the learning rate to 0 over the run. The global RNG state is left untouched: the seed drives
    shuffling and any randomness in the model (dropout) through a forked RNG.

    ``sampling``, ``gradient``, ``micro_batches`` and ``aggregator`` are described in the module
    docstring. An epoch is ``ceil(N / batch_size)`` steps under every sampling. With
    ``micro_batches=M``, each batch is split into M contiguous parts (sizes differing by at most
    one) and ``aggregator`` (default ``influx.aggregate.mean()``) combines their gradients
    (``gradient``, default the mean-loss gradient, applied to each part). Each part counts as one
    worker: the mean aggregator weights the parts equally, so when N is not a multiple of M it
    differs slightly from the batch's mean gradient (parts of 4 and 3 examples: 4/7 vs 1/2).
    """
    loss = _renamed_loss(loss_fn, loss, "train")
    n = num_examples(data)
    if n == 0:
        raise InfluxValueError("cannot train on empty data")
    if batch_size is None:
        batch_size = n
    check_integer("batch_size", batch_size, minimum=1, hint="or None for the full batch")
    check_choice("lr_schedule", lr_schedule, _SCHEDULES)
    check_number("lr", lr, above=0)
    check_number("momentum", momentum, at_least=0)
    check_number("weight_decay", weight_decay, at_least=0)
    _check_hooks(n, batch_size, sampling, gradient, aggregator, micro_batches)
    loss_fn = _resolve_loss(loss)
    steps_per_epoch = math.ceil(n / batch_size)
    total = total_steps(n, batch_size, epochs, steps)
    checkpoint_steps = _checkpoint_steps(checkpoints, total, steps_per_epoch)
    device = torch.device(device) if device is not None else _model_device(model)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, trainable, lr, momentum, weight_decay)
    config = dict(
        loss=loss if isinstance(loss, str) else getattr(loss, "__name__", repr(loss)),
        optimizer=optimizer, lr=lr, epochs=epochs, steps=steps, batch_size=batch_size,
        seed=seed, momentum=momentum, weight_decay=weight_decay, lr_schedule=lr_schedule,
        checkpoints=checkpoint_steps, device=str(device), num_examples=n,
        sampling=sampling if isinstance(sampling, str) else _name(sampling),
        gradient=None if gradient is None else _name(gradient),
        micro_batches=micro_batches, aggregator=None if aggregator is None else _name(aggregator),
    )  # fmt: skip
    if micro_batches > 1 and aggregator is None:
        aggregator = _mean_aggregator()
    step_gradient = None
    # Poisson batches can be empty: mean_gradient gives them a zero gradient instead of NaN
    if gradient is not None or micro_batches > 1 or sampling == "poisson":
        step_gradient = _micro_batched(gradient or mean_gradient, aggregator, micro_batches)

    start = time.perf_counter()
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        run = _run(
            model, data, loss_fn, opt, total, batch_size, seed, lr, lr_schedule,
            checkpoint_steps, device, progress, sampling, step_gradient,
        )  # fmt: skip
    final_loss, final_accuracy = evaluate(model, data, loss_fn=loss_fn, device=device)
    return TrainResult(
        steps=total,
        epochs=total / steps_per_epoch,
        final_loss=final_loss,
        final_accuracy=final_accuracy,
        seconds=time.perf_counter() - start,
        config=config,
        **run,
    )


def _name(thing) -> str:
    return getattr(thing, "__name__", None) or repr(thing)


def _micro_batched(gradient: GradientFn, aggregator, micro_batches: int) -> GradientFn:
    """The step's GradientFn: ``gradient`` itself, or aggregated over micro-batches."""
    if micro_batches == 1:
        return gradient

    def aggregated(model, loss_fn, inputs, targets):
        parts = [
            gradient(model, loss_fn, x, y)
            for x, y in zip(inputs.tensor_split(micro_batches), targets.tensor_split(micro_batches))
        ]
        stacked = {name: torch.stack([grads[name] for _, grads in parts]) for name in parts[0][1]}
        return torch.cat([losses for losses, _ in parts]), aggregator(stacked)

    return aggregated


def _epoch_batches(
    data, sampling, n: int, batch_size: int, epoch: int, epoch_seed: int, steps: int
):
    """Yield the (inputs, targets, indices) batches of one epoch, at most ``steps`` of them."""
    if sampling == "poisson":
        generator = torch.Generator().manual_seed(epoch_seed)
        rate = batch_size / n
        for _ in range(steps):
            mask = torch.rand(n, generator=generator, device="cpu") < rate
            positions = mask.nonzero().flatten()
            # an empty draw is a step too (DP-SGD still adds its noise): an empty batch
            take = (
                positions if positions.numel() else torch.zeros(1, dtype=torch.long, device="cpu")
            )
            batch = next(iter_ordered_batches(data, take, max(1, take.numel())))
            yield tuple(t[: positions.numel()] for t in batch)
        return
    if sampling == "shuffle":
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed), device="cpu")
    else:
        order = torch.as_tensor(sampling(epoch, epoch_seed), dtype=torch.long).to("cpu")
        if (
            order.dim() != 1
            or order.numel() != n
            or (order.numel() and not 0 <= order.min() <= order.max() < n)
        ):
            raise InfluxValueError(
                f"the sampler must return {n} positions in [0, {n}) for each epoch; got shape "
                f"{tuple(order.shape)}"
            )
    # A final partial epoch visits only the positions its remaining steps reach.
    yield from iter_ordered_batches(data, order[: steps * batch_size], batch_size)


def _refuse_nonfinite(example_losses, indices, step: int, epoch: int) -> None:
    bad = indices[~torch.isfinite(example_losses.detach()).cpu()].tolist()
    if not bad:
        raise InfluxValueError(
            f"training step {step} (epoch {epoch}): the mean loss overflowed although every "
            "example's loss is finite: the loss diverged, lower lr"
        )
    raise InfluxValueError(
        f"training step {step} (epoch {epoch}): the losses of examples {bad[:10]} (dataset "
        f"indices{', first 10' if len(bad) > 10 else ''}) are NaN or inf: repair or remove those "
        "examples, or lower lr if the loss diverged"
    )


def _run(
    model: nn.Module,
    data,
    loss_fn: LossFn,
    opt: torch.optim.Optimizer,
    total: int,
    batch_size: int,
    seed: int,
    lr: float,
    lr_schedule: str,
    checkpoint_steps: list[int],
    device: torch.device,
    progress: bool,
    sampling,
    step_gradient: GradientFn | None,
) -> dict[str, Any]:
    """The training loop; returns the recorded fields of :class:`TrainResult`."""
    n = num_examples(data)
    steps_per_epoch = math.ceil(n / batch_size)
    epoch_seeds: list[int] = []
    epoch_orders: list[torch.Tensor] = []
    losses = torch.zeros(total, device="cpu")
    lrs = torch.zeros(total, dtype=torch.float64, device="cpu")  # the rates exactly as applied
    batch_sizes = torch.zeros(total, dtype=torch.long, device="cpu")
    saved: list[Checkpoint] = []
    pending = list(checkpoint_steps)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def maybe_checkpoint(step: int, epoch: int) -> None:
        if pending and pending[0] == step:
            pending.pop(0)
            current_lr = _lr_at(step, total, lr, lr_schedule)
            saved.append(Checkpoint(step, epoch, current_lr, _state_copy(model)))

    was_training = model.training
    model.train()
    step, epoch = 0, 0
    maybe_checkpoint(0, 0)
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress, leave=False)
    try:
        while step < total:
            epoch_seed = _epoch_seed(seed, epoch)
            batches = _epoch_batches(
                data, sampling, n, batch_size, epoch, epoch_seed, min(steps_per_epoch, total - step)
            )
            visited = []
            for inputs, targets, indices in batches:
                step_lr = _lr_at(step, total, lr, lr_schedule)
                model.zero_grad(set_to_none=True)
                inputs, targets = inputs.to(device), targets.to(device)
                if step_gradient is None:
                    example_losses = loss_fn(model(inputs), targets)
                    batch_loss = example_losses.mean()
                    batch_loss.backward()
                else:
                    example_losses, grads = step_gradient(model, loss_fn, inputs, targets)
                    for name, p in trainable.items():
                        p.grad = grads[name].detach() if name in grads else None
                    batch_loss = example_losses.mean()
                for group in opt.param_groups:
                    group["lr"] = step_lr
                opt.step()
                loss_value = batch_loss.item()
                if indices.numel() and not math.isfinite(loss_value):
                    _refuse_nonfinite(example_losses, indices, step, epoch)
                losses[step], lrs[step] = loss_value, step_lr
                batch_sizes[step] = indices.numel()
                visited.append(indices)
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss_value:.4f}", refresh=False)
                maybe_checkpoint(step, epoch)
            epoch_seeds.append(epoch_seed)
            epoch_orders.append(torch.cat(visited))
            epoch += 1
    finally:
        bar.close()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return dict(
        epoch_seeds=epoch_seeds,
        epoch_orders=epoch_orders,
        losses=losses,
        lrs=lrs,
        checkpoints=saved,
        batch_sizes=batch_sizes,
    )


def train_ensemble(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    *,
    init: Mapping[str, torch.Tensor] | None = None,
    steps: int,
    lr: float,
    chunk: int = 32,
) -> dict[str, torch.Tensor]:
    """Deprecated: :func:`influx.ensembles.fit_weighted` on the data ``(inputs, targets)``, which
    trains K copies of ``model`` by full-batch Adam, copy k on ``sum_i weights[k, i] l_i``.
    Returns name -> [K, *shape]."""
    from influx import ensembles

    warnings.warn(
        "influx.train.train_ensemble is deprecated: call influx.ensembles.fit_weighted(model, "
        "loss_fn, (inputs, targets), weights, ...)",
        DeprecationWarning,
        stacklevel=2,
    )

    return ensembles.fit_weighted(
        model, loss_fn, (inputs, targets), weights, init=init, steps=steps, lr=lr, chunk=chunk
    )
