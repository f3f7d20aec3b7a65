"""Ensembles: K small models of one architecture trained at once, as stacked parameters under vmap.

The K models' parameters are stacked (name -> [K, *shape]) and their losses evaluated by one
``vmap``-ed ``functional_call``; one optimizer over the stacked parameters is K independent ones
(Adam and SGD act elementwise), so a step of the ensemble is a step of every model. Two recipes
share that loop (:func:`_descend`):

- :func:`fit_ensemble`: models built from scratch by ``model_fn``, model k on its own subset of
  the data (``masks[k]``), minibatches in its own seeded order. Everything random about model k
  (subset, initialization, batch order, ``nn.Dropout`` masks) is seeded by ``(seed, id_k)``, so
  its run does not depend on the models trained beside it. Used for memorization estimates,
  membership-inference shadows and retrained references.
- :func:`fit_weighted`: K copies of one model from one start, full batch, copy k minimizing
  ``sum_i weights[k, i] l_i`` (0/1 weights for subsets, any value for upweighting). Used for
  leave-one-out and LDS references and LiRA shadows.

Data is read as the recipe needs it: :func:`fit_ensemble` gathers each step's examples by
position (``influx.data.iter_ordered_batches``, each example read once per step however many
models take it), :meth:`Ensemble.correct` streams the data once, and :func:`fit_weighted`
holds the set whole, since every one of its steps reads every example.
"""

from __future__ import annotations

import copy
import functools
import itertools
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from influx.checks import check_choice, check_integer, check_number
from influx.data import LossFn, as_tensors, iter_batches, iter_ordered_batches, num_examples
from influx.errors import InfluxValueError
from influx.grads.common import refuse_batchnorm
from influx.seeds import derive_seed

__all__ = ["Ensemble", "fit_ensemble", "fit_weighted", "subset_masks"]

# Purposes of the derived seeds: each model's subset, initialization, batch order and nn.Dropout
# masks draw from their own streams, so a model's run depends only on (seed, model index), never
# on the chunk. _SHARED seeds the one stream that vmap draws any other randomness of a chunk from.
_MASK, _INIT, _ORDER, _DROPOUT, _SHARED = 0, 1, 2, 3, 4
_OPTIMIZERS = ("adam", "sgd")
_PACKAGE = str(Path(__file__).resolve().parent)


def subset_masks(n: int, model_ids: Sequence[int], subset_frac: float, seed: int) -> torch.Tensor:
    """Inclusion masks [K, n] (bool, CPU): model m holds ``round(subset_frac * n)`` examples drawn
    without replacement by a generator seeded from (seed, m)."""
    size = round(subset_frac * n)
    masks = torch.zeros(len(model_ids), n, dtype=torch.bool, device="cpu")
    for row, model_id in enumerate(model_ids):
        generator = torch.Generator().manual_seed(derive_seed(seed, model_id, _MASK))
        masks[row, torch.randperm(n, generator=generator, device="cpu")[:size]] = True
    return masks


@dataclass
class Ensemble:
    """K models of one architecture as stacked parameters: ``params`` / ``buffers`` name ->
    [K, *shape], evaluated through ``module`` (a template whose own tensors are never used)."""

    module: nn.Module
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]

    @property
    def size(self) -> int:
        return next(iter(self.params.values())).shape[0]

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
        """Eval-mode outputs of every model on ``inputs`` [B, ...]: [K, B, C]."""
        was_training = self.module.training
        self.module.eval()

        def forward(params, buffers, x):
            return functional_call(self.module, (params, buffers), (x,))

        try:
            device = next(iter(self.params.values())).device
            parts = [
                vmap(forward, in_dims=(0, 0, None))(self.params, self.buffers, x.to(device))
                for x in inputs.split(batch_size)
            ]
        finally:
            self.module.train(was_training)
        return torch.cat(parts, dim=1)

    def correct(self, data, *, batch_size: int = 1024) -> torch.Tensor:
        """[K, N] bool: whether model k's argmax matches the target of each example of ``data``
        (streamed: each example is read once)."""
        parts = []
        for inputs, targets, _ in iter_batches(data, batch_size):
            check_class_targets(targets, "data")
            logits = self.logits(inputs, batch_size=batch_size)
            parts.append(logits.argmax(-1) == targets.to(logits.device))
        if not parts:
            raise InfluxValueError("the data is empty: pass at least one example")
        return torch.cat(parts, dim=1)

    def model(self, k: int) -> nn.Module:
        """A standalone copy of model k."""
        single = copy.deepcopy(self.module)
        state = {n: t[k] for n, t in {**self.params, **self.buffers}.items()}
        single.load_state_dict(state)
        return single


