"""Ensemble training: K = 32 digits models trained at once (vmapped) vs 32 sequential runs.

Every model follows one recipe: MLP 64-64-10, a seeded 70% subset of the 1,600 digits training
images, Adam (lr 1e-3), minibatches of 128, ``EPOCHS`` epochs. Rows (each in its own
subprocess, so its peak memory is its own):

- ``vmapped ensemble``: ``influx.memorization.fit_ensemble`` on all 32 subsets at once
  (``stack_module_state`` + ``functional_call`` + ``vmap``, one Adam over stacked parameters);
- ``sequential influx.train.train``: 32 runs of the plain trainer, one per subset;
- ``sequential fit_ensemble (K=1)``: the vmapped code path with one model, 32 times.

``models_per_s`` = 32 models / median time; ``speedup`` = the row's throughput over the
sequential ``influx.train.train`` throughput. Before timing, the vmapped ensemble is checked
against one-model-at-a-time training with the same seeds (max relative parameter difference).

``python -m benchmarks.suites.ensemble --proxies`` writes ``ensemble-<device>.proxies.{json,md}``
instead: the Feldman–Zhang estimate from ``PROXY_MODELS`` vmapped models on digits, compared with
the memorization proxies of one model trained on all of the training set
(``memorization.compare``). It is a separate command so that neither run sees the other's fresh
output as uncommitted changes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from benchmarks.common import (
    RESULTS,
    markdown_table,
    memory_mark,
    peak_mem_mb,
    provenance,
    run_child,
    time_call,
    timing_label,
)

K = 32
EPOCHS = 5
LR = 1e-3
BATCH = 128
SUBSET_FRAC = 0.7
METHODS = ("vmapped ensemble", "sequential influx.train.train", "sequential fit_ensemble (K=1)")
# The memorization comparison: models in the estimate, and the shared training recipe.
PROXY_MODELS = 256
PROXY_EPOCHS = 20
PROXY_LR = 3e-3
PROXY_BATCH = 64
# top-k overlap: about the 2% of examples the estimate finds most memorized.
TOP_K = 32
RUNS = 3
COLUMNS = [
    "method", "models", "epochs", "median_s", "median_s_range", "models_per_s", "speedup",
    "speedup_range", "peak_mem_mb", "timing", "runs", "note",
]  # fmt: skip
NOTES = (
    f"K = {K} MLPs (64-64-10) on seeded {SUBSET_FRAC:.0%} subsets of the 1,600 digits training "
    f"images, Adam lr {LR}, batch {BATCH}, {EPOCHS} epochs each. Each row runs in its own "
    "subprocess: one warm-up call, then the median of 5 timed calls; the three rows run "
    f"{RUNS} times, interleaved, and the table gives the median over the runs with the min-max "
    "range. speedup: throughput over the sequential influx.train.train row of the same run. peak_mem_mb: peak resident memory above the state "
    "after loading the data. The memorization-vs-proxies "
    "comparison (python -m benchmarks.suites.ensemble --proxies) is in "
    "ensemble-<device>.proxies.md."
)


def _setup(device: str):
    from influx import data, memorization

    inputs, targets, _ = data.as_tensors(data.load("digits"))
    inputs, targets = inputs.to(device), targets.to(device)
    masks = memorization.subset_masks(inputs.shape[0], range(K), SUBSET_FRAC, seed=0)
    return inputs, targets, masks


def _model():
    from influx import models

    return models.mlp(64, (64,), 10)


def _methods(inputs, targets, masks, device: str, epochs: int) -> dict:
    from influx import memorization, train

    recipe = dict(epochs=epochs, lr=LR, batch_size=BATCH)

    def vmapped():
        return memorization.fit_ensemble(_model, (inputs, targets), masks, device=device, **recipe)

    def sequential_train():
        for k in range(K):
            torch.manual_seed(k)
            subset = masks[k].to(inputs.device)
            train.train(
                _model().to(device), (inputs[subset], targets[subset]), seed=k, progress=False,
                **recipe,
            )  # fmt: skip

    def sequential_single():
        for k in range(K):
            memorization.fit_ensemble(
                _model, (inputs, targets), masks[k : k + 1], model_ids=[k], device=device, **recipe
            )

    return dict(zip(METHODS, (vmapped, sequential_train, sequential_single), strict=True))


def _agreement(inputs, targets, masks, device: str) -> float:
    """Max relative difference of the vmapped ensemble's parameters from one-at-a-time training
    (float64, one epoch, the first 4 models)."""
    from influx import memorization

    batch = (inputs.double(), targets)
    recipe = dict(epochs=1, lr=LR, batch_size=BATCH, device=device)
    together = memorization.fit_ensemble(lambda: _model().double(), batch, masks[:4], **recipe)
    error = 0.0
    for k in range(4):
        alone = memorization.fit_ensemble(
            lambda: _model().double(), batch, masks[k : k + 1], model_ids=[k], **recipe
        )
        for name, stacked in together.params.items():
            scale = alone.params[name][0].abs().max().item()
            error = max(error, (stacked[k] - alone.params[name][0]).abs().max().item() / scale)
    return error


def run_one(args) -> int:
    """Child process: one method's row, printed as JSON on the last line."""
    method = args.one
    device = args.device
    # as when run as a module: one thread unless OMP_NUM_THREADS says otherwise
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    epochs = 1 if args.quick else EPOCHS
    inputs, targets, masks = _setup(device)
    fn = _methods(inputs, targets, masks, device, epochs)[method]
    base = memory_mark(device)
    repeats = args.repeats or (1 if args.quick else 5)
    row = {"method": method, "models": K, "epochs": epochs}
    row.update(time_call(fn, device=device, repeats=repeats, warmup=1))
    row["timing"] = timing_label(1, repeats)
    row["peak_mem_mb"] = peak_mem_mb(base, device)
    if method == METHODS[0]:
        row["note"] = (
            f"max rel param diff vs one-at-a-time (float64) {_agreement(inputs, targets, masks, device):.1e}"
        )
    print(json.dumps(row))
    return 0


