"""Privacy vs usefulness: DP-SGD at several epsilons against membership inference and GUS
(examples/README.md).

A pool of training examples is split in half: the target model trains on the members, the other
half are non-members. A fraction of the members carry Gaussian poisons (``x + xi``, labels kept;
``influx.poison.gaussian``). For each privacy level (no DP, then DP-SGD at decreasing target
epsilon, ``influx.dp.train``: ghost-clipped per-example gradients, Poisson batches, Opacus' RDP
accountant) we train the target and ``--shadows`` shadow models on balanced random halves of the
pool (each example is IN exactly half of the shadows), all with the same recipe, and report test
accuracy and, from ``influx.audit.mia`` and ``influx.audit.gus``:

- loss-threshold MIA (Yeom et al. 2018): score -loss; TPR at FPR 0.01 and AUC, members (clean
  ones) vs non-members;
- LiRA online (Carlini et al. 2022): per-example Gaussians of the logit-scaled confidence
  ``phi = log p_y - log(1 - p_y)`` over the IN and OUT shadows, with one global variance per side
  (few shadows); score ``log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2)``; TPR at FPR
  0.01 and AUC;
- GUS of the poisons (``influx.audit.gus``): mean score, z = sqrt(n) GUS, TPR at FPR 0.01.

    python examples/privacy.py                             # digits + MLP, a few minutes on CPU
    python examples/privacy.py --dataset cifar10 --model resnet18 --device cuda --epochs 30

Writes ``examples/results/privacy_<dataset>_<model>.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from _setup import example_parser, results_stem, save_figure, seeded_model  # noqa: E402

from influx import data, dp, poison, train  # noqa: E402
from influx.audit.gus import gus_of  # noqa: E402
from influx.audit.mia import (  # noqa: E402
    lira_scores,
    logit_confidence,
    loss_attack,
    membership_metrics,
    per_example_losses,
    shadow_masks,
)

LOSS = train.cross_entropy_per_example
FPR = 0.01


def parse_args(argv=None) -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0], dtype="float32")
    parser.add_argument("--pool", type=int, default=800, help="members + non-members")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 4.0, 2.0, 1.0],
                        help="target epsilons of the DP runs (a run without DP is always added)")  # fmt: skip
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--poison-fraction", type=float, default=0.1, help="of the members")
    parser.add_argument("--noise-std", type=float, default=1.0, help="Gaussian poison std")
    parser.add_argument("--shadows", type=int, default=6, help="LiRA shadow models (even)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def fit(args, dataset, train_data, noise_multiplier: float | None, seed: int):
    """A model trained on ``train_data`` without DP (``noise_multiplier`` None) or with DP-SGD."""
    torch.manual_seed(seed)
    model = seeded_model(args.model, dataset, args)
    settings = dict(optimizer="adam", lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                    seed=seed, progress=False)  # fmt: skip
    if noise_multiplier is None:
        result = train.train(model, train_data, **settings)
    else:
        result = dp.train(model, train_data, max_grad_norm=args.max_grad_norm,
                          noise_multiplier=noise_multiplier, delta=args.delta, noise_seed=seed,
                          **settings)  # fmt: skip
    return model.eval(), result


def one_level(args, dataset, pool, members, gaussian, test, epsilon):
    inputs, targets = pool
    start = time.perf_counter()
    poisoned_inputs, poisoned_targets, _ = data.as_tensors(gaussian.dataset)
    target_train = (poisoned_inputs.to(inputs), poisoned_targets.to(targets.device))
    # the target and every shadow train on N/2 examples with one recipe: one sigma for all
    n_train = target_train[0].shape[0]
    sigma = None
    if epsilon is not None:
        steps = args.epochs * math.ceil(n_train / args.batch_size)
        sigma = dp.noise_multiplier_for(epsilon, args.batch_size / n_train, steps, args.delta)
    target, result = fit(args, dataset, target_train, sigma, args.seed)
    _, accuracy = train.evaluate(target, test)
    # membership of the clean members (poisoned members are scored by GUS instead)
    clean_member = members.clone()
    clean_member[members.nonzero().flatten()[gaussian.mask.cpu()]] = False
    non_member = ~members
    losses = per_example_losses(target, LOSS, pool)
    loss_mia = loss_attack(losses[clean_member], losses[non_member], fprs=(FPR,))
    row = {
        "epsilon_target": epsilon,
        "epsilon": None if result.privacy is None else result.privacy["epsilon"],
        "noise_multiplier": None if result.privacy is None else result.privacy["noise_multiplier"],
        "test_accuracy": accuracy,
        "train_accuracy": result.final_accuracy,
        "loss_mia_tpr_at_fpr_0_01": loss_mia.tpr_at_fpr[FPR],
        "loss_mia_auc": loss_mia.auc,
    }
    # each example IN exactly half of the shadows, which train like the target (same sigma)
    shadow_in = shadow_masks(args.shadows, inputs.shape[0], seed=args.seed + 1)
    shadow_phi = []
    for k in range(args.shadows):
        chosen = shadow_in[k].nonzero().flatten().to(inputs.device)
        model, _ = fit(args, dataset, (inputs[chosen], targets[chosen]), sigma,
                       args.seed + 100 + k)  # fmt: skip
        shadow_phi.append(logit_confidence(model, pool))
    # online LiRA with one global variance per side (few shadows)
    scores = lira_scores(logit_confidence(target, pool), torch.stack(shadow_phi), shadow_in,
                         online=True, global_variance=True).cpu()  # fmt: skip
    assessed = clean_member | non_member
    lira = membership_metrics(scores[assessed], clean_member[assessed], fprs=(FPR,))
    row["lira_tpr_at_fpr_0_01"] = lira.tpr_at_fpr[FPR]
    row["lira_auc"] = lira.auc
    g = gus_of(target, LOSS, gaussian)
    row.update(gus=g.gus, gus_z=g.z, gus_tpr_at_fpr_0_01=g.tpr_at_fpr, null_gus=g.null_gus,
               null_z=g.null_z, seconds=time.perf_counter() - start)  # fmt: skip
    print(json.dumps(row))
    return row


def plot(rows, args, path: Path) -> None:
    labels = ["no DP" if r["epsilon"] is None else f"{r['epsilon']:.2g}" for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(x, [r["test_accuracy"] for r in rows], "o-")
    axes[0].set_title("test accuracy", fontsize=10)
    for key, name in (("loss_mia", "loss MIA"), ("lira", "LiRA")):
        axes[1].plot(x, [r[f"{key}_tpr_at_fpr_0_01"] for r in rows], "o-", label=name)
    axes[1].axhline(FPR, color="gray", ls="--", lw=1, label="chance (= FPR)")
    axes[1].set_title("MIA TPR at FPR 0.01", fontsize=10)
    axes[1].legend(fontsize=8)
    axes[2].plot(x, [r["gus_z"] for r in rows], "o-", label="poisons")
    axes[2].plot(x, [r["null_z"] for r in rows], "o--", color="gray", label="fresh noise (null)")
    axes[2].axhline(3, color="gray", ls=":", lw=1)
    axes[2].set_title("GUS z = sqrt(n) GUS", fontsize=10)
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("epsilon (spent)")
    fig.suptitle(f"{args.dataset} {args.model}: DP-SGD (C = {args.max_grad_norm:g}, "
                 f"delta = {args.delta:g}) vs membership inference and GUS", fontsize=10)  # fmt: skip
    save_figure(fig, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.shadows < 4 or args.shadows % 2:
        # with 2 shadows each example has one IN and one OUT signal: no spread to fit
        raise SystemExit("--shadows must be an even number >= 4")
    train_set = data.load(args.dataset, root=args.data_dir, split="train")
    dataset = train_set
    inputs, targets, _ = data.as_tensors(train_set)
    n = min(args.pool, inputs.shape[0])
    dtype = getattr(torch, args.dtype)
    pool = (inputs[:n].to(args.device, dtype), targets[:n].to(args.device))
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    members = torch.zeros(n, dtype=torch.bool, device="cpu")
    members[torch.randperm(n, generator=generator, device="cpu")[: n // 2]] = True
    member_positions = members.nonzero().flatten().to(args.device)
    member_data = (pool[0][member_positions], pool[1][member_positions])
    gaussian = poison.gaussian(member_data, fraction=args.poison_fraction,
                               noise_std=args.noise_std, seed=args.seed)  # fmt: skip
    test_set = data.load(args.dataset, root=args.data_dir, split="test")
    test_inputs, test_targets, _ = data.as_tensors(test_set)
    test = (test_inputs.to(args.device, dtype), test_targets.to(args.device))
    rows = [one_level(args, dataset, pool, members, gaussian, test, epsilon)
            for epsilon in [None, *sorted(args.epsilons, reverse=True)]]  # fmt: skip
    stem = results_stem(f"privacy_{args.dataset}_{args.model}")
    stem.with_suffix(".json").write_text(json.dumps(
        {"config": vars(args), "members": int(members.sum()), "poisons": gaussian.count,
         "runs": rows}, indent=1) + "\n")  # fmt: skip
    plot(rows, args, stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
