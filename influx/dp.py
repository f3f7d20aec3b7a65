"""DP-SGD with ghost clipping, and its privacy accounting by Opacus' accountants.

Clipping (Abadi et al. 2016). For per-example losses ``l_i`` with gradients ``g_i`` the clipped
sum is ``sum_i c_i g_i`` with ``c_i = min(1, C / ||g_i||)`` (``c_i = 1`` when ``g_i = 0``), C =
``max_grad_norm``, over every trainable parameter together. :func:`clipped_grad` computes it
without materializing per-sample gradients (ghost clipping, Li et al. 2022): ONE forward and one
backward to the layer outputs capture each layer's inputs ``a`` and output gradients ``b``
(``influx.grads``); the norms ``||g_i||`` follow from them layer by layer (ghost or direct,
whichever is cheaper); and since ``g_i`` is linear in ``b_i``, the clipped sum is the gradient of
``sum_i c_i l_i`` obtained from the captured ``(a, c b)``: for Linear and Conv layers one
weight-gradient product per layer (exactly the weight half of an ordinary backward); for layers
whose norm needs their per-sample gradients anyway (GroupNorm, LayerNorm, the torch.func
fallback) the weighted sum of those; for the rest (Embedding, padding modes other than zeros) a
re-run of that module alone. Weight tying is supported (the clipped sum adds the uses;
the norms come from the summed per-sample gradients of the tied weights).

DP-SGD step (:class:`DPGradient`): ``(sum_i c_i g_i + N(0, sigma^2 C^2 I)) / B``, with B the
expected batch size (``q N`` under Poisson sampling with rate q), sigma = ``noise_multiplier``.

Accounting: :func:`epsilon` runs Opacus' RDP or PRV accountant on ``steps`` compositions of the
subsampled Gaussian mechanism with rate ``q = batch_size / N``; :func:`noise_multiplier_for`
inverts it with Opacus' ``get_noise_multiplier``. The bound assumes Poisson sampling; shuffled
fixed-size batches are accounted the same way (common practice, as in Opacus, but not a proof).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.grad
from torch import nn

from influx.checks import check_choice, check_count_or_none, check_integer, check_number, is_integer
from influx.data import LossFn, num_examples
from influx.errors import InfluxRuntimeError, InfluxValueError
from influx.grads import LayerRule, select_parameters
from influx.grads.capture import LayerCall, capture, first_output
from influx.grads.common import refuse_batchnorm
from influx.grads.engine import data_chunks, plan_layers, tied_parameters
from influx.grads.rules import FUNCTIONAL_RULE, rule_for
from influx.seeds import derive_seed
from influx.train import TrainResult, total_steps
from influx.train import train as _train

__all__ = [
    "DPGradient",
    "clipped_grad",
    "epsilon",
    "noise_multiplier_for",
    "train",
]

Accountant = Literal["rdp", "prv"]
_ACCOUNTANTS = ("rdp", "prv")
_NOISE_STREAM = 1  # derive_seed(seed, _NOISE_STREAM) seeds the noise of a run with that seed
# The finest tolerance noise_multiplier_for accepts: below about 1e-14 Opacus' bisection stalls
# at the PRV accountant's resolution and never ends.
_MIN_TOLERANCE = 1e-6
_CONVS = {nn.Conv1d: torch.nn.grad.conv1d_weight, nn.Conv2d: torch.nn.grad.conv2d_weight,
          nn.Conv3d: torch.nn.grad.conv3d_weight}  # fmt: skip


def clipped_grad(
    model: nn.Module,
    loss_fn: LossFn,
    data,
    targets: torch.Tensor | None = None,
    *,
    max_grad_norm: float,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """``sum_i min(1, C / ||g_i||) g_i`` over the batch, for every trainable parameter: name -> tensor.

    ``g_i`` is the gradient of example i's loss w.r.t. all trainable parameters together, ``C`` is
    ``max_grad_norm``. No per-sample gradient is materialized (ghost clipping, see the module
    docstring); ``chunk_size`` bounds memory by processing that many examples at a time (the sum is
    the same). ``data`` is the inputs with ``targets`` next, or one data argument (a tuple, Dataset
    or DataLoader, streamed ``chunk_size`` examples at a time, 256 for a Dataset when None; see
    :func:`influx.grads.per_sample_grads`). An empty batch gives zeros. BatchNorm in train mode is
    refused.
    """
    return _clip(model, loss_fn, data, targets, max_grad_norm, chunk_size).grads


@dataclass
class _Clipped:
    losses: torch.Tensor  # [N], detached
    grads: dict[str, torch.Tensor]  # the clipped sum


def _check_max_grad_norm(max_grad_norm: float) -> float:
    # a float: a numpy scalar would meet the tensors below in numpy's terms
    return check_number("max_grad_norm", max_grad_norm, above=0)


def _named(positions: torch.Tensor, indices: torch.Tensor | None, offset: int) -> str:
    """Examples named by dataset index when the data carries indices, else by batch position."""
    if indices is None:
        return f"{(positions + offset).tolist()} (batch positions)"
    return f"{indices[positions.cpu()].tolist()} (dataset indices)"


def _clip(model, loss_fn, data, targets, max_grad_norm, chunk_size=None) -> _Clipped:
    max_grad_norm = _check_max_grad_norm(max_grad_norm)
    check_count_or_none("chunk_size", chunk_size)
    selected = select_parameters(model)
    layers = plan_layers(model, selected)
    tied = tied_parameters(layers)
    modules = {layer.name: layer.module for layer in layers}
    reference = next(iter(selected.values()))
    total: dict[str, torch.Tensor] = {}
    losses = []
    for start, x, y, ids in data_chunks(data, targets, chunk_size, reference.device):
        if x.is_floating_point() and not torch.isfinite(x).all():
            bad = (~torch.isfinite(x.flatten(1))).any(1).nonzero().flatten()
            raise InfluxValueError(
                f"inputs of examples {_named(bad, ids, start)} contain NaN or inf"
            )
        chunk_losses, calls = capture(
            model, loss_fn, x, y, modules, list(selected.values()), offset=start, indices=ids
        )
        sqnorms, materialized = _sqnorms(layers, calls, tied, x.shape[0], reference)
        chunk_norms = sqnorms.sqrt()
        bad = (~torch.isfinite(chunk_norms)).nonzero().flatten()
        if bad.numel():
            raise InfluxRuntimeError(
                f"per-sample gradients of examples {_named(bad, ids, start)} are NaN or inf: "
                "check those inputs and the learning rate"
            )
        # c_i = min(1, C / ||g_i||); a zero gradient keeps c_i = 1 (it contributes nothing anyway)
        scale = torch.where(
            chunk_norms > max_grad_norm, max_grad_norm / chunk_norms.clamp_min(1e-300), 1.0
        )
        for layer in layers:
            if layer.name in materialized:
                for full, g in materialized[layer.name].items():
                    _accumulate(total, full, torch.tensordot(scale.to(g.dtype), g, dims=1))
                continue
            for call in calls[layer.name]:
                for local, g in _weighted_grads(layer.module, call, scale).items():
                    if local in layer.params:
                        _accumulate(total, layer.params[local], g)
        losses.append(chunk_losses)
    return _Clipped(
        torch.cat(losses) if losses else reference.new_zeros(0),
        # a parameter that took no part in the forward (or an empty batch): zero
        {
            name: total[name] if name in total else torch.zeros_like(p)
            for name, p in selected.items()
        },
    )


def _accumulate(total: dict, name: str, value: torch.Tensor) -> None:
    total[name] = total[name] + value if name in total else value


def _sqnorms(layers, calls, tied: set[str], n: int, reference: torch.Tensor):
    """Squared per-sample norms [N] of the whole gradient, and the per-sample gradients that were
    materialized on the way (layer name -> {full parameter name: [N, *shape]}).

    A layer is materialized when its rule has no cheaper norm than the gradients themselves
    (GroupNorm, LayerNorm, the torch.func fallback; those are reused for the clipped sum), or when
    it holds a tied parameter (the norm of a sum is not the sum of norms).
    """
    total = reference.new_zeros(n)
    materialized: dict[str, dict[str, torch.Tensor]] = {}
    tied_grads: dict[str, torch.Tensor] = {}
    for layer in layers:
        layer_calls = calls[layer.name]
        if not layer_calls:
            continue
        if tied & set(layer.params.values()) or type(layer.rule).sqnorms is LayerRule.sqnorms:
            grads = layer.rule.grads(layer.module, layer_calls)
            own = {full: grads[local] for local, full in layer.params.items() if local in grads}
            materialized[layer.name] = own
            for full, g in own.items():
                if full in tied:
                    _accumulate(tied_grads, full, g)
                else:
                    total = total + g.reshape(n, -1).square().sum(1)
            continue
        for local, sq in layer.rule.sqnorms(layer.module, layer_calls).items():
            if local in layer.params:
                total = total + sq
    for g in tied_grads.values():
        total = total + g.reshape(n, -1).square().sum(1)
    return total, materialized


def _weighted_grads(module: nn.Module, call: LayerCall, scale: torch.Tensor) -> dict:
    """Gradient of ``sum_i scale_i l_i`` w.r.t. the module's own parameters, from one call."""
    b = call.grad_output * scale.to(call.grad_output.dtype).reshape(
        -1, *[1] * (call.grad_output.dim() - 1)
    )
    x = call.args[0] if call.args else None
    rule = rule_for(module)
    # the closed forms below are those of the Linear / Conv rules (not of a weight_norm'd layer)
    kind = type(module) if rule is not FUNCTIONAL_RULE else None
    if kind is nn.Linear:
        b_flat = b.reshape(-1, module.out_features)  # [N*T, d_out]
        out = {"weight": b_flat.T @ x.reshape(-1, module.in_features)}
        if module.bias is not None:
            out["bias"] = b_flat.sum(0)
        return out
    if kind in _CONVS and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        # the weight half of the convolution's backward, nothing else
        weight = _CONVS[kind](x, module.weight.shape, b, module.stride, module.padding,
                              module.dilation, module.groups)  # fmt: skip
        out = {"weight": weight}
        if module.bias is not None:
            out["bias"] = b.transpose(0, 1).flatten(1).sum(1)
        return out
    # Any other module: re-run it alone on its recorded inputs and pull c b back to its parameters.
    own = rule.owned_parameters(module)
    with torch.enable_grad():
        output = first_output(module(*call.args, **call.kwargs))
        grads = torch.autograd.grad(output, list(own.values()), b, allow_unused=True)
    return {
        name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(own.items(), grads)
    }


