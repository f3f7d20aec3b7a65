"""Is the unlearning update orthogonal to the poisoning shift, beyond what training noise gives?

Per seed, a model is trained from one initialization on a retain set (the reference: the retrain
oracle) and on the retain set plus poisons (Gaussian input noise, then label flips), each in
``--replicates`` batch orders. Batch order 0 is the experiment: every unlearning method of
``influx.unlearn`` runs on its poisoned model at the same budget (10% of the training compute), and
``influx.shift.decompose`` splits each update ``u = theta_u - theta_p`` against the poisoning shift
``d = theta_p - theta_r``: cosine ``cos(u, -d)``, removed fraction ``-<u, d> / ||d||^2``,
orthogonal part, in the Euclidean and the Fisher metric (``0.5 d^T F d`` in nats next to the exact
mean KL of the predictions); GUS for the Gaussian poisons. Newton removal also runs without budget.

The other batch orders measure what training noise alone does, with the same init and data:

- noise floor: ``||theta_r' - theta_r||`` and ``||theta_p' - theta_p||`` against ``||d||``, and
  ``cos(d, d')`` between the shifts of two batch orders (its expectation is the share of
  ``||d||^2`` that both orders share: the systematic part of the poisoning shift);
- ceiling: the retrain in batch order 1 taken as the unlearned model (a perfect unlearner that
  lands on another, equally valid retrain); batch-order null: the *poisoned* retrain in batch
  order 1 taken as the unlearned model (a move as large as training noise that removes nothing);
- the systematic direction: the mean of the shifts of batch orders 2, 3, ... (independent of the
  noise of order 0); each update's cosine with it is reported too, and the cosine of a batch-order
  difference ``theta_r'' - theta_r'`` with ``d``;
- random directions: a direction uniform on the sphere in P dimensions has cosine ~ N(0, 1/P)
  with any fixed vector (band ``+-1.96 / sqrt(P)``); the empirical band of random draws is
  recorded per seed beside it.

Across seeds (a shared initialization, each seed's own poisons and batch order), the cosine of each
seed's shift with the mean of the other seeds' shifts says whether the poisoning direction
generalizes beyond one poison draw. Unlearning settings come from ``chosen_settings`` of
``gaussian_poisoning_<dataset>_<model>.json`` when that file holds them, else from
``_setup.FALLBACK_UNLEARN_SETTINGS``.

    python examples/model_shift.py                                   # digits + MLP, 8 seeds, CPU
    python examples/model_shift.py --dataset cifar10 --model resnet18 --device cuda \
        --dtype float32 --curvature ekfac --seeds 4

Writes ``examples/results/model_shift_<dataset>_<model>.{json,png}``.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
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
    over_seeds,
    results_stem,
    seed_list,
    tuned_unlearning,
)

from influx import data, models, poison, shift, stats, train, unlearn  # noqa: E402
from influx.audit.gus import gus_of  # noqa: E402
from influx.seeds import derive_seed  # noqa: E402

LOSS = train.cross_entropy_per_example
KINDS = ("gaussian", "label_flip")
UNBUDGETED = "newton (no budget)"
CEILING = "retrain, other batch order"
NULL = "poisoned retrain, other batch order"
# Keys the script sets itself (a stored setting must not override the budget or the seed).
OWN_KEYS = {"budget", "train_compute", "progress", "seed", "record_every", "keep_states",
            "on_checkpoint", "inplace"}  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=1000, help="training examples")
    parser.add_argument("--test", type=int, default=1000, help="test examples")
    parser.add_argument("--poisons", type=int, default=100, help="poisoned examples (forget set)")
    parser.add_argument("--noise-std", type=float, default=0.5, help="Gaussian poison sigma")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (training)")
    parser.add_argument("--batch-size", type=int, default=64, help="training and unlearning batch")
    parser.add_argument("--budget-fraction", type=float, default=0.1)
    parser.add_argument("--newton-damping", type=float, default=0.1,
                        help="damping of the unbudgeted Newton removal (the retain Hessian of "
                        "the MLP is indefinite)")  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=None,
                        help="subset of the methods in the settings (default: all)")  # fmt: skip
    parser.add_argument("--replicates", type=int, default=5,
                        help="batch orders per seed: 0 = experiment, 1 = ceiling and null, "
                        "2.. = the systematic direction (at least 3)")  # fmt: skip
    parser.add_argument("--curvature", default="exact", help="exact | kfac | ekfac")
    parser.add_argument("--probe", type=int, default=500, help="train examples in the Fisher")
    parser.add_argument("--random-directions", type=int, default=2000,
                        help="random directions per seed for the empirical null band")  # fmt: skip
    args = parser.parse_args()
    if args.replicates < 3:
        raise SystemExit(f"--replicates must be at least 3, got {args.replicates}")
    args.method_settings, args.settings_source = method_settings(args)
    return args


# ------------------------------------------------------------------------------------------------
# Settings, data, training
# ------------------------------------------------------------------------------------------------


def method_settings(args) -> tuple[dict[str, dict], str]:
    """({method: kwargs}, where they came from): gaussian_poisoning's ``chosen_settings`` for this
    dataset and model when its result holds them, else ``FALLBACK_UNLEARN_SETTINGS``;
    ``--methods`` selects."""
    stored, path = tuned_unlearning(args)
    if stored is not None:
        chosen, source = stored["chosen_settings"], f"{path.name}: chosen_settings"
    else:
        chosen, source = (
            FALLBACK_UNLEARN_SETTINGS,
            "_setup.py FALLBACK_UNLEARN_SETTINGS (no chosen_settings found)",
        )
    settings = {name: {k: v for k, v in dict(kw).items() if k not in OWN_KEYS}
                for name, kw in chosen.items()}  # fmt: skip
    unknown = sorted(set(settings) - set(unlearn.METHODS))
    if unknown:
        raise SystemExit(f"{source} names methods influx.unlearn lacks: {unknown}")
    if args.methods is not None:
        missing = sorted(set(args.methods) - set(settings))
        if missing:
            raise SystemExit(f"--methods {missing} have no settings in {source}")
        settings = {name: settings[name] for name in args.methods}
    return settings, source


def tensors(dataset, args, count=None):
    inputs, targets, _ = data.as_tensors(dataset)
    if count is not None:
        inputs, targets = inputs[:count], targets[:count]
    return inputs.to(args.device, getattr(torch, args.dtype)), targets.to(args.device)


def initial_model(dataset, args, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.build(args.model, dataset.input_shape, dataset.num_classes, width=args.width)
    return model.to(args.device, getattr(torch, args.dtype))


def fit(init, batch, args, order_seed: int) -> torch.nn.Module:
    """A copy of ``init`` trained by Adam on ``batch`` with the batch order of ``order_seed``."""
    model = copy.deepcopy(init)
    train.train(model, batch, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                seed=order_seed, progress=False)  # fmt: skip
    return model.eval()


def make_poisons(kind: str, base, args, seed: int):
    if kind == "gaussian":
        return poison.gaussian(base, count=args.poisons, noise_std=args.noise_std, seed=seed)
    return poison.label_flip(base, count=args.poisons, num_classes=10, seed=seed)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().cpu()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """cos(a, b); None when either vector is 0 (a method that did not move)."""
    norms = float(a.norm() * b.norm())
    return float(a @ b) / norms if norms > 0 else None


def finite(value) -> float | None:
    """A float, or None for NaN / inf (records keep no non-finite numbers)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# ------------------------------------------------------------------------------------------------
