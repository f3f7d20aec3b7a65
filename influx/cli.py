"""``influx-score``: train a small model, then score every training example.

For each training example it writes the loss, the per-sample gradient norm and the margin
(true-class logit minus the largest other logit) to ``<out>/scores.csv`` and a ``summary.json``
beside it.

Scoring is resumable: the trained model (``model.pt``) and each finished chunk of scores
(``parts/chunk_NNNNN.npy``) are saved with a manifest (``parts/manifest.json``) that records the
configuration; a rerun with the same configuration loads the model and skips the finished chunks.

This module is the only place in influx that prints to the terminal or sets an exit status.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import influx
from influx import data as datasets
from influx import models
from influx.errors import InfluxError, InfluxValueError
from influx.grads import per_sample_norms
from influx.train import cross_entropy_per_example, evaluate, train

MODELS = ("mlp", "cnn", "resnet8", "resnet18")
# Per-dataset training defaults: the digits/MLP demo trains in a few seconds on 2 CPU cores.
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"epochs": 20, "lr": 1e-2, "batch_size": 64},
    "cifar10": {"epochs": 10, "lr": 1e-3, "batch_size": 128},
    "synthetic": {"epochs": 5, "lr": 1e-3, "batch_size": 128},
}
SCORE_COLUMNS = ("index", "target", "loss", "grad_norm", "margin")
# Examples per forward/backward while scoring: bounds memory for ResNet-18 on 32x32 inputs.
SCORE_BATCH_SIZE = 256
SCORE_DTYPE = np.dtype(
    [("index", "<i8"), ("target", "<i8"), ("loss", "<f8"), ("grad_norm", "<f8"), ("margin", "<f8")]
)
# Settings that do not change the scores, so a rerun that changes only them still resumes.
_NOT_FINGERPRINTED = ("out", "data_dir", "device", "progress", "threads")
_PARTS = "parts"
_MANIFEST = "manifest.json"
_MODEL_FILE = "model.pt"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influx-score",
        description="Train a small model, then write per-example loss, gradient norm and margin "
        "for every training example to <out>/scores.csv, with <out>/summary.json. "
        "Rerunning the same command resumes an interrupted run.",
    )
    parser.add_argument("--dataset", default="digits", choices=datasets.DATASETS)
    parser.add_argument("--model", default="mlp", choices=MODELS)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder holding cifar-10-batches-py (default: $INFLUX_DATA_DIR, else ./data)",
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: runs/<dataset>-<model>)"
    )
    per_dataset = lambda key: ", ".join(f"{k} {v[key]:g}" for k, v in TRAIN_DEFAULTS.items())
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"default per dataset: {per_dataset('epochs')}"
    )
    parser.add_argument(
        "--lr", type=float, default=None, help=f"Adam learning rate ({per_dataset('lr')})"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help=f"train batch ({per_dataset('batch_size')})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds initialization and shuffling")
    parser.add_argument("--width", type=int, default=None, help="cnn/resnet width")
    parser.add_argument(
        "--max-examples", type=int, default=None, help="use only the first N train/test examples"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=512, help="examples per saved chunk of scores"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: 1 for mlp, torch's default otherwise)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bars"
    )
    return parser


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The full configuration: command-line values with per-dataset defaults filled in."""
    config = dict(vars(args))
    for key, value in TRAIN_DEFAULTS[config["dataset"]].items():
        if config[key] is None:
            config[key] = value
    if config["out"] is None:
        config["out"] = str(Path("runs") / f"{config['dataset']}-{config['model']}")
    if config["device"] == "auto":
        config["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if config["threads"] is None and config["model"] == "mlp":
        # A 5k-parameter MLP step takes well under a millisecond: splitting it across threads
        # costs more in synchronization than it saves, and much more on a shared, busy machine.
        config["threads"] = 1
    for key in ("epochs", "batch_size", "chunk_size", "threads"):
        if config[key] is not None and config[key] < 1:
            raise InfluxValueError(f"--{key.replace('_', '-')} must be >= 1; got {config[key]}")
    return config


def build_model(name: str, input_shape: Sequence[int], num_classes: int, width: int | None = None):
    """The model ``name`` (one of MODELS) for inputs of ``input_shape`` (C, H, W)."""
    if name == "mlp" and width is not None:
        raise InfluxValueError(
            f"--width applies to the cnn and resnet models; got --width {width} with mlp"
        )
    if name not in MODELS:
        raise InfluxValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return models.build(name, input_shape, num_classes, width=width)


def fingerprint(config: dict[str, Any]) -> str:
    """A hash of the settings that determine the scores."""
    relevant = {k: v for k, v in sorted(config.items()) if k not in _NOT_FINGERPRINTED}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _write_atomic(path: Path, write) -> None:
    # Write beside the target, then rename: an interrupted run never leaves a half-written file.
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, content: dict) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(content, indent=2) + "\n"))


