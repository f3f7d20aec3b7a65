"""Gradient ascent does not reverse gradient descent (examples/README.md).

Descend on some examples, then ascend on the same examples, and measure how far the parameters
land from where they started: for one point, one batch and the whole dataset, ascending in the
same order and in reversed order. Linear regression is checked against its closed form
``theta_2 - theta_0 = -lr^2 (theta_0.x - y) ||x||^2 x``; for the network, the per-point residual
is set against the point's loss, gradient norm and top Hessian eigenvalue.

    python examples/ga_vs_gd.py                                   # digits + MLP, ~1 min on CPU
    python examples/ga_vs_gd.py --dataset cifar10 --model resnet18 --device cuda --dtype float32

Writes ``examples/results/ga_vs_gd_<dataset>_<model>.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import _setup  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402
from torch.func import grad, vmap  # noqa: E402

from influx import commutator, curvature, grads, train  # noqa: E402

LOSS = train.cross_entropy_per_example


def parse_args() -> argparse.Namespace:
    parser = _setup.example_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=512, help="training examples used")
    parser.add_argument("--points", type=int, default=256, help="points for the per-point study")
    parser.add_argument("--pretrain-epochs", type=int, default=5, help="Adam epochs before")
    parser.add_argument("--pretrain-lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate of GD and GA")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--power-iters", type=int, default=20, help="for the top eigenvalue")
    return parser.parse_args()


def build(args: argparse.Namespace):
    """Pretrained model and (inputs, targets) of ``--examples`` training examples."""
    dataset, inputs, targets = _setup.load_examples(args, args.examples)
    model = _setup.seeded_model(args.model, dataset, args)
    # A briefly trained model gives points a spread of losses (at init they are all about log C).
    _setup.pretrain(
        model, (inputs, targets), args, lr=args.pretrain_lr, epochs=args.pretrain_epochs
    )
    return model, inputs, targets


def linear_regression_check(lr: float, seed: int) -> dict:
    """Measured per-point residuals of a linear regression vs the closed form."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 10, generator=generator, dtype=torch.float64) / math.sqrt(10)
    y = torch.randn(200, generator=generator, dtype=torch.float64)
    model = torch.nn.Linear(10, 1, bias=False).double()
    loss = lambda out, target: 0.5 * (out.squeeze(-1) - target) ** 2  # noqa: E731
    result = commutator.ascent_residual(model, loss, (x, y), lr=lr, mode="point")
    theta = model.weight.detach().reshape(-1)
    closed_form = lr**2 * (x @ theta - y).abs() * (x * x).sum(1) * x.norm(dim=1)
    error = ((result.residual - closed_form).abs().max() / closed_form.abs().max()).item()
    return {
        "lr": lr,
        "measured": result.residual.tolist(),
        "closed_form": closed_form.tolist(),
        "max_relative_error": error,
    }


def mode_comparison(model, inputs, targets, args) -> list[dict]:
    """Residual / displacement for one point, one batch, the whole dataset; both orders."""
    rows = []
    setups = {
        "one point": dict(batches=(inputs[:1], targets[:1]), batch_size=1),
        "one batch": dict(
            batches=(inputs[: args.batch_size], targets[: args.batch_size]),
            batch_size=args.batch_size,
        ),  # fmt: skip
        "dataset (SGD)": dict(batches=(inputs, targets), batch_size=args.batch_size),
        "dataset (full batch)": dict(batches=(inputs, targets), batch_size=None),
    }
    for label, setup in setups.items():
        for order in ("same", "reversed"):
            result = commutator.ascent_residual(
                model,
                LOSS,
                setup["batches"],
                lr=args.lr,
                batch_size=setup["batch_size"],
                order=order,
            )
            rows.append({
                "setting": label, "order": order,
                "residual": result.residual.item(), "displacement": result.displacement.item(),
                "relative": result.relative.item(),
            })  # fmt: skip
    return rows


