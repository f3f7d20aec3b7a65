"""Which distribution do per-example scores follow, with and without poisoning? (examples/README.md)

Per seed, a model is trained on clean data, on data with Gaussian poisons and on data with label
flips, and ``influx.tails.fit`` describes two scores, the family chosen by the sign of the scores:

- the self-influence of every training example (``influx.influence``, EK-FAC by default):
  non-negative, so log-normal / gamma / exponential fits (AIC), a Clauset-Shalizi-Newman power
  law above its x_min (alpha, Vuong tests against the log-normal and exponential tails) and the
  Hill tail index on a log-log survival plot;
- the per-point Gaussian test I_z of the Gaussian poisons' noise (``influx.audit.gus``): signed,
  N(0, 1) exactly for the clean model (which never saw the noise), so normal / Laplace / t /
  Cauchy fits.

For the poisoned models it asks whether the poisons sit in the tail: their enrichment among the
k largest self-influences (k = Hill's k) and above the power law's x_min, and the AUC.

Exact-Hessian check: for the clean model itself (2,410 parameters at the defaults), the EK-FAC
self-influence tail is compared with the self-influence under the exact damped Hessian
(``method="exact"``), paired by seed: Hill index, power-law alpha, Spearman correlation. Models
above ``influx.influence.exact.MAX_EXACT_PARAMETERS`` skip it, as does ``--no-exact``.

    python examples/influence_tails.py                 # digits + MLP, 8 seeds, a few minutes
    python examples/influence_tails.py --seeds 2 --train 400 --epochs 3   # a quick look

Writes ``examples/results/influence_tails_<dataset>_<model>.{json,png}``.
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _setup import (  # noqa: E402
    Results,
    example_parser,
    limit_threads,
    load_examples,
    over_seeds,
    results_stem,
    save_figure,
)
from scipy import stats  # noqa: E402

from influx import data, influence, models, poison, tails, train  # noqa: E402
from influx import stats as seed_stats  # noqa: E402
from influx.audit.gus import gus_of  # noqa: E402
from influx.influence.exact import MAX_EXACT_PARAMETERS  # noqa: E402
from influx.seeds import derive_seed  # noqa: E402

LOSS = train.cross_entropy_per_example
CONDITIONS = ("clean", "gaussian", "label_flip")
# Survival levels P(X > x) at which each seed's empirical CCDF is stored (for the seed bands).
LEVELS = np.geomspace(1.0, 1e-3, 31)


def parse_args() -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=1000, help="training examples")
    parser.add_argument("--poisons", type=int, default=100, help="poisoned examples")
    parser.add_argument("--noise-std", type=float, default=0.5, help="Gaussian poison sigma")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--influence", default="ekfac", help="influx.influence method")
    parser.add_argument("--bootstrap", type=int, default=0,
                        help="parametric-bootstrap KS draws per family (0: none)")  # fmt: skip
    parser.add_argument("--power-law-bootstrap", type=int, default=20,
                        help="CSN bootstrap draws for the power law's KS p-value")  # fmt: skip
    parser.add_argument("--no-exact", action="store_true",
                        help="skip the exact-Hessian check of the clean model")  # fmt: skip
    return parser.parse_args()


def trained_model(batch, dataset, args, seed: int, width: int) -> torch.nn.Module:
    """An MLP (or ``--model``) initialized and trained with seed-derived seeds."""
    torch.manual_seed(derive_seed(seed, 1))
    model = models.build(args.model, dataset.input_shape, dataset.num_classes, width=width)
    model = model.to(args.device, getattr(torch, args.dtype))
    train.train(model, batch, lr=args.lr, epochs=args.epochs, batch_size=64,
                seed=derive_seed(seed, 2), progress=False)  # fmt: skip
    return model.eval()


def self_influence(model, batch, method: str) -> np.ndarray:
    return influence.fit(model, LOSS, batch, method=method).self_influence().cpu().numpy()


def ccdf_quantiles(scores: np.ndarray) -> list[float]:
    """The x at which the empirical P(X > x) crosses each of LEVELS (a compact survival curve)."""
    return np.quantile(scores, 1.0 - LEVELS).tolist()


def finite_or_none(value: float):
    return float(value) if np.isfinite(value) else None


def describe_positive(report: tails.TailReport) -> dict:
    """Per-seed numbers of a non-negative score: best family, Hill index, power law, Vuong."""
    power = report.power_law
    out = {
        "best_family": report.best,
        **{f"best_is_{name}": report.best == name for name in tails.POSITIVE_FAMILIES},
        "hill_alpha": finite_or_none(report.hill.alpha),
        "hill_below_1": bool(report.hill.alpha < 1),
        "power_law_alpha": power.alpha,
        "power_law_alpha_stderr": power.stderr,
        "survival_exponent": power.alpha - 1.0,
        "x_min": power.x_min,
        "x_min_quantile": float(np.mean(report.fitted_scores < power.x_min)),
        "tail_size": power.n_tail,
        "zero_fraction": report.zero_fraction,
        "fit_params": {name: list(f.params) for name, f in report.fits.items()},
        "ccdf_x": ccdf_quantiles(report.scores),
    }
    if np.isfinite(power.ks_pvalue):
        out["power_law_ks_pvalue"] = power.ks_pvalue
    for name, test in power.comparisons.items():
        out[f"vuong_{name}"] = {
            "normalized_ratio": test.normalized_ratio,
            "pvalue": test.pvalue,
            "power_law_favoured": test.favours == "power_law",
        }
    return out


def describe_signed(report: tails.TailReport) -> dict:
    """Per-seed numbers of a signed score: best symmetric family, t's nu, Hill index of |x|."""
    return {
        "best_family": report.best,
        **{f"best_is_{name}": report.best == name for name in tails.SYMMETRIC_FAMILIES},
        "t_nu": finite_or_none(min(report.fits["t"].params[0], 1e6)),
        "hill_alpha": finite_or_none(report.hill.alpha),
        "mean": float(report.scores.mean()),
        "sd": float(report.scores.std()),
        "values": report.scores.round(4).tolist(),
    }


