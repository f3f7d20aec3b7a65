"""Streaming scorer: Q x N scores in train blocks, dense, top-k only, per layer, or on disk.

The preconditioned query features [Q, K] are computed once; train examples arrive in blocks of
B, as features [B, K] or, from an estimator that contracts layer by layer (K-FAC / EK-FAC), as
their scores [Q, B] already. Each block is handed to the *sinks* that were asked for, one job
each: a dense [Q, N] matrix, a ``.npy`` memmap on disk, a running top-k, per-layer shares. Peak
memory is O(Q K + B K + Q B), with B K one layer's share when contracted layer by layer, unless
a dense in-memory matrix is asked for.

Devices and dtypes: everything stays on the device and in the dtype of the preconditioned
queries (the data's device, see :mod:`influx.influence.api`); only the stored file is in host
memory, in the same dtype (bfloat16 / float16 scores are stored as float32, which numpy can hold).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from influx.checks import check_count_or_none
from influx.errors import InfluxValueError
from influx.influence.base import FeatureLayout
from influx.kernels import TopK as KernelTopK
from influx.kernels import merge_topk, score_topk
from influx.store import SCORES_FORMAT, ScoreMatrix, check_matrix_path, read_matrix

STORED_FORMAT = SCORES_FORMAT  # the name this module gave the format first


@dataclass(frozen=True, repr=False)
class TopK:
    """Per query the k largest and k smallest scores; indices are dataset indices of train points.

    Shapes [Q, k]. For influence (sign -1) the smallest are the most helpful train points (removing
    them raises the query loss the most) and the largest the most harmful.
    """

    largest_values: torch.Tensor
    largest_indices: torch.Tensor
    smallest_values: torch.Tensor
    smallest_indices: torch.Tensor

    def __repr__(self) -> str:
        q, k = self.largest_values.shape
        return f"TopK(queries={q}, k={k})"


@dataclass(frozen=True, repr=False)
class Scores:
    """Scores of Q queries against N train points.

    ``values`` [Q, N] (None when only top-k was asked), aligned to ``query_indices`` [Q] and
    ``train_indices`` [N]; ``per_layer`` maps a layer (module name) to its [Q, N] share, summing to
    ``values``; ``path`` is the ``.npy`` file holding ``values`` when stored on disk. ``sign`` is
    the method's: -1 for influence (I_up,loss, negative = helpful), +1 for tracin / grad_dot /
    grad_cos (positive = helpful).
    """

    method: str
    query_indices: torch.Tensor
    train_indices: torch.Tensor
    values: torch.Tensor | None = None
    top_k: TopK | None = None
    per_layer: dict[str, torch.Tensor] | None = None
    path: str | None = None
    sign: float = -1.0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.query_indices.numel(), self.train_indices.numel())

    def __repr__(self) -> str:
        parts = [f"method={self.method!r}", f"sign={self.sign:+g}", f"shape={self.shape}"]
        if self.values is not None:
            finite = self.values[torch.isfinite(self.values)]
            if finite.numel():
                parts.append(f"range=[{float(finite.min()):.3e}, {float(finite.max()):.3e}]")
        if self.top_k is not None:
            parts.append(f"top_k={self.top_k.largest_values.shape[1]}")
        if self.per_layer is not None:
            parts.append(f"layers={list(self.per_layer)}")
        if self.path is not None:
            parts.append(f"path={self.path!r}")
        return f"Scores({', '.join(parts)})"


@dataclass(frozen=True)
class TrainBlock:
    """One block of train examples for :func:`stream_scores`: their dataset ``indices`` [B] and
    either their ``features`` [B, K] or, from an estimator that contracts layer by layer, their
    unsigned scores ``slab`` = <queries, f(z)> [Q, B] (with each layer's share in ``per_layer``
    when asked)."""

    indices: torch.Tensor
    features: torch.Tensor | None = None
    slab: torch.Tensor | None = None
    per_layer: dict[str, torch.Tensor] | None = None


# --------------------------------------------------------------------------------------------------
# Sinks: each receives every [Q, B] block of scores (or the features to compute it) once
# --------------------------------------------------------------------------------------------------


class _Dense:
    """The whole [Q, N] matrix in memory, on the queries' device."""

    def __init__(self, queries: torch.Tensor, num_train: int):
        self.values = queries.new_empty(queries.shape[0], num_train)

    def add(self, start: int, stop: int, slab: torch.Tensor) -> None:
        self.values[:, start:stop] = slab


