"""Selective synaptic dampening (SSD; Foster, Schoepf and Brintrup 2023).

Importances are diagonals of the empirical Fisher information, the mean squared per-example
gradient: ``I_S = (1/|S|) sum_{z in S} grad l(z)^2`` (elementwise), for the forget set F and the
full training data D = F u R. Every parameter whose forget importance dominates,
``I_F[i] > alpha * I_D[i]``, is dampened:

    theta_i <- beta_i * theta_i,   beta_i = min(lambda * I_D[i] / I_F[i], 1),

all others are left as they are. Defaults alpha = 10, lambda = 1 (the authors' CIFAR settings).
Since ``I_D >= (|F| / |D|) I_F``, nothing is ever selected unless ``alpha < |D| / |F|`` (50 for a
forget set of 2%).

I_D is assembled from the forget and retain parts, ``I_D = (|F| I_F + |R| I_R) / (|F| + |R|)``, so
each example's gradient is computed once. Budget: one evaluation per example whose gradient enters
an importance (|F| + |R|). A budget below that uses a seeded random subset of the retain set of size
``budget - |F|`` for I_R (the estimate of I_D is then unbiased but noisier); a budget below |F| is
an error. The published reference code squares mini-batch gradients instead of per-example ones; the
per-example form is the Fisher diagonal the paper defines.
"""

from __future__ import annotations

import torch
from torch import nn

from influx.data import LossFn, iter_batches
from influx.errors import InfluxValueError
from influx.grads import per_sample_grads, select_parameters
from influx.unlearn.loop import Session
from influx.unlearn.result import UnlearnResult

__all__ = ["fisher_diagonal", "ssd"]


def fisher_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    data,
    targets: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    params=None,
) -> dict[str, torch.Tensor]:
    """Mean squared per-example gradient, name -> [*param.shape], over the examples of ``data``.

    ``data`` is the inputs [N, ...] with ``targets`` [N] next, or one data argument (a tuple, a
    Dataset or a DataLoader; ``targets`` left out), streamed. Per-example gradients come from
    influx's engine ``chunk_size`` examples at a time (the model is evaluated in its current
    train/eval mode).
    """
    if isinstance(data, torch.Tensor):
        data = (data, targets)
    elif targets is not None:
        raise InfluxValueError(
            "targets goes with inputs given as a tensor; data given as a tuple, Dataset or "
            "DataLoader carries its own targets: leave targets out"
        )
    return _fisher(model, loss_fn, iter_batches(data, chunk_size), params)


def _fisher(model, loss_fn, batches, params=None) -> dict[str, torch.Tensor]:
    """:func:`fisher_diagonal` over ``batches`` of (inputs, targets, indices)."""
    selected = select_parameters(model, params)
    total = {name: torch.zeros_like(p) for name, p in selected.items()}
    device = next(iter(selected.values())).device
    count = 0
    for inputs, targets, _ in batches:
        x, y = inputs.to(device), targets.to(device)
        grads = per_sample_grads(model, loss_fn, x, y, params=list(selected))
        for name, g in grads.items():
            total[name] += g.detach().square().sum(0)
        count += inputs.shape[0]
    return {name: value / count for name, value in total.items()}


def ssd(
    model: nn.Module,
    loss_fn: LossFn,
    forget,
    retain,
    *,
    budget=None,
    train_compute=None,
    alpha: float = 10.0,
    dampening: float = 1.0,
    chunk_size: int = 64,
    seed: int = 0,
    inplace: bool = False,
    progress: bool = True,
    record_every: int | None = None,
    keep_states: bool = True,
    on_checkpoint=None,
) -> UnlearnResult:
    """SSD (module doc): ``alpha`` is the selection threshold, ``dampening`` is lambda.

    One step (the dampening); ``record_every`` (any value) records the model before and after.
    Importances are evaluated in eval mode (no dropout), on the model's device.
    """
    if not alpha > 0 or not dampening > 0:
        raise InfluxValueError(f"alpha and dampening must be > 0; got {alpha!r}, {dampening!r}")
    options = dict(seed=seed, inplace=inplace, progress=progress, record_every=record_every,
                   keep_states=keep_states, on_checkpoint=on_checkpoint, batch_size=chunk_size)  # fmt: skip
    session = Session("ssd", model, loss_fn, forget, retain, budget=budget,
                      train_compute=train_compute, options=options)  # fmt: skip
    forget, retain = session.forget_set, session.retain_set
    n_forget, n_retain = forget.n, retain.n
    if not session.meter.affords(n_forget):
        raise InfluxValueError(
            f"ssd needs at least the {n_forget} forget-set gradient evaluations for its forget "
            f"importance; the budget is {session.meter.budget:.0f}"
        )
    used = int(min(n_retain, session.meter.remaining - n_forget))
    chosen = None  # the whole retain set, in order
    if used < n_retain:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        chosen = torch.randperm(n_retain, generator=generator, device="cpu")[:used]
    work = session.model
    if record_every is not None:
        session.record()
    work.eval()
    forget_importance = _fisher(work, loss_fn, forget.batches(chunk_size))
    session.meter.charge(n_forget)
    if used > 0:
        retain_importance = _fisher(work, loss_fn, retain.batches(chunk_size, chosen))
        session.meter.charge(used)
    dampened = 0
    with torch.no_grad():
        named = dict(work.named_parameters())
        for name, i_forget in forget_importance.items():
            if used > 0:
                i_all = (n_forget * i_forget + n_retain * retain_importance[name]) / (
                    n_forget + n_retain
                )
            else:
                i_all = i_forget
            selected = i_forget > alpha * i_all
            factor = (
                dampening * i_all / i_forget.where(selected, torch.ones_like(i_forget))
            ).clamp(max=1.0)
            named[name].mul_(torch.where(selected, factor, torch.ones_like(factor)))
            dampened += int(selected.sum())
    return session.finish_one_step(
        {"alpha": alpha, "dampening": dampening, "retain_used": used, "dampened": dampened}
    )
