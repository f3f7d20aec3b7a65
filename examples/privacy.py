"""Privacy vs usefulness: does DP-SGD hide members and poisons more than a model of the same
accuracy trained without privacy? (examples/README.md)

A pool of training examples is split in half per seed: the target model trains on the members,
the other half are non-members. A fraction of the members carry Gaussian poisons (``x + xi``,
labels kept; ``influx.poison.gaussian``). Three kinds of model, all with one recipe (Adam, the
same batch size, epochs and initialization within a seed):

- ``no_dp``: trained without privacy for the whole run;
- ``dp[eps]``: DP-SGD at each target epsilon (``influx.dp.train``: ghost-clipped per-example
  gradients, Poisson batches, Opacus' RDP accountant; the epsilon spent is recorded);
- ``matched[eps]``: the accuracy-matched non-private baseline: the ``no_dp`` run stopped early,
  at the step whose test accuracy is nearest the DP model's (checkpoints at every step; the gap
  is reported). DP lowers accuracy; this row asks whether a model that is merely as weak hides
  the members and the poisons as well.

For each model, ``--shadows`` shadow models train on balanced random halves of the pool (each
example IN exactly half of them) with the same recipe (DP shadows at the same noise multiplier;
the matched baseline's shadows stop at the same step), and from ``influx.audit``:

- loss-threshold MIA (Yeom et al. 2018): score -loss; TPR at FPR 0.01 and AUC, clean members vs
  non-members;
- LiRA online (Carlini et al. 2022): per-example Gaussians of ``phi = log p_y - log(1 - p_y)``
  over the IN and OUT shadows with one pooled variance per side (few shadows); TPR at FPR 0.01
  and AUC;
- GUS of the poisons: z = sqrt(n) GUS, N(0, 1) under the null; one-sided and two-sided p.

FPR 0.01 is resolvable: with ``P`` pool examples there are ``P / 2`` non-members, so the ROC
moves in FPR steps of ``2 / P`` (1/600 at the default pool of 1200); the TPR is a count over the
clean members, reported with its Clopper-Pearson interval (pooled over seeds) next to the
t-interval of the per-seed TPRs. Each seed changes the member split, poison subset and noise,
shadow split, initializations, batch orders and DP noise (``influx.seeds.derive_seed``).
DP is compared with its matched baseline seed by seed (``influx.stats.paired_difference``).

    python examples/privacy.py                             # digits + MLP, 8 seeds, a few minutes
    python examples/privacy.py --dataset cifar10 --model resnet18 --device cuda --epochs 30

Writes ``examples/results/privacy_<dataset>_<model>.{json,png}``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
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

from influx import data, dp, models, poison, stats, train  # noqa: E402
from influx.audit.gus import gus_of  # noqa: E402
from influx.audit.mia import (  # noqa: E402
    lira_scores,
    logit_confidence,
    loss_attack,
    membership_metrics,
    per_example_losses,
    shadow_masks,
)
from influx.seeds import derive_seed  # noqa: E402

LOSS = train.cross_entropy_per_example
FPR = 0.01
ALPHA = 0.01  # one-sided level of the per-seed GUS test
Z_CRITICAL = float(scipy_stats.norm.isf(ALPHA))
# sub-seed streams of one seed; model k (0 = target, 1.. = shadows) adds k
MEMBER_STREAM, POISON_STREAM, SHADOW_STREAM, INIT_STREAM, ORDER_STREAM, NOISE_STREAM = range(6)
NULL_STREAM = 6


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0], dtype="float32")
    parser.add_argument("--pool", type=int, default=1200,
                        help="members + non-members (non-members = pool / 2 fix the FPR step)")  # fmt: skip
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 4.0, 2.0, 1.0],
                        help="target epsilons of the DP runs")  # fmt: skip
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--poison-fraction", type=float, default=0.1, help="of the members")
    parser.add_argument("--noise-std", type=float, default=1.0, help="Gaussian poison std")
    parser.add_argument("--shadows", type=int, default=6, help="LiRA shadow models (even)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def new_model(args, dataset, seed: int, k: int) -> torch.nn.Module:
    """Model k of a seed (0 = target, 1.. = shadows): the same init under every condition."""
    torch.manual_seed(derive_seed(seed, INIT_STREAM, k))
    model = models.build(args.model, dataset.input_shape, dataset.num_classes, width=args.width)
    return model.to(args.device, getattr(torch, args.dtype))


def fit_plain(args, dataset, train_data, steps: int, seed: int, k: int):
    """Non-private training of model k with a checkpoint at every step (for early stopping)."""
    model = new_model(args, dataset, seed, k)
    result = train.train(model, train_data, optimizer="adam", lr=args.lr, steps=steps,
                         batch_size=args.batch_size, seed=derive_seed(seed, ORDER_STREAM, k),
                         checkpoints=range(steps + 1), progress=False)  # fmt: skip
    return model.eval(), result


def fit_private(args, dataset, train_data, steps: int, sigma: float, seed: int, k: int, level: int):
    """DP-SGD training of model k at noise multiplier ``sigma`` (privacy level ``level``)."""
    model = new_model(args, dataset, seed, k)
    result = dp.train(model, train_data, max_grad_norm=args.max_grad_norm,
                      noise_multiplier=sigma, delta=args.delta, batch_size=args.batch_size,
                      steps=steps, optimizer="adam", lr=args.lr,
                      seed=derive_seed(seed, ORDER_STREAM, k),
                      noise_seed=derive_seed(seed, NOISE_STREAM, level, k), progress=False)  # fmt: skip
    return model.eval(), result


def at_step(model: torch.nn.Module, result, step: int) -> torch.nn.Module:
    """``model`` loaded with the checkpoint of ``step`` (the run stopped early there)."""
    model.load_state_dict(result.checkpoints[step].state_dict)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Attacks
# ------------------------------------------------------------------------------------------------


class Split:
    """One seed's pool: members, clean members, non-members, poisons, shadow membership."""

    def __init__(self, args, pool, seed: int):
        n = pool[0].shape[0]
        generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, MEMBER_STREAM))
        self.members = torch.zeros(n, dtype=torch.bool, device="cpu")
        self.members[torch.randperm(n, generator=generator, device="cpu")[: n // 2]] = True
        positions = self.members.nonzero().flatten()
        member_data = (pool[0][positions.to(pool[0].device)], pool[1][positions.to(pool[1].device)])
        self.gaussian = poison.gaussian(member_data, fraction=args.poison_fraction,
                                        noise_std=args.noise_std,
                                        seed=derive_seed(seed, POISON_STREAM))  # fmt: skip
        # membership is assessed on the clean members (the poisoned ones are scored by GUS)
        self.clean_member = self.members.clone()
        self.clean_member[positions[self.gaussian.mask.cpu()]] = False
        self.non_member = ~self.members
        self.shadow_in = shadow_masks(args.shadows, n, seed=derive_seed(seed, SHADOW_STREAM))
        inputs, targets, _ = data.as_tensors(self.gaussian.dataset)
        self.target_train = (inputs.to(pool[0]), targets.to(pool[1].device))

    def shadow_train(self, pool, k: int):
        chosen = self.shadow_in[k].nonzero().flatten().to(pool[0].device)
        return pool[0][chosen], pool[1][chosen]


def tpr_entry(result, n_members: int) -> dict:
    tpr = result.tpr_at_fpr[FPR]
    return {"tpr": tpr, "k": round(tpr * n_members), "auc": result.auc}


def attack(target, shadow_models, split: Split, pool, test, seed: int) -> dict:
    """Accuracy, loss MIA, LiRA and GUS of one target model against its shadows."""
    _, accuracy = train.evaluate(target, test)
    losses = per_example_losses(target, LOSS, pool).cpu()
    n_members = int(split.clean_member.sum())
    loss_mia = loss_attack(losses[split.clean_member], losses[split.non_member], fprs=(FPR,))
    shadow_phi = torch.stack([logit_confidence(m, pool) for m in shadow_models])
    scores = lira_scores(logit_confidence(target, pool), shadow_phi, split.shadow_in,
                         online=True, global_variance=True).cpu()  # fmt: skip
    assessed = split.clean_member | split.non_member
    lira = membership_metrics(scores[assessed], split.clean_member[assessed], fprs=(FPR,))
    g = gus_of(target, LOSS, split.gaussian, null_seed=derive_seed(seed, NULL_STREAM))
    test_z = stats.z_test(g.z)
    return {"test_accuracy": accuracy, "loss_mia": tpr_entry(loss_mia, n_members),
            "lira": tpr_entry(lira, n_members),
            "gus": {"z": g.z, "p_one_sided": test_z["p_one_sided"],
                    "p_two_sided": test_z["p_two_sided"], "abs_z": test_z["abs_z"],
                    "tpr": g.tpr_at_fpr, "null_z": g.null_z}}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# One seed
# ------------------------------------------------------------------------------------------------


def test_accuracies(model, result, test) -> list[float]:
    """Test accuracy after every step of a run with a checkpoint at every step."""
    out = []
    for step in range(len(result.checkpoints)):
        out.append(train.evaluate(at_step(model, result, step), test)[1])
    return out


def matched_step(curve: list[float], accuracy: float) -> int:
    """The earliest step whose test accuracy is nearest ``accuracy``."""
    gaps = [abs(a - accuracy) for a in curve]
    return gaps.index(min(gaps))


def train_plain(args, dataset, split: Split, pool, steps: int, seed: int) -> list:
    """The non-private target (model 0) and shadows, with a checkpoint at every step."""
    runs = [fit_plain(args, dataset, split.target_train, steps, seed, 0)]
    runs += [fit_plain(args, dataset, split.shadow_train(pool, k), steps, seed, k + 1)
             for k in range(args.shadows)]  # fmt: skip
    return runs


def train_private(args, dataset, split: Split, pool, steps, sigma, seed, level) -> list:
    """The DP target (model 0) and shadows, all at noise multiplier ``sigma``."""
    runs = [fit_private(args, dataset, split.target_train, steps, sigma, seed, 0, level)]
    runs += [fit_private(args, dataset, split.shadow_train(pool, k), steps, sigma, seed, k + 1,
                         level) for k in range(args.shadows)]  # fmt: skip
    return runs


def attack_at_step(plain: list, step: int, split: Split, pool, test, seed: int) -> dict:
    """The attacks on the non-private target and shadows all stopped after ``step`` steps."""
    models_at = [at_step(model, result, step) for model, result in plain]
    return attack(models_at[0], models_at[1:], split, pool, test, seed)


def run_seed(args, dataset, pool, test, seed: int) -> dict:
    """One seed: the full non-private run, then per epsilon the DP run and its matched baseline.

    Every model trains for the target's number of steps (``epochs`` passes over the members);
    the shadows' halves differ slightly in size, their step count does not."""
    split = Split(args, pool, seed)
    n_train = split.target_train[0].shape[0]
    steps = args.epochs * math.ceil(n_train / args.batch_size)
    seconds = {}
    start = time.perf_counter()
    plain = train_plain(args, dataset, split, pool, steps, seed)
    record = {"no_dp": attack_at_step(plain, steps, split, pool, test, seed), "dp": {},
              "matched": {}}  # fmt: skip
    curve = test_accuracies(*plain[0], test)
    seconds["no_dp"] = time.perf_counter() - start
    for level, epsilon in enumerate(args.epsilons):
        start = time.perf_counter()
        key = f"{epsilon:g}"
        sigma = dp.noise_multiplier_for(epsilon, args.batch_size / n_train, steps, args.delta)
        private = train_private(args, dataset, split, pool, steps, sigma, seed, level)
        row = attack(private[0][0], [m for m, _ in private[1:]], split, pool, test, seed)
        row.update(epsilon_spent=private[0][1].privacy["epsilon"], noise_multiplier=sigma)
        step = matched_step(curve, row["test_accuracy"])
        matched = attack_at_step(plain, step, split, pool, test, seed)
        matched.update(step=step, accuracy_gap=matched["test_accuracy"] - row["test_accuracy"])
        record["dp"][key], record["matched"][key] = row, matched
        seconds[f"dp_{key}"] = time.perf_counter() - start
        print(f"seed {seed} eps {key}: acc DP {row['test_accuracy']:.3f} matched "
              f"{matched['test_accuracy']:.3f} (step {step}); GUS z DP {row['gus']['z']:.2f} "
              f"matched {matched['gus']['z']:.2f} no DP {record['no_dp']['gus']['z']:.2f}",
              flush=True)  # fmt: skip
    record.update(n_members=int(split.clean_member.sum()),
                  n_nonmembers=int(split.non_member.sum()), poisons=split.gaussian.count,
                  steps=steps, seconds=seconds)  # fmt: skip
    return record


# ------------------------------------------------------------------------------------------------
# Over seeds
# ------------------------------------------------------------------------------------------------


def conditions(records: list[dict], args) -> dict:
    """Condition name -> the per-seed rows of that model (no_dp, dp_<eps>, matched_<eps>)."""
    out = {"no_dp": [r["no_dp"] for r in records]}
    for epsilon in args.epsilons:
        key = f"{epsilon:g}"
        out[f"dp_{key}"] = [r["dp"][key] for r in records]
        out[f"matched_{key}"] = [r["matched"][key] for r in records]
    return out


def pooled_tpr(rows: list[dict], attack_name: str, records: list[dict]) -> dict:
    """Detected members pooled over seeds, with their Clopper-Pearson interval."""
    k = sum(row[attack_name]["k"] for row in rows)
    n = sum(r["n_members"] for r in records)
    return stats.proportion(k, n).to_dict()


def condition_summary(rows: list[dict], records: list[dict]) -> dict:
    return {
        **stats.summarize_records(rows),
        "gus_fraction_significant": stats.fraction_significant(
            [row["gus"]["p_one_sided"] for row in rows], ALPHA
        ).to_dict(),
        "lira_tpr_pooled": pooled_tpr(rows, "lira", records),
        "loss_mia_tpr_pooled": pooled_tpr(rows, "loss_mia", records),
    }


METRICS = {"test_accuracy": ("test_accuracy",), "gus_z": ("gus", "z"),
           "lira_tpr": ("lira", "tpr"), "lira_auc": ("lira", "auc"),
           "loss_mia_tpr": ("loss_mia", "tpr"), "loss_mia_auc": ("loss_mia", "auc")}  # fmt: skip


def metric(row: dict, name: str) -> float:
    value = row
    for part in METRICS[name]:
        value = value[part]
    return value


def paired(a_rows: list[dict], b_rows: list[dict]) -> dict:
    return {name: stats.paired_difference([metric(r, name) for r in a_rows],
                                          [metric(r, name) for r in b_rows]).to_dict()
            for name in METRICS}  # fmt: skip


def answer(difference: dict) -> str:
    """Does DP lower GUS z more than its accuracy-matched baseline? (95% interval of DP - matched)."""
    if difference["high"] < 0:
        return "DP lower than the matched baseline"
    if difference["low"] > 0:
        return "DP higher than the matched baseline"
    return "no difference resolved"


def summarize_all(records: list[dict], args) -> dict:
    by = conditions(records, args)
    summary = {"conditions": {name: condition_summary(rows, records) for name, rows in by.items()}}
    summary["dp_minus_matched"], summary["dp_minus_no_dp"], summary["matched_minus_no_dp"] = (
        {},
        {},
        {},
    )
    summary["answer"] = {}
    for epsilon in args.epsilons:
        key = f"{epsilon:g}"
        dp_rows, matched_rows = by[f"dp_{key}"], by[f"matched_{key}"]
        difference = paired(dp_rows, matched_rows)
        summary["dp_minus_matched"][key] = difference
        summary["dp_minus_no_dp"][key] = paired(dp_rows, by["no_dp"])
        summary["matched_minus_no_dp"][key] = paired(matched_rows, by["no_dp"])
        summary["answer"][key] = {name: answer(difference[name])
                                  for name in ("gus_z", "lira_tpr", "loss_mia_tpr")}  # fmt: skip
    return summary


def print_table(summary: dict, args) -> None:
    def cell(entry):
        return f"{entry['mean']:6.3f} [{entry['low']:6.3f}, {entry['high']:6.3f}]"

    print(f"{'condition':>12} {'test acc':>24} {'GUS z':>24} {'sig':>5} {'LiRA TPR@1%':>24}")
    for name, entry in summary["conditions"].items():
        frac = entry["gus_fraction_significant"]
        print(f"{name:>12} {cell(entry['test_accuracy']):>24} {cell(entry['gus']['z']):>24} "
              f"{frac['k']:>2}/{frac['n']:<2} {cell(entry['lira']['tpr']):>24}")  # fmt: skip
    for key, difference in summary["dp_minus_matched"].items():
        print(f"eps {key}: DP - matched: GUS z {cell(difference['gus_z'])}, LiRA TPR "
              f"{cell(difference['lira_tpr'])}, acc {cell(difference['test_accuracy'])}")  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Figure
# ------------------------------------------------------------------------------------------------


def _band(values_per_x: list[list[float]]):
    """(means, lows, highs) of the 95% t-intervals, one per x (the mean itself with one seed)."""
    summaries = [stats.summarize(v) for v in values_per_x]
    means = [s.mean for s in summaries]
    lows = [s.mean if s.n == 1 else s.low for s in summaries]
    highs = [s.mean if s.n == 1 else s.high for s in summaries]
    return means, lows, highs


def _line(ax, x, values_per_x, label, style, color) -> None:
    means, lows, highs = _band(values_per_x)
    ax.plot(x, means, style, color=color, label=label)
    ax.fill_between(x, lows, highs, color=color, alpha=0.2)


def _reference(ax, values, label, color="gray") -> None:
    means, lows, highs = _band([values])
    ax.axhspan(lows[0], highs[0], color=color, alpha=0.15)
    ax.axhline(means[0], color=color, ls=":", lw=1, label=label)


def plot(records: list[dict], args, path: Path) -> None:
    by = conditions(records, args)
    keys = [f"{e:g}" for e in args.epsilons]
    x = list(range(len(keys)))

    def series(prefix, name):
        return [[metric(row, name) for row in by[f"{prefix}_{key}"]] for key in keys]

    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
    for ax, name, title in ((axes[0], "test_accuracy", "test accuracy"),
                            (axes[1], "gus_z", "GUS z of the poisons")):  # fmt: skip
        _line(ax, x, series("dp", name), "DP-SGD", "o-", "C0")
        _line(ax, x, series("matched", name), "no DP, accuracy-matched (early stop)", "s--", "C1")
        _reference(ax, [metric(row, name) for row in by["no_dp"]], "no DP, full run")
        ax.set_title(title, fontsize=10)
    axes[1].axhline(Z_CRITICAL, color="red", ls="--", lw=1, label=f"one-sided {ALPHA:g} level")
    axes[1].axhline(0, color="black", lw=0.8)
    for name, color, label in (("lira_tpr", "C2", "LiRA"), ("loss_mia_tpr", "C3", "loss MIA")):
        _line(axes[2], x, series("dp", name), f"{label}, DP-SGD", "o-", color)
        _line(axes[2], x, series("matched", name), f"{label}, matched", "s--", color)
    _reference(axes[2], [metric(row, "lira_tpr") for row in by["no_dp"]], "LiRA, no DP, full run",
               color="C2")  # fmt: skip
    axes[2].axhline(FPR, color="gray", ls="--", lw=1, label="chance (TPR = FPR)")
    axes[2].set_title(f"MIA TPR at FPR {FPR:g} (FPR step 1/{records[0]['n_nonmembers']})",
                      fontsize=10)  # fmt: skip
    for ax, name, title in ((axes[3], "gus_z", "GUS z: DP minus matched (paired)"),
                            (axes[4], "lira_tpr", "LiRA TPR: DP minus matched (paired)")):  # fmt: skip
        differences = [[metric(d, name) - metric(m, name)
                        for d, m in zip(by[f"dp_{key}"], by[f"matched_{key}"])] for key in keys]  # fmt: skip
        _line(ax, x, differences, "mean, 95% CI", "o-", "C4")
        for seed_values in zip(*differences):
            ax.plot(x, seed_values, color="C4", lw=0.5, alpha=0.4)
        ax.plot([], [], color="C4", lw=0.5, alpha=0.4, label="seeds")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(title, fontsize=10)
    for ax in axes:
        ax.set_xticks(x, keys)
        ax.set_xlabel("target epsilon")
        ax.legend(fontsize=7)
    fig.suptitle(f"{args.dataset} {args.model}, {len(records)} seeds (bands: 95% t-interval): "
                 f"DP-SGD (C = {args.max_grad_norm:g}, delta = {args.delta:g}) vs an "
                 "accuracy-matched non-private model", fontsize=10)  # fmt: skip
    save_figure(fig, path)


def load(args):
    train_set = data.load(args.dataset, root=args.data_dir, split="train")
    inputs, targets, _ = data.as_tensors(train_set)
    n = min(args.pool, inputs.shape[0])
    dtype = getattr(torch, args.dtype)
    pool = (inputs[:n].to(args.device, dtype), targets[:n].to(args.device))
    test_set = data.load(args.dataset, root=args.data_dir, split="test")
    test_inputs, test_targets, _ = data.as_tensors(test_set)
    test = (test_inputs.to(args.device, dtype), test_targets.to(args.device))
    return train_set, pool, test


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.shadows < 4 or args.shadows % 2:
        # with 2 shadows each example has one IN and one OUT signal: no spread to fit
        raise SystemExit("--shadows must be an even number >= 4")
    limit_threads(args)
    start = time.perf_counter()
    dataset, pool, test = load(args)
    name = f"privacy_{args.dataset}_{args.model}"
    results = Results(name, args)
    records = over_seeds(args, results, lambda seed: run_seed(args, dataset, pool, test, seed))
    n_nonmembers = records[0]["n_nonmembers"]
    results["resolution"] = {"nonmembers": n_nonmembers, "fpr_step": 1 / n_nonmembers,
                             "nonmembers_above_threshold_at_fpr": math.floor(FPR * n_nonmembers),
                             "clean_members": records[0]["n_members"]}  # fmt: skip
    results["summary"] = summarize_all(records, args)
    results["seconds"] = time.perf_counter() - start
    results.write()
    plot(records, args, results_stem(name).with_suffix(".png"))
    print_table(results["summary"], args)
    print(f"resolution {results['resolution']}; total {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
