"""Can poisons be crafted that unlearning cannot undo, relative to the shift they cause?

Per seed, input perturbations ``delta`` of a fixed norm per point (that of Gaussian noise of std
sigma, ``sigma sqrt(d)``) are added to a random subset of the training points. Training is
``--train-steps`` full-batch GD steps from the seed's initialization (deterministic: the shift
``d = theta_p - theta_r`` carries no batch-order noise), the reference ``theta_r`` the same GD
without the poisons. The crafting objective is what survives unlearning, *relative to the shift*:

    J(delta) = ||theta_u(delta) - theta_r|| / ||theta_p(delta) - theta_r||

with ``theta_u`` the model after ``--ascent-steps`` full-batch gradient-ascent steps on the
poisons (``--objective surviving`` uses ``1 - removed fraction = <theta_u - theta_r, d> / ||d||^2``
instead: the part of the shift along ``d`` that ascent leaves). ``J`` is maximized by projected
Adam on each point's sphere, differentiating through the unrolled steps (``torch.func``). A larger
shift alone does not raise ``J``.

The crafted poisons and the Gaussian poisons they start from (same norms, same points) are then
each trained in and unlearned: by the unrolled ascent the objective saw, and by methods of
``influx.unlearn`` at equal budget it never saw. Reported per method and seed: the shift
``||d||``, the absolute remaining ``||theta_u - theta_r||``, the relative remaining (1 = as far as
before unlearning, 0 = the retrain) and the surviving fraction, with crafted - Gaussian paired by
seed.

    python examples/craft_unlearnable.py                              # digits + MLP, 8 seeds, CPU
    python examples/craft_unlearnable.py --dataset cifar10 --model cnn --device cuda --dtype float32

Writes ``examples/results/craft_unlearnable_<dataset>_<model>.{json,png}``.
"""

from __future__ import annotations

import argparse
import copy
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
from torch.func import functional_call, grad  # noqa: E402

from influx import data, models, shift, stats, train, unlearn  # noqa: E402
from influx.seeds import derive_seed  # noqa: E402

LOSS = train.cross_entropy_per_example
POISONS = ("gaussian", "crafted")
UNROLLED = "gradient_ascent (unrolled)"
QUANTITIES = ("shift_norm", "remaining", "relative_remaining", "surviving_fraction")


def parse_args() -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--retain", type=int, default=300)
    parser.add_argument("--poisons", type=int, default=30)
    parser.add_argument("--noise-std", type=float, default=0.5)
    parser.add_argument("--train-steps", type=int, default=60, help="unrolled full-batch GD steps")
    parser.add_argument("--train-lr", type=float, default=0.5)
    parser.add_argument("--ascent-steps", type=int, default=5, help="unrolled GA steps")
    parser.add_argument("--ascent-lr", type=float, default=0.05)
    parser.add_argument("--objective", default="relative", choices=("relative", "surviving"),
                        help="relative remaining distance, or surviving fraction along d")  # fmt: skip
    parser.add_argument("--craft-iterations", type=int, default=40)
    parser.add_argument("--craft-lr", type=float, default=0.05)
    parser.add_argument("--budget-fraction", type=float, default=0.1)
    parser.add_argument("--newton-damping", type=float, default=1.0)
    return parser.parse_args()


