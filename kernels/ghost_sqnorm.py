"""Per-sample squared gradient norms of a linear layer from its activations and output grads.

For sample i with input activations ``a_i`` [T, d_in] and output gradients ``b_i`` [T, d_out], the
weight gradient is ``G_i = b_i^T a_i`` [d_out, d_in] and

    ||G_i||_F^2 = sum_{t,s} (a_it . a_is)(b_it . b_is)    ghost (Gram) form, O(T^2 (d_in + d_out))
                = sum_{o,j} (sum_t b_ito a_itj)^2          direct form, O(T d_in d_out)

The caller picks the cheaper form per layer. Both forms accept ``[N, d]`` inputs as T = 1.

Dtypes: fp16/bf16 inputs accumulate in fp32 and return fp32; fp32 and float64 return their own
dtype. The Triton launchers read fp32/fp16/bf16; float64 always runs the torch reference.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import (
    accumulation_dtype,
    as_layer_pair,
    cdiv,
    dot_block,
    dot_precision,
    empty_output,
    launch_dtype,
    lazy_kernel,
    select_backend,
    tile_grid,
    tl,
)
from ._tiles import block_range, gram_tile

# Elements of the largest intermediate the references build at once (Gram tiles, or G_i batches):
# 2**24 elements = 64 MiB in fp32, so memory stays bounded for any N and T.
DEFAULT_MAX_ELEMENTS = 2**24


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def ghost_sqnorm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norms ``||b_i^T a_i||^2`` via the Gram form, never forming G_i.

    Args:
        a: input activations, ``[N, T, d_in]`` (or ``[N, d_in]`` for T = 1).
        b: output gradients, ``[N, T, d_out]`` (or ``[N, d_out]``).

    Returns:
        ``[N]`` squared norms (fp32 for half inputs, else the input dtype).
    """
    a, b = _validated(a, b, "ghost_sqnorm")
    if select_backend("ghost_sqnorm", a, b) == "triton":
        return ghost_sqnorm_triton(a, b)
    return ghost_sqnorm_reference(a, b)


