"""The cost of ascent-based unlearning grows with the training to unlearn (examples/README.md).

A model is trained on a retain set (theta_0), then trained E more epochs of SGD on a forget set
(theta_E). Unlearning runs gradient ascent on the forget set, epoch by epoch (reversed batch
order, the order an exact inverse would need; also the same order), and we record how many
ascent epochs it takes to bring the parameters within a target distance of theta_0, and the
closest it ever gets. Targets: ``--relative-target`` x ||theta_E - theta_0|| and an absolute
target, ``--relative-target`` x ||theta_1 - theta_0|| (the one-epoch displacement).

    python examples/unlearning_cost.py                               # digits + MLP, ~1 min on CPU
    python examples/unlearning_cost.py --dataset cifar10 --model resnet18 --device cuda \
        --dtype float32

Writes ``examples/results/unlearning_cost_<dataset>_<model>.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import _setup  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from influx import commutator, train  # noqa: E402

LOSS = train.cross_entropy_per_example


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
    dataset, inputs, targets = _setup.load_examples(args, args.retain + args.forget)
    model = _setup.seeded_model(args.model, dataset, args)
    retain = (inputs[: args.retain], targets[: args.retain])
    _setup.pretrain(model, retain, args, lr=1e-2, epochs=5)
    return model, (inputs[args.retain :], targets[args.retain :])


def first_epoch_below(trajectory: list[float], target: float) -> int | None:
    """1-based ascent epoch at which the residual first drops to ``target`` (None: never)."""
    return next((k + 1 for k, value in enumerate(trajectory) if value <= target), None)


def unlearning_runs(model, forget, args) -> list[dict]:
    rows, one_epoch_displacement = [], None
    for epochs in sorted(args.epochs):
        for order in ("reversed", "same"):
            result = commutator.ascent_residual(
                model, LOSS, forget, lr=args.lr, epochs=epochs, batch_size=args.batch_size,
                order=order, ascent_epochs=args.ascent_factor * epochs,
            )  # fmt: skip
            trajectory = result.trajectory.tolist()
            displacement = result.displacement.item()
            if one_epoch_displacement is None:
                one_epoch_displacement = displacement
            best = min(range(len(trajectory)), key=trajectory.__getitem__)
            rows.append({
                "epochs": epochs, "order": order, "displacement": displacement,
                "trajectory": trajectory, "best_residual": trajectory[best], "best_epoch": best + 1,
                "best_relative": trajectory[best] / displacement,
                "cost_relative_target": first_epoch_below(trajectory, args.relative_target * displacement),
                "cost_absolute_target": first_epoch_below(
                    trajectory, args.relative_target * one_epoch_displacement),
            })  # fmt: skip
    return rows


def plot(rows: list[dict], args, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for row in rows:
        if row["order"] != "reversed":
            continue
        steps = range(1, len(row["trajectory"]) + 1)
        axes[0].semilogy(
            steps, [v / row["displacement"] for v in row["trajectory"]], label=f"E={row['epochs']}"
        )
    axes[0].axhline(args.relative_target, color="k", ls="--", lw=0.8)
    axes[0].set(xlabel="ascent epochs", ylabel="||theta - theta_0|| / ||theta_E - theta_0||",
                title="reversed-order ascent")  # fmt: skip
    axes[0].legend(fontsize=7)
    for order, marker in (("reversed", "o-"), ("same", "s--")):
        subset = [r for r in rows if r["order"] == order]
        epochs = [r["epochs"] for r in subset]
        axes[1].plot(
            epochs, [r["best_epoch"] for r in subset], marker, label=f"{order}: epochs to closest"
        )
        costs = [r["cost_absolute_target"] or float("nan") for r in subset]
        axes[1].plot(epochs, costs, marker, alpha=0.5, label=f"{order}: epochs to absolute target")
        axes[2].loglog(epochs, [r["best_residual"] for r in subset], marker, label=order)
    axes[1].set(xscale="log", yscale="log", xlabel="training epochs E on the forget set", ylabel="ascent epochs",
                title="cost of unlearning")  # fmt: skip
    axes[1].legend(fontsize=7)
    axes[2].set(
        xlabel="training epochs E", ylabel="closest ||theta - theta_0||", title="residual floor"
    )
    axes[2].legend(fontsize=7)
    _setup.save_figure(fig, path)


def main() -> None:
    args = parse_args()
    _setup.limit_threads(args)
    model, forget = build(args)
    rows = unlearning_runs(model, forget, args)
    stem = _setup.results_stem(f"unlearning_cost_{args.dataset}_{args.model}")
    stem.with_suffix(".json").write_text(json.dumps({"config": vars(args), "runs": rows}, indent=1))
    plot(rows, args, stem.with_suffix(".png"))
    for row in rows:
        print(f"E={row['epochs']:>3} {row['order']:>8}: displacement {row['displacement']:.3e}, closest "
              f"{row['best_residual']:.3e} ({row['best_relative']:.3f} rel) after {row['best_epoch']} ascent "
              f"epochs; to relative target {row['cost_relative_target']}, absolute {row['cost_absolute_target']}")  # fmt: skip


if __name__ == "__main__":
    main()
