"""TRAK at scale on CPU: dense and Kronecker TRAK and per-sample projections, influx vs traker.

Model and data as ``influence_scale``'s ``resnet18`` configuration: a CIFAR ResNet-18 of width 64
(``influx.models.resnet``, GroupNorm, 11.2M parameters, every one differentiated) briefly trained
with Adam by ``influx.train`` on ``influx.data.load("synthetic")`` (inputs [N, 3, 32, 32], 10
classes); 1,000 train examples x 100 queries (the synthetic test split). Two kinds of row:

- ``trak``: the Q x N TRAK scores of one checkpoint. influx ``influence.fit(method="trak")`` with
  ``projection="dense"`` (a Gaussian [K, P] generated block by block) and ``"kronecker"`` (per
  layer, P_out G P_in^T); traker ``TRAKer`` on ``device="cpu"``, which picks its
  ``BasicProjector`` (Gaussian, generated in blocks of 100 columns);
- ``project``: per-sample projected gradients [N, K] of the train set alone. influx
  ``grads.per_sample_projected`` (dense and kronecker); traker's ``BasicProjector`` applied to
  per-sample gradients from ``torch.func`` (``vmap(grad(...))``, as traker's featurize computes
  them), of the same per-example cross-entropy.

K: traker's recommended ``proj_dim`` is its default 2,048, or, when that is not below N (its
recommended ``lambda_reg`` is 0, so X^T X of [N, K] features must be invertible), the largest
power of two below N: 512 at N = 1,000. The trak rows (influx dense, influx kronecker, traker)
run at that K (``recommended_dim``) and at a small ``dim`` = 64; the projection rows at ``dim``.
A dense projection redraws its Gaussian matrix, K x 11.2M numbers, once per batch of examples
(influx: its 1 GiB projection cache cannot hold it; traker: whenever K > 100, its block), so the
dense rows at K = 512 are dominated by drawing the Gaussians and multiplying by them (both
libraries in float32; influx draws blocks with their own generators on every thread at once,
traker from one generator).

Each (row, run) runs in a fresh subprocess (``benchmarks/run.py --one``), so its peak memory is
its own; ``INFLUX_TRAK_SCALE_RUNS`` runs per row (default 3). Environment overrides:
``INFLUX_TRAK_SCALE_TRAIN``, ``_QUERIES``, ``_DEPTH`` (8 or 18), ``_WIDTH``, ``_STEPS`` (training
steps), ``_PROJ_DIM`` (the small K), ``_RECOMMENDED_DIM`` (the second K of the trak rows; 0 or
equal to ``_PROJ_DIM``: none; default traker's recommendation), ``_BATCH`` (examples per batch,
both libraries), ``_KINDS`` (the kinds of row, comma-separated; default ``trak,project``) and
``_RUNS``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from argparse import Namespace
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import memory_mark, peak_mem_mb, run_child
from benchmarks.suites.influence_scale import (
    CONFIGS,
    _describe,
    _median_row,
    _warm_up,
    build_model,
    trained_setup,
)
from influx import influence
from influx.grads import per_sample_projected
from influx.influence import evaluate
from influx.train import cross_entropy_per_example

COLUMNS = [
    "kind",
    "impl",
    "projection",
    "dim",
    "model",
    "train",
    "queries",
    "fit_s",
    "score_s",
    "total_s",
    "peak_mem_mb",
    "spread",
    "runs",
    "vs_traker_time",
    "vs_traker_mem",
    "vs_traker_pooled",
    "vs_traker_per_query",
    "notes",
]
NOTES = (
    "CPU, two threads per process (fewer if OMP_NUM_THREADS says so); each (row, run) in a fresh "
    "subprocess, after a one-batch forward + backward warm-up that is not timed. `fit_s` (trak "
    "rows): wall time from the call that fits (influx `influence.fit(method='trak')`; traker "
    "`TRAKer(...)` construction, which draws its first projection block, `load_checkpoint`, "
    "`featurize` of every train batch and `finalize_features`) until it returns; `score_s`: the Q "
    "x N scores (influx `scores(queries)`; traker `start_scoring_checkpoint`, `score` per query "
    "batch and `finalize_scores`). `project` rows: `fit_s` is the per-sample projection of the N "
    "train examples batch by batch ([N, K] features, gradients included), with no scoring step "
    "(`score_s` 0). `total_s` = fit_s + score_s. `peak_mem_mb`: the process' peak resident memory "
    "(VmHWM, reset just before the row) above its resident size at that moment, so the model, the "
    "data and imported libraries are not counted. Times and memory are medians over `runs`; "
    "`spread` is min..max of total_s and of peak_mem_mb. `vs_traker_time` / `_mem`: the influx "
    "row's median total time / peak memory over traker's row of the same kind and K. "
    "`vs_traker_pooled` / `_per_query`: Spearman between influx's and traker's trak scores (pooled "
    "over all Q x N pairs / mean over queries), traker's negated to influx's sign (I_up,loss: "
    "helpful is negative). The two use different random projections, different normalisations "
    "(traker rescales by 1 - p of each train example and uses no damping; influx uses loss "
    "gradients and 'auto' damping) and, for the extra Kronecker row, a different K, so agreement "
    "is only approximate. Batches: `batch` examples per forward/backward and per projection on "
    "both sides (the dense rows of both redraw their K x P Gaussian once per batch, in float32, "
    "except traker's BasicProjector at K <= 100, which keeps its one block; influx draws its "
    "blocks, each from its own seeded generator, on both threads at once, traker from one "
    "generator on one thread). traker runs in "
    "float32 (`use_half_precision=False`): its default float16 matmul on the CPU takes about 3 "
    "minutes for 5 examples at K = 512, which no CPU run can afford. K: the trak rows run at "
    "traker's recommended K (512 at N = 1,000: its default 2,048 is not below N, and its "
    "lambda_reg 0 needs an invertible X^T X) and at K = 64; the projection rows at K = 64. At "
    "K = 64 most of a dense row is materializing 1,100 full-width per-sample gradients: traker "
    "holds [100, 11.2M] per batch, influx one layer's [100, p] at a time."
)

SEED = 0


@dataclass(frozen=True)
class Sizes:
    depth: int  # ResNet depth, 8 or 18
    width: int  # ResNet base width
    train: int  # N train examples
    queries: int  # Q query examples
    steps: int  # Adam steps of 128 examples to train the model
    dim: int  # the small K of every row (influx dense and kronecker, traker)
    recommended_dim: int  # the second K of the trak rows (traker's recommendation); 0: none
    batch: int  # examples per forward/backward and per projection, both libraries


def traker_dim(train: int) -> int:
    """traker's recommended proj_dim: its default 2,048 when below N, else the largest power of
    two below N (lambda_reg 0 needs the [K, K] X^T X of N features to be invertible)."""
    return min(2048, 1 << max(0, (train - 1).bit_length() - 1))


_RESNET18 = CONFIGS["resnet18"]
FULL = Sizes(
    depth=_RESNET18.depth,
    width=_RESNET18.width,
    train=_RESNET18.train,
    queries=_RESNET18.queries,
    steps=_RESNET18.steps,
    dim=64,
    recommended_dim=traker_dim(_RESNET18.train),
    batch=100,
)
QUICK = Sizes(depth=8, width=8, train=64, queries=8, steps=5, dim=32, recommended_dim=0, batch=32)
ENV = {
    "INFLUX_TRAK_SCALE_DEPTH": "depth",
    "INFLUX_TRAK_SCALE_WIDTH": "width",
    "INFLUX_TRAK_SCALE_TRAIN": "train",
    "INFLUX_TRAK_SCALE_QUERIES": "queries",
    "INFLUX_TRAK_SCALE_STEPS": "steps",
    "INFLUX_TRAK_SCALE_PROJ_DIM": "dim",
    "INFLUX_TRAK_SCALE_RECOMMENDED_DIM": "recommended_dim",
    "INFLUX_TRAK_SCALE_BATCH": "batch",
}


def sizes_for(quick: bool) -> Sizes:
    sizes = replace(
        QUICK if quick else FULL,
        **{field: int(os.environ[name]) for name, field in ENV.items() if name in os.environ},
    )
    if not quick and "INFLUX_TRAK_SCALE_RECOMMENDED_DIM" not in os.environ:
        sizes = replace(sizes, recommended_dim=traker_dim(sizes.train))
    return sizes


KINDS = ("trak", "project")


def plan(sizes: Sizes, kinds: tuple[str, ...] = KINDS) -> list[tuple[str, str, str, int]]:
    """(kind, impl, projection, K) of every row of the given kinds, in table order."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown trak_scale row kinds {sorted(unknown)}; choose from {KINDS}")
    dims = [sizes.dim] + (
        [sizes.recommended_dim] if sizes.recommended_dim not in (0, sizes.dim) else []
    )
    impls = (("influx", "dense"), ("influx", "kronecker"), ("traker", "dense"))
    rows = [("trak", impl, projection, dim) for dim in dims for impl, projection in impls]
    rows += [("project", impl, projection, sizes.dim) for impl, projection in impls]
    return [row for row in rows if row[0] in kinds]


