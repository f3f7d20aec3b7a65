"""Memorization: the Feldman–Zhang subsampled estimator over vmapped model ensembles, and proxies.

Feldman & Zhang (2020) define the memorization of training example i by an algorithm A as

    mem(i) = P[h_S(x_i) = y_i | i in S] - P[h_S(x_i) = y_i | i not in S]

over random subsets S of the training set (here a fixed fraction ``subset_frac``, 70% by
default). With M models, each trained on its own seeded subset, the estimate is the difference of
two sample means of the 0/1 correctness of example i: over the models whose subset holds i ("in")
and over the others ("out"). Its standard error is the unpooled (Welch) two-sample one,

    stderr(i) = sqrt(s_in^2 / n_in + s_out^2 / n_out)

with s^2 the sample variances (ddof = 1) and n_in, n_out the model counts. The same runs give the
influence of train example i on test example j (Feldman & Zhang's infl(i, j)): the difference of
the mean correctness on j between models trained with and without i.

:func:`estimate` trains the ensemble (``torch.func.stack_module_state`` + ``functional_call`` +
``vmap``, minibatch Adam, ``chunk`` models at a time), checkpoints each chunk to a folder, resumes,
and splits chunks over torchrun ranks; :func:`merge` combines the folders exactly.
:func:`from_runs` is the estimator on inclusion masks and correctness made elsewhere.

Proxies (one call each, [N], aligned to the dataset): :func:`self_influence`,
:func:`tracin_self_influence`, :func:`confidence` (mean true-class probability over training,
as in the C-score work), :func:`cumulative_loss` (Ravikumar et al. 2025), :func:`curvature`
(input-loss curvature, Garg et al. 2023), :func:`final_loss` and :func:`margin`. The training-time
ones read a :class:`TrainingRecord` (:func:`record` on checkpoints, or :func:`train_and_record`).
:func:`compare` correlates each proxy with the estimate.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from influx import train as training
from influx.checks import check_integer, check_number
from influx.data import as_tensors, iter_batches, num_examples
from influx.errors import InfluxRuntimeError, InfluxValueError
from influx.seeds import derive_seed

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "Comparison",
    "Ensemble",
    "MemorizationResult",
    "TrainingRecord",
    "compare",
    "confidence",
    "cumulative_loss",
    "curvature",
    "estimate",
    "final_loss",
    "fit_ensemble",
    "from_runs",
    "margin",
    "merge",
    "record",
    "self_influence",
    "subset_masks",
    "tracin_self_influence",
    "train_and_record",
]

# Purposes of the derived seeds: each model's subset, initialization, batch order and nn.Dropout
# masks draw from their own streams, so a model's run depends only on (seed, model index), never
# on the chunk. _SHARED seeds the one stream that vmap draws any other randomness of a chunk from.
_MASK, _INIT, _ORDER, _DROPOUT, _SHARED = 0, 1, 2, 3, 4


# ---------------------------------------------------------------------------------------------
# The estimator on given runs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorizationResult:
    """Feldman–Zhang memorization of N train examples from M models (all [N], float64, CPU).

    - ``mem`` = ``acc_in - acc_out``; ``stderr`` its Welch standard error (NaN where a side has
      fewer than 2 models); ``n_in`` / ``n_out`` the model counts; ``mem`` is NaN for an example
      that was never in (or never out of) a subset.
    - ``influence`` [N, Q] (with test runs): mean correctness on test example j of the models
      trained with i minus that of the models without i; ``influence_stderr`` [N, Q] likewise.
    - ``complete`` is False when the folder held only part of the requested runs.
    """

    mem: torch.Tensor
    stderr: torch.Tensor
    acc_in: torch.Tensor
    acc_out: torch.Tensor
    n_in: torch.Tensor
    n_out: torch.Tensor
    n_models: int
    influence: torch.Tensor | None = field(default=None, repr=False)
    influence_stderr: torch.Tensor | None = field(default=None, repr=False)
    complete: bool = True
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        finite = self.mem[torch.isfinite(self.mem)]
        mean = finite.mean().item() if finite.numel() else float("nan")
        test = "" if self.influence is None else f", test={self.influence.shape[1]}"
        return (
            f"MemorizationResult(N={self.mem.numel()}, models={self.n_models}, "
            f"mean_mem={mean:.4f}, mean_stderr={self.stderr.nanmean().item():.4f}, "
            f"complete={self.complete}{test})"
        )


def _as_float64(values, name: str) -> torch.Tensor:
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(np.ascontiguousarray(values))
    if not isinstance(values, torch.Tensor):
        raise InfluxValueError(
            f"{name} must be a tensor or numpy array; got {type(values).__name__}"
        )
    return values.detach().to(device="cpu", dtype=torch.float64)


def _difference_of_means(inside: torch.Tensor, values: torch.Tensor):
    """Means over the models with / without each example and the Welch stderr of the difference.

    ``inside`` [M, N] 0/1, ``values`` [M, Q]: returns [N, Q] tensors (diff, stderr, mean_in,
    mean_out) and the counts [N] (n_in, n_out). Sums of squares are uncentred: the values are
    0/1 correctness (or bounded scores) in float64, where the cancellation is harmless.
    """
    outside = 1.0 - inside
    n_in, n_out = inside.sum(0), outside.sum(0)
    sums_in, sums_out = inside.T @ values, outside.T @ values
    squares_in, squares_out = inside.T @ values.square(), outside.T @ values.square()
    # Divisions by a zero count give NaN / inf, replaced below.
    mean_in = sums_in / n_in[:, None]
    mean_out = sums_out / n_out[:, None]
    var_in = (squares_in - n_in[:, None] * mean_in.square()) / (n_in[:, None] - 1)
    var_out = (squares_out - n_out[:, None] * mean_out.square()) / (n_out[:, None] - 1)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device="cpu")
    mean_in = torch.where(n_in[:, None] > 0, mean_in, nan)
    mean_out = torch.where(n_out[:, None] > 0, mean_out, nan)
    enough = (n_in[:, None] > 1) & (n_out[:, None] > 1)
    variance = var_in.clamp_min(0) / n_in[:, None] + var_out.clamp_min(0) / n_out[:, None]
    stderr = torch.where(enough, variance.sqrt(), nan)
    return mean_in - mean_out, stderr, mean_in, mean_out, n_in, n_out


def _check_finite_runs(values: torch.Tensor, name: str, kind: str) -> None:
    """Refuse NaN / inf runs by example: they would turn that example's estimate NaN silently."""
    bad = (~torch.isfinite(values)).any(0).nonzero().flatten()
    if bad.numel():
        raise InfluxValueError(
            f"{name} holds NaN/inf for {kind} examples {bad[:10].tolist()}"
            f"{' ...' if bad.numel() > 10 else ''}; pass finite correctness"
        )