def poison_membership(scores: np.ndarray, mask: np.ndarray, k: int, x_min: float) -> dict:
    """Poisons among the k largest scores and above x_min, relative to their base rate; AUC."""
    order = np.argsort(-scores)
    base = float(mask.mean())
    above = scores >= x_min
    auc = stats.mannwhitneyu(scores[mask], scores[~mask]).statistic / (mask.sum() * (~mask).sum())
    return {
        "tail_enrichment": float(mask[order[:k]].mean() / base),
        "x_min_enrichment": float(mask[above].mean() / base),
        "auc": float(auc),
    }


def fit_positive(scores: np.ndarray, args, seed: int) -> tails.TailReport:
    return tails.fit(scores, bootstrap=args.bootstrap, seed=seed,
                     power_law_bootstrap=args.power_law_bootstrap)  # fmt: skip


def run_condition(condition, batch, poisons, gaussian, dataset, args, seed, seconds) -> dict:
    started = time.perf_counter()
    model = trained_model(batch, dataset, args, seed, args.width)
    seconds["train"] += time.perf_counter() - started
    started = time.perf_counter()
    scores = self_influence(model, batch, args.influence)
    seconds["influence"] += time.perf_counter() - started
    started = time.perf_counter()
    report = fit_positive(scores, args, seed)
    row = {"self_influence": describe_positive(report)}
    if poisons is not None:
        mask = poisons.mask.cpu().numpy()
        row["self_influence"]["poisons"] = poison_membership(
            scores, mask, report.hill.k, report.power_law.x_min
        )
    seconds["fits"] += time.perf_counter() - started
    if condition == "clean" and exact_feasible(model, args):
        started = time.perf_counter()
        row["exact_check"] = exact_check(model, batch, scores, args, seed)
        seconds["exact_check"] += time.perf_counter() - started
    started = time.perf_counter()
    # I_z of the Gaussian noise; the clean model never saw it.
    if condition in ("clean", "gaussian"):
        z = gus_of(model, LOSS, gaussian).scores.cpu().numpy()
        # Signed by definition, even when every poison of a small run scores above 0.
        z = z[np.isfinite(z)]
        row["i_z"] = describe_signed(tails.fit(z, support="real", bootstrap=0, seed=seed))
    seconds["fits"] += time.perf_counter() - started
    return row


