"""Pairwise commutator norms for one batch: vmapped, chunked pairs vs a loop of exact step pairs.

Rows compare, on a small CNN and a CIFAR ResNet-8 (narrow on CPU), three ways of getting the
B x B matrix of commutator norms of single-example SGD steps:

- ``pairwise bracket``: ``commutator.pairwise(lr=None)``, second-order ``||H_i g_j - H_j g_i||``;
- ``pairwise step``: ``commutator.pairwise(lr=...)``, exact ``||T_i T_j - T_j T_i||``;
- ``loop of step pairs``: ``commutator.step`` called once per pair, the naive baseline.

``ratio`` is the method's median time over the naive loop's (lower is faster). The naive loop
is timed on a seeded random subset of at most ``LOOP_PAIRS`` pairs and scaled linearly to all
B (B - 1) / 2 pairs (every pair is one independent ``step`` call). The exact pairwise matrix is
checked against the loop on those pairs before anything is timed.
"""

from __future__ import annotations

from argparse import Namespace

import torch

from benchmarks.common import time_call
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
COLUMNS = ["model", "batch", "pairs", "method", "median_s", "ratio", "note"]
NOTES = (
    "ratio: median time over the per-pair loop of exact step commutators (commutator.step) on the "
    "same batch (lower is faster). pairwise step is exact; pairwise bracket is the second-order "
    f"term. The loop is timed on a seeded random subset of at most {LOOP_PAIRS} of the pairs and "
    "its time scaled linearly to all pairs (each pair is an independent call of the same cost); "
    "its note says how many pairs were timed. The pairwise step matrix is checked against the "
    "loop on those pairs before timing (max relative error in the note)."
)


def _time_methods(model, inputs, targets, pairs, repeats: int, device: str) -> dict[str, float]:
    total = inputs.shape[0] * (inputs.shape[0] - 1) // 2
    methods = {
        "loop of step pairs": lambda: _naive_step_norms(model, inputs, targets, pairs),
        "pairwise step": lambda: commutator.pairwise(model, LOSS, (inputs, targets), lr=LR),
        "pairwise bracket": lambda: commutator.pairwise(model, LOSS, (inputs, targets)),
    }
    # The agreement check has already run the loop and the pairwise step once (warm-up).
    timings = {
        method: time_call(fn, device=device, repeats=repeats, warmup=int("bracket" in method))[
            "median_s"
        ]
        for method, fn in methods.items()
    }
    timings["loop of step pairs"] *= total / len(pairs)
    return timings


def run(args: Namespace) -> list[dict]:
    """Rows (method, model, batch, median_s, ratio) for batch 32 (8 with ``args.quick``)."""
    device = getattr(args, "device", "cpu")
    quick = getattr(args, "quick", False)
    batch = 8 if quick else 32
    repeats = getattr(args, "repeats", None) or (1 if quick else 3)
    rows = []
    for name, model in _models(device, quick).items():
        model = model.to(device).eval()
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
        targets = torch.randint(0, 10, (batch,), generator=generator).to(device)
        pairs = _loop_pairs(batch, LOOP_PAIRS)
        error = _check_agreement(model, inputs, targets, pairs)
        total = batch * (batch - 1) // 2
        timings = _time_methods(model, inputs, targets, pairs, repeats, device)
        baseline = timings["loop of step pairs"]
        for method, seconds in timings.items():
            if method.startswith("loop"):
                note = (
                    f"timed on {len(pairs)} of {total} pairs, scaled x{total / len(pairs):.2f}"
                    if len(pairs) < total
                    else f"all {total} pairs"
                )
            else:
                note = f"max rel err vs loop {error:.1e}" if method == "pairwise step" else ""
            rows.append({
                "suite": "commutator", "method": method, "model": name, "batch": batch,
                "pairs": total, "device": device, "median_s": seconds, "ratio": seconds / baseline,
                "loop_pairs_timed": len(pairs), "params": sum(p.numel() for p in model.parameters()),
                "note": note,
            })  # fmt: skip
    return rows


if __name__ == "__main__":
    torch.set_num_threads(2)
    for row in run(Namespace(device="cpu", quick=True)):
        print(row)
