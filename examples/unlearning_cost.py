"""The cost of ascent-based unlearning grows with the training to unlearn (examples/README.md).

A model is trained on a retain set (theta_0), then trained E more epochs of SGD on a forget set
(theta_E). Unlearning runs gradient ascent on the forget set, epoch by epoch (reversed batch
order, the order an exact inverse would need; also the same order), and we record the closest
it ever gets to theta_0, after how many ascent epochs, and whether it reaches a target distance:
``--relative-target`` x ||theta_E - theta_0|| (relative) or ``--relative-target`` x
||theta_1 - theta_0|| (absolute: the one-epoch displacement). Whether the floor grows faster than
E is read from the slope of log(closest residual) against log E, fitted per seed.

Every quantity is measured once per seed (``--seeds``, default 8; the seed draws the retain and
forget sets, hence the batch order, the initialization and the pretraining order) and reported as
its mean, 95% interval and per-seed values (``influx.stats``).

    python examples/unlearning_cost.py                               # digits + MLP, 8 seeds
    python examples/unlearning_cost.py --dataset cifar10 --model resnet18 --device cuda \
        --dtype float32

Writes ``examples/results/unlearning_cost_<dataset>_<model>.{json,png}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import _setup  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from influx import commutator, stats, train  # noqa: E402

LOSS = train.cross_entropy_per_example
ORDERS = ("reversed", "same")


def parse_args() -> argparse.Namespace:
    parser = _setup.example_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--retain", type=int, default=512, help="retain-set size")
    parser.add_argument("--forget", type=int, default=64, help="forget-set size")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument(
        "--ascent-factor", type=int, default=3, help="ascent epochs cap = factor x E"
    )
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--relative-target", type=float, default=0.25)
    return parser.parse_args()


def build(args: argparse.Namespace):
    """Model trained on the retain set (theta_0) and the forget set (inputs, targets)."""
    dataset, inputs, targets = _setup.seeded_subset(args, args.retain + args.forget)
    model = _setup.seeded_model(args.model, dataset, args)
    retain = (inputs[: args.retain], targets[: args.retain])
    _setup.pretrain(model, retain, args, lr=1e-2, epochs=5)
    return model, (inputs[args.retain :], targets[args.retain :])


def first_epoch_below(trajectory: list[float], target: float) -> int | None:
    """1-based ascent epoch at which the residual first drops to ``target`` (None: never)."""
    return next((k + 1 for k, value in enumerate(trajectory) if value <= target), None)


def ascent_run(model, forget, args, epochs: int, order: str, absolute_target: float) -> dict:
    """E epochs of descent on the forget set, then up to ``ascent_factor`` x E of ascent: the
    closest residual (absolute and over ||theta_E - theta_0||), when, and the targets reached."""
    result = commutator.ascent_residual(
        model, LOSS, forget, lr=args.lr, epochs=epochs, batch_size=args.batch_size,
        order=order, ascent_epochs=args.ascent_factor * epochs,
    )  # fmt: skip
    trajectory, displacement = result.trajectory.tolist(), result.displacement.item()
    best = min(range(len(trajectory)), key=trajectory.__getitem__)
    relative_cost = first_epoch_below(trajectory, args.relative_target * displacement)
    absolute_cost = first_epoch_below(trajectory, absolute_target)
    return {
        "displacement": displacement,
        "closest": trajectory[best],
        "closest_relative": trajectory[best] / displacement,
        "epochs_to_closest": best + 1,
        "reaches_relative_target": relative_cost is not None,
        "reaches_absolute_target": absolute_cost is not None,
        # None where never reached (left out of the summaries; the rate above counts it).
        "epochs_to_relative_target": relative_cost,
        "epochs_to_absolute_target": absolute_cost,
        "trajectory_relative": [value / displacement for value in trajectory],
    }


def one_epoch_displacement(model, forget, args) -> float:
    """||theta_1 - theta_0|| after one epoch of descent on the forget set."""
    result = commutator.ascent_residual(model, LOSS, forget, lr=args.lr, epochs=1,
                                        batch_size=args.batch_size)  # fmt: skip
    return result.displacement.item()


def log_log_slope(epochs: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(E): 1 = proportional to E."""
    return float(np.polyfit(np.log(epochs), np.log(values), 1)[0])


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    args = _setup.for_seed(args, seed)
    seconds, start = {}, time.perf_counter()
    model, forget = build(args)
    seconds["pretrain"] = time.perf_counter() - start
    start = time.perf_counter()
    absolute_target = args.relative_target * one_epoch_displacement(model, forget, args)
    epochs = sorted(args.epochs)
    runs = {
        str(e): {
            order: ascent_run(model, forget, args, e, order, absolute_target) for order in ORDERS
        }  # fmt: skip
        for e in epochs
    }
    seconds["unlearning"] = time.perf_counter() - start
    slopes = {
        f"closest_{order}": log_log_slope(epochs, [runs[str(e)][order]["closest"] for e in epochs])
        for order in ORDERS
    }
    slopes["displacement"] = log_log_slope(
        epochs, [runs[str(e)]["reversed"]["displacement"] for e in epochs]
    )
    return {"absolute_target": absolute_target, "runs": runs, "log_log_slope": slopes,
            "seconds": seconds}  # fmt: skip