class ScoreRun:
    """The on-disk state of one scoring run in ``out``: model, manifest, chunk parts."""

    def __init__(self, out: Path, config: dict[str, Any], num_train: int):
        self.out = out
        self.parts = out / _PARTS
        self.config = config
        self.chunk_size = config["chunk_size"]
        self.num_chunks = math.ceil(num_train / self.chunk_size)
        self.num_train = num_train
        self.manifest: dict[str, Any] = {}

    @property
    def manifest_path(self) -> Path:
        return self.parts / _MANIFEST

    @property
    def model_path(self) -> Path:
        return self.out / _MODEL_FILE

    def chunk_path(self, chunk: int) -> Path:
        return self.parts / f"chunk_{chunk:05d}.npy"

    def load_previous(self) -> bool:
        """Adopt the manifest of an earlier run with the same configuration, if there is one."""
        if not self.manifest_path.is_file() or not self.model_path.is_file():
            return False
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if manifest.get("fingerprint") != fingerprint(self.config):
            return False
        self.manifest = manifest
        # A chunk counts as done only if its file is still there.
        self.manifest["completed"] = sorted(
            c for c in manifest.get("completed", []) if self.chunk_path(c).is_file()
        )
        return True

    def start_fresh(self, training: dict[str, Any]) -> None:
        """Forget any earlier run's parts and record the new training results."""
        self.parts.mkdir(parents=True, exist_ok=True)
        for stale in self.parts.glob("chunk_*.npy"):
            stale.unlink()
        self.manifest = {
            "fingerprint": fingerprint(self.config),
            "config": self.config,
            "num_examples": self.num_train,
            "chunk_size": self.chunk_size,
            "num_chunks": self.num_chunks,
            "training": training,
            "completed": [],
        }
        _write_json(self.manifest_path, self.manifest)

    def pending_chunks(self) -> list[int]:
        done = set(self.manifest["completed"])
        return [c for c in range(self.num_chunks) if c not in done]

    def save_chunk(self, chunk: int, scores: np.ndarray) -> None:
        def write(tmp: Path) -> None:
            # Through a handle: np.save would append ".npy" to the temporary name.
            with open(tmp, "wb") as handle:
                np.save(handle, scores)

        _write_atomic(self.chunk_path(chunk), write)
        self.manifest["completed"] = sorted({*self.manifest["completed"], chunk})
        _write_json(self.manifest_path, self.manifest)

    def assemble(self) -> np.ndarray:
        return np.concatenate([np.load(self.chunk_path(c)) for c in range(self.num_chunks)])


def margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """True-class logit minus the largest other logit: logits [N, C], targets [N] -> [N]."""
    true_logit = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return true_logit - others.max(dim=1).values


