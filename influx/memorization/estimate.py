"""The Feldman–Zhang memorization estimator: from runs made anywhere, or from vmapped ensembles.

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

:func:`estimate` trains the models ``chunk`` at a time (``influx.ensembles.fit_ensemble``),
keeps each finished chunk in an ``influx.store.ShardStore`` folder (checksummed, atomic: a rerun
resumes, a damaged chunk is trained again), and splits chunks over ranks
(``influx.distributed``); :func:`merge` combines the ranks' folders exactly. :func:`from_runs`
is the estimator on inclusion masks and correctness made elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from influx import distributed
from influx.checks import check_integer, check_number
from influx.data import LossFn, first_batch, num_examples
from influx.ensembles import check_class_targets, check_training_args, fit_ensemble, subset_masks
from influx.errors import InfluxRuntimeError, InfluxValueError
from influx.store import MANIFEST, ShardStore, sha256_bytes
from influx.train import cross_entropy_per_example

__all__ = ["MemorizationResult", "estimate", "from_runs", "merge"]


def old_argument_order(loss_fn, data, function: str, new_form: str):
    """``(loss_fn, data)`` of a call that follows the argument convention, or of one in the old
    form without a loss (``function(model, data)``: cross-entropy), with a DeprecationWarning."""
    if data is not None or callable(loss_fn):
        if data is None:
            raise InfluxValueError(f"{function}() needs the data after loss_fn: {new_form}")
        return loss_fn, data
    warnings.warn(
        f"{function}() without loss_fn is deprecated: call {new_form} (model, loss_fn, data: "
        "the argument order of every influx function)",
        DeprecationWarning,
        stacklevel=3,
    )
    return cross_entropy_per_example, loss_fn


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
# The checkpointed, resumable, splittable estimator
# ---------------------------------------------------------------------------------------------

# Named in the fingerprint, so that merge() knows a memorization folder from any other store.
_KIND = "influx.memorization.estimate"


def _fingerprint(config: dict) -> str:
    return sha256_bytes(json.dumps({"kind": _KIND, **config}, sort_keys=True).encode())


def _chunk_names(index: int, with_test: bool) -> dict[str, str]:
    stem = f"chunk-{index:05d}"
    names = {"masks": f"{stem}.masks.npy", "correct": f"{stem}.correct.npy"}
    if with_test:
        names["test"] = f"{stem}.test.npy"
    return names


def _save_chunk(store: ShardStore, index: int, arrays: dict[str, np.ndarray]) -> None:
    names = _chunk_names(index, "test" in arrays)
    # The masks go last: a chunk counts as finished once the masks' checksum is recorded.
    for key in ("test", "correct", "masks"):
        if key in arrays:
            store.write(names[key], arrays[key])


def _load_chunk(store: ShardStore, index: int, with_test: bool) -> dict[str, np.ndarray] | None:
    """A finished chunk's arrays; None when it is unfinished, or damaged (then removed, to be
    trained again). An unfinished chunk is left alone: another rank may be writing it."""
    names = _chunk_names(index, with_test)
    if store.checksum(names["masks"]) is None:
        return None
    arrays = {key: store.read(name) for key, name in names.items()}
    return None if any(a is None for a in arrays.values()) else arrays


def _open_store(folder: Path, config: dict, rank: int, world_size: int) -> ShardStore:
    """Open the chunk store in ``folder``. Under a process group rank 0 opens it first, and no
    rank writes before every rank has opened it (opening clears a killed writer's temporary
    files); without one the barriers are no-ops."""
    if world_size > 1 and rank != 0:
        distributed.barrier()
    store = ShardStore.open(folder, _fingerprint(config), config)
    if world_size > 1:
        if rank == 0:
            distributed.barrier()
        distributed.barrier()
    return store


def estimate(
    model_fn: Callable[[], nn.Module],
    loss_fn: LossFn,
    train=None,
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
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> MemorizationResult:
    """Feldman–Zhang memorization of every example of ``train`` from ``n_models`` models trained
    from scratch by ``model_fn`` on ``loss_fn`` (e.g. ``influx.train.cross_entropy_per_example``;
    the old form ``estimate(model_fn, train, ...)`` trains on cross-entropy and is deprecated).

    Model m trains (see ``influx.ensembles.fit_ensemble``) on a seeded random subset of
    ``round(subset_frac * N)`` examples; correctness is eval-mode argmax accuracy on each train
    example (and on ``test`` for the influence matrix). Models train ``chunk`` at a time, chunk
    c holding models ``c * chunk ...``. Model m's subset, initialization, batch order and
    ``nn.Dropout`` masks are seeded by (seed, m), so the estimate does not depend on ``chunk``;
    random draws elsewhere in the forward (``F.dropout``, attention dropout) are shared by a
    chunk and make it depend on ``chunk`` (``fit_ensemble`` warns). Targets must be integer
    classes. A Dataset is read by position (each chunk reads the examples of its subsets) and
    streamed for correctness; it is never held whole.

    ``out``: a folder (an ``influx.store.ShardStore``) where every finished chunk saves its
    masks [K, N] and correctness [K, N] (and [K, Q] on ``test``) as checksummed .npy shards,
    each written atomically; a rerun with the same settings skips finished chunks (resume) and
    trains a damaged one again. ``rank`` / ``world_size`` (default: from ``torch.distributed``
    when initialized, else 0 / 1) split the chunks: rank r trains chunks r, r + W, ...;
    :func:`merge` of the ranks' folders (or one shared folder under torchrun) equals a
    single-process run. Ranks without a process group write to folders of their own.
    ``max_chunks`` trains at most that many chunks in this call.

    Returns the estimate over the runs present; ``complete`` says whether all ``n_models`` are.
    """
    loss_fn, train = old_argument_order(
        loss_fn, train, "memorization.estimate", "estimate(model_fn, loss_fn, train, ...)"
    )
    n_models = check_integer("n_models", n_models, minimum=2)
    check_number("subset_frac", subset_frac, above=0, below=1)
    seed = check_integer("seed", seed, minimum=0)
    chunk = check_integer("chunk", chunk, minimum=1)
    epochs, batch_size = check_training_args(epochs, lr, batch_size, optimizer)
    rank, world_size = distributed.rank_and_world(rank, world_size)
    if world_size > 1 and out is None:
        raise InfluxValueError(
            "splitting runs over ranks needs out=<folder>: each rank saves its chunks there, "
            "and memorization.merge(folders) combines them"
        )
    check_class_targets(first_batch(train, 1)[1], "dataset")
    if test is not None:
        check_class_targets(first_batch(test, 1)[1], "test")
    n = num_examples(train)
    if round(subset_frac * n) in (0, n):
        raise InfluxValueError(
            f"subset_frac={subset_frac} of N={n} gives an empty or full subset; move it inside"
        )
    n_chunks = math.ceil(n_models / chunk)
    mine = distributed.my_items(range(n_chunks), distributed.Context(rank, world_size))
    config = dict(
        n_examples=n, n_models=n_models, subset_frac=subset_frac, epochs=epochs, lr=lr,
        batch_size=batch_size, seed=seed, chunk=chunk, optimizer=optimizer,
        weight_decay=weight_decay, n_test=None if test is None else num_examples(test),
    )  # fmt: skip
    store = None if out is None else _open_store(Path(out), config, rank, world_size)
    in_memory: dict[int, dict[str, np.ndarray]] = {}
    trained = 0
    for index in tqdm(mine, desc="memorization chunks", disable=not progress, leave=False):
        if store is not None and _load_chunk(store, index, test is not None) is not None:
            continue
        if max_chunks is not None and trained >= max_chunks:
            break
        ids = list(range(index * chunk, min((index + 1) * chunk, n_models)))
        masks = subset_masks(n, ids, subset_frac, seed)
        ensemble = fit_ensemble(
            model_fn, loss_fn, train, masks, epochs=epochs, lr=lr, batch_size=batch_size,
            seed=seed, model_ids=ids, optimizer=optimizer, weight_decay=weight_decay,
            device=device,
        )  # fmt: skip
        arrays = {"masks": masks.numpy(), "correct": ensemble.correct(train).cpu().numpy()}
        if test is not None:
            arrays["test"] = ensemble.correct(test).cpu().numpy()
        if store is None:
            in_memory[index] = arrays
        else:
            _save_chunk(store, index, arrays)
        trained += 1
    if world_size > 1:
        distributed.barrier()
    if store is None:
        chunks = in_memory
    else:
        chunks = _read_chunks([store], test is not None, n_chunks)
    return _combine(chunks, n_chunks, config)


def _read_chunks(stores: Sequence[ShardStore], with_test: bool, n_chunks: int) -> dict[int, dict]:
    chunks: dict[int, dict[str, np.ndarray]] = {}
    for store in stores:
        for index in range(n_chunks):
            if index not in chunks:
                arrays = _load_chunk(store, index, with_test)
                if arrays is not None:
                    chunks[index] = arrays
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


def _attach(folder: Path) -> ShardStore:
    """The chunk store :func:`estimate` left in ``folder``, refused if it is not one."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        meta, fingerprint = dict(manifest["meta"]), manifest["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        meta, fingerprint = None, None
    if meta is None or _fingerprint(meta) != fingerprint:
        raise InfluxValueError(
            f"{folder} holds no readable {MANIFEST} of memorization.estimate runs: pass the "
            "folders that estimate(..., out=...) wrote"
        )
    return ShardStore.attach(folder, fingerprint)