def from_runs(masks, correct, *, test_correct=None, config=None) -> MemorizationResult:
    """Feldman–Zhang memorization from runs made anywhere.

    ``masks`` [M, N]: 1 where model m's training subset holds example i; ``correct`` [M, N]:
    whether model m classifies train example i correctly (0/1, or any bounded score, e.g. the
    true-class probability); ``test_correct`` [M, Q] (optional) the same on Q test examples, for
    the influence matrix [N, Q]. Tensors or numpy arrays. An example never in (or never out of) a
    subset gets ``mem`` NaN, with a warning that says how many: never a silent 0.
    """
    inside, values = _as_float64(masks, "masks"), _as_float64(correct, "correct")
    if inside.dim() != 2 or inside.shape != values.shape:
        raise InfluxValueError(
            f"masks and correct must both be [models, N] of one shape; got {tuple(inside.shape)} "
            f"and {tuple(values.shape)}"
        )
    if inside.shape[0] == 0:
        raise InfluxValueError("masks holds no models: pass at least one run")
    if not ((inside == 0) | (inside == 1)).all():
        raise InfluxValueError("masks must hold 0/1 (or booleans): 1 where a subset holds i")
    _check_finite_runs(values, "correct", "train")
    # Diagonal of the [N, N] problem without forming it: example i against its own column.
    n_in, n_out = inside.sum(0), (1 - inside).sum(0)
    mean_in = (inside * values).sum(0) / n_in
    mean_out = ((1 - inside) * values).sum(0) / n_out
    var_in = (inside * (values - mean_in).square()).sum(0) / (n_in - 1)
    var_out = ((1 - inside) * (values - mean_out).square()).sum(0) / (n_out - 1)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device="cpu")
    mean_in = torch.where(n_in > 0, mean_in, nan)
    mean_out = torch.where(n_out > 0, mean_out, nan)
    stderr = torch.where(
        (n_in > 1) & (n_out > 1), (var_in / n_in + var_out / n_out).clamp_min(0).sqrt(), nan
    )
    one_sided = int(((n_in == 0) | (n_out == 0)).sum())
    if one_sided:
        warnings.warn(
            f"{one_sided} of {inside.shape[1]} examples were never in (or never out of) a "
            "training subset: their mem is NaN. Train more models or use subset_frac further "
            "from 0 and 1.",
            stacklevel=2,
        )
    influence = influence_stderr = None
    if test_correct is not None:
        tests = _as_float64(test_correct, "test_correct")
        if tests.dim() != 2 or tests.shape[0] != inside.shape[0]:
            raise InfluxValueError(
                f"test_correct must be [models, Q] with {inside.shape[0]} models; "
                f"got {tuple(tests.shape)}"
            )
        _check_finite_runs(tests, "test_correct", "test")
        influence, influence_stderr, *_ = _difference_of_means(inside, tests)
    return MemorizationResult(
        mem=mean_in - mean_out,
        stderr=stderr,
        acc_in=mean_in,
        acc_out=mean_out,
        n_in=n_in,
        n_out=n_out,
        n_models=inside.shape[0],
        influence=influence,
        influence_stderr=influence_stderr,
        config=dict(config or {}),
    )


