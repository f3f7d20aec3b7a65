"""Can poisons be crafted that gradient-ascent unlearning cannot remove?

Input perturbations ``delta_z`` of a fixed norm (that of Gaussian noise of std sigma,
``sigma sqrt(d)`` per point) are optimized to maximize what gradient-ascent unlearning leaves
behind: the distance ``||theta_u - theta_r||`` between the unlearned model and the reference
(trained without the poisons), after ``--train-steps`` full-batch GD steps on retain + poisons and
``--ascent-steps`` GA steps on the poisons, differentiating through the unrolled steps with
``torch.func`` (projected Adam on the sphere of each point). The crafted poisons and Gaussian
poisons of the same norms are then each trained in and unlearned by the lab's methods
(``influx.unlearn``) at equal budget; ``influx.shift`` measures how much of each shift is removed.

    python examples/craft_unlearnable.py                              # digits + MLP, ~2 min on CPU
    python examples/craft_unlearnable.py --dataset cifar10 --model cnn --device cuda --dtype float32

Writes ``examples/results/craft_unlearnable_<dataset>_<model>.{json,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from _setup import example_parser, results_stem, seeded_model  # noqa: E402
from torch.func import functional_call, grad  # noqa: E402

from influx import data, shift, train, unlearn  # noqa: E402

LOSS = train.cross_entropy_per_example


def parse_args() -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--retain", type=int, default=300)
    parser.add_argument("--poisons", type=int, default=30)
    parser.add_argument("--noise-std", type=float, default=0.5)
    parser.add_argument("--train-steps", type=int, default=60, help="unrolled full-batch GD steps")
    parser.add_argument("--train-lr", type=float, default=0.5)
    parser.add_argument("--ascent-steps", type=int, default=5, help="unrolled GA steps")
    parser.add_argument("--ascent-lr", type=float, default=0.05)
    parser.add_argument("--craft-iterations", type=int, default=40)
    parser.add_argument("--craft-lr", type=float, default=0.05)
    parser.add_argument("--budget-fraction", type=float, default=0.1)
    parser.add_argument("--newton-damping", type=float, default=1.0)
    return parser.parse_args()


def project(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Each row of ``delta`` [k, ...] scaled to norm ``radius``."""
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (radius / norms).reshape(-1, *([1] * (delta.dim() - 1)))


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


def flat(params: dict) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def craft(unrolled: Unrolled, reference: torch.Tensor, radius: float, args) -> tuple:
    generator = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    shape = unrolled.forget[0].shape
    start = torch.randn(shape, generator=generator, dtype=torch.float64, device="cpu")
    delta = project(start.to(unrolled.forget[0]), radius).requires_grad_(True)
    optimizer = torch.optim.Adam([delta], lr=args.craft_lr * radius)
    history = []
    for _ in range(args.craft_iterations):
        left = (flat(unrolled.unlearn(unrolled.train(delta), delta)) - reference).norm()
        optimizer.zero_grad()
        (-left).backward()
        optimizer.step()
        with torch.no_grad():
            delta.copy_(project(delta, radius))
        history.append(left.item())
    return delta.detach(), history


def evaluate_poison(name, delta, unrolled, reference_params, args, init):
    """Train the poisons in (same unrolled GD), then unlearn with the lab's methods."""
    poisoned_params = {n: p.detach() for n, p in unrolled.train(delta).items()}
    poisoned, reference = copy.deepcopy(init), copy.deepcopy(init)
    for model, params in ((poisoned, poisoned_params), (reference, reference_params)):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n])
    forget = (unrolled.forget[0] + delta, unrolled.forget[1])
    retain = unrolled.retain
    n_train = retain[0].shape[0] + forget[0].shape[0]
    budget = math.floor(args.budget_fraction * args.train_steps * n_train)
    rows = {}
    for method, kwargs in (
        ("gradient_ascent (unrolled)", None),
        ("gradient_ascent", dict(lr=args.ascent_lr, batch_size=forget[0].shape[0])),
        ("neggrad_plus", dict(lr=args.ascent_lr, batch_size=64)),
        ("fine_tune", dict(lr=args.train_lr, batch_size=64)),
        ("newton", dict(damping=args.newton_damping, solver="cg")),
    ):
        if kwargs is None:
            unlearned = flat(
                {k: v.detach() for k, v in unrolled.unlearn(poisoned_params, delta).items()}
            )
        else:
            fn = unlearn.METHODS[method]
            b = math.inf if method == "newton" else budget
            unlearned = fn(poisoned, LOSS, forget, retain, budget=b, progress=False, **kwargs).model
        d = shift.decompose(reference, poisoned, unlearned)
        rows[method] = {
            "removed_fraction": d.removed_fraction,
            "cosine": d.cosine,
            "orthogonal_norm": d.orthogonal_norm,
            "remaining_distance": d.remaining_distance,
            "remaining_over_shift": d.remaining_distance / d.poison_norm,
            "poison_norm": d.poison_norm,
        }
    return rows


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    dataset = data.load(args.dataset, root=args.data_dir, max_examples=args.retain + args.poisons)
    inputs, targets, _ = data.as_tensors(dataset)
    inputs, targets = inputs.to(args.device, getattr(torch, args.dtype)), targets.to(args.device)
    init = seeded_model(args.model, dataset, args)
    retain = (inputs[: args.retain], targets[: args.retain])
    forget = (inputs[args.retain :], targets[args.retain :])
    unrolled = Unrolled(init, retain, forget, args)
    reference_params = {n: p.detach() for n, p in unrolled.train().items()}
    reference = flat(reference_params)
    radius = args.noise_std * math.sqrt(forget[0][0].numel())
    crafted, history = craft(unrolled, reference, radius, args)
    generator = torch.Generator(device="cpu").manual_seed(args.seed + 2)
    gaussian = torch.randn(forget[0].shape, generator=generator, dtype=torch.float64, device="cpu")
    gaussian = project(gaussian.to(forget[0]), radius)
    results = {name: evaluate_poison(name, delta, unrolled, reference_params, args, init)
               for name, delta in (("gaussian", gaussian), ("crafted", crafted))}  # fmt: skip
    out = {"config": vars(args), "radius": radius, "craft_objective": history,
           "seconds": time.perf_counter() - started, "results": results}  # fmt: skip
    stem = results_stem(f"craft_unlearnable_{args.dataset}_{args.model}")
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1, default=float))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot(history)
    axes[0].set(title="||theta_u - theta_r|| while crafting", xlabel="iteration")
    methods = list(results["gaussian"])
    for ax, key in zip(axes[1:], ("removed_fraction", "remaining_over_shift")):
        for i, name in enumerate(results):
            ax.bar([j + 0.4 * i for j in range(len(methods))],
                   [results[name][m][key] for m in methods], width=0.4, label=name)  # fmt: skip
        ax.set_xticks([j + 0.2 for j in range(len(methods))], methods, rotation=30, fontsize=7)
        ax.set_title(key)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    for name, rows in results.items():
        for method, r in rows.items():
            print(  # the script's own report
                f"{name:9s} {method:27s} shift {r['poison_norm']:.4f} removed "
                f"{r['removed_fraction']:+.3f} cos {r['cosine']:+.3f} left/shift "
                f"{r['remaining_over_shift']:.3f}"
            )
    print(f"craft objective {history[0]:.4f} -> {history[-1]:.4f}; wrote {stem}.json/.png "
          f"in {out['seconds']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
