"""Streaming scorer: Q x N scores in train blocks, dense, top-k only, per layer, or on disk.

The preconditioned query features [Q, K] are computed once; train features arrive in blocks
[B, K]; each block yields a [Q, B] slab that is written (to memory or a ``.npy`` memmap), folded
into a running top-k, split per layer, or all of these. Peak memory is O(Q K + B K + Q B) unless a
dense in-memory matrix is asked for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from influx.errors import InfluxValueError
from influx.influence.base import FeatureLayout


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
    ``values``; ``path`` is the ``.npy`` file holding ``values`` when stored on disk.
    """

    method: str
    query_indices: torch.Tensor
    train_indices: torch.Tensor
    values: torch.Tensor | None = None
    top_k: TopK | None = None
    per_layer: dict[str, torch.Tensor] | None = None
    path: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.query_indices.numel(), self.train_indices.numel())

    def __repr__(self) -> str:
        parts = [f"method={self.method!r}", f"shape={self.shape}"]
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


def _score_topk(block: torch.Tensor, k: int):
    """Top-k of a [Q, B] slab, largest and smallest (the kernel when available)."""
    k = min(k, block.shape[1])
    largest = torch.topk(block, k, dim=1)
    smallest = torch.topk(block, k, dim=1, largest=False)
    return largest.values, largest.indices, smallest.values, smallest.indices


def _merge(running, block_result, k: int, largest: bool):
    values = torch.cat([running[0], block_result[0]], dim=1)
    indices = torch.cat([running[1], block_result[1]], dim=1)
    best = torch.topk(values, min(k, values.shape[1]), dim=1, largest=largest)
    return best.values, torch.gather(indices, 1, best.indices)


def _kernel_topk():
    """``influx.kernels.score_topk`` if it is installed, else None (plain torch is used)."""
    try:
        from influx.kernels import score_topk  # type: ignore[attr-defined]
    except ImportError:
        return None
    return score_topk


def stream_scores(
    method: str,
    preconditioned_queries: torch.Tensor,
    query_indices: torch.Tensor,
    train_blocks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_train: int,
    *,
    sign: float,
    layout: FeatureLayout,
    dense: bool = True,
    top_k: int | None = None,
    per_layer: bool = False,
    store: str | Path | None = None,
) -> Scores:
    """Score ``preconditioned_queries`` [Q, K] against train feature blocks ([B, K], indices [B])."""
    if top_k is not None and top_k < 1:
        raise InfluxValueError(f"top_k must be >= 1 or None; got {top_k}")
    if per_layer and not layout.layered:
        raise InfluxValueError(
            f"method {method!r} scores in mixed coordinates (a dense projection or an eigenbasis), "
            "which have no per-layer split: use projection='kronecker' for trak, or another method"
        )
    if not dense and top_k is None and store is None:
        raise InfluxValueError("nothing to compute: pass dense=True, top_k=k or store=path")
    queries = preconditioned_queries
    q = queries.shape[0]
    values = torch.empty(q, num_train, dtype=queries.dtype) if dense else None
    memmap = None
    if store is not None:
        store = Path(store)
        store.parent.mkdir(parents=True, exist_ok=True)
        memmap = np.lib.format.open_memmap(store, mode="w+", dtype=np.float32, shape=(q, num_train))
    layers = (
        {name: torch.empty(q, num_train, dtype=queries.dtype) for name in layout.layers}
        if per_layer
        else None
    )
    kernel = _kernel_topk() if top_k is not None and not per_layer else None
    running_large = running_small = None
    train_indices = torch.empty(num_train, dtype=torch.long)
    start = 0
    for features, indices in train_blocks:
        stop = start + features.shape[0]
        features = features.to(queries.dtype)
        train_indices[start:stop] = indices
        if top_k is not None and kernel is not None and values is None and memmap is None:
            # The fused kernel scores and reduces without writing the [Q, B] slab.
            found = kernel(sign * queries, features, min(top_k, features.shape[0]))
            block_top = (
                found.largest_values,
                found.largest_indices,
                found.smallest_values,
                found.smallest_indices,
            )
        else:
            slab = sign * (queries @ features.T)  # [Q, B]
            if values is not None:
                values[:, start:stop] = slab
            if memmap is not None:
                memmap[:, start:stop] = slab.to(torch.float32).numpy()
            block_top = _score_topk(slab, top_k) if top_k is not None else None
        if block_top is not None:
            large = (block_top[0], indices[block_top[1]])
            small = (block_top[2], indices[block_top[3]])
            running_large = (
                large if running_large is None else _merge(running_large, large, top_k, True)
            )
            running_small = (
                small if running_small is None else _merge(running_small, small, top_k, False)
            )
        if layers is not None:
            for name in layers:
                layers[name][:, start:stop] = 0
            for blk in layout.blocks:
                sl = slice(blk.start, blk.stop)
                layers[blk.layer][:, start:stop] += sign * (queries[:, sl] @ features[:, sl].T)
        start = stop
    if start != num_train:
        raise InfluxValueError(f"train blocks held {start} examples; expected {num_train}")
    path = None
    if memmap is not None:
        memmap.flush()
        path = str(store)
        manifest = {
            "method": method,
            "shape": [q, num_train],
            "sign": sign,
            "query_indices": query_indices.tolist(),
            "train_indices": train_indices.tolist(),
        }
        store.with_suffix(".json").write_text(json.dumps(manifest))
        if values is None:
            values = torch.from_numpy(np.load(store, mmap_mode="r+"))
    top = None
    if running_large is not None:
        top = TopK(running_large[0], running_large[1], running_small[0], running_small[1])
    return Scores(method, query_indices, train_indices, values, top, layers, path)