def exact_check(model, batch, ekfac_scores: np.ndarray, args, seed: int) -> dict:
    """The clean model's EK-FAC self-influence tail against its exact damped-Hessian one."""
    scores = {"ekfac": ekfac_scores, "exact": self_influence(model, batch, "exact")}
    out = {name: describe_positive(fit_positive(s, args, seed)) for name, s in scores.items()}
    for name, s in scores.items():  # the shape of the tail, free of each method's damping scale
        out[name]["ccdf_x_over_median"] = (np.array(out[name]["ccdf_x"]) / np.median(s)).tolist()
    out["spearman"] = float(stats.spearmanr(scores["ekfac"], scores["exact"]).statistic)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    return out


def exact_feasible(model, args) -> bool:
    parameters = sum(p.numel() for p in model.parameters())
    return not args.no_exact and parameters <= MAX_EXACT_PARAMETERS


def make_run_seed(args, dataset, inputs, targets):
    base = (inputs, targets)

    def run_seed(seed: int) -> dict:
        seconds = {"train": 0.0, "influence": 0.0, "fits": 0.0, "exact_check": 0.0}
        gaussian = poison.gaussian(base, count=args.poisons, noise_std=args.noise_std,
                                   seed=derive_seed(seed, 4))  # fmt: skip
        flips = poison.label_flip(base, count=args.poisons, num_classes=dataset.num_classes,
                                  seed=derive_seed(seed, 5))  # fmt: skip
        conditions = {"clean": (base, None), "gaussian": (gaussian.dataset, gaussian),
                      "label_flip": (flips.dataset, flips)}  # fmt: skip
        record = {}
        for condition, (batch, poisons) in conditions.items():
            batch = tuple(t.to(args.device) for t in data.as_tensors(batch)[:2])
            record[condition] = run_condition(condition, batch, poisons, gaussian, dataset,
                                              args, seed, seconds)  # fmt: skip
        if "exact_check" in record["clean"]:  # a section of its own in the summary
            record["exact_check"] = record["clean"].pop("exact_check")
        record["seconds"] = seconds
        return record

    return run_seed


def comparisons(records: list[dict]) -> dict:
    """Paired by seed: poisoned minus clean tails; exact minus EK-FAC tails; rates over seeds."""
    pick = lambda *keys: [_get(r, keys) for r in records]  # noqa: E731
    out = {}
    for condition in ("gaussian", "label_flip"):
        out[f"{condition}_minus_clean"] = {
            key: seed_stats.paired_difference(
                pick(condition, "self_influence", key), pick("clean", "self_influence", key)
            ).to_dict()
            for key in ("hill_alpha", "power_law_alpha")
        }
    if "exact_check" in records[0]:
        out["exact_minus_ekfac"] = {
            key: seed_stats.paired_difference(
                pick("exact_check", "exact", key), pick("exact_check", "ekfac", key)
            ).to_dict()
            for key in ("hill_alpha", "power_law_alpha", "x_min_quantile")
        }
    for condition in CONDITIONS:
        if "power_law_ks_pvalue" in records[0][condition]["self_influence"]:
            # CSN's goodness of fit: the power law is rejected where p <= 0.05 (B draws: p >= 1/(B+1))
            p_values = pick(condition, "self_influence", "power_law_ks_pvalue")
            out[f"{condition}_power_law_rejected"] = seed_stats.fraction_significant(
                p_values, alpha=0.05
            ).to_dict()
        p_values = pick(condition, "self_influence", "vuong_exponential", "pvalue")
        out[f"{condition}_vuong_exponential_significant"] = seed_stats.fraction_significant(
            p_values, alpha=0.1
        ).to_dict()
        p_values = pick(condition, "self_influence", "vuong_lognormal", "pvalue")
        out[f"{condition}_vuong_lognormal_significant"] = seed_stats.fraction_significant(
            p_values, alpha=0.1
        ).to_dict()
    return out


def _get(record: dict, keys: tuple):
    for key in keys:
        record = record[key]
    return record


def main() -> None:
    args = parse_args()
    limit_threads(args)
    name = f"influence_tails_{args.dataset}_{args.model}"
    results = Results(name, args)
    dataset, inputs, targets = load_examples(args, args.train)
    records = over_seeds(args, results, make_run_seed(args, dataset, inputs, targets))
    results["summary"] = seed_stats.summarize_records(records)
    results["comparisons"] = comparisons(records)
    results.write()
    figure(records, args, results_stem(name).with_suffix(".png"))
    report(results["summary"], results["comparisons"], records)


