"""First-order unlearning methods: gradient ascent, fine-tuning, noisy GD, NegGrad+, EU-k, CF-k.

Each has the signature ``method(model, loss_fn, forget, retain, *, budget=None,
train_compute=None, <its own settings>, **options)`` and returns an
:class:`~influx.unlearn.result.UnlearnResult`. ``options`` are the shared
:class:`~influx.unlearn.loop.StepOptions` (lr, optimizer, batch_size, seed, record_every, ...).
Steps are mini-batch steps on the *mean* per-example loss of a batch; each costs the number of
examples it passes through the model (:mod:`influx.unlearn.budget`), and the number of steps is
whatever the budget affords (or ``max_steps``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from influx.checks import check_number
from influx.data import LossFn
from influx.errors import InfluxValueError, UnsupportedModelError
from influx.seeds import derive_seed
from influx.unlearn.loop import Session, Step
from influx.unlearn.result import UnlearnResult

# derive_seed(seed, _NOISE_STREAM) seeds noisy_gd's noise; the batch streams use other streams
_NOISE_STREAM = 1_000

__all__ = [
    "cf_k",
    "eu_k",
    "fine_tune",
    "gradient_ascent",
    "last_layers",
    "neggrad_plus",
    "noisy_gd",
]


def _descent(session: Session, which: str, sign: float = 1.0) -> Iterator[Step]:
    """Steps on ``sign`` x the mean loss of batches of one set (+1 descends, -1 ascends)."""
    stream = session.stream(which)
    while True:
        batch = stream.next()
        yield Step(stream.size, lambda batch=batch: sign * session.losses(batch).mean())


def _one_set(method, which, sign, model, loss_fn, forget, retain, budget, train_compute, options):
    """Plain steps on ``sign`` x the mean loss of the ``which`` set's batches."""
    session = Session(method, model, loss_fn, forget, retain, budget=budget,
                      train_compute=train_compute, options=options)  # fmt: skip
    return session.run(_descent(session, which, sign), typical_cost=session.batch_size_of(which))


def gradient_ascent(
    model: nn.Module, loss_fn: LossFn, forget, retain, *, budget=None, train_compute=None, **options
) -> UnlearnResult:
    """Gradient ascent on the forget set: ``theta <- theta + lr * grad L_forget(theta)`` (SGD),
    with ``L_forget`` the mean loss of a forget mini-batch. ``retain`` is not used (it is checked
    non-empty, as by every method). Cost per step: the forget batch size."""
    return _one_set("gradient_ascent", "forget", -1.0, model, loss_fn, forget, retain, budget,
                    train_compute, options)  # fmt: skip


def fine_tune(
    model: nn.Module, loss_fn: LossFn, forget, retain, *, budget=None, train_compute=None, **options
) -> UnlearnResult:
    """Gradient descent on the retain set (catastrophic forgetting of the forget set).
    Cost per step: the retain batch size."""
    return _one_set("fine_tune", "retain", 1.0, model, loss_fn, forget, retain, budget,
                    train_compute, options)  # fmt: skip


def noisy_gd(
    model: nn.Module,
    loss_fn: LossFn,
    forget,
    retain,
    *,
    budget=None,
    train_compute=None,
    noise_std: float = 0.1,
    **options,
) -> UnlearnResult:
    """Gradient descent on the retain set with Gaussian noise added to every gradient:
    the optimizer sees ``g + noise_std * xi``, ``xi ~ N(0, I)`` (for SGD:
    ``theta <- theta - lr * (g + noise_std * xi)``). The noise is drawn from a CPU generator
    seeded by ``seed``, so runs repeat exactly on any device. Cost per step: the batch size."""
    check_number("noise_std", noise_std, at_least=0)
    session = Session("noisy_gd", model, loss_fn, forget, retain, budget=budget,
                      train_compute=train_compute, options=options)  # fmt: skip
    parameters = [p for p in session.model.parameters() if p.requires_grad]
    generator = torch.Generator(device="cpu").manual_seed(
        derive_seed(session.options.seed, _NOISE_STREAM)
    )

    def add_noise() -> None:
        for p in parameters:
            xi = torch.randn(p.shape, generator=generator, dtype=p.dtype, device="cpu")
            if p.grad is None:
                # A parameter the loss does not reach still receives its noise.
                p.grad = torch.zeros_like(p)
            p.grad.add_(xi.to(p.device), alpha=noise_std)

    return session.run(
        _descent(session, "retain"),
        parameters=parameters,
        after_backward=add_noise,
        typical_cost=session.batch_size_of("retain"),
        extra={"noise_std": noise_std},
    )


