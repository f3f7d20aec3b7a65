"""Pairwise commutator norms for one batch: vmapped, chunked pairs vs a loop of exact step pairs.

Rows compare, on a small CNN and a CIFAR ResNet-8 (narrow on CPU), three ways of getting the
B x B matrix of commutator norms of single-example SGD steps:

- ``pairwise bracket``: ``commutator.pairwise(lr=None)``, second-order ``||H_i g_j - H_j g_i||``;
- ``pairwise step``: ``commutator.pairwise(lr=...)``, exact ``||T_i T_j - T_j T_i||``;
- ``loop of step pairs``: ``commutator.step`` called once per pair, the naive baseline.

``ratio`` is the method's median time over the naive loop's (lower is faster). The naive loop
is timed on a seeded random subset of at most ``LOOP_PAIRS`` pairs and scaled linearly to all
B (B - 1) / 2 pairs (every pair is one independent ``step`` call). Every row runs in its own fresh
process (``run_one``): one warm-up call, then the median of ``REPEATS``, and its peak memory above
the state after building the model and batch. The exact pairwise matrix is checked against the
loop on those pairs after the timing, in the pairwise step's process.
"""

from __future__ import annotations

import json
from argparse import Namespace

import torch

from benchmarks.common import memory_mark, peak_mem_mb, run_child, time_call, timing_label
from influx import commutator, models, train

LOSS = train.cross_entropy_per_example
LR = 0.01


def _models(device: str, quick: bool) -> dict[str, torch.nn.Module]:
    # Narrow widths on CPU keep the naive loop to seconds; on GPU the default widths are used.
    small = device == "cpu"
    torch.manual_seed(0)
    return {
        "cnn": models.cnn(3, 10, width=8 if small else 16),
        "resnet8": models.resnet(
            8, width=8 if small or quick else 32, num_classes=10, in_channels=3
        ),
    }


def _naive_step_norms(model, inputs, targets, pairs) -> dict[tuple[int, int], float]:
    """Exact step commutator norms, one ``commutator.step`` call per pair (i, j) in ``pairs``."""
    return {
        (i, j): commutator.step(
            model, LOSS, (inputs[i], targets[i]), (inputs[j], targets[j]), lr=LR
        ).norm
        for i, j in pairs
    }


def _loop_pairs(batch: int, limit: int) -> list[tuple[int, int]]:
    """All pairs i < j, or a seeded random subset of ``limit`` of them when there are more."""
    pairs = [(i, j) for i in range(batch) for j in range(i + 1, batch)]
    if len(pairs) <= limit:
        return pairs
    chosen = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))[:limit]
    return [pairs[k] for k in sorted(chosen.tolist())]


def _check_agreement(model, inputs, targets, pairs) -> float:
    """Max relative error of the pairwise step matrix against the loop on ``pairs``."""
    fast = commutator.pairwise(model, LOSS, (inputs, targets), lr=LR).norms.cpu()
    slow = _naive_step_norms(model, inputs, targets, pairs)
    scale = max(abs(v) for v in slow.values())
    error = max(abs(fast[i, j].item() - v) for (i, j), v in slow.items()) / scale
    # float32 commutators are differences of nearby gradients: agreement to ~1e-3 is expected.
    if error > 1e-2:
        raise RuntimeError(
            f"pairwise step norms disagree with the per-pair loop: rel err {error:.2e}"
        )
    return error


# The naive loop visits at most this many pairs; its time is extrapolated linearly to all pairs.
LOOP_PAIRS = 64
METHODS = ("loop of step pairs", "pairwise step", "pairwise bracket")
WARMUP, REPEATS = 1, 5
COLUMNS = [
    "model", "batch", "pairs", "method", "median_s", "ratio", "peak_mem_mb", "timing", "note",
]  # fmt: skip
NOTES = (
    "Each row runs in its own fresh process: one warm-up call, then the median of the timed "
    "calls (`timing`); peak_mem_mb: peak resident (CPU) or allocated (CUDA) memory above the "
    "state after building the model and batch. "
    "ratio: median time over the per-pair loop of exact step commutators (commutator.step) on the "
    "same batch (lower is faster). pairwise step is exact; pairwise bracket is the second-order "
    f"term. The loop is timed on a seeded random subset of at most {LOOP_PAIRS} of the pairs and "
    "its time scaled linearly to all pairs (each pair is an independent call of the same cost); "
    "its note says how many pairs were timed. The pairwise step matrix is checked against the "
    "loop on those pairs after timing (max relative error in the note)."
)


def _batch(quick: bool) -> int:
    return 8 if quick else 32


def _method(name: str, model, inputs, targets, pairs):
    return {
        "loop of step pairs": lambda: _naive_step_norms(model, inputs, targets, pairs),
        "pairwise step": lambda: commutator.pairwise(model, LOSS, (inputs, targets), lr=LR),
        "pairwise bracket": lambda: commutator.pairwise(model, LOSS, (inputs, targets)),
    }[name]


def run_one(args: Namespace) -> int:
    """Child process: one ``model:method`` row, printed as JSON on the last line."""
    device = getattr(args, "device", "cpu")
    quick = getattr(args, "quick", False)
    name, method = args.one.split(":", 1)
    batch = _batch(quick)
    model = _models(device, quick)[name].to(device).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, 3, 32, 32, generator=generator, device="cpu").to(device)
    targets = torch.randint(0, 10, (batch,), generator=generator, device="cpu").to(device)
    pairs = _loop_pairs(batch, LOOP_PAIRS)
    total = batch * (batch - 1) // 2
    repeats = getattr(args, "repeats", None) or (1 if quick else REPEATS)
    base = memory_mark(device)
    seconds = time_call(
        _method(method, model, inputs, targets, pairs),
        device=device,
        repeats=repeats,
        warmup=WARMUP,
    )["median_s"]
    row = {
        "suite": "commutator", "method": method, "model": name, "batch": batch, "pairs": total,
        "device": device, "peak_mem_mb": peak_mem_mb(base, device),
        "timing": timing_label(WARMUP, repeats), "loop_pairs_timed": len(pairs),
        "params": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip
    if method.startswith("loop"):
        row["median_s"] = seconds * total / len(pairs)
        row["note"] = (
            f"timed on {len(pairs)} of {total} pairs, scaled x{total / len(pairs):.2f}"
            if len(pairs) < total
            else f"all {total} pairs"
        )
    else:
        row["median_s"] = seconds
        if method == "pairwise step":
            error = _check_agreement(model, inputs, targets, pairs)
            row["note"] = f"max rel err vs loop {error:.1e}"
    print(json.dumps(row))
    return 0


def run(args: Namespace) -> list[dict]:
    """Rows (method, model, batch, median_s, ratio, peak_mem_mb) for batch 32 (8 with --quick),
    each in its own process."""
    rows = []
    for name in ("cnn", "resnet8"):
        block = []
        for method in METHODS:
            row = {
                "model": name,
                "method": method,
                **run_child("commutator", f"{name}:{method}", args),
            }
            print(json.dumps(row))
            block.append(row)
        baseline = block[0].get("median_s")
        for row in block:
            if baseline and row.get("median_s"):
                row["ratio"] = row["median_s"] / baseline
        rows += block
    return rows
