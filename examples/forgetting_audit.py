"""Calibrated unlearning audits of Gaussian poisoning: forgetting quality with 64 models a side,
LiRA and the loss attack on the unlearned models, each next to its ceiling and its floor.

Setup (per seed; the seed draws the poison subset, its noise, every initialization, batch order
and unlearning stream): a fraction of the training set gets Gaussian noise on its inputs (labels
kept, :func:`influx.poison.gaussian`, the constants of ``gaussian_poisoning.py``). Three ensembles
of ``--models`` models are trained at once (:func:`influx.ensembles.fit_ensemble`, vmapped
minibatch Adam): *trained* on the poisoned set, and two independent *retrained* sets A and B on
the retain set only. Every method of :mod:`influx.unlearn` then unlearns each trained model on its
own (the forget set = the poisons, budget ``--budget-fraction`` of the training compute).

- Forgetting quality F (:func:`influx.audit.forgetting.forgetting_quality`, the NeurIPS 2023
  competition's score) of each method's models against retrained set A; ceiling: retrained set B
  against A (two retrains of the same forget set); floor: the trained models against A.
- LiRA, offline (:func:`influx.audit.mia.lira_scores` with ``online=False``): retrained set B are
  the OUT shadows of every candidate (no shadow trained on the non-members, so the online
  attack's IN fit has nothing to use); score ``(s - mu_out) / sd_out`` of the signal
  ``s = log p_y - log(1 - p_y)``. Members: the forget examples; non-members: the test split with
  ``--noise-copies`` fresh draws of the same noise (the forget set's distribution, never trained
  on). Targets: each method's models; ceiling: retrained set A; floor: the trained models.
- The loss attack (:func:`influx.audit.mia.loss_attack`) on the same members and non-members.

Both attacks pool the (target model, example) pairs of a seed: ``models * n_forget`` member pairs
and ``models * n_nonmembers`` non-member pairs, so FPR 1% is resolved (the smallest nonzero FPR is
``1 / (models * n_nonmembers)``; per model ``1 / n_nonmembers``). The Clopper-Pearson interval
on a pooled TPR treats pairs as independent, which they are not (an example is shared by all
models), so the t-interval over seeds is the one to read.

    python examples/forgetting_audit.py                    # 8 seeds x 64 models a side, CPU
    python examples/forgetting_audit.py --methods gradient_ascent fine_tune --models 128

Writes ``examples/results/forgetting_audit_<dataset>_<model>.{json,png}``.
"""

from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _setup import (  # noqa: E402
    FALLBACK_UNLEARN_SETTINGS,
    Results,
    example_parser,
    limit_threads,
    load_train_test,
    over_seeds,
    results_stem,
    save_figure,
    tuned_unlearning,
)

from influx import ensembles, models, poison, stats, train, unlearn  # noqa: E402
from influx.audit.forgetting import forgetting_quality  # noqa: E402
from influx.audit.mia import (  # noqa: E402
    confidence_from_logits,
    lira_scores,
    loss_attack,
    membership_metrics,
)
from influx.seeds import derive_seed  # noqa: E402

LOSS = train.cross_entropy_per_example
FPR = 0.01
CEILING, FLOOR = "retrain", "no_unlearning"
# Every method of influx.unlearn (one model at a time: 64 runs per method and seed, ~1 s per method
# and seed at this size). newton's gradient and one Hessian-vector product cost more than 10% of
# training here, so it returns the trained model unchanged: it sits on the floor by construction.
DEFAULT_METHODS = list(unlearn.METHODS)
# Config keys that must agree for gaussian_poisoning's chosen settings to apply here.
SETTINGS_KEYS = ("dataset", "model", "width")
SETUP_KEYS = ("dtype", "fraction", "noise_std", "epochs", "lr", "batch_size", "budget_fraction",
              "train_size")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0], width=64, dtype="float32")
    parser.add_argument("--train-size", type=int, default=800,
                        help="first N training examples (gaussian_poisoning uses all 1,600; half "
                        "keeps 8 seeds x 64 models a side x 9 methods within minutes)")  # fmt: skip
    parser.add_argument("--fraction", type=float, default=0.05, help="poisoned fraction")
    parser.add_argument("--noise-std", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3, help="training lr (Adam)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--budget-fraction", type=float, default=0.1,
                        help="unlearning budget as a fraction of the training compute")  # fmt: skip
    parser.add_argument("--models", type=int, default=64, help="models per side (each ensemble)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--noise-copies", type=int, default=2,
                        help="fresh-noise copies of the test split in the non-member pool")  # fmt: skip
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(unlearn.METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(unlearn.METHODS)}")
    if args.models < 2:
        raise SystemExit(f"--models must be at least 2, got {args.models}")
    return args


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------


