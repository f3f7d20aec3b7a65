"""Streaming scores ``S = query @ train^T`` with the top-k largest and smallest per query.

S is computed in tiles of ``block_q`` queries x ``block_n`` training rows, so it never has to fit in
memory: each tile is merged into running top-k lists (``torch.topk`` over the running list and the
new tile) and, when ``out`` is given, written into it (a ``[Q, N]`` tensor, possibly backed by a
numpy memmap on disk, on any device).

Design: the Triton path computes each tile with a Triton matmul kernel (fp32 accumulation) and
merges with ``torch.topk``; the top-k itself is not fused into the kernel. The tile width keeps the
merge cost (O(k + block_n) per query per tile) small next to the O(K block_n) matmul.

Dtypes: fp16/bf16 inputs give fp32 values; fp32 and float64 keep theirs. Indices are int64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ._dispatch import (
    KernelInputError,
    accumulation_dtype,
    check_matrix,
    check_same_kind,
    check_triton_dtype,
    dot_block,
    dot_precision,
    empty_output,
    launch_dtype,
    lazy_kernel,
    select_backend,
    tile_grid,
    tl,
)
from ._tiles import block_range, gram_tile, store_tile

# Tile of S merged at a time: 1024 x 16384 fp32 = 64 MiB, large enough that topk merges amortize.
DEFAULT_BLOCK_Q = 1024
DEFAULT_BLOCK_N = 16384


class TopK(NamedTuple):
    """Top-k scores per query: values ``[Q, k]``, most extreme first; int64 indices ``[Q, k]``."""

    largest_values: torch.Tensor
    largest_indices: torch.Tensor
    smallest_values: torch.Tensor
    smallest_indices: torch.Tensor


def score_topk(
    query: torch.Tensor,
    train: torch.Tensor,
    k: int,
    *,
    out: torch.Tensor | None = None,
    block_q: int | None = None,
    block_n: int | None = None,
) -> TopK:
    """Top-k largest and smallest entries of each row of ``S = query @ train^T``.

    Args:
        query: ``[Q, K]`` query features (e.g. projected gradients).
        train: ``[N, K]`` training features.
        k: entries kept per query and side; clamped to N.
        out: optional ``[Q, N]`` tensor that receives all of S, block by block (any device/dtype,
            e.g. ``torch.from_numpy(np.lib.format.open_memmap(...))``).
        block_q, block_n: tile sizes (defaults 1024 x 16384).

    Returns:
        :class:`TopK` with ``[Q, min(k, N)]`` values and int64 indices into ``train``.
    """
    block_q, block_n, k = _validated(query, train, k, out, block_q, block_n, "score_topk")
    if select_backend("score_topk", query, train) == "triton":
        return _streaming_topk(query, train, k, out, block_q, block_n, score_tile_triton)
    return _streaming_topk(query, train, k, out, block_q, block_n, score_tile_reference)


def score_topk_reference(
    query: torch.Tensor,
    train: torch.Tensor,
    k: int,
    *,
    out: torch.Tensor | None = None,
    block_q: int | None = None,
    block_n: int | None = None,
) -> TopK:
    """Same as :func:`score_topk` with each tile computed by a torch matmul."""
    block_q, block_n, k = _validated(query, train, k, out, block_q, block_n, "score_topk_reference")
    return _streaming_topk(query, train, k, out, block_q, block_n, score_tile_reference)


def _validated(
    query: torch.Tensor,
    train: torch.Tensor,
    k: int,
    out: torch.Tensor | None,
    block_q: int | None,
    block_n: int | None,
    kernel: str,
) -> tuple[int, int, int]:
    """Check shapes; return (block_q, block_n, k clamped to N)."""
    for name, x, rows in (("query", query, "Q"), ("train", train, "N")):
        check_matrix(kernel, name, x, f"[{rows}, K]", "flatten features with x.flatten(1)")
    if query.shape[1] != train.shape[1]:
        raise KernelInputError(
            f"{kernel}: `query` [Q, K] = {list(query.shape)} and `train` [N, K] = "
            f"{list(train.shape)} must share K: got {query.shape[1]} vs {train.shape[1]}; project "
            f"both with the same projection."
        )
    check_same_kind(kernel, (query, train), ("query", "train"))
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise KernelInputError(f"{kernel}: `k` must be an int >= 0, got {k!r}.")
    n_queries, n_train = query.shape[0], train.shape[0]
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise KernelInputError(
                f"{kernel}: `out` must be a torch.Tensor [Q, N], got {type(out).__name__}; wrap "
                f"a numpy memmap with torch.from_numpy."
            )
        if tuple(out.shape) != (n_queries, n_train):
            raise KernelInputError(
                f"{kernel}: `out` must have shape [Q, N] = [{n_queries}, {n_train}], got "
                f"{list(out.shape)}; allocate it as torch.empty(Q, N)."
            )
    block_q = _block_size(kernel, "block_q", block_q, DEFAULT_BLOCK_Q)
    block_n = _block_size(kernel, "block_n", block_n, DEFAULT_BLOCK_N)
    return block_q, block_n, min(k, n_train)


def _block_size(kernel: str, name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KernelInputError(f"{kernel}: `{name}` must be a positive int or None, got {value!r}.")
    return value


# --------------------------------------------------------------------------------------------------
# Streaming merge (shared by both backends)
# --------------------------------------------------------------------------------------------------

ScoreTile = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def score_tile_reference(query_block: torch.Tensor, train_block: torch.Tensor) -> torch.Tensor:
    """One tile of S, ``[q, K] x [n, K] -> [q, n]``, in the accumulation dtype."""
    acc_dtype = accumulation_dtype(query_block.dtype)
    return query_block.to(acc_dtype) @ train_block.to(acc_dtype).T


def _streaming_topk(
    query: torch.Tensor,
    train: torch.Tensor,
    k: int,
    out: torch.Tensor | None,
    block_q: int,
    block_n: int,
    score_tile: ScoreTile,
) -> TopK:
    n_queries, n_train = query.shape[0], train.shape[0]
    acc_dtype = accumulation_dtype(query.dtype)
    result = _empty_topk(n_queries, k, acc_dtype, query.device)
    for q0 in range(0, n_queries, block_q):
        q1 = min(q0 + block_q, n_queries)
        running = _empty_topk(q1 - q0, 0, acc_dtype, query.device)
        for n0 in range(0, n_train, block_n):
            n1 = min(n0 + block_n, n_train)
            scores = score_tile(query[q0:q1], train[n0:n1])  # [q, n]
            if out is not None:
                out[q0:q1, n0:n1].copy_(scores)
            running = _merge(running, scores, n0, k)
        for field, value in zip(result, running, strict=True):
            field[q0:q1] = value
    return result


def _empty_topk(rows: int, k: int, dtype: torch.dtype, device: torch.device) -> TopK:
    def values() -> torch.Tensor:
        return empty_output(rows, k, dtype=dtype, device=device)

    def indices() -> torch.Tensor:
        return torch.empty(rows, k, dtype=torch.int64, device=device)

    return TopK(values(), indices(), values(), indices())


def _merge(running: TopK, scores: torch.Tensor, offset: int, k: int) -> TopK:
    """Merge the tile ``scores`` [q, n] (columns ``offset``...) into the running top-k lists."""
    columns = torch.arange(offset, offset + scores.shape[1], device=scores.device)
    tile_indices = columns.expand(scores.shape[0], -1)  # [q, n]
    largest = _select(
        running.largest_values, running.largest_indices, scores, tile_indices, k, True
    )
    smallest = _select(
        running.smallest_values, running.smallest_indices, scores, tile_indices, k, False
    )
    return TopK(*largest, *smallest)


def merge_topk(first: TopK, second: TopK, k: int) -> TopK:
    """The top-k of two top-k lists of the same queries (indices as each list holds them).

    The same selection the streaming merge uses, for callers that stream blocks themselves.
    """
    largest = _select(
        first.largest_values, first.largest_indices,
        second.largest_values, second.largest_indices, k, True,
    )  # fmt: skip
    smallest = _select(
        first.smallest_values, first.smallest_indices,
        second.smallest_values, second.smallest_indices, k, False,
    )  # fmt: skip
    return TopK(*largest, *smallest)


def _select(
    values: torch.Tensor,
    indices: torch.Tensor,
    scores: torch.Tensor,
    tile_indices: torch.Tensor,
    k: int,
    largest: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if values.shape[1] == 0:
        # First tile of a query block: nothing to merge with.
        candidates, candidate_indices = scores, tile_indices
    else:
        candidates = torch.cat([values, scores], dim=1)  # [q, k' + n]
        candidate_indices = torch.cat([indices, tile_indices], dim=1)  # [q, k' + n]
    keep = min(k, candidates.shape[1])
    top_values, positions = torch.topk(candidates, keep, dim=1, largest=largest, sorted=True)
    return top_values, torch.gather(candidate_indices, 1, positions)


# --------------------------------------------------------------------------------------------------
# Triton: one tile of S
# --------------------------------------------------------------------------------------------------

# Classic [BLOCK_Q, BLOCK_N] output tiles reduced over K in BLOCK_K steps. Not yet tuned on a GPU.
TILE_BLOCK_Q = 64
TILE_BLOCK_N = 64
TILE_BLOCK_K = 32


@lazy_kernel
def _score_tile_kernel(
    query_ptr,
    train_ptr,
    out_ptr,
    n_queries,
    n_train,
    depth,
    stride_qq,
    stride_qk,
    stride_tn,
    stride_tk,
    stride_oq,
    stride_on,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (qb, nb): out[q, n] = query[q] . train[n] for one [BLOCK_Q, BLOCK_N] tile."""
    q_offsets, q_mask = block_range(tl.program_id(0) * BLOCK_Q, n_queries, BLOCK_Q)  # [BQ]
    n_offsets, n_mask = block_range(tl.program_id(1) * BLOCK_N, n_train, BLOCK_N)  # [BN]
    # [BQ] / [BN] pointers to the query and training rows of this tile
    query_rows = query_ptr + q_offsets * stride_qq
    train_rows = train_ptr + n_offsets * stride_tn
    acc = gram_tile(
        query_rows, q_mask, stride_qk, train_rows, n_mask, stride_tk, depth, BLOCK_K, DOT_PRECISION
    )  # [BQ, BN]
    store_tile(out_ptr + q_offsets * stride_oq, q_mask, n_offsets, n_mask, stride_on, acc)