def direct_sqnorm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norms ``||b_i^T a_i||^2`` by forming G_i (cheap for small d_in * d_out).

    Same arguments and result as :func:`ghost_sqnorm`.
    """
    a, b = _validated(a, b, "direct_sqnorm")
    if select_backend("direct_sqnorm", a, b) == "triton":
        return direct_sqnorm_triton(a, b)
    return direct_sqnorm_reference(a, b)


def _validated(a: torch.Tensor, b: torch.Tensor, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    return as_layer_pair(kernel, a, b)


# --------------------------------------------------------------------------------------------------
# References (pure torch, compute in the input dtype; half inputs are upcast to fp32)
# --------------------------------------------------------------------------------------------------


def ghost_sqnorm_reference(
    a: torch.Tensor, b: torch.Tensor, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> torch.Tensor:
    """``sum_{t,s} (a_t . a_s)(b_t . b_s)`` per sample, chunked over N and tiled over T.

    At most ``max_elements`` Gram entries exist at once: samples are processed in chunks and, when
    one T x T Gram matrix alone is too large, the (t, s) plane is walked tile by tile.
    """
    a, b = _validated(a, b, "ghost_sqnorm_reference")
    n_samples, seq_len = a.shape[:2]
    acc_dtype = accumulation_dtype(a.dtype)
    out = torch.zeros(n_samples, dtype=acc_dtype, device=a.device)
    t_block = seq_len if seq_len * seq_len <= max_elements else max(1, math.isqrt(max_elements))
    n_chunk = max(1, max_elements // max(1, t_block * t_block))
    for n0 in range(0, n_samples, n_chunk):
        a_chunk = a[n0 : n0 + n_chunk].to(acc_dtype)  # [n, T, d_in]
        b_chunk = b[n0 : n0 + n_chunk].to(acc_dtype)  # [n, T, d_out]
        for t0 in range(0, seq_len, t_block):
            for s0 in range(0, seq_len, t_block):
                t_sl, s_sl = slice(t0, t0 + t_block), slice(s0, s0 + t_block)
                gram_a = a_chunk[:, t_sl] @ a_chunk[:, s_sl].transpose(1, 2)  # [n, bt, bs]
                gram_b = b_chunk[:, t_sl] @ b_chunk[:, s_sl].transpose(1, 2)  # [n, bt, bs]
                out[n0 : n0 + n_chunk] += (gram_a * gram_b).sum(dim=(1, 2))
    return out


def direct_sqnorm_reference(
    a: torch.Tensor, b: torch.Tensor, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> torch.Tensor:
    """Materialize ``G_i = b_i^T a_i`` for chunks of samples and sum their squares."""
    a, b = _validated(a, b, "direct_sqnorm_reference")
    n_samples = a.shape[0]
    d_in, d_out = a.shape[2], b.shape[2]
    acc_dtype = accumulation_dtype(a.dtype)
    out = torch.zeros(n_samples, dtype=acc_dtype, device=a.device)
    n_chunk = max(1, max_elements // max(1, d_in * d_out))
    for n0 in range(0, n_samples, n_chunk):
        a_chunk = a[n0 : n0 + n_chunk].to(acc_dtype)  # [n, T, d_in]
        b_chunk = b[n0 : n0 + n_chunk].to(acc_dtype)  # [n, T, d_out]
        grads = torch.bmm(b_chunk.transpose(1, 2), a_chunk)  # [n, d_out, d_in]
        out[n0 : n0 + n_chunk] = grads.pow(2).sum(dim=(1, 2))
    return out


# --------------------------------------------------------------------------------------------------
# Triton: ghost (Gram) form
# --------------------------------------------------------------------------------------------------

# Block sizes are powers of two >= 16 (tl.dot minimum). Not yet tuned on a GPU: 64 x 32 keeps two
# [64, 64] fp32 Gram tiles plus four [64, 32] operand tiles in registers at 4 warps.
GHOST_BLOCK_T = 64
GHOST_BLOCK_D = 32


@lazy_kernel
def _ghost_sqnorm_kernel(
    a_ptr,
    b_ptr,
    partial_ptr,
    seq_len,
    d_in,
    d_out,
    stride_an,
    stride_at,
    stride_ad,
    stride_bn,
    stride_bt,
    stride_bd,
    n_t_blocks,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (i, tb): sum over s-blocks sb >= tb of sum((A_t A_s^T) * (B_t B_s^T)) for sample i.

    The Gram matrices are symmetric, so off-diagonal tile pairs count twice and the lower triangle
    is skipped. Each Gram tile lives in registers only; partial[i, tb] receives the program's sum.
    """
    sample = tl.program_id(0).to(tl.int64)
    t_block = tl.program_id(1)
    t_offsets, t_mask = block_range(t_block * BLOCK_T, seq_len, BLOCK_T)  # [BT]
    a_sample = a_ptr + sample * stride_an
    b_sample = b_ptr + sample * stride_bn
    # [BT] pointers to the rows a_t, b_t
    a_t = a_sample + t_offsets * stride_at
    b_t = b_sample + t_offsets * stride_bt
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for s_block in range(t_block, n_t_blocks):
        s_offsets, s_mask = block_range(s_block * BLOCK_T, seq_len, BLOCK_T)  # [BS]
        a_s = a_sample + s_offsets * stride_at
        b_s = b_sample + s_offsets * stride_bt
        # gram_a[t, s] = a_t . a_s over d_in, gram_b[t, s] = b_t . b_s over d_out: [BT, BS]
        gram_a = gram_tile(
            a_t, t_mask, stride_ad, a_s, s_mask, stride_ad, d_in, BLOCK_D, DOT_PRECISION
        )
        gram_b = gram_tile(
            b_t, t_mask, stride_bd, b_s, s_mask, stride_bd, d_out, BLOCK_D, DOT_PRECISION
        )
        # Off-diagonal tiles stand for their mirror image too.
        weight = 2.0 - (s_block == t_block).to(tl.float32)
        acc += weight * gram_a * gram_b
    tl.store(partial_ptr + sample * n_t_blocks + t_block, tl.sum(acc))


