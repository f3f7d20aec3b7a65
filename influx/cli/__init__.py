"""``influx-score``: score every training example of a dataset, resumably, on one or many processes.

    influx-score                                            # digits / MLP: about a minute on a laptop
    influx-score --dataset cifar10 --model resnet18 --data-dir ~/data --device cuda
    torchrun --nproc-per-node 8 -m influx.cli --dataset cifar10 --model resnet18 --device cuda

It trains the model (recording the batch order, the seeds and checkpoints for TracIn), or reads
one with ``--checkpoint``, then computes the scores named by ``--scores`` for every training
example (see :data:`SCORES`) and writes to ``--out``:

    scores.parquet    one row per example: index, target, then one column per score
    scores.csv        the same table, for runs of at most CSV_MAX_ROWS examples
    report.md         histograms with tail fits, top-k image grids, Spearman correlations,
                      per-class breakdowns (PNG figures under report/)
    summary.json      configuration, versions, device, timings, per-score statistics; written
                      last, so a folder with summary.json holds a finished run
    store/            the resumable state: model, training record and score shards with their
                      sha256 checksums (influx.store)

Resuming. Each score is computed chunk by chunk (``--chunk-size`` examples) into its own shard.
Run again with the same arguments after a kill (SIGINT, SIGTERM, SIGKILL, a full disk), it
continues from the shards on disk; the final files equal those of an uninterrupted run, byte for
byte (summary.json differs only in its timings). A damaged shard or model file is named and
recomputed. Other arguments into the same folder are refused (``--overwrite`` starts over): the
run's fingerprint covers every setting that changes a score and the data's identity (name, size,
sha256 of its content).

torchrun. Chunk ``c`` is scored by rank ``c % world_size`` (gloo on the CPU, NCCL on CUDA);
rank 0 trains the model while the others wait, and merges the shards when all are done. Every
shard is computed the same way whichever rank computes it, so the merge equals the
single-process run exactly.

This module is the only place in influx that prints to the terminal or sets an exit status:
every influx error becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import grad, vmap
from tqdm.auto import tqdm

import influx
from influx import curvature, distributed, models, store
from influx import data as datasets
from influx.errors import InfluxError, InfluxRuntimeError, InfluxValueError
from influx.grads import per_sample_norms, projection
from influx.train import cross_entropy_per_example, evaluate, train

MODELS = ("mlp", "cnn", "resnet8", "resnet18")
# Per-dataset training defaults: the digits/MLP demo trains in a few seconds on 2 CPU cores.
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"epochs": 20, "lr": 1e-2, "batch_size": 64},
    "cifar10": {"epochs": 10, "lr": 1e-3, "batch_size": 128},
    "synthetic": {"epochs": 5, "lr": 1e-3, "batch_size": 128},
}
# Examples per forward/backward while scoring: bounds memory for ResNet-18 on 32x32 inputs.
SCORE_BATCH_SIZE = 256
# scores.csv is written beside scores.parquet up to this many rows (a few MB).
CSV_MAX_ROWS = 100_000
# TracIn sums over the ends of this many evenly spaced epochs (fewer if training is shorter).
TRACIN_CHECKPOINTS = 5
# The commutator statistic brackets each example with one seeded reference batch of this size.
COMMUTATOR_REFERENCE = 32
# Per-example [B, P] buffers of the commutator statistic stay under this many floats.
COMMUTATOR_FLOATS = 1 << 25
# Bumped whenever the stored layout or a score's definition changes: old stores are refused.
STORE_FORMAT = 3  # 3: projection matrices drawn in float32 (self_influence:trak changed)

# Requestable scores: name -> (columns it writes, what it is).
SCORES: dict[str, tuple[tuple[str, ...], str]] = {
    "loss": (("loss",), "cross-entropy of the trained model (eval mode)"),
    "margin": (("margin",), "true-class logit minus the largest other logit"),
    "grad_norm": (("grad_norm",), "per-sample gradient norm ||grad l(z)|| (influx.grads)"),
    "self_influence": (
        ("self_influence_{method}",),
        "s(z) = grad l(z)^T (H + damping I)^-1 grad l(z) by influx.influence (:method, default "
        "ekfac)",
    ),
    "tracin": (("tracin",), "TracIn self-influence sum_t eta_t ||grad l(w_t, z)||^2"),
    "commutator": (
        ("commutator",),
        f"||H_z g_R - H_R g_z||: the step bracket of z with a seeded reference batch R of "
        f"{COMMUTATOR_REFERENCE} training examples (influx.commutator.bracket)",
    ),
    "memorization": (
        ("mem_confidence", "mem_cumulative_loss", "mem_curvature"),
        "influx.memorization proxies over the checkpoints: confidence, cumulative loss, "
        "input-loss curvature",
    ),
    "gus": (
        ("poisoned", "gus_iz"),
        "Gaussian-poison per-point statistic I_z (poisoned points; needs --poison)",
    ),
    "unlearnable": (
        ("unlearnable",),
        "influx.unlearnable.rank score: weighted mean rank of memorization, self-influence, "
        "out-of-distribution, entanglement and ascent-residual components (high = resists "
        "unlearning)",
    ),
}
DEFAULT_SCORES = ("loss", "margin", "grad_norm", "self_influence:ekfac", "tracin")
DEFAULT_SELF_INFLUENCE = "ekfac"
# Scores computed once over the whole training set (rank 0) rather than chunk by chunk.
_GLOBAL_GROUPS = ("unlearnable",)
_DONE_FILES = ("summary.json",)
_OUTPUT_FILES = ("scores.parquet", "scores.csv", "report.md", "summary.json")
_STORE = "store"
_MODEL_FILE = "model.safetensors"
_TRAINING_FILE = "training.safetensors"


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that cleanup runs as for Ctrl-C."""