def method_settings(args) -> tuple[dict, dict]:
    """({method: kwargs}, {"settings_source": ..., ...}): gaussian_poisoning's ``chosen_settings``
    when its result was made for the same dataset, model and width, else
    ``FALLBACK_UNLEARN_SETTINGS``. Setup keys that differ are recorded (the settings were tuned for
    that setup)."""
    stored, path = tuned_unlearning(args)
    chosen, source, differences = None, "defaults in forgetting_audit.py", {}
    if stored is not None:
        config = stored.get("config", {})
        if all(config.get(k) == getattr(args, k) for k in SETTINGS_KEYS):
            chosen, source = stored["chosen_settings"], f"{path.name} chosen_settings"
            differences = {k: {"there": config.get(k), "here": getattr(args, k)}
                           for k in SETUP_KEYS if config.get(k) != getattr(args, k)}  # fmt: skip
    table = chosen if chosen is not None else FALLBACK_UNLEARN_SETTINGS
    settings = {}
    for name in args.methods:
        kwargs = dict(table.get(name, FALLBACK_UNLEARN_SETTINGS[name]))
        if "lr" in kwargs:
            kwargs.setdefault("batch_size", args.batch_size)
        settings[name] = kwargs
    return settings, {"settings_source": source, "setup_differences": differences}


def takes_seed(name: str) -> bool:
    """Whether the method has randomness to seed (an explicit ``seed`` or step options)."""
    parameters = inspect.signature(unlearn.METHODS[name]).parameters.values()
    return any(p.name == "seed" or p.kind is p.VAR_KEYWORD for p in parameters)


# ------------------------------------------------------------------------------------------------
# Data, poison and ensembles
# ------------------------------------------------------------------------------------------------


def poisoned_setup(args, train_xy, test_xy, seed: int) -> dict:
    """The poisoned training set, forget / retain / test splits and the non-member pool.

    Non-members: ``--noise-copies`` copies of the test inputs, each with fresh noise of the
    poisons' standard deviation (drawn from the seed), labels kept.
    """
    pois = poison.gaussian(train_xy, fraction=args.fraction, noise_std=args.noise_std,
                           seed=derive_seed(seed, 0))  # fmt: skip
    mask = pois.mask.to(train_xy[0].device)
    x_poisoned = train_xy[0].clone()
    x_poisoned[mask] = pois.poisoned_inputs.to(x_poisoned)
    generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, 4))
    copies = [test_xy[0] + args.noise_std * torch.randn(test_xy[0].shape, generator=generator,
                                                        dtype=torch.float64).to(test_xy[0])
              for _ in range(args.noise_copies)]  # fmt: skip
    nonmembers = (torch.cat(copies), test_xy[1].repeat(args.noise_copies))
    return {"train": (x_poisoned, train_xy[1]), "mask": mask,
            "forget": (x_poisoned[mask], train_xy[1][mask]),
            "retain": (x_poisoned[~mask], train_xy[1][~mask]), "test": test_xy,
            "nonmembers": nonmembers}  # fmt: skip


def fit(args, dataset, train_xy, keep: torch.Tensor, seed: int, copies: int = 1) -> list:
    """``copies`` independent ensembles of ``--models`` models, all trained at once (one vmapped
    run: fewer, larger steps) on the examples where ``keep`` [N] is True."""

    def build():
        model = models.build(args.model, dataset.input_shape, dataset.num_classes,
                             width=args.width)  # fmt: skip
        return model.to(args.device, getattr(torch, args.dtype))

    masks = keep.cpu().unsqueeze(0).expand(copies * args.models, -1)
    joint = ensembles.fit_ensemble(build, LOSS, train_xy, masks,
                                   epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                   seed=seed)  # fmt: skip
    return [split_ensemble(joint, slice(c * args.models, (c + 1) * args.models))
            for c in range(copies)]  # fmt: skip


