"""Save a fitted K-FAC / EK-FAC estimator to one safetensors file and load it without refitting.

    fitted = influence.fit(model, loss_fn, train, method="ekfac")
    factors_io.save(fitted, "factors.safetensors")
    ...                                          # later, another process
    fitted = factors_io.load("factors.safetensors", model, loss_fn, train)
    fitted.scores(new_queries)                   # no refit: the same scores, bit for bit

The file holds every factor, eigenbasis, (corrected) eigenvalue and diagonal block as tensors,
and as metadata the method, the options, the fit's diagnostics, a fingerprint of the model (the
names, shapes and dtypes of the scored parameters and a SHA-256 of their values) and one of the
training set (its size and a SHA-256 of its inputs, targets and indices, in order). Loading onto a
model whose parameters differ (another checkpoint, another architecture) or with another
training set is refused, since its scores would silently mix two fits. Tensors load onto the
model's device in the layout of the fit (row-major eigenbases), so a reloaded fit gives the
same scores bit for bit.

The training set is hashed whole rather than sampled: a sample would miss a few flipped labels,
which is exactly how two training sets of a label-noise study differ. Hashing reads every byte
once (about a second for CIFAR-10's 600 MB on one core), less than the forward pass over the
training set that loading runs anyway to check it is finite. Files written before the training
set was recorded still load, checked by the training set's size only, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from influx.data import as_tensors
from influx.errors import InfluxValueError
from influx.grads.common import LossFn
from influx.influence.api import Influence, check_data
from influx.influence.base import default_batch_size
from influx.influence.kfac import KFACEstimator

FORMAT = "influx.kfac/1"
_KEY = "influx"


def fingerprint(model: nn.Module, names) -> dict:
    """Names, shapes, dtypes and a SHA-256 of the values of the parameters ``names``."""
    digest = hashlib.sha256()
    shapes = {}
    for name in names:
        p = model.get_parameter(name).detach()
        shapes[name] = [list(p.shape), str(p.dtype).removeprefix("torch.")]
        digest.update(name.encode())
        digest.update(p.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return {"parameters": shapes, "sha256": digest.hexdigest()}


# Bytes hashed per step, so that data on a GPU crosses to the host a slice at a time.
_HASH_CHUNK_BYTES = 64 << 20


def _hash_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    digest.update(f"{name}:{str(tensor.dtype)}:{list(tensor.shape)};".encode())
    tensor = tensor.detach()
    if tensor.dim() == 0 or tensor.numel() == 0:
        digest.update(tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        return
    row_bytes = max(1, tensor[0].numel() * tensor.element_size())
    for rows in tensor.split(max(1, _HASH_CHUNK_BYTES // row_bytes)):
        digest.update(rows.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def train_fingerprint(inputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> dict:
    """The training set's size and a SHA-256 of its inputs, targets and indices (values, dtypes,
    shapes and order)."""
    digest = hashlib.sha256()
    for name, tensor in (("inputs", inputs), ("targets", targets), ("indices", indices)):
        _hash_tensor(digest, name, tensor)
    return {"examples": int(inputs.shape[0]), "sha256": digest.hexdigest()}


def _scored(estimator: KFACEstimator) -> list[str]:
    coverage = estimator.coverage.names()
    return coverage["kronecker"] + coverage["diagonal"]


def save(fitted: Influence, path: str | Path) -> Path:
    """Write ``fitted`` (a ``kfac`` / ``ekfac`` fit) to ``path`` (safetensors); return the path."""
    from safetensors.torch import save_file

    if not isinstance(fitted.estimator, KFACEstimator):
        raise InfluxValueError(
            f"only kfac / ekfac fits are saved (their factors are the expensive part); got "
            f"method {fitted.method!r}: refit it instead"
        )
    estimator = fitted.estimator
    tensors, meta = estimator.state()
    meta = {
        "format": FORMAT,
        "method": fitted.method,
        "batch_size": fitted.batch_size,
        "fit_seconds": estimator.diagnostics.get("fit_seconds"),
        "model": fingerprint(estimator.model, _scored(estimator)),
        "train": train_fingerprint(fitted.train_inputs, fitted.train_targets, fitted.train_indices),
        "estimator": meta,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(contiguous, str(path), metadata={_KEY: json.dumps(meta)})
    return path


def load(
    path: str | Path,
    model: nn.Module,
    loss_fn: LossFn,
    train,
    *,
    batch_size: int | None = None,
) -> Influence:
    """The :class:`Influence` saved by :func:`save`, for ``model`` and its training set ``train``.

    ``batch_size`` defaults to the saved fit's. Refused before any work: a file that is not an
    influx K-FAC file, and a model whose scored parameters differ from the saved fit's.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InfluxValueError(f"no factors file at {str(path)!r}: save one with factors_io.save")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get(_KEY, "null"))
            device = next(model.parameters()).device
            tensors = {name: handle.get_tensor(name).to(device) for name in handle.keys()}
    except (OSError, SafetensorError) as error:
        raise InfluxValueError(f"{str(path)!r} is not a safetensors file: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InfluxValueError(
            f"{str(path)!r} holds no influx K-FAC factors (format {FORMAT!r}); write one with "
            "influx.influence.factors_io.save"
        )
    estimator = KFACEstimator.from_state(model, loss_fn, tensors, meta["estimator"])
    found = fingerprint(model, _scored(estimator))
    saved = meta["model"]
    if found["parameters"] != saved["parameters"]:
        differ = sorted(
            set(found["parameters"]) ^ set(saved["parameters"])
            | {
                n
                for n in found["parameters"]
                if found["parameters"][n] != saved["parameters"].get(n)
            }
        )
        raise InfluxValueError(
            f"the model's scored parameters do not match the saved fit's (names, shapes or dtypes "
            f"of {differ[:5]}): load the model the factors were fitted on, or refit"
        )
    if found["sha256"] != saved["sha256"]:
        raise InfluxValueError(
            "the model's parameter values differ from those the factors were fitted on (another "
            "checkpoint?): load those weights, or refit"
        )
    if meta.get("fit_seconds") is not None:
        estimator.diagnostics["fit_seconds"] = meta["fit_seconds"]
    data = as_tensors(train)
    _check_train(path, meta.get("train"), estimator, data)
    batch_size = batch_size or meta.get("batch_size")
    check_data(model, loss_fn, data, "train", batch_size=batch_size or 256)
    if batch_size is None:
        batch_size = default_batch_size(estimator.bytes_per_example())
    return Influence(
        meta["method"], estimator, train, batch_size=batch_size, model=model, loss_fn=loss_fn
    )


def _check_train(path: Path, saved: dict | None, estimator: KFACEstimator, data) -> None:
    """Refuse a training set other than the fit's: another size, or (when the file records it)
    other inputs, targets or indices."""
    counts = {f.count for f in estimator.factors.values()} | {
        f.count for f in estimator.diagonal.values()
    }
    num_train = data[0].shape[0]
    if saved is not None:
        counts = {saved["examples"]}
    if counts and num_train not in counts:
        fitted_on = max(counts)
        raise InfluxValueError(
            f"the factors were fitted on {fitted_on} examples but train has {num_train}: pass "
            "the training set of the fit (score other examples with scores(query, train=...))"
        )
    if saved is None:
        warnings.warn(
            f"{str(path)!r} was saved without a fingerprint of its training set, so train is "
            "checked by its size only: once sure train is the fit's, save the loaded fit again "
            "(factors_io.save) to record it",
            stacklevel=3,
        )
        return
    if train_fingerprint(*data)["sha256"] != saved["sha256"]:
        raise InfluxValueError(
            "train differs from the training set the factors were fitted on (same size, but "
            "other inputs, targets or indices, or another order or dtype): pass the training set "
            "of the fit, or refit on this one"
        )
