"""Memorization proxies: one call each, [N], aligned to the dataset.

:func:`self_influence`, :func:`tracin_self_influence`, :func:`confidence` (mean true-class
probability over training, as in the C-score work), :func:`cumulative_loss` (Ravikumar et al.
2025), :func:`curvature` (input-loss curvature, Garg et al. 2023), :func:`final_loss` and
:func:`margin`. The training-time ones read a :class:`TrainingRecord` (:func:`record` on
checkpoints, or :func:`train_and_record`). Every data pass streams ``influx.data.iter_batches``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from influx import train as training
from influx.checks import check_integer, check_number
from influx.data import LossFn, iter_batches, num_examples
from influx.errors import InfluxValueError
from influx.memorization.estimate import old_argument_order
from influx.seeds import derive_seed

__all__ = [
    "TrainingRecord",
    "confidence",
    "cumulative_loss",
    "curvature",
    "final_loss",
    "margin",
    "record",
    "self_influence",
    "tracin_self_influence",
    "train_and_record",
]


def self_influence(model: nn.Module, loss_fn: LossFn, train, *, method: str = "ekfac", **options):
    """s(z) = grad l(z)^T (H + damping I)^-1 grad l(z) for every train example, [N], by any
    ``influx.influence`` method (``options`` go to ``influx.influence.fit``)."""
    from influx import influence

    return influence.fit(model, loss_fn, train, method=method, **options).self_influence()


def _checkpoint_states(checkpoints) -> tuple[list, list[float] | None]:
    """State dicts / modules and their learning rates (when known) from a ``TrainResult``, a list
    of ``influx.train.Checkpoint``, state dicts or modules."""
    if isinstance(checkpoints, training.TrainResult):
        checkpoints = checkpoints.checkpoints
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise InfluxValueError(
            "checkpoints is empty: pass influx.train.train(..., checkpoints='epochs')'s result "
            "or a list of state dicts"
        )
    if all(isinstance(c, training.Checkpoint) for c in checkpoints):
        return [c.state_dict for c in checkpoints], [c.lr for c in checkpoints]
    return checkpoints, None


def tracin_self_influence(
    model: nn.Module, loss_fn: LossFn, train, checkpoints, *, learning_rates=None, **options
) -> torch.Tensor:
    """TracIn self-influence ``sum_t eta_t ||grad l(w_t, z)||^2`` [N] over ``checkpoints`` (a
    ``TrainResult``, ``Checkpoint`` list, or state dicts with ``learning_rates``)."""
    from influx import influence

    states, recorded = _checkpoint_states(checkpoints)
    learning_rates = recorded if learning_rates is None else learning_rates
    fitted = influence.fit(
        model, loss_fn, train, method="tracin", checkpoints=states,
        learning_rates=learning_rates, **options,
    )  # fmt: skip
    return fitted.self_influence()


def _at(model: nn.Module, checkpoint) -> nn.Module:
    """:func:`influx.influence.tracin.model_at`, imported on first use (influence loads lazily)."""
    from influx.influence.tracin import model_at

    return model_at(model, checkpoint)


@torch.no_grad()
def _outputs(model: nn.Module, loss_fn: LossFn, train, batch_size: int):
    """Eval-mode per-example loss, true-class probability and margin, each [N]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses, probabilities, margins = [], [], []
    try:
        for inputs, targets, _ in iter_batches(train, batch_size):
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            loss = loss_fn(logits, targets)
            if not torch.isfinite(loss).all():
                raise InfluxValueError("the loss is NaN/inf on some examples; check the model")
            true = logits.gather(1, targets[:, None]).squeeze(1)
            others = logits.scatter(1, targets[:, None], float("-inf")).amax(1)
            losses.append(loss)
            probabilities.append(logits.softmax(1).gather(1, targets[:, None]).squeeze(1))
            margins.append(true - others)
    finally:
        model.train(was_training)
    return torch.cat(losses), torch.cat(probabilities), torch.cat(margins)


@dataclass(frozen=True)
class TrainingRecord:
    """Per-example quantities at T training checkpoints, each [T, N] (eval mode, at the end of
    each recorded step): ``losses``, ``probabilities`` (of the true class) and ``margins`` (true
    logit minus the largest other). ``steps`` [T]; ``train_result`` when :func:`train_and_record`
    made the run (its checkpoints feed :func:`tracin_self_influence` and :func:`curvature`)."""

    losses: torch.Tensor
    probabilities: torch.Tensor
    margins: torch.Tensor
    steps: list[int | None]
    train_result: training.TrainResult | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"TrainingRecord(checkpoints={len(self.steps)}, N={self.losses.shape[1]})"


def record(
    model: nn.Module, loss_fn: LossFn, train, checkpoints, *, batch_size: int = 512
) -> TrainingRecord:
    """Evaluate every example at every checkpoint (a ``TrainResult``, ``Checkpoint`` list, state
    dicts or models): one eval-mode pass per checkpoint.

    Ravikumar et al. sum the loss each example had when its minibatch was trained on; recording
    at checkpoints (e.g. every epoch end) instead costs one pass per checkpoint and replaces the
    within-epoch drift by the state at the epoch's end.
    """
    source = checkpoints
    states, _ = _checkpoint_states(checkpoints)
    if isinstance(source, training.TrainResult):
        steps: list[int | None] = [c.step for c in source.checkpoints]
    else:
        steps = [getattr(c, "step", None) for c in source]
    parts = [_outputs(_at(model, state), loss_fn, train, batch_size) for state in states]
    losses, probabilities, margins = (torch.stack(p) for p in zip(*parts, strict=True))
    return TrainingRecord(losses, probabilities, margins, steps)


