"""EK-FAC influence at scale: CIFAR-10-shaped data, a GroupNorm ResNet, Q queries x N train.

influx ``method="ekfac"`` against Kronfluence ``strategy="ekfac"`` (and K-FAC for both when asked),
on the same trained model and the same data. Data: ``influx.data.load("synthetic")``, inputs
[N, 3, 32, 32] in 10 balanced classes; the queries are the synthetic test split. The model is a
CIFAR ResNet (``influx.models.resnet``, GroupNorm) briefly trained with Adam by ``influx.train``;
its GroupNorm affine parameters are frozen before training, so both libraries see exactly the
Conv2d / Linear weights (Kronfluence tracks only those, and influx's K-FAC refuses other trainable
parameters).

Sizes by device (``--quick`` for a smoke run):

- cpu: ResNet-8 width 16, 2,000 train x 100 queries, two threads;
- cuda: ResNet-18 width 64, 50,000 train x 2,000 queries.

Environment overrides: ``INFLUX_SCALE_TRAIN``, ``INFLUX_SCALE_QUERIES``, ``INFLUX_SCALE_DEPTH``
(8 or 18), ``INFLUX_SCALE_WIDTH``, ``INFLUX_SCALE_QUERY_BATCH`` (queries per scoring pass, both
libraries), ``INFLUX_SCALE_TRAIN_BATCH`` (train examples per scoring block, both libraries),
``INFLUX_SCALE_STEPS`` (training steps), ``INFLUX_SCALE_METHODS`` (comma list of ekfac, kfac) and
``INFLUX_SCALE_FISHER`` (empirical or sampled).

Every (method, library) row runs in a fresh subprocess, so its peak memory is its own: peak RSS
above the process' resident size before the row on CPU, ``torch.cuda.max_memory_allocated`` on
CUDA. Both sides start from the model on the CPU and the data as CPU tensors; moving them to the
device is part of the timed work.
"""

from __future__ import annotations

import json
import os
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
    "method",
    "impl",
    "model",
    "train",
    "queries",
    "fit_s",
    "score_s",
    "total_s",
    "peak_mem_mb",
    "vs_kronfluence_pooled",
    "vs_kronfluence_per_query",
    "vs_kronfluence_top10",
    "notes",
]
NOTES = (
    "Scores follow influx's sign (I_up,loss; Kronfluence's are negated). `fit_s`: curvature "
    "factors (and the EK-FAC eigenvalue refit); `score_s`: the pairwise Q x N matrix, queries in "
    "passes of `query_batch`, each pass streaming all train examples; one run each, after a "
    "one-batch warm-up. `peak_mem_mb`: peak RSS above the row's starting RSS (CPU) or "
    "`torch.cuda.max_memory_allocated` (CUDA), one subprocess per row. Damping: influx 'auto' and "
    "Kronfluence `damping_factor=None`, both 0.1 x the mean eigenvalue of each layer's block. "
    "Fisher: the empirical one (training labels) for both by default, so they estimate the same "
    "matrix; 'sampled' draws labels with each library's own generator. Factor batches and scoring "
    "blocks are `train_batch` examples on both sides. The `vs_kronfluence_*` columns compare influx's scores with "
    "Kronfluence's for the same method (Spearman pooled, mean per-query Spearman, top-10 overlap "
    "by |score|). EK-FAC refits the eigenvalues per example, so the two should agree to rounding; "
    "K-FAC differs by construction: Kronfluence divides both factors of a Conv2d by examples x "
    "positions, influx follows KFC (activations summed over positions, output gradients "
    "averaged), so each conv block differs by a factor of its positions, which reweights layers."
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


DEFAULT_SIZES = {
    "quick": Sizes(
        depth=8, width=8, train=256, queries=16, query_batch=16, train_batch=256, steps=20
    ),
    "cpu": Sizes(
        depth=8, width=16, train=2000, queries=100, query_batch=100, train_batch=500, steps=60
    ),
    # One pass over the train set per 250 queries: influx holds the query features and their
    # preconditioned copy, 2 x 250 x 11.2M floats = 22 GB, plus one train block of 128.
    "cuda": Sizes(
        depth=18, width=64, train=50_000, queries=2000, query_batch=250, train_batch=128, steps=400
    ),
}
ENV = {
    "INFLUX_SCALE_DEPTH": "depth",
    "INFLUX_SCALE_WIDTH": "width",
    "INFLUX_SCALE_TRAIN": "train",
    "INFLUX_SCALE_QUERIES": "queries",
    "INFLUX_SCALE_QUERY_BATCH": "query_batch",
    "INFLUX_SCALE_TRAIN_BATCH": "train_batch",
    "INFLUX_SCALE_STEPS": "steps",
}


def sizes_for(device: str, quick: bool) -> Sizes:
    sizes = DEFAULT_SIZES["quick" if quick else "cuda" if device.startswith("cuda") else "cpu"]
    changes = {field: int(os.environ[name]) for name, field in ENV.items() if name in os.environ}
    if "INFLUX_SCALE_METHODS" in os.environ:
        methods = tuple(m.strip() for m in os.environ["INFLUX_SCALE_METHODS"].split(",") if m)
        unknown = set(methods) - {"ekfac", "kfac"}
        if unknown:
            raise ValueError(f"INFLUX_SCALE_METHODS: unknown {sorted(unknown)}; use ekfac, kfac")
        changes["methods"] = methods
    if "INFLUX_SCALE_FISHER" in os.environ:
        fisher = os.environ["INFLUX_SCALE_FISHER"]
        if fisher not in ("empirical", "sampled"):
            raise ValueError(f"INFLUX_SCALE_FISHER must be empirical or sampled; got {fisher!r}")
        changes["fisher"] = fisher
    sizes = replace(sizes, **changes)
    # Fewer queries than a pass holds: one pass.
    return replace(sizes, query_batch=min(sizes.query_batch, sizes.queries))


def build_model(sizes: Sizes) -> nn.Module:
    """The ResNet with its GroupNorm affine parameters frozen (only Conv2d / Linear train)."""
    torch.manual_seed(SEED)
    model = models.resnet(sizes.depth, width=sizes.width, norm="group")
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            module.requires_grad_(False)
    return model


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


def _influx(model, train_set, query_set, sizes: Sizes, method: str, device: str):
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
    )
    synchronize(device)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
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
    note = f"damping per layer {min(dampings):.3g}..{max(dampings):.3g}"
    return scores, fit_seconds, score_seconds, note