def report(summary: dict, compared: dict, records: list[dict]) -> None:
    """The script's own printout: mean [95% interval] over seeds."""
    fmt = lambda s: f"{s['mean']:.3g} [{s['low']:.3g}, {s['high']:.3g}]"  # noqa: E731
    for condition in CONDITIONS:
        s = summary[condition]["self_influence"]
        best = {f: s[f"best_is_{f}"]["k"] for f in tails.POSITIVE_FAMILIES}
        line = (f"{condition:10s} self-influence: best (AIC) {best}, Hill {fmt(s['hill_alpha'])}, "
                f"power law alpha {fmt(s['power_law_alpha'])} above x_min quantile "
                f"{fmt(s['x_min_quantile'])}")  # fmt: skip
        if "poisons" in s:
            line += f", poison tail enrichment {fmt(s['poisons']['tail_enrichment'])}"
        print(line)
    for condition in ("clean", "gaussian"):
        s = summary[condition]["i_z"]
        print(f"{condition:10s} I_z: mean {fmt(s['mean'])}, sd {fmt(s['sd'])}, "
              f"Hill {fmt(s['hill_alpha'])}")  # fmt: skip
    if "exact_check" in summary:
        s = summary["exact_check"]
        print(f"exact check: Hill EK-FAC {fmt(s['ekfac']['hill_alpha'])} vs exact "
              f"{fmt(s['exact']['hill_alpha'])}; power law alpha EK-FAC "
              f"{fmt(s['ekfac']['power_law_alpha'])} vs exact {fmt(s['exact']['power_law_alpha'])}; "
              f"Spearman {fmt(s['spearman'])}")  # fmt: skip
    seconds = {k: sum(r["seconds"][k] for r in records) for k in records[0]["seconds"]}
    print("seconds per phase (all seeds):", {k: round(v, 1) for k, v in seconds.items()})


# ---- figure ----------------------------------------------------------------------------------

COLOURS = {"clean": "C0", "gaussian": "C1", "label_flip": "C3", "ekfac": "C0", "exact": "C2"}


def survival_band(ax, curves: list[list[float]], colour, label) -> None:
    """Median over seeds of the x at each survival level, shaded between the seeds' extremes."""
    x = np.array(curves)
    ax.fill_betweenx(LEVELS, x.min(0), x.max(0), color=colour, alpha=0.2, lw=0)
    ax.plot(np.median(x, 0), LEVELS, color=colour, lw=1.6, label=f"{label} (seed range)")


def interval_rows(ax, rows: list[tuple[str, dict]], title: str, reference: float | None) -> None:
    """Mean and 95% interval per row, with the per-seed values as dots."""
    for i, (_, s) in enumerate(rows):
        ax.plot(s["values"], [i] * len(s["values"]), ".", color="0.6", ms=4)
        if s["n"] > 1:
            ax.plot([s["low"], s["high"]], [i, i], "k-", lw=2)
        ax.plot(s["mean"], i, "ko", ms=5)
    if reference is not None:
        ax.axvline(reference, color="C3", ls="--", lw=1)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)


def figure(records: list[dict], args, path) -> None:
    summary = seed_stats.summarize_records(records)
    fig, axes = plt.subplots(2, 4, figsize=(19, 8.5))
    ax = axes[0, 0]
    for condition in CONDITIONS:
        survival_band(ax, [r[condition]["self_influence"]["ccdf_x"] for r in records],
                      COLOURS[condition], condition)  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel=f"{args.influence} self-influence",
           ylabel="P(X > x)", title="self-influence survival, by training data")  # fmt: skip
    ax.legend(fontsize=8)
    fitted_survival(axes[0, 1], records)
    exact_survival(axes[0, 2], records)
    signed_density(axes[0, 3], records)
    summary_panels(axes[1], summary, records)
    fig.suptitle(
        f"influence_tails: {args.dataset} / {args.model}, {len(records)} seeds", fontsize=11
    )
    save_figure(fig, path, dpi=90)


