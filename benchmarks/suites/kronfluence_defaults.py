"""EK-FAC at each library's defaults: influx against Kronfluence on CIFAR-shaped GroupNorm ResNets.

The work a user gets without tuning: ``influence.fit(model, loss_fn, train, method="ekfac")``
then ``.scores(query)``, against Kronfluence's ``fit_all_factors`` with
``FactorArguments(strategy="ekfac")`` then ``compute_pairwise_scores`` with ``ScoreArguments()``.
Each side keeps its defaults: influx's sampled Fisher with ``fisher_draws="auto"``, damping
'auto' and every parameter scored (GroupNorm affine parameters in diagonal blocks); Kronfluence's
sampled Fisher (one label per example and pass), damping 1e-8 and the Conv2d / Linear layers.
Kronfluence's batch-size search needs CUDA out-of-memory errors to stop (it starts at 4,096), so
on a CPU it is given batches: 512 train examples per factor batch and per scoring block (influx's
default factor batch) and all queries in one batch.

Task: ``benchmarks.suites.influence_scale``'s GroupNorm ResNet-8 of width 16 (about 0.31M
parameters) on ``influx.data.load("synthetic")`` CIFAR-shaped data, trained with Adam for 60 steps
of 128, 100 queries from the test split, N train examples for N in ``INFLUX_KD_SIZES`` (comma
list; default 1,000, 2,000, 5,000 and 10,000; rows of other sizes already in the results file are
kept when they were measured at the same commit on a clean tree). 50,000 is out of reach of two
CPU cores: at the slopes of ``influence_scale_series-cpu.md`` (about 11 s and 19 s per 1,000
examples) one run of both sides would take about 25 minutes, three runs 75.

Every run of a row is its own process (``benchmarks/run.py --one``) with 2 threads: warm-up (one
forward + backward of 8 examples), then one timed run of fit + scores and its peak RSS above the
resident size after the warm-up. ``INFLUX_KD_RUNS`` runs per row (default 3; ``--quick``: 1 at 256
examples), influx and Kronfluence alternating; the table gives the medians and min..max.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from argparse import Namespace
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import (
    current_rss_bytes,
    kronfluence_classification_task,
    peak_rss_bytes,
    provenance,
    run_child,
    write_results,
)
from benchmarks.suites.influence_scale import (
    CONFIGS,
    Sizes,
    _agreement,
    _describe,
    _median_row,
    _warm_up,
    build_model,
    trained_setup,
)
from influx import influence
from influx.curvature import fisher_draws
from influx.train import cross_entropy_per_example

SUITE = "kronfluence_defaults"
SIZES = (1000, 2000, 5000, 10000)
KRONFLUENCE_BATCH = 512
THREADS = int(os.environ.get("INFLUX_KD_THREADS", 2))
COLUMNS = [
    "train", "impl", "model", "fit_s", "score_s", "total_s", "peak_mem_mb", "spread", "runs",
    "time_ratio", "mem_ratio", "spearman_pooled", "spearman_per_query", "top10", "notes",
    "measured_at",
]  # fmt: skip
NOTES = (
    "GroupNorm ResNet-8 width 16 on CIFAR-shaped synthetic data, 100 queries x N train, both "
    f"libraries at their defaults (see the suite's docstring), {THREADS} threads, each run in its "
    "own process. `total_s` = `fit_s` + `score_s` (the 100 x N pairwise matrix) and `peak_mem_mb` "
    "(peak RSS above the process' resident size after its warm-up) are medians over `runs` runs; "
    "`spread`: min..max. `time_ratio` / `mem_ratio`: influx's median over Kronfluence's. "
    "Spearman (pooled over all pairs, mean per query) and top-10 overlap by |score| compare "
    "influx's scores with Kronfluence's (negated to influx's sign, I_up,loss) from the last run "
    "of each. 50,000 train examples were not run: out of reach of two CPU cores. "
    "influx's `fisher_draws='auto'` draws one label per example on these models: extra draws "
    "are spent only while examples x forward multiply-adds per example x draws stays within "
    "2^28 (a ResNet-8 of width 16 does 16M multiply-adds per example). On a ResNet-8 of width 8 "
    "(1,000 examples) 1 / 2 / 4 / 8 draws agree with a 16-draw fit at Spearman 0.9985 / 0.9991 "
    "/ 0.9995 / 0.9996 (0.9991 / 0.9995 / 0.9998 for 1 / 2 / 4 draws on a barely trained one), "
    "while each draw adds two passes over the train set; on the digits MLP (4,810 multiply-adds "
    "per example, 1,600 examples) 'auto' draws 6, and 1 / 8 draws agree with the exact solve at "
    "0.338-0.361 / 0.368-0.400 against Kronfluence's 0.236-0.243 at its default damping "
    "(benchmarks/results/ekfac_draws-cpu.md)."
)


def _sizes(train: int, quick: bool) -> Sizes:
    if quick:
        return replace(CONFIGS["quick"], train=256, queries=16, kinds=("pairwise",))
    return replace(CONFIGS["resnet8"], train=train, kinds=("pairwise",))


def _influx(model, train_set, query_set):
    start = time.perf_counter()
    fitted = influence.fit(model, cross_entropy_per_example, train_set, method="ekfac")
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = fitted.scores(query_set).values
    draws = fisher_draws("auto", train_set[0].shape[0], model, train_set[0])
    return scores, fit_seconds, time.perf_counter() - start, f"fisher_draws 'auto' = {draws}"


def _kronfluence(model, train_set, query_set):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    train_data = torch.utils.data.TensorDataset(*train_set)
    query_data = torch.utils.data.TensorDataset(*query_set)
    task = kronfluence_classification_task()
    torch.manual_seed(0)  # its label sampling draws from the global generator
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        analyzer = Analyzer(
            "defaults", prepare_model(model, task), task, cpu=True, output_dir=out,
            disable_tqdm=True,
        )  # fmt: skip
        analyzer.fit_all_factors(
            "factors",
            train_data,
            per_device_batch_size=KRONFLUENCE_BATCH,
            factor_args=FactorArguments(strategy="ekfac"),
        )
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "scores",
            "factors",
            query_data,
            train_data,
            per_device_query_batch_size=query_set[0].shape[0],
            per_device_train_batch_size=KRONFLUENCE_BATCH,
            score_args=ScoreArguments(),
        )
        # g_q^T H^-1 g_z (positive = helpful) for a summed loss: negated to I_up,loss.
        scores = -analyzer.load_pairwise_scores("scores")["all_modules"]
        score_seconds = time.perf_counter() - start
    return scores, fit_seconds, score_seconds, "damping 1e-8, sampled Fisher"


def run_one(args: Namespace) -> int:
    """Child process: one run of one library; scores to ``<folder>/<impl>.pt``, the row as JSON."""
    impl, folder = args.one.split(":", 1)
    torch.set_num_threads(THREADS)
    setup = torch.load(Path(folder) / "setup.pt")
    sizes = Sizes(
        **{**setup["sizes"], **{k: tuple(setup["sizes"][k]) for k in ("methods", "kinds")}}
    )
    model = build_model(sizes)
    model.load_state_dict(setup["state"])
    train_set, query_set = setup["train"], setup["query"]
    row = {}
    try:
        if impl == "kronfluence":
            import kronfluence.analyzer  # noqa: F401  (its import is not part of the row's memory)
        _warm_up(model, *train_set, "cpu")
        base = current_rss_bytes()
        work = _kronfluence if impl == "kronfluence" else _influx
        scores, fit_s, score_s, note = work(model, train_set, query_set)
        peak = peak_rss_bytes()
        row.update(
            fit_s=fit_s,
            score_s=score_s,
            total_s=fit_s + score_s,
            peak_mem_mb=max(0, peak - base) / 2**20,
            notes=note,
        )
        torch.save(scores.float().cpu(), Path(folder) / f"{impl}.pt")
    except Exception as error:  # a library that fails on this size is a row, not a crash
        row["notes"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    print(json.dumps(row))
    return 0


def _child(impl: str, folder: str) -> dict:
    return run_child(SUITE, f"{impl}:{folder}", None, quick=False, note_column="notes")


def _size_rows(train: int, runs: int, quick: bool) -> list[dict]:
    sizes = _sizes(train, quick)
    with tempfile.TemporaryDirectory() as folder:
        model, training = trained_setup(sizes, "cpu", f"{sizes.queries} queries", folder)
        shared = {"train": sizes.train, "model": _describe(sizes, model)}
        print(f"kronfluence_defaults N={sizes.train}: {training['notes']}", flush=True)
        results = {"influx": [], "kronfluence": []}
        for _ in range(runs):
            for impl in results:  # alternating, so that a slow spell of the machine hits both
                results[impl].append(_child(impl, folder))
                print(
                    f"kronfluence_defaults N={sizes.train} {impl}: {results[impl][-1]}", flush=True
                )
        rows = {impl: {**shared, "impl": impl, **_median_row(r)} for impl, r in results.items()}
        ours, theirs = rows["influx"], rows["kronfluence"]
        if "total_s" in ours and "total_s" in theirs:
            ours["time_ratio"] = ours["total_s"] / theirs["total_s"]
            ours["mem_ratio"] = ours["peak_mem_mb"] / max(theirs["peak_mem_mb"], 1e-9)
            agree = _agreement(
                torch.load(Path(folder) / "influx.pt"), torch.load(Path(folder) / "kronfluence.pt")
            )
            ours.update(
                spearman_pooled=agree["vs_kronfluence_pooled"],
                spearman_per_query=agree["vs_kronfluence_per_query"],
                top10=agree["vs_kronfluence_top10"],
            )
    return [ours, theirs]


def _earlier_rows(sizes: list[int]) -> list[dict]:
    """The rows of other sizes in the results file when they were measured at this commit on a
    clean tree: sizes can be measured in separate invocations and still share one table."""
    try:
        saved = json.loads((common.RESULTS / f"{SUITE}-cpu.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    sha = common.git_sha()
    if sha.endswith("+dirty") or saved.get("meta", {}).get("git_sha") != sha:
        return []
    return [row for row in saved.get("rows", []) if row.get("train") not in sizes]


def run(args: Namespace) -> list[dict]:
    torch.set_num_threads(THREADS)
    quick = getattr(args, "quick", False)
    listed = os.environ.get("INFLUX_KD_SIZES")
    sizes = [int(n) for n in listed.split(",")] if listed else list(SIZES)
    sizes = sizes[:1] if quick else sizes
    runs = int(os.environ.get("INFLUX_KD_RUNS", 1 if quick else 3))
    rows = [] if quick else _earlier_rows(sizes)
    for train in sizes:
        measured_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rows += [{**row, "measured_at": measured_at} for row in _size_rows(train, runs, quick)]
        rows.sort(key=lambda row: row["train"])
        # Each size's rows are written when they are done: a run cut short keeps them.
        write_results(SUITE, "cpu", rows, provenance("cpu"), columns=COLUMNS, notes=NOTES)
    return rows
