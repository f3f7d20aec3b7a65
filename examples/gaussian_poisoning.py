"""Gaussian poisoning vs unlearning at equal compute (examples/README.md; Pawelczyk et al. 2024).

A fraction of the training set gets Gaussian noise added to its inputs (labels kept); a model is
trained on it; every unlearning method of :mod:`influx.unlearn` then tries to remove the poisons
(the forget set) with the same budget, 10% of the training compute. Along each trajectory we
record the Gaussian Unlearning Score (GUS, its z-statistic and the TPR at FPR 0.01 of the
per-point test), the loss-threshold membership-inference attack (TPR at FPR 0.01, AUC) and the
forget / retain / test accuracies; at the end the forgetting quality (the NeurIPS 2023 competition's
F) of each method against the retrain oracle over ``--seeds`` independently trained, unlearned
and retrained models; and the trained model's GUS against model width.

Loss MIA: members are the poisoned training inputs, non-members the test inputs with fresh noise
of the same standard deviation (the same distribution, never trained on); a lower loss means
"member". The headline to check: the MIA calls every method a success (TPR near the FPR) while
the Gaussian test still detects the poisons (z well above 0).

    python examples/gaussian_poisoning.py                  # digits + MLP, a few minutes on CPU
    python examples/gaussian_poisoning.py --dataset cifar10 --model resnet18 --device cuda \
        --epochs 30 --widths 8 16 32 64 --seeds 4

Writes ``examples/results/gaussian_poisoning_<dataset>_<model>.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _setup import example_parser, limit_threads, results_stem, save_figure  # noqa: E402
from scipy import stats  # noqa: E402

from influx import data, models, poison, train, unlearn  # noqa: E402
from influx.audit.forgetting import final_score, forgetting_quality  # noqa: E402
from influx.audit.gus import gus_of  # noqa: E402
from influx.audit.mia import confidence_from_logits, loss_attack  # noqa: E402

LOSS = train.cross_entropy_per_example
FPR = 0.01
# Settings of each method at the shared budget (SGD unless stated; lr chosen for the digits MLP so
# that no method wrecks test accuracy; pass --lr-scale to move them all at once).
METHODS: dict[str, dict] = {
    "gradient_ascent": {"lr": 1e-2},
    "neggrad_plus": {"lr": 5e-2, "beta": 0.95},
    "fine_tune": {"lr": 5e-2},
    "noisy_gd": {"lr": 5e-2, "noise_std": 0.05},
    "cf_k": {"lr": 5e-2, "k": 1},
    "eu_k": {"lr": 5e-2, "k": 1},
    "scrub": {"lr": 5e-2},
    "ssd": {"alpha": 10.0, "dampening": 1.0},
    "newton": {"damping": 1e-2},
}


def parse_args() -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0], width=64, dtype="float32")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64, 256],
                        help="model widths of the GUS-vs-width sweep (ResNet: 8 16 32 64)")  # fmt: skip
    parser.add_argument("--train-size", type=int, default=None, help="first N training examples")
    parser.add_argument("--fraction", type=float, default=0.02, help="poisoned fraction")
    parser.add_argument("--noise-std", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3, help="training lr (Adam)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--budget-fraction", type=float, default=0.1,
                        help="unlearning budget as a fraction of the training compute")  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--lr-scale", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=4,
                        help="independently trained models for the forgetting quality")  # fmt: skip
    parser.add_argument("--points", type=int, default=5, help="trajectory records per method")
    args = parser.parse_args()
    # "resnet" names the deepest CIFAR ResNet; --width / --widths set its base width (64 = ResNet-18).
    args.model = "resnet18" if args.model == "resnet" else args.model
    return args


# ------------------------------------------------------------------------------------------------
# Data and models
# ------------------------------------------------------------------------------------------------


def load(args):
    """(train dataset, train (x, y), test (x, y)) as tensors on the device."""
    dtype = getattr(torch, args.dtype)
    train_set = data.load(args.dataset, root=args.data_dir, max_examples=args.train_size)
    test_set = data.load(args.dataset, root=args.data_dir, split="test")
    x, y, _ = data.as_tensors(train_set)
    xt, yt, _ = data.as_tensors(test_set)
    return train_set, (x.to(args.device, dtype), y.to(args.device)), (
        xt.to(args.device, dtype), yt.to(args.device))  # fmt: skip


def build_model(args, dataset, width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.build(args.model, dataset.input_shape, dataset.num_classes, width=width)
    return model.to(args.device, getattr(torch, args.dtype))


def fit(model, train_data, args, seed: int) -> torch.nn.Module:
    train.train(model, train_data, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                seed=seed, progress=False)  # fmt: skip
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Audits
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def losses_and_signal(model, x, y, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-example losses and the logit-scaled confidence ``log p_y - log(1 - p_y)`` [N]."""
    model.eval()
    losses, signals = [], []
    for start in range(0, x.shape[0], chunk):
        logits = model(x[start : start + chunk]).double()
        target = y[start : start + chunk]
        losses.append(LOSS(logits, target))
        signals.append(confidence_from_logits(logits, target))
    return torch.cat(losses).cpu().numpy(), torch.cat(signals).cpu().numpy()


