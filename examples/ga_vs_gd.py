"""Gradient ascent does not reverse gradient descent (examples/README.md).

Descend on some examples, then ascend on the same examples, and measure how far the parameters
land from where they started: for one point, one batch and the whole dataset, ascending in the
same order and in reversed order. Linear regression is checked against its closed form
``theta_2 - theta_0 = -lr^2 (theta_0.x - y) ||x||^2 x``; for the network, the per-point residual
is set against the point's loss, gradient norm and top Hessian eigenvalue.

Every quantity is measured once per seed (``--seeds``, default 8; the seed draws the training
subset, the initialization, the pretraining batch order and the regression data) and reported as
its mean, 95% interval and per-seed values (``influx.stats``).

    python examples/ga_vs_gd.py                                   # digits + MLP, 8 seeds
    python examples/ga_vs_gd.py --dataset cifar10 --model resnet18 --device cuda --dtype float32

Writes ``examples/results/ga_vs_gd_<dataset>_<model>.{json,png}``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import _setup  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats as scipy_stats  # noqa: E402
from torch.func import grad, vmap  # noqa: E402

from influx import commutator, curvature, grads, stats, train  # noqa: E402
from influx.seeds import derive_seed  # noqa: E402

LOSS = train.cross_entropy_per_example
# Settings of the descent-then-ascent comparison; only a sequence of batches has an order.
SINGLE_MAP = ("one point", "one batch", "full batch")
ORDERS = ("same", "reversed")
FEATURES = ("loss", "grad_norm", "hessian_norm")


def parse_args() -> argparse.Namespace:
    parser = _setup.example_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=512, help="training examples used")
    parser.add_argument("--points", type=int, default=256, help="points for the per-point study")
    parser.add_argument("--pretrain-epochs", type=int, default=5, help="Adam epochs before")
    parser.add_argument("--pretrain-lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate of GD and GA")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--power-iters", type=int, default=20, help="for the top eigenvalue")
    return parser.parse_args()


def build(args: argparse.Namespace):
    """Pretrained model and (inputs, targets) of ``--examples`` training examples."""
    dataset, inputs, targets = _setup.seeded_subset(args, args.examples)
    model = _setup.seeded_model(args.model, dataset, args)
    # A briefly trained model gives points a spread of losses (at init they are all about log C).
    _setup.pretrain(
        model, (inputs, targets), args, lr=args.pretrain_lr, epochs=args.pretrain_epochs
    )
    return model, inputs, targets


def linear_regression_check(lr: float, seed: int) -> dict:
    """Measured per-point residuals of a linear regression vs the closed form
    ``lr^2 |theta_0.x - y| ||x||^3`` (200 points, one GD and one GA step each)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, 2))
    x = torch.randn(200, 10, generator=generator, dtype=torch.float64) / math.sqrt(10)
    y = torch.randn(200, generator=generator, dtype=torch.float64)
    torch.manual_seed(derive_seed(seed, 3))
    model = torch.nn.Linear(10, 1, bias=False).double()
    loss = lambda out, target: 0.5 * (out.squeeze(-1) - target) ** 2  # noqa: E731
    result = commutator.ascent_residual(model, loss, (x, y), lr=lr, mode="point")
    theta = model.weight.detach().reshape(-1)
    closed_form = lr**2 * (x @ theta - y).abs() * (x * x).sum(1) * x.norm(dim=1)
    error = ((result.residual - closed_form).abs().max() / closed_form.abs().max()).item()
    return {
        "max_relative_error": error,
        "measured": result.residual.tolist(),
        "closed_form": closed_form.tolist(),
    }


def mode_comparison(model, inputs, targets, args) -> dict:
    """{setting: {order: residual, displacement, relative}}: one point, one batch and full batch
    (a single map, order moot) and the dataset as a sequence of SGD batches in both orders."""
    size = args.batch_size
    setups = {
        "one point": ((inputs[:1], targets[:1]), 1, ("same",)),
        "one batch": ((inputs[:size], targets[:size]), size, ("same",)),
        "full batch": ((inputs, targets), None, ("same",)),
        "dataset (SGD)": ((inputs, targets), size, ORDERS),
    }
    out = {}
    for label, (batches, batch_size, orders) in setups.items():
        out[label] = {}
        for order in orders:
            result = commutator.ascent_residual(
                model, LOSS, batches, lr=args.lr, batch_size=batch_size, order=order
            )
            out[label][order] = {
                "residual": result.residual.item(),
                "displacement": result.displacement.item(),
                "relative": result.relative.item(),
            }
    return out