def split_ensemble(ensemble: ensembles.Ensemble, part: slice) -> ensembles.Ensemble:
    """The models ``part`` of a stacked ensemble."""
    pick = lambda stacked: {name: t[part] for name, t in stacked.items()}  # noqa: E731
    return ensembles.Ensemble(ensemble.module, pick(ensemble.params), pick(ensemble.buffers))


# ------------------------------------------------------------------------------------------------
# Outputs of a set of models: signals, losses, accuracies
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def outputs_of_logits(logits: dict, setup: dict) -> dict:
    """Per split, logits [K, B, C] -> signal, loss [K, B] (float64, CPU) and accuracy [K]."""
    out = {}
    for split, z in logits.items():
        y = setup[split][1].to(z.device)
        z = z.double()
        losses = torch.stack([LOSS(row, y) for row in z])
        out[split] = {"signal": confidence_from_logits(z, y).cpu(), "loss": losses.cpu(),
                      "acc": (z.argmax(-1) == y).double().mean(-1).cpu()}  # fmt: skip
    return out


SPLITS = ("forget", "retain", "test", "nonmembers")


def ensemble_outputs(ensemble: ensembles.Ensemble, setup: dict) -> dict:
    return outputs_of_logits({s: ensemble.logits(setup[s][0]) for s in SPLITS}, setup)


@torch.no_grad()
def models_outputs(modules: list, setup: dict) -> dict:
    logits = {s: torch.stack([m.eval()(setup[s][0]) for m in modules]) for s in SPLITS}
    return outputs_of_logits(logits, setup)


def unlearned_outputs(name, kwargs, trained, setup, budget, seed, index) -> tuple[dict, float]:
    """Method ``name`` run on each trained model on its own; (outputs, mean compute spent)."""
    modules, spent = [], []
    for k in range(trained.size):
        extra = {"seed": derive_seed(seed, 5, index, k)} if takes_seed(name) else {}
        run = unlearn.METHODS[name](trained.model(k), LOSS, setup["forget"], setup["retain"],
                                    budget=budget, progress=False, **kwargs, **extra)  # fmt: skip
        modules.append(run.model)
        spent.append(run.spent)
    return models_outputs(modules, setup), float(np.mean(spent))


# ------------------------------------------------------------------------------------------------
# Audits
# ------------------------------------------------------------------------------------------------


def forgetting_row(candidate: dict, reference: dict) -> dict:
    """F of ``candidate`` models against ``reference`` retrained ones on the forget set, with the
    median epsilon and the fraction of examples at the epsilon cap (50; finite by construction)."""
    quality = forgetting_quality(candidate["forget"]["signal"], reference["forget"]["signal"])
    return {"F": quality.score, "median_epsilon": float(quality.epsilons.median()),
            "capped_fraction": float((quality.epsilons >= 50).double().mean())}  # fmt: skip


def attack_row(scores_members: torch.Tensor, scores_nonmembers: torch.Tensor) -> dict:
    """TPR at FPR 1% (with the detected count k of n member pairs) and AUC of pooled pairs."""
    scores = torch.cat([scores_members.flatten(), scores_nonmembers.flatten()])
    labels = torch.cat([torch.ones(scores_members.numel(), dtype=torch.bool),
                        torch.zeros(scores_nonmembers.numel(), dtype=torch.bool)])  # fmt: skip
    metrics = membership_metrics(scores, labels, fprs=(FPR,))
    n = scores_members.numel()
    tpr = metrics.tpr_at_fpr[FPR]
    return {"tpr": tpr, "k": int(round(tpr * n)), "n": n, "auc": metrics.auc}


def lira_row(target: dict, shadows: dict) -> dict:
    """Offline LiRA: OUT Gaussians per example from the shadows' signals (none trained on any
    candidate), target scores ``(s - mu_out) / sd_out``."""

    def candidates(outputs: dict) -> torch.Tensor:
        return torch.cat([outputs["forget"]["signal"], outputs["nonmembers"]["signal"]], dim=1)

    shadow = candidates(shadows)
    scores = lira_scores(candidates(target), shadow, torch.zeros_like(shadow, dtype=torch.bool),
                         online=False)  # fmt: skip
    n_forget = target["forget"]["signal"].shape[1]
    return attack_row(scores[:, :n_forget], scores[:, n_forget:])


