"""Setup shared by the example scripts: the common command-line flags, data on the requested
device and dtype, seeded models, and a brief Adam pretraining so that examples start from a model
with a spread of losses."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from influx import data, models, train

RESULTS = Path(__file__).parent / "results"


def example_parser(
    description: str, *, width: int = 32, dtype: str = "float64", model: bool = True
) -> argparse.ArgumentParser:
    """A parser holding the flags every example takes: ``--dataset --model --width --data-dir
    --device --dtype --seed`` (digits + MLP on the CPU by default; ``model=False`` leaves out
    ``--model`` for a script that takes several); scripts add their own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dataset", default="digits", help="digits | cifar10 | synthetic")
    if model:
        parser.add_argument("--model", default="mlp", help="mlp | cnn | resnet8 | resnet18")
    parser.add_argument("--width", type=int, default=width, help="hidden width / channels")
    parser.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=dtype, help="float64 | float32")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def results_stem(name: str) -> Path:
    """``examples/results/<name>`` (the folder created): add ``.json`` / ``.png``."""
    RESULTS.mkdir(exist_ok=True)
    return RESULTS / name


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Lay out, write and close a matplotlib figure (the scripts have chosen the backend)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def limit_threads(args: argparse.Namespace) -> None:
    """Two CPU threads for a run on the CPU (the default sizes gain nothing from more)."""
    if args.device == "cpu":
        torch.set_num_threads(2)


def load_examples(args: argparse.Namespace, count: int):
    """(dataset, inputs, targets): the first ``count`` examples of ``--dataset`` as tensors."""
    dataset = data.load(args.dataset, root=args.data_dir, max_examples=count)
    inputs, targets, _ = data.as_tensors(dataset)
    return dataset, inputs.to(args.device, getattr(torch, args.dtype)), targets.to(args.device)


def seeded_model(name: str, dataset, args: argparse.Namespace) -> torch.nn.Module:
    """``models.build(name)`` for ``dataset``, initialized from ``--seed``."""
    torch.manual_seed(args.seed)
    model = models.build(name, dataset.input_shape, dataset.num_classes, width=args.width)
    return model.to(args.device, getattr(torch, args.dtype))


def pretrain(model, batch, args: argparse.Namespace, *, lr: float, epochs: int) -> torch.nn.Module:
    """Adam on ``batch`` (inputs, targets) in minibatches of 64; returns the model in eval mode."""
    train.train(model, batch, lr=lr, epochs=epochs, batch_size=64, seed=args.seed, progress=False)
    return model.eval()