def loss_mia(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> dict:
    """Loss-threshold attack: TPR at FPR <= 0.01 and AUC (influx.audit.mia.loss_attack)."""
    attack = loss_attack(member_losses, nonmember_losses, fprs=(FPR,))
    return {"mia_tpr": attack.tpr_at_fpr[FPR], "mia_auc": attack.auc}


class Auditor:
    """The metrics of one model: GUS, loss MIA and accuracies (the on_checkpoint callback)."""

    def __init__(self, pois, splits, nonmembers):
        self.poison, self.splits, self.nonmembers = pois, splits, nonmembers

    def accuracy(self, model, x, y) -> float:
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    def __call__(self, model, step: int = 0) -> dict:
        result = gus_of(model, LOSS, self.poison, null_seed=10_000 + self.poison.seed)
        forget_losses, _ = losses_and_signal(model, *self.splits["forget"])
        nonmember_losses, _ = losses_and_signal(model, *self.nonmembers)
        out = {"gus": result.gus, "gus_z": result.z, "gus_tpr": result.tpr_at_fpr,
               "gus_null_z": result.null_z, **loss_mia(forget_losses, nonmember_losses)}  # fmt: skip
        for name, (x, y) in self.splits.items():
            out[f"{name}_acc"] = self.accuracy(model, x, y)
        return out


def experiment_setup(args, train_set, train_xy, test_xy, seed: int):
    """Poison (seeded), the forget / retain / test splits and the MIA non-members."""
    pois = poison.gaussian(train_xy, fraction=args.fraction, noise_std=args.noise_std, seed=seed)
    mask = pois.mask
    x_poisoned = train_xy[0].clone()
    x_poisoned[mask] = pois.poisoned_inputs.to(x_poisoned.dtype)
    forget = (x_poisoned[mask], train_xy[1][mask])
    retain = (x_poisoned[~mask], train_xy[1][~mask])
    generator = torch.Generator(device="cpu").manual_seed(20_000 + seed)
    fresh = args.noise_std * torch.randn(test_xy[0].shape, generator=generator, device="cpu")
    nonmembers = (test_xy[0] + fresh.to(test_xy[0]), test_xy[1])
    splits = {"forget": forget, "retain": retain, "test": test_xy}
    return pois, (x_poisoned, train_xy[1]), splits, nonmembers


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------


def method_settings(name: str, args) -> dict:
    settings = dict(METHODS[name])
    if "lr" in settings:
        settings["lr"] *= args.lr_scale
        settings["batch_size"] = args.batch_size
    return settings


def unlearn_all(model, splits, args, budget: float, seed: int, auditor=None, record_every=None):
    """Every method on ``model`` at ``budget``; with an auditor, the trajectory of metrics."""
    runs = {}
    for name in args.methods:
        settings = method_settings(name, args)
        if name not in ("newton",):
            settings["seed"] = seed
        if auditor is not None:
            settings.update(on_checkpoint=auditor, keep_states=False,
                            record_every=record_every.get(name, 1))  # fmt: skip
        runs[name] = unlearn.METHODS[name](
            model, LOSS, splits["forget"], splits["retain"], budget=budget, progress=False,
            **settings,
        )  # fmt: skip
    return runs


def step_estimate(name: str, settings: dict, budget: float, n_forget: int, n_retain: int) -> int:
    """Steps a method takes at the budget (to space the trajectory records)."""
    batch = settings.get("batch_size", 64)
    per_step = {"gradient_ascent": min(batch, n_forget), "neggrad_plus": min(batch, n_forget)
                + min(batch, n_retain), "scrub": 2 * min(batch, n_retain)}.get(name, min(batch, n_retain))  # fmt: skip
    return max(1, int(budget // per_step))


def main_run(args, train_set, train_xy, test_xy) -> dict:
    pois, poisoned_xy, splits, nonmembers = experiment_setup(args, train_set, train_xy, test_xy,
                                                              args.seed)  # fmt: skip
    auditor = Auditor(pois, splits, nonmembers)
    n, n_forget = train_xy[0].shape[0], pois.count
    train_compute = args.epochs * n
    budget = unlearn.resolve_budget(None, train_compute, fraction=args.budget_fraction)
    model = build_model(args, train_set, args.width, args.seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    fit(model, poisoned_xy, args, args.seed)
    train_seconds = time.perf_counter() - start
    record_every = {
        name: max(1, step_estimate(name, method_settings(name, args), budget, n_forget,
                                   n - n_forget) // args.points)
        for name in args.methods
    }  # fmt: skip
    runs = unlearn_all(model, splits, args, budget, args.seed, auditor, record_every)
    oracle = unlearn.retrain(model, LOSS, splits["forget"], splits["retain"], epochs=args.epochs,
                             init=init, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                             progress=False)  # fmt: skip
    trained = auditor(model)
    rows = {"trained": {**trained, "spent": 0},
            "retrain": {**auditor(oracle.model), "spent": oracle.spent}}  # fmt: skip
    trajectories = {}
    for name, run in runs.items():
        rows[name] = {**run.trajectory[-1].metrics, "spent": run.spent, "steps": run.steps}
        trajectories[name] = [
            {"step": p.step, "spent": p.spent, **p.metrics} for p in run.trajectory
        ]
    return {"budget": budget, "train_compute": train_compute, "n_train": n, "n_forget": n_forget,
            "train_seconds": train_seconds, "rows": rows, "trajectories": trajectories,
            "options": {name: run.options for name, run in runs.items()}}  # fmt: skip


def forgetting_runs(args, train_set, train_xy, test_xy) -> dict:
    """F of every method vs retraining over ``--seeds`` independent poison/train/unlearn seeds."""
    signals = {name: [] for name in [*args.methods, "retrain"]}
    accuracies = {name: {"retain": [], "test": []} for name in signals}
    for k in range(args.seeds):
        seed = args.seed + 1 + k
        pois, poisoned_xy, splits, _ = experiment_setup(args, train_set, train_xy, test_xy,
                                                        args.seed)  # fmt: skip
        model = build_model(args, train_set, args.width, seed)
        init = {key: v.clone() for key, v in model.state_dict().items()}
        fit(model, poisoned_xy, args, seed)
        budget = unlearn.resolve_budget(None, args.epochs * train_xy[0].shape[0],
                                        fraction=args.budget_fraction)  # fmt: skip
        results = {
            name: r.model for name, r in unlearn_all(model, splits, args, budget, seed).items()
        }
        results["retrain"] = unlearn.retrain(
            model, LOSS, splits["forget"], splits["retain"], epochs=args.epochs, init=init,
            lr=args.lr, batch_size=args.batch_size, seed=seed, progress=False,
        ).model  # fmt: skip
        for name, m in results.items():
            signals[name].append(losses_and_signal(m, *splits["forget"])[1])
            for part in ("retain", "test"):
                x, y = splits[part]
                with torch.no_grad():
                    accuracies[name][part].append(float((m(x).argmax(1) == y).float().mean()))
    retrained = np.stack(signals["retrain"])
    out = {}
    for name in args.methods:
        quality = forgetting_quality(np.stack(signals[name]), retrained)
        out[name] = {
            "F": quality.score,
            "median_epsilon": float(quality.epsilons.median()),
            "final_score": final_score(quality, accuracies[name]["retain"],
                                       accuracies["retrain"]["retain"], accuracies[name]["test"],
                                       accuracies["retrain"]["test"]),
        }  # fmt: skip
    return {"models_per_side": args.seeds, "by_method": out}


def width_sweep(args, train_set, train_xy, test_xy) -> list[dict]:
    """GUS of the trained model, and after gradient ascent / NegGrad+ / fine-tuning, per width."""
    pois, poisoned_xy, splits, nonmembers = experiment_setup(args, train_set, train_xy, test_xy,
                                                              args.seed)  # fmt: skip
    auditor = Auditor(pois, splits, nonmembers)
    budget = unlearn.resolve_budget(None, args.epochs * train_xy[0].shape[0],
                                    fraction=args.budget_fraction)  # fmt: skip
    sweep_args = argparse.Namespace(**{**vars(args), "methods": [
        m for m in ("gradient_ascent", "neggrad_plus", "fine_tune") if m in args.methods]})  # fmt: skip
    rows = []
    for width in args.widths:
        model = fit(build_model(args, train_set, width, args.seed), poisoned_xy, args, args.seed)
        row = {"width": width, "parameters": sum(p.numel() for p in model.parameters()),
               "trained": auditor(model)}  # fmt: skip
        for name, run in unlearn_all(model, splits, sweep_args, budget, args.seed).items():
            row[name] = auditor(run.model)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def gus_accuracy_relation(trajectories: dict) -> dict:
    points = [
        (p["gus_z"], p["test_acc"], p["forget_acc"]) for t in trajectories.values() for p in t
    ]
    z, test_acc, forget_acc = map(np.asarray, zip(*points))
    return {"points": len(points),
            "spearman_gus_z_test_acc": float(stats.spearmanr(z, test_acc).statistic),
            "spearman_gus_z_forget_acc": float(stats.spearmanr(z, forget_acc).statistic)}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    main = result["main"]
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    for name, points in main["trajectories"].items():
        spent = [p["spent"] for p in points]
        axes[0].plot(spent, [p["gus_z"] for p in points], "o-", ms=3, label=name)
        axes[1].plot(spent, [p["mia_tpr"] for p in points], "o-", ms=3, label=name)
        axes[2].plot([p["test_acc"] for p in points], [p["gus_z"] for p in points], "o-", ms=3,
                     label=name)  # fmt: skip
    oracle = main["rows"]["retrain"]
    for ax, key in ((axes[0], "gus_z"), (axes[1], "mia_tpr")):
        ax.axhline(oracle[key], color="k", ls="--", lw=0.8, label="retrain oracle")
    axes[0].axhline(stats.norm.ppf(0.95), color="r", ls=":", lw=0.8, label="z = 1.64 (p = 0.05)")
    axes[1].axhline(FPR, color="r", ls=":", lw=0.8, label="FPR = 0.01")
    axes[0].set(xlabel="gradient evaluations spent", ylabel="GUS z = sqrt(n) mean I_z",
                title=f"Gaussian test (n = {main['n_forget']} poisons)")  # fmt: skip
    axes[1].set(xlabel="gradient evaluations spent", ylabel="loss-MIA TPR at FPR 0.01",
                title="membership inference")  # fmt: skip
    axes[2].set(xlabel="test accuracy", ylabel="GUS z", title="GUS vs accuracy (trajectories)")
    axes[0].legend(fontsize=6)
    sweep = result["width_sweep"]
    widths = [row["width"] for row in sweep]
    for name in ("trained", "gradient_ascent", "neggrad_plus", "fine_tune"):
        if name in sweep[0]:
            axes[3].plot(widths, [row[name]["gus_z"] for row in sweep], "o-", label=name)
    axes[3].set(xscale="log", xlabel="width", ylabel="GUS z", title="GUS vs model width")
    axes[3].legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    args = parse_args()
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    limit_threads(args)
    start = time.perf_counter()
    train_set, train_xy, test_xy = load(args)
    result = {"config": vars(args), "method_settings": {m: method_settings(m, args)
                                                        for m in args.methods}}  # fmt: skip
    stem = results_stem(f"gaussian_poisoning_{args.dataset}_{args.model}")
    phases = result["phase_seconds"] = {}
    for phase, run in (("main", main_run), ("forgetting_quality", forgetting_runs),
                       ("width_sweep", width_sweep)):  # fmt: skip
        if phase == "forgetting_quality" and args.seeds < 2:
            continue
        begin = time.perf_counter()
        result[phase] = run(args, train_set, train_xy, test_xy)
        phases[phase] = time.perf_counter() - begin
        print(f"{phase}: {phases[phase]:.0f} s", flush=True)
        if phase == "main":
            result["gus_accuracy"] = gus_accuracy_relation(result["main"]["trajectories"])
        result["seconds"] = time.perf_counter() - start
        # Written after every phase: a long run that is stopped keeps what it finished.
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, stem.with_suffix(".png"))
    quality = result.get("forgetting_quality", {}).get("by_method", {})
    print(f"budget {result['main']['budget']:.0f} of training compute "
          f"{result['main']['train_compute']} evaluations; {result['main']['n_forget']} poisons")  # fmt: skip
    print(f"{'method':>16} {'spent':>6} {'GUS':>6} {'z':>6} {'TPR':>5} {'MIA':>5} {'AUC':>5} "
          f"{'forget':>6} {'retain':>6} {'test':>6} {'F':>5}")  # fmt: skip
    for name, row in result["main"]["rows"].items():
        f = quality.get(name, {}).get("F", float("nan"))
        print(f"{name:>16} {row['spent']:>6} {row['gus']:>6.3f} {row['gus_z']:>6.2f} "
              f"{row['gus_tpr']:>5.3f} {row['mia_tpr']:>5.3f} {row['mia_auc']:>5.3f} "
              f"{row['forget_acc']:>6.3f} {row['retain_acc']:>6.3f} {row['test_acc']:>6.3f} {f:>5.2f}")  # fmt: skip
    print(f"GUS/accuracy: {result['gus_accuracy']}")
    for row in result["width_sweep"]:
        print(f"width {row['width']:>4} ({row['parameters']} params): trained z "
              f"{row['trained']['gus_z']:.2f}, " + ", ".join(
                  f"{m} z {row[m]['gus_z']:.2f}" for m in ("gradient_ascent", "neggrad_plus",
                                                           "fine_tune") if m in row))  # fmt: skip
    print(f"total {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