def fitted_survival(ax, records: list[dict]) -> None:
    """Clean self-influence: the seeds' band with every seed's fitted survival functions."""
    clean = [r["clean"]["self_influence"] for r in records]
    survival_band(ax, [c["ccdf_x"] for c in clean], "0.3", "empirical")
    grid_low, grid_high = min(c["ccdf_x"][0] for c in clean), max(c["ccdf_x"][-1] for c in clean)
    grid = np.geomspace(max(grid_low, 1e-300), grid_high, 200)
    for j, family in enumerate(tails.POSITIVE_FAMILIES):
        for i, c in enumerate(clean):
            sf = (1 - c["zero_fraction"]) * tails.FAMILIES[family](*c["fit_params"][family]).sf(
                grid
            )
            ax.plot(grid, sf, color=f"C{j}", lw=0.7, alpha=0.7, label=family if i == 0 else None)
    for i, c in enumerate(clean):  # the power law on its tail: P(X >= x_min) (x / x_min)^-(a - 1)
        x = grid[grid >= c["x_min"]]
        above = (1 - c["zero_fraction"]) * (1 - c["x_min_quantile"])
        ax.plot(x, above * (x / c["x_min"]) ** -c["survival_exponent"], color="C4", lw=0.9,
                label="power law (x >= x_min)" if i == 0 else None)  # fmt: skip
    ax.set(xscale="log", yscale="log", ylim=(LEVELS[-1] / 2, 1.2), xlabel="self-influence",
           title="clean: fitted survival functions (one line per seed)")  # fmt: skip
    ax.legend(fontsize=7)


def exact_survival(ax, records: list[dict]) -> None:
    if "exact_check" not in records[0]:
        ax.axis("off")
        return
    for method in ("ekfac", "exact"):
        survival_band(ax, [r["exact_check"][method]["ccdf_x_over_median"] for r in records],
                      COLOURS[method], method)  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="self-influence / its median",
           title=f"clean model ({records[0]['exact_check']['parameters']} parameters): "
                 "EK-FAC vs exact Hessian")  # fmt: skip
    ax.legend(fontsize=8)


def signed_density(ax, records: list[dict]) -> None:
    """I_z pooled over seeds, log density floored at one count per bin, against N(0, 1)."""
    bins = np.linspace(-6, 6, 41)
    for condition in ("clean", "gaussian"):
        values = np.concatenate([r[condition]["i_z"]["values"] for r in records])
        ax.hist(np.clip(values, -6, 6), bins=bins, density=True, histtype="step", lw=1.5,
                color=COLOURS[condition], label=f"{condition} model (pooled seeds)")  # fmt: skip
    grid = np.linspace(-6, 6, 300)
    ax.plot(grid, stats.norm.pdf(grid), "k--", lw=1, label="N(0, 1): the analytic null")
    count = sum(len(r["clean"]["i_z"]["values"]) for r in records)
    floor = 0.5 / (count * (bins[1] - bins[0]))  # half of one point per bin
    ax.set(yscale="log", ylim=(floor, 1.0), xlabel="I_z (clipped to [-6, 6])",
           title="per-point Gaussian test I_z (signed)")  # fmt: skip
    ax.legend(fontsize=7)


def summary_panels(axes, summary: dict, records: list[dict]) -> None:
    rows = [(c, summary[c]["self_influence"]) for c in CONDITIONS]
    if "exact_check" in summary:
        rows += [("clean, exact Hessian", summary["exact_check"]["exact"])]
    interval_rows(axes[0], [(label, s["hill_alpha"]) for label, s in rows],
                  "Hill tail index of self-influence (1: infinite mean)", 1.0)  # fmt: skip
    interval_rows(axes[1], [(label, s["survival_exponent"]) for label, s in rows],
                  "power-law survival exponent alpha - 1 above x_min", 1.0)  # fmt: skip
    vuong = [(f"{label} vs {alt}", s[f"vuong_{alt}"]["normalized_ratio"]) for label, s in rows
             for alt in ("lognormal", "exponential")]  # fmt: skip
    interval_rows(axes[2], vuong, "Vuong R / (sigma sqrt n) on the tail (> 0: power law)", 0.0)
    poisoned = [(f"{c}: {key}", summary[c]["self_influence"]["poisons"][key])
                for c in ("gaussian", "label_flip") for key in ("tail_enrichment",
                                                                "x_min_enrichment")]  # fmt: skip
    interval_rows(axes[3], poisoned, "poison share in the tail / base rate", 1.0)


if __name__ == "__main__":
    main()
