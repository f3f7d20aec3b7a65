"""Gaussian poisoning vs unlearning as the model grows and as the dose changes (examples/README.md).

The setting of ``gaussian_poisoning.py`` (its experiment, audits and tuning rule, imported from it)
moved off the 8x8 digits MLP, towards Pawelczyk et al. 2024 (ResNet-18 on CIFAR-10, 1.5-2.5%
poisons, 8 seeds, unlearning budget 10% of the training compute):

- ``--study width``: GUS z (the Gaussian unlearning score, N(0, 1) under the null), train and test
  accuracy of the trained model, the retrain oracle and each tuned unlearning method against the
  parameter count, on real MNIST (``influx.data.load("mnist")``) and on a CIFAR-shaped synthetic
  set (3x32x32 class prototypes plus noise), each with a GroupNorm ResNet-8 of growing width; one
  JSON per dataset, ``scale_width_<dataset>.json``.
- ``--study dose``: the same rows against the poison fraction (at the default noise std) and
  against the noise std (at the default fraction), on MNIST with the width-8 ResNet-8;
  ``scale_dose_mnist.json``.
- ``--preset pawelczyk``: ResNet-18 (GroupNorm) on CIFAR-10 from ``--data-dir``, fractions
  1.5 / 2 / 2.5%, 8 seeds, budget 10%, GUS in eval mode; ``scale_pawelczyk_cifar10.json``.

Protocol (as gaussian_poisoning.py). Seed s draws its own poison subset and noise, initialization,
batch order and unlearning batches. Every number is a mean with its 95% Student-t interval and the
per-seed values; differences against the trained model and the retrain oracle are paired by seed;
the tests (z > 2.326 one-sided at FPR 0.01, |z| > 2.576 two-sided at 0.01) are reported as the
fraction of seeds significant. Tuning: each method's knob on a 3-point grid (the ends and middle
of SCALE_GRIDS: gaussian_poisoning.GRIDS with the step methods' moved a factor 4 down), chosen
on ``--tuning-seeds`` seeds disjoint from the report seeds
as the least mean |z| within a 1-point mean test-accuracy drop (else the least drop, marked
infeasible). The width study tunes at every width; the dose study tunes once, at the default
dose (fraction ``--fraction``, std ``--noise-std``), and applies those settings at every dose.
Four methods by default (gradient_ascent, neggrad_plus, fine_tune, scrub): the step methods whose
knob is a learning rate, the cheapest to tune at every width. Costs: per point (width or dose)
the wall and CPU seconds of the tuning and of every report seed are stored under ``cost``.

Defaults (sized for 2 CPU cores). MNIST: a fixed class-stratified subsample of ``--train-size``
1,000 of the 4,000 training images (the file is sorted by class, so "the first N" would be a few
classes) and 500 of the 1,000 test images; ResNet-8 (GroupNorm) widths 2 / 4 / 8 / 16 (5,144 to
308,538 parameters, 60x), Adam lr 3e-3, batch 64, 6 epochs. (influx's small CNN, which pools
globally after one downsampling, stays at 30-50% test accuracy after 10 epochs on these 1,000
images; ResNet-8 of width 4 reaches 88% in 6.) Synthetic: 500 train / 500 test images, class
prototypes of scale ``--signal`` 1.0 in per-pixel noise ``--synthetic-noise`` 1.0 (load's
default signal 0.3 leaves a CNN near chance after an epoch), the same ResNet-8 widths (5,180 to
308,826 parameters), 3 epochs at lr 3e-3. Poisons: 5% of the training set, noise std 1.0
(gaussian_poisoning's powered setting). Dose: fractions 0.5 / 1 / 1.5 / 2 / 2.5 / 5% at std 1.0
and stds 0.25 / 0.5 / 1 / 2 at 5%, ResNet-8 width 8 on MNIST. Tuning: 2 seeds (1000, 1001).
Unlearning minibatches of 16: the budget (10% of 6 x 1,000 or 3 x 500 example-gradients) at
batches of 64 gave scrub and neggrad_plus one to five steps (``steps`` in every row), and scrub's
first max-step, taken at its own teacher, has a zero KL gradient.

Measured cost (one tuning seed and one report seed per point, 2 threads on a shared 2-core
machine, CPU seconds, unlearning batches of 64): a report seed (train, 4 methods, retrain, 6
audits) took 6 / 7 / 11 / 24 s on MNIST at widths 2 / 4 / 8 / 16 and 3 / 4 / 6 / 13 s on
synthetic; a tuning seed (train and 12 unlearning runs, audited) 10 / 12 / 17 / 39 s and
5 / 7 / 11 / 22 s. Batches of 16 (the default) cost about 1.3x per report seed (MNIST width 8:
14.1 s, tuning seed 18.6 s). With 2 tuning and 8 report seeds the defaults project to about
11 min (MNIST width study) + 6 min (synthetic) + 17.5 min (dose: 9 points x 8 seeds x 14 s,
tuned once), about 35 min of CPU in all (``--seeds 5``: about 24 min; ``--dose-width 4``: 29).
Each point's measured seconds are in its JSON (``summary[point].cost``, ``total_seconds``).

    python examples/scale.py --study all                   # both studies on the CPU
    python examples/scale.py --study width --seeds 5
    python examples/scale.py --preset pawelczyk --data-dir DIR --device cuda

Cost of the preset: an ESTIMATE, extrapolated from the CPU, never measured on a GPU. Measured:
one training epoch of ResNet-18 (width 64, GroupNorm, Adam, batch 64) over 256 images of 3x32x32
took 15.3 CPU-seconds on one thread (about 0.06 s per image, ~28 GFLOP/s at ~1.7 GFLOP per
image trained), so 50,000 CIFAR-10 images cost ~3,000 CPU-thread-seconds per epoch. The preset
runs about 1,940 epoch-equivalents: tuning 2 seeds x (30 training epochs + 4 methods x 3 settings
x 3 epochs of budget) = 132, report 3 fractions x 8 seeds x (30 trained + 4 x 3 unlearning + 30
retrained) = 1,728, audits ~80 (forward passes over the retain and test sets). Assuming a GPU
sustains 500-1,000x one CPU thread (15-30 TFLOP/s, TF32 convolutions on an H100), an epoch takes
3-6 s and the preset roughly 1.5-3 GPU-hours; ``--epochs``, ``--seeds`` and ``--tuning-seeds``
scale it linearly.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import gaussian_poisoning as gp  # noqa: E402
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
    seed_list,
)

from influx import data  # noqa: E402

METHODS = ["gradient_ascent", "neggrad_plus", "fine_tune", "scrub"]
# Per dataset: the model, its widths, epochs and Adam lr of the default width study.
WIDTH_DEFAULTS = {
    "mnist": {"model": "resnet8", "widths": [2, 4, 8, 16], "epochs": 6, "lr": 3e-3},
    "synthetic": {"model": "resnet8", "widths": [2, 4, 8, 16], "epochs": 3, "lr": 3e-3},
}
# Each method's knob on a log grid of factor 4 (3 points at --grid-size 3): gaussian_poisoning's
# grids moved one step down for the step methods, whose lowest digits setting won at every MNIST
# width in a first run; strongest removal last.
SCALE_GRIDS: dict[str, tuple[dict, str, tuple[float, ...]]] = {
    **gp.GRIDS,
    "gradient_ascent": ({}, "lr", (6.25e-4, 1.25e-3, 2.5e-3, 5e-3, 1e-2)),
    "neggrad_plus": ({"beta": 0.95}, "lr", (0.03125, 0.0625, 0.125, 0.25, 0.5)),
    "fine_tune": ({}, "lr", (0.03125, 0.0625, 0.125, 0.25, 0.5)),
    "scrub": ({}, "lr", (0.03125, 0.0625, 0.125, 0.25, 0.5)),
}
# The preset: the fraction arm only (no noise-std arm), tuned at the middle fraction.
PAWELCZYK = {"dataset": "cifar10", "width": 64, "fractions": [0.015, 0.02, 0.025], "fraction": 0.02,
             "noise_stds": [], "seeds": 8, "budget_fraction": 0.1, "epochs": 30, "lr": 1e-3,
             "batch_size": 128, "unlearn_batch_size": 128}  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0], dtype="float32", model=False)
    parser.add_argument("--study", default="all", choices=["width", "dose", "all"])
    parser.add_argument("--preset", default=None, choices=["pawelczyk"],
                        help="ResNet-18 on CIFAR-10 at Pawelczyk et al.'s poison fractions")  # fmt: skip
    parser.add_argument("--datasets", nargs="+", default=["mnist", "synthetic"],
                        choices=list(WIDTH_DEFAULTS), help="datasets of the width study")  # fmt: skip
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="widths of the width study (default: per dataset)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=None, help="default: per dataset")
    parser.add_argument("--lr", type=float, default=None, help="training lr (Adam)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="training examples (default 1,000 MNIST / 500 synthetic)")  # fmt: skip
    parser.add_argument("--test-size", type=int, default=None,
                        help="test examples (default 500 MNIST / 500 synthetic)")  # fmt: skip
    parser.add_argument("--signal", type=float, default=1.0, help="synthetic prototype scale")
    parser.add_argument("--synthetic-noise", type=float, default=1.0,
                        help="synthetic per-pixel noise (the data's own, not the poison's)")  # fmt: skip
    parser.add_argument("--fraction", type=float, default=0.05, help="poisoned fraction")
    parser.add_argument("--noise-std", type=float, default=1.0, help="poison noise std")
    parser.add_argument("--fractions", type=float, nargs="+",
                        default=[0.005, 0.01, 0.015, 0.02, 0.025, 0.05])  # fmt: skip
    parser.add_argument("--noise-stds", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument(
        "--dose-width", type=int, default=8, help="ResNet-8 width of the dose study"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--unlearn-batch-size", type=int, default=16,
                        help="minibatch of the step methods: at 10%% of a few epochs' compute, "
                        "batches of 64 leave scrub and neggrad_plus one or two steps")  # fmt: skip
    parser.add_argument("--budget-fraction", type=float, default=0.1,
                        help="unlearning budget as a fraction of the training compute")  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=list(gp.GRIDS))
    parser.add_argument("--grid-size", type=int, default=3, help="grid points per method")
    parser.add_argument("--tuning-seeds", type=int, default=2, help="seeds of the search")
    parser.add_argument("--tuning-seed", type=int, default=1000, help="first tuning seed")
    parser.add_argument("--max-acc-drop", type=float, default=0.01,
                        help="largest mean test-accuracy drop a chosen setting may cost")  # fmt: skip
    args = parser.parse_args()
    if args.preset == "pawelczyk":
        # the preset's values become the defaults: flags given explicitly still win (a test
        # shrinks the width, epochs and sizes)
        parser.set_defaults(**PAWELCZYK)
        args = parser.parse_args()
        args.model = "resnet18"
    tuning = set(range(args.tuning_seed, args.tuning_seed + args.tuning_seeds))
    if tuning & set(seed_list(args)):
        raise SystemExit(f"tuning seeds {sorted(tuning)} overlap the report seeds")
    return args


# ------------------------------------------------------------------------------------------------
# Data and the per-point settings handed to gaussian_poisoning's experiment
# ------------------------------------------------------------------------------------------------


def load_data(args, dataset: str) -> dict:
    """{"train_set", "train", "test"}: a fixed (seed-independent) class-stratified subsample of
    the training split and the test split, as tensors on the device."""
    sizes = {"mnist": (1000, 500), "synthetic": (500, 500), "cifar10": (None, None)}[dataset]
    train_size = args.train_size or sizes[0]
    test_size = args.test_size or sizes[1]
    extra = ({"signal": args.signal, "noise": args.synthetic_noise} if dataset == "synthetic"
             else {"root": args.data_dir})  # fmt: skip
    if dataset == "synthetic":
        train_set = data.load(dataset, size=train_size, **extra)
        test_set = data.load(dataset, split="test", size=test_size, **extra)
    else:
        train_set = data.load(dataset, **extra)
        test_set = data.load(dataset, split="test", **extra)
    dtype = getattr(torch, args.dtype)
    x, y, _ = data.as_tensors(train_set)
    keep = stratified_subsample(y, train_size)
    xt, yt, _ = data.as_tensors(test_set)
    keep_test = stratified_subsample(yt, test_size)
    return {"train_set": train_set, "train": (x[keep].to(args.device, dtype), y[keep].to(args.device)),
            "test": (xt[keep_test].to(args.device, dtype), yt[keep_test].to(args.device))}  # fmt: skip


def stratified_subsample(targets: torch.Tensor, count: int | None) -> torch.Tensor:
    """Positions of ``count`` examples taken round-robin over the classes, each class in a fixed
    seeded order (all positions, in that order, when ``count`` is None or too large)."""
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(targets.shape[0], generator=generator)
    # rank within the class, in the seeded order: sorting by it interleaves the classes
    rank = torch.empty_like(order)
    for label in targets.unique():
        members = order[targets[order] == label]
        rank[members] = torch.arange(members.shape[0])
    interleaved = order[torch.argsort(rank[order] * (int(targets.max()) + 1) + targets[order])]
    return interleaved[: count or targets.shape[0]]


def point_args(args, dataset: str, model: str, width: int, **overrides) -> SimpleNamespace:
    """The attributes gaussian_poisoning's Experiment and search read, for one point."""
    defaults = WIDTH_DEFAULTS.get(dataset, {"epochs": args.epochs, "lr": args.lr})
    point = SimpleNamespace(
        dataset=dataset, model=model, width=width, device=args.device, dtype=args.dtype,
        fraction=args.fraction, noise_std=args.noise_std,
        epochs=args.epochs or defaults["epochs"], lr=args.lr or defaults["lr"],
        batch_size=args.batch_size, unlearn_batch_size=args.unlearn_batch_size,
        budget_fraction=args.budget_fraction, methods=args.methods,
        grid_size=args.grid_size, tuning_seed=args.tuning_seed, tuning_seeds=args.tuning_seeds,
        max_acc_drop=args.max_acc_drop,
    )  # fmt: skip
    vars(point).update(overrides)
    return point


