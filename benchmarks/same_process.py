"""Per-sample gradient methods timed side by side in one process, calls alternating.

The persample suite runs every method in its own process, so each row also carries that process'
allocator and page-fault history. Where influx loses a row by a few percent, this script asks
whether the gap survives when the methods share one process and alternate call by call. Methods
are the persample suite's own (``benchmarks.suites.persample.make_method``), plus ``fill``: writing
N x P floats into freshly allocated memory, the least any method that returns the full per-sample
gradients must do (P = the model's parameter count).

Each round is one fresh process: ``--warmup`` warm-up calls of every method, then ``--repeats``
timed calls of each, alternating; the round's median per method. ``ratio`` is a method's median
over influx_full's in the same round; the table gives medians over rounds with the min-max spread.

    python benchmarks/same_process.py                      # MLP and CNN at batch 32 and 64
    python benchmarks/same_process.py --models cnn --batches 32 --rounds 1 --out /tmp/x.json

Writes ``benchmarks/results/same_process-cpu.json`` and ``.md`` (or only the JSON to ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks.*` importable when run as a script

import torch  # noqa: E402

from benchmarks.common import json_of_child, provenance, report_check  # noqa: E402

METHODS = ("floor", "influx_full", "backpack", "torch_func_vmap", "fill")
COLUMNS = [
    "model",
    "batch",
    "method",
    "median_s",
    "median_s_range",
    "ratio",
    "ratio_range",
    "rounds",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=("mlp", "cnn"))
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write only this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # model:batch
    return parser.parse_args(argv)


def child(args: argparse.Namespace) -> dict:
    """One fresh process: every method on one model and batch, timed calls alternating."""
    torch.set_num_threads(args.threads)
    from benchmarks.suites.persample import build, make_method

    model_name, batch = args.child.split(":")
    model, x, y = build(model_name, int(batch), "cpu")
    size = (x.shape[0], sum(p.numel() for p in model.parameters()))
    # each method its own copy: BackPACK extends the model in place, which torch.func then refuses
    fns = {name: make_method(name, copy.deepcopy(model), x, y)[0] for name in METHODS[:-1]}
    fns["fill"] = lambda: torch.empty(size, device="cpu").fill_(1.0)
    unsupported = {}
    for name, fn in list(fns.items()):
        try:
            fn()
        except Exception as error:  # a peer that does not support the model (BackPACK: GroupNorm)
            unsupported[name] = f"unsupported: {type(error).__name__}"
            del fns[name]
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {**{name: statistics.median(t) for name, t in times.items()}, **unsupported}


def _round(args: argparse.Namespace, model: str, batch: int) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", f"{model}:{batch}",
        "--threads", str(args.threads), "--warmup", str(args.warmup),
        "--repeats", str(args.repeats),
    ]  # fmt: skip
    return json_of_child(command)


def _spread(values: list[float]) -> str:
    return f"{min(values):.3g}-{max(values):.3g}" if len(values) > 1 else ""


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    configs = [(m, b) for m in args.models for b in args.batches]
    rounds: dict[str, list[dict]] = {f"{m}:{b}": [] for m, b in configs}
    for index in range(args.rounds):  # interleaved, so a drift of the machine hits every config
        for model, batch in configs:
            result = _round(args, model, batch)
            rounds[f"{model}:{batch}"].append(result)
            print(f"round {index + 1} {model}:{batch}: {json.dumps(result)}", file=sys.stderr)
    rows = []
    for (model, batch), results in zip(configs, rounds.values()):
        for method in METHODS:
            if isinstance(results[0][method], str):
                rows.append({"model": model, "batch": batch, "method": method,
                             "median_s": results[0][method]})  # fmt: skip
                continue
            times = [r[method] for r in results]
            ratios = [r[method] / r["influx_full"] for r in results]
            rows.append({
                "model": model, "batch": batch, "method": method,
                "median_s": statistics.median(times), "median_s_range": _spread(times),
                "ratio": statistics.median(ratios), "ratio_range": _spread(ratios),
                "rounds": len(results),
            })  # fmt: skip
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "out")}
    meta = {**provenance("cpu"), "settings": settings, "rounds": rounds}
    notes = (
        f"{args.threads} threads; each round one fresh process per (model, batch) with every method: "
        f"{args.warmup} warm-up calls of each, then {args.repeats} timed calls alternating between "
        "methods, the median per method. ratio: a method's median over influx_full's in the same "
        "round. Medians over rounds, min-max in *_range. fill: writing N x P floats into fresh "
        "memory (P = parameters), the least that full per-sample gradients cost."
    )
    report_check("same_process", rows, meta, columns=COLUMNS, notes=notes, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
