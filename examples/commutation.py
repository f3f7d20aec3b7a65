"""Do gradient steps commute? (examples/README.md)

- H2: pairwise bracket norms ``||H_i g_j - H_j g_i||`` over a batch: do same-label pairs commute
  better than different-label pairs? (raw and normalized by ``||g_i|| ||g_j||``). Per seed, the
  effect size P(a same-label norm < a different-label one) and the ratio of medians; the evidence
  is their interval over seeds (the pairs of one batch share examples, so per-pair tests
  overstate it).
- H3: one epoch of SGD in two batch orders: the measured parameter distance against its
  second-order prediction ``lr^2 ||sum of brackets||``, over learning rates.
- O3: mean pairwise bracket norm along full-batch gradient descent, for linear regression on
  realizable and on noisy targets, softmax regression (a linear model) and an MLP on digits.

Every quantity is measured once per seed (``--seeds``, default 8; the seed draws the training
subset, the initializations, the pretraining and permutation orders and the regression data) and
reported as its mean, 95% interval and per-seed values (``influx.stats``).

    python examples/commutation.py                                   # digits, 8 seeds
    python examples/commutation.py --dataset cifar10 --models cnn resnet18 --device cuda \
        --dtype float32

Writes ``examples/results/commutation_<dataset>.{json,png}``.
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

from influx import commutator, stats, train  # noqa: E402
from influx.seeds import derive_seed  # noqa: E402

CROSS_ENTROPY = train.cross_entropy_per_example
KINDS = ("raw", "normalized")


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * (outputs.squeeze(-1) - targets) ** 2


def parse_args() -> argparse.Namespace:
    parser = _setup.example_parser(__doc__.split("\n\n")[0], model=False)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], help="for H2")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--pair-batch", type=int, default=48, help="batch for pairwise norms")
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--order-lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1])
    parser.add_argument("--order-examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--perms", type=int, default=4, help="H3 random orders per lr and seed")
    parser.add_argument("--gd-steps", type=int, default=400, help="O3 gradient-descent steps")
    parser.add_argument("--checkpoints", type=int, default=8, help="O3 checkpoints after step 0")
    parser.add_argument("--o3-examples", type=int, default=64, help="O3 full-batch size")
    return parser.parse_args()


def label_effect(values: torch.Tensor, same: torch.Tensor) -> dict:
    """Same-label vs different-label norms of one batch: medians, their ratio, the probability
    P(same < different) (ties count half; 0.5 = no effect) and one-sided Mann-Whitney p-values
    (pairs treated as independent, which they are not: descriptive only)."""
    same_values, different_values = values[same].numpy(), values[~same].numpy()
    less = scipy_stats.mannwhitneyu(same_values, different_values, alternative="less")
    greater = scipy_stats.mannwhitneyu(same_values, different_values, alternative="greater")
    # scipy's U counts the pairs where the same-label value is the larger.
    prob_same_smaller = 1.0 - float(less.statistic) / (same_values.size * different_values.size)
    same_median, different_median = (
        float(np.median(same_values)),
        float(np.median(different_values)),
    )
    return {
        "same_median": same_median,
        "different_median": different_median,
        "log10_ratio_of_medians": math.log10(same_median / different_median),
        "prob_same_smaller": prob_same_smaller,
        "pair_p_same_smaller": float(less.pvalue),
        "pair_p_same_larger": float(greater.pvalue),
    }


def same_vs_different_label(model, inputs, targets, args) -> dict:
    """H2 on one batch of ``--pair-batch`` examples, raw and normalized bracket norms."""
    batch = (inputs[: args.pair_batch], targets[: args.pair_batch])
    result = commutator.pairwise(model, CROSS_ENTROPY, batch)
    labels = result.targets
    first, second = torch.triu_indices(labels.numel(), labels.numel(), offset=1)
    same = (labels[first] == labels[second]).cpu()
    out = {"pairs_same": int(same.sum()), "pairs_different": int((~same).sum())}
    for kind, matrix in (("raw", result.norms), ("normalized", result.normalized)):
        out[kind] = label_effect(matrix[first, second].cpu(), same)
    return out


def order_shift_vs_prediction(model, inputs, targets, args) -> dict:
    """H3: one epoch, batches in order vs ``--perms`` random orders, per learning rate: the
    measured distance, its prediction and the signed error ``(predicted - measured) / measured``
    (averaged over the orders that moved)."""
    subset = (inputs[: args.order_examples], targets[: args.order_examples])
    out = {}
    for lr in args.order_lrs:
        result = commutator.order_shift(model, CROSS_ENTROPY, subset, lr=lr, epochs=1,
                                        perms=args.perms, batch_size=args.batch_size,
                                        seed=derive_seed(args.seed, 5))  # fmt: skip
        moved = result.measured > 0
        measured, predicted = result.measured[moved], result.predicted[moved]
        out[f"{lr:g}"] = {
            "lr": lr,
            "measured": measured.mean().item(),
            "predicted": predicted.mean().item(),
            "signed_relative_error": ((predicted - measured) / measured).mean().item(),
            "measured_per_order": measured.tolist(),
            "predicted_per_order": predicted.tolist(),
        }
    return out


def lr_exponent(h3: dict) -> float:
    """Slope of log measured shift vs log lr between the two smallest learning rates (2 when
    the shift is the lr^2 term)."""
    rows = sorted(h3.values(), key=lambda row: row["lr"])[:2]
    return math.log(rows[1]["measured"] / rows[0]["measured"]) / math.log(
        rows[1]["lr"] / rows[0]["lr"]
    )


def regression_problem(count: int, noise: float, seed: int, dtype):
    """(x [count, 16], y [count]): targets of a random linear map plus ``noise`` x N(0, 1); with
    count > 16 and noise > 0 no parameter fits every example."""
    generator = torch.Generator().manual_seed(derive_seed(seed, 6))
    x = torch.randn(count, 16, generator=generator, dtype=dtype) / 4.0
    y = x @ torch.randn(16, generator=generator, dtype=dtype)
    return x, y + noise * torch.randn(count, generator=generator, dtype=dtype)


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
            train.train(model, batch, loss_fn=loss_fn, optimizer="sgd", lr=lr, steps=every,
                        batch_size=None, progress=False)  # fmt: skip
    record["log10_bracket_drop"] = math.log10(
        record["bracket_mean"][-1] / record["bracket_mean"][0]
    )
    record["final_bracket"] = record["bracket_mean"][-1]
    record["final_loss"] = record["loss"][-1]
    return record


def asymptotic_commutation(dataset, inputs, targets, args) -> dict:
    dtype = getattr(torch, args.dtype)
    every = max(1, args.gd_steps // args.checkpoints)
    runs = {}
    for name, noise in (("linear regression, realizable", 0.0), ("linear regression, noisy", 0.5)):
        x, y = regression_problem(args.o3_examples, noise, args.seed, dtype)
        torch.manual_seed(derive_seed(args.seed, 7))
        model = torch.nn.Linear(16, 1, bias=False).to(dtype)
        runs[name] = commutation_along_training(model, half_squared_error, (x, y), lr=2.0,
                                                steps=args.gd_steps, every=every)  # fmt: skip
    batch = (inputs[: args.o3_examples], targets[: args.o3_examples])
    for name in ("linear", "mlp"):
        model = _setup.seeded_model(name, dataset, args)
        label = "softmax regression (digits)" if name == "linear" else f"{name} (digits)"
        runs[label] = commutation_along_training(model, CROSS_ENTROPY, batch, lr=0.5,
                                                 steps=args.gd_steps, every=every)  # fmt: skip
    return runs


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    args = _setup.for_seed(args, seed)
    seconds, start = {}, time.perf_counter()
    dataset, inputs, targets = _setup.seeded_subset(args, args.examples)
    trained = {}
    for name in args.models:
        model = _setup.seeded_model(name, dataset, args)
        trained[name] = _setup.pretrain(
            model, (inputs, targets), args, lr=1e-2, epochs=args.pretrain_epochs
        )
    seconds["pretrain"] = time.perf_counter() - start
    record = {}
    for phase, compute in (
        (
            "H2",
            lambda: {
                name: same_vs_different_label(m, inputs, targets, args)
                for name, m in trained.items()
            },
        ),  # fmt: skip
        ("H3", lambda: order_shift_vs_prediction(trained[args.models[0]], inputs, targets, args)),
        ("O3", lambda: asymptotic_commutation(dataset, inputs, targets, args)),
    ):
        start = time.perf_counter()
        record[phase] = compute()
        seconds[phase] = time.perf_counter() - start
    record["H3_lr_exponent"] = lr_exponent(record["H3"])
    record["seconds"] = seconds
    return record


def summarize(records: list[dict]) -> dict:
    """Every number over seeds; for H2 also P(same < different) - 0.5 and the log10 ratio of
    medians tested against 0 over seeds (the seed-level evidence)."""
    summary = stats.summarize_records(records)
    h2 = {}
    for name in records[0]["H2"]:
        h2[name] = {}
        for kind in KINDS:
            effects = [r["H2"][name][kind] for r in records]
            prob = [e["prob_same_smaller"] for e in effects]
            ratio = [e["log10_ratio_of_medians"] for e in effects]
            h2[name][kind] = {
                "prob_minus_half": stats.paired_difference(prob, [0.5] * len(prob)).to_dict(),
                "log10_ratio_vs_0": stats.paired_difference(ratio, [0.0] * len(ratio)).to_dict(),
                "pair_tests_same_smaller_at_0.01": stats.fraction_significant(
                    [e["pair_p_same_smaller"] for e in effects]
                ).to_dict(),  # fmt: skip
                "pair_tests_same_larger_at_0.01": stats.fraction_significant(
                    [e["pair_p_same_larger"] for e in effects]
                ).to_dict(),  # fmt: skip
            }
    summary["H2_seed_level"] = h2
    return summary


def interval_text(node: dict, digits: int = 3) -> str:
    return f"{node['mean']:.{digits}g} [{node['low']:.{digits}g}, {node['high']:.{digits}g}]"


def error_bar(ax, x: float, node: dict, **style) -> None:
    """Mean with its 95% interval at ``x`` and the per-seed values as dots beside it."""
    ax.errorbar(x, node["mean"], [[node["mean"] - node["low"]], [node["high"] - node["mean"]]],
                fmt="o", capsize=4, **style)  # fmt: skip
    ax.plot([x + 0.12] * len(node["values"]), node["values"], ".", ms=3, color="0.4")


def plot_h2(ax, summary: dict, key: str, ylabel: str, null: float, title: str) -> None:
    names = list(summary["H2"])
    for k, kind in enumerate(KINDS):
        for m, name in enumerate(names):
            error_bar(ax, m * 3 + k, summary["H2"][name][kind][key], color=f"C{k}",
                      label=kind if m == 0 else None)  # fmt: skip
    ax.axhline(null, color="k", ls="--", lw=0.8, label="no effect")
    ax.set_xticks([m * 3 + 0.5 for m in range(len(names))], names)
    ax.set(ylabel=ylabel, title=f"H2: {title} (mean, 95% interval, seeds)")
    ax.legend(fontsize=7)


def plot_h3(ax, records: list[dict], summary: dict) -> None:
    lrs = list(records[0]["H3"])
    x = [float(lr) for lr in lrs]
    nodes = [summary["H3"][lr]["signed_relative_error"] for lr in lrs]
    for record in records:
        ax.plot(x, [record["H3"][lr]["signed_relative_error"] for lr in lrs], color="0.7", lw=0.7)
    ax.plot(x, [n["mean"] for n in nodes], "o-", color="C0", label="mean over seeds")
    ax.fill_between(x, [n["low"] for n in nodes], [n["high"] for n in nodes], alpha=0.3,
                    color="C0", label="95% interval")  # fmt: skip
    ax.plot([], [], color="0.7", lw=0.7, label="seeds")
    ax.set(xscale="log", xlabel="learning rate", ylabel="(predicted - measured) / measured",
           title="H3: one epoch, two batch orders")  # fmt: skip
    ax.legend(fontsize=7)


def plot_o3(ax, records: list[dict], value) -> None:
    """Per-seed trajectories (thin) and their geometric mean (thick), one colour per run."""
    for k, name in enumerate(records[0]["O3"]):
        curves = np.array([value(r["O3"][name]) for r in records])
        steps = records[0]["O3"][name]["step"]
        for curve in curves:
            ax.plot(steps, curve, color=f"C{k}", lw=0.5, alpha=0.5)
        ax.plot(steps, np.exp(np.log(curves).mean(0)), color=f"C{k}", lw=2, label=name)
    ax.set(yscale="log", xlabel="GD step")
    ax.legend(fontsize=7)


def plot(records: list[dict], summary: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 5, figsize=(25, 4.5))
    plot_h2(axes[0], summary, "prob_same_smaller", "P(same-label norm < different-label)", 0.5,
            "effect size")  # fmt: skip
    plot_h2(axes[1], summary, "log10_ratio_of_medians", "log10(median same / median different)",
            0.0, "ratio of medians")  # fmt: skip
    plot_h3(axes[2], records, summary)
    plot_o3(axes[3], records, lambda run: run["bracket_mean"])
    axes[3].set(ylabel="mean ||H_i g_j - H_j g_i||", title="O3: along training (seeds thin)")
    plot_o3(axes[4], records, lambda run: np.array(run["bracket_mean"])
            / np.array(run["grad_norm_mean"]) ** 2)  # fmt: skip
    axes[4].set(ylabel="mean bracket / (mean ||g_i||)^2", title="O3: scale-free")
    _setup.save_figure(fig, path)


def report(summary: dict) -> None:
    for name, kinds in summary["H2"].items():
        for kind in KINDS:
            node, seed_level = kinds[kind], summary["H2_seed_level"][name][kind]
            print(f"H2 {name} {kind}: P(same < different) {interval_text(node['prob_same_smaller'])} "
                  f"(t p {seed_level['prob_minus_half'].get('p_value', math.nan):.1e}), log10 median ratio "
                  f"{interval_text(node['log10_ratio_of_medians'])}")  # fmt: skip
    for lr, node in summary["H3"].items():
        print(f"H3 lr {lr}: measured {interval_text(node['measured'])}, (predicted - measured) / "
              f"measured {interval_text(node['signed_relative_error'])}")  # fmt: skip
    print(f"H3 exponent of lr (two smallest): {interval_text(summary['H3_lr_exponent'])}")
    for name, node in summary["O3"].items():
        print(f"O3 {name}: log10 bracket drop {interval_text(node['log10_bracket_drop'])}, final "
              f"bracket {interval_text(node['final_bracket'])}, loss {interval_text(node['final_loss'])}")  # fmt: skip


def main() -> None:
    args = parse_args()
    _setup.limit_threads(args)
    name = f"commutation_{args.dataset}"
    results = _setup.Results(name, args)
    records = _setup.over_seeds(args, results, lambda seed: run_seed(args, seed))
    summary = summarize(records)
    results["summary"] = summary
    results.write()
    plot(records, summary, _setup.results_stem(name).with_suffix(".png"))
    report(summary)
    seconds = sum(sum(r["seconds"].values()) for r in records)
    print(f"{len(records)} seeds, {seconds:.0f} s of seed work")


if __name__ == "__main__":
    main()