# ---------------------------------------------------------------------------------------------
# Vmapped ensembles
# ---------------------------------------------------------------------------------------------


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
        """[K, N] bool: whether model k's argmax matches the target of each example of ``data``."""
        inputs, targets, _ = as_tensors(data)
        _check_class_targets(targets, "data")
        logits = self.logits(inputs, batch_size=batch_size)
        return logits.argmax(-1) == targets.to(logits.device)

    def model(self, k: int) -> nn.Module:
        """A standalone copy of model k."""
        single = copy.deepcopy(self.module)
        state = {n: t[k] for n, t in {**self.params, **self.buffers}.items()}
        single.load_state_dict(state)
        return single


def _check_class_targets(targets: torch.Tensor, what: str) -> None:
    # Correctness is argmax == target: one integer class per example.
    if targets.dim() != 1 or targets.is_floating_point() or targets.is_complex():
        raise InfluxValueError(
            f"{what} targets must be integer class indices [N] (correctness compares them with "
            f"the argmax); got {targets.dtype} of shape {tuple(targets.shape)}: pass "
            "targets.long() (or one_hot.argmax(1))"
        )


def _check_training_args(epochs, lr, batch_size, optimizer) -> tuple[int, int]:
    """``(epochs, batch_size)`` as ints, once the training settings are checked."""
    epochs = check_integer("epochs", epochs, minimum=1)
    check_number("lr", lr, above=0)
    batch_size = check_integer("batch_size", batch_size, minimum=1)
    if optimizer not in ("adam", "sgd"):
        raise InfluxValueError(f"optimizer must be 'adam' or 'sgd'; got {optimizer!r}")
    return epochs, batch_size


