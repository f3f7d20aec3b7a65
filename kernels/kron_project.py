"""Kronecker (LoGra-style) projection of per-sample gradients, never forming G_i.

With ``a_i`` [T, d_in], ``b_i`` [T, d_out], ``P_in`` [k_in, d_in] and ``P_out`` [k_out, d_out]:

    G~_i = P_out G_i P_in^T = (b_i P_out^T)^T (a_i P_in^T)        [k_out, k_in]

summed over T. Dtypes: fp16/bf16 inputs accumulate in fp32 and return fp32; fp32 and float64 return
their own dtype. The Triton launcher reads fp32/fp16/bf16; float64 always runs the torch reference.
"""

from __future__ import annotations

import torch

from ._dispatch import (
    KernelInputError,
    accumulation_dtype,
    as_sequence,
    cdiv,
    check_grid,
    check_last_dim,
    check_pair,
    check_same_kind,
    check_tensor,
    lazy_kernel,
    select_backend,
    tl,
)


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
    a = as_sequence(kernel, "a", a, "d_in")
    b = as_sequence(kernel, "b", b, "d_out")
    check_pair(kernel, a, b, "a", "b")
    for name, proj, feature in (("p_in", p_in, "d_in"), ("p_out", p_out, "d_out")):
        check_tensor(kernel, name, proj)
        if proj.dim() != 2:
            raise KernelInputError(
                f"{kernel}: `{name}` must be a matrix [k, {feature}], got shape "
                f"{list(proj.shape)}; pass one projection per side."
            )
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