def top_hessian_eigenvalues(model, inputs, targets, iters: int, seed: int) -> torch.Tensor:
    """[N] largest-magnitude Hessian eigenvalue of each point's loss: ``iters`` power-iteration
    steps on every point at once (a vmapped Hessian-vector product per row), then the Rayleigh
    quotient of the last iterate."""
    space = curvature.ParamSpace.of(model)
    theta = space.current(model)

    def point_hvp(x, y, v):
        objective, _ = curvature.batch_objective(model, LOSS, (x[None], y[None]))
        return curvature.jvp(grad(objective), (theta,), (v,))[1]

    batched_hvp = vmap(point_hvp, chunk_size=64)
    generator = torch.Generator().manual_seed(derive_seed(seed, 4))
    start = torch.randn(inputs.shape[0], space.size, generator=generator, dtype=theta.dtype)
    return curvature.power_iteration(
        lambda vectors: batched_hvp(inputs, targets, vectors),
        space.size,
        iterations=iters + 1,
        start=start.to(theta.device),
    )


def per_point_study(model, inputs, targets, args) -> dict:
    """One GD and one GA step per point: the residual, and its Spearman correlation with the
    point's loss, gradient norm and |top Hessian eigenvalue|."""
    inputs, targets = inputs[: args.points], targets[: args.points]
    result = commutator.ascent_residual(model, LOSS, (inputs, targets), lr=args.lr, mode="point")
    with torch.no_grad():
        losses = LOSS(model(inputs), targets)
    space = curvature.ParamSpace.of(model)
    grad_norms = space.flatten(grads.per_sample_grads(model, LOSS, inputs, targets)).norm(dim=1)
    eigenvalues = top_hessian_eigenvalues(model, inputs, targets, args.power_iters, args.seed)
    features = {"loss": losses, "grad_norm": grad_norms, "hessian_norm": eigenvalues.abs()}
    residual = result.residual.cpu()
    return {
        "spearman": {
            name: float(scipy_stats.spearmanr(values.cpu(), residual).statistic)
            for name, values in features.items()
        },
        "median_residual": residual.median().item(),
        "median_relative": result.relative.median().item(),
        "residual": residual.tolist(),
        **{name: values.tolist() for name, values in features.items()},
    }


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    args = _setup.for_seed(args, seed)
    seconds, start = {}, time.perf_counter()
    model, inputs, targets = build(args)
    seconds["pretrain"] = time.perf_counter() - start
    record = {}
    for phase, compute in (
        ("linear_regression", lambda: linear_regression_check(args.lr, seed)),
        ("modes", lambda: mode_comparison(model, inputs, targets, args)),
        ("points", lambda: per_point_study(model, inputs, targets, args)),
    ):
        start = time.perf_counter()
        record[phase] = compute()
        seconds[phase] = time.perf_counter() - start
    record["seconds"] = seconds
    return record


def summarize(records: list[dict]) -> dict:
    """Every number over seeds, plus the same-vs-reversed comparison paired by seed."""
    summary = stats.summarize_records(records)
    sequence = [r["modes"]["dataset (SGD)"] for r in records]
    summary["same_minus_reversed"] = {
        key: stats.paired_difference(
            [s["same"][key] for s in sequence], [s["reversed"][key] for s in sequence]
        ).to_dict()
        for key in ("residual", "relative")
    }
    # The orders differ by a factor; the log10 ratio is the scale on which seeds agree.
    summary["log10_same_over_reversed"] = stats.summarize(
        [math.log10(s["same"]["residual"] / s["reversed"]["residual"]) for s in sequence]
    ).to_dict()
    return summary


def interval_text(node: dict) -> str:
    return f"{node['mean']:.3g} [{node['low']:.3g}, {node['high']:.3g}]"


def plot_linear(ax, records: list[dict]) -> None:
    for k, record in enumerate(records):
        linear = record["linear_regression"]
        ax.loglog(linear["closed_form"], linear["measured"], ".", ms=2, color=f"C{k % 10}")
    everything = [v for r in records for v in r["linear_regression"]["closed_form"]]
    lims = [min(everything), max(everything)]
    ax.loglog(lims, lims, "k--", lw=0.8, label="measured = closed form")
    worst = max(r["linear_regression"]["max_relative_error"] for r in records)
    ax.set(xlabel="closed form lr^2 |r| ||x||^3", ylabel="measured ||theta_2 - theta_0||",
           title=f"linear regression ({len(records)} seeds), worst rel. err {worst:.1e}")  # fmt: skip
    ax.legend(fontsize=7)