def project(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Each row of ``delta`` [k, ...] scaled to norm ``radius``."""
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (radius / norms).reshape(-1, *([1] * (delta.dim() - 1)))


def flat(params: dict) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


class Unrolled:
    """Full-batch GD on retain + poisons, then GA on the poisons, as functions of the parameters."""

    def __init__(self, model, retain, forget, args):
        self.model, self.args = model, args
        self.retain, self.forget = retain, forget
        self.theta0 = {n: p.detach() for n, p in model.named_parameters()}

    def loss(self, params, inputs, targets):
        return LOSS(functional_call(self.model, params, (inputs,)), targets).mean()

    def descend(self, params, inputs, targets, steps, lr, sign=1.0):
        for _ in range(steps):
            g = grad(self.loss)(params, inputs, targets)
            params = {n: p - sign * lr * g[n] for n, p in params.items()}
        return params

    def train(self, delta=None):
        inputs, targets = self.retain
        if delta is not None:
            inputs = torch.cat([inputs, self.forget[0] + delta])
            targets = torch.cat([targets, self.forget[1]])
        return self.descend(dict(self.theta0), inputs, targets, self.args.train_steps,
                            self.args.train_lr)  # fmt: skip

    def unlearn(self, params, delta):
        return self.descend(params, self.forget[0] + delta, self.forget[1],
                            self.args.ascent_steps, self.args.ascent_lr, sign=-1.0)  # fmt: skip


def objective(unrolled: Unrolled, reference: torch.Tensor, delta, kind: str) -> torch.Tensor:
    """J(delta): ``||theta_u - theta_r|| / ||d||`` (``"relative"``) or ``<theta_u - theta_r, d> /
    ||d||^2`` (``"surviving"``), d = theta_p - theta_r, theta_u after the unrolled ascent."""
    poisoned = unrolled.train(delta)
    remaining = flat(unrolled.unlearn(poisoned, delta)) - reference
    shift_vector = flat(poisoned) - reference
    if kind == "relative":
        return remaining.norm() / shift_vector.norm()
    return (remaining @ shift_vector) / (shift_vector @ shift_vector)


def craft(unrolled: Unrolled, reference: torch.Tensor, start, radius: float, args) -> tuple:
    """Projected Adam on J from ``start``; returns (crafted delta, J at each iteration)."""
    delta = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([delta], lr=args.craft_lr * radius)
    history = []
    for _ in range(args.craft_iterations):
        value = objective(unrolled, reference, delta, args.objective)
        optimizer.zero_grad()
        (-value).backward()
        optimizer.step()
        with torch.no_grad():
            delta.copy_(project(delta, radius))
        history.append(value.item())
    with torch.no_grad():
        history.append(objective(unrolled, reference, delta, args.objective).item())
    return delta.detach(), history


def as_model(init, params: dict) -> torch.nn.Module:
    model = copy.deepcopy(init)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    return model.eval()


def unlearners(args, n_forget: int, seed: int) -> dict:
    """name -> kwargs of the lab's methods (``None``: the unrolled ascent the crafting saw)."""
    method_seed = derive_seed(seed, 3)
    return {
        UNROLLED: None,
        "gradient_ascent": dict(lr=args.ascent_lr, batch_size=n_forget, seed=method_seed),
        "neggrad_plus": dict(lr=args.ascent_lr, batch_size=64, seed=method_seed),
        "fine_tune": dict(lr=args.train_lr, batch_size=64, seed=method_seed),
        "newton (no budget)": dict(damping=args.newton_damping, solver="cg"),
    }


def measure(reference, poisoned, unlearned) -> dict:
    """Shift, absolute and relative remaining distance, surviving fraction, cosine (Euclidean)."""
    d = shift.decompose(reference, poisoned, unlearned)
    return {
        "shift_norm": d.poison_norm,
        "remaining": d.remaining_distance,
        "relative_remaining": d.remaining_distance / d.poison_norm,
        "surviving_fraction": 1.0 - d.removed_fraction,
        "cosine": d.cosine if math.isfinite(d.cosine) else None,
    }


def evaluate_poison(delta, unrolled: Unrolled, reference_params, args, init, seed) -> dict:
    """Train the poisons in (same unrolled GD), then unlearn them with every unlearner."""
    poisoned_params = {n: p.detach() for n, p in unrolled.train(delta).items()}
    poisoned, reference = as_model(init, poisoned_params), as_model(init, reference_params)
    forget, retain = (unrolled.forget[0] + delta, unrolled.forget[1]), unrolled.retain
    n_train = retain[0].shape[0] + forget[0].shape[0]
    budget = math.floor(args.budget_fraction * args.train_steps * n_train)
    rows = {}
    for method, kwargs in unlearners(args, forget[0].shape[0], seed).items():
        if kwargs is None:
            unrolled_params = unrolled.unlearn(poisoned_params, delta)
            unlearned = as_model(init, {k: v.detach() for k, v in unrolled_params.items()})
        else:
            name = method.split(" ")[0]
            spend = math.inf if name == "newton" else budget
            unlearned = unlearn.METHODS[name](poisoned, LOSS, forget, retain, budget=spend,
                                              progress=False, **kwargs).model  # fmt: skip
        rows[method] = measure(reference, poisoned, unlearned)
    return rows


def split(inputs, targets, args, seed: int):
    """(retain, forget): a seeded random subset of ``--poisons`` points is the forget set."""
    generator = torch.Generator().manual_seed(derive_seed(seed, 1) % 2**63)
    order = torch.randperm(inputs.shape[0], generator=generator).to(inputs.device)
    forget, retain = order[: args.poisons], order[args.poisons :]
    return (inputs[retain], targets[retain]), (inputs[forget], targets[forget])


def run_seed(seed: int, args, dataset, inputs, targets) -> dict:
    timer = time.perf_counter()
    torch.manual_seed(derive_seed(seed, 0))
    init = models.build(args.model, dataset.input_shape, dataset.num_classes, width=args.width)
    init = init.to(args.device, getattr(torch, args.dtype))
    retain, forget = split(inputs, targets, args, seed)
    unrolled = Unrolled(init, retain, forget, args)
    reference_params = {n: p.detach() for n, p in unrolled.train().items()}
    radius = args.noise_std * math.sqrt(forget[0][0].numel())
    generator = torch.Generator().manual_seed(derive_seed(seed, 2) % 2**63)
    noise = torch.randn(forget[0].shape, generator=generator, dtype=torch.float64)
    gaussian = project(noise.to(forget[0]), radius)
    crafted, history = craft(unrolled, flat(reference_params), gaussian, radius, args)
    seconds = {"crafting": time.perf_counter() - timer}
    timer = time.perf_counter()
    poisons = {name: evaluate_poison(delta, unrolled, reference_params, args, init, seed)
               for name, delta in (("gaussian", gaussian), ("crafted", crafted))}  # fmt: skip
    seconds["evaluation"] = time.perf_counter() - timer
    return {"objective": {"start": history[0], "end": history[-1], "curve": history},
            "poisons": poisons, "seconds": seconds}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Summary, figure, report
# ------------------------------------------------------------------------------------------------


def values(records, poison: str, method: str, quantity: str) -> list:
    return [r["poisons"][poison][method][quantity] for r in records]


def paired(records) -> dict:
    """crafted - gaussian per seed, for each method and quantity."""
    methods = records[0]["poisons"]["crafted"]
    return {method: {q: stats.paired_difference(values(records, "crafted", method, q),
                                                values(records, "gaussian", method, q)).to_dict()
                     for q in QUANTITIES}
            for method in methods}  # fmt: skip


def verdicts(differences: dict) -> dict:
    """Per method, what the paired intervals allow: crafted vs Gaussian relative to the shift
    (relative remaining), then in absolute terms (remaining distance) and in shift size."""
    out = {}
    for method, d in differences.items():
        if d["relative_remaining"]["n"] < 2:
            out[method] = "one seed: no interval"
            continue
        words = [direction(d["relative_remaining"], "harder to undo relative to its shift",
                           "easier to undo relative to its shift",
                           "no difference resolved relative to the shift"),
                 direction(d["remaining"], "leaves more behind in absolute terms",
                           "leaves less behind in absolute terms",
                           "absolute remaining not resolved"),
                 direction(d["shift_norm"], "larger shift", "smaller shift",
                           "shift size not resolved")]  # fmt: skip
        out[method] = "crafted: " + "; ".join(words)
    return out


def direction(summary: dict, above: str, below: str, neither: str) -> str:
    """``above`` / ``below`` when the 95% interval of a paired difference excludes 0."""
    return above if summary["low"] > 0 else below if summary["high"] < 0 else neither


def forest(ax, rows, xlabel: str, title: str, lines=(), log: bool = False) -> None:
    """Rows of (label, per-seed values, colour, offset): mean, 95% CI and per-seed dots. ``log``:
    a log axis, the t interval's lower end clipped to half the smallest seed (the quantities are
    positive; GA's overshoot and the other methods differ by orders of magnitude)."""
    for x, style in lines:
        ax.axvline(x, **style)
    labels = []
    for label, vals, colour, y in rows:
        s = stats.summarize(vals)
        ax.scatter(vals, [y] * len(vals), s=16, color=colour, alpha=0.35, zorder=2)
        low = max(s.low, 0.5 * min(vals)) if log else s.low
        err = [[s.mean - low], [s.high - s.mean]] if s.n > 1 else None
        ax.errorbar(s.mean, y, xerr=err, fmt="o", color=colour, capsize=4, ms=7, lw=2, zorder=3)
        if label is not None:
            labels.append((round(y), label))
    ax.set_yticks([y for y, _ in labels], [lab for _, lab in labels], fontsize=10)
    ax.set_ylim(max(y for y, _ in labels) + 0.6, -0.6)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_title(title, fontsize=12)
    ax.grid(axis="x", alpha=0.3)


def legend(ax, entries, loc: str) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", lw=2, label=lab) for c, lab in entries]
    ax.legend(handles=handles, fontsize=10, loc=loc)


def poison_rows(records, quantity: str, shift_row: bool = False) -> list:
    """Gaussian and crafted rows per method; ``shift_row`` adds the no-unlearning row first
    (``||theta_p - theta_r||``, the absolute floor of undoing nothing)."""
    methods = list(records[0]["poisons"]["crafted"])
    rows = []
    if shift_row:
        first = methods[0]
        rows.append(("no unlearning: ||d||", values(records, "gaussian", first, "shift_norm"),
                     "tab:blue", -0.15))  # fmt: skip
        rows.append((None, values(records, "crafted", first, "shift_norm"), "tab:red", 0.15))
    start = len(rows) // 2
    for i, method in enumerate(methods, start):
        rows.append((method, values(records, "gaussian", method, quantity), "tab:blue", i - 0.15))
        rows.append((None, values(records, "crafted", method, quantity), "tab:red", i + 0.15))
    return rows


def plot(records, differences, path: Path, objective_name: str) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(16, 11))
    ax = axes[0, 0]
    curves = [r["objective"]["curve"] for r in records]
    for curve in curves:
        ax.plot(curve, color="tab:red", alpha=0.3, lw=1)
    mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]
    ax.plot(mean, color="tab:red", lw=2.5, label=f"mean over {len(curves)} seeds")
    ax.axhline(1.0, color="0.3", ls="--", label="no unlearning (relative remaining 1)")
    ax.set(xlabel="crafting iteration (0 = the Gaussian start)",
           title=f"crafting objective J ({objective_name}) after the unrolled ascent")  # fmt: skip
    ax.legend(fontsize=10)
    poison_legend = [("tab:blue", "Gaussian"), ("tab:red", "crafted (same norm, same points)")]
    forest(axes[0, 1], poison_rows(records, "relative_remaining"),
           "||theta_u - theta_r|| / ||theta_p - theta_r||  (retrain = 0)", "relative remaining",
           [(1.0, dict(color="0.3", ls="--"))], log=True)  # fmt: skip
    legend(axes[0, 1], [*poison_legend, ("0.3", "no unlearning (= 1)")], "lower right")
    forest(axes[1, 0], poison_rows(records, "remaining", shift_row=True),
           "||theta_u - theta_r||  (retrain = 0)", "absolute remaining", log=True)  # fmt: skip
    legend(axes[1, 0], poison_legend, "lower right")
    rows = []
    for i, method in enumerate(differences):
        for q, colour, off in (("relative_remaining", "tab:purple", -0.15),
                               ("surviving_fraction", "tab:orange", 0.15)):  # fmt: skip
            rows.append((method if off < 0 else None, differences[method][q]["values"], colour,
                         i + off))  # fmt: skip
    forest(axes[1, 1], rows, "crafted - Gaussian, paired by seed (symlog axis)",
           "paired differences", [(0.0, dict(color="0.3", ls="-"))])  # fmt: skip
    axes[1, 1].set_xscale("symlog", linthresh=0.1)
    axes[1, 1].set_ylim(len(differences) - 0.4, -1.7)  # room above the rows for the legend
    legend(axes[1, 1], [("tab:purple", "relative remaining"),
                        ("tab:orange", "surviving fraction <theta_u - theta_r, d> / ||d||^2")],
           "upper left")  # fmt: skip
    fig.suptitle("Crafted vs Gaussian poisons of the same norm: mean, 95% CI over seeds "
                 "(dots: seeds)", fontsize=14)  # fmt: skip
    save_figure(fig, path, dpi=100)


