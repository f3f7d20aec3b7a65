"""Dense projection on a device: its Gaussian blocks drawn there, against drawn on the CPU.

Times ``influx.grads.projection.dense_project`` of one batch of flat per-sample gradients
[batch, columns] (default: 100 examples of a ResNet-18's 11.2M parameters) to K dims, with the
matrix cache off, so that every call draws its blocks, as every batch of a dense projection larger
than the cache does. On CUDA two rows per K: blocks drawn on the GPU (the rule for CUDA gradients)
and on the CPU (``DENSE_DRAWS_ON_GPU = False``: the same projection on every device, drawn by
every CPU thread, then copied over). On a CPU only the CPU row exists.

    python benchmarks/dense_draws.py --device cuda
    python benchmarks/dense_draws.py --columns 100000 --dims 64   # a quick look on a CPU

Writes ``benchmarks/results/dense_draws-<device>.json`` and ``.md`` (or only the JSON to
``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks.*` importable when run as a script

import torch  # noqa: E402

from benchmarks.common import provenance, report_check, time_call, timing_label  # noqa: E402
from influx.grads import projection  # noqa: E402

RESNET18_PARAMETERS = 11_173_962  # CIFAR ResNet-18, 10 classes
COLUMNS = [
    "device", "dim", "columns", "batch", "drawn_on", "median_s", "min_s", "timing",
    "normals_per_s", "x_cpu_drawn",
]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dims", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--columns", type=int, default=RESNET18_PARAMETERS)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write only this JSON file")
    return parser.parse_args(argv)


def time_projection(flat: torch.Tensor, dim: int, args, *, on_gpu: bool) -> dict:
    previous = projection.DENSE_DRAWS_ON_GPU, projection.CACHE.budget_bytes
    projection.DENSE_DRAWS_ON_GPU = on_gpu
    projection.CACHE.set_budget(0)  # every call draws its blocks
    try:
        timed = time_call(
            lambda: projection.dense_project(flat, dim, seed=0),
            device=args.device,
            repeats=args.repeats,
            warmup=args.warmup,
        )
    finally:
        projection.DENSE_DRAWS_ON_GPU = previous[0]
        projection.CACHE.set_budget(previous[1])
    drawn_on = "gpu" if on_gpu and flat.device.type == "cuda" else "cpu"
    return {
        "device": args.device,
        "dim": dim,
        "columns": flat.shape[1],
        "batch": flat.shape[0],
        "drawn_on": drawn_on,
        "median_s": timed["median_s"],
        "min_s": timed["min_s"],
        "timing": timing_label(args.warmup, args.repeats),
        "normals_per_s": dim * flat.shape[1] / timed["median_s"],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    flat = torch.randn(args.batch, args.columns, device=args.device)
    rows = []
    for dim in args.dims:
        cpu_drawn = time_projection(flat, dim, args, on_gpu=False)
        cpu_drawn["x_cpu_drawn"] = 1.0
        rows.append(cpu_drawn)
        if flat.device.type == "cuda":
            gpu_drawn = time_projection(flat, dim, args, on_gpu=True)
            gpu_drawn["x_cpu_drawn"] = gpu_drawn["median_s"] / cpu_drawn["median_s"]
            rows.append(gpu_drawn)
    notes = (
        f"dense_project of [batch, columns] float32 gradients on {args.device}, the projection "
        f"cache off (each call draws its blocks), {torch.get_num_threads()} CPU threads. "
        "`drawn_on`: where the Gaussian blocks are drawn (cpu: every CPU thread at once, then "
        "copied to the device). `normals_per_s`: entries of the [dim, columns] matrix per second "
        "of the whole call (draws, copies and matmuls). `x_cpu_drawn`: time over the CPU-drawn "
        "row's of the same K."
    )
    report_check(
        "dense_draws",
        rows,
        provenance(args.device),
        columns=COLUMNS,
        notes=notes,
        out=args.out,
        device=args.device,
    )


if __name__ == "__main__":
    main()