def loss_row(target: dict) -> dict:
    attack = loss_attack(target["forget"]["loss"].flatten(), target["nonmembers"]["loss"].flatten(),
                         fprs=(FPR,))  # fmt: skip
    n = target["forget"]["loss"].numel()
    tpr = attack.tpr_at_fpr[FPR]
    return {"tpr": tpr, "k": int(round(tpr * n)), "n": n, "auc": attack.auc}


def accuracy_row(outputs: dict) -> dict:
    return {split: float(outputs[split]["acc"].mean()) for split in ("forget", "retain", "test")}


# ------------------------------------------------------------------------------------------------
# One seed
# ------------------------------------------------------------------------------------------------


def run_seed(args, dataset, train_xy, test_xy, settings: dict, seed: int) -> dict:
    phases, clock = {}, time.perf_counter()
    setup = poisoned_setup(args, train_xy, test_xy, seed)
    keep_all = torch.ones_like(setup["mask"])
    (trained,) = fit(args, dataset, setup["train"], keep_all, derive_seed(seed, 1))
    # Sets A and B: models 0..K-1 and K..2K-1 of one run (independent inits and batch orders).
    retrain_a, retrain_b = fit(args, dataset, setup["train"], ~setup["mask"],
                               derive_seed(seed, 2), copies=2)  # fmt: skip
    phases["train_ensembles"] = time.perf_counter() - clock
    outputs = {FLOOR: ensemble_outputs(trained, setup), CEILING: ensemble_outputs(retrain_a, setup)}
    reference_b = ensemble_outputs(retrain_b, setup)

    clock = time.perf_counter()
    n_train = setup["train"][0].shape[0]
    budget = unlearn.resolve_budget(None, args.epochs * n_train, fraction=args.budget_fraction)
    spent = {}
    for index, name in enumerate(args.methods):
        outputs[name], spent[name] = unlearned_outputs(name, settings[name], trained, setup,
                                                       budget, seed, index)  # fmt: skip
    phases["unlearn"] = time.perf_counter() - clock

    clock = time.perf_counter()
    record = {"n_forget": int(setup["mask"].sum()), "n_nonmembers": len(setup["nonmembers"][1]),
              "budget": budget, "spent": spent, "forgetting": {}, "lira": {}, "loss_mia": {},
              "accuracy": {}}  # fmt: skip
    for name, out in outputs.items():
        # The ceiling of F: retrained set B against A (F of A against A would be trivially 1).
        candidate = reference_b if name == CEILING else out
        record["forgetting"][name] = forgetting_row(candidate, outputs[CEILING])
        record["lira"][name] = lira_row(out, reference_b)
        record["loss_mia"][name] = loss_row(out)
        record["accuracy"][name] = accuracy_row(out)
    phases["audit"] = time.perf_counter() - clock
    record["seconds"] = phases
    return record


# ------------------------------------------------------------------------------------------------
# Summary and figure
# ------------------------------------------------------------------------------------------------


def pooled_proportions(records: list[dict], attack: str) -> dict:
    """Per row: Clopper-Pearson of every seed's k / n, and of all seeds pooled (pairs treated as
    independent: narrower than the truth, see the module doc)."""
    out = {}
    for name in records[0][attack]:
        rows = [r[attack][name] for r in records]
        out[name] = {"per_seed": [stats.proportion(r["k"], r["n"]).to_dict() for r in rows],
                     "pooled": stats.proportion(sum(r["k"] for r in rows),
                                                sum(r["n"] for r in rows)).to_dict()}  # fmt: skip
    return out


def comparisons(records: list[dict], methods: list[str]) -> dict:
    """Each method minus the ceiling and minus the floor, paired by seed, for F and both TPRs."""
    out = {}
    for name in methods:
        out[name] = {}
        for metric, key in (("forgetting", "F"), ("lira", "tpr"), ("loss_mia", "tpr"),
                            ("lira", "auc"), ("accuracy", "test")):  # fmt: skip
            values = [r[metric][name][key] for r in records]
            for side in (CEILING, FLOOR):
                other = [r[metric][side][key] for r in records]
                difference = stats.paired_difference(values, other).to_dict()
                out[name][f"{metric}.{key} - {side}"] = difference
    return out


def summarize(records: list[dict], methods: list[str]) -> dict:
    return {"per_row": stats.summarize_records(records),
            "differences": comparisons(records, methods) if len(records) > 1 else {},
            "lira_proportions": pooled_proportions(records, "lira"),
            "loss_mia_proportions": pooled_proportions(records, "loss_mia")}  # fmt: skip


