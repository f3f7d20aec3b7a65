"""Tile-level Triton device functions shared by the kernels; Triton inlines them into each kernel.

A tile is addressed by a vector of row pointers ``[R]`` (base + int64 row offsets * row stride) with
its row mask, and by int64 column offsets with their mask and the column stride. Every load and
store is masked on both edges, so block sizes need not divide the extents.

Like the kernels, these are compiled lazily (see ``_dispatch.LazyKernel``): a kernel jitted for the
interpreter calls interpreted versions of them, a compiled kernel calls compiled ones.
"""

from __future__ import annotations

from ._dispatch import lazy_kernel, tl


@lazy_kernel
def block_range(start, bound, BLOCK: tl.constexpr):
    """int64 offsets ``start, ..., start + BLOCK - 1`` ``[BLOCK]`` and their mask ``offsets < bound``."""
    offsets = (start + tl.arange(0, BLOCK)).to(tl.int64)
    return offsets, offsets < bound


@lazy_kernel
def load_tile(row_ptrs, row_mask, cols, col_mask, stride_col):
    """``[R, C]`` tile ``row_ptrs[r][cols[c] * stride_col]``; 0 where either mask is off."""
    return tl.load(
        row_ptrs[:, None] + cols[None, :] * stride_col,
        mask=row_mask[:, None] & col_mask[None, :],
        other=0.0,
    )


@lazy_kernel
def store_tile(row_ptrs, row_mask, cols, col_mask, stride_col, value):
    """Write the ``[R, C]`` tile ``value`` to ``row_ptrs[r][cols[c] * stride_col]`` inside the masks."""
    tl.store(
        row_ptrs[:, None] + cols[None, :] * stride_col,
        value,
        mask=row_mask[:, None] & col_mask[None, :],
    )


@lazy_kernel
def gram_tile(
    x_rows,
    x_mask,
    x_stride,
    y_rows,
    y_mask,
    y_stride,
    depth,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``[R, S]`` fp32 tile of ``X Y^T``: sum over d < depth of ``x[r, d] * y[s, d]``.

    Row r of X starts at ``x_rows[r]`` and its entries are ``x_stride`` apart (likewise Y), so one
    function serves Gram tiles (rows of one matrix against rows of itself or of another batch),
    projections (rows of a against rows of P) and transposed products (a "row" may be a feature
    column, with ``depth`` running over positions). The depth is walked in masked BLOCK_D chunks.
    """
    acc = tl.zeros((x_rows.shape[0], y_rows.shape[0]), dtype=tl.float32)
    for d0 in range(0, depth, BLOCK_D):
        d_offsets, d_mask = block_range(d0, depth, BLOCK_D)
        x_tile = load_tile(x_rows, x_mask, d_offsets, d_mask, x_stride)  # [R, BD]
        y_tile = load_tile(y_rows, y_mask, d_offsets, d_mask, y_stride)  # [S, BD]
        acc += tl.dot(x_tile, tl.trans(y_tile), input_precision=DOT_PRECISION)
    return acc