# One seed
# ------------------------------------------------------------------------------------------------


def replicate_fits(init, retain, full, args, seed: int) -> tuple[list, list]:
    """(references, poisoned models), one pair per batch order, all from ``init``."""
    orders = [derive_seed(seed, 2, r) for r in range(args.replicates)]
    return [fit(init, retain, args, o) for o in orders], [fit(init, full, args, o) for o in orders]


def noise_floor(refs, poisoned, systematic: torch.Tensor) -> dict:
    """Batch-order noise against the poisoning shift of order 0 (module docstring)."""
    r, p = [flat(m) for m in refs], [flat(m) for m in poisoned]
    shift0, shift1 = p[0] - r[0], p[1] - r[1]
    norm = float(shift0.norm())
    return {
        "shift_norm": norm,
        "retrain_distance": float((r[1] - r[0]).norm()),
        "poisoned_distance": float((p[1] - p[0]).norm()),
        "retrain_distance_over_shift": float((r[1] - r[0]).norm()) / norm,
        "poisoned_distance_over_shift": float((p[1] - p[0]).norm()) / norm,
        "shift_replicate_cosine": cosine(shift0, shift1),
        "shift_systematic_cosine": cosine(shift0, systematic),
        "batch_order_difference_cosine": cosine(r[2] - r[1], shift0),
        "systematic_norm_over_shift": float(systematic.norm()) / norm,
    }