@dataclass
class DPGradient:
    """The DP-SGD gradient as an ``influx.train`` ``gradient=`` hook.

    ``(sum_i c_i g_i + N(0, (noise_multiplier * max_grad_norm)^2 I)) / expected_batch_size``, the
    noise drawn on the parameters' device from a generator seeded with ``seed`` (same seed, same
    noise sequence). Returns the per-example losses [n] and the gradient, name -> tensor. The
    three numbers must be finite (any real type, numpy scalars included; not bools).
    """

    max_grad_norm: float
    noise_multiplier: float
    expected_batch_size: float
    seed: int = 0
    chunk_size: int | None = None
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        # an infinite or NaN noise, norm or batch size would turn every gradient into inf, NaN
        # or zero without a word
        _check_max_grad_norm(self.max_grad_norm)
        check_number("noise_multiplier", self.noise_multiplier, at_least=0)
        check_number("expected_batch_size", self.expected_batch_size, above=0)
        check_count_or_none("chunk_size", self.chunk_size)

    def __call__(self, model, loss_fn, inputs, targets):
        clipped = _clip(model, loss_fn, inputs, targets, self.max_grad_norm, self.chunk_size)
        std = self.noise_multiplier * self.max_grad_norm
        grads = {}
        for name, g in clipped.grads.items():
            if std > 0:
                noise = torch.randn(
                    g.shape, generator=self._generator_on(g.device), device=g.device, dtype=g.dtype
                )
                g = g + std * noise
            grads[name] = g / self.expected_batch_size
        return clipped.losses, grads

    def _generator_on(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator


def _check_accountant(accountant: str) -> None:
    check_choice("accountant", accountant, _ACCOUNTANTS)


def _check_schedule(sample_rate: float, steps: int, delta: float) -> None:
    check_number("sample_rate", sample_rate, above=0, at_most=1)
    check_integer("steps", steps, minimum=0)
    check_number("delta", delta, above=0, below=1)


def _check_calibration(target_epsilon: float, steps: int, tolerance: float) -> None:
    """What Opacus' bisection needs to end: it loops forever without a step (epsilon is 0 at any
    noise) or with a tolerance below the accountant's resolution."""
    check_number(
        "target_epsilon",
        target_epsilon,
        above=0,
        hint="for no privacy guarantee, give noise_multiplier=0 instead",
    )
    if steps < 1:
        raise InfluxValueError(
            f"a target_epsilon needs at least one step to calibrate the noise for; got steps={steps} "
            "(no step spends no privacy at any noise): train for at least one step, or give "
            "noise_multiplier instead"
        )
    check_number(
        "tolerance",
        tolerance,
        at_least=_MIN_TOLERANCE,
        hint="the accountants' epsilon is not resolved more finely, and the search would not end",
    )


def _opacus():
    """Opacus, whose accountants do the privacy accounting (influx writes none of its own)."""
    try:
        import opacus.accountants.utils  # noqa: F401
    except ImportError as error:
        raise InfluxRuntimeError(
            "privacy accounting uses Opacus' accountants, which are not installed: "
            "pip install 'influx[privacy]' (or pip install opacus)"
        ) from error
    import opacus

    return opacus


def epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    *,
    accountant: Accountant = "rdp",
) -> float:
    """Spent epsilon of ``steps`` subsampled Gaussian steps, by Opacus' RDP or PRV accountant.

    ``noise_multiplier = 0`` (no noise) spends an infinite epsilon; ``steps = 0`` spends none. A
    NaN, infinite or negative ``noise_multiplier`` is refused.
    """
    create_accountant = _opacus().accountants.create_accountant
    _check_accountant(accountant)
    _check_schedule(sample_rate, steps, delta)
    # Opacus loops forever on a NaN or infinite noise multiplier
    check_number("noise_multiplier", noise_multiplier, at_least=0)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    ledger = create_accountant(mechanism=accountant)
    for _ in range(steps):
        ledger.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return float(ledger.get_epsilon(delta=delta))