def plot_modes(ax, summary: dict) -> None:
    """Relative residual per setting: geometric mean over seeds with the 95% interval of the
    mean log10 (the seeds spread over decades), and the seeds as dots."""
    bars = [(s, "same") for s in SINGLE_MAP] + [("dataset (SGD)", o) for o in ORDERS]
    for k, (setting, order) in enumerate(bars):
        values = summary["modes"][setting][order]["relative"]["values"]
        node = stats.summarize(np.log10(values))
        mean, low, high = 10**node.mean, 10**node.low, 10**node.high
        color = "C1" if order == "reversed" else "C0"
        ax.bar(k, mean, color=color, alpha=0.5, label=f"{order} order" if k >= 3 else None)
        if node.n > 1:
            ax.errorbar(k, mean, [[mean - low], [high - mean]], color="k", capsize=4)
        ax.plot([k] * len(values), values, "k.", ms=3)
    names = {"one point": "one point", "one batch": "one batch", "full batch": "full batch",
             "dataset (SGD)": "SGD epoch"}  # fmt: skip
    ax.set_xticks(range(len(bars)), [names[s] for s, _ in bars], fontsize=8)
    ax.set(yscale="log", ylabel="residual / descent displacement",
           title="GD then GA: geometric mean, 95% interval, seeds")  # fmt: skip
    ax.legend(fontsize=7)


def plot_feature(ax, records: list[dict], summary: dict, feature: str) -> None:
    for k, record in enumerate(records):
        points = record["points"]
        ax.plot(points[feature], points["residual"], ".", ms=2, color=f"C{k % 10}",
                label="one colour per seed" if k == 0 else None)  # fmt: skip
    rho = summary["points"]["spearman"][feature]
    ax.set(xscale="linear" if feature == "loss" else "log", yscale="log", xlabel=feature,
           ylabel="per-point residual", title=f"Spearman rho {interval_text(rho)}")  # fmt: skip
    ax.legend(fontsize=7, markerscale=3)


def plot_correlations(ax, summary: dict) -> None:
    for k, feature in enumerate(FEATURES):
        node = summary["points"]["spearman"][feature]
        ax.errorbar(k, node["mean"], [[node["mean"] - node["low"]], [node["high"] - node["mean"]]],
                    fmt="o", color="C0", capsize=4, label="mean, 95% interval" if k == 0 else None)  # fmt: skip
        ax.plot([k + 0.15] * len(node["values"]), node["values"], "k.", ms=3,
                label="seeds" if k == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(FEATURES)), FEATURES)
    ax.set(ylabel="Spearman(residual, feature)", title="per-point correlations over seeds")
    ax.legend(fontsize=7)


def plot(records: list[dict], summary: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 5, figsize=(24, 4.5))
    plot_linear(axes[0], records)
    plot_modes(axes[1], summary)
    plot_feature(axes[2], records, summary, "loss")
    plot_feature(axes[3], records, summary, "hessian_norm")
    plot_correlations(axes[4], summary)
    _setup.save_figure(fig, path)


def report(summary: dict) -> None:
    linear = summary["linear_regression"]["max_relative_error"]
    print(f"linear regression: max relative error vs closed form {interval_text(linear)}")
    for setting, orders in summary["modes"].items():
        for order, node in orders.items():
            print(f"{setting:>14} {order:>8}: residual {interval_text(node['residual'])}, "
                  f"relative {interval_text(node['relative'])}")  # fmt: skip
    diff = summary["same_minus_reversed"]["relative"]
    print(f"same - reversed (relative): {interval_text(diff)}, paired t p {diff['p_value']:.1e}; "
          f"log10 same/reversed {interval_text(summary['log10_same_over_reversed'])}")  # fmt: skip
    for feature in FEATURES:
        print(f"Spearman(residual, {feature}): "
              f"{interval_text(summary['points']['spearman'][feature])}")  # fmt: skip


def main() -> None:
    args = parse_args()
    _setup.limit_threads(args)
    name = f"ga_vs_gd_{args.dataset}_{args.model}"
    results = _setup.Results(name, args)
    records = _setup.over_seeds(args, results, lambda seed: run_seed(args, seed))
    summary = summarize(records)
    results["summary"] = summary
    results.write()
    plot(records, summary, _setup.results_stem(name).with_suffix(".png"))
    report(summary)
    seconds = np.sum([sum(r["seconds"].values()) for r in records])
    print(f"{len(records)} seeds, {seconds:.0f} s of seed work")


if __name__ == "__main__":
    main()
