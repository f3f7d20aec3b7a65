"""Gaussian Unlearning Score over 1,000 poisoned points: influx's batched input gradients vs a
per-example backward loop.

Models: the digits MLP (64 -> 128 -> 10) on 1,000 poisoned digits, and the small CNN
(``models.cnn(3, 10)``) on 1,000 poisoned CIFAR-shaped synthetic images. Rows per model:

- ``floor``: one forward + backward of the summed loss of all points with respect to the inputs
  (in batches of 256, as influx does), without scoring;
- ``influx gus``: ``audit.gus.gus`` end to end (input gradients, scores, the fresh-noise null
  and every statistic), ``batch_size=256``;
- ``per-example loop``: one forward + backward per point for its input gradient, then the same
  score arithmetic (vectorized) -- the obvious implementation.

Before anything is timed, a separate process checks that influx's scores equal the loop's (max
abs diff). Each row then runs in its own fresh process so its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from argparse import Namespace
from pathlib import Path

import torch

from benchmarks.common import (
    memory_mark,
    peak_mem_mb,
    run_child,
    synchronize,
    time_call,
    timing_label,
)

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("mlp", "cnn")
METHODS = ("floor", "influx gus", "per-example loop")
POINTS = 1000
NOISE_STD = 0.5
BATCH = 256
# float32 scores of order 1 from the same gradients summed in a different order.
TOLERANCE = 1e-4
COLUMNS = [
    "model", "points", "method", "median_s", "min_s", "speedup_vs_loop", "speedup_vs_loop_min",
    "x_floor", "peak_mem_mb", "max_abs_diff", "timing",
]  # fmt: skip
NOTES = (
    f"GUS of {POINTS} Gaussian poisons (noise_std {NOISE_STD}), float32. floor: forward + backward "
    f"of the summed loss w.r.t. the inputs in batches of {BATCH}, no scoring. influx gus: "
    "influx.audit.gus.gus end to end (scores, fresh-noise null, statistics). per-example loop: one "
    "forward + backward per point, then the same scoring. Models are seeded and untrained (the "
    "cost does not depend on the weights). Each row runs in its own process: warm-up, then the "
    "median of the timed runs (`timing`); peak_mem_mb is the peak resident memory above the state "
    "after loading the model and data. max_abs_diff: influx scores vs the loop's, checked in a "
    "separate process before timing. speedup_vs_loop: loop time over the row's time (medians; "
    "_min: the same with the fastest runs, which other load on the machine can only slow down)."
)


def setup(model_name: str, device: str):
    """(model, base_inputs, targets, noise) for ``POINTS`` poisoned points, on ``device``."""
    from influx import data, models, poison

    if model_name == "mlp":
        dataset = data.load("digits")
        torch.manual_seed(0)
        model = models.mlp(64, (128,), 10)
    elif model_name == "cnn":
        dataset = data.load("synthetic", size=POINTS + 200, input_shape=(3, 32, 32))
        torch.manual_seed(0)
        model = models.cnn(3, 10)
    else:
        raise ValueError(f"unknown model {model_name}")
    result = poison.gaussian(dataset, count=POINTS, noise_std=NOISE_STD, seed=0)
    model = model.to(device).eval()
    inputs = result.base_inputs.to(device)
    return model, inputs, result.targets.to(device), result.noise.to(device)


def _loss():
    from influx import train

    return train.cross_entropy_per_example


def _scores(inputs, noise, grads):
    descent = -grads.flatten(1)
    return (noise.flatten(1) * descent).sum(1) / (NOISE_STD * descent.norm(dim=1))


def loop_scores(model, inputs, targets, noise):
    """The obvious implementation: one backward per point, then the scores."""
    loss_fn = _loss()
    grads = torch.empty_like(inputs)
    for i in range(inputs.shape[0]):
        x = inputs[i : i + 1].detach().requires_grad_(True)
        (grads[i : i + 1],) = torch.autograd.grad(loss_fn(model(x), targets[i : i + 1]).sum(), x)
    return _scores(inputs, noise, grads)


def floor(model, inputs, targets):
    loss_fn = _loss()
    for start in range(0, inputs.shape[0], BATCH):
        x = inputs[start : start + BATCH].detach().requires_grad_(True)
        torch.autograd.grad(loss_fn(model(x), targets[start : start + BATCH]).sum(), x)


def influx_gus(model, inputs, targets, noise):
    from influx.audit.gus import gus

    return gus(model, _loss(), inputs, targets, noise, NOISE_STD, batch_size=BATCH)


def method_fn(method: str, model, inputs, targets, noise):
    if method == "floor":
        return lambda: floor(model, inputs, targets)
    if method == "influx gus":
        return lambda: influx_gus(model, inputs, targets, noise)
    if method == "per-example loop":
        return lambda: loop_scores(model, inputs, targets, noise)
    raise ValueError(f"unknown method {method}")


def run_one(args) -> int:
    """Child process: ``model:method`` timed (or ``model:check``), one JSON row on stdout."""
    model_name, method = args.one.split(":")
    device = args.device
    model, inputs, targets, noise = setup(model_name, device)
    row = {"model": model_name, "points": POINTS, "method": method}
    if method == "check":
        fast = influx_gus(model, inputs, targets, noise).scores
        slow = loop_scores(model, inputs, targets, noise)
        synchronize(device)
        row["max_abs_diff"] = (fast - slow).abs().max().item()
        print(json.dumps(row))
        return 0
    base = memory_mark(device)
    repeats = args.repeats or (1 if args.quick else 5)
    row.update(time_call(method_fn(method, model, inputs, targets, noise), device=device,
                         repeats=repeats, warmup=1))  # fmt: skip
    row["timing"] = timing_label(1, repeats)
    row["peak_mem_mb"] = peak_mem_mb(base, device)
    print(json.dumps(row))
    return 0


def _child(args, spec: str) -> dict:
    row = run_child("gus", spec, args)
    if "note" in row:
        raise RuntimeError(f"gus benchmark child {spec} {row['note']}")
    return row


def run(args: Namespace) -> list[dict]:
    """Check each model's scores against the loop, then time every (model, method) row."""
    rows = []
    for model_name in MODELS:
        check = _child(args, f"{model_name}:check")
        if not check["max_abs_diff"] <= TOLERANCE:
            raise RuntimeError(
                f"{model_name}: influx GUS scores differ from the per-example loop by "
                f"{check['max_abs_diff']:.2e} (> {TOLERANCE:.0e}); not timing"
            )
        timed = {method: _child(args, f"{model_name}:{method}") for method in METHODS}
        loop, floor_row = timed["per-example loop"], timed["floor"]
        for row in timed.values():
            row.update(
                suite="gus", device=args.device, max_abs_diff=check["max_abs_diff"],
                speedup_vs_loop=loop["median_s"] / row["median_s"],
                speedup_vs_loop_min=loop["min_s"] / row["min_s"],
                x_floor=row["median_s"] / floor_row["median_s"],
            )  # fmt: skip
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--one", required=True, help="model:method (internal)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    return run_one(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