def random_band(shift_vector: torch.Tensor, count: int, seed: int) -> dict:
    """Empirical 2.5% / 97.5% quantiles of cos(g, d) for ``count`` Gaussian directions g."""
    generator = torch.Generator().manual_seed(derive_seed(seed, 4) % 2**63)
    draws = torch.randn(count, shift_vector.numel(), generator=generator, dtype=torch.float64)
    cosines = (draws @ shift_vector) / (draws.norm(dim=1) * shift_vector.norm())
    low, high = np.quantile(cosines.numpy(), [0.025, 0.975])
    return {"low": float(low), "high": float(high), "sd": float(cosines.std())}


def run_method(name, poisoned, forget, retain, args, compute, seed) -> unlearn.UnlearnResult:
    """One method at the shared budget (``UNBUDGETED``: Newton without a budget)."""
    if name == UNBUDGETED:
        return unlearn.newton(poisoned, LOSS, forget, retain, budget=math.inf, progress=False,
                              damping=args.newton_damping, solver="cg", chunk_size=1024)  # fmt: skip
    method = unlearn.METHODS[name]
    kwargs = dict(args.method_settings[name])
    parameters = inspect.signature(method).parameters
    takes_options = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if takes_options:
        kwargs.setdefault("batch_size", args.batch_size)
    if takes_options or "seed" in parameters:
        kwargs["seed"] = derive_seed(seed, 3)
    budget = math.floor(args.budget_fraction * compute)
    return method(poisoned, LOSS, forget, retain, budget=budget, progress=False, **kwargs)


def accuracies(model, splits) -> dict:
    return {name: train.evaluate(model, batch)[1] for name, batch in splits.items()}


def gus_test(model, poisons) -> dict:
    """GUS of the poisons: its z (N(0, 1) under the null) with p-values and |z|, and the mean
    score ``gus`` (z = sqrt(n) gus)."""
    result = gus_of(model, LOSS, poisons)
    return {**stats.z_test(result.z), "gus": result.gus}


def describe(unlearned, reference, poisoned, systematic, metric, context) -> dict:
    """Every decomposition of ``unlearned - poisoned`` against ``poisoned - reference``."""
    euclid = shift.decompose(reference, poisoned, unlearned)
    fisher = metric.decompose(reference, poisoned, unlearned)
    update = flat(unlearned) - flat(poisoned)
    row = {
        "moved": euclid.update_norm > 0,
        "update_over_shift": euclid.update_norm / euclid.poison_norm,
        "removed_fraction": finite(euclid.removed_fraction),
        "cosine": finite(euclid.cosine),
        "systematic_cosine": cosine(update, -systematic),
        "orthogonal_over_update": finite(euclid.orthogonal_norm / euclid.update_norm)
        if euclid.update_norm > 0 else None,
        "remaining_over_shift": euclid.remaining_distance / euclid.poison_norm,
        "fisher_removed_fraction": finite(fisher.removed_fraction),
        "fisher_cosine": finite(fisher.cosine),
        "fisher_kl_remaining": fisher.kl_remaining,
        "exact_kl_remaining": shift.predictive_kl(reference, reference, unlearned,
                                                  context["train"]),
        "accuracy": accuracies(unlearned, context["splits"]),
    }  # fmt: skip
    if context["poisons"] is not None:
        row["gus"] = gus_test(unlearned, context["poisons"])
    return row