def _refuse_train_batchnorm(model: nn.Module) -> None:
    # Batch statistics mix the examples of a batch (and cannot update under vmap).
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise InfluxValueError(
                f"model_fn builds {type(module).__name__} ({name}): BatchNorm mixes the examples "
                "of a batch; call influx.models.convert_batchnorm(model) inside model_fn"
            )


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
    _refuse_train_batchnorm(models[0])
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


def fit_ensemble(
    model_fn: Callable[[], nn.Module],
    train,
    masks: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    model_ids: Sequence[int] | None = None,
    loss_fn: LossFn = training.cross_entropy_per_example,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    device: str | torch.device | None = None,
) -> Ensemble:
    """Train K models at once, model k on the examples where ``masks[k]`` [N] is True.

    Model k (``model_ids[k]``, default k) is initialized by ``model_fn()`` under a seed derived
    from (seed, id) and visits its own subset in a fresh seeded order each epoch, in minibatches
    of ``batch_size``, minimizing the mean loss of the batch with Adam (or SGD). All K forward and
    backward passes are one ``vmap``-ed ``functional_call``; one optimizer over the stacked
    parameters is K independent ones (Adam and SGD act elementwise). Every subset must have the
    same size (the steps of all models line up).

    The masks of ``nn.Dropout`` modules come from a CPU generator of model k's own, seeded from
    (seed, id): model k's run is the same whichever models train beside it (any chunk size).
    Other random draws in the forward (``F.dropout`` called in a ``forward``, attention dropout,
    noise layers) come from one stream seeded by (seed, first id) and shared by the K models;
    they are reproducible for the same ``model_ids`` only, and a warning says so.
    """
    return _fit_ensemble(
        model_fn, train, masks, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
        model_ids=model_ids, loss_fn=loss_fn, optimizer=optimizer, weight_decay=weight_decay,
        device=device,
    )  # fmt: skip


