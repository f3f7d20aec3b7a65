"""Where a per-sample method's time goes: the top operators of one call, from torch.profiler.

The persample suite says how long each method takes; this script says why. It builds the suite's
model and batch (``benchmarks.suites.persample.build``), runs each method of the suite
(``make_method``) for ``--warmup`` calls, then profiles ``--steps`` calls and lists the operators
with the largest self time: device time on CUDA (the kernels), CPU time on the CPU. ``ms_per_call``
is an operator's self time per profiled call of the method, ``share`` its fraction of the method's
total self time, ``calls`` how often it ran per call of the method (on CUDA, a high count at
little time each means the method is bound by kernel launches, not by arithmetic).

    python benchmarks/profile_persample.py --device cuda --models resnet18 --batches 64
    python benchmarks/profile_persample.py --models cnn --methods influx_full torch_func_vmap

Writes ``benchmarks/results/profile_persample-<device>.json`` and ``.md`` (or only the JSON to
``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks.*` importable when run as a script

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.common import provenance, report_check, synchronize  # noqa: E402
from benchmarks.suites import persample  # noqa: E402

COLUMNS = ["model", "batch", "method", "rank", "op", "calls", "ms_per_call", "share"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["resnet18"], choices=persample.MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[64])
    parser.add_argument("--methods", nargs="+", default=["floor", "influx_full", "influx_norms"])
    parser.add_argument("--threads", type=int, default=persample.THREADS)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12, help="operators listed per method")
    parser.add_argument("--out", type=Path, default=None, help="write only this JSON file")
    return parser.parse_args(argv)


def profile_method(fn, device: str, steps: int) -> list[dict]:
    """Per operator: name, calls and self time in ms, summed over ``steps`` calls of ``fn``."""
    on_device = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    ops = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if on_device else event.self_cpu_time_total
        if self_us > 0:
            ops.append({"op": event.key, "calls": event.count, "self_ms": self_us / 1e3})
    return sorted(ops, key=lambda op: op["self_ms"], reverse=True)


def rows_for(args, model_name: str, batch: int, method: str) -> list[dict]:
    model, x, y = persample.build(model_name, batch, args.device)
    fn, _ = persample.make_method(method, model, x, y)
    for _ in range(args.warmup):
        fn()
    ops = profile_method(fn, args.device, args.steps)
    total_ms = sum(op["self_ms"] for op in ops)
    head = {"model": model_name, "batch": batch, "method": method}
    rows = [
        {
            **head,
            "rank": "total",
            "op": f"{len(ops)} operators",
            "calls": "",
            "ms_per_call": total_ms / args.steps,
            "share": 1.0,
        }
    ]
    for rank, op in enumerate(ops[: args.top], 1):
        rows.append(
            {
                **head,
                "rank": rank,
                "op": op["op"],
                "calls": op["calls"] // args.steps,
                "ms_per_call": op["self_ms"] / args.steps,
                "share": op["self_ms"] / total_ms,
            }
        )
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for model_name in args.models:
        for batch in args.batches:
            for method in args.methods:
                rows += rows_for(args, model_name, batch, method)
    meta = provenance(args.device)
    time_kind = "device (kernel)" if args.device.startswith("cuda") else "CPU"
    notes = (
        f"Self {time_kind} time per operator over {args.steps} profiled calls after "
        f"{args.warmup} warm-up calls, {args.threads} threads. `ms_per_call`: self time per call "
        "of the method; `share`: fraction of the method's summed self time; `calls`: operator "
        "calls per call of the method. The profiler's own overhead inflates short operators; "
        "the persample suite, not this table, gives the methods' times."
    )
    report_check(
        "profile_persample",
        rows,
        meta,
        columns=COLUMNS,
        notes=notes,
        out=args.out,
        device=args.device,
    )


if __name__ == "__main__":
    main()