def experiment(kind: str, args, seed: int, base, test, dataset) -> dict:
    """Seed ``seed``, poison ``kind``: noise floor, nulls, ceiling and every method."""
    timer = time.perf_counter()
    init = initial_model(dataset, args, derive_seed(seed, 0))
    poisons = make_poisons(kind, base, args, derive_seed(seed, 1, KINDS.index(kind)))
    full = tensors(poisons.dataset, args)
    forget, retain = tensors(poisons.forget, args), tensors(poisons.retain, args)
    refs, poisoned = replicate_fits(init, retain, full, args, seed)
    seconds = {"training": time.perf_counter() - timer}
    timer = time.perf_counter()
    systematic = torch.stack([flat(p) - flat(r) for r, p in zip(refs[2:], poisoned[2:])]).mean(0)
    reference, model = refs[0], poisoned[0]
    metric = shift.fisher(reference, reference, (full[0][: args.probe], full[1][: args.probe]),
                          curvature=args.curvature)  # fmt: skip
    context = {"train": full, "splits": {"forget": forget, "retain": retain, "test": test},
               "poisons": poisons if kind == "gaussian" else None}  # fmt: skip
    fisher = metric.decompose(reference, model, model)
    row = {
        "noise": noise_floor(refs, poisoned, systematic),
        "random_band": random_band(flat(model) - flat(reference), args.random_directions, seed),
        "fisher_kl_poison": fisher.kl_poison,
        "exact_kl_poison": shift.predictive_kl(reference, reference, model, full),
        "accuracy": {
            "reference": accuracies(reference, context["splits"]),
            "poisoned": accuracies(model, context["splits"]),
        },  # fmt: skip
    }
    if kind == "gaussian":
        row["gus"] = {"reference": gus_test(reference, poisons),
                      "poisoned": gus_test(model, poisons)}  # fmt: skip
    compute = args.epochs * full[0].shape[0]
    methods = {}
    for name in [*args.method_settings, UNBUDGETED]:
        result = run_method(name, model, forget, retain, args, compute, seed)
        methods[name] = describe(result.model.eval(), reference, model, systematic, metric, context)
        methods[name]["spent"] = result.spent
    methods[CEILING] = describe(refs[1], reference, model, systematic, metric, context)
    methods[NULL] = describe(poisoned[1], reference, model, systematic, metric, context)
    row["methods"] = methods
    seconds["unlearning_and_audits"] = time.perf_counter() - timer
    row["seconds"] = seconds
    return row


def run_seed(seed: int, args, base, test, dataset) -> dict:
    return {kind: experiment(kind, args, seed, base, test, dataset) for kind in KINDS}


# ------------------------------------------------------------------------------------------------
# Across seeds: the poisoning direction from a shared initialization
# ------------------------------------------------------------------------------------------------


def cross_seed_consistency(args, base, dataset) -> dict:
    """Each seed's shift (shared init, the seed's own poisons and batch order) against the mean
    of the other seeds' shifts: ``cos(d_s, mean_{t != s} d_t)``."""
    init = initial_model(dataset, args, derive_seed(args.seed, 5))
    out = {}
    for kind in KINDS:
        shifts = []
        for seed in seed_list(args):
            poisons = make_poisons(kind, base, args, derive_seed(seed, 1, KINDS.index(kind)))
            order = derive_seed(seed, 2, 0)
            full, retain = tensors(poisons.dataset, args), tensors(poisons.retain, args)
            shifts.append(flat(fit(init, full, args, order)) - flat(fit(init, retain, args, order)))
        stacked = torch.stack(shifts)
        if len(shifts) < 2:
            out[kind] = {"leave_one_out_cosine": None}
            continue
        others = (stacked.sum(0, keepdim=True) - stacked) / (len(shifts) - 1)
        values = [cosine(s, o) for s, o in zip(stacked, others)]
        out[kind] = {"leave_one_out_cosine": values,
                     "summary": stats.summarize(values).to_dict(),
                     "mean_shift_norm_over_shift": float(stacked.mean(0).norm())
                     / float(stacked.norm(dim=1).mean())}  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------


def column(records, kind, *path) -> list:
    values = []
    for record in records:
        node = record[kind]
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        values.append(node)
    return values


def versus_nulls(records, kind, name, key, band: float) -> dict | None:
    """A method's cosine (``key``) over seeds, against the random band (``|cos| <= band``) and,
    paired by seed, against the batch-order null; None for the null itself and for a method that
    did not move in some seed."""
    values = column(records, kind, "methods", name, key)
    nulls = column(records, kind, "methods", NULL, key)
    if name == NULL or any(v is None for v in values) or any(v is None for v in nulls):
        return None
    summary = stats.summarize(values)
    difference = stats.paired_difference(values, nulls)
    above = stats.proportion(sum(v > band for v in values), len(values))
    return {"cosine": summary.to_dict(), "minus_batch_order_null": difference.to_dict(),
            "seeds_above_random_band": above.to_dict(),
            "verdict": verdict(summary, difference, band)}  # fmt: skip