def draw_panel(ax, records, rows, metric, key, ylabel, title):
    """Per row: per-seed values (dots), mean and 95% t-interval (bar); the ceiling and floor
    as horizontal bands of their intervals across the panel."""
    for band, colour in ((CEILING, "tab:green"), (FLOOR, "tab:red")):
        summary = stats.summarize([r[metric][band][key] for r in records])
        low, high = (summary.low, summary.high) if summary.n > 1 else (summary.mean,) * 2
        ax.axhspan(low, high, color=colour, alpha=0.15)
        ax.axhline(summary.mean, color=colour, lw=1, ls="--",
                   label=f"{'ceiling' if band == CEILING else 'floor'} ({band})")  # fmt: skip
    for x, name in enumerate(rows):
        values = [r[metric][name][key] for r in records]
        summary = stats.summarize(values)
        ax.scatter(np.full(len(values), x) + np.linspace(-0.15, 0.15, len(values)), values,
                   s=10, color="grey", alpha=0.7, zorder=2)  # fmt: skip
        error = None if summary.n == 1 else [[summary.mean - summary.low],
                                             [summary.high - summary.mean]]  # fmt: skip
        ax.errorbar(x, summary.mean, yerr=error, fmt="o", color="k", capsize=4, zorder=3)
    ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right")
    ax.set(ylabel=ylabel, title=title)


def plot(records: list[dict], args, path: Path) -> None:
    rows = [CEILING, FLOOR, *args.methods]
    models_note = f"{args.models} models a side, {len(records)} seeds"
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    draw_panel(axes[0], records, rows, "forgetting", "F", "forgetting quality F",
               f"F vs retrained set A ({models_note})")  # fmt: skip
    draw_panel(axes[1], records, rows, "lira", "tpr", "TPR at FPR 1%",
               "offline LiRA on the forget set")  # fmt: skip
    draw_panel(axes[2], records, rows, "loss_mia", "tpr", "TPR at FPR 1%",
               "loss attack on the forget set")  # fmt: skip
    for ax in axes[1:]:
        ax.axhline(FPR, color="tab:blue", lw=0.8, ls=":", label="chance (TPR = FPR = 1%)")
    axes[0].legend(fontsize=8, loc="best")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle("dots: seeds; bars: mean and 95% t-interval over seeds; "
                 "bands: the ceiling's and floor's intervals", fontsize=9)  # fmt: skip
    save_figure(fig, path)


def print_table(summary: dict, rows: list[str]) -> None:
    per_row = summary["per_row"]

    def cell(name, metric, key):
        s = per_row[metric][name][key]
        return f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"

    print(f"{'row':>16} {'F':>22} {'LiRA TPR@1%':>22} {'loss TPR@1%':>22} {'test acc':>22}")
    for name in rows:
        print(f"{name:>16} {cell(name, 'forgetting', 'F'):>22} {cell(name, 'lira', 'tpr'):>22} "
              f"{cell(name, 'loss_mia', 'tpr'):>22} {cell(name, 'accuracy', 'test'):>22}")  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    limit_threads(args)
    start = time.perf_counter()
    dataset, train_xy, test_xy = load_train_test(args)
    settings, source = method_settings(args)
    name = f"forgetting_audit_{args.dataset}_{args.model}"
    results = Results(name, args)
    records = over_seeds(args, results,
                         lambda seed: run_seed(args, dataset, train_xy, test_xy, settings, seed))  # fmt: skip
    results["method_settings"] = settings
    results["settings_source"] = source["settings_source"]
    results["setup_differences"] = source["setup_differences"]
    results["resolution"] = {
        "nonmembers_per_model": records[0]["n_nonmembers"],
        "smallest_fpr_per_model": 1 / records[0]["n_nonmembers"],
        "smallest_fpr_pooled": 1 / (records[0]["n_nonmembers"] * args.models),
        "member_pairs": records[0]["n_forget"] * args.models,
    }  # fmt: skip
    results["summary"] = summarize(records, args.methods)
    results["seconds"] = time.perf_counter() - start
    results.write()
    plot(records, args, results_stem(name).with_suffix(".png"))
    print(f"settings: {source['settings_source']}; resolution {results['resolution']}")
    print_table(results["summary"], [CEILING, FLOOR, *args.methods])
    print(f"total {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