def summarize(records: list[dict]) -> dict:
    """Every number over seeds; same minus reversed order paired by seed per E; each slope
    minus 1 (above 0: the floor grows faster than E) and the floor's slope minus the
    displacement's (above 0: the floor grows as a fraction of the displacement)."""
    summary = stats.summarize_records(records)
    same_minus_reversed = {}
    for e in records[0]["runs"]:
        runs = [r["runs"][e] for r in records]
        same_minus_reversed[e] = {
            key: stats.paired_difference(
                [run["same"][key] for run in runs], [run["reversed"][key] for run in runs]
            ).to_dict()  # fmt: skip
            for key in ("closest", "closest_relative", "epochs_to_closest")
        }
    summary["same_minus_reversed"] = same_minus_reversed
    slopes = [r["log_log_slope"] for r in records]
    summary["slope_minus_1"] = {
        key: stats.paired_difference([s[key] for s in slopes], [1.0] * len(slopes)).to_dict()
        for key in slopes[0]
    }
    summary["slope_closest_minus_displacement"] = {
        order: stats.paired_difference(
            [s[f"closest_{order}"] for s in slopes], [s["displacement"] for s in slopes]
        ).to_dict()  # fmt: skip
        for order in ORDERS
    }
    return summary


def interval_text(node: dict) -> str:
    return f"{node['mean']:.3g} [{node['low']:.3g}, {node['high']:.3g}]"


def error_bars(ax, x: list[float], nodes: list[dict], style: str, label: str, **kwargs) -> None:
    means = [n["mean"] for n in nodes]
    below = [n["mean"] - n["low"] for n in nodes]
    above = [n["high"] - n["mean"] for n in nodes]
    ax.errorbar(x, means, [below, above], fmt=style, capsize=3, label=label, **kwargs)


def plot_trajectories(ax, records: list[dict], args) -> None:
    """Reversed-order ascent: geometric mean over seeds of the relative residual, 95% band."""
    for k, e in enumerate(records[0]["runs"]):
        curves = np.log10([r["runs"][e]["reversed"]["trajectory_relative"] for r in records])
        nodes = [stats.summarize(column) for column in curves.T]
        steps = np.arange(1, curves.shape[1] + 1)
        ax.plot(steps, [10**n.mean for n in nodes], color=f"C{k}", label=f"E={e}")
        if len(records) > 1:
            ax.fill_between(steps, [10**n.low for n in nodes], [10**n.high for n in nodes],
                            color=f"C{k}", alpha=0.2)  # fmt: skip
    ax.axhline(args.relative_target, color="k", ls="--", lw=0.8, label="relative target")
    ax.set(xscale="log", yscale="log", xlabel="ascent epochs",
           ylabel="||theta - theta_0|| / ||theta_E - theta_0||",
           title="reversed-order ascent (geometric mean, 95% band)")  # fmt: skip
    ax.legend(fontsize=7)


