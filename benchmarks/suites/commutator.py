"""Pairwise commutator norms for one batch: vmapped, chunked pairs vs a loop of exact step pairs.

Rows compare, on a small CNN and a CIFAR ResNet-8 (narrow on CPU), three ways of getting the
B x B matrix of commutator norms of single-example SGD steps:

- ``pairwise bracket``: ``commutator.pairwise(lr=None)``, second-order ``||H_i g_j - H_j g_i||``;
- ``pairwise step``: ``commutator.pairwise(lr=...)``, exact ``||T_i T_j - T_j T_i||``;
- ``loop of step pairs``: ``commutator.step`` called once per pair, the naive baseline.

``ratio`` is the method's median time over the naive loop's (lower is faster). The exact
pairwise matrix is checked against the loop before anything is timed.
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


def _naive_step_norms(model, inputs, targets) -> torch.Tensor:
    """[B, B] exact step commutator norms, one ``commutator.step`` call per pair i < j."""
    size = inputs.shape[0]
    norms = torch.zeros(size, size)
    for i in range(size):
        for j in range(i + 1, size):
            pair = (inputs[i], targets[i]), (inputs[j], targets[j])
            norms[i, j] = norms[j, i] = commutator.step(model, LOSS, *pair, lr=LR).norm
    return norms


def _check_agreement(model, inputs, targets) -> None:
    fast = commutator.pairwise(model, LOSS, (inputs, targets), lr=LR).norms.cpu()
    slow = _naive_step_norms(model, inputs, targets)
    error = ((fast - slow).abs().max() / slow.abs().max()).item()
    # float32 commutators are differences of nearby gradients: agreement to ~1e-3 is expected.
    if error > 1e-2:
        raise RuntimeError(
            f"pairwise step norms disagree with the per-pair loop: rel err {error:.2e}"
        )


COLUMNS = ["model", "batch", "pairs", "method", "median_s", "ratio"]
NOTES = (
    "ratio: median time over the per-pair loop of exact step commutators (commutator.step) on the "
    "same batch. pairwise step is exact; pairwise bracket is the second-order term."
)


def _time_methods(model, inputs, targets, repeats: int, device: str) -> dict[str, float]:
    methods = {
        "loop of step pairs": lambda: _naive_step_norms(model, inputs, targets),
        "pairwise step": lambda: commutator.pairwise(model, LOSS, (inputs, targets), lr=LR),
        "pairwise bracket": lambda: commutator.pairwise(model, LOSS, (inputs, targets)),
    }
    # The naive loop is long enough that its first run needs no separate warm-up.
    return {
        method: time_call(fn, device=device, repeats=repeats, warmup=0 if "loop" in method else 1)[
            "median_s"
        ]
        for method, fn in methods.items()
    }


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
        _check_agreement(model, inputs[:4], targets[:4])
        timings = _time_methods(model, inputs, targets, repeats, device)
        baseline = timings["loop of step pairs"]
        for method, seconds in timings.items():
            rows.append({
                "suite": "commutator", "method": method, "model": name, "batch": batch,
                "pairs": batch * (batch - 1) // 2, "device": device, "median_s": seconds,
                "ratio": seconds / baseline,
            })  # fmt: skip
    return rows


if __name__ == "__main__":
    torch.set_num_threads(2)
    for row in run(Namespace(device="cpu", quick=True)):
        print(row)