def merge(folders: Sequence[str | os.PathLike]) -> MemorizationResult:
    """The estimate over the runs saved in ``folders`` (the ranks' ``out`` folders).

    The folders must come from the same setup (their manifests agree); every chunk must be
    present, undamaged, in one of them. Chunks combine in index order, so the result equals a
    single-process :func:`estimate` with the same settings.
    """
    paths = [Path(f) for f in ([folders] if isinstance(folders, (str, os.PathLike)) else folders)]
    if not paths:
        raise InfluxValueError("merge needs at least one folder")
    stores = [_attach(path) for path in paths]
    if any(store.meta != stores[0].meta for store in stores[1:]):
        raise InfluxValueError(f"the folders {paths} come from different setups; merge one only")
    config = stores[0].meta
    n_chunks = math.ceil(config["n_models"] / config["chunk"])
    chunks = _read_chunks(stores, config["n_test"] is not None, n_chunks)
    missing = sorted(set(range(n_chunks)) - set(chunks))
    if missing:
        raise InfluxRuntimeError(
            f"chunks {missing[:10]}{' ...' if len(missing) > 10 else ''} of {n_chunks} are in none "
            f"of {[str(p) for p in paths]}: run the ranks that own them (chunk c belongs to rank "
            "c mod world_size) and merge again"
        )
    return _combine(chunks, n_chunks, config)
