"""Batch interlacing vs robust aggregation: is data poisoning a Byzantine attack in disguise?
(examples/README.md)

Each training batch is split into M micro-batches (the "clients" of federated learning); their
mean gradients are combined by an aggregation rule (mean, coordinate median, trimmed mean, Krum,
multi-Krum) before the optimizer steps. The same budget of Gaussian poisons (``x + xi``, labels
kept; Pawelczyk et al. 2024) is placed in two ways, by ``influx.poison`` schedules over
micro-batches of size b:

- ``concentrated``: the poisons fill whole micro-batches (a few fully poisoned clients: the
  Byzantine picture that robust aggregators are built to stop);
- ``interlaced``: the poisons are spread over every micro-batch (each holds its share).

Every seed s draws its own poison subset and noise, schedule, initialization and batch order
(``influx.seeds.derive_seed(s, k)``), and trains one clean run (no poisons, mean rule: the null
check) and one run per (placement, rule). Per run: test accuracy and the GUS of the poisons
(``influx.audit.gus``: z = sqrt(n) GUS, N(0, 1) when the model never fit the noise; one-sided p,
two-sided p, |z| from ``influx.stats.z_test``; the fresh-noise null of the same model, seeded per
seed); for Krum and multi-Krum the share of poisons among the examples of the micro-batches they
selected (the data's share is the poison fraction); optionally (``--influence ekfac``) the AUC of
telling poisons from clean points by self-influence.

Over seeds (``influx.stats``): mean [95% t-interval] and per-seed values; the fraction of seeds
where the GUS test rejects at one-sided level 0.01 (z > 2.326), with its Clopper-Pearson
interval; the Stouffer z of all seeds (sum z / sqrt(S), N(0, 1) under the null); the per-seed
difference to the mean rule under the same placement (paired t and Wilcoxon p). A rule "stops"
the poisons of a placement only where its z is consistent with N(0, 1) and the seeds can tell:
neither the t-interval of the mean z nor the Stouffer z rejects, and the interval stays below the
per-seed critical value 2.326 (see :func:`verdict`; "inconclusive" otherwise).

    python examples/interlacing.py                         # digits + MLP, 8 seeds, a few minutes
    python examples/interlacing.py --dataset cifar10 --model resnet18 --device cuda --epochs 30

Writes ``examples/results/interlacing_<dataset>_<model>.{json,png}``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _setup import (  # noqa: E402
    Results,
    example_parser,
    limit_threads,
    over_seeds,
    results_stem,
    save_figure,
)
from scipy import stats as scipy_stats  # noqa: E402

from influx import aggregate, data, influence, models, poison, stats, train  # noqa: E402
from influx.audit.gus import gus_of  # noqa: E402
from influx.seeds import derive_seed  # noqa: E402

LOSS = train.cross_entropy_per_example
PLACEMENTS = ("concentrated", "interlaced")
ALPHA = 0.01  # one-sided level of the per-seed GUS test: reject when z > 2.326
Z_CRITICAL = float(scipy_stats.norm.isf(ALPHA))
# sub-seed streams of one seed
POISON_STREAM, SCHEDULE_STREAM, INIT_STREAM, ORDER_STREAM, NULL_STREAM = range(5)


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0], dtype="float32")
    parser.add_argument("--train-size", type=int, default=1024,
                        help="training examples (rounded down to a multiple of the step)")  # fmt: skip
    parser.add_argument("--poison-fraction", type=float, default=0.125)
    parser.add_argument("--noise-std", type=float, default=1.0, help="Gaussian poison std")
    parser.add_argument("--micro-batch", type=int, default=8, help="examples per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step")
    parser.add_argument("--f", type=int, default=2, help="Byzantine count for Krum")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--influence", default="none",
                        help="self-influence method (ekfac, ...) or none (the default: it "
                        "doubles the run time)")  # fmt: skip
    return parser.parse_args(argv)


class SelectionRecorder:
    """Krum / multi-Krum that also records which micro-batches it selected at each step."""

    def __init__(self, f: int, m: int):
        self.rule = aggregate.krum(f) if m == 1 else aggregate.multi_krum(f, m)
        self.f, self.m = f, m
        self.min_inputs = self.rule.min_inputs
        self.selected: list[list[int]] = []

    def __call__(self, gradients):
        stack = torch.cat([g.flatten(1) for g in gradients.values()], dim=1)
        order = aggregate.krum_scores(stack, self.f).sort(stable=True).indices
        self.selected.append(order[: self.m].tolist())
        return self.rule(gradients)

    def __repr__(self) -> str:
        return repr(self.rule)


def aggregators(args) -> dict:
    m = args.micro_batches
    return {
        "mean": aggregate.mean,
        "median": aggregate.coordinate_median,
        "trimmed_mean": lambda: aggregate.trimmed_mean(count=args.f),
        "krum": lambda: SelectionRecorder(args.f, 1),
        "multi_krum": lambda: SelectionRecorder(args.f, m - 2 * args.f),
    }


def load(args):
    """(dataset, train tensors with a multiple of the step size, test tensors)."""
    step = args.micro_batch * args.micro_batches
    train_set = data.load(args.dataset, root=args.data_dir, split="train")
    n = min(args.train_size, len(train_set))
    n -= n % step  # every step holds M full micro-batches
    inputs, targets, indices = data.as_tensors(train_set)
    dtype = getattr(torch, args.dtype)
    train_data = (inputs[:n].to(args.device, dtype), targets[:n].to(args.device), indices[:n])
    test = data.load(args.dataset, root=args.data_dir, split="test")
    test_inputs, test_targets, _ = data.as_tensors(test)
    test_data = (test_inputs.to(args.device, dtype), test_targets.to(args.device))
    return train_set, train_data, test_data


def selected_poison_share(recorder, result, poisoned: torch.Tensor, args) -> float:
    """Share of poisons among the examples of the micro-batches the rule selected."""
    b, m = args.micro_batch, args.micro_batches
    order = torch.cat(result.epoch_orders)  # dataset indices, step after step
    flags = torch.isin(order, poisoned.cpu()).reshape(-1, m, b)  # [steps, M, b]
    chosen = torch.tensor(recorder.selected, device="cpu")  # [steps, m_selected]
    picked = flags[torch.arange(flags.shape[0], device="cpu")[:, None], chosen]
    return picked.float().mean().item()


def poisoned_tensors(gaussian, args):
    inputs, targets, indices = data.as_tensors(gaussian.dataset)
    return inputs.to(args.device, getattr(torch, args.dtype)), targets.to(args.device), indices


def new_model(args, dataset, seed: int) -> torch.nn.Module:
    torch.manual_seed(derive_seed(seed, INIT_STREAM))
    model = models.build(args.model, dataset.input_shape, dataset.num_classes, width=args.width)
    return model.to(args.device, getattr(torch, args.dtype))


def self_influence_auc(model, gaussian, args) -> float:
    """P(s(poison) > s(clean)) over all pairs: the AUC of detecting poisons by self-influence."""
    fitted = influence.fit(model, LOSS, poisoned_tensors(gaussian, args)[:2], method=args.influence)
    scores = fitted.self_influence().cpu().double()
    mask = gaussian.mask.cpu()
    return (scores[mask][:, None] > scores[~mask][None, :]).double().mean().item()


def one_run(args, dataset, train_data, test_data, placement, make_rule, gaussian, seed) -> dict:
    """Train with one aggregation rule on one placement ("clean": no poisons) and score it."""
    model = new_model(args, dataset, seed)
    rule = make_rule()
    if placement == "clean":
        inputs, targets, indices = train_data
        sampling = "shuffle"
    else:
        inputs, targets, indices = poisoned_tensors(gaussian, args)
        make = poison.interlaced if placement == "interlaced" else poison.concentrated
        sampling = make(gaussian.mask, args.micro_batch, seed=derive_seed(seed, SCHEDULE_STREAM))
    start = time.perf_counter()
    result = train.train(
        model, (inputs, targets, indices), optimizer="adam", lr=args.lr, epochs=args.epochs,
        batch_size=args.micro_batch * args.micro_batches, micro_batches=args.micro_batches,
        aggregator=rule, sampling=sampling, seed=derive_seed(seed, ORDER_STREAM), progress=False,
    )  # fmt: skip
    model.eval()
    _, accuracy = train.evaluate(model, test_data)
    # the clean model never saw the noise: its GUS is a draw from the N(0, 1) null
    scores = gus_of(model, LOSS, gaussian, null_seed=derive_seed(seed, NULL_STREAM))
    test = stats.z_test(scores.z)
    row = {"test_accuracy": accuracy, "train_accuracy": result.final_accuracy,
           "gus_z": scores.z, "gus_p_one_sided": test["p_one_sided"],
           "gus_p_two_sided": test["p_two_sided"], "gus_abs_z": test["abs_z"],
           "gus_tpr_at_fpr_0_01": scores.tpr_at_fpr, "null_z": scores.null_z}  # fmt: skip
    if args.influence != "none":
        row["self_influence_auc"] = self_influence_auc(model, gaussian, args)
    if isinstance(rule, SelectionRecorder):
        row["selected_poison_share"] = selected_poison_share(rule, result, gaussian.indices, args)
    row["seconds"] = time.perf_counter() - start
    return row


def run_seed(args, dataset, train_data, test_data, seed: int) -> dict:
    """One seed: the clean run and every (placement, rule)."""
    gaussian = poison.gaussian(train_data, fraction=args.poison_fraction,
                               noise_std=args.noise_std, seed=derive_seed(seed, POISON_STREAM))  # fmt: skip
    rules = aggregators(args)
    record = {"clean": {"mean": one_run(args, dataset, train_data, test_data, "clean",
                                        rules["mean"], gaussian, seed)}}  # fmt: skip
    for placement in PLACEMENTS:
        record[placement] = {
            name: one_run(args, dataset, train_data, test_data, placement, make, gaussian, seed)
            for name, make in rules.items()
        }
        zs = {name: round(row["gus_z"], 2) for name, row in record[placement].items()}
        print(f"seed {seed} {placement}: GUS z {zs}", flush=True)
    record["poisons"] = gaussian.count
    return record


# ------------------------------------------------------------------------------------------------
# Over seeds
# ------------------------------------------------------------------------------------------------


def stouffer(zs) -> dict:
    """sum z / sqrt(S): N(0, 1) when every seed's z is (independent seeds)."""
    combined = float(np.sum(zs) / math.sqrt(len(zs)))
    return stats.z_test(combined)


