"""Is the per-sample floor timed as fast as it can run? Floor and influx norms measured three ways.

The floor is a plain forward + backward of the summed loss on the batch; influx norms is
``influx.grads.per_sample_norms`` on the same model and batch (both exactly as the persample suite
builds and runs them: ``benchmarks.suites.persample.build`` / ``make_method``). Each way is one
fresh process per measurement, with ``--warmup`` warm-up calls, then the median of ``--repeats``:

- ``separate``: floor and norms each in its own process (the order alternates between rounds);
- ``alternating``: both in one process, built once: warm-ups floor, norms, floor, norms, ...,
  then timed calls alternating floor, norms, ... (the medians of each);
- ``suite``: the persample suite's own child processes (``benchmarks/run.py --suite persample
  --one model:batch:floor`` and ``...:influx_norms``), run with this script's environment.

Every way is repeated ``--rounds`` times, interleaved; the ratio norms / floor is taken within each
round and reported as its median with the min-max spread. Each process pins ``--threads`` torch
threads (the suite's children use torch's default, recorded as ``default_threads``).

    python benchmarks/floor_check.py        # ResNet-18 (GroupNorm), batch 64, 2 threads
    python benchmarks/floor_check.py --model cnn --batch 8 --rounds 1 --out /tmp/check.json

Writes ``benchmarks/results/floor_check-cpu.json`` and ``.md`` (or only the JSON to ``--out``).
Timings are only meaningful on a quiet machine: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks.*` importable when run as a script

import torch  # noqa: E402

from benchmarks.common import json_of_child, provenance, report_check  # noqa: E402

METHODS = {"floor": "floor", "norms": "influx_norms"}  # our names -> the persample suite's
MODES = ("separate", "alternating", "suite")
COLUMNS = [
    "mode", "floor_s", "floor_s_range", "norms_s", "norms_s_range", "ratio", "ratio_range",
    "rounds", "threads",
]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet18", choices=("mlp", "cnn", "resnet18"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="repeat every mode (spread)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=None, help="write only this JSON file")
    parser.add_argument("--child", choices=(*METHODS, "alternating"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------------


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def child(args: argparse.Namespace) -> dict:
    """One fresh process: build as the suite does, then time floor, norms, or both alternating."""
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    from benchmarks.suites.persample import build, make_method

    model, x, y = build(args.model, args.batch, "cpu")
    names = list(METHODS) if args.child == "alternating" else [args.child]
    fns = {name: make_method(METHODS[name], model, x, y)[0] for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return {
        "times_s": times,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "threads": torch.get_num_threads(),
        "default_threads": default_threads,
    }


def _spawn(args: argparse.Namespace, what: str) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", what, "--model", args.model,
        "--batch", str(args.batch), "--threads", str(args.threads), "--warmup", str(args.warmup),
        "--repeats", str(args.repeats),
    ]  # fmt: skip
    return json_of_child(command)


def _suite_child(args: argparse.Namespace, method: str) -> dict:
    """The persample suite's own child for one row (its warm-up and repeats are its own)."""
    command = [
        sys.executable, str(ROOT / "benchmarks" / "run.py"), "--suite", "persample",
        "--device", "cpu", "--one", f"{args.model}:{args.batch}:{method}",
    ]  # fmt: skip
    row = json_of_child(command)
    if row.get("median_s") is None:
        raise RuntimeError(f"the persample child for {method} returned no time: {row}")
    return row


# --------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------


def one_round(args: argparse.Namespace, mode: str, index: int) -> dict:
    """Floor and norms medians (seconds) of one round of ``mode``."""
    if mode == "alternating":
        result = _spawn(args, "alternating")
        return {**result["median_s"], "threads": result["threads"]}
    if mode == "separate":
        # alternate which goes first, so a drift of the machine does not favour one
        order = list(METHODS) if index % 2 == 0 else list(METHODS)[::-1]
        results = {name: _spawn(args, name) for name in order}
        return {
            **{name: r["median_s"][name] for name, r in results.items()},
            "threads": results["floor"]["threads"],
            "default_threads": results["floor"]["default_threads"],
        }
    rows = {name: _suite_child(args, METHODS[name]) for name in METHODS}
    return {
        **{name: row["median_s"] for name, row in rows.items()},
        # the suite's children do not pin threads: torch's default in this environment
        "threads": args.default_threads,
        "timing": rows["floor"].get("timing"),
    }


def _spread(values: list[float]) -> str:
    return f"{min(values):.3g}-{max(values):.3g}" if len(values) > 1 else ""


def summarize(mode: str, rounds: list[dict]) -> dict:
    floors = [r["floor"] for r in rounds]
    norms = [r["norms"] for r in rounds]
    ratios = [r["norms"] / r["floor"] for r in rounds]
    return {
        "mode": mode,
        "floor_s": statistics.median(floors),
        "floor_s_range": _spread(floors),
        "norms_s": statistics.median(norms),
        "norms_s_range": _spread(norms),
        "ratio": statistics.median(ratios),
        "ratio_range": _spread(ratios),
        "rounds": len(rounds),
        "threads": rounds[0]["threads"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    # a fresh process with this environment, before pinning: what the suite's children get
    args.default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    per_mode: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for index in range(args.rounds):
        for mode in args.modes:
            result = one_round(args, mode, index)
            per_mode[mode].append(result)
            print(f"round {index + 1} {mode}: {json.dumps(result)}", file=sys.stderr, flush=True)
    rows = [summarize(mode, rounds) for mode, rounds in per_mode.items()]
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "out")}
    meta = {**provenance("cpu"), "settings": settings, "rounds": per_mode}
    notes = (
        f"{args.model} batch {args.batch}, {args.threads} threads per process, {args.warmup} "
        f"warm-up calls then the median of {args.repeats} in each process (`suite`: the persample "
        "suite's own children, as they time). ratio = norms / floor within a round; medians over "
        "rounds with the min-max spread. `separate`: each in its own fresh process; "
        "`alternating`: both in one process, calls alternating; `suite`: threads are torch's "
        "default in this environment (the suite's children do not pin them)."
    )
    report_check("floor_check", rows, meta, columns=COLUMNS, notes=notes, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
