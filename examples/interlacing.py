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

For every (placement, rule) we report the test accuracy, the GUS of the poisons
(``influx.audit.gus``: mean score, z = sqrt(n) GUS, TPR at FPR 0.01 of the per-point test), the
self-influence of the poisons against the clean points (``influx.influence``, EK-FAC; AUC of
telling poisons from clean points by self-influence), and, for Krum and multi-Krum, the share of
poisons among the examples of the micro-batches they selected (the data's share is the poison
fraction). A clean run (no poisons, mean) gives the null.

    python examples/interlacing.py                         # digits + MLP, a few minutes on CPU
    python examples/interlacing.py --dataset cifar10 --model resnet18 --device cuda --epochs 30

Writes ``examples/results/interlacing_<dataset>_<model>.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from _setup import example_parser, results_stem, save_figure, seeded_model  # noqa: E402

from influx import aggregate, data, influence, poison, train  # noqa: E402
from influx.audit.gus import gus_of  # noqa: E402

LOSS = train.cross_entropy_per_example
PLACEMENTS = ("concentrated", "interlaced")


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0], dtype="float32")
    parser.add_argument("--train-size", type=int, default=None, help="default: all, rounded")
    parser.add_argument("--poison-fraction", type=float, default=0.125)
    parser.add_argument("--noise-std", type=float, default=1.0, help="Gaussian poison std")
    parser.add_argument("--micro-batch", type=int, default=8, help="examples per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step")
    parser.add_argument("--f", type=int, default=2, help="Byzantine count for Krum")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--influence", default="ekfac", help="self-influence method")
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
    """Train tensors (a multiple of the step size), test set."""
    step = args.micro_batch * args.micro_batches
    train_set = data.load(args.dataset, root=args.data_dir, split="train")
    n = len(train_set) if args.train_size is None else min(args.train_size, len(train_set))
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


def one_run(args, dataset, train_data, test_data, placement, name, make_rule, gaussian):
    """Train with one aggregation rule on one placement ("clean": no poisons) and score it."""
    torch.manual_seed(args.seed)
    model = seeded_model(args.model, dataset, args)
    rule = make_rule()
    inputs, targets, indices = train_data
    if placement != "clean":
        inputs, targets, indices = poisoned_tensors(gaussian, args)
    schedule = None
    if placement != "clean":
        make = poison.interlaced if placement == "interlaced" else poison.concentrated
        schedule = make(gaussian.mask, args.micro_batch, seed=args.seed)
    start = time.perf_counter()
    result = train.train(
        model, (inputs, targets, indices), optimizer="adam", lr=args.lr, epochs=args.epochs,
        batch_size=args.micro_batch * args.micro_batches, micro_batches=args.micro_batches,
        aggregator=rule, sampling=schedule if schedule is not None else "shuffle",
        seed=args.seed, progress=False,
    )  # fmt: skip
    model.eval()
    _, accuracy = train.evaluate(model, test_data)
    row = {"placement": placement, "rule": name, "aggregator": repr(rule),
           "test_accuracy": accuracy, "train_accuracy": result.final_accuracy}  # fmt: skip
    # the clean model never saw the noise: its GUS is a draw from the null
    scores = gus_of(model, LOSS, gaussian)
    row.update(gus=scores.gus, gus_z=scores.z, gus_tpr_at_fpr_0_01=scores.tpr_at_fpr,
               null_gus=scores.null_gus, null_z=scores.null_z)  # fmt: skip
    # over the poisoned training set even for the clean model (a reference: those points unseen)
    fitted = influence.fit(model, LOSS, poisoned_tensors(gaussian, args)[:2], method=args.influence)
    self_inf = fitted.self_influence().cpu().double()
    mask = gaussian.mask.cpu()
    poisoned_s, clean_s = self_inf[mask], self_inf[~mask]
    row.update(
        self_influence_poison_mean=poisoned_s.mean().item(),
        self_influence_clean_mean=clean_s.mean().item(),
        # P(s(poison) > s(clean)) over all pairs: the AUC of detecting poisons by s
        self_influence_auc=(poisoned_s[:, None] > clean_s[None, :]).double().mean().item(),
    )
    if isinstance(rule, SelectionRecorder):
        row["selected_poison_share"] = selected_poison_share(rule, result, gaussian.indices, args)
    row["seconds"] = time.perf_counter() - start
    print(json.dumps(row))
    return row


def plot(rows, args, path: Path) -> None:
    names = list(aggregators(args))
    panels = [("test_accuracy", "test accuracy"), ("gus_z", "GUS z = sqrt(n) GUS"),
              ("self_influence_auc", "self-influence AUC (poison vs clean)"),
              ("selected_poison_share", "poison share in selected micro-batches")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    width = 0.38
    for ax, (key, title) in zip(axes, panels):
        for k, placement in enumerate(PLACEMENTS):
            values = [
                next((r.get(key) for r in rows if r["placement"] == placement and r["rule"] == n),
                     None) or float("nan")
                for n in names
            ]  # fmt: skip
            ax.bar([i + (k - 0.5) * width for i in range(len(names))], values, width,
                   label=placement)  # fmt: skip
        clean = next(r for r in rows if r["placement"] == "clean")
        if key == "test_accuracy":
            ax.axhline(clean["test_accuracy"], color="gray", ls="--", lw=1, label="clean data")
        if key == "gus_z":
            ax.axhline(clean["gus_z"], color="gray", ls="--", lw=1, label="never trained on")
        if key == "selected_poison_share":
            ax.axhline(args.poison_fraction, color="gray", ls="--", lw=1, label="data share")
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{args.dataset} {args.model}: {args.micro_batches} micro-batches of {args.micro_batch}, "
        f"{args.poison_fraction:.1%} Gaussian poisons (std {args.noise_std:g})", fontsize=10
    )  # fmt: skip
    save_figure(fig, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.micro_batches <= 2 * args.f + 2:
        raise SystemExit(f"Krum with f={args.f} needs more than {2 * args.f + 2} micro-batches")
    dataset, train_data, test_data = load(args)
    gaussian = poison.gaussian(
        train_data, fraction=args.poison_fraction, noise_std=args.noise_std, seed=args.seed
    )
    rules = aggregators(args)
    rows = [one_run(args, dataset, train_data, test_data, "clean", "mean", rules["mean"], gaussian)]
    for placement in PLACEMENTS:
        for name, make_rule in rules.items():
            rows.append(one_run(args, dataset, train_data, test_data, placement, name,
                                make_rule, gaussian))  # fmt: skip
    stem = results_stem(f"interlacing_{args.dataset}_{args.model}")
    summary = answer(rows, args)
    stem.with_suffix(".json").write_text(
        json.dumps({"config": vars(args), "poisons": gaussian.count, "num_train":
                    train_data[0].shape[0], "runs": rows, "answer": summary}, indent=1) + "\n"
    )  # fmt: skip
    plot(rows, args, stem.with_suffix(".png"))
    print(summary)


def answer(rows, args) -> dict:
    """The measured answer, rule by rule: is the poison still detectable (GUS z > 3)?"""
    out = {}
    for name in aggregators(args):
        by = {r["placement"]: r for r in rows if r["rule"] == name and r["placement"] != "clean"}
        out[name] = {
            placement: {
                "gus_z": by[placement]["gus_z"],
                "poison_detectable": by[placement]["gus_z"] > 3.0,
                "selected_poison_share": by[placement].get("selected_poison_share"),
                "test_accuracy": by[placement]["test_accuracy"],
            }
            for placement in PLACEMENTS
        }
    return out


if __name__ == "__main__":
    main()
