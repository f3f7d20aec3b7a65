"""DP-SGD suite: one DP-SGD step (clip, noise, optimizer step) with influx vs Opacus.

Rows, for CIFAR ResNet-18 (GroupNorm) on one batch, each in a fresh subprocess (so its peak memory
is its own):

- ``floor``: plain forward + backward of the summed loss (no clipping, no noise, no step);
- ``influx_ghost``: ``influx.dp.DPGradient`` (ghost norms and the reweighted sum from one captured
  forward/backward), then ``torch.optim.SGD.step``;
- ``opacus_hooks``: ``GradSampleModule`` + ``DPOptimizer`` (materialized per-sample gradients,
  per-sample clipping), Opacus' default ``grad_sample_mode="hooks"``;
- ``opacus_ghost``: ``GradSampleModuleFastGradientClipping`` + ``DPOptimizerFastGradientClipping`` +
  ``DPLossFastGradientClipping``, what ``PrivacyEngine.make_private(grad_sample_mode="ghost")``
  builds (two backward passes of the retained graph).

Every DP row: noise multiplier 1.0, clipping norm 1.0, summed loss (``loss_reduction="sum"``).
Before timing each DP row's clipped sum (noise 0) on the first 4 examples is compared with the
per-example loop (``rel_err``).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import memory_mark, peak_mem_mb, run_child, time_call

BATCH_SIZES = (32, 64)
METHODS = ("floor", "influx_ghost", "opacus_hooks", "opacus_ghost")
NOISE, CLIP, LR = 1.0, 1.0, 0.01
COLUMNS = ["model", "batch", "method", "median_s", "floor_median_s", "x_floor", "vs_opacus_ghost",
           "peak_mem_mb", "rel_err", "timing", "note"]  # fmt: skip
NOTES = (
    "One DP-SGD step on CIFAR ResNet-18 (GroupNorm), 3x32x32 inputs, noise multiplier 1, clipping "
    "norm 1. Each row runs in its own subprocess: one warm-up, then `repeats` rounds, each timing "
    "the floor (plain forward + backward of the summed loss, on its own copy of the model) and the "
    "method once; median_s and floor_median_s are the medians, x_floor their ratio. "
    "vs_opacus_ghost: x_floor over Opacus ghost clipping's x_floor. peak_mem_mb: peak resident memory above "
    "the state after building the model and batch. rel_err: max relative error of the clipped "
    "summed gradient (noise 0) on 4 examples against a per-example loop."
)


def loss_fn(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def build(batch: int, device: str):
    from influx import models

    torch.manual_seed(0)
    model = models.resnet18(norm="group").to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y


def make_method(name: str, model, x, y, noise: float = NOISE):
    """Return (step() running one DP-SGD step on (x, y), clipped(xb, yb) -> the clipped sum)."""
    if name == "floor":

        def floor():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).sum().backward()

        return floor, None
    if name == "influx_ghost":
        from influx import dp

        hook = dp.DPGradient(CLIP, noise, x.shape[0])
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        params = dict(model.named_parameters())

        def influx_step():
            _, grads = hook(model, loss_fn, x, y)
            for key, p in params.items():
                p.grad = grads[key]
            optimizer.step()

        return influx_step, lambda xb, yb: dp.clipped_grad(model, loss_fn, xb, yb,
                                                           max_grad_norm=CLIP)  # fmt: skip
    if name == "opacus_hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        wrapped = GradSampleModule(model, loss_reduction="sum")
        optimizer = DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=noise,
            max_grad_norm=CLIP, expected_batch_size=x.shape[0], loss_reduction="sum",
        )  # fmt: skip

        def opacus_step():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(wrapped(x), y).sum().backward()
            optimizer.step()

        def clipped(xb, yb):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(wrapped(xb), yb).sum().backward()
            optimizer.clip_and_accumulate()
            return {k: p.summed_grad for k, p in model.named_parameters()}

        return opacus_step, clipped
    if name == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        wrapped = GradSampleModuleFastGradientClipping(
            model, max_grad_norm=CLIP, use_ghost_clipping=True, loss_reduction="sum"
        )
        optimizer = DPOptimizerFastGradientClipping(
            torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=noise,
            max_grad_norm=CLIP, expected_batch_size=x.shape[0], loss_reduction="sum",
        )  # fmt: skip
        criterion = DPLossFastGradientClipping(
            wrapped, optimizer, torch.nn.CrossEntropyLoss(reduction="sum"), loss_reduction="sum"
        )

        def opacus_ghost_step():
            optimizer.zero_grad(set_to_none=True)
            criterion(wrapped(x), y).backward()  # both backward passes
            optimizer.step()

        def clipped(xb, yb):
            optimizer.zero_grad(set_to_none=True)
            criterion(wrapped(xb), yb).backward()
            return {k: p.grad.clone() for k, p in model.named_parameters()}

        return opacus_ghost_step, clipped
    raise ValueError(f"unknown method {name}")


def _loop_clipped(model, x, y) -> dict[str, torch.Tensor]:
    from influx.grads.reference import naive_per_sample_grads

    grads = naive_per_sample_grads(model, loss_fn, x, y)
    norms = torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()
    factors = (CLIP / norms).clamp(max=1.0)
    return {k: (g * factors.view(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in grads.items()}


def run_one(args) -> int:
    """Child process: one (batch, method) row, printed as JSON on the last line."""
    batch, method = args.one.split(":")
    device = args.device
    model, x, y = build(int(batch), device)
    untouched = copy.deepcopy(model)
    row = {"model": "resnet18", "batch": int(batch), "method": method}
    try:
        # The floor is timed in the same process, interleaved with the method, on its own copy
        # of the model (peers hook the one they wrap): a ratio that load drifts on a shared
        # machine cannot skew. Its memory stays below any DP step's, so the peak is the method's.
        floor, _ = make_method("floor", copy.deepcopy(model), x, y)
        step, _ = make_method(method, model, x, y)
        base = memory_mark(device)
        repeats = args.repeats or (2 if args.quick else 5)
        timed = {"floor": [], "method": []}
        rounds = [("floor", floor)] + ([("method", step)] if method != "floor" else [])
        for _, fn in rounds:  # warm-up
            fn()
        for _ in range(repeats):
            for key, fn in rounds:
                timed[key].append(time_call(fn, device=device, repeats=1, warmup=0)["median_s"])
        row["median_s"] = statistics.median(timed["method"] or timed["floor"])
        row["floor_median_s"] = statistics.median(timed["floor"])
        row["x_floor"] = row["median_s"] / row["floor_median_s"]
        row["timing"] = f"median of {repeats}, interleaved with the floor"
        row["peak_mem_mb"] = peak_mem_mb(base, device)
        # correctness after timing and memory, on an untouched copy without noise
        _, clipped = make_method(method, copy.deepcopy(untouched), x, y, noise=0.0)
        if clipped is not None:
            got = clipped(x[:4], y[:4])
            expected = _loop_clipped(untouched, x[:4], y[:4])
            row["rel_err"] = max(
                ((got[k] - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
                for k, e in expected.items()
            )
    except Exception as error:  # a peer that fails on the model is a row, not a crash
        row["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    print(json.dumps(row))
    return 0


def _child(args, batch: int, method: str) -> dict:
    row = {"model": "resnet18", "batch": batch, "method": method}
    return {**row, **run_child("dp", f"{batch}:{method}", args)}


def run(args) -> list[dict]:
    batches = args.batch_sizes or ((8,) if args.quick else BATCH_SIZES)
    rows = []
    for batch in batches:
        cells = [_child(args, batch, method) for method in METHODS]
        ghost = next((r.get("x_floor") for r in cells if r["method"] == "opacus_ghost"), None)
        for row in cells:
            if row.get("x_floor") and ghost:
                # a ratio of same-process ratios: robust to the load of the machine between rows
                row["vs_opacus_ghost"] = row["x_floor"] / ghost
            print(json.dumps(row), file=sys.stderr)
        rows += cells
    return rows
