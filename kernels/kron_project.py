"""Kronecker (LoGra-style) projection of per-sample gradients, never forming G_i.

With ``a_i`` [T, d_in], ``b_i`` [T, d_out], ``P_in`` [k_in, d_in] and ``P_out`` [k_out, d_out]:

    G~_i = P_out G_i P_in^T = (b_i P_out^T)^T (a_i P_in^T)        [k_out, k_in]

summed over T. Dtypes: fp16/bf16 inputs accumulate in fp32 and return fp32; fp32 and float64 return
their own dtype. The Triton launcher reads fp32/fp16/bf16; float64 always runs the torch reference.
"""

from __future__ import annotations

import torch

from ._dispatch import (
    accumulation_dtype,
    as_layer_pair,
    check_last_dim,
    check_matrix,
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


def kron_project(
    a: torch.Tensor, b: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor
) -> torch.Tensor:
    """Projected per-sample gradients ``(b_i P_out^T)^T (a_i P_in^T)``.

    Args:
        a: input activations ``[N, T, d_in]`` (or ``[N, d_in]`` for T = 1).
        b: output gradients ``[N, T, d_out]`` (or ``[N, d_out]``).
        p_in: input-side projection ``[k_in, d_in]``.
        p_out: output-side projection ``[k_out, d_out]``.

    Returns:
        ``[N, k_out, k_in]`` (fp32 for half inputs, else the input dtype).
    """
    a, b, p_in, p_out = _validated(a, b, p_in, p_out, "kron_project")
    if select_backend("kron_project", a, b, p_in, p_out) == "triton":
        return kron_project_triton(a, b, p_in, p_out)
    return kron_project_reference(a, b, p_in, p_out)


def _validated(
    a: torch.Tensor, b: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor, kernel: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = as_layer_pair(kernel, a, b)
    for name, proj, feature in (("p_in", p_in, "d_in"), ("p_out", p_out, "d_out")):
        check_matrix(kernel, name, proj, f"[k, {feature}]", "pass one projection per side")
    check_last_dim(kernel, "p_in", p_in, a.shape[2], "d_in of `a`")
    check_last_dim(kernel, "p_out", p_out, b.shape[2], "d_out of `b`")
    check_same_kind(kernel, (a, p_in, p_out), ("a", "p_in", "p_out"))
    return a, b, p_in, p_out


def kron_project_reference(
    a: torch.Tensor, b: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor
) -> torch.Tensor:
    """Project both sides with matmuls, then contract over T with a batched matmul."""
    a, b, p_in, p_out = _validated(a, b, p_in, p_out, "kron_project_reference")
    acc_dtype = accumulation_dtype(a.dtype)
    a_proj = a.to(acc_dtype) @ p_in.to(acc_dtype).T  # [N, T, k_in]
    b_proj = b.to(acc_dtype) @ p_out.to(acc_dtype).T  # [N, T, k_out]
    return torch.bmm(b_proj.transpose(1, 2), a_proj)  # [N, k_out, k_in]


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------

# One program owns a [BLOCK_KO, BLOCK_KI] tile of one sample's output; 64 x 64 covers the usual
# LoGra sizes (k_in, k_out <= 64) in one tile, so each projection of a_i and b_i is computed once.
# Not yet tuned on a GPU.
KRON_BLOCK_KO = 64
KRON_BLOCK_KI = 64
KRON_BLOCK_T = 32
KRON_BLOCK_D = 32


@lazy_kernel
def _kron_project_kernel(
    a_ptr,
    b_ptr,
    p_in_ptr,
    p_out_ptr,
    out_ptr,
    seq_len,
    d_in,
    d_out,
    k_in,
    k_out,
    stride_an,
    stride_at,
    stride_ad,
    stride_bn,
    stride_bt,
    stride_bd,
    stride_pik,
    stride_pid,
    stride_pok,
    stride_pod,
    stride_on,
    stride_oo,
    stride_oi,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_KO: tl.constexpr,
    BLOCK_KI: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (i, ko, ki): out[i, ko, ki] = sum over T chunks of (b_i P_out^T)^T (a_i P_in^T).

    The projected chunks [BLOCK_T, BLOCK_K*] stay in registers; nothing but the output is written.
    """
    sample = tl.program_id(0).to(tl.int64)
    ko_offsets, ko_mask = block_range(tl.program_id(1) * BLOCK_KO, k_out, BLOCK_KO)  # [BKO]
    ki_offsets, ki_mask = block_range(tl.program_id(2) * BLOCK_KI, k_in, BLOCK_KI)  # [BKI]
    a_sample = a_ptr + sample * stride_an
    b_sample = b_ptr + sample * stride_bn
    # [BKI] / [BKO] pointers to the rows of P_in / P_out this program projects onto
    p_in_rows = p_in_ptr + ki_offsets * stride_pik
    p_out_rows = p_out_ptr + ko_offsets * stride_pok
    acc = tl.zeros((BLOCK_KO, BLOCK_KI), dtype=tl.float32)
    for t0 in range(0, seq_len, BLOCK_T):
        t_offsets, t_mask = block_range(t0, seq_len, BLOCK_T)  # [BT]
        a_t = a_sample + t_offsets * stride_at
        b_t = b_sample + t_offsets * stride_bt
        # a_proj = a_i[t-chunk] @ P_in[ki-tile]^T [BT, BKI]; b_proj likewise with P_out [BT, BKO]
        a_proj = gram_tile(
            a_t, t_mask, stride_ad, p_in_rows, ki_mask, stride_pid, d_in, BLOCK_D, DOT_PRECISION
        )
        b_proj = gram_tile(
            b_t, t_mask, stride_bd, p_out_rows, ko_mask, stride_pod, d_out, BLOCK_D, DOT_PRECISION
        )
        # fp32 intermediates: exact fp32 products whatever the input dtype
        acc += tl.dot(tl.trans(b_proj), a_proj, input_precision="ieee")
    out_rows = out_ptr + sample * stride_on + ko_offsets * stride_oo
    store_tile(out_rows, ko_mask, ki_offsets, ki_mask, stride_oi, acc)


def kron_project_triton(
    a: torch.Tensor, b: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor
) -> torch.Tensor:
    """Launch the fused projection: grid (N, k_out tiles, k_in tiles)."""
    a, b, p_in, p_out = _validated(a, b, p_in, p_out, "kron_project_triton")
    acc_dtype = launch_dtype("kron_project_triton", a)
    n_samples, seq_len = a.shape[:2]
    k_in, k_out = p_in.shape[0], p_out.shape[0]
    if n_samples == 0 or k_in == 0 or k_out == 0 or seq_len == 0:
        return torch.zeros(n_samples, k_out, k_in, dtype=acc_dtype, device=a.device)
    block_ko = dot_block(k_out, KRON_BLOCK_KO)
    block_ki = dot_block(k_in, KRON_BLOCK_KI)
    block_t = dot_block(seq_len, KRON_BLOCK_T)
    block_d = dot_block(max(a.shape[2], b.shape[2]), KRON_BLOCK_D)
    grid = tile_grid(
        "kron_project", ("N", n_samples, 1), ("k_out", k_out, block_ko), ("k_in", k_in, block_ki)
    )
    # [N, k_out, k_in] fp32: every entry is written by exactly one program
    out = empty_output(n_samples, k_out, k_in, device=a.device)
    _kron_project_kernel[grid](
        a, b, p_in, p_out, out, seq_len, a.shape[2], b.shape[2], k_in, k_out,
        *a.stride(), *b.stride(), *p_in.stride(), *p_out.stride(), *out.stride(),
        BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_KO=block_ko, BLOCK_KI=block_ki,
        DOT_PRECISION=dot_precision(a.dtype),
    )  # fmt: skip
    return out.to(acc_dtype)