def verdict(z_summary: dict, combined: dict) -> str:
    """What the seeds allow about a (placement, rule):

    - "detectable": the poisons are still in the model (the 95% interval of the mean z lies above
      0, or the Stouffer z of all seeds rejects at one-sided 0.01);
    - "stopped": consistent with the N(0, 1) null and precise enough to say so (not detectable,
      and the interval's upper end is below the per-seed critical value 2.326);
    - "inconclusive": neither (an interval too wide to tell).
    """
    low, high = z_summary["low"], z_summary["high"]
    if (not math.isnan(low) and low > 0.0) or combined["p_one_sided"] <= ALPHA:
        return "detectable"
    if not math.isnan(high) and high < Z_CRITICAL:
        return "stopped"
    return "inconclusive"


def gus_summary(rows: list[dict]) -> dict:
    zs = [row["gus_z"] for row in rows]
    z_summary = stats.summarize(zs).to_dict()
    combined = stouffer(zs)
    return {
        "gus_z": z_summary,
        "fraction_significant": stats.fraction_significant(
            [row["gus_p_one_sided"] for row in rows], ALPHA
        ).to_dict(),
        "stouffer": combined,
        "verdict": verdict(z_summary, combined),
    }


def summarize_runs(records: list[dict], args) -> dict:
    """Per (placement, rule): every metric summarized, the GUS verdict, and paired differences to
    the mean rule of the same placement."""
    summary = {"clean": {"mean": {**stats.summarize_records([r["clean"]["mean"] for r in records]),
                                  **gus_summary([r["clean"]["mean"] for r in records])}}}  # fmt: skip
    for placement in PLACEMENTS:
        summary[placement] = {}
        for name in aggregators(args):
            rows = [r[placement][name] for r in records]
            means = [r[placement]["mean"] for r in records]
            entry = {**stats.summarize_records(rows), **gus_summary(rows)}
            if name != "mean":
                entry["minus_mean"] = {
                    key: stats.paired_difference([r[key] for r in rows],
                                                 [m[key] for m in means]).to_dict()
                    for key in ("gus_z", "test_accuracy")
                }  # fmt: skip
            summary[placement][name] = entry
    return summary


