"""Save a fitted K-FAC / EK-FAC estimator to one safetensors file and read it back without refitting.

    fitted = influence.fit(model, loss_fn, train, method="ekfac")
    fitted.save("factors.safetensors")           # factors_io.save(fitted, path)
    ...                                          # later, another process
    fitted = influence.load("factors.safetensors", model, loss_fn, train)
    fitted.scores(new_queries)                   # no refit: the same scores, bit for bit

This module only serializes: :func:`save` writes, :func:`read` checks and rebuilds the estimator,
and :func:`influx.influence.load` wraps what it read in a fitted ``Influence``.

The file holds every factor, eigenbasis, (corrected) eigenvalue and diagonal block as tensors,
and as metadata the method, the options, the fit's diagnostics, a fingerprint of the model (the
names, shapes and dtypes of the scored parameters and a SHA-256 of their values) and one of the
training set (its size and a SHA-256 of its inputs, targets and indices, in order). Loading onto a
model whose parameters differ (another checkpoint, another architecture) or with another
training set is refused, since its scores would silently mix two fits. Tensors load onto the
model's device in the layout of the fit (row-major eigenbases), so a reloaded fit gives the
same scores bit for bit.

The training set is hashed whole rather than sampled: a sample would miss a few flipped labels,
which is exactly how two training sets of a label-noise study differ. Hashing streams it batch by
batch in one pass (the inputs' bytes go to the digest as they arrive; the targets and indices,
one row per example, are held until the end, where the digest takes them), and loading checks
each batch of that pass for finite inputs and losses, so it costs no pass of its own. Saving
reads the training set once to hash it. Files written before the training set was recorded
still load, checked by the training set's size only, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from influx.errors import InfluxValueError
from influx.grads.common import LossFn
from influx.influence import stream
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


def _header(name: str, dtype: torch.dtype, shape) -> bytes:
    return f"{name}:{str(dtype)}:{list(shape)};".encode()


def _hash_rows(digest, tensor: torch.Tensor) -> None:
    """The bytes of ``tensor`` (rows in order), a slice at a time."""
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
        digest.update(_header(name, tensor.dtype, tensor.shape))
        _hash_rows(digest, tensor)
    return {"examples": int(inputs.shape[0]), "sha256": digest.hexdigest()}


def data_fingerprint(data, *, batch_size: int) -> dict:
    """:func:`train_fingerprint` of a data argument (or a checked one), streamed in one pass:
    the same digest, since SHA-256 of bytes fed in pieces is that of the bytes whole."""
    digest = hashlib.sha256()
    examples = stream.size(data)
    targets, indices = [], []
    for x, y, i in stream.batches(data, batch_size):
        if not targets:
            digest.update(_header("inputs", x.dtype, (examples, *x.shape[1:])))
        _hash_rows(digest, x)
        targets.append(y)
        indices.append(i)
    for name, parts in (("targets", targets), ("indices", indices)):
        whole = torch.cat(parts)
        digest.update(_header(name, whole.dtype, whole.shape))
        _hash_rows(digest, whole)
    return {"examples": examples, "sha256": digest.hexdigest()}


def _scored(estimator: KFACEstimator) -> list[str]:
    coverage = estimator.coverage.names()
    return coverage["kronecker"] + coverage["diagonal"]


def save(fitted, path: str | Path) -> Path:
    """Write ``fitted`` (an ``Influence`` of a ``kfac`` / ``ekfac`` fit) to ``path``
    (safetensors); return the path. Reads the training set once, to fingerprint it."""
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
        "train": data_fingerprint(fitted.train, batch_size=fitted.batch_size),
        "estimator": meta,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(contiguous, str(path), metadata={_KEY: json.dumps(meta)})
    return path


@dataclass(frozen=True)
class Saved:
    """What :func:`read` rebuilt: the method, the estimator, the training set (checked, when its
    fingerprint was compared, by that pass) and the batch size of scores."""

    method: str
    estimator: KFACEstimator
    train: stream.Checked
    batch_size: int


def read(
    path: str | Path,
    model: nn.Module,
    loss_fn: LossFn,
    train,
    *,
    batch_size: int | None = None,
) -> Saved:
    """The fit saved by :func:`save`, for ``model`` and its training set ``train``.

    ``batch_size`` defaults to the saved fit's. Refused before any work: a file that is not an
    influx K-FAC file, and a model whose scored parameters differ from the saved fit's; then,
    in one pass over ``train`` that also checks it, a training set other than the fit's.
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
    data = stream.checked(train, model, loss_fn, "train")
    batch_size = batch_size or meta.get("batch_size")
    _check_train(path, meta.get("train"), estimator, data, batch_size=batch_size or 256)
    if batch_size is None:
        batch_size = default_batch_size(estimator.bytes_per_example())
    return Saved(meta["method"], estimator, data, batch_size)


def _check_train(
    path: Path, saved: dict | None, estimator: KFACEstimator, data, *, batch_size: int
) -> None:
    """Refuse a training set other than the fit's: another size, or (when the file records it)
    other inputs, targets or indices."""
    counts = {f.count for f in estimator.factors.values()} | {
        f.count for f in estimator.diagonal.values()
    }
    num_train = stream.size(data)
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
            stacklevel=4,
        )
        return
    if data_fingerprint(data, batch_size=batch_size)["sha256"] != saved["sha256"]:
        raise InfluxValueError(
            "train differs from the training set the factors were fitted on (same size, but "
            "other inputs, targets or indices, or another order or dtype): pass the training set "
            "of the fit, or refit on this one"
        )