def score_tile_triton(query_block: torch.Tensor, train_block: torch.Tensor) -> torch.Tensor:
    """One tile of S, ``[q, K] x [n, K] -> [q, n]`` fp32 accumulated, in the accumulation dtype."""
    acc_dtype = launch_dtype("score_topk_triton", query_block)
    n_queries, depth = query_block.shape
    n_train = train_block.shape[0]
    if n_queries == 0 or n_train == 0 or depth == 0:
        return torch.zeros(n_queries, n_train, dtype=acc_dtype, device=query_block.device)
    block_q = dot_block(n_queries, TILE_BLOCK_Q)
    block_n = dot_block(n_train, TILE_BLOCK_N)
    block_k = dot_block(depth, TILE_BLOCK_K)
    grid = tile_grid("score_topk", ("block_q", n_queries, block_q), ("block_n", n_train, block_n))
    # [q, n] fp32: every entry is written by exactly one program
    scores = empty_output(n_queries, n_train, device=query_block.device)
    _score_tile_kernel[grid](
        query_block, train_block, scores, n_queries, n_train, depth,
        *query_block.stride(), *train_block.stride(), *scores.stride(),
        BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION=dot_precision(query_block.dtype),
    )  # fmt: skip
    return scores.to(acc_dtype)


def score_topk_triton(
    query: torch.Tensor,
    train: torch.Tensor,
    k: int,
    *,
    out: torch.Tensor | None = None,
    block_q: int | None = None,
    block_n: int | None = None,
) -> TopK:
    """Same as :func:`score_topk` with each tile computed by the Triton tile kernel."""
    block_q, block_n, k = _validated(query, train, k, out, block_q, block_n, "score_topk_triton")
    check_triton_dtype("score_topk_triton", query)
    return _streaming_topk(query, train, k, out, block_q, block_n, score_tile_triton)