def noise_multiplier_for(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    *,
    accountant: Accountant = "rdp",
    tolerance: float = 0.01,
) -> float:
    """The noise multiplier that spends ``target_epsilon`` (within ``tolerance``, never above).

    Opacus' ``get_noise_multiplier`` (a bisection over its accountant). ``target_epsilon`` must be
    finite (for no guarantee, train with ``noise_multiplier=0``), ``steps`` at least 1 and
    ``tolerance`` at least 1e-6; a target that even a noise multiplier of 1e6 overspends is refused.
    """
    opacus_utils = _opacus().accountants.utils
    _check_accountant(accountant)
    _check_schedule(sample_rate, steps, delta)
    _check_calibration(target_epsilon, steps, tolerance)
    try:
        sigma = opacus_utils.get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
            steps=steps, accountant=accountant, epsilon_tolerance=tolerance,
        )  # fmt: skip
    except ValueError as error:
        if "privacy budget is too low" not in str(error):
            raise
        raise InfluxValueError(
            f"target_epsilon={target_epsilon:g} is out of reach: even noise_multiplier="
            f"{opacus_utils.MAX_SIGMA:g} spends more over {steps} steps at sample_rate={sample_rate:g}, "
            f"delta={delta:g}; raise target_epsilon or delta, or take fewer steps or smaller batches"
        ) from error
    return float(sigma)


