"""Setup shared by the example scripts: the common command-line flags, data on the requested
device and dtype, seeded models, and a brief Adam pretraining so that examples start from a model
with a spread of losses."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from influx import data, models, provenance, train
from influx.seeds import derive_seed

# INFLUX_RESULTS_DIR redirects the outputs (the smoke tests write to a temporary folder).
RESULTS = Path(os.environ.get("INFLUX_RESULTS_DIR", Path(__file__).parent / "results"))
# Unlearning settings at the shared budget for a script that reads gaussian_poisoning's tuned
# ``chosen_settings`` and finds none: SGD rates set by hand to keep the digits MLP's test accuracy.
FALLBACK_UNLEARN_SETTINGS: dict[str, dict] = {
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


def example_parser(
    description: str, *, width: int = 32, dtype: str = "float64", model: bool = True
) -> argparse.ArgumentParser:
    """A parser holding the flags every example takes: ``--dataset --model --width --data-dir
    --device --dtype --seed`` (digits + MLP on the CPU by default; ``model=False`` leaves out
    ``--model`` for a script that takes several); scripts add their own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dataset", default="digits", help="digits | mnist | cifar10 | synthetic")
    if model:
        parser.add_argument("--model", default="mlp", help="mlp | cnn | resnet8 | resnet18")
    parser.add_argument("--width", type=int, default=width, help="hidden width / channels")
    parser.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=dtype, help="float64 | float32")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="first seed of the run")
    parser.add_argument("--seeds", type=int, default=8,
                        help="independent seeds (seed, seed + 1, ...); each one changes the "
                        "poison subset, the noise, the initialization and the batch order")  # fmt: skip
    return parser


def tuned_unlearning(args: argparse.Namespace) -> tuple[dict | None, Path]:
    """gaussian_poisoning's result for ``--dataset`` and ``--model`` when it holds non-empty
    ``chosen_settings`` (None when the file is absent, unreadable or holds none), and its path.
    The caller decides whether the result's ``config`` fits its own setup."""
    path = RESULTS / f"gaussian_poisoning_{args.dataset}_{args.model}.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, path
    chosen = stored.get("chosen_settings")
    return (stored if isinstance(chosen, dict) and chosen else None), path


def seed_list(args: argparse.Namespace) -> list[int]:
    """The seeds of a run: ``--seed`` and the ``--seeds - 1`` that follow it."""
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {args.seeds}")
    return list(range(args.seed, args.seed + args.seeds))


class Results:
    """The JSON result of an example: ``config``, ``seeds``, ``provenance``, ``per_seed`` and
    whatever the script adds, written after every seed so that a stopped run keeps what it
    finished.

    ``--resume``-free by design: a seed's result is a pure function of (code, config, seed), so a
    rerun recomputes it; :meth:`done` lets a script skip seeds that a previous run of the *same*
    config and commit already wrote (``results.done(seed)`` before the work).
    """

    def __init__(self, name: str, args: argparse.Namespace):
        self.path = results_stem(name).with_suffix(".json")
        self.provenance = provenance.capture()
        self.data: dict = {"config": dict(vars(args)),
                           "seeds": seed_list(args), "per_seed": {}}  # fmt: skip
        previous = self._previous()
        if previous is not None:
            self.data["per_seed"] = previous

    def _previous(self) -> dict | None:
        """Per-seed results of an interrupted run of the same config at the same clean commit."""
        if not self.path.exists():
            return None
        try:
            old = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        same = (old.get("config") == json.loads(json.dumps(self.data["config"], default=str))
                and old.get("provenance", {}).get("git_sha") == self.provenance["git_sha"]
                and old.get("provenance", {}).get("dirty") is False
                and self.provenance["dirty"] is False)  # fmt: skip
        return old.get("per_seed") if same else None

    def done(self, seed: int) -> dict | None:
        """Seed ``seed``'s stored result, if a previous run of this config wrote it."""
        return self.data["per_seed"].get(str(seed))

    def add_seed(self, seed: int, record: dict) -> None:
        self.data["per_seed"][str(seed)] = record
        self.write()

    def records(self) -> list[dict]:
        """Per-seed records in seed order (those written so far)."""
        return [self.data["per_seed"][str(s)] for s in self.data["seeds"]
                if str(s) in self.data["per_seed"]]  # fmt: skip

    def __setitem__(self, key: str, value) -> None:
        self.data[key] = value

    def __getitem__(self, key: str):
        return self.data[key]

    def write(self) -> None:
        out = {"provenance": provenance.finish(self.provenance), **self.data}
        text = json.dumps(out, indent=1, default=_jsonable, allow_nan=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(self.path)


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def over_seeds(args: argparse.Namespace, results: Results,
               run_seed: Callable[[int], dict]) -> list[dict]:  # fmt: skip
    """``run_seed(seed)`` for every seed of the run (skipping those already stored), writing the
    JSON after each; returns the per-seed records in seed order."""
    for seed in seed_list(args):
        if results.done(seed) is not None:
            print(f"seed {seed}: stored", flush=True)
            continue
        results.add_seed(seed, run_seed(seed))
        print(f"seed {seed}: done", flush=True)
    return results.records()


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
    """``--threads`` CPU threads for a run on the CPU (1 by default: the default models are small
    enough that a second thread only adds synchronization, and two examples can then run side by
    side on a 2-core machine; an oversubscribed machine makes multi-threaded runs crawl)."""
    if args.device == "cpu":
        torch.set_num_threads(args.threads)


def for_seed(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    """``args`` with ``seed`` in place of ``--seed`` (the model init and batch order read it)."""
    return argparse.Namespace(**{**vars(args), "seed": seed})


def seeded_subset(args: argparse.Namespace, count: int):
    """(dataset, inputs, targets): ``count`` training examples drawn at random by ``args.seed``."""
    dataset = data.load(args.dataset, root=args.data_dir)
    inputs, targets, _ = data.as_tensors(dataset)
    generator = torch.Generator().manual_seed(derive_seed(args.seed, 1))
    chosen = torch.randperm(targets.numel(), generator=generator)[:count]
    dtype = getattr(torch, args.dtype)
    return dataset, inputs[chosen].to(args.device, dtype), targets[chosen].to(args.device)


def load_train_test(args: argparse.Namespace):
    """(train dataset, train (x, y), test (x, y)): the first ``--train-size`` training examples
    and the whole test split, as tensors on ``--device`` in ``--dtype``."""
    dtype = getattr(torch, args.dtype)
    train_set = data.load(args.dataset, root=args.data_dir, max_examples=args.train_size)
    test_set = data.load(args.dataset, root=args.data_dir, split="test")
    x, y, _ = data.as_tensors(train_set)
    xt, yt, _ = data.as_tensors(test_set)
    return train_set, (x.to(args.device, dtype), y.to(args.device)), (
        xt.to(args.device, dtype), yt.to(args.device))  # fmt: skip


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
