"""The retrain oracle: re-initialize and train on the retain set with the original recipe.

It is what every unlearning method approximates, so it sits outside the budget: its compute is
recorded (``spent`` = per-example gradient evaluations of the retraining, ``epochs * |R|``) and
``budget`` is ``math.inf``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

from influx.data import LossFn
from influx.errors import InfluxValueError, UnsupportedModelError
from influx.train import train
from influx.unlearn.loop import Session
from influx.unlearn.result import TrajectoryPoint, UnlearnResult

__all__ = ["reinitialize", "retrain"]


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """Call ``reset_parameters()`` of every module that has one, under ``torch.manual_seed(seed)``
    (the global RNG is left untouched). Modules holding parameters without it are an error."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name, module in model.named_modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            elif any(True for _ in module.parameters(recurse=False)):
                raise UnsupportedModelError(
                    f"module {name!r} ({type(module).__name__}) holds parameters but has no "
                    "reset_parameters(): pass init= (the initial state_dict) instead of a seed"
                )
    return model


def retrain(
    model: nn.Module,
    loss_fn: LossFn,
    forget,
    retain,
    *,
    epochs: int,
    init: Mapping[str, torch.Tensor] | None = None,
    init_seed: int = 0,
    budget=None,
    train_compute=None,
    optimizer: str = "adam",
    lr: float = 1e-3,
    batch_size: int | None = 128,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    lr_schedule: str = "constant",
    seed: int = 0,
    inplace: bool = False,
    progress: bool = True,
    record_every: int | None = None,
    keep_states: bool = True,
    on_checkpoint=None,
) -> UnlearnResult:
    """Retrain from scratch on ``retain`` with the recipe of :func:`influx.train.train`.

    The start is ``init`` (a state_dict, e.g. the original initialization) if given, else a fresh
    initialization by :func:`reinitialize` with ``init_seed``. ``seed`` drives the batch order, as
    in :func:`influx.train.train`. ``budget`` and ``train_compute`` are accepted for the common
    signature and ignored (the oracle is not budgeted). ``record_every`` counts optimizer steps.
    """
    del budget, train_compute
    if not isinstance(epochs, int) or epochs < 1:
        raise InfluxValueError(f"epochs must be a positive integer; got {epochs!r}")
    options = dict(inplace=inplace, progress=progress, record_every=record_every, seed=seed,
                   keep_states=keep_states, on_checkpoint=on_checkpoint, lr=lr,
                   optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
                   batch_size=batch_size or 1)  # fmt: skip
    session = Session("retrain", model, loss_fn, forget, retain, budget=None,
                      train_compute=None, options=options, limited=False)  # fmt: skip
    work = session.model
    if init is not None:
        work.load_state_dict(init)
    else:
        reinitialize(work, init_seed)
    n = session.retain_set.n
    size = n if batch_size is None else batch_size
    total = epochs * math.ceil(n / size)
    checkpoints = (
        sorted({*range(0, total + 1, record_every), total}) if record_every is not None else ()
    )
    run = train(
        work, session.retain_set.data, loss_fn=loss_fn, optimizer=optimizer, lr=lr, epochs=epochs,  # type: ignore[arg-type]
        batch_size=batch_size, seed=seed, momentum=momentum, weight_decay=weight_decay,
        lr_schedule=lr_schedule, checkpoints=checkpoints, device=session.device,  # type: ignore[arg-type]
        progress=progress,
    )  # fmt: skip
    # train() visits every retain example once per epoch.
    session.meter.charge(epochs * n)
    session.steps = run.steps
    spent_per_step = epochs * n / max(run.steps, 1)
    if checkpoints:
        scratch = copy.deepcopy(work)
        for checkpoint in run.checkpoints:
            metrics = {}
            if on_checkpoint is not None:
                scratch.load_state_dict(checkpoint.state_dict)
                scratch.eval()
                metrics = dict(on_checkpoint(scratch, checkpoint.step) or {})
            session.trajectory.append(TrajectoryPoint(
                checkpoint.step, round(checkpoint.step * spent_per_step),
                checkpoint.state_dict if keep_states else None, metrics,
            ))  # fmt: skip
    work.train(session.was_training)
    return session.result({"epochs": epochs, "init": "given" if init is not None else init_seed,
                           "lr_schedule": lr_schedule, "batch_size": batch_size})  # fmt: skip