def train_and_record(
    model: nn.Module,
    loss_fn: LossFn,
    train,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    batch_size_eval: int = 512,
    **train_options,
) -> TrainingRecord:
    """Train ``model`` in place with ``influx.train.train`` (checkpoint at every epoch end) and
    :func:`record` the checkpoints. ``train_options`` go to ``influx.train.train``."""
    per_epoch = math.ceil(num_examples(train) / batch_size)
    result = training.train(
        model, train, loss_fn=loss_fn, lr=lr, epochs=epochs, batch_size=batch_size, seed=seed,
        checkpoints=range(per_epoch, epochs * per_epoch + 1, per_epoch), progress=False,
        **train_options,
    )  # fmt: skip
    recorded = record(model, loss_fn, train, result, batch_size=batch_size_eval)
    return TrainingRecord(
        recorded.losses, recorded.probabilities, recorded.margins, recorded.steps, result
    )


def confidence(recorded: TrainingRecord) -> torch.Tensor:
    """Mean true-class probability over the recorded checkpoints [N] (the C-score work's
    learning-speed proxy: LOW confidence marks memorized examples)."""
    return recorded.probabilities.mean(0)


def cumulative_loss(recorded: TrainingRecord) -> torch.Tensor:
    """Cumulative sample loss ``sum_t l(w_t, z)`` over the recorded checkpoints [N]
    (Ravikumar et al. 2025: high marks memorized examples)."""
    return recorded.losses.sum(0)


def final_loss(model: nn.Module, loss_fn: LossFn, train, *, batch_size: int = 512) -> torch.Tensor:
    """Per-example loss of the trained model, eval mode, [N]."""
    return _outputs(model, loss_fn, train, batch_size)[0]


def margin(model: nn.Module, loss_fn: LossFn, train=None, *, batch_size: int = 512) -> torch.Tensor:
    """Logit margin ``f_y(x) - max_{c != y} f_c(x)`` of the trained model, eval mode, [N]
    (low or negative marks memorized examples). ``loss_fn`` is evaluated beside it, and an
    example whose loss is NaN or inf is refused; the old form ``margin(model, train)`` is
    deprecated."""
    loss_fn, train = old_argument_order(
        loss_fn, train, "memorization.margin", "margin(model, loss_fn, train)"
    )
    return _outputs(model, loss_fn, train, batch_size)[2]


def _probe_signs(seed: int, start: int, count: int, shape, probes: int) -> torch.Tensor:
    """Rademacher probes [probes, count, *shape] (CPU) for the examples at positions
    ``start .. start + count``: one seeded draw per batch, so a rerun sees the same vectors."""
    generator = torch.Generator().manual_seed(derive_seed(seed, start))
    bits = torch.randint(0, 2, (probes, count, *shape), generator=generator, device="cpu")
    return bits.mul_(2).sub_(1)


def curvature(
    model: nn.Module,
    loss_fn: LossFn,
    train,
    *,
    checkpoints=None,
    probes: int = 10,
    h: float = 1e-3,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Input-loss curvature (Garg et al. 2023) [N]: the mean over ``probes`` Rademacher vectors v
    (entries +-1) and over ``checkpoints`` (default: the model as it is) of

        || grad_x l(x + h v) - grad_x l(x) ||_2 ,   h = 1e-3,

    a finite-difference estimate of ``h ||H_x v||``. Eval mode; each probe is one backward of
    the summed loss for a whole batch (examples do not interact in eval mode). High curvature
    marks memorized examples. The same probes are used at every checkpoint.
    """
    probes = check_integer("probes", probes, minimum=1)
    check_number("h", h, above=0)
    states = [model] if checkpoints is None else _checkpoint_states(checkpoints)[0]
    was_training = model.training
    total = None
    for state in states:
        at = _at(model, state)
        at.eval()
        device = next(at.parameters()).device
        parts = []
        for inputs, targets, _ in iter_batches(train, batch_size):
            start = sum(p.shape[0] for p in parts)
            inputs, targets = inputs.to(device), targets.to(device)
            signs = _probe_signs(seed, start, inputs.shape[0], inputs.shape[1:], probes)
            signs = signs.to(device=device, dtype=inputs.dtype)
            base = _input_grad(at, loss_fn, inputs, targets)
            norms = torch.stack([
                (_input_grad(at, loss_fn, inputs + h * v, targets) - base).flatten(1).norm(dim=1)
                for v in signs
            ])  # fmt: skip
            parts.append(norms.mean(0))
        values = torch.cat(parts)
        total = values if total is None else total + values
    model.train(was_training)
    return total / len(states)


def _input_grad(model: nn.Module, loss_fn: LossFn, inputs, targets) -> torch.Tensor:
    """grad_x of each example's loss [B, ...], from one backward of the summed loss."""
    with torch.enable_grad():
        x = inputs.detach().requires_grad_(True)
        losses = loss_fn(model(x), targets)
        bad = (~torch.isfinite(losses)).nonzero().flatten()
        if bad.numel():
            raise InfluxValueError(f"the loss is NaN/inf at batch positions {bad[:10].tolist()}")
        (gradient,) = torch.autograd.grad(losses.sum(), x)
    return gradient