def parameter_count(point, train_set) -> int:
    model = gp.build_model(point, train_set, 0)
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# One point: tuning, one report seed
# ------------------------------------------------------------------------------------------------


class Clock:
    """Wall and CPU seconds since creation (the CPU time counts every thread of the process)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> dict:
        return {"wall": time.perf_counter() - self.wall, "cpu": time.process_time() - self.cpu}


def audit(experiment, model) -> dict:
    """gaussian_poisoning's audit with the model in eval mode (GUS as Pawelczyk et al. score it;
    GroupNorm computes the same in both modes, a BatchNorm model would not)."""
    return experiment.audit(model.eval())


def grid_settings(name: str, point) -> list[dict]:
    """The ``--grid-size`` settings of ``name`` spread over SCALE_GRIDS (its fixed keywords and
    the batch size of the step methods included)."""
    fixed, knob, values = SCALE_GRIDS[name]
    picks = np.unique(np.linspace(0, len(values) - 1, min(point.grid_size, len(values))).round())
    if point.grid_size == 1:
        picks = [len(values) // 2]
    base = {"batch_size": point.unlearn_batch_size} if name in gp.STEP_METHODS else {}
    return [{**base, **fixed, knob: values[int(i)]} for i in picks]


def tune(point, loaded: dict) -> dict:
    """gaussian_poisoning's rule at this point, on SCALE_GRIDS: per method the setting of least
    mean |GUS z| within ``max_acc_drop`` mean test-accuracy drop over the tuning seeds (else the
    least drop, marked infeasible); returns the grid, the chosen settings, the trained model's
    reference and the cost."""
    clock = Clock()
    settings = {name: grid_settings(name, point) for name in point.methods}
    runs = {name: [[] for _ in settings[name]] for name in point.methods}
    trained_rows = []
    for seed in range(point.tuning_seed, point.tuning_seed + point.tuning_seeds):
        experiment = gp.Experiment(
            point, loaded["train_set"], loaded["train"], loaded["test"], seed
        )
        trained = audit(experiment, experiment.model)
        trained_rows.append(trained)
        for name in point.methods:
            for k, setting in enumerate(settings[name]):
                row = audit(experiment, experiment.unlearn(name, setting).model)
                runs[name][k].append({"gus_z": row["gus_z"], "test_acc": row["test_acc"],
                                      "test_acc_drop": trained["test_acc"] - row["test_acc"]})  # fmt: skip
        print(
            f"{point.dataset} {point.model} width {point.width}: tuning seed {seed} done",
            flush=True,
        )
    grid = {name: [gp.grid_point(setting, rows, point.max_acc_drop)
                   for setting, rows in zip(settings[name], runs[name])]
            for name in point.methods}  # fmt: skip
    chosen = {name: gp.choose(grid[name]) for name in point.methods}
    reference = {
        key: float(np.mean([r[key] for r in trained_rows])) for key in ("gus_z", "test_acc")
    }
    reference["z_per_seed"] = [r["gus_z"] for r in trained_rows]
    return {"search": grid, "chosen": chosen, "search_trained": reference, "cost": clock.seconds()}


def run_point(point, loaded: dict, chosen: dict, seed: int) -> dict:
    """Seed ``seed`` at one point: the trained model, each chosen method and the retrain oracle
    (gaussian_poisoning's audit: GUS z and its tests, MIA, accuracies), with seconds per phase."""
    clock = Clock()
    experiment = gp.Experiment(point, loaded["train_set"], loaded["train"], loaded["test"], seed)
    seconds = {"train": clock.seconds()}
    rows = {"trained": audit(experiment, experiment.model)}
    clock = Clock()
    for name in point.methods:
        run = experiment.unlearn(name, chosen[name])
        # steps and spent show a method the budget barely lets move (scrub's first max-steps
        # start at its own teacher, where the KL gradient is zero)
        rows[name] = {**audit(experiment, run.model), "steps": run.steps, "spent": run.spent}
    seconds["unlearn"] = clock.seconds()
    clock = Clock()
    rows["retrain"] = audit(experiment, experiment.retrain().model)
    seconds["retrain"] = clock.seconds()
    rows["trained"]["train_acc"] = gp.accuracy(experiment.model, *experiment.poisoned)
    return {"rows": rows, "seconds": seconds, "n_forget": experiment.poison.count,
            "budget": experiment.budget}  # fmt: skip


def summarize_point(records: list[dict], point, tuning: dict, n_params: int) -> dict:
    """gaussian_poisoning's summary of one point plus its size and cost."""
    summary = gp.summarize(records, point.methods)
    wall = [sum(s["wall"] for s in r["seconds"].values()) for r in records]
    cpu = [sum(s["cpu"] for s in r["seconds"].values()) for r in records]
    summary["cost"] = {"tuning": tuning["cost"], "report_seeds_wall": float(np.sum(wall)),
                       "report_seeds_cpu": float(np.sum(cpu)), "per_seed_wall": wall,
                       "total_wall": tuning["cost"]["wall"] + float(np.sum(wall))}  # fmt: skip
    summary["n_params"] = n_params
    return summary


# ------------------------------------------------------------------------------------------------
# Studies
# ------------------------------------------------------------------------------------------------


def run_study(args, name: str, points: dict, loaded: dict, tuned: dict, sizes: dict) -> dict:
    """Every report seed over every point (``points``: key -> point settings; ``tuned``: key ->
    its tuning), written to ``<name>.json``; returns the result's data."""
    results = Results(name, args)
    results["points"] = {key: vars(point) for key, point in points.items()}
    results["tuning"] = tuned
    results.write()

    def one_seed(seed: int) -> dict:
        return {key: run_point(point, loaded, tuned[key]["chosen"], seed)
                for key, point in points.items()}  # fmt: skip

    clock = Clock()
    records = over_seeds(args, results, one_seed)
    results["report_seconds"] = clock.seconds()
    results["summary"] = {key: summarize_point([r[key] for r in records], point, tuned[key],
                                               sizes[key]) for key, point in points.items()}  # fmt: skip
    unique_tuning = {id(t): t["cost"] for t in tuned.values()}.values()
    results["tuning_seconds"] = {k: sum(c[k] for c in unique_tuning) for k in ("wall", "cpu")}
    results["total_seconds"] = {k: results["tuning_seconds"][k] + results["report_seconds"][k]
                                for k in ("wall", "cpu")}  # fmt: skip
    results.write()
    return results.data


def width_study(args, dataset: str) -> dict:
    defaults = WIDTH_DEFAULTS[dataset]
    loaded = load_data(args, dataset)
    widths = args.widths or defaults["widths"]
    points = {f"w{w}": point_args(args, dataset, defaults["model"], w) for w in widths}
    tuned = {key: tune(point, loaded) for key, point in points.items()}
    sizes = {key: parameter_count(point, loaded["train_set"]) for key, point in points.items()}
    result = run_study(args, f"scale_width_{dataset}", points, loaded, tuned, sizes)
    plot_width(result, dataset, results_stem(f"scale_width_{dataset}").with_suffix(".png"))
    report(result, f"width study, {dataset} ({defaults['model']})")
    return result


def dose_points(args, dataset: str, model: str, width: int) -> dict:
    """Fractions at the default noise std, then noise stds at the default fraction (the default
    dose once)."""
    points = {f"fraction={f:g}": point_args(args, dataset, model, width, fraction=f)
              for f in args.fractions}  # fmt: skip
    for std in args.noise_stds:
        if not any(np.isclose(p.fraction, args.fraction) and np.isclose(p.noise_std, std)
                   for p in points.values()):  # fmt: skip
            points[f"noise_std={std:g}"] = point_args(args, dataset, model, width, noise_std=std)
    return points


def dose_study(args, dataset: str, model: str, width: int, name: str) -> dict:
    """The dose points, all with the settings tuned once at the default dose."""
    loaded = load_data(args, dataset)
    points = dose_points(args, dataset, model, width)
    once = tune(point_args(args, dataset, model, width), loaded)
    once["applies_to"] = f"tuned at fraction {args.fraction:g}, noise std {args.noise_std:g}"
    tuned = dict.fromkeys(points, once)
    size = parameter_count(next(iter(points.values())), loaded["train_set"])
    result = run_study(args, name, points, loaded, tuned, dict.fromkeys(points, size))
    plot_dose(result, results_stem(name).with_suffix(".png"))
    report(result, f"dose study, {dataset} ({model} width {width})")
    return result


# ------------------------------------------------------------------------------------------------
# Figures and printout
# ------------------------------------------------------------------------------------------------


def colors(methods: list[str]) -> dict:
    # green and black are kept for the retrain oracle and the trained model
    cycle = ["tab:blue", "tab:orange", "tab:purple", "tab:red", "tab:brown", "tab:pink",
             "tab:cyan", "tab:olive", "tab:gray"]  # fmt: skip
    table = {name: cycle[i % len(cycle)] for i, name in enumerate(methods)}
    table.update(trained="k", retrain="tab:green")
    return table


def band(ax, x, summaries: list[dict], color, label: str, marker: str = "o") -> None:
    """Mean line and its 95% interval as a band; per-seed values as faint dots."""
    mean = [s["mean"] for s in summaries]
    ax.plot(x, mean, marker + "-", color=color, label=label, ms=4)
    if summaries[0]["n"] > 1:
        ax.fill_between(x, [s["low"] for s in summaries], [s["high"] for s in summaries],
                        color=color, alpha=0.1)  # fmt: skip
    for xi, s in zip(x, summaries):
        ax.scatter(np.full(len(s["values"]), xi), s["values"], s=6, color=color, alpha=0.35)


def fit_to_seeds(ax, summaries: list[dict], extra=(), bounds=(-np.inf, np.inf)) -> None:
    """y-limits around the per-seed values and ``extra`` (a few-seed interval can dwarf them)."""
    values = np.concatenate([s["values"] for s in summaries] + [list(extra)])
    pad = 0.08 * (values.max() - values.min()) + 1e-3
    ax.set_ylim(max(bounds[0], values.min() - pad), min(bounds[1], values.max() + pad))


def z_reference(ax) -> None:
    ax.axhline(gp.ONE_SIDED, color="r", ls="--", lw=1, label="z = 2.326 (one-sided, FPR 0.01)")
    ax.axhline(-gp.TWO_SIDED, color="0.4", ls="-.", lw=0.8, label="z = -2.576 (two-sided 0.01)")
    ax.axhline(0, color="0.75", lw=0.6)


def row_order(result: dict) -> list[str]:
    return ["trained", *result["config"]["methods"], "retrain"]


def plot_width(result: dict, dataset: str, path) -> None:
    keys = list(result["summary"])
    params = [result["summary"][k]["n_params"] for k in keys]
    palette = colors(result["config"]["methods"])
    fig, (gus_ax, acc_ax) = plt.subplots(1, 2, figsize=(15, 6))
    for name in row_order(result):
        band(gus_ax, params, [result["summary"][k]["rows"][name]["gus_z"] for k in keys],
             palette[name], name)  # fmt: skip
        band(acc_ax, params, [result["summary"][k]["rows"][name]["test_acc"] for k in keys],
             palette[name], f"{name} (test)")  # fmt: skip
    band(acc_ax, params, [result["summary"][k]["rows"]["trained"]["train_acc"] for k in keys],
         "0.5", "trained (train, poisoned set)", marker="s")  # fmt: skip
    z_reference(gus_ax)
    every = [s for k in keys for s in result["summary"][k]["rows"].values()]
    fit_to_seeds(gus_ax, [s["gus_z"] for s in every], extra=(gp.ONE_SIDED, -gp.TWO_SIDED))
    fit_to_seeds(acc_ax, [s["test_acc"] for s in every], extra=[
        v for k in keys for v in result["summary"][k]["rows"]["trained"]["train_acc"]["values"]],
        bounds=(0, 1.01))  # fmt: skip
    model = result["points"][keys[0]]["model"]
    n = len(result["seeds"])
    for ax in (gus_ax, acc_ax):
        ax.set_xscale("log")
        ax.set_xticks(params, [f"{p:,}\n({k})" for p, k in zip(params, keys)], fontsize=8)
        ax.minorticks_off()
    gus_ax.set(xlabel="parameters (width)", ylabel="GUS z",
               title=f"{dataset}, {model}: GUS z vs size (mean, 95% band, seeds as dots; n = {n})")  # fmt: skip
    acc_ax.set(xlabel="parameters (width)", ylabel="accuracy", title="accuracy vs size")
    gus_ax.legend(fontsize=7, ncol=2)
    acc_ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def dose_arms(result: dict) -> list[tuple[str, list[str]]]:
    """(field, point keys sorted by it) for each arm with at least two points: the fractions at
    the default noise std, the noise stds at the default fraction."""
    config, points = result["config"], result["points"]
    arms = []
    for field, fixed in (("fraction", "noise_std"), ("noise_std", "fraction")):
        keys = [k for k, p in points.items() if np.isclose(p[fixed], config[fixed])]
        if len(keys) > 1:
            arms.append((field, sorted(keys, key=lambda k: points[k][field])))
    return arms


def plot_dose(result: dict, path) -> None:
    palette = colors(result["config"]["methods"])
    arms = dose_arms(result)
    fig, axes = plt.subplots(1, len(arms), figsize=(7.5 * len(arms), 6), squeeze=False)
    config, n = result["config"], len(result["seeds"])
    for ax, (field, keys) in zip(axes[0], arms):
        scale = 100 if field == "fraction" else 1
        x = [scale * result["points"][k][field] for k in keys]
        for name in row_order(result):
            band(ax, x, [result["summary"][k]["rows"][name]["gus_z"] for k in keys],
                 palette[name], name)  # fmt: skip
        z_reference(ax)
        fit_to_seeds(ax, [result["summary"][k]["rows"][name]["gus_z"] for k in keys
                          for name in row_order(result)], extra=(gp.ONE_SIDED, -gp.TWO_SIDED))  # fmt: skip
        label = "poison fraction (%)" if field == "fraction" else "poison noise std"
        if field == "noise_std":
            ax.set_xscale("log", base=2)
            ax.set_xticks(x, [f"{v:g}" for v in x])
            ax.minorticks_off()
        fixed = (f"noise std {config['noise_std']:g}" if field == "fraction"
                 else f"fraction {100 * config['fraction']:g}%")  # fmt: skip
        ax.set(xlabel=label, ylabel="GUS z",
               title=f"GUS z vs {label} at {fixed}\n(mean, 95% band, seeds as dots; n = {n})")  # fmt: skip
        ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def report(result: dict, title: str) -> None:
    print(title)
    for key, summary in result["summary"].items():
        cells = []
        for name in row_order(result):
            z = summary["rows"][name]["gus_z"]
            k = summary["tests"][name]["one_sided_fpr_0.01"]["k"]
            cells.append(f"{name} {z['mean']:.2f} [{z['low']:.2f}, {z['high']:.2f}] {k}/{z['n']}")
        acc = summary["rows"]["trained"]["test_acc"]["mean"]
        print(f"  {key:>16} ({summary['n_params']:,} params, test acc {acc:.3f}, "
              f"{summary['cost']['total_wall']:.0f} s): " + "; ".join(cells))  # fmt: skip


def main() -> None:
    args = parse_args()
    limit_threads(args)
    if args.preset == "pawelczyk":
        dose_study(args, "cifar10", args.model, args.width, "scale_pawelczyk_cifar10")
        return
    if args.study in ("width", "all"):
        for dataset in args.datasets:
            width_study(args, dataset)
    if args.study in ("dose", "all"):
        dose_study(args, "mnist", WIDTH_DEFAULTS["mnist"]["model"], args.dose_width,
                   "scale_dose_mnist")  # fmt: skip


if __name__ == "__main__":
    main()