def verdict(summary: stats.Summary, difference: stats.Summary, band: float) -> str:
    """What the intervals allow: the cosine's CI against the random band, the paired difference's
    CI against 0 (one seed: no interval, no verdict)."""
    if summary.n < 2:
        return "one seed: no interval"
    if summary.low > band:
        random = "above the random band"
    elif summary.high < -band:
        random = "below the random band"
    elif -band <= summary.low and summary.high <= band:
        random = "inside the random band"
    else:
        random = "not resolved from the random band"
    if difference.low > 0:
        null = "above the batch-order null"
    elif difference.high < 0:
        null = "below the batch-order null"
    else:
        null = "not resolved from the batch-order null"
    return f"{random}; {null}"


def summarize(records, args, parameters: int) -> dict:
    band = 1.96 / math.sqrt(parameters)
    out = {"parameters": parameters, "random_band_analytic": [-band, band],
           "per_kind": stats.summarize_records(records)}  # fmt: skip
    out["orthogonality"] = {
        kind: {key: {name: versus_nulls(records, kind, name, key, band)
                     for name in records[0][kind]["methods"]}
               for key in ("cosine", "systematic_cosine")}
        for kind in KINDS
    }  # fmt: skip
    out["gus_still_detected"] = {
        name: stats.fraction_significant(
            column(records, "gaussian", "methods", name, "gus", "p_one_sided"), 0.01
        ).to_dict()
        for name in records[0]["gaussian"]["methods"]
    }
    return out


# ------------------------------------------------------------------------------------------------
# Figure
# ------------------------------------------------------------------------------------------------


def forest(ax, rows, band: float | None, xlabel: str, title: str, offset: float = 0.0,
           marker: str = "o") -> None:  # fmt: skip
    """Rows of (label, per-seed values, colour): mean with 95% CI bar and the seeds as dots;
    ``band`` shades the random-direction null ``[-band, band]``; ``offset`` shifts the rows (two
    series on one axis)."""
    if band is not None:
        ax.axvspan(-band, band, color="0.82", zorder=0)
    ax.axvline(0, color="0.5", lw=0.8)
    for y, (_, values, colour) in enumerate(rows):
        s = stats.summarize(values)
        y = y + offset
        ax.scatter(values, [y] * len(values), s=14, color=colour, alpha=0.35, zorder=2)
        if s.n > 1:
            ax.errorbar(s.mean, y, xerr=[[s.mean - s.low], [s.high - s.mean]], fmt=marker,
                        color=colour, capsize=4, ms=7, lw=2, zorder=3)  # fmt: skip
        else:
            ax.plot(s.mean, y, marker, color=colour, ms=7, zorder=3)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=10)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_title(title, fontsize=12)
    ax.grid(axis="x", alpha=0.3)


def colour_of(name: str, base: str = "tab:blue") -> str:
    return "tab:green" if name == CEILING else "tab:red" if name == NULL else base


def method_rows(records, kind, key, base: str = "tab:blue", names=None) -> list:
    rows = []
    for name in names or records[0][kind]["methods"]:
        values = column(records, kind, "methods", name, key)
        if any(v is None for v in values):
            continue
        rows.append((name, values, colour_of(name, base)))
    return rows


def noise_rows(records, kind, cross) -> list:
    keys = [("retrain_distance_over_shift", "||retrain - retrain'|| / ||d||"),
            ("poisoned_distance_over_shift", "||poisoned - poisoned'|| / ||d||"),
            ("shift_replicate_cosine", "cos(d, d'), other batch order"),
            ("shift_systematic_cosine", "cos(d, mean d of orders 2..)"),
            ("batch_order_difference_cosine", "cos(retrain'' - retrain', d)")]  # fmt: skip
    rows = [(label, column(records, kind, "noise", key), "tab:purple") for key, label in keys]
    loo = cross.get(kind, {}).get("leave_one_out_cosine")
    if loo:
        rows.append(("cos(d, mean d of other seeds),\nshared init", loo, "tab:orange"))
    return rows


def removal_panel(ax, records, kind) -> None:
    """Removed fraction in the Euclidean (circles) and the Fisher metric (triangles)."""
    names = [n for n in records[0][kind]["methods"]
             if all(v is not None for v in column(records, kind, "methods", n, "removed_fraction"))
             and all(v is not None for v in column(records, kind, "methods", n,
                                                   "fisher_removed_fraction"))]  # fmt: skip
    forest(ax, method_rows(records, kind, "removed_fraction", names=names), None,
           "removed fraction -<u, d> / ||d||^2", f"{kind}: removed fraction", offset=-0.15)  # fmt: skip
    forest(ax, method_rows(records, kind, "fisher_removed_fraction", "tab:cyan", names), None,
           "removed fraction -<u, d> / ||d||^2", f"{kind}: removed fraction", offset=0.15,
           marker="^")  # fmt: skip


