"""Is the unlearning update orthogonal to the poisoning shift? (influx.shift on the unlearning lab)

A model is trained on a retain set (the reference: the retrain oracle, from the same initialization
and batch seed) and, from the same initialization, on the retain set plus poisons (Gaussian input
noise, then label flips). Each unlearning method of ``influx.unlearn`` then runs on the poisoned
model at the same budget (10% of the training compute), and along each trajectory we record the
removed fraction, cosine and orthogonal part of the update against the poisoning shift, in the
Euclidean and the Fisher metric (0.5 d^T F d in nats next to the exact mean KL of the predictions),
GUS (Gaussian poisons) and accuracies. Newton removal also runs without a budget.

    python examples/model_shift.py                                   # digits + MLP, a few min on CPU
    python examples/model_shift.py --dataset cifar10 --model resnet18 --device cuda \
        --dtype float32 --curvature ekfac

Writes ``examples/results/model_shift_<dataset>_<model>.{json,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from _setup import example_parser, results_stem, save_figure, seeded_model  # noqa: E402

from influx import data, poison, shift, train, unlearn  # noqa: E402
from influx.audit.gus import gus_of  # noqa: E402

LOSS = train.cross_entropy_per_example
METHODS = ["gradient_ascent", "neggrad_plus", "fine_tune", "noisy_gd", "eu_k", "cf_k", "scrub",
           "ssd", "newton"]  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=1000, help="training examples")
    parser.add_argument("--poisons", type=int, default=100, help="poisoned examples (forget set)")
    parser.add_argument("--noise-std", type=float, default=0.5, help="Gaussian poison sigma")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (training)")
    parser.add_argument("--unlearn-lr", type=float, default=0.05, help="SGD lr of unlearning")
    parser.add_argument("--budget-fraction", type=float, default=0.1)
    parser.add_argument(
        "--newton-damping",
        type=float,
        default=0.1,
        help="damping of Newton removal (the MLP's retain Hessian is indefinite)",
    )
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--records", type=int, default=8, help="checkpoints per trajectory")
    parser.add_argument("--curvature", default="exact", help="exact | kfac | ekfac")
    parser.add_argument("--probe", type=int, default=500, help="train examples in the Fisher")
    return parser.parse_args()


def tensors(dataset, args, count=None):
    inputs, targets, _ = data.as_tensors(dataset)
    if count is not None:
        inputs, targets = inputs[:count], targets[:count]
    return inputs.to(args.device, getattr(torch, args.dtype)), targets.to(args.device)


def fit(model, batch, args):
    train.train(model, batch, lr=args.lr, epochs=args.epochs, batch_size=64, seed=args.seed,
                progress=False)  # fmt: skip
    return model.eval()


def accuracy(model, batch) -> float:
    return train.evaluate(model, batch)[1]


def run_method(name, poisoned, forget, retain, args, compute):
    budget = math.floor(args.budget_fraction * compute) if name != "newton*" else math.inf
    method = unlearn.METHODS[name.rstrip("*")]
    kwargs = dict(budget=budget, progress=False)
    if name.startswith("newton"):
        kwargs.update(damping=args.newton_damping, solver="cg", chunk_size=1024)
    elif name != "ssd":
        kwargs.update(lr=args.unlearn_lr, batch_size=64)
    # One dry run to learn the number of steps, then record ~args.records checkpoints.
    steps = method(poisoned, LOSS, forget, retain, keep_states=False, **kwargs).steps
    kwargs["record_every"] = max(1, steps // args.records)
    return method(poisoned, LOSS, forget, retain, **kwargs)


def experiment(kind: str, args, base, test, init) -> dict:
    inputs, targets = base
    if kind == "gaussian":
        poisons = poison.gaussian((inputs, targets), count=args.poisons, noise_std=args.noise_std,
                                  seed=args.seed)  # fmt: skip
    else:
        poisons = poison.label_flip((inputs, targets), count=args.poisons, num_classes=10,
                                    seed=args.seed)  # fmt: skip
    full = tensors(poisons.dataset, args)
    forget, retain = tensors(poisons.forget, args), tensors(poisons.retain, args)
    reference = fit(copy.deepcopy(init), retain, args)
    poisoned = fit(copy.deepcopy(init), full, args)
    compute = args.epochs * full[0].shape[0]
    probe = (full[0][: args.probe], full[1][: args.probe])
    metric = shift.fisher(reference, reference, probe, curvature=args.curvature)
    probes = {"train": full, "forget": forget, "test": test}
    row = {"accuracy": {}, "gus": {}}
    for name, model in (("reference", reference), ("poisoned", poisoned)):
        row["accuracy"][name] = {s: accuracy(model, b) for s, b in
                                 (("forget", forget), ("retain", retain), ("test", test))}  # fmt: skip
        if kind == "gaussian":
            row["gus"][name] = gus_of(model, LOSS, poisons).gus
    methods = {}
    for name in args.methods + ["newton*"]:
        started = time.perf_counter()
        result = run_method(name, poisoned, forget, retain, args, compute)
        path = shift.trajectory(reference, reference, poisoned, result, probes, metric=metric)
        gus_values, accuracies = [], []
        work = copy.deepcopy(poisoned)
        for point in result.trajectory:
            work.load_state_dict(point.state_dict)
            work.eval()
            if kind == "gaussian":
                gus_values.append(gus_of(work, LOSS, poisons).gus)
            accuracies.append({s: accuracy(work, b) for s, b in
                               (("forget", forget), ("retain", retain), ("test", test))})  # fmt: skip
        series = {
            key: path.series(key)
            for key in (
                "euclidean.removed_fraction", "euclidean.cosine", "euclidean.orthogonal_norm",
                "euclidean.remaining_distance", "euclidean.update_norm", "fisher.removed_fraction",
                "fisher.cosine", "fisher.kl_poison", "fisher.kl_remaining",
                "kl.train.reference||poisoned", "kl.train.reference||unlearned",
                "kl.forget.reference||unlearned", "kl.test.reference||unlearned",
                "entropy.forget.unlearned", "entropy.test.unlearned",
            )
        }  # fmt: skip
        methods[name] = {
            "steps": path.steps,
            "spent": result.spent,
            "budget": None if math.isinf(result.budget) else result.budget,
            "series": series,
            "gus": gus_values or None,
            "accuracy": accuracies,
            "final": path.reports[-1].as_dict(),
            "seconds": time.perf_counter() - started,
        }
        methods[name]["final"]["euclidean"].pop("per_layer", None)
        methods[name]["final"]["fisher"].pop("per_layer", None)
    first = next(iter(methods.values()))["series"]
    row.update(
        poison_norm=path.reports[0].euclidean.poison_norm,
        fisher_kl_poison=first["fisher.kl_poison"][0],
        exact_kl_poison_train=first["kl.train.reference||poisoned"][0],
        compute=compute,
        methods=methods,
    )
    return row


def summary_table(results: dict) -> list[dict]:
    rows = []
    for kind, block in results.items():
        for name, m in block["methods"].items():
            s = m["series"]
            rows.append({
                "poison": kind, "method": name, "steps": m["steps"][-1],
                "removed_fraction": s["euclidean.removed_fraction"][-1],
                "cosine": s["euclidean.cosine"][-1],
                "orthogonal_over_update": (s["euclidean.orthogonal_norm"][-1]
                                           / max(s["euclidean.update_norm"][-1], 1e-300)),
                "fisher_removed_fraction": s["fisher.removed_fraction"][-1],
                "fisher_cosine": s["fisher.cosine"][-1],
                "fisher_kl_remaining": s["fisher.kl_remaining"][-1],
                "exact_kl_remaining_train": s["kl.train.reference||unlearned"][-1],
                "gus": None if m["gus"] is None else m["gus"][-1],
                "test_accuracy": m["accuracy"][-1]["test"],
            })  # fmt: skip
    return rows


def plot(results: dict, path: Path) -> None:
    kinds = list(results)
    panels = [("euclidean.removed_fraction", "removed fraction"), ("euclidean.cosine", "cosine"),
              ("fisher.removed_fraction", "removed fraction (Fisher)"),
              ("fisher.kl_remaining", "0.5 d^T F d left (nats)"),
              ("kl.train.reference||unlearned", "exact KL left, train (nats)")]  # fmt: skip
    fig, axes = plt.subplots(len(kinds), len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.4 * len(kinds)),
                             squeeze=False)  # fmt: skip
    for row, kind in zip(axes, kinds):
        for ax, (key, title) in zip(row, panels):
            for name, m in results[kind]["methods"].items():
                ax.plot(m["steps"], m["series"][key], marker=".", label=name)
            ax.set(title=f"{kind}: {title}", xlabel="unlearning step")
            ax.set_xscale("symlog", linthresh=1)
        ax = row[-1]
        for name, m in results[kind]["methods"].items():
            if m["gus"] is not None:
                ax.plot(m["steps"], m["gus"], marker=".", label=name)
            else:
                ax.plot(m["steps"], [a["forget"] for a in m["accuracy"]], marker=".", label=name)
        ax.set(title=f"{kind}: " + ("GUS" if kind == "gaussian" else "forget acc. (flipped labels)"),
               xlabel="unlearning step")  # fmt: skip
        ax.set_xscale("symlog", linthresh=1)
    axes[0, 0].legend(fontsize=6)
    save_figure(fig, path, dpi=100)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    train_set = data.load(args.dataset, root=args.data_dir, max_examples=args.train)
    test = tensors(data.load(args.dataset, root=args.data_dir, split="test"), args, 1000)
    init = seeded_model(args.model, train_set, args)
    base = tensors(train_set, args)
    started = time.perf_counter()
    results = {
        kind: experiment(kind, args, base, test, init) for kind in ("gaussian", "label_flip")
    }
    out = {
        "config": vars(args),
        "seconds": time.perf_counter() - started,
        "summary": summary_table(results),
        "results": results,
    }
    stem = results_stem(f"model_shift_{args.dataset}_{args.model}")
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1, default=float))
    plot(results, stem.with_suffix(".png"))
    for r in out["summary"]:
        print(  # the script's own report
            f"{r['poison']:10s} {r['method']:15s} steps {r['steps']:4d} removed {r['removed_fraction']:+.3f} "
            f"cos {r['cosine']:+.3f} orth/upd {r['orthogonal_over_update']:.3f} "
            f"F-removed {r['fisher_removed_fraction']:+.3f} F-KL left {r['fisher_kl_remaining']:.4f} "
            f"KL left {r['exact_kl_remaining_train']:.4f} gus {r['gus']} test {r['test_accuracy']:.3f}"
        )
    print(f"wrote {stem}.json/.png in {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