def train(
    model: nn.Module,
    data,
    *,
    max_grad_norm: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float = 1e-5,
    batch_size: int = 128,
    epochs: int | None = None,
    steps: int | None = None,
    sampling: Literal["poisson", "shuffle"] = "poisson",
    accountant: Accountant = "rdp",
    noise_seed: int | None = None,
    chunk_size: int | None = None,
    **train_kwargs: Any,
) -> TrainResult:
    """DP-SGD: :func:`influx.train.train` with the :class:`DPGradient` hook, then accounting.

    Give ``noise_multiplier`` or ``target_epsilon`` (then sigma comes from
    :func:`noise_multiplier_for` for this schedule). ``sampling="poisson"`` takes each example
    with probability ``q = batch_size / N`` at every step (what the accountant assumes);
    ``"shuffle"`` uses fixed-size shuffled batches, accounted with the same q. The gradient is
    divided by the expected batch size ``q N = batch_size``. ``train_kwargs`` go to
    ``influx.train.train`` (``optimizer``, ``lr``, ``seed``, ``checkpoints``, ...). The noise
    is seeded by ``noise_seed``, by default derived from the training ``seed``: runs with
    different seeds add different noise.

    Returns the :class:`~influx.train.TrainResult` with ``privacy`` set: ``epsilon`` (spent),
    ``delta``, ``noise_multiplier``, ``max_grad_norm``, ``sample_rate``, ``steps``,
    ``accountant``, ``sampling``, ``noise_seed``.
    """

    n = num_examples(data)
    if n == 0:
        raise InfluxValueError("cannot train on empty data")
    if not (is_integer(batch_size) and 1 <= batch_size <= n):
        raise InfluxValueError(f"batch_size must be an integer in [1, N={n}]; got {batch_size!r}")
    batch_size = int(batch_size)
    check_choice("sampling", sampling, ("poisson", "shuffle"))
    for key in ("gradient", "micro_batches", "aggregator"):
        if key in train_kwargs:
            raise InfluxValueError(f"dp.train sets the gradient itself; do not pass {key}=")
    _check_max_grad_norm(max_grad_norm)
    _check_accountant(accountant)
    # checked before training: the trainer puts the model in train mode
    refuse_batchnorm(model, trains="DP-SGD")
    total = total_steps(n, batch_size, epochs, steps)
    sample_rate = batch_size / n
    _check_schedule(sample_rate, total, delta)
    if (noise_multiplier is None) == (target_epsilon is None):
        raise InfluxValueError(
            "give exactly one of noise_multiplier and target_epsilon; got "
            f"noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}"
        )
    if noise_multiplier is None:
        noise_multiplier = noise_multiplier_for(
            target_epsilon, sample_rate, total, delta, accountant=accountant
        )
    if noise_seed is None:
        noise_seed = derive_seed(train_kwargs.get("seed", 0), _NOISE_STREAM)
    hook = DPGradient(max_grad_norm, noise_multiplier, batch_size, noise_seed, chunk_size)
    result = _train(
        model, data, batch_size=batch_size, epochs=epochs, steps=steps, sampling=sampling,
        gradient=hook, **train_kwargs,
    )  # fmt: skip
    result.privacy = dict(
        epsilon=epsilon(noise_multiplier, sample_rate, result.steps, delta, accountant=accountant),
        delta=delta, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        sample_rate=sample_rate, steps=result.steps, accountant=accountant, sampling=sampling,
        noise_seed=noise_seed, target_epsilon=target_epsilon,
    )  # fmt: skip
    return result
