"""Pairwise inner products of per-sample gradients, never forming G.

For samples i of one batch (``a`` [N, T, d_in], ``b`` [N, T, d_out]) and j of another
(``a2`` [M, T2, d_in], ``b2`` [M, T2, d_out]):

    <G_i, G'_j> = sum_{t,s} (a_it . a2_js)(b_it . b2_js)      (T = 1: (a_i . a2_j)(b_i . b2_j))

Dtypes: fp16/bf16 inputs accumulate in fp32 and return fp32; fp32 and float64 return their own
dtype. The Triton launcher reads fp32/fp16/bf16; float64 always runs the torch reference.
"""

from __future__ import annotations

import torch

from ._dispatch import (
    KernelInputError,
    accumulation_dtype,
    as_layer_pair,
    check_last_dim,
    check_same_kind,
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

# Elements of the largest Gram block [rows, cols, T, T2] the reference builds at once (64 MiB fp32).
DEFAULT_MAX_ELEMENTS = 2**24


def pairwise_grad_dot(
    a: torch.Tensor,
    b: torch.Tensor,
    a2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Matrix of gradient inner products ``<G_i, G'_j>``.

    Args:
        a, b: activations ``[N, T, d_in]`` and output grads ``[N, T, d_out]`` (2-D means T = 1).
        a2, b2: the second batch ``[M, T2, d_in]``, ``[M, T2, d_out]``; default ``a``, ``b``.

    Returns:
        ``[N, M]`` (fp32 for half inputs, else the input dtype).
    """
    a, b, a2, b2 = _validated(a, b, a2, b2, "pairwise_grad_dot")
    if select_backend("pairwise_grad_dot", a, b, a2, b2) == "triton":
        return pairwise_grad_dot_triton(a, b, a2, b2)
    return pairwise_grad_dot_reference(a, b, a2, b2)


def _validated(
    a: torch.Tensor,
    b: torch.Tensor,
    a2: torch.Tensor | None,
    b2: torch.Tensor | None,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = as_layer_pair(kernel, a, b)
    if (a2 is None) != (b2 is None):
        raise KernelInputError(
            f"{kernel}: pass both `a2` and `b2` (the second batch) or neither "
            f"(pairs within `a`, `b`)."
        )
    if a2 is None:
        return a, b, a, b
    a2, b2 = as_layer_pair(kernel, a2, b2, "a2", "b2")
    check_last_dim(kernel, "a2", a2, a.shape[2], "d_in of `a`")
    check_last_dim(kernel, "b2", b2, b.shape[2], "d_out of `b`")
    check_same_kind(kernel, (a, a2), ("a", "a2"))
    return a, b, a2, b2


def pairwise_grad_dot_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    a2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """The Gram-form double sum, in blocks of rows and columns of at most ``max_elements`` entries.

    One (i, j) pair needs a T x T2 block; that is the floor of the memory used.
    """
    a, b, a2, b2 = _validated(a, b, a2, b2, "pairwise_grad_dot_reference")
    n_rows, seq_len = a.shape[:2]
    n_cols, seq_len2 = a2.shape[:2]
    acc_dtype = accumulation_dtype(a.dtype)
    out = empty_output(n_rows, n_cols, dtype=acc_dtype, device=a.device)
    pair_elements = max(1, seq_len * seq_len2)
    col_block = max(1, min(n_cols, max_elements // pair_elements))
    row_block = max(1, max_elements // (pair_elements * col_block))
    for i0 in range(0, n_rows, row_block):
        a_rows = a[i0 : i0 + row_block].to(acc_dtype)  # [r, T, d_in]
        b_rows = b[i0 : i0 + row_block].to(acc_dtype)  # [r, T, d_out]
        for j0 in range(0, n_cols, col_block):
            a_cols = a2[j0 : j0 + col_block].to(acc_dtype)  # [c, T2, d_in]
            b_cols = b2[j0 : j0 + col_block].to(acc_dtype)  # [c, T2, d_out]
            gram_a = torch.einsum("itd,jsd->ijts", a_rows, a_cols)  # [r, c, T, T2]
            gram_b = torch.einsum("itd,jsd->ijts", b_rows, b_cols)  # [r, c, T, T2]
            block = (gram_a * gram_b).sum(dim=(2, 3))  # [r, c]
            out[i0 : i0 + row_block, j0 : j0 + col_block] = block
    return out


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------

# One program owns a [BLOCK_I, BLOCK_J] tile of the output and walks every (t, s) pair; the Gram
# tiles across samples are built from [BLOCK_*, BLOCK_D] operand tiles. Not yet tuned on a GPU.
PAIRWISE_BLOCK_I = 64
PAIRWISE_BLOCK_J = 64
PAIRWISE_BLOCK_D = 32


@lazy_kernel
def _pairwise_grad_dot_kernel(
    a_ptr,
    b_ptr,
    a2_ptr,
    b2_ptr,
    out_ptr,
    n_rows,
    n_cols,
    seq_len,
    seq_len2,
    d_in,
    d_out,
    stride_an,
    stride_at,
    stride_ad,
    stride_bn,
    stride_bt,
    stride_bd,
    stride_a2n,
    stride_a2t,
    stride_a2d,
    stride_b2n,
    stride_b2t,
    stride_b2d,
    stride_oi,
    stride_oj,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (ib, jb): out[i, j] = sum_{t,s} (a_it . a2_js)(b_it . b2_js) for a tile of (i, j)."""
    rows, row_mask = block_range(tl.program_id(0) * BLOCK_I, n_rows, BLOCK_I)  # [BI]
    cols, col_mask = block_range(tl.program_id(1) * BLOCK_J, n_cols, BLOCK_J)  # [BJ]
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for t in range(0, seq_len):
        # [BI] pointers to a_it, b_it for the tile's samples i
        a_t = a_ptr + rows * stride_an + t * stride_at
        b_t = b_ptr + rows * stride_bn + t * stride_bt
        for s in range(0, seq_len2):
            # [BJ] pointers to a2_js, b2_js for the tile's samples j
            a2_s = a2_ptr + cols * stride_a2n + s * stride_a2t
            b2_s = b2_ptr + cols * stride_b2n + s * stride_b2t
            # gram_a[i, j] = a_it . a2_js, gram_b[i, j] = b_it . b2_js: [BI, BJ]
            gram_a = gram_tile(
                a_t, row_mask, stride_ad, a2_s, col_mask, stride_a2d, d_in, BLOCK_D, DOT_PRECISION
            )
            gram_b = gram_tile(
                b_t, row_mask, stride_bd, b2_s, col_mask, stride_b2d, d_out, BLOCK_D, DOT_PRECISION
            )
            acc += gram_a * gram_b
    store_tile(out_ptr + rows * stride_oi, row_mask, cols, col_mask, stride_oj, acc)


def pairwise_grad_dot_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    a2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the pairwise kernel: grid (N tiles, M tiles); cost O(N M T T2 (d_in + d_out))."""
    a, b, a2, b2 = _validated(a, b, a2, b2, "pairwise_grad_dot_triton")
    acc_dtype = launch_dtype("pairwise_grad_dot_triton", a)
    n_rows, seq_len = a.shape[:2]
    n_cols, seq_len2 = a2.shape[:2]
    if n_rows == 0 or n_cols == 0 or seq_len == 0 or seq_len2 == 0:
        return torch.zeros(n_rows, n_cols, dtype=acc_dtype, device=a.device)
    block_i = dot_block(n_rows, PAIRWISE_BLOCK_I)
    block_j = dot_block(n_cols, PAIRWISE_BLOCK_J)
    block_d = dot_block(max(a.shape[2], b.shape[2]), PAIRWISE_BLOCK_D)
    grid = tile_grid("pairwise_grad_dot", ("N", n_rows, block_i), ("M", n_cols, block_j))
    # [N, M] fp32: every entry is written by exactly one program
    out = empty_output(n_rows, n_cols, device=a.device)
    _pairwise_grad_dot_kernel[grid](
        a, b, a2, b2, out, n_rows, n_cols, seq_len, seq_len2, a.shape[2], b.shape[2],
        *a.stride(), *b.stride(), *a2.stride(), *b2.stride(), *out.stride(),
        BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_D=block_d, DOT_PRECISION=dot_precision(a.dtype),
    )  # fmt: skip
    return out.to(acc_dtype)