class _Stored:
    """The [Q, N] scores on disk in the scores' dtype, as :class:`influx.store.ScoreMatrix`
    writes them (``.npy`` + ``.json`` manifest, never looking complete before they are)."""

    def __init__(self, path, queries, query_indices, num_train, method, sign, **known):
        dtype = queries.dtype if queries.dtype in (torch.float32, torch.float64) else torch.float32
        self.dtype = dtype
        identity = {"method": method, "sign": sign, "query_indices": query_indices.tolist()}
        if known.get("train_indices") is not None:
            identity["train_indices"] = known["train_indices"].tolist()
        self.matrix = ScoreMatrix(
            path,
            (queries.shape[0], num_train),
            "float64" if dtype == torch.float64 else "float32",
            identity,
            overwrite=known.get("overwrite", False),
        )
        self.path = self.matrix.path

    def add(self, start: int, stop: int, slab: torch.Tensor) -> None:
        self.matrix.write(start, stop, slab.to(device="cpu", dtype=self.dtype).numpy())

    def finish(self, query_indices, train_indices) -> torch.Tensor:
        described = {
            "query_indices": query_indices.tolist(),
            "train_indices": train_indices.tolist(),
        }
        return torch.from_numpy(self.matrix.finish(described))

    def abort(self) -> None:
        self.matrix.abort()


def check_scores_path(path) -> None:
    """Refuse, before any scoring, a ``store=`` path that is not a ``.npy`` name or would
    overwrite files influx did not write (see :func:`influx.store.check_matrix_path`)."""
    check_matrix_path(path)


def read_stored(path: str | Path) -> Scores:
    """The :class:`Scores` that ``scores(..., store=path)`` wrote (``values`` a memmap [Q, N]).

    Refused: a missing matrix or manifest, and a run that did not finish (an interrupted one
    leaves its manifest marked incomplete), so a half-written matrix is never read as scores.
    """
    values, manifest = read_matrix(path)
    return Scores(
        manifest["method"],
        torch.tensor(manifest["query_indices"], dtype=torch.long, device="cpu"),
        torch.tensor(manifest["train_indices"], dtype=torch.long, device="cpu"),
        torch.from_numpy(values),
        path=str(path),
        sign=float(manifest["sign"]),
    )


class _RunningTopK:
    """The k largest and smallest scores per query, merged block by block (kernels.merge_topk)."""

    def __init__(self, k: int):
        self.k, self.running = k, None

    def add(self, block: KernelTopK, indices: torch.Tensor) -> None:
        # block indices are positions in the train block: map them to dataset indices
        indices = indices.to(block.largest_indices.device)
        block = KernelTopK(
            block.largest_values,
            indices[block.largest_indices],
            block.smallest_values,
            indices[block.smallest_indices],
        )
        self.running = block if self.running is None else merge_topk(self.running, block, self.k)

    def result(self) -> TopK:
        return TopK(*self.running)


class _PerLayer:
    """Each layer's share sign * <q[:, layer], f[:, layer]> [Q, N]; the shares sum to the total."""

    def __init__(self, queries: torch.Tensor, num_train: int, layout: FeatureLayout, sign: float):
        self.queries, self.layout, self.sign = queries, layout, sign
        self.values = {
            name: queries.new_zeros(queries.shape[0], num_train) for name in layout.layers
        }

    def add(self, start: int, stop: int, block: TrainBlock) -> None:
        if block.per_layer is not None:
            for layer, share in block.per_layer.items():
                self.values[layer][:, start:stop] += self.sign * share
            return
        features = block.features.to(self.queries.dtype)
        for blk in self.layout.blocks:
            sl = slice(blk.start, blk.stop)
            self.values[blk.layer][:, start:stop] += self.sign * (
                self.queries[:, sl] @ features[:, sl].T
            )


