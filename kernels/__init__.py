"""Kernels for per-example gradient analytics (Triton on CUDA, pure torch elsewhere).

Installed as ``influx.kernels``; it imports nothing from ``influx``. Every kernel has a pure-torch
``<name>_reference`` next to it. The public functions below dispatch: Triton when the tensors are
on CUDA in a dtype where the kernel was measured faster (half precision for all, float32 for
``direct_sqnorm``), the reference otherwise; ``INFLUX_KERNELS=torch|triton`` forces one (Triton
on CPU tensors needs ``TRITON_INTERPRET=1``). Shapes: N (and M) samples, T positions, d_in /
d_out features, Q queries, K feature dimension of a score.
"""

from ._dispatch import KernelBackendError, KernelInputError, select_backend
from .ghost_sqnorm import (
    direct_sqnorm,
    direct_sqnorm_reference,
    ghost_sqnorm,
    ghost_sqnorm_reference,
)
from .kron_project import kron_project, kron_project_reference
from .pairwise_grad_dot import pairwise_grad_dot, pairwise_grad_dot_reference
from .score_topk import TopK, merge_topk, score_topk, score_topk_reference

__all__ = [
    "KernelBackendError",
    "KernelInputError",
    "TopK",
    "direct_sqnorm",
    "direct_sqnorm_reference",
    "ghost_sqnorm",
    "ghost_sqnorm_reference",
    "kron_project",
    "kron_project_reference",
    "merge_topk",
    "pairwise_grad_dot",
    "pairwise_grad_dot_reference",
    "score_topk",
    "score_topk_reference",
    "select_backend",
]
