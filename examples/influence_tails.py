"""Which distribution do per-example scores follow, with and without poisoning? (examples/README.md)

A model is trained on clean data, on data with Gaussian poisons and on data with label flips.
For each we fit normal / Laplace / Student-t / Cauchy laws (``influx.tails``: MLE, AIC/BIC, LR
tests, parametric-bootstrap KS, Hill tail index) to

- the per-point GUS scores I_z of the Gaussian poisons (``influx.audit.gus``): N(0, 1) exactly
  for a model that never saw the noise (the clean model), shifted for the poisoned one;
- the self-influence of every training example (``influx.influence``, EK-FAC by default),

and ask whether the poisoned points sit in the tail: the share of poisons among the examples past
the Hill threshold (the k largest |scores|) and the AUC of the score for finding the poisons.

    python examples/influence_tails.py                                # digits + MLP, ~2 min on CPU
    python examples/influence_tails.py --dataset cifar10 --model resnet18 --device cuda \
        --dtype float32 --train 50000 --poisons 2500

Writes ``examples/results/influence_tails_<dataset>_<model>.{json,png}`` and one diagnostic PNG
per fit (``..._<condition>_<score>.png``).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _setup import RESULTS, example_parser, save_figure, seeded_model  # noqa: E402
from scipy import stats  # noqa: E402

from influx import data, influence, poison, tails, train  # noqa: E402
from influx.audit.gus import gus_of  # noqa: E402

LOSS = train.cross_entropy_per_example


def parse_args() -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=1600, help="training examples")
    parser.add_argument("--poisons", type=int, default=160, help="poisoned examples")
    parser.add_argument("--noise-std", type=float, default=0.5, help="Gaussian poison sigma")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--influence", default="ekfac", help="influx.influence method")
    parser.add_argument("--bootstrap", type=int, default=100)
    return parser.parse_args()


def tensors(dataset, args):
    inputs, targets, _ = data.as_tensors(dataset)
    return inputs.to(args.device, getattr(torch, args.dtype)), targets.to(args.device)


def fit(model, batch, args):
    train.train(model, batch, lr=args.lr, epochs=args.epochs, batch_size=64, seed=args.seed,
                progress=False)  # fmt: skip
    return model.eval()


def tail_membership(scores: np.ndarray, mask: np.ndarray, k: int) -> dict:
    """Where the poisons sit: share among the k largest |scores|, AUC of the score (and of |score|)."""
    order = np.argsort(-np.abs(scores))
    top = mask[order[:k]]
    auc = lambda s: float(
        stats.mannwhitneyu(s[mask], s[~mask]).statistic / (mask.sum() * (~mask).sum())
    )
    return {
        "k": int(k),
        "poisons_in_tail": int(top.sum()),
        "tail_share_of_poisons": float(top.mean()),
        "base_rate": float(mask.mean()),
        "enrichment": float(top.mean() / mask.mean()),
        "auc_score": auc(scores),
        "auc_abs_score": auc(np.abs(scores)),
        "poison_median_percentile": float(np.median(stats.rankdata(scores)[mask] / scores.size)),
    }


def analyse(scores: np.ndarray, args, name: str, mask: np.ndarray | None = None) -> dict:
    report = tails.fit(scores, bootstrap=args.bootstrap, seed=args.seed)
    out = report.summary()
    out["mean"], out["std"] = float(scores.mean()), float(scores.std())
    if mask is not None and mask.any():
        out["poisons"] = tail_membership(scores, mask, report.hill.k)
    report.plot(RESULTS / f"{args.stem}_{name}.png", title=name)
    plt.close("all")
    return out


def main() -> None:
    args = parse_args()
    args.stem = f"influence_tails_{args.dataset}_{args.model}"
    RESULTS.mkdir(exist_ok=True)
    started = time.perf_counter()
    train_set = data.load(args.dataset, root=args.data_dir, max_examples=args.train)
    base = tensors(train_set, args)
    init = seeded_model(args.model, train_set, args)
    gaussian = poison.gaussian(base, count=args.poisons, noise_std=args.noise_std, seed=args.seed)
    flips = poison.label_flip(base, count=args.poisons, num_classes=train_set.num_classes,
                              seed=args.seed)  # fmt: skip
    conditions = {"clean": (base, None), "gaussian": (tensors(gaussian.dataset, args), gaussian),
                  "label_flip": (tensors(flips.dataset, args), flips)}  # fmt: skip
    results = {}
    for condition, (batch, poisons) in conditions.items():
        model = fit(copy.deepcopy(init), batch, args)
        mask = None if poisons is None else poisons.mask.cpu().numpy()
        row = {}
        self_influence = (
            influence.fit(model, LOSS, batch, method=args.influence).self_influence().cpu().numpy()
        )
        row["self_influence"] = analyse(self_influence, args, f"{condition}_self_influence", mask)
        # GUS I_z of the Gaussian poisons' noise: the clean model never saw it (the null law).
        if condition in ("clean", "gaussian"):
            scores = gus_of(model, LOSS, gaussian).scores.cpu().numpy()
            row["gus_scores"] = analyse(scores, args, f"{condition}_gus_scores")
        results[condition] = row
    out = {"config": {k: v for k, v in vars(args).items() if k != "stem"},
           "seconds": time.perf_counter() - started, "results": results}  # fmt: skip
    (RESULTS / f"{args.stem}.json").write_text(json.dumps(out, indent=1, default=float))
    summary_figure(results, RESULTS / f"{args.stem}.png")
    for condition, row in results.items():
        for score in ("self_influence", "gus_scores"):
            if score in row:
                r = row[score]
                poisons = r.get("poisons", {})
                ks_pvalues = ", ".join(f"{n}={f['ks_pvalue']}" for n, f in r["fits"].items())
                print(  # the script's own report
                    f"{condition:10s} {score:15s} n={r['n']:5d} best AIC {r['best_aic']:8s} "
                    f"BIC {r['best_bic']:8s} t nu={r['fits']['t']['params'][0]:.3g} "
                    f"hill={r['hill']['alpha']:.3g}±{r['hill']['stderr']:.2g} "
                    f"KS p: {ks_pvalues} "
                    f"poison enrichment in tail {poisons.get('enrichment')} auc {poisons.get('auc_score')}"
                )
    print(f"wrote {args.stem}.json/.png in {out['seconds']:.0f} s")


def summary_figure(results: dict, path: Path) -> None:
    panels = [(c, s) for c, row in results.items() for s in ("self_influence", "gus_scores")
              if s in row]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2))
    for ax, (condition, score) in zip(axes, panels):
        r = results[condition][score]
        alphas = {
            n: f["aic"] - min(g["aic"] for g in r["fits"].values()) for n, f in r["fits"].items()
        }
        ax.bar(list(alphas), list(alphas.values()), color="C0")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_title(f"{condition}: {score}\nbest {r['best_aic']}, Hill {r['hill']['alpha']:.2f}",
                     fontsize=8)  # fmt: skip
        ax.set_ylabel("AIC - min AIC")
    save_figure(fig, path, dpi=100)


if __name__ == "__main__":
    main()