def fmt(s: dict) -> str:
    return f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def print_report(summary) -> None:
    print(f"objective {fmt(summary['per_seed']['objective']['start'])} -> "
          f"{fmt(summary['per_seed']['objective']['end'])}")  # fmt: skip
    for method, d in summary["crafted_minus_gaussian"].items():
        print(f"{method:28s} crafted - gaussian: shift {fmt(d['shift_norm'])}, remaining "
              f"{fmt(d['remaining'])}, relative {fmt(d['relative_remaining'])} "
              f"(p {d['relative_remaining'].get('p_value', math.nan):.3g}), surviving "
              f"{fmt(d['surviving_fraction'])}: {summary['verdict'][method]}")  # fmt: skip


def main() -> None:
    args = parse_args()
    limit_threads(args)
    started = time.perf_counter()
    dataset = data.load(args.dataset, root=args.data_dir, max_examples=args.retain + args.poisons)
    inputs, targets, _ = data.as_tensors(dataset)
    inputs, targets = inputs.to(args.device, getattr(torch, args.dtype)), targets.to(args.device)
    name = f"craft_unlearnable_{args.dataset}_{args.model}"
    results = Results(name, args)
    records = over_seeds(args, results, lambda s: run_seed(s, args, dataset, inputs, targets))
    differences = paired(records)
    summary = {"per_seed": stats.summarize_records(records),
               "crafted_minus_gaussian": differences, "verdict": verdicts(differences)}  # fmt: skip
    results["summary"] = summary
    results["phase_seconds"] = {"total": time.perf_counter() - started}
    results.write()
    stem = results_stem(name)
    plot(records, differences, stem.with_suffix(".png"), args.objective)
    print_report(summary)
    print(f"wrote {stem}.json/.png in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
