"""influx-score throughput: examples scored per second for each score, as the command computes it.

Two settings: the default (digits, the 4,810-parameter MLP, all 1,600 training examples) and
CIFAR-shaped synthetic data with a GroupNorm ResNet-18 (8 examples on CPU, 1,024 on GPU; the
commutator statistic, per-example Hessian-vector products over 11M parameters, on GPU only). Each
row times ``influx.cli.Scorer.compute`` on one chunk holding all the setting's examples, exactly
the call influx-score makes per shard (store writes excluded: a few ms per shard). Models are
freshly initialized (throughput does not depend on the weights); TracIn uses as many copies of
them as the command keeps checkpoints (5 on digits, 2 on the ResNet here). ``fit_s`` is the
one-off cost of the influence fit (EK-FAC on all the setting's examples), paid once per process
before the first self-influence shard; it is not in the per-example rate.

Every row runs in its own subprocess (peak memory is that row's alone): one warm-up call, then the
median of ``--repeats`` (default 5) calls. Before timing, each row checks its values are finite.
"""

from __future__ import annotations

import json
import sys
import time
from argparse import Namespace

import numpy as np
import torch

from benchmarks.common import memory_mark, peak_mem_mb, run_child, time_call, timing_label
from influx import cli, data

COLUMNS = [
    "setting", "examples", "score", "median_s", "examples_per_s", "fit_s", "peak_mem_mb", "timing",
    "note",
]  # fmt: skip
SCORES = ("basic", "self_influence_ekfac", "tracin", "commutator", "memorization")
NOTES = "`basic` is loss, margin and grad_norm together (one forward and one batched backward)."


def _setting(name: str, device: str, quick: bool):
    """(model, dataset, config, number of TracIn checkpoints) of a benchmark setting."""
    if name == "digits-mlp":
        dataset = data.load("digits", max_examples=256 if quick else None)
        model_name, width, checkpoints = "mlp", None, 5
    else:
        size = 8 if quick or device == "cpu" else 1024
        dataset = data.load("synthetic", size=size)
        model_name, width, checkpoints = "resnet18", None, 2
    torch.manual_seed(0)
    model = cli.build_model(model_name, dataset.input_shape, dataset.num_classes, width)
    model = model.to(device).eval()
    config = {"model": model_name, "width": width, "device": device, "seed": 0, "lr": 1e-3}
    return model, dataset, config, checkpoints


def run_one(args: Namespace) -> int:
    """Child process: one (setting, score) row, printed as JSON on the last line."""
    setting, score = args.one.split(":")
    device = args.device
    torch.set_num_threads(1 if setting == "digits-mlp" else torch.get_num_threads())
    model, dataset, config, copies = _setting(setting, device, args.quick)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    scorer = cli.Scorer(model, dataset, config, [(state, 1e-3)] * copies)
    positions = torch.arange(len(dataset), device="cpu")
    row: dict = {"setting": setting, "examples": len(dataset), "score": score}
    base = memory_mark(device)
    try:
        if score.startswith("self_influence_"):
            started = time.perf_counter()
            scorer.fitted(score[len("self_influence_") :])
            row["fit_s"] = time.perf_counter() - started
        values = scorer.compute(score, positions)
        if not all(np.isfinite(v).all() for v in values.values()):
            raise RuntimeError("non-finite scores")
        repeats = args.repeats or 5
        row.update(
            time_call(lambda: scorer.compute(score, positions), device=device, repeats=repeats)
        )
        row["timing"] = timing_label(1, repeats)
        row["examples_per_s"] = len(dataset) / row["median_s"]
        row["peak_mem_mb"] = peak_mem_mb(base, device)
    except Exception as error:  # a score this machine cannot run is a row, not a crash
        row["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    print(json.dumps(row))
    return 0


def _child(args: Namespace, setting: str, score: str) -> dict:
    return {"setting": setting, "score": score, **run_child("score", f"{setting}:{score}", args)}


def run(args: Namespace) -> list[dict]:
    rows = []
    for setting in ("digits-mlp", "synthetic-resnet18"):
        for score in SCORES:
            if setting == "synthetic-resnet18" and score == "commutator" and args.device == "cpu":
                # Per-example HVPs over 11M parameters: minutes per call on this CPU.
                rows.append({"setting": setting, "score": score, "note": "GPU only"})
                continue
            rows.append(_child(args, setting, score))
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="one row of the score suite (internal)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    sys.exit(run_one(parser.parse_args()))