def _kronfluence(model, train_set, query_set, sizes: Sizes, strategy: str, device: str):
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
        analyzer.compute_pairwise_scores(
            "scores",
            "factors",
            query_data,
            train_data,
            per_device_query_batch_size=sizes.query_batch,
            per_device_train_batch_size=sizes.train_batch,
            # None = 0.1 x the mean eigenvalue per module, as influx's damping='auto'.
            score_args=ScoreArguments(damping_factor=None),
        )
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].cpu()
        synchronize(device)
        score_seconds = time.perf_counter() - start
    # Kronfluence reports g_q^T H^-1 g_z (positive = helpful) for a summed loss: negate to I_up,loss.
    return -scores, fit_seconds, score_seconds, "damping_factor=None"


IMPLS = {"influx": _influx, "kronfluence": _kronfluence}


def run_one(args: Namespace) -> int:
    """Child process: one (method, impl) row; scores to ``<dir>/<method>-<impl>.pt``, row as JSON."""
    method, impl, folder = args.one.split(":", 2)
    device = args.device
    if not device.startswith("cuda"):
        torch.set_num_threads(2)
    setup = torch.load(Path(folder) / "setup.pt")
    sizes = Sizes(**{**setup["sizes"], "methods": tuple(setup["sizes"]["methods"])})
    model = build_model(sizes)
    model.load_state_dict(setup["state"])
    train_set, query_set = setup["train"], setup["query"]
    row = {"method": method, "impl": impl}
    try:
        if impl == "kronfluence":
            import kronfluence.analyzer  # noqa: F401  (its import is not part of the row's memory)
        _warm_up(model, *train_set, device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = current_rss_bytes()
        scores, fit_s, score_s, note = IMPLS[impl](
            model, train_set, query_set, sizes, method, device
        )
        peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss_bytes()
        row.update(
            fit_s=fit_s,
            score_s=score_s,
            total_s=fit_s + score_s,
            peak_mem_mb=max(0, peak - base) / 2**20,
            notes=note,
        )
        torch.save(scores.float(), Path(folder) / f"{method}-{impl}.pt")
    except Exception as error:  # a library that fails on this configuration is a row, not a crash
        row["notes"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    print(json.dumps(row))
    return 0


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


def _child(args: Namespace, method: str, impl: str, folder: str) -> dict:
    root = Path(__file__).resolve().parents[2]
    command = [
        sys.executable,
        str(root / "benchmarks" / "run.py"),
        "--suite",
        "influence_scale",
        "--device",
        args.device,
        "--one",
        f"{method}:{impl}:{folder}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return {"method": method, "impl": impl, "notes": f"failed: {last[0][:200]}"}


def run(args: Namespace) -> list[dict]:
    device = args.device
    if not device.startswith("cuda"):
        # The reference timings (peer included) are for two CPU cores.
        torch.set_num_threads(2)
    sizes = sizes_for(device, getattr(args, "quick", False))
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
    shared = {"model": _describe(sizes, model), "train": sizes.train, "queries": sizes.queries}
    rows = [
        {
            "method": "training",
            "impl": "influx.train",
            **shared,
            "total_s": trained.seconds,
            "notes": (
                f"{sizes.steps} Adam steps of 128; train acc {trained.final_accuracy:.3f}, "
                f"query acc {query_accuracy:.3f} (loss {query_loss:.3g}); fisher {sizes.fisher}, "
                f"query_batch {sizes.query_batch}, train_batch {sizes.train_batch}"
            ),
        }
    ]
    print(f"influence_scale: {rows[0]['notes']}, {trained.seconds:.1f}s", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        torch.save(
            {
                "sizes": asdict(sizes),
                "state": model.state_dict(),
                "train": train_set,
                "query": query_set,
            },
            Path(folder) / "setup.pt",
        )
        for method in sizes.methods:
            pair = {}
            for impl in IMPLS:
                row = {**_child(args, method, impl, folder), **shared}
                path = Path(folder) / f"{method}-{impl}.pt"
                pair[impl] = torch.load(path) if path.exists() else None
                rows.append(row)
                print(f"influence_scale: {json.dumps(row)}", flush=True)
            if pair["influx"] is not None and pair["kronfluence"] is not None:
                agree = evaluate.agreement(pair["influx"], pair["kronfluence"])
                rows[-2].update(
                    vs_kronfluence_pooled=agree.spearman_pooled,
                    vs_kronfluence_per_query=agree.spearman_per_query,
                    vs_kronfluence_top10=agree.top_k_overlap,
                )
    return rows
