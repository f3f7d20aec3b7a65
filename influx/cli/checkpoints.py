"""The model that is scored: built from its name, read from ``--checkpoint`` (safetensors or a
weights-only state dict), or trained here with the record TracIn needs; and the model files of
the store."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influx import models
from influx.errors import InfluxRuntimeError, InfluxValueError
from influx.train import evaluate, train

MODELS = ("mlp", "cnn", "resnet8", "resnet18")
# Per-dataset training defaults: the digits/MLP demo trains in a few seconds on 2 CPU cores.
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"epochs": 20, "lr": 1e-2, "batch_size": 64},
    "mnist": {"epochs": 10, "lr": 1e-3, "batch_size": 128},
    "cifar10": {"epochs": 10, "lr": 1e-3, "batch_size": 128},
    "synthetic": {"epochs": 5, "lr": 1e-3, "batch_size": 128},
}
# The store's folder inside --out, and the files of the trained model and its training record.
STORE = "store"
MODEL_FILE = "model.safetensors"
TRAINING_FILE = "training.safetensors"
# TracIn sums over the ends of this many evenly spaced epochs (fewer if training is shorter).
TRACIN_CHECKPOINTS = 5
# A trained model whose train loss is this many times its loss at initialization diverged.
DIVERGED_LOSS_RATIO = 100.0


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
# --checkpoint
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


# ------------------------------------------------------------------------------------------------
# The trained model and its training record, as files of the store
# ------------------------------------------------------------------------------------------------


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


def tracin_steps(num_train: int, batch_size: int, epochs: int) -> list[int]:
    """Steps at the ends of up to TRACIN_CHECKPOINTS evenly spaced epochs (the last included)."""
    per_epoch = math.ceil(num_train / batch_size)
    count = min(TRACIN_CHECKPOINTS, epochs)
    chosen = sorted({round(epochs * (k + 1) / count) for k in range(count)})
    return [epoch * per_epoch for epoch in chosen]


def _diverged(config: dict[str, Any], why: str) -> InfluxRuntimeError:
    default = TRAIN_DEFAULTS[config["dataset"]]["lr"]
    return InfluxRuntimeError(
        f"training diverged: {why} with --lr {config['lr']:g}; lower --lr (the "
        f"{config['dataset']} default is {default:g})"
    )


def train_and_record(
    model: nn.Module, train_set, test_set, config: dict[str, Any]
) -> tuple[bytes, bytes, dict[str, Any]]:
    """Train ``model``; return the model file, the training record file and the metrics.

    The record (safetensors) holds each epoch's order of dataset indices (``order.E``), the
    per-step losses and learning rates, and the TracIn checkpoints (``checkpoint.K.<param>``);
    its metadata lists the epoch seeds and each checkpoint's step and learning rate.

    A run whose train loss ends non-finite, or :data:`DIVERGED_LOSS_RATIO` times above the loss
    at initialization, diverged: it is refused here, naming the learning rate, before its
    overflowing weights turn every score's gradients into NaN.
    """
    initial_loss, _ = evaluate(model, train_set, device=config["device"])
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
        raise _diverged(config, f"the final train loss is {result.final_loss}")
    trained_loss, _ = evaluate(model, train_set, device=config["device"])
    if not trained_loss <= DIVERGED_LOSS_RATIO * initial_loss:
        raise _diverged(
            config, f"the train loss went from {initial_loss:.3g} to {trained_loss:.3g}"
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