def _child(args, method: str) -> dict:
    return {"method": method, **run_child("ensemble", method, args)}


def compare_proxies(device: str, quick: bool) -> tuple[list[dict], dict]:
    """Feldman–Zhang memorization on digits vs every proxy of one fully trained model."""
    from influx import data, memorization, train

    train_set = data.load("digits")
    inputs, targets, _ = data.as_tensors(train_set)
    batch = (inputs.to(device), targets.to(device))
    n_models = 32 if quick else PROXY_MODELS
    epochs = 3 if quick else PROXY_EPOCHS
    recipe = dict(epochs=epochs, lr=PROXY_LR, batch_size=PROXY_BATCH)
    estimate = memorization.estimate(
        _model, batch, n_models=n_models, subset_frac=SUBSET_FRAC, chunk=K, device=device, **recipe
    )
    torch.manual_seed(0)
    model = _model().to(device)
    loss = train.cross_entropy_per_example
    recorded = memorization.train_and_record(model, loss, batch, seed=0, **recipe)
    model.eval()
    proxies = {
        "cumulative_loss": memorization.cumulative_loss(recorded),
        "curvature": memorization.curvature(model, loss, batch, checkpoints=recorded.train_result),
        "final_loss": memorization.final_loss(model, loss, batch),
        "confidence": memorization.confidence(recorded),
        "margin": memorization.margin(model, batch),
        "self_influence_ekfac": memorization.self_influence(model, loss, batch, method="ekfac"),
        "tracin_self_influence": memorization.tracin_self_influence(
            model, loss, batch, recorded.train_result
        ),
    }
    table = memorization.compare(estimate, proxies, k=TOP_K, seed=0)
    mem = estimate.mem[torch.isfinite(estimate.mem)]
    summary = dict(
        n_examples=int(estimate.mem.numel()), n_models=n_models, epochs=epochs, lr=PROXY_LR,
        batch_size=PROXY_BATCH, subset_frac=SUBSET_FRAC, mean_mem=float(mem.mean()),
        mean_stderr=float(estimate.stderr.nanmean()), frac_mem_above_0_5=float((mem > 0.5).double().mean()),
        frac_mem_zero=float((mem == 0).double().mean()),
        full_model_train_accuracy=recorded.train_result.final_accuracy,
        topk=table.rows[0]["k"], bootstrap=table.n_boot,
    )  # fmt: skip
    rows = [
        {**row, "spearman_ci": list(row["spearman_ci"]), "pearson_ci": list(row["pearson_ci"])}
        for row in table.rows
    ]
    return rows, summary


# Ravikumar et al. (ICML 2025), Table 1, CIFAR-100: cosine / Pearson against Feldman-Zhang.
ANCHORS = {"cumulative_loss": (0.87, 0.79), "curvature": (0.69, 0.49), "final_loss": (0.24, 0.17)}