def score_batch(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Loss, per-sample gradient norm and margin of each example: each [B].

    One forward pass: the loss function handed to the engine keeps the logits it is called with.
    """
    seen: list[torch.Tensor] = []

    def loss_keeping_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append(logits.detach())
        return cross_entropy_per_example(logits, targets)

    grad_norms = per_sample_norms(model, loss_keeping_logits, inputs, targets)
    logits = torch.cat(seen)
    losses = cross_entropy_per_example(logits, targets)
    return {"loss": losses, "grad_norm": grad_norms, "margin": margins(logits, targets)}


def score_chunk(
    model: nn.Module, train_set, positions: torch.Tensor, batch_size: int, device: torch.device
) -> np.ndarray:
    """Scores of the training examples at ``positions`` [M] as a structured array [M]."""
    rows = []
    for inputs, targets, indices in datasets.iter_ordered_batches(train_set, positions, batch_size):
        values = score_batch(model, inputs.to(device), targets.to(device))
        batch = np.empty(len(indices), dtype=SCORE_DTYPE)
        batch["index"] = indices.numpy()
        batch["target"] = targets.numpy()
        for column, value in values.items():
            batch[column] = value.detach().double().cpu().numpy()
        rows.append(batch)
    return np.concatenate(rows)


def write_csv(path: Path, scores: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as handle:
            handle.write(",".join(SCORE_COLUMNS) + "\n")
            # 9 significant digits round-trip float32 values exactly.
            for row in scores:
                handle.write(
                    f"{row['index']},{row['target']},{row['loss']:.9g},"
                    f"{row['grad_norm']:.9g},{row['margin']:.9g}\n"
                )

    _write_atomic(path, write)


def _versions() -> dict[str, str]:
    return {
        "influx": influx.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _train_model(model: nn.Module, train_set, test_set, config: dict[str, Any]) -> dict[str, Any]:
    result = train(
        model,
        train_set,
        lr=config["lr"],
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        seed=config["seed"],
        device=config["device"],
        progress=config["progress"],
    )
    test_loss, test_accuracy = evaluate(model, test_set, device=config["device"])
    return {
        "train_loss": result.final_loss,
        "train_accuracy": result.final_accuracy,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "steps": result.steps,
        "train_seconds": result.seconds,
    }


def _load_data(config: dict[str, Any]):
    # The data stay fixed across --seed values: the seed varies initialization and order only.
    common = {"root": config["data_dir"], "max_examples": config["max_examples"]}
    train_set = datasets.load(config["dataset"], split="train", **common)
    test_set = datasets.load(config["dataset"], split="test", **common)
    return train_set, test_set


def run(config: dict[str, Any], say=lambda message: None) -> dict[str, Any]:
    """Train (or reload) the model, score every chunk not yet scored, write CSV + summary.

    Returns the summary. ``say`` receives one-line progress messages.
    """
    start = time.perf_counter()
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(config["device"])
    train_set, test_set = _load_data(config)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config["seed"])
        model = build_model(
            config["model"], train_set.input_shape, train_set.num_classes, config["width"]
        )
    model.to(device)
    state = ScoreRun(out, config, len(train_set))
    if state.load_previous():
        model.load_state_dict(torch.load(state.model_path, map_location=device))
        say(f"resuming in {out}: {len(state.manifest['completed'])}/{state.num_chunks} chunks done")
    else:
        training = _train_model(model, train_set, test_set, config)
        torch.save(model.state_dict(), state.model_path)
        state.start_fresh(training)
        say(
            f"trained {config['model']} on {config['dataset']}: train accuracy "
            f"{training['train_accuracy']:.4f}, test accuracy {training['test_accuracy']:.4f}"
        )
    resumed_chunks = len(state.manifest["completed"])

    score_start = time.perf_counter()
    model.eval()
    pending = state.pending_chunks()
    bar = tqdm(total=len(pending), desc="score", unit="chunk", disable=not config["progress"])
    for chunk in pending:
        positions = torch.arange(
            chunk * state.chunk_size, min((chunk + 1) * state.chunk_size, len(train_set))
        )
        state.save_chunk(chunk, score_chunk(model, train_set, positions, SCORE_BATCH_SIZE, device))
        bar.update(1)
    bar.close()
    score_seconds = time.perf_counter() - score_start

    scores = state.assemble()
    write_csv(out / "scores.csv", scores)
    summary = _summary(config, state, train_set, test_set, model, scores)
    summary["resumed_chunks"] = resumed_chunks
    summary["timing"] = {
        "train_seconds": state.manifest["training"]["train_seconds"],
        "score_seconds": score_seconds,
        "total_seconds": time.perf_counter() - start,
    }
    _write_json(out / "summary.json", summary)
    return summary


def _summary(config, state: ScoreRun, train_set, test_set, model, scores) -> dict[str, Any]:
    training = state.manifest["training"]
    return {
        "dataset": config["dataset"],
        "model": config["model"],
        "sizes": {
            "train": len(train_set),
            "test": len(test_set),
            "input_shape": list(train_set.input_shape),
            "num_classes": train_set.num_classes,
            "num_parameters": sum(p.numel() for p in model.parameters()),
        },
        "accuracy": {"train": training["train_accuracy"], "test": training["test_accuracy"]},
        "loss": {"train": training["train_loss"], "test": training["test_loss"]},
        "scores": {
            column: {"mean": float(scores[column].mean()), "max": float(scores[column].max())}
            for column in ("loss", "grad_norm", "margin")
        },
        "steps": training["steps"],
        "num_chunks": state.num_chunks,
        "device": config["device"],
        "versions": _versions(),
        "config": config,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``influx-score``; returns the exit status (0 ok, 2 error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    say = lambda message: print(message, file=sys.stderr)
    threads = torch.get_num_threads()
    try:
        config = resolve_config(args)
        if config["threads"] is not None:
            torch.set_num_threads(config["threads"])
        summary = run(config, say=say)
    except InfluxError as error:
        print(f"influx-score: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("influx-score: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)
    out = Path(config["out"])
    print(
        f"wrote {out / 'scores.csv'} ({summary['sizes']['train']} examples) and "
        f"{out / 'summary.json'}: train accuracy {summary['accuracy']['train']:.4f}, "
        f"test accuracy {summary['accuracy']['test']:.4f}, "
        f"{summary['timing']['total_seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
