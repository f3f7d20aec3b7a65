"""The command line of ``influx-score``: the parser, and the settings it resolves to.

Every setting is checked here, before any data is read or anything is written.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from influx import data as datasets
from influx import distributed
from influx.cli.checkpoints import MODELS, TRAIN_DEFAULTS
from influx.cli.scoring import SCORES
from influx.errors import InfluxValueError

DEFAULT_SCORES = ("loss", "margin", "grad_norm", "self_influence:ekfac", "tracin")
DEFAULT_SELF_INFLUENCE = "ekfac"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influx-score",
        description="Score every training example (loss, margin, gradient norm, self-influence, "
        "TracIn, ...) and write <out>/scores.parquet, scores.csv, report.md and summary.json. "
        "Rerunning the same command resumes an interrupted run; under torchrun the examples are "
        "sharded across the ranks.",
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
    parser.add_argument(
        "--scores",
        default="default",
        help="comma-separated scores: " + ", ".join(SCORES) + "; self_influence:METHOD picks an "
        "influx.influence method; 'default' = " + ",".join(DEFAULT_SCORES),
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="score this trained model instead of training one: a state dict in safetensors, or "
        "a torch.save'd state dict (read with weights_only=True)",
    )
    parser.add_argument(
        "--poison",
        default=None,
        help="gaussian:FRACTION:STD poisons that fraction of the training inputs with "
        "N(0, STD^2) noise before training (seeded by --seed); enables the gus score",
    )
    parser.add_argument(
        "--flip-labels",
        type=float,
        default=None,
        metavar="FRACTION",
        help="give that fraction of the training labels another random class before training "
        "(seeded by --seed); the scores table marks them in its 'flipped' column",
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
        "--chunk-size", type=int, default=512, help="examples per saved shard of scores"
    )
    parser.add_argument("--top-k", type=int, default=10, help="examples per score in the report")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: 1 for mlp, torch's default otherwise). float32 "
        "training rounds differently with other thread counts, and torchrun gives each rank 1: "
        "pass --threads to get the same numbers with and without torchrun",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of other settings found in --out (or a damaged store) "
        "instead of refusing",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bars"
    )
    return parser


def _check_positive(config: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if config[key] is not None and config[key] < 1:
            raise InfluxValueError(f"--{key.replace('_', '-')} must be >= 1; got {config[key]}")


def resolve_device(text: str, context: distributed.Context) -> str:
    """``--device`` as a torch device string; CUDA is checked to exist."""
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise InfluxValueError(
            f"--device {text!r} is not a device; use cpu, cuda or cuda:N"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise InfluxValueError(f"--device {text!r}: influx-score runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InfluxValueError(
                f"--device {text}: CUDA is not available on this machine (torch "
                f"{torch.__version__}, {torch.cuda.device_count()} GPUs visible); use "
                "--device cpu, or leave --device auto"
            )
        if context.world_size > 1:
            # One GPU per torchrun rank.
            return f"cuda:{context.local_rank}"
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InfluxValueError(
                f"--device {text}: only {torch.cuda.device_count()} GPUs are visible"
            )
    return str(device)


def _check_kernel_backend() -> None:
    # INFLUX_KERNELS is read lazily by the kernels; check it now, before any expensive work.
    from influx.kernels._dispatch import forced_backend

    forced_backend()


def _check_out(out: str) -> Path:
    if not out.strip():
        raise InfluxValueError(
            "--out is empty; give the folder to write to (default: runs/<dataset>-<model>)"
        )
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise InfluxValueError(f"--out {path} is an existing file, not a folder; choose a folder")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise InfluxValueError(f"--out {path}: {parent} is a file, not a folder")
    return path


def parse_poison(text: str | None) -> dict[str, Any] | None:
    """``gaussian:FRACTION:STD`` -> {"kind", "fraction", "std"}; None stays None."""
    if text is None:
        return None
    parts = text.split(":")
    usage = "--poison takes gaussian:FRACTION:STD, e.g. gaussian:0.02:0.1"
    if len(parts) != 3 or parts[0] != "gaussian":
        raise InfluxValueError(f"{usage}; got {text!r}")
    try:
        fraction, std = float(parts[1]), float(parts[2])
    except ValueError:
        raise InfluxValueError(f"{usage}; got {text!r}") from None
    if not 0 < fraction <= 1:
        raise InfluxValueError(f"--poison fraction must be in (0, 1]; got {fraction:g}")
    if not (math.isfinite(std) and std > 0):
        raise InfluxValueError(f"--poison noise std must be a finite number > 0; got {std:g}")
    return {"kind": "gaussian", "fraction": fraction, "std": std}


def _check_flip_labels(fraction: float | None) -> None:
    if fraction is not None and not 0 < fraction <= 1:
        raise InfluxValueError(
            f"--flip-labels takes the fraction of training labels to flip, in (0, 1]; got "
            f"{fraction:g} (e.g. --flip-labels 0.1)"
        )


@dataclass(frozen=True)
class ScoreSpec:
    """One requested score: its canonical ``name``, the ``group`` that computes it (one shard
    per chunk and group), the ``columns`` it writes and its influence ``method``, if any."""

    name: str
    group: str
    columns: tuple[str, ...]
    method: str | None = None


def parse_scores(text: str, *, checkpoint: bool, poison: bool) -> list[ScoreSpec]:
    """``--scores`` as a list of :class:`ScoreSpec`, in the order given, duplicates dropped."""
    from influx.influence import METHODS

    methods = tuple(m for m in METHODS if m != "tracin")
    requested: list[str] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if token == "default":
            requested += [
                s for s in DEFAULT_SCORES if not (checkpoint and s == "tracin")
            ]  # with --checkpoint there are no training checkpoints for TracIn
        else:
            requested.append(token)
    if not requested:
        raise InfluxValueError("--scores is empty; name at least one of " + ", ".join(SCORES))
    specs: list[ScoreSpec] = []
    for token in requested:
        name, _, method = token.partition(":")
        if name not in SCORES:
            raise InfluxValueError(
                f"unknown score {token!r} in --scores; choose from {', '.join(SCORES)} "
                f"(self_influence:METHOD with METHOD one of {', '.join(methods)})"
            )
        if method and name != "self_influence":
            raise InfluxValueError(f"--scores {token}: only self_influence takes a :METHOD")
        if name == "self_influence":
            method = method or DEFAULT_SELF_INFLUENCE
            if method not in methods:
                raise InfluxValueError(
                    f"--scores {token}: unknown influence method {method!r}; choose one of "
                    f"{', '.join(methods)} (TracIn is its own score: tracin)"
                )
            column = f"self_influence_{method}"
            spec = ScoreSpec(f"{name}:{method}", column, (column,), method)
            if spec not in specs:
                specs.append(spec)
            continue
        if name == "tracin" and checkpoint:
            raise InfluxValueError(
                "--scores tracin needs the training checkpoints, which --checkpoint does not "
                "have; drop --checkpoint to train here, or choose other --scores"
            )
        if name == "gus" and not poison:
            raise InfluxValueError(
                "--scores gus needs Gaussian poisons: add --poison gaussian:FRACTION:STD"
            )
        group = "basic" if name in ("loss", "margin", "grad_norm") else name
        spec = ScoreSpec(name, group, SCORES[name].columns)
        if spec not in specs:
            specs.append(spec)
    if any(s.name == "gus" for s in specs) is False and poison:
        specs.append(ScoreSpec("gus", "gus", SCORES["gus"].columns))
    return specs


def resolve_config(args: argparse.Namespace, context: distributed.Context) -> dict[str, Any]:
    """The full configuration: command-line values checked, per-dataset defaults filled in."""
    config = dict(vars(args))
    for key, value in TRAIN_DEFAULTS[config["dataset"]].items():
        if config[key] is None:
            config[key] = value
    if config["out"] is None:
        config["out"] = str(Path("runs") / f"{config['dataset']}-{config['model']}")
    _check_out(config["out"])
    _check_positive(config, "epochs", "batch_size", "chunk_size", "threads", "top_k")
    _check_positive(config, "max_examples", "width")
    from influx.report import MAX_TOP_K  # checked now, not after the scoring

    if config["top_k"] is not None and config["top_k"] > MAX_TOP_K:
        raise InfluxValueError(f"--top-k must be at most {MAX_TOP_K}; got {config['top_k']}")
    if not (math.isfinite(config["lr"]) and config["lr"] > 0):
        default = TRAIN_DEFAULTS[config["dataset"]]["lr"]
        raise InfluxValueError(
            f"--lr must be a finite number > 0; got {config['lr']}. The {config['dataset']} "
            f"default is {default:g}"
        )
    if config["model"] == "mlp" and config["width"] is not None:
        raise InfluxValueError(
            f"--width applies to the cnn and resnet models; got --width {config['width']} with mlp"
        )
    _check_flip_labels(config["flip_labels"])
    config["device"] = resolve_device(config["device"], context)
    if config["threads"] is None and config["model"] == "mlp":
        # A 5k-parameter MLP step takes well under a millisecond: splitting it across threads
        # costs more in synchronization than it saves, and much more on a shared, busy machine.
        config["threads"] = 1
    poison = parse_poison(config["poison"])
    config["poison"] = poison
    if config["checkpoint"] is not None:
        config["checkpoint"] = str(Path(config["checkpoint"]).expanduser())
        if not Path(config["checkpoint"]).is_file():
            raise InfluxValueError(
                f"--checkpoint {config['checkpoint']} does not exist or is not a file"
            )
    specs = parse_scores(
        config["scores"], checkpoint=config["checkpoint"] is not None, poison=poison is not None
    )
    config["scores"] = [s.name for s in specs]
    _check_kernel_backend()
    return config