def ghost_sqnorm_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Launch the Gram-form kernel: grid (N, T blocks), then a torch sum over the T blocks."""
    a, b = _validated(a, b, "ghost_sqnorm_triton")
    acc_dtype = launch_dtype("ghost_sqnorm_triton", a)
    n_samples, seq_len = a.shape[:2]
    if n_samples == 0 or seq_len == 0:
        return torch.zeros(n_samples, dtype=acc_dtype, device=a.device)
    block_t = dot_block(seq_len, GHOST_BLOCK_T)
    block_d = dot_block(max(a.shape[2], b.shape[2]), GHOST_BLOCK_D)
    grid = tile_grid("ghost_sqnorm", ("N", n_samples, 1), ("T", seq_len, block_t))
    n_t_blocks = grid[1]
    # [N, T blocks]: every entry is written by exactly one program
    partial = empty_output(n_samples, n_t_blocks, device=a.device)
    _ghost_sqnorm_kernel[grid](
        a, b, partial, seq_len, a.shape[2], b.shape[2], *a.stride(), *b.stride(), n_t_blocks,
        BLOCK_T=block_t, BLOCK_D=block_d, DOT_PRECISION=dot_precision(a.dtype),
    )  # fmt: skip
    return partial.sum(dim=1).to(acc_dtype)


# --------------------------------------------------------------------------------------------------
# Triton: direct form
# --------------------------------------------------------------------------------------------------

# G is tiled in [BLOCK_O, BLOCK_I] tiles, each accumulated over T in BLOCK_T steps. Not yet tuned.
DIRECT_BLOCK_O = 64
DIRECT_BLOCK_I = 64
DIRECT_BLOCK_T = 32


@lazy_kernel
def _direct_sqnorm_kernel(
    a_ptr,
    b_ptr,
    partial_ptr,
    seq_len,
    d_in,
    d_out,
    stride_an,
    stride_at,
    stride_ad,
    stride_bn,
    stride_bt,
    stride_bd,
    n_in_tiles,
    n_tiles,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (i, tile): one [BLOCK_O, BLOCK_I] tile of G_i = b_i^T a_i, then its squared sum."""
    sample = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    o_offsets, o_mask = block_range((tile // n_in_tiles) * BLOCK_O, d_out, BLOCK_O)  # [BO]
    i_offsets, i_mask = block_range((tile % n_in_tiles) * BLOCK_I, d_in, BLOCK_I)  # [BI]
    # G[o, i] = sum_t b[t, o] a[t, i]: "rows" are the feature columns o of b and i of a, read along T
    b_cols = b_ptr + sample * stride_bn + o_offsets * stride_bd
    a_cols = a_ptr + sample * stride_an + i_offsets * stride_ad
    grad_tile = gram_tile(
        b_cols, o_mask, stride_bt, a_cols, i_mask, stride_at, seq_len, BLOCK_T, DOT_PRECISION
    )  # [BO, BI]
    tl.store(partial_ptr + sample * n_tiles + tile, tl.sum(grad_tile * grad_tile))


def direct_sqnorm_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Launch the direct-form kernel: grid (N, tiles of G), then a torch sum over tiles."""
    a, b = _validated(a, b, "direct_sqnorm_triton")
    acc_dtype = launch_dtype("direct_sqnorm_triton", a)
    n_samples, seq_len = a.shape[:2]
    d_in, d_out = a.shape[2], b.shape[2]
    if n_samples == 0 or seq_len == 0 or d_in == 0 or d_out == 0:
        return torch.zeros(n_samples, dtype=acc_dtype, device=a.device)
    block_o = dot_block(d_out, DIRECT_BLOCK_O)
    block_i = dot_block(d_in, DIRECT_BLOCK_I)
    block_t = dot_block(seq_len, DIRECT_BLOCK_T)
    n_in_tiles = cdiv(d_in, block_i)
    n_tiles = cdiv(d_out, block_o) * n_in_tiles
    tiles = f"tiles of G, d_out x d_in = {d_out} x {d_in} in {block_o} x {block_i}"
    grid = tile_grid("direct_sqnorm", ("N", n_samples, 1), (tiles, n_tiles, 1))
    # [N, tiles of G]: every entry is written by exactly one program
    partial = empty_output(n_samples, n_tiles, device=a.device)
    _direct_sqnorm_kernel[grid](
        a, b, partial, seq_len, d_in, d_out, *a.stride(), *b.stride(), n_in_tiles, n_tiles,
        BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_I=block_i, DOT_PRECISION=dot_precision(a.dtype),
    )  # fmt: skip
    return partial.sum(dim=1).to(acc_dtype)