def _write_proxies(device: str, rows: list[dict], summary: dict) -> None:
    stem = f"ensemble-{device.split(':')[0]}.proxies"
    meta = provenance(device)
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=2) + "\n"
    )
    shown = []
    for row in rows:
        anchor = ANCHORS.get(row["proxy"])
        shown.append({
            "proxy": row["proxy"], "spearman": row["spearman"],
            "spearman 95% CI": f"[{row['spearman_ci'][0]:.3f}, {row['spearman_ci'][1]:.3f}]",
            "pearson": row["pearson"],
            "pearson 95% CI": f"[{row['pearson_ci'][0]:.3f}, {row['pearson_ci'][1]:.3f}]",
            "cosine": row["cosine"], "top-k overlap": row["topk_overlap"],
            "published cosine / pearson (CIFAR-100)": f"{anchor[0]} / {anchor[1]}" if anchor else "",
        })  # fmt: skip
    text = (
        f"# Feldman–Zhang memorization vs proxies on digits ({meta['device_name']})\n\n"
        f"git {meta['git_sha']}, {meta['timestamp']}\n\n"
        f"Estimate: {summary['n_models']} MLPs (64-64-10), each on a seeded "
        f"{summary['subset_frac']:.0%} subset of the {summary['n_examples']} digits training "
        f"images, Adam lr {summary['lr']}, batch {summary['batch_size']}, {summary['epochs']} "
        f"epochs (vmapped, memorization.estimate). Mean mem {summary['mean_mem']:.4f}, mean "
        f"stderr {summary['mean_stderr']:.4f}, fraction with mem > 0.5: "
        f"{summary['frac_mem_above_0_5']:.4f}; exactly 0 (right, or wrong, in every model "
        f"alike): {summary['frac_mem_zero']:.4f}. Ties at 0 cap Spearman: a proxy that orders "
        "the rest perfectly still scores about the same, so read Pearson, cosine and top-k "
        "overlap. Proxies: one model of the same recipe trained on "
        f"all {summary['n_examples']} images (train accuracy "
        f"{summary['full_model_train_accuracy']:.4f}), recorded at every epoch end. "
        f"Confidence and margin are low for memorized examples (negative correlations expected; "
        f"their top-k takes the smallest values). top-k: k = {summary['topk']}. CIs: paired "
        f"percentile bootstrap, {summary['bootstrap']} resamples. The published anchors are on "
        "CIFAR-100 with ResNets, not comparable in size: shown for orientation only.\n\n"
    )
    (RESULTS / f"{stem}.md").write_text(text + markdown_table(shown))


def _speedups(rows: list[dict]) -> None:
    baseline = next((r.get("median_s") for r in rows if r["method"] == METHODS[1]), None)
    for row in rows:
        if row.get("median_s"):
            row["models_per_s"] = K / row["median_s"]
            row["speedup"] = baseline / row["median_s"] if baseline else None


def _combine(repeats: list[dict]) -> dict:
    """One row from the same method in several runs: medians, and the spread of time and ratio."""
    row = dict(repeats[-1])
    row["runs"] = len(repeats)
    for key in ("median_s", "models_per_s", "speedup", "peak_mem_mb"):
        values = sorted(r[key] for r in repeats if r.get(key) is not None)
        if values:
            row[key] = statistics.median(values)
            if key in ("median_s", "speedup") and len(values) > 1:
                row[f"{key}_range"] = f"{values[0]:.3g}-{values[-1]:.3g}"
    return row


def run(args) -> list[dict]:
    """Timing rows (each method in its own subprocess, the three methods run ``RUNS`` times
    interleaved so a busy phase of the machine hits all alike; speedups are taken within each
    run)."""
    per_run = []
    for _ in range(1 if getattr(args, "quick", False) else RUNS):
        rows = [_child(args, method) for method in METHODS]
        _speedups(rows)
        per_run.append(rows)
    return [_combine([run_rows[i] for run_rows in per_run]) for i in range(len(METHODS))]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--proxies", action="store_true", help="write the memorization-vs-proxies comparison"
    )
    parsed = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if parsed.one is not None:
        sys.exit(run_one(parsed))
    if parsed.proxies:
        _write_proxies(parsed.device, *compare_proxies(parsed.device, parsed.quick))
        sys.exit(0)
    for row in run(parsed):
        print(row)
