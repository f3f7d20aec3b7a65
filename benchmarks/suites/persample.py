"""Per-sample gradient suite: influx vs the floor and the peers on the same batches.

Rows: for each model (MLP, CNN, CIFAR ResNet-18 with GroupNorm) and batch size, each method runs
in a fresh subprocess (so its peak memory is its own): the floor (plain forward + backward of the
summed loss), the naive per-example loop, torch.func vmap, Opacus hooks, BackPACK BatchGrad
(where it supports the model), and influx full / norms / Kronecker-projected (4,096 dims).
Before timing, each method's per-sample gradient norms on the first 4 examples are compared with
torch.func in the same dtype (``rel_err``).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import memory_mark, peak_mem_mb, run_child, time_call, timing_label
from influx.grads import per_sample_grads, per_sample_norms, per_sample_projected, reference

MODELS = ("mlp", "cnn", "resnet18")
BATCH_SIZES = (32, 64)
METHODS = (
    "floor",
    "naive_loop",
    "torch_func_vmap",
    "opacus",
    "backpack",
    "influx_full",
    "influx_norms",
    "influx_projected",
)
PROJECTED_DIM = 4096
THREADS = 2  # the reference CPU timings are for two cores
COLUMNS = [
    "model", "batch", "method", "median_s", "median_s_range", "x_floor", "x_floor_range",
    "peak_mem_mb", "rel_err", "timing", "runs", "note",
]  # fmt: skip
NOTES = (
    "Each row runs in its own subprocess on 2 threads: 2 warm-up calls, then the median of 7 "
    "(`timing` says where a slow row had fewer). The grid is run `runs` times, interleaved; `median_s` and `x_floor` are "
    "medians over the runs and `*_range` their min-max. "
    "x_floor: time over the floor's (plain forward+backward of the summed loss) in the same run. "
    "peak_mem_mb: peak resident (CPU) or allocated (CUDA) memory above the state after building the model "
    "and batch. rel_err: max relative error of per-sample gradient norms against torch.func on 4 examples."
)


def loss_fn(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def build(model_name: str, batch: int, device: str):
    from influx import models

    torch.manual_seed(0)
    model = {
        "mlp": lambda: models.mlp(in_features=3 * 32 * 32, hidden=(512, 256)),
        "cnn": lambda: models.cnn(in_channels=3, width=32),
        "resnet18": lambda: models.resnet18(norm="group"),
    }[model_name]().to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y


def _norms(grads: dict) -> torch.Tensor:
    return torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()


def make_method(name: str, model, x, y):
    """Return (fn() running the method on (x, y), norms_of(n) giving per-sample norms of x[:n])."""
    if name == "floor":

        def floor():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).sum().backward()

        return floor, None
    if name == "naive_loop":
        return (
            lambda: reference.naive_per_sample_grads(model, loss_fn, x, y),
            lambda n: _norms(reference.naive_per_sample_grads(model, loss_fn, x[:n], y[:n])),
        )
    if name == "torch_func_vmap":
        return (
            lambda: reference.per_sample_grads(model, loss_fn, x, y),
            lambda n: _norms(reference.per_sample_grads(model, loss_fn, x[:n], y[:n])),
        )
    if name == "opacus":
        from opacus import GradSampleModule

        wrapped = GradSampleModule(model, loss_reduction="sum")

        def opacus_grads(xb, yb):
            for p in model.parameters():
                p.grad_sample, p.grad = None, None
            loss_fn(wrapped(xb), yb).sum().backward()
            return {n: p.grad_sample for n, p in model.named_parameters()}

        return (lambda: opacus_grads(x, y)), (lambda n: _norms(opacus_grads(x[:n], y[:n])))
    if name == "backpack":
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad

        extended = extend(model)
        criterion = extend(torch.nn.CrossEntropyLoss(reduction="sum"))

        def backpack_grads(xb, yb):
            extended.zero_grad(set_to_none=True)
            with backpack(BatchGrad()):
                criterion(extended(xb), yb).backward()
            return {n: p.grad_batch for n, p in model.named_parameters()}

        return (lambda: backpack_grads(x, y)), (lambda n: _norms(backpack_grads(x[:n], y[:n])))
    if name == "influx_full":
        return (
            lambda: per_sample_grads(model, loss_fn, x, y),
            lambda n: _norms(per_sample_grads(model, loss_fn, x[:n], y[:n])),
        )
    if name == "influx_norms":
        return (
            lambda: per_sample_norms(model, loss_fn, x, y),
            lambda n: per_sample_norms(model, loss_fn, x[:n], y[:n]),
        )
    if name == "influx_projected":
        # norms of a random projection are not the true norms: its check is the engine's test suite
        return (lambda: per_sample_projected(model, loss_fn, x, y, dim=PROJECTED_DIM)), None
    raise ValueError(f"unknown method {name}")


def run_one(args) -> int:
    """Child process: one (model, batch, method) row, printed as JSON on the last line.

    Threads are pinned (``--threads``, default 2) so every row runs alike whatever the
    environment says. Nothing runs before the timed calls but the method's own warm-up, so every
    row (the floor included) is timed from the same state; the correctness check comes after
    timing and memory, on an untouched copy of the model (peers wrap or extend the model)."""
    torch.set_num_threads(getattr(args, "threads", None) or THREADS)
    model_name, batch, method = args.one.split(":")
    device = args.device
    model, x, y = build(model_name, int(batch), device)
    untouched = copy.deepcopy(model)
    row = {"model": model_name, "batch": int(batch), "method": method}
    row["threads"] = torch.get_num_threads()
    try:
        fn, norms_of = make_method(method, model, x, y)
        # seconds per call on a CPU: one timed call (the row's `timing` says so)
        slow = method == "naive_loop" or (
            model_name == "resnet18" and method == "torch_func_vmap" and device == "cpu"
        )
        repeats = args.repeats or (1 if slow or args.quick else 7)
        warmup = 1 if slow else 2
        base = memory_mark(device)
        row.update(time_call(fn, device=device, repeats=repeats, warmup=warmup))
        row["peak_mem_mb"] = peak_mem_mb(base, device)
        row["timing"] = timing_label(warmup, repeats)
        if norms_of is not None:
            expected = _norms(reference.per_sample_grads(untouched, loss_fn, x[:4], y[:4]))
            row["rel_err"] = ((norms_of(4) - expected).abs().max() / expected.abs().max()).item()
    except Exception as error:  # a peer that does not support the model is a row, not a crash
        row["note"] = f"unsupported: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    print(json.dumps(row))
    return 0


def _child(args, model_name: str, batch: int, method: str) -> dict:
    row = run_child("persample", f"{model_name}:{batch}:{method}", args)
    return {"model": model_name, "batch": batch, "method": method, **row}


def run(args) -> list[dict]:
    """Every row in its own subprocess, the whole grid repeated ``--runs`` times (interleaved, so
    a slow phase of the machine hits every method alike); ratios to the floor are taken within
    each run and reported as their median with the min-max spread."""
    models = args.models or (("mlp", "cnn") if args.quick else MODELS)
    batches = args.batch_sizes or ((32,) if args.quick else BATCH_SIZES)
    runs = getattr(args, "runs", None) or (1 if args.quick else 3)
    grid = [(m, b, method) for m in models for b in batches for method in METHODS]
    per_run = []
    for _ in range(runs):
        rows = [_child(args, *cell) for cell in grid]
        _add_ratios(rows)
        for row in rows:
            print(json.dumps(row), file=sys.stderr)
        per_run.append(rows)
    return [_combine([rows[i] for rows in per_run]) for i in range(len(grid))]


def _combine(repeats: list[dict]) -> dict:
    """One row from the same cell of several runs: medians, and the spread of time and ratio."""
    row = dict(repeats[-1])
    row["runs"] = len(repeats)
    for key in ("median_s", "x_floor", "peak_mem_mb"):
        values = sorted(r[key] for r in repeats if r.get(key) is not None)
        if values:
            row[key] = statistics.median(values)
            if key != "peak_mem_mb" and len(values) > 1:
                row[f"{key}_range"] = f"{values[0]:.3g}-{values[-1]:.3g}"
    return row


def _add_ratios(rows: list[dict]) -> None:
    floors = {(r["model"], r["batch"]): r.get("median_s") for r in rows if r["method"] == "floor"}
    for row in rows:
        floor = floors.get((row["model"], row["batch"]))
        if floor and row.get("median_s"):
            row["x_floor"] = row["median_s"] / floor
