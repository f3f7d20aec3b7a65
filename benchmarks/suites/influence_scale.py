"""EK-FAC influence at scale: CIFAR-10-shaped data, a GroupNorm ResNet, Q queries x N train.

influx ``method="ekfac"`` against Kronfluence ``strategy="ekfac"`` (and K-FAC for both when asked),
on the same trained model and the same data. Data: ``influx.data.load("synthetic")``, inputs
[N, 3, 32, 32] in 10 balanced classes; the queries are the synthetic test split. The model is a
CIFAR ResNet (``influx.models.resnet``, GroupNorm, affine parameters trainable as users train it)
briefly trained with Adam by ``influx.train``. Kronfluence scores the Conv2d / Linear weights
only, so the matched influx row passes ``others="exclude"`` (the same parameters); the row
``influx (+norms)`` scores every parameter (GroupNorm affine in diagonal blocks) for reference.

Two kinds of work per configuration: ``pairwise`` (the Q x N matrix) and ``self`` (the
self-influence of every train example; Kronfluence ``compute_self_scores``). Configurations
(``INFLUX_SCALE_CONFIGS``, comma list; default ``resnet8,resnet18,series`` on CPU):

- resnet8: ResNet-8 width 16, 2,000 train x 100 queries, 500 per batch on both sides;
- resnet18: ResNet-18 width 64, 1,000 train x 100 queries, 50 per batch on both sides;
- series: the resnet8 model with 500, 1,000, 2,000 and 4,000 train examples (pairwise), whose
  time and peak memory are fitted linearly in N (slope per 1,000 examples in the notes);
- cuda (the default on a GPU): ResNet-18 width 64, 50,000 train x 2,000 queries.

Each (configuration, kind, library) row is run ``INFLUX_SCALE_RUNS`` times (default 3), each
run in a fresh subprocess (its own peak memory); the table gives the median and, in
``spread``, min..max of the total time and of the peak memory.

Environment overrides: ``INFLUX_SCALE_TRAIN``, ``INFLUX_SCALE_QUERIES``, ``INFLUX_SCALE_DEPTH``
(8 or 18), ``INFLUX_SCALE_WIDTH``, ``INFLUX_SCALE_QUERY_BATCH`` (queries per scoring pass, both
libraries), ``INFLUX_SCALE_TRAIN_BATCH`` (train examples per scoring block, both libraries),
``INFLUX_SCALE_STEPS`` (training steps), ``INFLUX_SCALE_METHODS`` (comma list of ekfac, kfac),
``INFLUX_SCALE_FISHER`` (empirical or sampled), ``INFLUX_SCALE_KINDS`` (pairwise, self),
``INFLUX_SCALE_RUNS``, ``INFLUX_SCALE_SERIES`` (train sizes of the series) and
``INFLUX_SCALE_NORMS=0`` (no "influx (+norms)" row). The size overrides
apply to every configuration.

Every (method, library) row runs in a fresh subprocess, so its peak memory is its own: peak RSS
above the process' resident size before the row on CPU, ``torch.cuda.max_memory_allocated`` on
CUDA. Both sides start from the model on the CPU and the data as CPU tensors; moving them to the
device is part of the timed work.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import (
    current_rss_bytes,
    kronfluence_classification_task,
    peak_rss_bytes,
    synchronize,
)
from influx import influence, models
from influx.data import as_tensors, load
from influx.influence import evaluate
from influx.train import cross_entropy_per_example, train
from influx.train import evaluate as evaluate_model

COLUMNS = [
    "config",
    "kind",
    "method",
    "impl",
    "model",
    "train",
    "queries",
    "fit_s",
    "score_s",
    "total_s",
    "peak_mem_mb",
    "spread",
    "runs",
    "vs_kronfluence_time",
    "vs_kronfluence_mem",
    "vs_kronfluence_pooled",
    "vs_kronfluence_per_query",
    "vs_kronfluence_top10",
    "notes",
]
NOTES = (
    "Scores follow influx's sign (I_up,loss; Kronfluence's pairwise scores are negated; "
    "self-influence is positive in both). `fit_s`: curvature factors and the EK-FAC eigenvalue "
    "refit; `score_s`: the pairwise Q x N matrix (queries in passes of `query_batch`, each pass "
    "streaming all train examples) or the self-influence of every train example. Times and "
    "`peak_mem_mb` are medians over `runs` runs, each in a fresh subprocess after a one-batch "
    "warm-up; `spread` is min..max of total_s / peak_mem_mb. `peak_mem_mb`: peak RSS above the "
    "row's starting RSS (CPU) or `torch.cuda.max_memory_allocated` (CUDA). `vs_kronfluence_time` "
    "/ `_mem`: influx's median total time / peak memory over Kronfluence's on the same work. "
    "Damping: influx 'auto' and Kronfluence `damping_factor=None`, both 0.1 x the mean "
    "eigenvalue of each layer's block. Fisher: the empirical one (training labels) for both, so "
    "they estimate the same matrix. Factor batches and scoring blocks are `train_batch` examples "
    "on both sides. `vs_kronfluence_*` agreement: Spearman pooled, mean per-query Spearman and "
    "top-10 overlap by |score| (self-influence: one Spearman over train examples). The matched "
    "influx row (`influx`) scores the Conv2d / Linear weights and biases as Kronfluence does "
    "(`others='exclude'`); `influx (+norms)` adds the GroupNorm affine parameters in diagonal "
    "blocks (different work, not compared)."
)

SEED = 0


@dataclass(frozen=True)
class Sizes:
    depth: int  # ResNet depth, 8 or 18
    width: int  # ResNet base width
    train: int  # N train examples
    queries: int  # Q query examples
    query_batch: int  # queries per scoring pass (each pass streams the whole train set)
    train_batch: int  # train examples per batch: factor estimation and scoring blocks, both sides
    steps: int  # Adam steps of 128 examples to train the model
    methods: tuple[str, ...] = ("ekfac",)
    fisher: str = "empirical"
    kinds: tuple[str, ...] = ("pairwise", "self")


CONFIGS = {
    "quick": Sizes(
        depth=8, width=8, train=256, queries=16, query_batch=16, train_batch=128, steps=20
    ),
    "resnet8": Sizes(
        depth=8, width=16, train=2000, queries=100, query_batch=100, train_batch=500, steps=60
    ),
    "resnet18": Sizes(
        depth=18, width=64, train=1000, queries=100, query_batch=100, train_batch=50, steps=20
    ),
    "series": Sizes(
        depth=8,
        width=16,
        train=2000,
        queries=100,
        query_batch=100,
        train_batch=500,
        steps=60,
        kinds=("pairwise",),
    ),  # fmt: skip
    # One pass over the train set per 250 queries; one train block of 128.
    "cuda": Sizes(
        depth=18, width=64, train=50_000, queries=2000, query_batch=250, train_batch=128, steps=400
    ),
}
SERIES = (500, 1000, 2000, 4000)
ENV = {
    "INFLUX_SCALE_DEPTH": "depth",
    "INFLUX_SCALE_WIDTH": "width",
    "INFLUX_SCALE_TRAIN": "train",
    "INFLUX_SCALE_QUERIES": "queries",
    "INFLUX_SCALE_QUERY_BATCH": "query_batch",
    "INFLUX_SCALE_TRAIN_BATCH": "train_batch",
    "INFLUX_SCALE_STEPS": "steps",
}
IMPL_ROWS = (("influx", "exclude"), ("kronfluence", None), ("influx (+norms)", "diagonal"))
# INFLUX_SCALE_NORMS=0 leaves out the reference row "influx (+norms)" (never run in the series).
NORMS_ROW = os.environ.get("INFLUX_SCALE_NORMS", "1") != "0"


def _listed(name: str, allowed: set[str]) -> tuple[str, ...] | None:
    if name not in os.environ:
        return None
    values = tuple(v.strip() for v in os.environ[name].split(",") if v.strip())
    unknown = set(values) - allowed
    if unknown:
        raise ValueError(f"{name}: unknown {sorted(unknown)}; use {sorted(allowed)}")
    return values


def sizes_for(config: str) -> Sizes:
    sizes = CONFIGS[config]
    changes = {field: int(os.environ[name]) for name, field in ENV.items() if name in os.environ}
    methods = _listed("INFLUX_SCALE_METHODS", {"ekfac", "kfac"})
    if methods:
        changes["methods"] = methods
    kinds = _listed("INFLUX_SCALE_KINDS", {"pairwise", "self"})
    if kinds and config != "series":
        changes["kinds"] = kinds
    if "INFLUX_SCALE_FISHER" in os.environ:
        fisher = os.environ["INFLUX_SCALE_FISHER"]
        if fisher not in ("empirical", "sampled"):
            raise ValueError(f"INFLUX_SCALE_FISHER must be empirical or sampled; got {fisher!r}")
        changes["fisher"] = fisher
    sizes = replace(sizes, **changes)
    # Fewer queries than a pass holds: one pass.
    return replace(sizes, query_batch=min(sizes.query_batch, sizes.queries))


def build_model(sizes: Sizes) -> nn.Module:
    """The GroupNorm ResNet with every parameter trainable (affine GroupNorm included)."""
    torch.manual_seed(SEED)
    return models.resnet(sizes.depth, width=sizes.width, norm="group")


def _describe(sizes: Sizes, model: nn.Module) -> str:
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"resnet{sizes.depth}-w{sizes.width} ({count / 1e6:.3g}M)"


# --------------------------------------------------------------------------------------------------
# One row: a child process
# --------------------------------------------------------------------------------------------------


def _warm_up(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device: str) -> None:
    """One forward + backward on a few examples, so first-call setup is not timed."""
    model.to(device)
    loss = cross_entropy_per_example(model(inputs[:8].to(device)), targets[:8].to(device)).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    model.to("cpu")
    synchronize(device)


def _influx(model, train_set, query_set, sizes: Sizes, method, kind, device, others):
    start = time.perf_counter()
    model.to(device)
    inputs, targets = (t.to(device) for t in train_set)
    fitted = influence.fit(
        model,
        cross_entropy_per_example,
        (inputs, targets),
        method=method,
        batch_size=sizes.train_batch,
        fisher=sizes.fisher,
        seed=SEED,
        others=others,
    )
    synchronize(device)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if kind == "self":
        scores = fitted.self_influence().cpu()
    else:
        query_inputs, query_targets = (t.to(device) for t in query_set)
        parts = []
        # All Q queries at once would hold Q x P features: one pass over the train set per chunk.
        for begin in range(0, sizes.queries, sizes.query_batch):
            chunk = slice(begin, begin + sizes.query_batch)
            parts.append(fitted.scores((query_inputs[chunk], query_targets[chunk])).values.cpu())
        scores = torch.cat(parts)
    synchronize(device)
    score_seconds = time.perf_counter() - start
    dampings = list(fitted.diagnostics["damping"].values())
    bases = list(fitted.diagnostics["feature_basis"].values())
    note = (
        f"damping per block {min(dampings):.3g}..{max(dampings):.3g}; feature basis: "
        f"{bases.count('eigen')} eigen, {bases.count('parameter')} parameter; "
        f"{len(fitted.diagnostics['coverage']['diagonal'])} parameters in diagonal blocks"
    )
    return scores, fit_seconds, score_seconds, note


def _kronfluence(model, train_set, query_set, sizes: Sizes, strategy, kind, device, others):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    train_data = torch.utils.data.TensorDataset(*train_set)
    query_data = torch.utils.data.TensorDataset(*query_set)
    task = kronfluence_classification_task()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        analyzer = Analyzer(
            "influence_scale",
            prepare_model(model, task),
            task,
            cpu=not device.startswith("cuda"),
            output_dir=out,
            disable_tqdm=True,
        )
        analyzer.fit_all_factors(
            "factors",
            train_data,
            per_device_batch_size=sizes.train_batch,
            factor_args=FactorArguments(
                strategy=strategy, use_empirical_fisher=sizes.fisher == "empirical"
            ),
        )
        synchronize(device)
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        # None = 0.1 x the mean eigenvalue per module, as influx's damping='auto'.
        score_args = ScoreArguments(damping_factor=None)
        if kind == "self":
            analyzer.compute_self_scores(
                "scores",
                "factors",
                train_data,
                per_device_train_batch_size=sizes.train_batch,
                score_args=score_args,
            )
            scores = analyzer.load_self_scores("scores")["all_modules"].cpu()
        else:
            analyzer.compute_pairwise_scores(
                "scores",
                "factors",
                query_data,
                train_data,
                per_device_query_batch_size=sizes.query_batch,
                per_device_train_batch_size=sizes.train_batch,
                score_args=score_args,
            )
            # g_q^T H^-1 g_z (positive = helpful) for a summed loss: negate to I_up,loss.
            scores = -analyzer.load_pairwise_scores("scores")["all_modules"].cpu()
        synchronize(device)
        score_seconds = time.perf_counter() - start
    return scores, fit_seconds, score_seconds, "damping_factor=None"


def run_one(args: Namespace) -> int:
    """Child process: one run of one row; scores to ``<dir>/<tag>.pt``, the row as JSON."""
    tag, impl, folder = args.one.split(":", 2)
    method, kind, others = tag.split("-")
    device = args.device
    if not device.startswith("cuda"):
        torch.set_num_threads(2)
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
        _warm_up(model, *train_set, device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = current_rss_bytes()
        work = _kronfluence if impl == "kronfluence" else _influx
        scores, fit_s, score_s, note = work(
            model, train_set, query_set, sizes, method, kind, device, others
        )
        peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss_bytes()
        row.update(
            fit_s=fit_s,
            score_s=score_s,
            total_s=fit_s + score_s,
            peak_mem_mb=max(0, peak - base) / 2**20,
            notes=note,
        )
        torch.save(scores.float(), Path(folder) / f"{tag}-{impl}.pt")
    except Exception as error:  # a library that fails on this configuration is a row, not a crash
        row["notes"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    print(json.dumps(row))
    return 0


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


def _child(args: Namespace, tag: str, impl: str, folder: str) -> dict:
    root = Path(__file__).resolve().parents[2]
    command = [
        sys.executable,
        str(root / "benchmarks" / "run.py"),
        "--suite",
        "influence_scale",
        "--device",
        args.device,
        "--one",
        f"{tag}:{impl}:{folder}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return {"notes": f"failed: {last[0][:200]}"}


def _median_row(runs: list[dict]) -> dict:
    """Median of each timing / memory over the runs that finished, with the spread."""
    done = [r for r in runs if "total_s" in r]
    if not done:
        return {"runs": 0, "notes": runs[-1].get("notes")}
    row = {k: statistics.median(r[k] for r in done) for k in ("fit_s", "score_s", "total_s")}
    row["peak_mem_mb"] = statistics.median(r["peak_mem_mb"] for r in done)
    totals, peaks = [r["total_s"] for r in done], [r["peak_mem_mb"] for r in done]
    row["spread"] = f"{min(totals):.3g}..{max(totals):.3g} s; {min(peaks):.0f}..{max(peaks):.0f} MB"
    row["runs"] = len(done)
    row["notes"] = done[-1]["notes"]
    return row


def _agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    if ours.dim() == 1:  # self-influence: one ranking of the train examples
        rho = evaluate.agreement(ours[None], theirs[None]).spearman_pooled
        return {"vs_kronfluence_pooled": rho}
    agree = evaluate.agreement(ours, theirs)
    return {
        "vs_kronfluence_pooled": agree.spearman_pooled,
        "vs_kronfluence_per_query": agree.spearman_per_query,
        "vs_kronfluence_top10": agree.top_k_overlap,
    }


def trained_setup(sizes, device: str, details: str, folder: str):
    """The synthetic train / test data of ``sizes``, its model trained with Adam, and
    ``<folder>/setup.pt`` holding both for the row processes. Returns (model on the CPU, the
    training row: kind, impl, total_s and notes ending in ``details``)."""
    train_set = as_tensors(load("synthetic", split="train", size=sizes.train, seed=SEED))[:2]
    query_set = as_tensors(load("synthetic", split="test", size=sizes.queries, seed=SEED))[:2]
    model = build_model(sizes)
    trained = train(
        model,
        train_set,
        steps=sizes.steps,
        batch_size=128,
        lr=3e-3,
        seed=SEED,
        device=device,
        progress=False,
    )
    query_loss, query_accuracy = evaluate_model(model, query_set)
    model.to("cpu")
    setup = {"sizes": asdict(sizes), "state": model.state_dict(), "train": train_set}
    torch.save({**setup, "query": query_set}, Path(folder) / "setup.pt")
    row = {
        "kind": "training",
        "impl": "influx.train",
        "total_s": trained.seconds,
        "notes": (
            f"{sizes.steps} Adam steps of 128; train acc {trained.final_accuracy:.3f}, "
            f"query acc {query_accuracy:.3f} (loss {query_loss:.3g}); {details}"
        ),
    }
    return model, row


def _configuration(args, config: str, sizes: Sizes, runs: int) -> list[dict]:
    """Train the configuration's model, then every (kind, method, library) row, ``runs`` times."""
    with tempfile.TemporaryDirectory() as folder:
        details = (
            f"fisher {sizes.fisher}, query_batch {sizes.query_batch}, "
            f"train_batch {sizes.train_batch}"
        )
        model, training = trained_setup(sizes, args.device, details, folder)
        shared = {
            "config": config,
            "model": _describe(sizes, model),
            "train": sizes.train,
            "queries": sizes.queries,
        }
        rows = [{**shared, **training}]
        print(
            f"influence_scale {config}: {training['notes']}, {training['total_s']:.1f}s", flush=True
        )
        for kind in sizes.kinds:
            for method in sizes.methods:
                pair = {}
                for impl, others in IMPL_ROWS:
                    if others == "diagonal" and (config == "series" or not NORMS_ROW):
                        continue
                    child = "kronfluence" if impl == "kronfluence" else "influx"
                    tag = f"{method}-{kind}-{others or 'exclude'}"
                    row = {**shared, "kind": kind, "method": method, "impl": impl}
                    row.update(_median_row([_child(args, tag, child, folder) for _ in range(runs)]))
                    path = Path(folder) / f"{tag}-{child}.pt"
                    pair[impl] = (torch.load(path) if path.exists() else None, row)
                    rows.append(row)
                    print(f"influence_scale: {json.dumps(row)}", flush=True)
                (ours, mine), (theirs, peer) = pair["influx"], pair["kronfluence"]
                if ours is not None and theirs is not None:
                    mine.update(_agreement(ours, theirs))
                if "total_s" in mine and "total_s" in peer:
                    mine["vs_kronfluence_time"] = mine["total_s"] / peer["total_s"]
                    mine["vs_kronfluence_mem"] = mine["peak_mem_mb"] / max(
                        peer["peak_mem_mb"], 1e-9
                    )
    return rows