def _fit_ensemble(
    model_fn, train, masks, *, epochs, lr, batch_size, seed, model_ids, loss_fn, optimizer,
    weight_decay, device,
) -> Ensemble:  # fmt: skip
    epochs, batch_size = _check_training_args(epochs, lr, batch_size, optimizer)
    inputs, targets, _ = as_tensors(train)
    masks = torch.as_tensor(masks, dtype=torch.bool, device="cpu")
    if masks.dim() != 2 or masks.shape[1] != inputs.shape[0]:
        raise InfluxValueError(
            f"masks must be [K, N] with N = {inputs.shape[0]} examples; got {tuple(masks.shape)}"
        )
    sizes = masks.sum(1)
    if (sizes != sizes[0]).any() or sizes[0] == 0:
        raise InfluxValueError(
            f"every subset must hold the same, positive number of examples; got sizes "
            f"{sorted(set(sizes.tolist()))}"
        )
    model_ids = list(range(masks.shape[0])) if model_ids is None else list(model_ids)
    device = torch.device(device) if device is not None else inputs.device
    models = _build_models(model_fn, model_ids, seed, device)
    params, buffers = stack_module_state(models)
    template = copy.deepcopy(models[0])
    trainer, seeded = _with_seeded_dropout(models[0])
    inputs, targets = inputs.to(device), targets.to(device)
    # [K, m] dataset positions of each model's subset.
    subsets = torch.stack([row.nonzero().flatten() for row in masks]).to(device)
    trainable = list(params.values())
    opt = (
        torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
        if optimizer == "adam"
        else torch.optim.SGD(trainable, lr=lr, weight_decay=weight_decay)
    )
    cuda = [device] if device.type == "cuda" else []
    first_model = {n: t[0].detach() for n, t in {**params, **buffers}.items()}
    first_batch = inputs[subsets[0, :batch_size]]
    if _draws_elsewhere(trainer, seeded, first_model, first_batch, cuda):
        # stacklevel 3: the user's call of fit_ensemble() or estimate().
        warnings.warn(
            "model_fn's model draws random numbers outside nn.Dropout modules (F.dropout in a "
            "forward, attention dropout, a noise layer): vmap draws those for all models of a "
            "chunk from one stream, so model m's run depends on the models trained beside it "
            "(it is reproducible for the same seed and chunk size). Use nn.Dropout modules, "
            "whose masks are seeded per model, for results independent of the chunk size.",
            stacklevel=3,
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
    with torch.random.fork_rng(devices=cuda):
        # Only random draws outside nn.Dropout (warned above) come from here.
        torch.manual_seed(derive_seed(seed, model_ids[0], _SHARED))
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
                positions = visits[:, start : start + batch_size]
                opt.zero_grad(set_to_none=True)
                noise = dropout_noise(inputs[positions[0]])
                losses = batched_loss(
                    params, {**buffers, **noise}, inputs[positions], targets[positions]
                )
                losses.sum().backward()
                opt.step()
    params = {name: p.detach() for name, p in params.items()}
    return Ensemble(template, params, buffers)


# ---------------------------------------------------------------------------------------------
# The checkpointed, resumable, splittable estimator
# ---------------------------------------------------------------------------------------------

_META = "meta.json"


def _chunk_files(folder: Path, index: int, with_test: bool) -> dict[str, Path]:
    stem = f"chunk-{index:05d}"
    files = {"masks": folder / f"{stem}.masks.npy", "correct": folder / f"{stem}.correct.npy"}
    if with_test:
        files["test"] = folder / f"{stem}.test.npy"
    return files


def _atomic_save(path: Path, array: np.ndarray) -> None:
    # Written beside the target and renamed: a reader never sees half a file.
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        np.save(handle, array)
    os.replace(temporary, path)


def _chunk_done(files: dict[str, Path]) -> bool:
    return all(path.is_file() for path in files.values())


def _write_meta(folder: Path, meta: dict) -> None:
    path = folder / _META
    if path.is_file():
        found = json.loads(path.read_text())
        if found != meta:
            changed = sorted(k for k in set(found) | set(meta) if found.get(k) != meta.get(k))
            raise InfluxValueError(
                f"{folder} holds runs of a different setup (differs in {changed}); use another "
                "out folder or remove it to start over"
            )
        return
    temporary = path.with_name(f"{_META}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(temporary, path)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None and world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise InfluxValueError("give both rank and world_size, or neither")
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise InfluxValueError(
            f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}"
        )
    return rank, world_size


def estimate(
    model_fn: Callable[[], nn.Module],
    dataset,
    *,
    n_models: int,
    subset_frac: float = 0.7,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    test=None,
    chunk: int = 16,
    out: str | os.PathLike | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    max_chunks: int | None = None,
    loss_fn: LossFn = training.cross_entropy_per_example,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> MemorizationResult:
    """Feldman–Zhang memorization of every example of ``dataset`` from ``n_models`` models.

    Model m trains (see :func:`fit_ensemble`) on a seeded random subset of
    ``round(subset_frac * N)`` examples; correctness is eval-mode argmax accuracy on each train
    example (and on ``test`` for the influence matrix). Models train ``chunk`` at a time, chunk
    c holding models ``c * chunk ...``. Model m's subset, initialization, batch order and
    ``nn.Dropout`` masks are seeded by (seed, m), so the estimate does not depend on ``chunk``;
    random draws elsewhere in the forward (``F.dropout``, attention dropout) are shared by a
    chunk and make it depend on ``chunk`` (:func:`fit_ensemble` warns). Targets must be integer
    classes.

    ``out``: a folder where every finished chunk saves its masks [K, N] and correctness [K, N]
    (and [K, Q] on ``test``) as .npy files, each written atomically; a rerun with the same
    settings skips finished chunks (resume). ``rank`` / ``world_size`` (default: from
    ``torch.distributed`` when initialized, else 0 / 1) split the chunks: rank r trains chunks
    r, r + W, ...; :func:`merge` of the ranks' folders (or one shared folder) equals a
    single-process run. ``max_chunks`` trains at most that many chunks in this call.

    Returns the estimate over the runs present; ``complete`` says whether all ``n_models`` are.
    """
    n_models = check_integer("n_models", n_models, minimum=2)
    check_number("subset_frac", subset_frac, above=0, below=1)
    seed = check_integer("seed", seed, minimum=0)
    chunk = check_integer("chunk", chunk, minimum=1)
    epochs, batch_size = _check_training_args(epochs, lr, batch_size, optimizer)
    rank, world_size = _rank_and_world(rank, world_size)
    if world_size > 1 and out is None:
        raise InfluxValueError(
            "splitting runs over ranks needs out=<folder>: each rank saves its chunks there, "
            "and memorization.merge(folders) combines them"
        )
    # Read a Dataset once, not once per chunk.
    dataset = as_tensors(dataset)[:2]
    test = None if test is None else as_tensors(test)[:2]
    _check_class_targets(dataset[1], "dataset")
    if test is not None:
        _check_class_targets(test[1], "test")
    n = num_examples(dataset)
    if round(subset_frac * n) in (0, n):
        raise InfluxValueError(
            f"subset_frac={subset_frac} of N={n} gives an empty or full subset; move it inside"
        )
    n_chunks = math.ceil(n_models / chunk)
    mine = list(range(rank, n_chunks, world_size))
    config = dict(
        n_examples=n, n_models=n_models, subset_frac=subset_frac, epochs=epochs, lr=lr,
        batch_size=batch_size, seed=seed, chunk=chunk, optimizer=optimizer,
        weight_decay=weight_decay, n_test=None if test is None else len(test[0]),
    )  # fmt: skip
    folder = None if out is None else Path(out)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        _write_meta(folder, config)
    in_memory: dict[int, dict[str, np.ndarray]] = {}
    trained = 0
    for index in tqdm(mine, desc="memorization chunks", disable=not progress, leave=False):
        files = None if folder is None else _chunk_files(folder, index, test is not None)
        if files is not None and _chunk_done(files):
            continue
        if max_chunks is not None and trained >= max_chunks:
            break
        ids = list(range(index * chunk, min((index + 1) * chunk, n_models)))
        masks = subset_masks(n, ids, subset_frac, seed)
        ensemble = _fit_ensemble(
            model_fn, dataset, masks, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
            model_ids=ids, loss_fn=loss_fn, optimizer=optimizer, weight_decay=weight_decay,
            device=device,
        )  # fmt: skip
        arrays = {"masks": masks.numpy(), "correct": ensemble.correct(dataset).cpu().numpy()}
        if test is not None:
            arrays["test"] = ensemble.correct(test).cpu().numpy()
        if files is None:
            in_memory[index] = arrays
        else:
            # The masks go last: a chunk counts as finished once all its files exist.
            for key in ("test", "correct", "masks"):
                if key in arrays:
                    _atomic_save(files[key], arrays[key])
        trained += 1
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if folder is None:
        chunks = in_memory
    else:
        chunks = _read_chunks([folder], test is not None, n_chunks)
    return _combine(chunks, n_chunks, config)


def _read_chunks(folders: Sequence[Path], with_test: bool, n_chunks: int) -> dict[int, dict]:
    chunks: dict[int, dict[str, np.ndarray]] = {}
    for folder in folders:
        for index in range(n_chunks):
            files = _chunk_files(folder, index, with_test)
            if index not in chunks and _chunk_done(files):
                chunks[index] = {key: np.load(path) for key, path in files.items()}
    return chunks


def _combine(chunks: dict[int, dict], n_chunks: int, config: dict) -> MemorizationResult:
    if not chunks:
        raise InfluxRuntimeError(
            "no finished runs to estimate from: train at least one chunk (max_chunks >= 1, or "
            "this rank owns none of the chunks)"
        )
    order = sorted(chunks)
    missing = sorted(set(range(n_chunks)) - set(order))
    if missing:
        warnings.warn(
            f"{len(order)} of {n_chunks} chunks of runs are present (missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}): the estimate uses those only. Rerun to "
            "resume, or merge the other ranks' folders with memorization.merge.",
            stacklevel=3,
        )
    masks = np.concatenate([chunks[i]["masks"] for i in order])
    correct = np.concatenate([chunks[i]["correct"] for i in order])
    test = (
        np.concatenate([chunks[i]["test"] for i in order]) if "test" in chunks[order[0]] else None
    )
    result = from_runs(masks, correct, test_correct=test, config=config)
    return MemorizationResult(**{**result.__dict__, "complete": not missing})


def merge(folders: Sequence[str | os.PathLike]) -> MemorizationResult:
    """The estimate over the runs saved in ``folders`` (the ranks' ``out`` folders).

    The folders must come from the same setup (their meta.json agree); every chunk must be
    present in one of them. Chunks combine in index order, so the result equals a
    single-process :func:`estimate` with the same settings.
    """
    paths = [Path(f) for f in ([folders] if isinstance(folders, (str, os.PathLike)) else folders)]
    if not paths:
        raise InfluxValueError("merge needs at least one folder")
    metas = []
    for path in paths:
        if not (path / _META).is_file():
            raise InfluxValueError(f"{path} holds no {_META}: not a memorization.estimate folder")
        metas.append(json.loads((path / _META).read_text()))
    if any(meta != metas[0] for meta in metas[1:]):
        raise InfluxValueError(f"the folders {paths} come from different setups; merge one only")
    config = metas[0]
    n_chunks = math.ceil(config["n_models"] / config["chunk"])
    chunks = _read_chunks(paths, config["n_test"] is not None, n_chunks)
    missing = sorted(set(range(n_chunks)) - set(chunks))
    if missing:
        raise InfluxRuntimeError(
            f"chunks {missing[:10]}{' ...' if len(missing) > 10 else ''} of {n_chunks} are in none "
            f"of {[str(p) for p in paths]}: run the ranks that own them (chunk c belongs to rank "
            "c mod world_size) and merge again"
        )
    return _combine(chunks, n_chunks, config)


# ---------------------------------------------------------------------------------------------
# Proxies
# ---------------------------------------------------------------------------------------------


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
        model, train, loss=loss_fn, lr=lr, epochs=epochs, batch_size=batch_size, seed=seed,
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


def margin(model: nn.Module, train, *, batch_size: int = 512) -> torch.Tensor:
    """Logit margin ``f_y(x) - max_{c != y} f_c(x)`` of the trained model, eval mode, [N]
    (low or negative marks memorized examples)."""
    return _outputs(model, training.cross_entropy_per_example, train, batch_size)[2]


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


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------

#: Proxies for which a LOW value marks a memorized example (top-k takes their k smallest).
LOW_MEANS_MEMORIZED = ("confidence", "margin")


@dataclass(frozen=True)
class Comparison:
    """One row per proxy: Spearman and Pearson with the estimate, their bootstrap percentile
    confidence intervals, cosine similarity, the top-k overlap and the examples used."""

    rows: list[dict[str, Any]]
    k: int | None
    n_boot: int
    level: float

    def to_markdown(self) -> str:
        lines = [
            "| proxy | spearman | CI | pearson | CI | cosine | top-k overlap | n |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['proxy']} | {r['spearman']:.3f} | [{r['spearman_ci'][0]:.3f}, "
                f"{r['spearman_ci'][1]:.3f}] | {r['pearson']:.3f} | [{r['pearson_ci'][0]:.3f}, "
                f"{r['pearson_ci'][1]:.3f}] | {r['cosine']:.3f} | {r['topk_overlap']:.3f} | "
                f"{r['n']} |"
            )
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        body = ", ".join(
            f"{r['proxy']}: rho={r['spearman']:.3f} r={r['pearson']:.3f}" for r in self.rows
        )
        return f"Comparison(k={self.k}, n_boot={self.n_boot}, {body})"


def _pearson_along(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson correlation along ``axis`` (vectorized over bootstrap resamples)."""
    x = x - x.mean(axis, keepdims=True)
    y = y - y.mean(axis, keepdims=True)
    return (x * y).sum(axis) / np.sqrt((x * x).sum(axis) * (y * y).sum(axis))


def _spearman_along(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    from scipy import stats

    return _pearson_along(stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis), axis)


def _top_weights(values: np.ndarray, k: int) -> np.ndarray:
    """Membership of each example in the top k of ``values`` [n]: 1 above the k-th largest value,
    and for the examples tied at it, their share of the places left (t tied for r places: r / t
    each), so that the weights sum to k and do not depend on the order of the examples."""
    threshold = np.sort(values)[::-1][k - 1]
    above = values > threshold
    tied = values == threshold
    return above + tied * (k - above.sum()) / tied.sum()


def compare(
    estimate,
    proxies: Mapping[str, Any],
    *,
    k: int | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    low_means_memorized: Sequence[str] = LOW_MEANS_MEMORIZED,
) -> Comparison:
    """Correlate each proxy [N] with the memorization estimate [N] (a :class:`MemorizationResult`
    or an array).

    Spearman and Pearson come from ``scipy.stats``; their ``level`` confidence intervals from a
    seeded paired bootstrap (``scipy.stats.bootstrap``, percentile method, ``n_boot``
    resamples). ``cosine`` is the uncentred cosine similarity (the statistic Ravikumar et al.
    report beside Pearson). ``topk_overlap`` = |top-k of proxy ∩ top-k of mem| / k, default
    k = 10% of the examples; proxies named in ``low_means_memorized`` rank by their smallest
    values. Ties at the k-th value (memorization estimates take few values) share the places
    left: t examples tied for r places each count r / t, and the overlap is
    ``sum_i w_proxy(i) w_mem(i) / k``, the expected overlap when each side's ties are broken at
    random; it does not depend on the order of the examples. Correlations keep their sign.
    Examples where either value is not finite are dropped (``n`` says how many remain).
    """
    from scipy import stats

    mem = estimate.mem if isinstance(estimate, MemorizationResult) else estimate
    mem = _as_float64(mem, "estimate").numpy()
    if not 0 < level < 1:
        raise InfluxValueError(f"level must lie in (0, 1); got {level}")
    if not proxies:
        raise InfluxValueError("proxies is empty: pass {name: scores [N]}")
    rows = []
    for name, values in proxies.items():
        proxy = _as_float64(values, f"proxy {name!r}").numpy()
        if proxy.shape != mem.shape:
            raise InfluxValueError(
                f"proxy {name!r} has shape {proxy.shape}; the estimate has {mem.shape}"
            )
        keep = np.isfinite(proxy) & np.isfinite(mem)
        x, y = proxy[keep], mem[keep]
        if x.size < 3:
            raise InfluxValueError(f"proxy {name!r}: fewer than 3 examples with finite values")
        top = k if k is not None else max(1, round(0.1 * x.size))
        top = min(top, x.size)
        oriented = -x if name in low_means_memorized else x
        overlap = float(_top_weights(oriented, top) @ _top_weights(y, top)) / top
        rng = np.random.default_rng(seed)
        intervals = {}
        for stat, fn in (("spearman", _spearman_along), ("pearson", _pearson_along)):
            boot = stats.bootstrap(
                (x, y), fn, paired=True, vectorized=True, n_resamples=n_boot,
                confidence_level=level, method="percentile", random_state=rng,
            )  # fmt: skip
            intervals[stat] = (
                float(boot.confidence_interval.low),
                float(boot.confidence_interval.high),
            )
        rows.append(
            dict(
                proxy=name,
                spearman=float(stats.spearmanr(x, y).statistic),
                spearman_ci=intervals["spearman"],
                pearson=float(stats.pearsonr(x, y).statistic),
                pearson_ci=intervals["pearson"],
                cosine=float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))),
                topk_overlap=float(overlap),
                k=top,
                n=int(x.size),
            )
        )
    return Comparison(rows, k, n_boot, level)