# ------------------------------------------------------------------------------------------------
# Command line and configuration
# ------------------------------------------------------------------------------------------------


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
        help="replace the results of other settings found in --out instead of refusing",
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
        spec = ScoreSpec(name, group, SCORES[name][0])
        if spec not in specs:
            specs.append(spec)
    if any(s.name == "gus" for s in specs) is False and poison:
        specs.append(ScoreSpec("gus", "gus", SCORES["gus"][0]))
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


def build_model(name: str, input_shape: Sequence[int], num_classes: int, width: int | None = None):
    """The model ``name`` (one of MODELS) for inputs of ``input_shape`` (C, H, W)."""
    if name == "mlp" and width is not None:
        raise InfluxValueError(
            f"--width applies to the cnn and resnet models; got --width {width} with mlp"
        )
    if name not in MODELS:
        raise InfluxValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return models.build(name, input_shape, num_classes, width=width)


# ------------------------------------------------------------------------------------------------
# Data identity and the run's fingerprint
# ------------------------------------------------------------------------------------------------


def _hash_tensor(digest, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.numpy().tobytes())


def data_identity(dataset) -> dict[str, Any]:
    """Name, split, size and a sha256 of the content (inputs and targets) of ``dataset``."""
    digest = hashlib.sha256()
    n = len(dataset)
    _hash_tensor(digest, dataset.targets[:n])
    if isinstance(dataset, datasets.Cifar10Dataset):
        _hash_tensor(digest, dataset.images[:n])
    elif isinstance(dataset, datasets.TensorClassificationDataset):
        _hash_tensor(digest, dataset.inputs[:n])
    elif isinstance(dataset, datasets.SyntheticDataset):
        # Items are generated from these: hashing them identifies every item.
        _hash_tensor(digest, dataset.prototypes)
        digest.update(f"{dataset.noise!r}/{dataset.item_seed}".encode())
    else:
        for inputs, _, _ in datasets.iter_batches(dataset, 1024):
            _hash_tensor(digest, inputs)
    return {
        "name": getattr(dataset, "name", type(dataset).__name__),
        "split": getattr(dataset, "split", None),
        "size": n,
        "sha256": digest.hexdigest(),
    }


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Settings that do not change the scores, so a rerun that changes only them still resumes (the
# device but for TRAK's projection: see run_identity).
_NOT_FINGERPRINTED = ("out", "data_dir", "device", "progress", "threads", "overwrite", "top_k")


def run_identity(config: dict[str, Any], train_set, test_set) -> dict[str, Any]:
    """Everything that determines the scores: settings, data identity, checkpoint content."""
    identity = {k: v for k, v in sorted(config.items()) if k not in _NOT_FINGERPRINTED}
    identity["format"] = STORE_FORMAT
    if "self_influence:trak" in config["scores"]:
        # dense projections of CUDA gradients are drawn on the GPU (influx.grads.projection), so
        # TRAK's scores depend on the kind of device
        on_gpu = projection.DENSE_DRAWS_ON_GPU and config["device"].startswith("cuda")
        identity["projection_drawn_on"] = "cuda" if on_gpu else "cpu"
    identity["train_data"] = data_identity(train_set)
    identity["test_data"] = data_identity(test_set)
    if config["checkpoint"] is not None:
        identity["checkpoint"] = {
            "path": config["checkpoint"],
            "sha256": _file_sha256(Path(config["checkpoint"])),
        }
    return identity


def fingerprint(identity: dict[str, Any]) -> str:
    """A hash of :func:`run_identity`."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Model files: --checkpoint, and the trained model and training record in the store
# ------------------------------------------------------------------------------------------------


def _looks_like_safetensors(raw: bytes) -> bool:
    # An 8-byte little-endian header length, then a JSON header.
    if len(raw) < 10:
        return False
    size = int.from_bytes(raw[:8], "little")
    return 0 < size <= len(raw) - 8 and raw[8:9] == b"{"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``torch.save`` file (``weights_only=True``).

    Never unpickles arbitrary objects: ``torch.load`` runs with ``weights_only=True``, which
    refuses anything but tensors and plain containers. A ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper is unwrapped.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    path = Path(path)
    if not path.is_file():
        raise InfluxValueError(f"--checkpoint {path} does not exist or is not a file")
    raw = path.read_bytes()
    advice = (
        "influx-score reads a model state dict saved with safetensors.torch.save_file(model."
        "state_dict(), path) or torch.save(model.state_dict(), path)"
    )
    if _looks_like_safetensors(raw):
        try:
            state = load_safetensors(raw)
        except (SafetensorError, ValueError, RuntimeError) as error:
            raise InfluxValueError(
                f"--checkpoint {path} is a damaged safetensors file ({error}); {advice}"
            ) from None
    else:
        try:
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001  arbitrary bytes fail anywhere in the unpickler
            # (UnpicklingError, EOFError, but also IndexError or KeyError on random input)
            first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            raise InfluxValueError(
                f"--checkpoint {path} is neither a safetensors file nor a torch.save file that "
                f"loads with weights_only=True ({type(error).__name__}: {first_line}); {advice}"
            ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InfluxValueError(
            f"--checkpoint {path} holds a {type(state).__name__}, not a state dict of tensors; "
            + advice
        )
    return state


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly; mismatches and non-finite weights are errors."""
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    wrong = [
        f"{name} {tuple(value.shape)} (model {shapes[name]})"
        for name, value in state.items()
        if name in shapes and tuple(value.shape) != shapes[name]
    ]
    if wrong:
        raise InfluxValueError(
            f"{source} does not fit this --model: shapes differ for {wrong[:4]}; pass the --model, "
            "--width and dataset it was trained with"
        )
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InfluxValueError(
            f"{source} does not fit this --model: missing {result.missing_keys[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}; pass the --model and --width it was "
            "trained with"
        )
    bad = [name for name, value in state.items() if not torch.isfinite(value).all()]
    if bad:
        raise InfluxValueError(f"{source} holds NaN/inf weights in {bad[:4]}; it diverged")


def _state_bytes(state: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return save(tensors, metadata={"influx": json.dumps(metadata or {}, sort_keys=True)})


def _load_state_bytes(raw: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and influx metadata of a file written by :func:`_state_bytes`."""
    from safetensors.torch import load

    state = load(raw)
    # The header is an 8-byte little-endian length, then JSON holding the metadata.
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    metadata = json.loads(header.get("__metadata__", {}).get("influx", "{}"))
    return state, metadata


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def tracin_steps(num_train: int, batch_size: int, epochs: int) -> list[int]:
    """Steps at the ends of up to TRACIN_CHECKPOINTS evenly spaced epochs (the last included)."""
    per_epoch = math.ceil(num_train / batch_size)
    count = min(TRACIN_CHECKPOINTS, epochs)
    chosen = sorted({round(epochs * (k + 1) / count) for k in range(count)})
    return [epoch * per_epoch for epoch in chosen]


def train_and_record(
    model: nn.Module, train_set, test_set, config: dict[str, Any]
) -> tuple[bytes, bytes, dict[str, Any]]:
    """Train ``model``; return the model file, the training record file and the metrics.

    The record (safetensors) holds each epoch's order of dataset indices (``order.E``), the
    per-step losses and learning rates, and the TracIn checkpoints (``checkpoint.K.<param>``);
    its metadata lists the epoch seeds and each checkpoint's step and learning rate.
    """
    steps = tracin_steps(len(train_set), config["batch_size"], config["epochs"])
    result = train(
        model,
        train_set,
        lr=config["lr"],
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        seed=config["seed"],
        checkpoints=steps,
        device=config["device"],
        progress=config["progress"],
    )
    if not math.isfinite(result.final_loss):
        default = TRAIN_DEFAULTS[config["dataset"]]["lr"]
        raise InfluxRuntimeError(
            f"training diverged: the final train loss is {result.final_loss} with --lr "
            f"{config['lr']:g}; lower --lr (the {config['dataset']} default is {default:g})"
        )
    test_loss, test_accuracy = evaluate(model, test_set, device=config["device"])
    metrics = {
        "train_loss": result.final_loss,
        "train_accuracy": result.final_accuracy,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "steps": result.steps,
        "train_seconds": result.seconds,
    }
    record: dict[str, torch.Tensor] = {"losses": result.losses, "lrs": result.lrs}
    for epoch, order in enumerate(result.epoch_orders):
        record[f"order.{epoch}"] = order
    for k, checkpoint in enumerate(result.checkpoints):
        for name, value in checkpoint.state_dict.items():
            record[f"checkpoint.{k}.{name}"] = value
    meta = {
        "epoch_seeds": result.epoch_seeds,
        "checkpoints": [{"step": c.step, "epoch": c.epoch, "lr": c.lr} for c in result.checkpoints],
        "metrics": {k: v for k, v in metrics.items() if k != "train_seconds"},
    }
    return _state_bytes(model.state_dict()), _state_bytes(record, meta), metrics


def checkpoints_of(record: dict[str, torch.Tensor], meta: dict[str, Any]) -> list[tuple]:
    """[(state_dict, lr)] of the TracIn checkpoints in a training record."""
    found = []
    for k, checkpoint in enumerate(meta.get("checkpoints", [])):
        prefix = f"checkpoint.{k}."
        state = {n[len(prefix) :]: v for n, v in record.items() if n.startswith(prefix)}
        found.append((state, float(checkpoint["lr"])))
    return found


# ------------------------------------------------------------------------------------------------
# Scores of a chunk of examples
# ------------------------------------------------------------------------------------------------


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


def commutator_norms(
    model: nn.Module,
    loss_fn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    reference: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """``||H_i g_R - H_R g_i||`` for each example i [B]: the bracket of one SGD step on example i
    with one on the reference batch R (mean loss), as ``influx.commutator.bracket`` defines it.

    The commutator of the two steps is ``lr^2`` times this vector plus O(lr^3): a large value
    means training on z before or after a typical batch leads to different parameters. Each
    example's ``(g_i, H_i g_R)`` comes from one jvp of its own gradient along g_R, vmapped over
    the examples; ``H_R g_i`` [B, P] from a vmapped Hessian-vector product.
    """
    objective, space = curvature.batch_objective(model, loss_fn, reference)
    theta = space.current(model)
    g_reference = grad(objective)(theta)

    def example_loss(t: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        single, _ = curvature.batch_objective(model, loss_fn, (x[None], y[None]))
        return single(t)

    example_grad = grad(example_loss)

    def gradient_and_product(x: torch.Tensor, y: torch.Tensor):
        # The vmap wraps the jvp: a jvp of vmapped gradients is wrong through LayerNorm in torch
        # (see influx.commutator._pair_bracket_norms).
        return curvature.jvp(lambda t: example_grad(t, x, y), (theta,), (g_reference,))

    gradients, h_i_g_reference = vmap(gradient_and_product)(inputs, targets)
    h_reference_g_i = vmap(lambda v: curvature.jvp(grad(objective), (theta,), (v,))[1])(gradients)
    return (h_i_g_reference - h_reference_g_i).norm(dim=1)


class Scorer:
    """Computes each score group on a chunk of training positions.

    Holds what the groups share and builds it on first use: the fitted influence estimators,
    the TracIn checkpoint models, the commutator reference batch, the poison.
    """

    def __init__(self, model, train_set, config, checkpoints, poison=None):
        self.model = model
        self.train_set = train_set
        self.config = config
        self.device = torch.device(config["device"])
        self.checkpoints = checkpoints
        self.poison = poison
        self.loss_fn = cross_entropy_per_example
        self._fitted: dict[str, Any] = {}
        self._checkpoint_models: list[tuple[nn.Module, float]] | None = None
        self._reference: tuple[torch.Tensor, torch.Tensor] | None = None

    def _chunk_tensors(self, positions: torch.Tensor):
        inputs, targets, indices = [], [], []
        for x, y, i in datasets.iter_ordered_batches(self.train_set, positions, SCORE_BATCH_SIZE):
            inputs.append(x)
            targets.append(y)
            indices.append(i)
        return (
            torch.cat(inputs).to(self.device),
            torch.cat(targets).to(self.device),
            torch.cat(indices),
        )

    def _seeded(self):
        # Randomness inside a score (sampled labels, projections) is drawn from the run's seed.
        fork = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        return fork

    def fitted(self, method: str):
        if method not in self._fitted:
            from influx import influence

            everything = torch.arange(len(self.train_set), device="cpu")
            inputs, targets, _ = self._chunk_tensors(everything)
            with self._seeded():
                torch.manual_seed(self.config["seed"])
                self._fitted[method] = influence.fit(
                    self.model, self.loss_fn, (inputs, targets), method=method
                )
        return self._fitted[method]

    def checkpoint_models(self) -> list[tuple[nn.Module, float]]:
        if self._checkpoint_models is None:
            self._checkpoint_models = []
            for state, lr in self.checkpoints:
                at = build_model(
                    self.config["model"],
                    self.train_set.input_shape,
                    self.train_set.num_classes,
                    self.config["width"],
                )
                at.load_state_dict(state)
                self._checkpoint_models.append((at.to(self.device).eval(), lr))
        return self._checkpoint_models

    def reference_positions(self) -> torch.Tensor:
        """The commutator's reference batch [R], sorted, fixed by the seed (known without any
        shard being computed, so a resumed run reports it too)."""
        n = len(self.train_set)
        generator = torch.Generator(device="cpu").manual_seed(self.config["seed"])
        return (
            torch.randperm(n, generator=generator, device="cpu")[:COMMUTATOR_REFERENCE]
            .sort()
            .values
        )

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._reference is None:
            inputs, targets, _ = self._chunk_tensors(self.reference_positions())
            self._reference = (inputs, targets)
        return self._reference

    def compute(self, group: str, positions: torch.Tensor) -> dict[str, np.ndarray]:
        """Columns of score ``group`` for the examples at ``positions`` [M]: name -> [M]."""
        inputs, targets, _ = self._chunk_tensors(positions)
        values: dict[str, torch.Tensor]
        if group == "basic":
            parts = [
                score_batch(self.model, x, y)
                for x, y in zip(inputs.split(SCORE_BATCH_SIZE), targets.split(SCORE_BATCH_SIZE))
            ]
            values = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        elif group.startswith("self_influence_"):
            method = group[len("self_influence_") :]
            with self._seeded():
                torch.manual_seed(self.config["seed"])
                values = {group: self.fitted(method).self_influence((inputs, targets))}
        elif group == "tracin":
            total = torch.zeros(inputs.shape[0], dtype=torch.float64, device=self.device)
            for at, lr in self.checkpoint_models():
                for start in range(0, inputs.shape[0], SCORE_BATCH_SIZE):
                    x = inputs[start : start + SCORE_BATCH_SIZE]
                    y = targets[start : start + SCORE_BATCH_SIZE]
                    norms = per_sample_norms(at, self.loss_fn, x, y).double()
                    total[start : start + x.shape[0]] += lr * norms.square()
            values = {"tracin": total}
        elif group == "commutator":
            reference = self.reference()
            num_params = sum(p.numel() for p in self.model.parameters())
            step = max(1, min(SCORE_BATCH_SIZE, COMMUTATOR_FLOATS // max(1, num_params)))
            values = {
                "commutator": torch.cat(
                    [
                        commutator_norms(self.model, self.loss_fn, x, y, reference)
                        for x, y in zip(inputs.split(step), targets.split(step))
                    ]
                )
            }
        elif group == "memorization":
            values = self._memorization(inputs, targets, int(positions[0]))
        elif group == "gus":
            values = self._gus(inputs, targets, positions)
        else:
            raise InfluxValueError(f"unknown score group {group!r}")
        return {k: v.detach().double().cpu().numpy() for k, v in values.items()}

    def _memorization(self, inputs, targets, start: int) -> dict[str, torch.Tensor]:
        memorization = _lab_module("memorization", "memorization")
        states = [state for state, _ in self.checkpoints] or [self.model.state_dict()]
        record = memorization.record(self.model, self.loss_fn, (inputs, targets), states)
        # Probes seeded per chunk: a rerun (or another rank) draws the same vectors.
        input_curvature = memorization.curvature(
            self.model, self.loss_fn, (inputs, targets), checkpoints=states,
            seed=self.config["seed"] * 1_000_003 + start,
        )  # fmt: skip
        return {
            "mem_confidence": memorization.confidence(record),
            "mem_cumulative_loss": memorization.cumulative_loss(record),
            "mem_curvature": input_curvature,
        }

    def _gus(self, inputs, targets, positions) -> dict[str, torch.Tensor]:
        """Per-point I_z of the poisoned examples in the chunk (influx.audit.gus); NaN elsewhere."""
        gus = _lab_module("audit.gus", "gus")
        poison = self.poison
        mask = poison.mask.cpu()[positions]
        # Rows of the poisoned examples in this chunk, in the poison's own order.
        row_of = {int(p): r for r, p in enumerate(poison.dataset.positions.tolist())}
        rows = [row_of[int(p)] for p in positions[mask].tolist()]
        values = torch.full((positions.shape[0],), float("nan"), dtype=torch.float64, device="cpu")
        if rows:
            chosen = torch.tensor(rows, dtype=torch.long, device="cpu")
            result = gus.gus(
                self.model,
                self.loss_fn,
                poison.base_inputs.cpu()[chosen].to(self.device),
                poison.targets.cpu()[chosen].to(self.device),
                poison.noise.cpu()[chosen].to(self.device),
                poison.noise_std,
            )
            values[mask] = result.scores.detach().double().cpu()
        return {"poisoned": mask.double(), "gus_iz": values}

    def unlearnable(self) -> np.ndarray:
        """influx.unlearnable's combined rank score of every training example [N]."""
        unlearnable = _lab_module("unlearnable", "unlearnable")
        everything = torch.arange(len(self.train_set), device="cpu")
        inputs, targets, _ = self._chunk_tensors(everything)
        with self._seeded():
            torch.manual_seed(self.config["seed"])
            ranking = unlearnable.rank(self.model, self.loss_fn, (inputs, targets))
        return ranking.score.detach().double().cpu().numpy()


def _lab_module(module: str, score: str):
    """``influx.<module>``, or a clear error naming the score that needs it."""
    import importlib

    try:
        return importlib.import_module(f"influx.{module}")
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("influx"):
            raise InfluxValueError(
                f"--scores {score} needs influx.{module}, which this installation of influx "
                "does not have; choose other --scores"
            ) from None
        raise


# Columns that are defined only for some examples (NaN elsewhere, by design).
_PARTIAL_COLUMNS = ("gus_iz",)


def check_finite(group: str, columns: dict[str, np.ndarray], indices: np.ndarray, config) -> None:
    """Raise naming the examples whose scores are NaN/inf (training or a fit diverged)."""
    for name, values in columns.items():
        if name in _PARTIAL_COLUMNS:
            continue
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            shown = ", ".join(str(int(i)) for i in indices[bad[:8]])
            raise InfluxRuntimeError(
                f"score {name} is NaN/inf for {bad.size} of {values.size} examples (indices "
                f"{shown}{', ...' if bad.size > 8 else ''}): the model or the {group} computation "
                f"diverged; lower --lr (now {config['lr']:g}) or --epochs, or drop {name} from "
                "--scores"
            )


def shard_dtype(columns: Sequence[str]) -> np.dtype:
    return np.dtype([("index", "<i8")] + [(c, "<f8") for c in columns])


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What to compute: groups with their columns, chunk boundaries, shard names."""

    specs: list[ScoreSpec]
    num_examples: int
    chunk_size: int

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        found: dict[str, tuple[str, ...]] = {}
        for spec in self.specs:
            found[spec.group] = (
                ("loss", "grad_norm", "margin") if spec.group == "basic" else spec.columns
            )
        return found

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_examples / self.chunk_size)

    def positions(self, chunk: int) -> torch.Tensor:
        start = chunk * self.chunk_size
        stop = min(start + self.chunk_size, self.num_examples)
        return torch.arange(start, stop, device="cpu")

    @staticmethod
    def shard(group: str, chunk: int) -> str:
        return f"{group}-{chunk:05d}.npy"

    @property
    def columns(self) -> list[str]:
        """Output score columns in the order requested."""
        out: list[str] = []
        for spec in self.specs:
            out += [c for c in spec.columns if c not in out]
        return out


def _read_shard(shards: store.ShardStore, plan: Plan, group: str, chunk: int) -> np.ndarray | None:
    """A verified shard: checksum (by the store), dtype and the expected example indices."""
    name = plan.shard(group, chunk)
    array = shards.read(name)
    if array is None:
        return None
    expected = plan.positions(chunk).numpy()
    if array.dtype != shard_dtype(plan.groups[group]):
        shards.reject(name, f"it holds columns {array.dtype.names}, not this score's")
        return None
    if array.shape != expected.shape or not np.array_equal(array["index"], expected):
        shards.reject(name, f"it holds examples other than {expected[0]}..{expected[-1]}")
        return None
    return array


class Job:
    """One rank's part of a run: its config, data, store and model."""

    def __init__(self, config: dict[str, Any], context: distributed.Context, say):
        self.config = config
        self.context = context
        self.say = say if context.is_main else (lambda message: None)
        self.out = Path(config["out"]).expanduser()
        self.device = torch.device(config["device"])
        self.timings: dict[str, float] = {}

    def _time(self, key: str, started: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - started

    def load_data(self) -> None:
        started = time.perf_counter()
        common = {"root": self.config["data_dir"], "max_examples": self.config["max_examples"]}
        self.clean_train = datasets.load(self.config["dataset"], split="train", **common)
        self.test_set = datasets.load(self.config["dataset"], split="test", **common)
        self.poison = None
        self.train_set = self.clean_train
        if self.config["poison"] is not None:
            poison_module = _lab_module("poison", "--poison")
            self.poison = poison_module.gaussian(
                self.clean_train,
                fraction=self.config["poison"]["fraction"],
                noise_std=self.config["poison"]["std"],
                seed=self.config["seed"],
            )
            self.train_set = self.poison.dataset
        self._time("data_seconds", started)

    def open_store(self) -> None:
        self.identity = run_identity(self.config, self.clean_train, self.test_set)
        self.fingerprint = fingerprint(self.identity)
        root = self.out / _STORE
        if self.context.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                self.store = store.ShardStore.open(
                    root, self.fingerprint, self.identity, overwrite=self.config["overwrite"]
                )
            except store.StoreMismatchError as error:
                raise InfluxValueError(
                    f"--out {self.out}: {error}. Choose another --out, or pass --overwrite to "
                    "replace them (results of different settings are never mixed)"
                ) from None
            # A run is finished only when summary.json is back; other outputs are rewritten.
            names = _OUTPUT_FILES if self.config["overwrite"] else _DONE_FILES
            for name in names:
                (self.out / name).unlink(missing_ok=True)
        distributed.barrier()
        if not self.context.is_main:
            self.store = store.ShardStore.attach(root, self.fingerprint)

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config["seed"])
            model = build_model(
                self.config["model"],
                self.train_set.input_shape,
                self.train_set.num_classes,
                self.config["width"],
            )
        return model.to(self.device)

    def prepare_model(self) -> None:
        """The model to score: --checkpoint, the stored trained model, or a newly trained one."""
        self.model = self.build_model()
        self.checkpoints: list[tuple] = []
        self.metrics: dict[str, Any] = {}
        if self.config["checkpoint"] is not None:
            state = read_state_dict(self.config["checkpoint"])
            load_weights(self.model, state, f"--checkpoint {self.config['checkpoint']}")
            loss, accuracy = evaluate(self.model, self.train_set, device=self.device)
            test_loss, test_accuracy = evaluate(self.model, self.test_set, device=self.device)
            self.metrics = {
                "train_loss": loss,
                "train_accuracy": accuracy,
                "test_loss": test_loss,
                "test_accuracy": test_accuracy,
            }
            return
        if self.context.is_main and not self._load_trained():
            started = time.perf_counter()
            model_file, record_file, metrics = train_and_record(
                self.model, self.train_set, self.test_set, self.config
            )
            self._time("train_seconds", started)
            # The record first: the model file marks the training as done.
            self.store.put_bytes(_TRAINING_FILE, record_file)
            self.store.put_bytes(_MODEL_FILE, model_file)
            self.say(
                f"trained {self.config['model']} on {self.config['dataset']}: train accuracy "
                f"{metrics['train_accuracy']:.4f}, test accuracy {metrics['test_accuracy']:.4f}"
            )
            self._load_trained()
        distributed.barrier()
        if not self.context.is_main and not self._load_trained():
            raise InfluxRuntimeError(f"rank {self.context.rank}: the trained model is missing")

    def _load_trained(self) -> bool:
        model_file = self.store.get_bytes(_MODEL_FILE)
        record_file = self.store.get_bytes(_TRAINING_FILE)
        if model_file is None or record_file is None:
            return False
        try:
            state, _ = _load_state_bytes(model_file)
            record, meta = _load_state_bytes(record_file)
            self.model.load_state_dict(state)
        except (ValueError, RuntimeError, KeyError, json.JSONDecodeError) as error:
            self.store.reject(_MODEL_FILE, f"unreadable ({error})")
            return False
        self.checkpoints = checkpoints_of(record, meta)
        self.metrics = dict(meta.get("metrics", {}))
        return True

    def _announce_rejected(self) -> None:
        for name, reason in self.store.rejected:
            self.say(f"recomputing {self.store.path(name)}: {reason}")
        self.store.rejected.clear()

    def score(self, plan: Plan) -> int:
        """Compute this rank's missing shards; return how many were already on disk."""
        self.scorer = Scorer(self.model, self.train_set, self.config, self.checkpoints, self.poison)
        self.model.eval()
        resumed = 0
        mine = distributed.my_items(range(plan.num_chunks), self.context)
        for group, columns in plan.groups.items():
            if group in _GLOBAL_GROUPS:
                continue
            pending = [c for c in mine if _read_shard(self.store, plan, group, c) is None]
            resumed += len(mine) - len(pending)
            self._announce_rejected()
            if not pending:
                continue
            started = time.perf_counter()
            bar = tqdm(
                total=len(pending),
                desc=group,
                unit="shard",
                disable=not (self.config["progress"] and self.context.is_main),
            )
            for chunk in pending:
                self._compute_shard(plan, group, columns, chunk)
                bar.update(1)
            bar.close()
            self._time(f"{group}_seconds", started)
        return resumed

    def _compute_shard(self, plan: Plan, group: str, columns, chunk: int) -> np.ndarray:
        positions = plan.positions(chunk)
        values = self.scorer.compute(group, positions)
        indices = positions.numpy()
        check_finite(group, values, indices, self.config)
        array = np.empty(len(indices), dtype=shard_dtype(columns))
        array["index"] = indices
        for column in columns:
            array[column] = values[column]
        self.store.write(plan.shard(group, chunk), array)
        return array

    def merge(self, plan: Plan) -> dict[str, np.ndarray]:
        """Rank 0: every shard verified (recomputed if damaged), concatenated, indices 0..N-1."""
        table: dict[str, np.ndarray] = {
            "index": np.arange(plan.num_examples, dtype=np.int64),
            "target": self.train_set.targets[: plan.num_examples].numpy().astype(np.int64),
        }
        merged_names = []
        for group, columns in plan.groups.items():
            if group in _GLOBAL_GROUPS:
                continue
            parts = []
            for chunk in range(plan.num_chunks):
                array = _read_shard(self.store, plan, group, chunk)
                self._announce_rejected()
                if array is None:
                    array = self._compute_shard(plan, group, columns, chunk)
                parts.append(array)
                merged_names.append(plan.shard(group, chunk))
            merged = np.concatenate(parts)
            if not np.array_equal(merged["index"], table["index"]):
                raise InfluxRuntimeError(
                    f"the {group} shards do not cover the examples 0..{plan.num_examples - 1} "
                    "exactly once; rerun with --overwrite"
                )
            for column in columns:
                table[column] = merged[column]
        if "unlearnable" in plan.groups:
            # One shard over all examples: the ranks compare every example with the others.
            name = "unlearnable-all.npy"
            array = self.store.read(name)
            expected = shard_dtype(("unlearnable",))
            if array is not None and (
                array.dtype != expected or not np.array_equal(array["index"], table["index"])
            ):
                self.store.reject(name, "it does not hold every example once")
                array = None
            self._announce_rejected()
            if array is None:
                array = np.empty(plan.num_examples, dtype=expected)
                array["index"] = table["index"]
                array["unlearnable"] = self.scorer.unlearnable()
                check_finite("unlearnable", {"unlearnable": array["unlearnable"]},
                             table["index"], self.config)  # fmt: skip
                self.store.write(name, array)
            table["unlearnable"] = array["unlearnable"]
            merged_names.append(name)
        trained = [_MODEL_FILE, _TRAINING_FILE] if self.config["checkpoint"] is None else []
        self.store.finalize(trained + merged_names)
        return table


# ------------------------------------------------------------------------------------------------
# Output files
# ------------------------------------------------------------------------------------------------


def scores_table_bytes(table: dict[str, np.ndarray], columns: Sequence[str]) -> bytes:
    """Parquet bytes of the table (index, target, then ``columns``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ["index", "target", *columns]
    arrow = pa.table({name: table[name] for name in names})
    buffer = io.BytesIO()
    pq.write_table(arrow, buffer, compression="zstd")
    return buffer.getvalue()


def scores_csv_text(table: dict[str, np.ndarray], columns: Sequence[str]) -> str:
    """CSV of the table; 9 significant digits (float32-exact; scores.parquet is exact)."""
    names = ["index", "target", *columns]
    lines = [",".join(names)]
    values = [table[name] for name in names]
    for row in range(table["index"].shape[0]):
        cells = [str(int(values[0][row])), str(int(values[1][row]))]
        cells += [f"{v[row]:.9g}" for v in values[2:]]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def _json_safe(value):
    """``value`` with numpy scalars as Python numbers and NaN/inf as None (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def json_text(content: dict[str, Any]) -> str:
    return json.dumps(_json_safe(content), indent=2, allow_nan=False) + "\n"


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {
        "influx": influx.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for name in ("pyarrow", "safetensors", "matplotlib", "scipy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def score_statistics(table: dict[str, np.ndarray], columns: Sequence[str]) -> dict[str, Any]:
    stats = {}
    for column in columns:
        values = table[column][np.isfinite(table[column])]
        if values.size == 0:
            continue
        stats[column] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "min": float(values.min()),
            "median": float(np.median(values)),
            "max": float(values.max()),
            "count": int(values.size),
        }
    return stats


def _gus_summary(table: dict[str, np.ndarray]) -> dict[str, Any] | None:
    if "gus_iz" not in table:
        return None
    values = table["gus_iz"][table["poisoned"] > 0]
    if values.size == 0:
        return None
    from scipy.stats import norm

    values = values[np.isfinite(values)]
    gus = float(values.mean())
    # The per-point test of docs/architecture.md: I_z ~ N(0, 1) when theta is independent of the noise.
    threshold = float(norm.ppf(0.99))
    return {
        "gus": gus,
        "z": gus * math.sqrt(values.size),
        "tpr_at_fpr_0.01": float((values > threshold).mean()),
        "poisoned": int(values.size),
    }


def image_getter(dataset) -> Callable[[int], np.ndarray]:
    """``position -> image`` [H, W] or [H, W, 3] in [0, 1] for the report's grids."""
    if isinstance(dataset, datasets.Cifar10Dataset):
        return lambda i: dataset.images[i].permute(1, 2, 0).numpy() / 255.0

    def generic(i: int) -> np.ndarray:
        image = dataset[i][0].detach().float().cpu()
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
        return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()

    return generic


def write_outputs(job: Job, plan: Plan, table: dict[str, np.ndarray], started: float) -> dict:
    from influx import report

    out = job.out
    columns = plan.columns
    store.atomic_write_bytes(out / "scores.parquet", scores_table_bytes(table, columns))
    if plan.num_examples <= CSV_MAX_ROWS:
        store.atomic_write_text(out / "scores.csv", scores_csv_text(table, columns))
    else:
        (out / "scores.csv").unlink(missing_ok=True)
    config = job.config
    classes = getattr(job.train_set, "classes", None) or getattr(job.clean_train, "classes", None)
    summary: dict[str, Any] = {
        "dataset": config["dataset"],
        "model": config["model"],
        "sizes": {
            "train": len(job.train_set),
            "test": len(job.test_set),
            "input_shape": list(job.train_set.input_shape),
            "num_classes": job.train_set.num_classes,
            "num_parameters": sum(p.numel() for p in job.model.parameters()),
        },
        "accuracy": {
            "train": job.metrics.get("train_accuracy"),
            "test": job.metrics.get("test_accuracy"),
        },
        "loss": {"train": job.metrics.get("train_loss"), "test": job.metrics.get("test_loss")},
        "scores": score_statistics(table, columns),
        "score_definitions": {s.name: SCORES[s.name.split(":")[0]][1] for s in plan.specs},
        "checkpoints": [
            {"lr": lr} for _, lr in job.checkpoints
        ],  # TracIn's checkpoints (state dicts in store/training.safetensors)
        "commutator_reference": (
            job.scorer.reference_positions().tolist()
            if any(s.name == "commutator" for s in plan.specs)
            else None
        ),
        "poison": config["poison"],
        "gus": _gus_summary(table),
        "num_chunks": plan.num_chunks,
        "world_size": job.context.world_size,
        "device": config["device"],
        "fingerprint": job.fingerprint,
        "data": {"train": job.identity["train_data"], "test": job.identity["test_data"]},
        "versions": _versions(),
        "config": config,
        "files": {
            "scores": "scores.parquet",
            "csv": "scores.csv" if plan.num_examples <= CSV_MAX_ROWS else None,
            "report": "report.md",
            "model": f"{_STORE}/{_MODEL_FILE}" if config["checkpoint"] is None else None,
            "training_record": f"{_STORE}/{_TRAINING_FILE}"
            if config["checkpoint"] is None
            else None,
        },
    }
    report_started = time.perf_counter()
    report.write_report(
        out,
        {c: table[c] for c in columns if c != "poisoned"},
        targets=table["target"],
        images=image_getter(job.train_set),
        class_names=classes,
        summary=summary,
        top_k=config["top_k"],
    )
    job._time("report_seconds", report_started)
    summary["timing"] = {**job.timings, "total_seconds": time.perf_counter() - started}
    store.atomic_write_text(out / "summary.json", json_text(summary))
    return summary


def run(config: dict[str, Any], context: distributed.Context, say=lambda m: None) -> dict | None:
    """Score every training example as ``config`` says; rank 0 returns the summary."""
    started = time.perf_counter()
    job = Job(config, context, say)
    job.load_data()
    job.open_store()
    plan = Plan(
        parse_scores(
            ",".join(config["scores"]),
            checkpoint=config["checkpoint"] is not None,
            poison=config["poison"] is not None,
        ),
        len(job.train_set),
        config["chunk_size"],
    )
    job.prepare_model()
    resumed = job.score(plan)
    if resumed:
        job.say(f"resumed in {job.out}: {resumed} shards were already done")
    distributed.barrier()
    if not context.is_main:
        return None
    started_merge = time.perf_counter()
    table = job.merge(plan)
    job._time("merge_seconds", started_merge)
    summary = write_outputs(job, plan, table, started)
    summary["resumed_shards"] = resumed
    return summary


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def _os_error_message(error: OSError) -> str:
    where = error.filename or "the output folder"
    if error.errno == errno.ENOSPC:
        return (
            f"no space left on the device while writing {where}; free some space, then rerun "
            "the same command to resume"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where} ({error.strerror}); choose a writable --out"
    return f"{where}: {error.strerror or error}"


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``influx-score``; returns the exit status.

    0 done; 2 an error (one line on stderr); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
    """
    from influx.kernels import KernelBackendError, KernelInputError

    args = build_parser().parse_args(argv)
    say = lambda message: print(message, file=sys.stderr, flush=True)
    threads = torch.get_num_threads()
    previous_handler = None

    def terminated(signum, frame):
        raise _Terminated

    try:
        previous_handler = signal.signal(signal.SIGTERM, terminated)
    except ValueError:
        # Not the main thread: leave SIGTERM alone.
        previous_handler = None
    summary = None
    try:
        context = distributed.launched()
        config = resolve_config(args, context)
        if config["threads"] is not None:
            torch.set_num_threads(config["threads"])
        distributed.init(torch.device(config["device"]).type)
        summary = run(config, context, say=say)
    except (InfluxError, KernelBackendError, KernelInputError) as error:
        print(f"influx-score: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"influx-score: error: {_one_line(_os_error_message(error))}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(
            "influx-score: error: out of memory; lower --chunk-size or --batch-size, or use "
            "--max-examples",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("influx-score: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except _Terminated:
        print("influx-score: terminated; rerun the same command to resume", file=sys.stderr)
        return 143
    finally:
        torch.set_num_threads(threads)
        distributed.finalize()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    if summary is not None:
        out = Path(config["out"])
        extra = f"; {summary['resumed_shards']} shards resumed" if summary["resumed_shards"] else ""
        accuracy = lambda split: f"{_or_nan(summary['accuracy'][split]):.4f}"
        print(
            f"scored {summary['sizes']['train']} examples ({', '.join(config['scores'])}) "
            f"-> {out / 'scores.parquet'}; train accuracy {accuracy('train')}, test accuracy "
            f"{accuracy('test')}, {summary['timing']['total_seconds']:.1f} s{extra}\n"
            f"report: {out / 'report.md'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