def legend_handles() -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    line = lambda colour, marker, label: Line2D([], [], color=colour, marker=marker, lw=2,
                                                label=label)  # fmt: skip
    return [line("tab:blue", "o", "unlearning method (Euclidean)"),
            line("tab:cyan", "^", "same, Fisher metric"),
            line("tab:green", "o", "ceiling: retrain in another batch order"),
            line("tab:red", "o", "null: poisoned retrain in another batch order"),
            line("tab:purple", "o", "batch-order noise (same init, same data)"),
            line("tab:orange", "o", "across seeds (shared init)"),
            Patch(color="0.82", label="random direction: 95% band ±1.96/sqrt(P)")]  # fmt: skip


def plot(records, summary, cross, path: Path) -> None:
    band = summary["random_band_analytic"][1]
    fig, axes = plt.subplots(len(KINDS), 4, figsize=(25, 6.4 * len(KINDS) + 1), squeeze=False)
    for row, kind in zip(axes, KINDS):
        forest(row[0], method_rows(records, kind, "cosine"), band, "cos(u, -d)",
               f"{kind}: cosine of the update u with the poisoning shift d")  # fmt: skip
        forest(row[1], method_rows(records, kind, "systematic_cosine"), band,
               "cos(u, -mean d of batch orders 2..)",
               f"{kind}: cosine with the systematic shift")  # fmt: skip
        removal_panel(row[2], records, kind)
        forest(row[3], noise_rows(records, kind, cross), band, "ratio or cosine",
               f"{kind}: batch-order noise floor")  # fmt: skip
    fig.legend(handles=legend_handles(), loc="lower center", ncol=4, fontsize=11, frameon=False)
    fig.suptitle(f"Unlearning updates against the poisoning shift: mean and 95% CI over "
                 f"{len(records)} seeds (dots: seeds)", fontsize=14)  # fmt: skip
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def print_report(summary, cross) -> None:
    band = summary["random_band_analytic"][1]
    print(f"P = {summary['parameters']} parameters; random band ±{band:.3f}")
    for kind in KINDS:
        noise = summary["per_kind"][kind]["noise"]
        print(f"{kind}: ||d|| {fmt(noise['shift_norm'])}, ||retrain - retrain'|| "
              f"{fmt(noise['retrain_distance'])}, cos(d, d') {fmt(noise['shift_replicate_cosine'])}, "
              f"cross-seed LOO cos {fmt(cross[kind].get('summary'))}")  # fmt: skip
        for name, test in summary["orthogonality"][kind]["cosine"].items():
            if test is None:
                print(
                    f"  {name:38s} " + ("(the null)" if name == NULL else "no update in some seed")
                )
                continue
            print(f"  {name:38s} cos {fmt(test['cosine'])}  minus null "
                  f"{fmt(test['minus_batch_order_null'])}  {test['verdict']}")  # fmt: skip


def fmt(s: dict | None) -> str:
    if not s:
        return "n/a"
    return f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def main() -> None:
    args = parse_args()
    limit_threads(args)
    started = time.perf_counter()
    dataset = data.load(args.dataset, root=args.data_dir, max_examples=args.train)
    test = tensors(data.load(args.dataset, root=args.data_dir, split="test"), args, args.test)
    base = tensors(dataset, args)
    results = Results(f"model_shift_{args.dataset}_{args.model}", args)
    results["settings_source"] = args.settings_source
    records = over_seeds(args, results, lambda s: run_seed(s, args, base, test, dataset))
    phases = {"seeds": time.perf_counter() - started}
    timer = time.perf_counter()
    cross = cross_seed_consistency(args, base, dataset)
    phases["cross_seed"] = time.perf_counter() - timer
    parameters = sum(p.numel() for p in initial_model(dataset, args, 0).parameters())
    summary = summarize(records, args, parameters)
    results["summary"], results["cross_seed"] = summary, cross
    results["phase_seconds"] = phases
    results.write()
    stem = results_stem(f"model_shift_{args.dataset}_{args.model}")
    plot(records, summary, cross, stem.with_suffix(".png"))
    print_report(summary, cross)
    print(f"wrote {stem}.json/.png in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