def top_hessian_eigenvalues(model, inputs, targets, iters: int) -> torch.Tensor:
    """[N] largest-magnitude Hessian eigenvalue of each point's loss: vmapped power iteration."""
    space = curvature.ParamSpace.of(model)
    theta = space.current(model)

    def point_hvp(x, y, v):
        objective, _ = curvature.batch_objective(model, LOSS, (x[None], y[None]))
        return curvature.jvp(grad(objective), (theta,), (v,))[1]

    batched_hvp = vmap(point_hvp, chunk_size=64)
    vectors = torch.randn(inputs.shape[0], space.size, dtype=theta.dtype, device=theta.device)
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    for _ in range(iters):
        products = batched_hvp(inputs, targets, vectors)
        vectors = products / products.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (vectors * batched_hvp(inputs, targets, vectors)).sum(1)


def per_point_study(model, inputs, targets, args) -> dict:
    inputs, targets = inputs[: args.points], targets[: args.points]
    result = commutator.ascent_residual(model, LOSS, (inputs, targets), lr=args.lr, mode="point")
    with torch.no_grad():
        losses = LOSS(model(inputs), targets)
    space = curvature.ParamSpace.of(model)
    grad_norms = space.flatten(grads.per_sample_grads(model, LOSS, inputs, targets)).norm(dim=1)
    eigenvalues = top_hessian_eigenvalues(model, inputs, targets, args.power_iters)
    features = {"loss": losses, "grad_norm": grad_norms, "hessian_norm": eigenvalues.abs()}
    correlations = {
        name: stats.spearmanr(values.cpu(), result.residual.cpu()).statistic
        for name, values in features.items()
    }
    return {
        "residual": result.residual.tolist(),
        "relative": result.relative.tolist(),
        **{name: values.tolist() for name, values in features.items()},
        "spearman_with_residual": correlations,
    }


def plot(linear: dict, modes: list[dict], points: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    ax = axes[0]
    ax.loglog(linear["closed_form"], linear["measured"], ".", ms=3)
    lims = [min(linear["closed_form"]), max(linear["closed_form"])]
    ax.loglog(lims, lims, "k--", lw=0.8)
    ax.set(xlabel="closed form", ylabel="measured ||theta_2 - theta_0||",
           title=f"linear regression, max rel err {linear['max_relative_error']:.1e}")  # fmt: skip
    ax = axes[1]
    labels = [f"{r['setting']}\n{r['order']}" for r in modes]
    ax.bar(range(len(modes)), [r["relative"] for r in modes],
           color=["C0" if r["order"] == "same" else "C1" for r in modes])  # fmt: skip
    ax.set_xticks(range(len(modes)), labels, rotation=60, fontsize=7)
    ax.set(yscale="log", ylabel="residual / descent displacement", title="GD then GA")
    for ax, name in zip(axes[2:], ("loss", "grad_norm", "hessian_norm"), strict=True):
        ax.plot(points[name], points["residual"], ".", ms=3)
        ax.set(xscale="linear" if name == "loss" else "log", yscale="log")
        rho = points["spearman_with_residual"][name]
        ax.set(xlabel=name, ylabel="per-point residual", title=f"Spearman rho = {rho:.2f}")
    _setup.save_figure(fig, path)


def main() -> None:
    args = parse_args()
    _setup.limit_threads(args)
    model, inputs, targets = build(args)
    linear = linear_regression_check(args.lr, args.seed)
    modes = mode_comparison(model, inputs, targets, args)
    points = per_point_study(model, inputs, targets, args)
    stem = _setup.results_stem(f"ga_vs_gd_{args.dataset}_{args.model}")
    summary = {"config": vars(args), "linear_regression": linear, "modes": modes, "points": points}
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    plot(linear, modes, points, stem.with_suffix(".png"))
    print(
        f"linear regression: max relative error vs closed form {linear['max_relative_error']:.2e}"
    )
    for row in modes:
        print(f"{row['setting']:>22} {row['order']:>8}: residual {row['residual']:.3e}, "
              f"relative {row['relative']:.3e}")  # fmt: skip
    print(
        "Spearman(residual, .):",
        {k: round(v, 3) for k, v in points["spearman_with_residual"].items()},
    )


if __name__ == "__main__":
    main()