def _batches(data: tuple[torch.Tensor, torch.Tensor], size: int):
    for start in range(0, data[0].shape[0], size):
        yield data[0][start : start + size], data[1][start : start + size]


# --------------------------------------------------------------------------------------------------
# One row: a child process
# --------------------------------------------------------------------------------------------------


def _influx_trak(model: nn.Module, train_set, query_set, sizes: Sizes, projection: str, dim: int):
    start = time.perf_counter()
    fitted = influence.fit(
        model,
        cross_entropy_per_example,
        train_set,
        method="trak",
        batch_size=sizes.batch,
        dim=dim,
        projection=projection,
        seed=SEED,
    )
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = fitted.scores(query_set).values
    score_seconds = time.perf_counter() - start
    note = (
        f"{fitted.estimator.layout.size} features; damping 'auto' = "
        f"{fitted.diagnostics['damping'][0]:.3g}"
    )
    return scores, fit_seconds, score_seconds, note


def _traker_trak(model: nn.Module, train_set, query_set, sizes: Sizes, projection: str, dim: int):
    import numpy as np
    from trak import TRAKer

    state = {k: v.clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        traker = TRAKer(
            model=model,
            task="image_classification",
            train_set_size=sizes.train,
            save_dir=out,
            device="cpu",
            proj_dim=dim,
            use_half_precision=False,
            logging_level=logging.WARNING,
        )
        traker.load_checkpoint(state, model_id=0)
        for batch in _batches(train_set, sizes.batch):
            traker.featurize(batch=batch, num_samples=batch[0].shape[0])
        traker.finalize_features()
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        if traker.projector.num_blocks == 1:
            # finalize_features frees the projection matrix and a single-block BasicProjector
            # (K <= 100) never redraws it: score() would fail without this redraw.
            traker.projector.generate_sketch_matrix(traker.projector.generator_states[0])
        traker.start_scoring_checkpoint(
            exp_name="queries", checkpoint=state, model_id=0, num_targets=sizes.queries
        )
        for batch in _batches(query_set, sizes.batch):
            traker.score(batch=batch, num_samples=batch[0].shape[0])
        scores = np.array(traker.finalize_scores(exp_name="queries"))  # [N, Q], helpful > 0
        score_seconds = time.perf_counter() - start
    projector = traker.projector
    kind = getattr(projector.proj_type, "value", projector.proj_type)
    note = f"{type(projector).__name__} ({kind}, float32), lambda_reg 0"
    return -torch.from_numpy(scores).T, fit_seconds, score_seconds, note


def _influx_project(model: nn.Module, train_set, query_set, sizes: Sizes, projection: str, dim):
    start = time.perf_counter()
    # Batch by batch, as TRAK does: a dense projection materializes each batch's [B, P] gradients.
    features = torch.cat(
        [
            per_sample_projected(
                model, cross_entropy_per_example, x, y, dim=dim, seed=SEED, kind=projection
            )
            for x, y in _batches(train_set, sizes.batch)
        ]
    )
    seconds = time.perf_counter() - start
    return None, seconds, 0.0, f"{features.shape[1]} features"


def _traker_project(model: nn.Module, train_set, query_set, sizes: Sizes, projection: str, dim):
    from torch.func import functional_call, grad, vmap
    from trak.projectors import BasicProjector

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(weights, x, y):
        outputs = functional_call(model, (weights, buffers), (x.unsqueeze(0),))
        return cross_entropy_per_example(outputs, y.unsqueeze(0)).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    start = time.perf_counter()
    projector = BasicProjector(
        grad_dim=sum(p.numel() for p in params.values()),
        proj_dim=dim,
        seed=SEED,
        proj_type="normal",
        device="cpu",
        dtype=torch.float32,
    )
    features = torch.cat(
        [
            projector.project(per_sample(params, x, y), model_id=0)
            for x, y in _batches(train_set, sizes.batch)
        ]
    )
    seconds = time.perf_counter() - start
    note = f"{features.shape[1]} features; torch.func vmap(grad) + BasicProjector (normal, float32)"
    return None, seconds, 0.0, note


WORK = {
    ("trak", "influx"): _influx_trak,
    ("trak", "traker"): _traker_trak,
    ("project", "influx"): _influx_project,
    ("project", "traker"): _traker_project,
}


def run_one(args: Namespace) -> int:
    """Child process: one run of one row; trak scores to ``<folder>/<tag>.pt``, the row as JSON."""
    kind, impl, projection, dim, folder = args.one.split(":", 4)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    setup = torch.load(Path(folder) / "setup.pt")
    sizes = Sizes(**setup["sizes"])
    model = build_model(sizes)
    model.load_state_dict(setup["state"])
    model.eval()
    train_set, query_set = setup["train"], setup["query"]
    row = {}
    try:
        if impl == "traker":
            import trak.projectors  # noqa: F401  (its import is not part of the row's memory)
        _warm_up(model, *train_set, "cpu")
        base = memory_mark("cpu")
        scores, fit_s, score_s, note = WORK[kind, impl](
            model, train_set, query_set, sizes, projection, int(dim)
        )
        row.update(
            fit_s=fit_s,
            score_s=score_s,
            total_s=fit_s + score_s,
            peak_mem_mb=peak_mem_mb(base, "cpu"),
            notes=note,
        )
        if scores is not None:
            torch.save(scores.float(), Path(folder) / f"{kind}-{impl}-{projection}-{dim}.pt")
    except Exception as error:  # a row that fails at this size is a row, not a crash
        row["notes"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    print(json.dumps(row))
    return 0


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


def _compare(rows: list[dict], folder: str) -> None:
    """Fill the vs_traker_* columns of the influx rows in place."""
    for row in rows:
        if row.get("impl") != "influx":
            continue
        peers = [r for r in rows if r.get("impl") == "traker" and r["kind"] == row["kind"]]
        peer = next((r for r in peers if r["dim"] == row["dim"]), peers[0])
        if "total_s" in row and "total_s" in peer and row["dim"] == peer["dim"]:
            row["vs_traker_time"] = row["total_s"] / peer["total_s"]
            row["vs_traker_mem"] = row["peak_mem_mb"] / max(peer["peak_mem_mb"], 1e-9)
        ours = Path(folder) / f"trak-influx-{row['projection']}-{row['dim']}.pt"
        theirs = Path(folder) / f"trak-traker-dense-{peer['dim']}.pt"
        if row["kind"] == "trak" and ours.exists() and theirs.exists():
            agree = evaluate.agreement(torch.load(ours), torch.load(theirs))
            row["vs_traker_pooled"] = agree.spearman_pooled
            row["vs_traker_per_query"] = agree.spearman_per_query


def run(args: Namespace) -> list[dict]:
    if not args.device.startswith("cpu"):
        return [
            {"notes": f"trak_scale measures the CPU (traker's BasicProjector); not {args.device}"}
        ]
    # The reference timings are for two CPU cores; OMP_NUM_THREADS=1 asks for one (on a busy
    # machine two OpenMP threads per process can run 30x slower than one).
    torch.set_num_threads(min(2, torch.get_num_threads()))
    quick = getattr(args, "quick", False)
    sizes = sizes_for(quick)
    runs = int(os.environ.get("INFLUX_TRAK_SCALE_RUNS", 1 if quick else 3))
    with tempfile.TemporaryDirectory() as folder:
        model, training = trained_setup(sizes, "cpu", f"batch {sizes.batch}", folder)
        shared = {"model": _describe(sizes, model), "train": sizes.train, "queries": sizes.queries}
        rows = [{**shared, **training}]
        print(f"trak_scale: {training['notes']}, {training['total_s']:.1f}s", flush=True)
        kinds = tuple(os.environ.get("INFLUX_TRAK_SCALE_KINDS", ",".join(KINDS)).split(","))
        for kind, impl, projection, dim in plan(sizes, kinds):
            one = f"{kind}:{impl}:{projection}:{dim}:{folder}"
            results = [run_child("trak_scale", one, args) for _ in range(runs)]
            for result in results:  # run_child reports its own failures as "note"
                if "note" in result:
                    result["notes"] = result.pop("note")
            row = {**shared, "kind": kind, "impl": impl, "projection": projection, "dim": dim}
            row.update(_median_row(results))
            rows.append(row)
            print(f"trak_scale: {json.dumps(row)}", flush=True)
        _compare(rows[1:], folder)
    return rows