def _slopes(rows: list[dict]) -> list[dict]:
    """Least-squares lines of total time and peak memory in N for each library of the series."""
    import numpy as np

    out = []
    for impl in ("influx", "kronfluence"):
        points = [r for r in rows if r.get("impl") == impl and "total_s" in r]
        if len(points) < 2:
            continue
        n = np.array([r["train"] for r in points], dtype=float)
        fits = {k: np.polyfit(n, [r[k] for r in points], 1) for k in ("total_s", "peak_mem_mb")}
        residual = {
            k: float(np.max(np.abs(np.polyval(fits[k], n) - [r[k] for r in points]))) for k in fits
        }
        out.append({
            "config": "series",
            "kind": "slope",
            "impl": impl,
            "total_s": 1000 * fits["total_s"][0],
            "peak_mem_mb": 1000 * fits["peak_mem_mb"][0],
            "notes": (
                f"least-squares slope per 1,000 train examples over N = "
                f"{[int(v) for v in n]}; intercepts {fits['total_s'][1]:.3g} s, "
                f"{fits['peak_mem_mb'][1]:.0f} MB; max residuals {residual['total_s']:.3g} s, "
                f"{residual['peak_mem_mb']:.0f} MB"
            ),
        })  # fmt: skip
    return out


def run(args: Namespace) -> list[dict]:
    device = args.device
    if not device.startswith("cuda"):
        # The reference timings (peer included) are for two CPU cores.
        torch.set_num_threads(2)
    quick = getattr(args, "quick", False)
    default = "cuda" if device.startswith("cuda") else "resnet8,resnet18,series"
    configs = _listed("INFLUX_SCALE_CONFIGS", set(CONFIGS)) or tuple(default.split(","))
    runs = int(os.environ.get("INFLUX_SCALE_RUNS", 1 if quick else 3))
    rows = []
    for config in configs:
        sizes = sizes_for("quick" if quick else config)
        if config != "series":
            rows += _configuration(args, config, sizes, runs)
            continue
        series = _listed("INFLUX_SCALE_SERIES", {str(n) for n in range(1, 10**6)})
        counts = [int(n) for n in series] if series else [n // (8 if quick else 1) for n in SERIES]
        part = []
        for count in counts:
            part += _configuration(
                args, "series", replace(sizes, train=count, kinds=("pairwise",)), runs
            )
        rows += part + _slopes(part)
    return rows