def _slab_topk(slab: torch.Tensor, k: int) -> KernelTopK:
    """Both top-k of a [Q, B] slab that was computed anyway."""
    k = min(k, slab.shape[1])
    largest = torch.topk(slab, k, dim=1)
    smallest = torch.topk(slab, k, dim=1, largest=False)
    return KernelTopK(largest.values, largest.indices, smallest.values, smallest.indices)


def _feed_blocks(
    train_blocks, queries, train_indices, sign, matrix, stored, ranking, layers, top_k
) -> int:
    """Hand every train block's scores to the sinks; return the number of train examples."""
    start = 0
    for block in train_blocks:
        indices = block.indices
        stop = start + indices.shape[0]
        train_indices[start:stop] = indices.to(train_indices.device)
        if block.slab is None and matrix is None and stored is None:
            # Top-k only: the kernel scores tile by tile and keeps the [Q, B] slab out of memory.
            features = block.features.to(queries.dtype)
            ranking.add(score_topk(sign * queries, features, top_k), indices)
        else:
            if block.slab is None:
                slab = sign * (queries @ block.features.to(queries.dtype).T)  # [Q, B]
            else:
                slab = sign * block.slab.to(queries.dtype)
            for sink in (matrix, stored):
                if sink is not None:
                    sink.add(start, stop, slab)
            if ranking is not None:
                ranking.add(_slab_topk(slab, top_k), indices)
        if layers is not None:
            layers.add(start, stop, block)
        start = stop
    return start


def check_top_k(top_k) -> None:
    """``top_k`` is None or a positive int (refused before any scoring)."""
    check_count_or_none("top_k", top_k)


def stream_scores(
    method: str,
    preconditioned_queries: torch.Tensor,
    query_indices: torch.Tensor,
    train_blocks: Iterable[TrainBlock],
    num_train: int,
    *,
    sign: float,
    layout: FeatureLayout,
    dense: bool = True,
    top_k: int | None = None,
    per_layer: bool = False,
    store: str | Path | None = None,
    overwrite: bool = False,
    train_indices: torch.Tensor | None = None,
) -> Scores:
    """Score ``preconditioned_queries`` [Q, K] against train blocks (features [B, K] or score
    slabs [Q, B], with dataset indices [B]). ``train_indices`` (when known before the pass) and
    ``overwrite`` decide whether a finished matrix at ``store`` may be replaced (see
    :class:`influx.store.ScoreMatrix`)."""
    check_top_k(top_k)
    if per_layer and not layout.layered:
        raise InfluxValueError(
            f"method {method!r} scores in mixed coordinates (a dense projection or an eigenbasis), "
            "which have no per-layer split: use projection='kronecker' for trak, or another method"
        )
    if not dense and top_k is None and store is None:
        raise InfluxValueError("nothing to compute: pass dense=True, top_k=k or store=path")
    queries = preconditioned_queries
    stored = None
    if store is not None:
        stored = _Stored(
            store,
            queries,
            query_indices,
            num_train,
            method,
            sign,
            train_indices=train_indices,
            overwrite=overwrite,
        )
    matrix = _Dense(queries, num_train) if dense else None
    ranking = _RunningTopK(top_k) if top_k is not None else None
    layers = _PerLayer(queries, num_train, layout, sign) if per_layer else None
    seen_indices = torch.empty(num_train, dtype=torch.long, device=query_indices.device)
    try:
        seen = _feed_blocks(
            train_blocks, queries, seen_indices, sign, matrix, stored, ranking, layers, top_k
        )
        if seen != num_train:
            raise InfluxValueError(f"train blocks held {seen} examples; expected {num_train}")
    except BaseException:
        # Interrupted or failed: the stored matrix stays marked incomplete.
        if stored is not None:
            stored.abort()
        raise
    values = matrix.values if matrix is not None else None
    path = None
    if stored is not None:
        on_disk = stored.finish(query_indices, seen_indices)
        path = str(stored.path)
        values = on_disk if values is None else values
    top = ranking.result() if ranking is not None and ranking.running is not None else None
    return Scores(
        method,
        query_indices,
        seen_indices,
        values,
        top,
        layers.values if layers is not None else None,
        path,
        sign,
    )
