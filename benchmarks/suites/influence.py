"""Influence estimators on the digits-MLP reference task, influx and peers side by side.

Task (``benchmarks.tasks.digits_mlp``): digits, 10% flipped labels, 1,600 train / 50 test
queries, a 64-64-10 tanh MLP (4,810 parameters), full-batch Adam, checkpoints at 100/200/300.

Every row (each influx method and each peer: Kronfluence EK-FAC / K-FAC, TRAK, Captum TracInCP)
runs in its own fresh process (``run_one``), which rebuilds the deterministic task, times one cold
run of fit + pairwise scores 50 x 1,600, measures its peak memory above the state after building
the task, and writes its scores (and self-scores) to a temporary file. The parent checks that each
child built the same task (a fingerprint of data, trained parameters and checkpoints), then
evaluates every row the same way: Spearman pooled and per query and top-10 overlap vs the
exact-Hessian and the exact-GGN influence, self-influence mislabel AUC, sign agreement / Pearson
with warm-start retraining on 60 (query, train) pairs, and the LDS with a 95% bootstrap interval.
Peers' scores are converted to influx's sign (I_up,loss: negative = helpful).
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
import warnings
from argparse import Namespace
from pathlib import Path

import torch

from benchmarks.common import (
    PairDataset,
    fingerprint,
    kronfluence_pairwise,
    memory_mark,
    peak_mem_mb,
    run_child,
)
from benchmarks.tasks import InfluenceTask, digits_mlp
from influx import influence
from influx.influence import evaluate

COLUMNS = [
    "method",
    "impl",
    "seconds",
    "peak_mem_mb",
    "vs_hessian_pooled",
    "vs_hessian_per_query",
    "vs_hessian_top10",
    "vs_ggn_pooled",
    "vs_ggn_per_query",
    "vs_ggn_top10",
    "mislabel_auc",
    "retrain_sign",
    "retrain_pearson",
    "lds",
    "lds_ci",
]
TRAK_DIM = 1024
THREADS = 2  # the reference timings (peers included) are for two CPU cores
NOTES = (
    "Scores follow influx's sign (I_up,loss; TracIn-like scores are negated for comparisons). "
    "Every row runs in its own fresh process, which rebuilds the same task (checked by a "
    "fingerprint of data, trained parameters and checkpoints). `seconds` = fit + pairwise "
    "50 x 1,600 scores, one cold run per row, timed the same way for every library: imports and "
    "inputs prepared before the clock starts, first-call costs included (rows take seconds to "
    f"tens of seconds, so they are not repeated), {THREADS} threads. `peak_mem_mb`: peak resident "
    "memory of that fit + scoring above the state after building the task, in the row's own "
    "process. Headline rows run at each method's own defaults ('auto' damping for cg / lissa / "
    "arnoldi, with no information from the exact solve); rows marked [exact damping] are told the "
    "exact solve's damping. Kronfluence runs at its default damping (1e-8) and at its heuristic "
    "(0.1 x mean eigenvalue per module, influx's 'auto' rule). TRAK (both libraries) projects to "
    "1,024 <= 1,600 train examples, so its projected Fisher is invertible without "
    "regularisation. Retraining: for each of 5 queries the 12 train points of largest "
    "exact-Hessian |influence|, leave-one-out by warm-start full-batch Adam (300 steps) against an "
    "unperturbed run. LDS: models trained on random halves."
)

# Influence methods and their options on this task; sign +1 methods are TracIn-like.
INFLUX_METHODS = {
    "exact-hessian": ("exact", {"curvature": "hessian"}),
    "exact-ggn": ("exact", {"curvature": "ggn"}),
    "exact-hessian-eigh": ("exact", {"curvature": "hessian", "solver": "eigh"}),
    "cg": ("cg", {"curvature": "hessian", "max_iterations": 100, "tolerance": 1e-4}),
    "cg-ekfac": (
        "cg",
        {
            "curvature": "hessian",
            "preconditioner": "ekfac",
            "max_iterations": 30,
            "tolerance": 1e-4,
        },
    ),
    "cg-ggn-ekfac": (
        "cg",
        {"curvature": "ggn", "preconditioner": "ekfac", "max_iterations": 30, "tolerance": 1e-4},
    ),
    "lissa": ("lissa", {"curvature": "hessian", "max_iterations": 200, "tolerance": 1e-5}),
    "lissa-ekfac": (
        "lissa",
        {
            "curvature": "hessian",
            "preconditioner": "ekfac",
            "max_iterations": 400,
            "tolerance": 1e-6,
        },
    ),
    "arnoldi": ("arnoldi", {"curvature": "hessian", "rank": 100}),
    # The matrix-free solvers again, told the exact solve's damping (information a user of the
    # matrix-free methods does not have: labelled, never the headline).
    "cg [exact damping]": (
        "cg",
        {"curvature": "hessian", "max_iterations": 100, "tolerance": 1e-4},
    ),
    "lissa-ekfac [exact damping]": (
        "lissa",
        {
            "curvature": "hessian",
            "preconditioner": "ekfac",
            "max_iterations": 400,
            "tolerance": 1e-6,
        },
    ),
    "arnoldi [exact damping]": ("arnoldi", {"curvature": "hessian", "rank": 100}),
    "kfac": ("kfac", {}),
    "ekfac": ("ekfac", {}),
    # 1,024 <= 1,600 train examples: the projected Fisher is full rank without regularisation.
    "trak": ("trak", {"dim": TRAK_DIM}),
    "trak-kron": ("trak", {"dim": TRAK_DIM, "projection": "kronecker"}),
    "tracin": ("tracin", {}),
    "grad_dot": ("grad_dot", {}),
    "grad_cos": ("grad_cos", {}),
}
# Self-influence of every train point costs N / Q = 32 times the pairwise solve for the iterative
# solvers: skipped here (their self-influence is the same solve, see the unit tests).
NO_SELF_INFLUENCE = (
    "cg", "cg-ekfac", "cg-ggn-ekfac", "lissa", "lissa-ekfac", "cg [exact damping]",
    "lissa-ekfac [exact damping]",
)  # fmt: skip


class _Timed:
    """Wall time and peak memory (above the state on entry) of the timed section of a row."""

    def __enter__(self) -> _Timed:
        self.base = memory_mark("cpu")
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self.peak_mem_mb = peak_mem_mb(self.base, "cpu")


def _influx(task: InfluenceTask, name: str, dampings: dict[str, float]):
    method, options = INFLUX_METHODS[name]
    options = dict(options)
    if name.endswith("[exact damping]"):
        # The exact solve's 'auto' damping, from the full spectrum.
        options["damping"] = dampings[options["curvature"]]
    if method == "tracin":
        options.update(checkpoints=task.checkpoints, learning_rates=task.learning_rates)
    if method == "trak":
        options.update(checkpoints=task.checkpoints)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _Timed() as timed:
            fitted = influence.fit(task.model, task.loss_fn, task.train, method=method, **options)
            scores = fitted.scores(task.query).values.double()
    self_scores = None if name in NO_SELF_INFLUENCE else fitted.self_influence().double()
    damping = fitted.diagnostics.get("damping")
    if not isinstance(damping, (int, float, type(None))):
        # per-layer dampings (kfac, ekfac, trak) travel as text
        damping = str(damping)[:200]
    facts = {
        "damping": damping,
        "curvature": fitted.diagnostics.get("curvature"),
        "notes": [str(w.message)[:160] for w in caught],
    }
    # Compare everything in the I_up,loss convention: negate TracIn-like scores.
    return scores * -fitted.sign, self_scores, timed, facts


# --------------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------------


def _kronfluence(task: InfluenceTask, strategy: str, damping_factor: float | None):
    from kronfluence.arguments import ScoreArguments

    with tempfile.TemporaryDirectory() as out:
        with _Timed() as timed:
            analyzer, scores = kronfluence_pairwise(
                task.model, task.train, task.query, out, strategy=strategy,
                damping_factor=damping_factor, train_batch=1600, query_batch=50,
            )  # fmt: skip
        analyzer.compute_self_scores(
            "self",
            strategy,
            PairDataset(task.train),
            per_device_train_batch_size=1600,
            score_args=ScoreArguments(damping_factor=damping_factor),
        )
        self_scores = analyzer.load_self_scores("self")["all_modules"].double()
    # Kronfluence reports g_q^T H^-1 g_z (positive = helpful) for a summed loss: negate to I_up,loss.
    return -scores, self_scores, timed, {}


def _trak(task: InfluenceTask):
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model = copy.deepcopy(task.model)
    count = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as out, _Timed() as timed:
        projector = BasicProjector(
            grad_dim=count,
            proj_dim=TRAK_DIM,
            seed=0,
            proj_type=ProjectionType.rademacher,
            device="cpu",
            dtype=torch.float32,
        )
        traker = TRAKer(
            model=model,
            task="image_classification",
            train_set_size=1600,
            save_dir=out,
            device="cpu",
            projector=projector,
            proj_dim=TRAK_DIM,
            use_half_precision=False,
            logging_level=40,
        )
        for model_id, state in enumerate(task.checkpoints):
            traker.load_checkpoint(state, model_id=model_id)
            traker.featurize(batch=(task.train[0], task.train[1]), num_samples=1600)
        traker.finalize_features()
        for model_id, state in enumerate(task.checkpoints):
            traker.start_scoring_checkpoint("q", state, model_id=model_id, num_targets=50)
            traker.score(batch=(task.query[0], task.query[1]), num_samples=50)
        scores = torch.as_tensor(traker.finalize_scores("q")).T.double()  # [Q, N]
    return -scores, None, timed, {}


def _captum_tracin(task: InfluenceTask):
    from captum.influence import TracInCP

    model = copy.deepcopy(task.model)
    with tempfile.TemporaryDirectory() as out:
        paths = []
        for t, (state, lr) in enumerate(zip(task.checkpoints, task.learning_rates, strict=True)):
            path = f"{out}/ckpt{t}.pt"
            torch.save({"state": state, "lr": lr}, path)
            paths.append(path)

        def load(m, path):
            saved = torch.load(path)
            m.load_state_dict(saved["state"])
            return saved["lr"]

        with _Timed() as timed:
            tracin = TracInCP(
                model,
                PairDataset(task.train),
                paths,
                checkpoints_load_func=load,
                loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
                batch_size=1600,
            )
            scores = tracin.influence((task.query[0], task.query[1])).double()
        self_scores = tracin.self_influence(
            torch.utils.data.DataLoader(PairDataset(task.train), batch_size=1600)
        )
    return -scores, self_scores.double(), timed, {}


# Kronfluence's own default damping is 1e-8; its heuristic (damping_factor=None: 0.1 x the mean
# eigenvalue of each module) is the rule influx's 'auto' uses per layer, i.e. matched settings.
PEERS = {
    ("ekfac", "kronfluence [default damping 1e-8]"): lambda task: _kronfluence(task, "ekfac", 1e-8),
    ("ekfac", "kronfluence [heuristic = influx's rule]"): lambda task: _kronfluence(
        task, "ekfac", None
    ),
    ("kfac", "kronfluence [default damping 1e-8]"): lambda task: _kronfluence(task, "kfac", 1e-8),
    ("kfac", "kronfluence [heuristic = influx's rule]"): lambda task: _kronfluence(
        task, "kfac", None
    ),
    ("trak", "traker"): _trak,
    ("tracin", "captum"): _captum_tracin,
}


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


def task_fingerprint(task: InfluenceTask) -> str:
    """Fingerprint of what every row depends on: data, trained parameters and checkpoints."""
    return fingerprint(
        task.train, task.query, task.flipped, task.model.state_dict(), task.checkpoints,
        task.learning_rates, task.initial_state,
    )  # fmt: skip


def _build_task() -> InfluenceTask:
    """The same task in every process: same seed, same thread count (reductions depend on it)."""
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    return digits_mlp()


def run_one(args: Namespace) -> int:
    """Child process: one row, given as JSON ``{"method", "impl", "out", "dampings"}``; writes
    the scores and self-scores to ``out`` and prints the row as JSON on its last line."""
    spec = json.loads(args.one)
    name, impl = spec["method"], spec["impl"]
    task = _build_task()
    row = {"method": name, "impl": impl, "task": task_fingerprint(task)}
    try:
        if impl == "influx":
            scores, self_scores, timed, facts = _influx(task, name, spec["dampings"])
        else:
            scores, self_scores, timed, facts = PEERS[(name, impl)](task)
        row.update(facts, seconds=timed.seconds, peak_mem_mb=timed.peak_mem_mb)
        torch.save({"scores": scores, "self_scores": self_scores}, spec["out"])
    except Exception as error:  # a peer that fails is reported, not fatal
        row["notes"] = [f"{type(error).__name__}: {error}"[:200]]
    print(json.dumps(row))
    return 0


def run(args: Namespace) -> list[dict]:
    quick = getattr(args, "quick", False)
    task = _build_task()
    expected = task_fingerprint(task)
    names = (
        list(INFLUX_METHODS)
        if not quick
        else ["exact-hessian", "exact-ggn", "cg", "ekfac", "tracin", "grad_dot"]
    )
    keys = [(name, "influx") for name in names] + ([] if quick else list(PEERS))
    results, dampings = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        # The exact rows come first: the [exact damping] rows are told their damping.
        for i, (name, impl) in enumerate(keys):
            out = Path(scratch) / f"row{i}.pt"
            spec = {"method": name, "impl": impl, "out": str(out), "dampings": dampings}
            row = run_child("influence", json.dumps(spec), args)
            if row.get("task", expected) != expected:
                raise RuntimeError(
                    f"the child for {name} ({impl}) built a different task "
                    f"(fingerprint {row['task']} != {expected}): its scores cannot be compared"
                )
            if name in ("exact-hessian", "exact-ggn") and row.get("damping") is not None:
                dampings[row["curvature"]] = row["damping"]
            saved = torch.load(out, weights_only=True) if out.exists() else {}
            results[(name, impl)] = (row, saved.get("scores"), saved.get("self_scores"))
            print(
                f"influence: {name} ({impl}) {row.get('seconds', float('nan')):.1f}s "
                f"{row.get('peak_mem_mb', float('nan')):.0f} MB {row.get('damping') or ''}",
                flush=True,
            )
    for reference in (("exact-hessian", "influx"), ("exact-ggn", "influx")):
        if results[reference][1] is None:
            raise RuntimeError(f"the reference row {reference[0]} failed: {results[reference][0]}")
    hessian, ggn = results[("exact-hessian", "influx")][1], results[("exact-ggn", "influx")][1]
    retrain = evaluate.retrain_ground_truth(
        task.model,
        task.loss_fn,
        task.train,
        task.query,
        evaluate.strongest_pairs(hessian, queries=5, per_query=12),
        steps=100 if quick else 300,
    )
    subsets = evaluate.train_subset_models(
        task.model,
        task.loss_fn,
        task.train,
        task.query,
        num_subsets=20 if quick else 100,
        fraction=0.5,
        steps=task.steps,
        lr=task.lr,
        init=task.initial_state,
    )
    losses = task.loss_fn(task.model(task.train[0]), task.train[1]).detach()
    rows = [
        {
            "method": "train loss",
            "impl": "baseline",
            "mislabel_auc": evaluate.mislabel_auc(losses, task.flipped).auc,
        }
    ]
    for (name, impl), (child, scores, self_scores) in results.items():
        row = {"method": name, "impl": impl, "seconds": child.get("seconds")}
        row["peak_mem_mb"] = child.get("peak_mem_mb")
        if scores is not None:
            for label, reference in (("hessian", hessian), ("ggn", ggn)):
                agree = evaluate.agreement(scores, reference)
                row[f"vs_{label}_pooled"] = agree.spearman_pooled
                row[f"vs_{label}_per_query"] = agree.spearman_per_query
                row[f"vs_{label}_top10"] = agree.top_k_overlap
            truth = retrain.compare(scores, sign=-1.0)
            row["retrain_sign"], row["retrain_pearson"] = truth["sign_agreement"], truth["pearson"]
            score_lds = evaluate.lds(scores, subsets, sign=-1.0)
            row["lds"], row["lds_ci"] = (
                score_lds.mean,
                f"[{score_lds.interval[0]:.3f}, {score_lds.interval[1]:.3f}]",
            )
        if self_scores is not None:
            row["mislabel_auc"] = evaluate.mislabel_auc(self_scores, task.flipped).auc
        if child.get("notes"):
            row["notes"] = "; ".join(dict.fromkeys(child["notes"]))
        rows.append(row)
    return rows
