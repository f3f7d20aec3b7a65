"""Streaming at scale: time and peak memory in N for data that never sits whole in memory.

Three computations over a Dataset that generates each example from its index on every read (no
tensor of all inputs exists anywhere; ``IndexedSynthetic``): EK-FAC self-influence at its
defaults, ``influence.fit(model, loss_fn, dataset, method="ekfac").self_influence()``, the
per-sample gradient norms ``influx.grads.per_sample_norms(model, loss_fn, dataset)``, and the
Gaussian Unlearning Score of every example taken as a poison,
``influx.audit.gus(model, loss_fn, dataset, noise, 0.1)``, its noise N(0, 0.1^2 I) generated
from the dataset indices batch by batch (``noise_of``). The data
are CIFAR-shaped ([3, 32, 32] float32, 12 KiB an example: the inputs of 200,000 examples would
take 2.4 GB), the model a small MLP on them (4x4 average pooling, then 192 -> 64 tanh -> 10
classes; 13,002 parameters), untrained: neither memory nor time depends on its weights.

Every (work, N) run is its own process with ``THREADS`` threads: one warm-up of the same work on
64 other examples, then the resident high-water mark is reset and the work timed once. Columns:
``seconds``; ``peak_rss_mb``, the process' peak resident memory during the work;
``above_start_mb``, that peak above the resident size when the work started; ``rss_vs_smallest``,
the peak over the smallest N's; ``reads``, min..max reads of one example (each pass over the
data reads each example once); and one fit row per work with the least-squares seconds per 1,000
examples. ``INFLUX_STREAM_SIZES`` (comma list; default 10,000 to 200,000), ``INFLUX_STREAM_RUNS``
(default 3; ``--quick``: 1 run at 2,000 and 20,000) and ``INFLUX_STREAM_THREADS`` (default 2)
override the sizes, runs and threads.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from argparse import Namespace

import torch
from torch import nn

from benchmarks.common import (
    current_rss_bytes,
    memory_mark,
    peak_rss_bytes,
    provenance,
    run_child,
    write_results,
)
from influx import influence, models
from influx.audit import gus
from influx.grads import per_sample_norms
from influx.train import cross_entropy_per_example

SIZES = (10_000, 20_000, 50_000, 100_000, 200_000)
QUICK_SIZES = (2_000, 20_000)
INPUT_SHAPE = (3, 32, 32)
CLASSES = 10
THREADS = int(os.environ.get("INFLUX_STREAM_THREADS", 2))
WORKS = ("ekfac_self_influence", "per_sample_norms", "gus")
GUS_NOISE_STD = 0.1
COLUMNS = [
    "work", "train", "seconds", "peak_rss_mb", "above_start_mb", "rss_vs_smallest", "spread",
    "runs", "reads", "seconds_per_1000", "notes",
]  # fmt: skip
NOTES = (
    "A Dataset generating each CIFAR-shaped example ([3, 32, 32] float32, 10 classes) from its "
    f"index; a 13k-parameter MLP after 4x4 average pooling; {THREADS} threads; each run in its "
    "own process. Medians over `runs` runs, `spread` min..max of seconds and of peak RSS. "
    "`peak_rss_mb`: the process' resident high-water mark during the work (torch and the model "
    "included); `above_start_mb`: that peak above the resident size when the work started; "
    "`rss_vs_smallest`: `peak_rss_mb` over the smallest N's. `reads`: min..max reads of one "
    "example over the whole work. Fit rows: least-squares seconds per 1,000 examples, intercept "
    "and largest residual in the notes."
)


class IndexedSynthetic(torch.utils.data.Dataset):
    """``n`` examples, each generated from its index on every read: inputs [3, 32, 32] N(0, 1)
    from a generator seeded by (seed, index), label = argmax of the first CLASSES inputs.
    ``reads`` [n] counts every read of every example."""

    def __init__(self, n: int, *, seed: int = 0):
        self.n, self.seed = n, seed
        self.reads = torch.zeros(n, dtype=torch.int32, device="cpu")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        index = int(index)
        self.reads[index] += 1
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + index)
        inputs = torch.randn(INPUT_SHAPE, generator=generator, device="cpu")
        return inputs, inputs.flatten()[:CLASSES].argmax(), index


def build_model() -> nn.Module:
    torch.manual_seed(0)
    pooled = INPUT_SHAPE[0] * (INPUT_SHAPE[1] // 4) * (INPUT_SHAPE[2] // 4)
    return nn.Sequential(
        nn.AvgPool2d(4),
        nn.Flatten(),
        models.mlp(in_features=pooled, hidden=(64,), num_classes=CLASSES, activation="tanh"),
    )


def noise_of(indices: torch.Tensor) -> torch.Tensor:
    """The training noise of the examples ``indices`` [b]: N(0, GUS_NOISE_STD^2 I) from a
    generator seeded by the index, so no tensor of all the noise exists."""
    rows = []
    for index in indices.tolist():
        generator = torch.Generator(device="cpu").manual_seed(7_000_003 + int(index))
        rows.append(GUS_NOISE_STD * torch.randn(INPUT_SHAPE, generator=generator, device="cpu"))
    return torch.stack(rows)


def do_work(work: str, model, dataset) -> torch.Tensor:
    if work == "ekfac_self_influence":
        fitted = influence.fit(model, cross_entropy_per_example, dataset, method="ekfac")
        return fitted.self_influence()
    if work == "gus":
        return gus(model, cross_entropy_per_example, dataset, noise_of, GUS_NOISE_STD).scores
    return per_sample_norms(model, cross_entropy_per_example, dataset)


def measure(work: str, n: int) -> dict:
    """One timed run of ``work`` on ``n`` lazily generated examples, in this process."""
    model = build_model()
    do_work(work, model, IndexedSynthetic(64, seed=1))  # warm-up on other examples
    dataset = IndexedSynthetic(n)
    base = memory_mark("cpu")
    start = time.perf_counter()
    values = do_work(work, model, dataset)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    if values.shape != (n,) or not bool(torch.isfinite(values).all()):
        raise RuntimeError(f"{work}: expected [{n}] finite values, got {tuple(values.shape)}")
    return {
        "seconds": seconds,
        "peak_rss_mb": peak / 2**20,
        "above_start_mb": max(0, peak - base) / 2**20,
        "reads_min": int(dataset.reads.min()),
        "reads_max": int(dataset.reads.max()),
        "start_rss_mb": current_rss_bytes() / 2**20,
    }


def run_one(args: Namespace) -> int:
    """Child process: ``--one work:N``; prints the measurement as JSON."""
    work, n = args.one.split(":")
    torch.set_num_threads(THREADS)
    try:
        row = measure(work, int(n))
    except Exception as error:  # a failure is a row, not a crash
        row = {"notes": f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    print(json.dumps(row))
    return 0


def child(work: str, n: int) -> dict:
    return run_child("stream", f"{work}:{n}", None, quick=False, note_column="notes")


def _row(work: str, n: int, runs: list[dict]) -> dict:
    done = [r for r in runs if "seconds" in r]
    row = {"work": work, "train": n, "runs": len(done)}
    if not done:
        return {**row, "notes": runs[-1].get("notes")}
    for key in ("seconds", "peak_rss_mb", "above_start_mb"):
        row[key] = statistics.median(r[key] for r in done)
    seconds, peaks = [r["seconds"] for r in done], [r["peak_rss_mb"] for r in done]
    row["spread"] = (
        f"{min(seconds):.3g}..{max(seconds):.3g} s; {min(peaks):.0f}..{max(peaks):.0f} MB"
    )
    row["reads"] = f"{min(r['reads_min'] for r in done)}..{max(r['reads_max'] for r in done)}"
    return row


def slope_row(work: str, rows: list[dict]) -> dict | None:
    """Least-squares seconds per 1,000 examples over the sizes of ``work``."""
    import numpy as np

    points = [r for r in rows if r["work"] == work and "seconds" in r]
    if len(points) < 2:
        return None
    n = np.array([r["train"] for r in points], dtype=float)
    seconds = np.array([r["seconds"] for r in points])
    slope, intercept = np.polyfit(n, seconds, 1)
    residual = float(np.max(np.abs(np.polyval((slope, intercept), n) - seconds)))
    return {
        "work": work,
        "train": "fit",
        "seconds_per_1000": float(1000 * slope),
        "notes": (
            f"least squares over N = {', '.join(f'{int(v):,}' for v in n)}: intercept "
            f"{intercept:.3g} s, largest residual {residual:.3g} s"
        ),
    }


def with_growth(rows: list[dict]) -> list[dict]:
    """``rss_vs_smallest`` on every measured row: its peak RSS over the smallest N's."""
    measured = [r for r in rows if "peak_rss_mb" in r]
    if measured:
        smallest = min(measured, key=lambda r: r["train"])["peak_rss_mb"]
        for row in measured:
            row["rss_vs_smallest"] = row["peak_rss_mb"] / smallest
    return rows


def run(args: Namespace) -> list[dict]:
    torch.set_num_threads(THREADS)
    quick = getattr(args, "quick", False)
    listed = os.environ.get("INFLUX_STREAM_SIZES")
    sizes = [int(n) for n in listed.split(",")] if listed else list(QUICK_SIZES if quick else SIZES)
    runs = int(os.environ.get("INFLUX_STREAM_RUNS", 1 if quick else 3))
    rows = []
    for work in WORKS:
        part = []
        for n in sizes:
            part.append(_row(work, n, [child(work, n) for _ in range(runs)]))
            print(f"stream: {json.dumps(part[-1])}", flush=True)
        slope = slope_row(work, part)
        rows += with_growth(part) + ([slope] if slope else [])
        # Each work's rows are written when they are done: a run cut short keeps them.
        write_results("stream", "cpu", rows, provenance("cpu"), columns=COLUMNS, notes=NOTES)
    return rows