def check_class_targets(targets: torch.Tensor, what: str) -> None:
    """Correctness is argmax == target: one integer class per example."""
    if targets.dim() != 1 or targets.is_floating_point() or targets.is_complex():
        raise InfluxValueError(
            f"{what} targets must be integer class indices [N] (correctness compares them with "
            f"the argmax); got {targets.dtype} of shape {tuple(targets.shape)}: pass "
            "targets.long() (or one_hot.argmax(1))"
        )


def check_training_args(epochs, lr, batch_size, optimizer) -> tuple[int, int]:
    """``(epochs, batch_size)`` as ints, once the training settings are checked."""
    epochs = check_integer("epochs", epochs, minimum=1)
    check_number("lr", lr, above=0)
    batch_size = check_integer("batch_size", batch_size, minimum=1)
    check_choice("optimizer", optimizer, _OPTIMIZERS)
    return epochs, batch_size


def _optimizer(name: str, stacked: Iterable[torch.Tensor], lr: float, weight_decay: float):
    # Elementwise optimizers only: one over the stacked parameters is K independent ones.
    if name == "adam":
        return torch.optim.Adam(stacked, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(stacked, lr=lr, weight_decay=weight_decay)


def _descend(optimizer: torch.optim.Optimizer, objectives: Iterable[Callable[[], torch.Tensor]]):
    """The ensemble's loop: each objective gives the K models' losses [K] of one step; their sum
    has model k's gradient in model k's slice of the stacked parameters."""
    for objective in objectives:
        optimizer.zero_grad(set_to_none=True)
        objective().sum().backward()
        optimizer.step()


def _caller_outside_influx() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside influx."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def _build_models(model_fn: Callable[[], nn.Module], model_ids, seed: int, device) -> list:
    models = []
    cuda = [device] if torch.device(device).type == "cuda" else []
    for model_id in model_ids:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(derive_seed(seed, model_id, _INIT))
            model = model_fn()
        if not isinstance(model, nn.Module):
            raise InfluxValueError(f"model_fn must return an nn.Module; got {type(model).__name__}")
        models.append(model.to(device).train())
    # Batch statistics mix the examples of a batch (and cannot update under vmap).
    refuse_batchnorm(models[0], trains="ensemble training")
    return models


class _SeededDropout(nn.Module):
    """``nn.Dropout`` whose keep-mask comes from the buffer ``noise`` (uniform on [0, 1), one
    number per element of every call in a forward), filled outside vmap from each model's own
    generator: under ``vmap(randomness="different")`` a dropout's draws for model k would come
    from one stream shared by the chunk, and so depend on which models train beside it."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.used = 0  # noise read so far in this forward (a module may be called repeatedly)
        self.register_buffer("noise", torch.zeros(0, device="cpu"), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        start, self.used = self.used, self.used + x.numel()
        keep = self.noise[start : self.used].view(x.shape) >= self.p
        return x * keep * (0.0 if self.p == 1 else 1.0 / (1.0 - self.p))


def _with_seeded_dropout(model: nn.Module) -> tuple[nn.Module, dict[str, _SeededDropout]]:
    """A copy of ``model`` with every ``nn.Dropout`` replaced by a :class:`_SeededDropout`."""
    copied = copy.deepcopy(model)
    seeded = {}
    for name, module in list(copied.named_modules()):
        if name and type(module) is nn.Dropout:
            parent, _, child = name.rpartition(".")
            seeded[name] = _SeededDropout(module.p)
            setattr(copied.get_submodule(parent), child, seeded[name])
    return copied, seeded


def _noise_sizes(trainer, seeded, state, inputs) -> list[int]:
    """How many noise numbers each seeded dropout reads in one model's forward of ``inputs``
    (counted in an eval-mode forward, where dropout is the identity)."""
    if not seeded:
        return []
    counts = dict.fromkeys(seeded, 0)

    def counter(name: str):
        def count(module, args):
            counts[name] += args[0].numel()

        return count

    hooks = [module.register_forward_pre_hook(counter(name)) for name, module in seeded.items()]
    was_training = trainer.training
    try:
        with torch.no_grad():
            functional_call(trainer.eval(), state, (inputs,))
    finally:
        trainer.train(was_training)
        for hook in hooks:
            hook.remove()
    return list(counts.values())


def _draws_elsewhere(trainer, seeded, state, inputs, cuda) -> bool:
    """Whether the train-mode forward still draws random numbers (F.dropout in a forward,
    attention dropout, noise layers): two forwards under different global seeds disagree."""
    noise = {
        f"{name}.noise": torch.ones(size, device=inputs.device)
        for name, size in zip(seeded, _noise_sizes(trainer, seeded, state, inputs))
    }
    outputs = []
    for global_seed in (1, 2):
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(global_seed)
            for module in seeded.values():
                module.used = 0
            output = functional_call(trainer, {**state, **noise}, (inputs,))
            outputs.append(output if isinstance(output, (tuple, list)) else (output,))
    return not all(torch.equal(a, b) for a, b in zip(*outputs))


class _Gather:
    """The examples at positions [K, b] (one row per model) as inputs [K, b, ...] and targets
    [K, b] on ``device``. A tuple is indexed in memory; a Dataset or DataLoader is read through
    an index sampler, each distinct position once per call."""

    def __init__(self, data, device: torch.device):
        self.data, self.device = data, device
        self.whole = None
        if isinstance(data, (tuple, list)):
            inputs, targets, _ = as_tensors(data)
            self.whole = inputs.to(device), targets.to(device)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.whole is not None:
            inputs, targets = self.whole
            return inputs[positions], targets[positions]
        unique, inverse = positions.cpu().unique(return_inverse=True)
        # A DataLoader draws its base seed from the global generator: leave that stream alone.
        with torch.random.fork_rng(devices=[]):
            inputs, targets, _ = next(iter_ordered_batches(self.data, unique, unique.numel()))
        inverse = inverse.to(self.device)
        return inputs.to(self.device)[inverse], targets.to(self.device)[inverse]


def _data_device(data) -> torch.device:
    """Where a tuple's tensors live (a Dataset's examples are read to the CPU)."""
    if isinstance(data, (tuple, list)) and isinstance(data[0], torch.Tensor):
        return data[0].device
    return torch.device("cpu")


def fit_ensemble(
    model_fn: Callable[[], nn.Module],
    loss_fn: LossFn,
    train,
    masks: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    model_ids: Sequence[int] | None = None,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    device: str | torch.device | None = None,
) -> Ensemble:
    """Train K models at once, model k on the examples of ``train`` where ``masks[k]`` [N] is
    True; ``loss_fn(outputs, targets)`` gives per-example losses (e.g.
    ``influx.train.cross_entropy_per_example``).

    Model k (``model_ids[k]``, default k) is initialized by ``model_fn()`` under a seed derived
    from (seed, id) and visits its own subset in a fresh seeded order each epoch, in minibatches
    of ``batch_size``, minimizing the mean loss of the batch with Adam (or SGD). All K forward and
    backward passes are one ``vmap``-ed ``functional_call``; one optimizer over the stacked
    parameters is K independent ones (Adam and SGD act elementwise). Every subset must have the
    same size (the steps of all models line up). A Dataset is read by position, each step's
    examples once.

    The masks of ``nn.Dropout`` modules come from a CPU generator of model k's own, seeded from
    (seed, id): model k's run is the same whichever models train beside it (any chunk size).
    Other random draws in the forward (``F.dropout`` called in a ``forward``, attention dropout,
    noise layers) come from one stream seeded by (seed, first id) and shared by the K models;
    they are reproducible for the same ``model_ids`` only, and a warning says so.
    """
    epochs, batch_size = check_training_args(epochs, lr, batch_size, optimizer)
    n = num_examples(train)
    masks = torch.as_tensor(masks, dtype=torch.bool, device="cpu")
    if masks.dim() != 2 or masks.shape[1] != n:
        raise InfluxValueError(
            f"masks must be [K, N] with N = {n} examples; got {tuple(masks.shape)}"
        )
    sizes = masks.sum(1)
    if (sizes != sizes[0]).any() or sizes[0] == 0:
        raise InfluxValueError(
            f"every subset must hold the same, positive number of examples; got sizes "
            f"{sorted(set(sizes.tolist()))}"
        )
    model_ids = list(range(masks.shape[0])) if model_ids is None else list(model_ids)
    device = torch.device(device) if device is not None else _data_device(train)
    models = _build_models(model_fn, model_ids, seed, device)
    params, buffers = stack_module_state(models)
    template = copy.deepcopy(models[0])
    trainer, seeded = _with_seeded_dropout(models[0])
    gather = _Gather(train, device)
    # [K, m] dataset positions of each model's subset.
    subsets = torch.stack([row.nonzero().flatten() for row in masks]).to(device)
    opt = _optimizer(optimizer, list(params.values()), lr, weight_decay)
    cuda = [device] if device.type == "cuda" else []
    first_model = {n: t[0].detach() for n, t in {**params, **buffers}.items()}
    first_inputs, _ = gather(subsets[:1, :batch_size])
    if _draws_elsewhere(trainer, seeded, first_model, first_inputs[0], cuda):
        warnings.warn(
            "model_fn's model draws random numbers outside nn.Dropout modules (F.dropout in a "
            "forward, attention dropout, a noise layer): vmap draws those for all models of a "
            "chunk from one stream, so model m's run depends on the models trained beside it "
            "(it is reproducible for the same seed and chunk size). Use nn.Dropout modules, "
            "whose masks are seeded per model, for results independent of the chunk size.",
            stacklevel=_caller_outside_influx(),
        )
    generators = [
        torch.Generator(device="cpu").manual_seed(derive_seed(seed, m, _DROPOUT)) for m in model_ids
    ]
    noise_sizes: dict[int, list[int]] = {}

    def dropout_noise(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        # Each model's masks from its own generator (CPU, float32: the same masks on every
        # device and in every dtype), [K, numbers read per forward] for each module.
        if batch.shape[0] not in noise_sizes:
            noise_sizes[batch.shape[0]] = _noise_sizes(trainer, seeded, first_model, batch)
        for module in seeded.values():
            module.used = 0
        return {
            f"{name}.noise": torch.stack([
                torch.rand(size, generator=g, dtype=torch.float32, device="cpu")
                for g in generators
            ]).to(device)
            for name, size in zip(seeded, noise_sizes[batch.shape[0]])
        }  # fmt: skip

    def batch_loss(p, b, x, y):
        return loss_fn(functional_call(trainer, (p, b), (x,)), y).mean()

    batched_loss = vmap(batch_loss, randomness="different")

    def steps():
        for epoch in range(epochs):
            orders = torch.stack([
                torch.randperm(
                    subsets.shape[1],
                    generator=torch.Generator().manual_seed(derive_seed(seed, m, _ORDER, epoch)),
                )
                for m in model_ids
            ]).to(device)  # fmt: skip
            visits = subsets.gather(1, orders)
            for start in range(0, visits.shape[1], batch_size):
                # [K, b] positions; every model takes a batch of the same size.
                yield visits[:, start : start + batch_size]

    def objective(positions: torch.Tensor):
        inputs, targets = gather(positions)
        noise = dropout_noise(inputs[0])
        return lambda: batched_loss(params, {**buffers, **noise}, inputs, targets)

    with torch.random.fork_rng(devices=cuda):
        # Only random draws outside nn.Dropout (warned above) come from here.
        torch.manual_seed(derive_seed(seed, model_ids[0], _SHARED))
        _descend(opt, (objective(positions) for positions in steps()))
    params = {name: p.detach() for name, p in params.items()}
    return Ensemble(template, params, buffers)


def fit_weighted(
    model: nn.Module,
    loss_fn: LossFn,
    data,
    weights: torch.Tensor,
    *,
    init: Mapping[str, torch.Tensor] | None = None,
    steps: int,
    lr: float,
    chunk: int = 32,
) -> dict[str, torch.Tensor]:
    """Train K copies of ``model`` by full-batch Adam, copy k on ``sum_i weights[k, i] l_i``.

    ``weights`` [K, N] (0/1 for subsets, any value for upweighting); ``init`` the starting
    parameters (default: the model's); the model's buffers are shared by the copies. The copies
    are stacked and their losses ``vmap``-ed, ``chunk`` copies at a time. ``data`` is held whole
    (every step reads every example). Returns name -> [K, *shape].
    """
    inputs, targets, _ = as_tensors(data)
    start = {n: (init[n] if init is not None else p).detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def objective(params, w):
        losses = loss_fn(functional_call(model, {**params, **buffers}, (inputs,)), targets)
        return (losses * w).sum()

    batched_objective = vmap(objective)
    results: dict[str, list[torch.Tensor]] = {n: [] for n in start}
    for block in weights.split(chunk):
        stacked = {
            n: p.unsqueeze(0).repeat(block.shape[0], *([1] * p.dim())).requires_grad_()
            for n, p in start.items()
        }
        optimizer = _optimizer("adam", stacked.values(), lr, 0.0)
        _descend(
            optimizer, itertools.repeat(functools.partial(batched_objective, stacked, block), steps)
        )
        for n, p in stacked.items():
            results[n].append(p.detach())
    return {n: torch.cat(parts) for n, parts in results.items()}