def neggrad_plus(
    model: nn.Module,
    loss_fn: LossFn,
    forget,
    retain,
    *,
    budget=None,
    train_compute=None,
    beta: float = 0.95,
    **options,
) -> UnlearnResult:
    """NegGrad+ (Kurmanji et al. 2023): minimize ``beta * L_retain - (1 - beta) * L_forget`` over a
    retain and a forget mini-batch per step (mean losses). ``beta = 1`` is fine-tuning,
    ``beta = 0`` gradient ascent. Cost per step: retain batch size + forget batch size."""
    if not 0 <= beta <= 1:
        raise InfluxValueError(f"beta must lie in [0, 1]; got {beta!r}")
    session = Session("neggrad_plus", model, loss_fn, forget, retain, budget=budget,
                      train_compute=train_compute, options=options)  # fmt: skip
    retain_stream, forget_stream = session.stream("retain"), session.stream("forget", offset=1)
    cost = retain_stream.size + forget_stream.size

    def plan() -> Iterator[Step]:
        while True:
            r, f = retain_stream.next(), forget_stream.next()

            def objective(r=r, f=f) -> torch.Tensor:
                return beta * session.losses(r).mean() - (1 - beta) * session.losses(f).mean()

            yield Step(cost, objective)

    return session.run(plan(), typical_cost=cost, extra={"beta": beta})


def last_layers(model: nn.Module, k: int) -> list[tuple[str, nn.Module]]:
    """The last ``k`` layers of ``model``: modules that hold parameters of their own
    (``Linear``, ``Conv2d``, ``GroupNorm``, ...), in registration order, i.e. forward order for
    ``nn.Sequential`` and influx's models (for a ResNet the last three are ``fc``,
    ``layer4.1.bn2``, ``layer4.1.conv2``)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InfluxValueError(f"k must be a positive integer; got {k!r}")
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    ]
    if k > len(layers):
        raise InfluxValueError(f"k={k} exceeds the model's {len(layers)} layers with parameters")
    return layers[-k:]


def _last_k(method: str, model, loss_fn, forget, retain, k, reinit, budget, train_compute, options):
    session = Session(method, model, loss_fn, forget, retain, budget=budget,
                      train_compute=train_compute, options=options)  # fmt: skip
    layers = last_layers(session.model, k)
    parameters = [p for _, m in layers for p in m.parameters(recurse=False) if p.requires_grad]
    if reinit:
        cuda = [session.device] if session.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(session.options.seed)
            for name, module in layers:
                if not hasattr(module, "reset_parameters"):
                    raise UnsupportedModelError(
                        f"{method}: layer {name!r} ({type(module).__name__}) has no "
                        "reset_parameters(); choose a smaller k or use cf_k"
                    )
                module.reset_parameters()
    # Freeze the rest for the run (backward then stops at the first trained layer's input).
    frozen = [p for p in session.model.parameters() if p.requires_grad and not
              any(p is q for q in parameters)]  # fmt: skip
    for p in frozen:
        p.requires_grad_(False)
    try:
        return session.run(
            _descent(session, "retain"),
            parameters=parameters,
            typical_cost=session.batch_size_of("retain"),
            extra={"k": k, "layers": [name for name, _ in layers]},
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)


def eu_k(
    model: nn.Module,
    loss_fn: LossFn,
    forget,
    retain,
    *,
    budget=None,
    train_compute=None,
    k: int = 1,
    **options,
) -> UnlearnResult:
    """EU-k (Goel et al. 2022): re-initialize the last ``k`` layers (:func:`last_layers`, each
    layer's ``reset_parameters()`` under ``seed``) and train them on the retain set, the rest
    frozen. Cost per step: the batch size (the full forward is counted as a full evaluation)."""
    return _last_k("eu_k", model, loss_fn, forget, retain, k, True, budget, train_compute, options)


def cf_k(
    model: nn.Module,
    loss_fn: LossFn,
    forget,
    retain,
    *,
    budget=None,
    train_compute=None,
    k: int = 1,
    **options,
) -> UnlearnResult:
    """CF-k (Goel et al. 2022): fine-tune the last ``k`` layers on the retain set, the rest
    frozen. Cost per step: the batch size."""
    return _last_k("cf_k", model, loss_fn, forget, retain, k, False, budget, train_compute, options)
