"""Do gradient steps commute? (examples/README.md)

- H2: pairwise bracket norms ``||H_i g_j - H_j g_i||`` over a batch: do same-label pairs commute
  better than different-label pairs? (raw and normalized by ``||g_i|| ||g_j||``)
- H3: one epoch of SGD in two batch orders: the measured parameter distance against its
  second-order prediction ``lr^2 ||sum of brackets||``, over learning rates.
- O3: mean pairwise bracket norm along full-batch gradient descent, for linear regression on
  realizable and on noisy targets, softmax regression (a linear model) and an MLP on digits.

    python examples/commutation.py                                   # digits, ~2 min on CPU
    python examples/commutation.py --dataset cifar10 --models cnn resnet18 --device cuda \
        --dtype float32

Writes ``examples/results/commutation_<dataset>.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import _setup  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from influx import commutator, train  # noqa: E402

CROSS_ENTROPY = train.cross_entropy_per_example


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * (outputs.squeeze(-1) - targets) ** 2


def parse_args() -> argparse.Namespace:
    parser = _setup.example_parser(__doc__.split("\n\n")[0], model=False)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], help="for H2")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--pair-batch", type=int, default=64, help="batch for pairwise norms")
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--order-lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1])
    parser.add_argument("--order-examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--perms", type=int, default=4)
    parser.add_argument("--gd-steps", type=int, default=400, help="O3 gradient-descent steps")
    return parser.parse_args()


def same_vs_different_label(model, inputs, targets, args) -> dict:
    """H2 on one batch: summaries and a Mann-Whitney test, raw and normalized norms."""
    result = commutator.pairwise(
        model, CROSS_ENTROPY, (inputs[: args.pair_batch], targets[: args.pair_batch])
    )
    labels = result.targets
    first, second = torch.triu_indices(labels.numel(), labels.numel(), offset=1)
    same = labels[first] == labels[second]
    summary = {"pairs_same": int(same.sum()), "pairs_different": int((~same).sum())}
    for kind, matrix in (("raw", result.norms), ("normalized", result.normalized)):
        values = matrix[first, second].cpu()
        test = stats.mannwhitneyu(values[same], values[~same], alternative="less")
        larger = stats.mannwhitneyu(values[same], values[~same], alternative="greater")
        summary[kind] = {
            "same_mean": values[same].mean().item(),
            "different_mean": values[~same].mean().item(),
            "same_median": values[same].median().item(),
            "different_median": values[~same].median().item(),
            "ratio_of_medians": (values[same].median() / values[~same].median()).item(),
            "mannwhitney_p_same_smaller": float(test.pvalue),
            "mannwhitney_p_same_larger": float(larger.pvalue),
            # Common-language effect size P(a same-label norm < a different-label one); scipy's
            # U counts the pairs where the same-label value is the larger (ties count half).
            "prob_same_smaller": 1.0
            - float(test.statistic) / (int(same.sum()) * int((~same).sum())),
            "values_same": values[same].tolist(),
            "values_different": values[~same].tolist(),
        }
    return summary


def order_shift_vs_prediction(model, inputs, targets, args) -> list[dict]:
    """H3: one epoch, batches in order vs ``perms`` random orders, over learning rates."""
    subset = (inputs[: args.order_examples], targets[: args.order_examples])
    rows = []
    for lr in args.order_lrs:
        result = commutator.order_shift(model, CROSS_ENTROPY, subset, lr=lr, epochs=1,
                                        perms=args.perms, batch_size=args.batch_size, seed=args.seed)  # fmt: skip
        moved = result.measured > 0
        rows.append({
            "lr": lr, "measured": result.measured[moved].tolist(), "predicted": result.predicted[moved].tolist(),
            "relative_error": result.relative_error[moved].tolist(), "displacement": result.displacement,
        })  # fmt: skip
    return rows


def regression_problem(noise: float, seed: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 16, generator=generator, dtype=dtype) / 4.0
    y = x @ torch.randn(16, generator=generator, dtype=dtype)
    return x, y + noise * torch.randn(64, generator=generator, dtype=dtype)


def commutation_along_training(model, loss_fn, batch, *, lr: float, steps: int, every: int) -> dict:
    """O3: mean pairwise bracket norm and mean ||g_i|| at checkpoints of full-batch GD."""
    record = {"step": [], "bracket_mean": [], "grad_norm_mean": [], "loss": []}
    for step in range(0, steps + 1, every):
        result = commutator.pairwise(model, loss_fn, batch)
        count = result.norms.shape[0]
        record["step"].append(step)
        record["bracket_mean"].append((result.norms.sum() / (count * (count - 1))).item())
        record["grad_norm_mean"].append(result.grad_norms.mean().item())
        with torch.no_grad():
            record["loss"].append(loss_fn(model(batch[0]), batch[1]).mean().item())
        if step < steps:
            train.train(model, batch, loss=loss_fn, optimizer="sgd", lr=lr, steps=every,
                        batch_size=None, progress=False)  # fmt: skip
    return record


def asymptotic_commutation(dataset, inputs, targets, args) -> dict:
    dtype = getattr(torch, args.dtype)
    every = max(1, args.gd_steps // 10)
    runs = {}
    for name, noise in (("linear regression, realizable", 0.0), ("linear regression, noisy", 0.5)):
        x, y = regression_problem(noise, args.seed, dtype)
        torch.manual_seed(args.seed)
        model = torch.nn.Linear(16, 1, bias=False).to(dtype)
        runs[name] = commutation_along_training(model, half_squared_error, (x, y), lr=2.0,
                                                steps=args.gd_steps, every=every)  # fmt: skip
    batch = (inputs[: args.batch_size * 2], targets[: args.batch_size * 2])
    for name in ("linear", "mlp"):
        model = _setup.seeded_model(name, dataset, args)
        label = "softmax regression (digits)" if name == "linear" else f"{name} (digits)"
        runs[label] = commutation_along_training(model, CROSS_ENTROPY, batch, lr=0.5,
                                                 steps=args.gd_steps, every=every)  # fmt: skip
    return runs


def plot(h2: dict, h3: list[dict], o3: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    ax = axes[0]
    positions = 0
    for summary in h2.values():
        values = summary["normalized"]
        ax.boxplot([values["values_same"], values["values_different"]],
                   positions=[positions, positions + 1], widths=0.6)  # fmt: skip
        positions += 3
    ax.set_xticks([p + 0.5 for p in range(0, positions, 3)], list(h2))
    ax.set(yscale="log", ylabel="||[i, j]|| / (||g_i|| ||g_j||)",
           title="H2: same label (left) vs different (right)")  # fmt: skip
    ax = axes[1]
    for row in h3:
        ax.loglog(row["predicted"], row["measured"], "o", label=f"lr {row['lr']:g}")
    everything = [v for row in h3 for v in row["predicted"] + row["measured"]]
    ax.loglog([min(everything), max(everything)], [min(everything), max(everything)], "k--", lw=0.8)
    ax.set(xlabel="predicted lr^2 ||sum brackets||", ylabel="measured ||theta_perm - theta_ref||",
           title="H3: one epoch, two batch orders")  # fmt: skip
    ax.legend(fontsize=7)
    for name, record in o3.items():
        axes[2].semilogy(record["step"], record["bracket_mean"], label=name)
        ratio = [
            b / g**2 for b, g in zip(record["bracket_mean"], record["grad_norm_mean"], strict=True)
        ]
        axes[3].semilogy(record["step"], ratio, label=name)
    axes[2].set(xlabel="GD step", ylabel="mean ||H_i g_j - H_j g_i||", title="O3: along training")
    axes[3].set(xlabel="GD step", ylabel="mean bracket / (mean ||g_i||)^2", title="O3: scale-free")
    axes[2].legend(fontsize=7)
    _setup.save_figure(fig, path)


def main() -> None:
    args = parse_args()
    _setup.limit_threads(args)
    dataset, inputs, targets = _setup.load_examples(args, args.examples)
    trained = {}
    for name in args.models:
        model = _setup.seeded_model(name, dataset, args)
        trained[name] = _setup.pretrain(
            model, (inputs, targets), args, lr=1e-2, epochs=args.pretrain_epochs
        )
    h2 = {
        name: same_vs_different_label(model, inputs, targets, args)
        for name, model in trained.items()
    }
    h3 = order_shift_vs_prediction(trained[args.models[0]], inputs, targets, args)
    o3 = asymptotic_commutation(dataset, inputs, targets, args)
    stem = _setup.results_stem(f"commutation_{args.dataset}")
    stem.with_suffix(".json").write_text(
        json.dumps({"config": vars(args), "H2": h2, "H3": h3, "O3": o3}, indent=1)
    )
    plot(h2, h3, o3, stem.with_suffix(".png"))
    for name, summary in h2.items():
        for kind in ("raw", "normalized"):
            s = summary[kind]
            print(f"H2 {name} {kind}: median same {s['same_median']:.3e} vs different "
                  f"{s['different_median']:.3e} (ratio {s['ratio_of_medians']:.2f}, "
                  f"P(same < different) {s['prob_same_smaller']:.2f}, one-sided p same smaller "
                  f"{s['mannwhitney_p_same_smaller']:.1e}, same larger {s['mannwhitney_p_same_larger']:.1e})")  # fmt: skip
    for row in h3:
        print(f"H3 lr {row['lr']:g}: measured {row['measured']} predicted {row['predicted']}")
    for name, record in o3.items():
        print(f"O3 {name}: bracket {record['bracket_mean'][0]:.3e} -> {record['bracket_mean'][-1]:.3e}, "
              f"loss {record['loss'][0]:.3e} -> {record['loss'][-1]:.3e}")  # fmt: skip


if __name__ == "__main__":
    main()