def plot(records: list[dict], summary: dict, args, path: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.5))
    plot_trajectories(axes[0], records, args)
    epochs = [int(e) for e in records[0]["runs"]]
    for k, order in enumerate(ORDERS):
        style, shift = ("o-", 0.97) if order == "reversed" else ("s--", 1.03)
        x = [e * shift for e in epochs]  # side by side on the log axis
        runs = [summary["runs"][str(e)][order] for e in epochs]
        error_bars(axes[1], x, [r["epochs_to_closest"] for r in runs], style, order, color=f"C{k}")
        error_bars(axes[2], x, [r["closest"] for r in runs], style, f"closest, {order}",
                   color=f"C{k}")  # fmt: skip
    displacement = [summary["runs"][str(e)]["reversed"]["displacement"] for e in epochs]
    error_bars(axes[2], epochs, displacement, "^:", "||theta_E - theta_0||", color="C2")
    axes[1].plot(epochs, epochs, "k:", lw=0.8, label="= E")
    axes[1].set(xscale="log", yscale="log", xlabel="training epochs E on the forget set",
                ylabel="ascent epochs to the closest point", title="cost of unlearning")  # fmt: skip
    axes[2].set(xscale="log", yscale="log", xlabel="training epochs E",
                ylabel="||theta - theta_0||", title="residual floor (mean, 95% interval)")  # fmt: skip
    for ax in axes[1:3]:
        ax.legend(fontsize=7)
    names = list(summary["log_log_slope"])
    for k, name in enumerate(names):
        node = summary["log_log_slope"][name]
        error_bars(axes[3], [k], [node], "o", "mean, 95% interval" if k == 0 else None, color="C0")
        axes[3].plot([k + 0.12] * len(node["values"]), node["values"], ".", color="0.4", ms=3,
                     label="seeds" if k == 0 else None)  # fmt: skip
    axes[3].axhline(1.0, color="k", ls="--", lw=0.8, label="proportional to E")
    axes[3].set_xticks(range(len(names)), names, fontsize=8)
    axes[3].set(ylabel="slope of log value vs log E", title="growth with E, per seed")
    axes[3].legend(fontsize=7)
    _setup.save_figure(fig, path)


def report(summary: dict) -> None:
    for e, orders in summary["runs"].items():
        for order, node in orders.items():
            rate = node["reaches_relative_target"]
            print(f"E={e:>3} {order:>8}: displacement {interval_text(node['displacement'])}, "
                  f"closest {interval_text(node['closest'])} "
                  f"({interval_text(node['closest_relative'])} rel) after "
                  f"{interval_text(node['epochs_to_closest'])} ascent epochs; relative target "
                  f"reached in {rate['k']}/{rate['n']}, absolute in "
                  f"{node['reaches_absolute_target']['k']}/{rate['n']}")  # fmt: skip
        diff = summary["same_minus_reversed"][e]["closest_relative"]
        print(f"        same - reversed (relative closest): {interval_text(diff)}")
    for name, node in summary["slope_minus_1"].items():
        print(f"slope {name} - 1: {interval_text(node)}")
    for order, node in summary["slope_closest_minus_displacement"].items():
        print(f"slope closest ({order}) - slope displacement: {interval_text(node)}")


def main() -> None:
    args = parse_args()
    _setup.limit_threads(args)
    name = f"unlearning_cost_{args.dataset}_{args.model}"
    results = _setup.Results(name, args)
    records = _setup.over_seeds(args, results, lambda seed: run_seed(args, seed))
    summary = summarize(records)
    results["summary"] = summary
    results.write()
    plot(records, summary, args, _setup.results_stem(name).with_suffix(".png"))
    report(summary)
    seconds = sum(sum(r["seconds"].values()) for r in records)
    print(f"{len(records)} seeds, {seconds:.0f} s of seed work")


if __name__ == "__main__":
    main()
