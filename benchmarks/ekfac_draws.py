"""EK-FAC's sampled Fisher: the agreement bought by each extra label draw, and what it costs.

With ``fisher="sampled"`` (the default for a softmax cross-entropy) EK-FAC draws labels from
softmax(outputs) for its factor pass and again for its eigenvalue refit; ``fisher_draws`` draws
per example average out that noise at one forward + backward per example and pass each. This
check fits ``method="ekfac"`` at its defaults but for ``fisher_draws`` in 1, 2, 4, 8 (several
label seeds each) and compares the Q x N scores, by Spearman pooled over all pairs, with

- a high-draw fit of the same model (``--reference-draws``, its own label seed): what the draws
  converge to, on every task;
- the exact float64 solve at its default (``method="exact"``), where a dense Hessian is
  affordable (the digits MLP), beside Kronfluence's EK-FAC at its default damping (1e-8) and at
  influx's damping rule (``damping_factor=None``) on the same model.

Tasks (``--tasks``):

- ``digits``: the digits-MLP reference task (``benchmarks.tasks.digits_mlp``, 1,600 train with
  10% flipped labels, 50 queries, 4,810 parameters; ``--mlp-hidden`` widens it), one model per
  ``--mlp-seeds`` seed;
- ``resnet8-w8`` / ``resnet8-w16``: a GroupNorm ResNet-8 of width 8 / 16 on CIFAR-shaped
  synthetic data (``influx.data.load("synthetic")``, 1,000 / 2,000 train by default, 50
  queries), briefly trained with Adam.

    python benchmarks/ekfac_draws.py                       # all tasks, one thread
    python benchmarks/ekfac_draws.py --tasks digits --draws 1 8

Writes ``benchmarks/results/ekfac_draws-cpu.json`` and ``.md`` (or only the JSON to ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks.*` importable when run as a script

import torch  # noqa: E402

from benchmarks.common import kronfluence_pairwise, provenance, report_check  # noqa: E402
from benchmarks.tasks import digits_mlp  # noqa: E402
from influx import influence, models  # noqa: E402
from influx.data import as_tensors, load  # noqa: E402
from influx.influence import evaluate  # noqa: E402
from influx.train import cross_entropy_per_example, train  # noqa: E402

COLUMNS = [
    "task", "model_seed", "row", "draws", "label_seeds", "vs_reference", "vs_reference_spread",
    "vs_reference_per_query", "vs_exact", "vs_exact_spread", "vs_exact_per_query", "fit_s",
    "score_s", "notes",
]  # fmt: skip
RESNET_TRAIN = {"resnet8-w8": (8, 1000), "resnet8-w16": (16, 2000)}
REFERENCE_SEED = 1000  # the high-draw reference's labels: a stream no compared fit uses


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=["digits", "resnet8-w8", "resnet8-w16"])
    parser.add_argument("--draws", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--label-seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--mlp-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--mlp-hidden", type=int, default=64, help="digits MLP hidden units")
    parser.add_argument("--reference-draws", type=int, default=32)
    parser.add_argument("--train", type=int, default=None, help="ResNet train size override")
    parser.add_argument("--steps", type=int, default=60, help="ResNet training steps (Adam, 128)")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-exact", action="store_true", help="skip the exact solve (digits)")
    parser.add_argument("--out", type=Path, default=None, help="write only this JSON file")
    return parser.parse_args(argv)


def confidence(model, inputs) -> float:
    """Mean top-class probability on ``inputs``: the closer to 1, the less a label draw varies."""
    with torch.no_grad():
        return float(torch.softmax(model(inputs), -1).max(-1).values.mean())


def resnet_task(name: str, train_size: int | None, queries: int, steps: int):
    """A briefly trained GroupNorm ResNet-8 on CIFAR-shaped synthetic data."""
    width, default_size = RESNET_TRAIN[name]
    size = train_size or default_size
    train_set = as_tensors(load("synthetic", split="train", size=size, seed=0))[:2]
    query_set = as_tensors(load("synthetic", split="test", size=queries, seed=0))[:2]
    torch.manual_seed(0)
    model = models.resnet(8, width=width, norm="group")
    trained = train(model, train_set, steps=steps, batch_size=128, lr=3e-3, seed=0, progress=False)
    count = sum(p.numel() for p in model.parameters())
    note = (
        f"{size} train, {count:,} parameters, {steps} Adam steps, train acc "
        f"{trained.final_accuracy:.3f}, mean top-class probability "
        f"{confidence(model, train_set[0]):.3f}"
    )
    return model, train_set, query_set, note


def ekfac_scores(model, train_set, query_set, **options):
    start = time.perf_counter()
    fitted = influence.fit(model, cross_entropy_per_example, train_set, method="ekfac", **options)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = fitted.scores(query_set).values.double()
    return scores, fit_seconds, time.perf_counter() - start


def spearman(scores: torch.Tensor, reference: torch.Tensor) -> float:
    return evaluate.agreement(scores, reference).spearman_pooled


def per_query(found: list[torch.Tensor], reference: torch.Tensor) -> float:
    """Mean over ``found`` of the mean per-query Spearman with ``reference``."""
    return statistics.mean(evaluate.agreement(s, reference).spearman_per_query for s in found)


def summary(values: list[float]) -> tuple[float, str]:
    return statistics.mean(values), f"{min(values):.3f}..{max(values):.3f}"


def draw_rows(task, model_seed, model, train_set, query_set, exact, args, note) -> list[dict]:
    reference, fit_s, score_s = ekfac_scores(
        model, train_set, query_set, fisher_draws=args.reference_draws, seed=REFERENCE_SEED
    )
    base = {"task": task, "model_seed": model_seed}
    rows = [{
        **base, "row": "ekfac reference", "draws": args.reference_draws,
        "label_seeds": str(REFERENCE_SEED), "vs_reference": 1.0, "fit_s": fit_s,
        "score_s": score_s, "notes": note,
    }]  # fmt: skip
    if exact is not None:
        rows[0]["vs_exact"] = spearman(reference, exact)
        rows[0]["vs_exact_per_query"] = per_query([reference], exact)
    for draws in args.draws:
        found = [
            ekfac_scores(model, train_set, query_set, fisher_draws=draws, seed=seed)
            for seed in args.label_seeds
        ]
        row = {**base, "row": "ekfac", "draws": draws}
        row["label_seeds"] = ",".join(str(s) for s in args.label_seeds)
        row["vs_reference"], row["vs_reference_spread"] = summary(
            [spearman(s, reference) for s, _, _ in found]
        )
        row["vs_reference_per_query"] = per_query([s for s, _, _ in found], reference)
        if exact is not None:
            row["vs_exact"], row["vs_exact_spread"] = summary(
                [spearman(s, exact) for s, _, _ in found]
            )
            row["vs_exact_per_query"] = per_query([s for s, _, _ in found], exact)
        row["fit_s"] = statistics.median(f for _, f, _ in found)
        row["score_s"] = statistics.median(s for _, _, s in found)
        rows.append(row)
        print(f"ekfac_draws {task} seed {model_seed}: {row}", flush=True)
    return rows


def kronfluence_rows(task, model_seed, model, train_set, query_set, exact) -> list[dict]:
    rows = []
    for setting, factor in (("kronfluence default (1e-8)", 1e-8), ("kronfluence heuristic", None)):
        torch.manual_seed(0)  # its label sampling draws from the global generator
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            _, scores = kronfluence_pairwise(
                model, train_set, query_set, out, strategy="ekfac", damping_factor=factor,
                train_batch=512, query_batch=query_set[0].shape[0],
            )  # fmt: skip
            seconds = time.perf_counter() - start
        rows.append({
            "task": task, "model_seed": model_seed, "row": setting, "draws": 1,
            "vs_exact": spearman(-scores, exact), "vs_exact_per_query": per_query([-scores], exact),
            "fit_s": seconds,
            "notes": "fit + scores in fit_s; scores negated to I_up,loss",
        })  # fmt: skip
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for task in args.tasks:
        if task == "digits":
            for seed in args.mlp_seeds:
                torch.manual_seed(seed)
                digits = digits_mlp(seed=seed, num_queries=args.queries, hidden=args.mlp_hidden)
                setup = (digits.model, digits.train, digits.query)
                exact = None
                if not args.no_exact:
                    start = time.perf_counter()
                    fitted = influence.fit(
                        digits.model, digits.loss_fn, digits.train, method="exact"
                    )
                    exact = fitted.scores(digits.query).values.double()
                    print(f"exact seed {seed}: {time.perf_counter() - start:.1f}s", flush=True)
                count = sum(p.numel() for p in digits.model.parameters())
                note = (
                    f"1,600 train, {args.queries} queries, {args.mlp_hidden} hidden units, "
                    f"{count:,} parameters, mean top-class probability "
                    f"{confidence(digits.model, digits.train[0]):.3f}"
                )
                rows += draw_rows(task, seed, *setup, exact, args, note)
                if exact is not None:
                    rows += kronfluence_rows(task, seed, *setup, exact)
        else:
            model, train_set, query_set, note = resnet_task(
                task, args.train, args.queries, args.steps
            )
            rows += draw_rows(task, 0, model, train_set, query_set, None, args, note)
    if args.mlp_hidden != 64:
        for row in rows:
            row["task"] = row["task"].replace("digits", f"digits-h{args.mlp_hidden}")
    notes = (
        f"EK-FAC at its defaults but fisher_draws, {torch.get_num_threads()} CPU thread(s). "
        "`vs_reference`: Spearman pooled over all query x train pairs with a fit of "
        f"`draws` = {args.reference_draws} (label seed {REFERENCE_SEED}); `vs_exact`: with the "
        "exact float64 solve at its default. Mean over the label seeds, min..max in `_spread`; "
        "`_per_query`: the mean per-query Spearman instead of the pooled one. "
        "`fit_s`: influence.fit (factors + eigenvalue refit: 2 x draws passes over the train "
        "set), median over the label seeds; `score_s`: the Q x N scores, which do not depend "
        "on the draws. Kronfluence rows: strategy='ekfac' at its defaults (one sampled label "
        "per example and pass), fit + scores in `fit_s`."
    )
    report_check("ekfac_draws", rows, provenance("cpu"), columns=COLUMNS, notes=notes, out=args.out)


if __name__ == "__main__":
    main()