def print_table(summary: dict, args) -> None:
    def cell(entry, key):
        s = entry[key]
        return f"{s['mean']:6.2f} [{s['low']:6.2f}, {s['high']:6.2f}]"

    print(f"{'placement':>13} {'rule':>12} {'GUS z':>24} {'signif.':>8} {'test acc':>24}  verdict")
    for placement in ("clean", *PLACEMENTS):
        for name, entry in summary[placement].items():
            frac = entry["fraction_significant"]
            print(f"{placement:>13} {name:>12} {cell(entry, 'gus_z'):>24} "
                  f"{frac['k']:>3}/{frac['n']:<4} {cell(entry, 'test_accuracy'):>24}  "
                  f"{entry['verdict']}")  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Figure
# ------------------------------------------------------------------------------------------------


def _interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width 0 with one seed."""
    s = stats.summarize(values)
    return s.mean, (0.0 if s.n == 1 else s.high - s.mean)


def _bars(ax, records, names, key, args) -> None:
    """Mean with 95% error bars per (placement, rule), per-seed values as dots."""
    width = 0.38
    for k, placement in enumerate(PLACEMENTS):
        shown = [n for n in names if key in records[0][placement][n]]
        xs = [names.index(n) + (k - 0.5) * width for n in shown]
        values = [[r[placement][n][key] for r in records] for n in shown]
        centers = [_interval(v) for v in values]
        ax.bar(xs, [c[0] for c in centers], width, yerr=[c[1] for c in centers], capsize=3,
               alpha=0.7, label=f"{placement} (mean, 95% CI)")  # fmt: skip
        for x, v in zip(xs, values):
            ax.plot([x] * len(v), v, "k.", ms=3, alpha=0.6)
    ax.set_xticks(range(len(names)), names, rotation=30)


def plot(records: list[dict], args, path: Path) -> None:
    names = list(aggregators(args))
    panels = [("test_accuracy", "test accuracy"), ("gus_z", "GUS z of the poisons"),
              ("gus_z_minus_mean", "GUS z minus the mean rule's (paired)"),
              ("selected_poison_share", "poison share of the selected micro-batches")]  # fmt: skip
    if "self_influence_auc" in records[0]["interlaced"]["mean"]:
        panels.append(("self_influence_auc", "self-influence AUC (poison vs clean)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.9))
    robust = [n for n in names if n != "mean"]
    selecting = [n for n in names if "krum" in n]
    for ax, (key, title) in zip(axes, panels):
        if key == "gus_z_minus_mean":
            paired = [{p: {n: {key: r[p][n]["gus_z"] - r[p]["mean"]["gus_z"]} for n in robust}
                       for p in PLACEMENTS} for r in records]  # fmt: skip
            _bars(ax, paired, robust, key, args)
            ax.axhline(0, color="gray", lw=1)
        else:
            _bars(ax, records, selecting if key == "selected_poison_share" else names, key, args)
        if key == "test_accuracy":  # bars from 0 would hide differences of a few points
            lowest = min(r[p][n][key] for r in records for p in PLACEMENTS for n in names)
            ax.set_ylim(lowest - 0.05, 1.0)
        if key in ("test_accuracy", "gus_z"):
            mean, half = _interval([r["clean"]["mean"][key] for r in records])
            ax.axhspan(mean - half, mean + half, color="gray", alpha=0.25,
                       label="clean run (no poisons), 95% CI")  # fmt: skip
        if key == "gus_z":
            ax.axhline(Z_CRITICAL, color="red", ls="--", lw=1,
                       label=f"one-sided {ALPHA:g} level (z = {Z_CRITICAL:.2f})")  # fmt: skip
            ax.axhline(0, color="gray", lw=1)
        if key == "gus_z":  # room above the bars for the legend
            highest = max(r[p][n][key] for r in records for p in PLACEMENTS for n in names)
            ax.set_ylim(top=highest * 1.6)
        if key == "selected_poison_share":
            ax.axhline(args.poison_fraction, color="gray", ls="--", lw=1, label="data share")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=2 if key == "gus_z" else 1)
    fig.suptitle(
        f"{args.dataset} {args.model}, {len(records)} seeds: {args.micro_batches} micro-batches "
        f"of {args.micro_batch}, {args.poison_fraction:.1%} Gaussian poisons "
        f"(std {args.noise_std:g}); dots = seeds", fontsize=10
    )  # fmt: skip
    save_figure(fig, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.micro_batches <= 2 * args.f + 2:
        raise SystemExit(f"Krum with f={args.f} needs more than {2 * args.f + 2} micro-batches")
    limit_threads(args)
    start = time.perf_counter()
    dataset, train_data, test_data = load(args)
    name = f"interlacing_{args.dataset}_{args.model}"
    results = Results(name, args)
    records = over_seeds(args, results,
                         lambda seed: run_seed(args, dataset, train_data, test_data, seed))  # fmt: skip
    results["num_train"] = train_data[0].shape[0]
    results["null"] = ("GUS z is N(0, 1) for a model independent of the noise: one-sided "
                       f"{ALPHA:g} level z > {Z_CRITICAL:.3f}; the clean run is the check")  # fmt: skip
    results["summary"] = summarize_runs(records, args)
    results["seconds"] = time.perf_counter() - start
    results.write()
    plot(records, args, results_stem(name).with_suffix(".png"))
    print_table(results["summary"], args)
    print(f"total {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
