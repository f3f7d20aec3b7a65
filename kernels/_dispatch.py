"""Backend choice, input validation and lazy Triton compilation shared by every kernel.

Each public kernel function validates its inputs here, then asks :func:`select_backend` whether to
run the Triton launcher or the pure-torch ``<name>_reference``:

* tensors on CUDA, Triton importable and a dtype where the kernel was measured faster than its
  reference (:data:`TRITON_FASTER`) -> ``"triton"``; anything else -> ``"torch"``;
* the environment variable ``INFLUX_KERNELS=torch|triton`` forces one. Triton on CPU tensors only
  works under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the tests exercise the
  kernels without a GPU.

This package imports nothing from ``influx``: the errors below are its own (``ValueError`` /
``RuntimeError`` subclasses, so callers may catch the builtins).
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - Triton ships with torch on Linux only
    HAS_TRITON = False
    triton = None
    tl = None

Backend = Literal["torch", "triton"]
BACKEND_ENV = "INFLUX_KERNELS"
INTERPRET_ENV = "TRITON_INTERPRET"
# Dtypes the Triton launchers read; float64 falls back to the reference (see select_backend).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
# The dtypes in which each kernel beat its torch reference on an H200
# (benchmarks/results/kernels-cuda.md, from a tree whose git metadata was stale; gpu_check.sh
# remeasures it). In float32 the kernels' tl.dot runs exact IEEE products
# (see dot_precision) while cuBLAS' fp32 GEMM is far better tuned, so only direct_sqnorm, which
# squares each tile of G_i as it forms it where its reference writes every G_i, keeps Triton
# there; half precision takes the tensor cores and Triton wins.
TRITON_FASTER: dict[str, tuple[torch.dtype, ...]] = {
    "ghost_sqnorm": HALF_DTYPES,
    "direct_sqnorm": TRITON_DTYPES,
    "kron_project": HALF_DTYPES,
    "pairwise_grad_dot": HALF_DTYPES,
    "score_topk": HALF_DTYPES,
}
# CUDA limits grid axes 1 and 2 to 65535 programs; axis 0 allows 2**31 - 1.
MAX_GRID_Y = 65535
MAX_GRID_X = 2**31 - 1


class KernelInputError(ValueError):
    """A kernel argument has the wrong shape, dtype or device; the message says the fix."""


class KernelBackendError(RuntimeError):
    """The forced backend cannot run here (no Triton, or Triton on CPU without the interpreter)."""


# --------------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------------


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get(INTERPRET_ENV, "0").strip().lower() in ("1", "true", "on")


def forced_backend() -> Backend | None:
    """The backend forced by ``INFLUX_KERNELS``, or None when it is unset or empty."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("torch", "triton"):
        raise KernelBackendError(
            f"{BACKEND_ENV}={value!r} is not a backend: expected 'torch', 'triton' or unset "
            f"(automatic: Triton on CUDA where it is faster, torch elsewhere)."
        )
    return value  # type: ignore[return-value]


def select_backend(kernel: str, *tensors: torch.Tensor) -> Backend:
    """Pick the backend for ``kernel`` on these tensors.

    Automatic choice (:func:`automatic_backend`): Triton when every tensor is on CUDA, Triton is
    importable and every dtype is one where the kernel is faster than its reference; the torch
    reference otherwise (float64 included: the references compute in the input dtype, the Triton
    launchers accumulate in fp32). A forced Triton runs any dtype the launchers read.
    """
    forced = forced_backend()
    on_cuda = all(t.is_cuda for t in tensors)
    dtype_ok = all(t.dtype in TRITON_DTYPES for t in tensors)
    if forced == "torch":
        return "torch"
    if forced == "triton":
        _require_triton(kernel, on_cuda)
        # float64 has no Triton path (fp32 accumulation would lose precision): use the reference.
        return "triton" if dtype_ok else "torch"
    return automatic_backend(kernel, [t.dtype for t in tensors], on_cuda)


def automatic_backend(kernel: str, dtypes: Sequence[torch.dtype], on_cuda: bool) -> Backend:
    """The unforced choice for ``kernel`` on operands of ``dtypes``: see :data:`TRITON_FASTER`."""
    faster = TRITON_FASTER.get(kernel, TRITON_DTYPES)
    if HAS_TRITON and on_cuda and all(dtype in faster for dtype in dtypes):
        return "triton"
    return "torch"


def _require_triton(kernel: str, on_cuda: bool) -> None:
    if not HAS_TRITON:
        raise KernelBackendError(
            f"{BACKEND_ENV}=triton but Triton is not installed; `pip install triton` (Linux) or "
            f"set {BACKEND_ENV}=torch to use {kernel}_reference."
        )
    if not on_cuda and not interpret_mode():
        raise KernelBackendError(
            f"{BACKEND_ENV}=triton on CPU tensors needs the Triton interpreter: set "
            f"{INTERPRET_ENV}=1 (before the first kernel launch), move the tensors to CUDA, or set "
            f"{BACKEND_ENV}=torch for {kernel}_reference."
        )


# --------------------------------------------------------------------------------------------------
# Lazy compilation
# --------------------------------------------------------------------------------------------------


class LazyKernel:
    """A Triton kernel (or device function) compiled on first use, for the interpreter mode then.

    ``triton.jit`` decides at decoration time whether to build an interpreted or a compiled
    function. Decorating lazily lets ``TRITON_INTERPRET`` be set after ``influx.kernels`` was
    imported (e.g. by a test conftest collected after another module imported the package).
    Launch exactly like a jitted kernel: ``kernel[grid](*args, BLOCK=...)``. Device functions
    (``_tiles``) are lazy too: a kernel is jitted with the helpers it names jitted for the same
    mode, since an interpreted kernel cannot call a compiled helper or the reverse.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._jitted: dict[bool, Any] = {}

    def jitted(self) -> Any:
        """The ``triton.jit`` function for the interpreter mode in effect now."""
        mode = interpret_mode()
        jitted = self._jitted.get(mode)
        if jitted is None:
            jitted = self._jitted[mode] = triton.jit(_with_jitted_helpers(self.fn))
        return jitted

    def __getitem__(self, grid: Any) -> Any:
        return self.jitted()[grid]


def _with_jitted_helpers(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` seeing, in place of each lazy function it names, that function jitted for this mode.

    The copy shares ``fn``'s code (so its source, which Triton parses, is the same) and reads a
    snapshot of its module globals with the helpers swapped in.
    """
    helpers = {
        name: value.jitted()
        for name in fn.__code__.co_names
        if isinstance(value := fn.__globals__.get(name), LazyKernel)
    }
    if not helpers:
        return fn
    bound = types.FunctionType(
        fn.__code__, {**fn.__globals__, **helpers}, fn.__name__, fn.__defaults__, fn.__closure__
    )
    for attribute in ("__kwdefaults__", "__annotations__", "__module__", "__qualname__", "__doc__"):
        setattr(bound, attribute, getattr(fn, attribute))
    return bound


def lazy_kernel(fn: Callable[..., Any]) -> LazyKernel:
    """Decorator: mark ``fn`` as a Triton kernel or device function compiled lazily."""
    return LazyKernel(fn)


def cdiv(n: int, block: int) -> int:
    """Ceiling division: the number of blocks of size ``block`` that cover ``n``."""
    return (n + block - 1) // block


def check_grid(kernel: str, grid: Sequence[int], what: Sequence[str]) -> None:
    """Reject launches whose grid exceeds CUDA limits, naming the sizes that caused it."""
    limits = (MAX_GRID_X, MAX_GRID_Y, MAX_GRID_Y)
    for axis, (programs, limit, label) in enumerate(zip(grid, limits, what, strict=False)):
        if programs > limit:
            raise KernelInputError(
                f"{kernel}: input too large for one launch: grid axis {axis} needs {programs} "
                f"programs ({label}) but CUDA allows {limit}; split the input into chunks or set "
                f"{BACKEND_ENV}=torch."
            )


def tile_grid(kernel: str, *axes: tuple[str, int, int]) -> tuple[int, ...]:
    """Launch grid with ``ceil(extent / block)`` programs per axis, checked by :func:`check_grid`.

    Each axis is ``(name, extent, block)``; an oversize axis is reported as
    ``name = extent / block`` (``name = extent`` for block 1).
    """
    grid = tuple(cdiv(extent, block) for _, extent, block in axes)
    labels = [
        f"{name} = {extent}" + (f" / {block}" if block != 1 else "") for name, extent, block in axes
    ]
    check_grid(kernel, grid, labels)
    return grid


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def check_tensor(kernel: str, name: str, x: Any) -> torch.Tensor:
    """``x`` must be a floating-point torch tensor."""
    if not isinstance(x, torch.Tensor):
        raise KernelInputError(
            f"{kernel}: `{name}` must be a torch.Tensor, got {type(x).__name__}; "
            f"wrap arrays with torch.as_tensor."
        )
    if not x.is_floating_point():
        raise KernelInputError(
            f"{kernel}: `{name}` must be floating point, got {x.dtype}; cast with .float()."
        )
    return x


def as_sequence(kernel: str, name: str, x: Any, feature: str) -> torch.Tensor:
    """Return ``x`` as ``[N, T, d]``; a 2-D ``[N, d]`` input is read as T = 1."""
    x = check_tensor(kernel, name, x)
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3:
        raise KernelInputError(
            f"{kernel}: `{name}` must be [N, T, {feature}] (or [N, {feature}] for T = 1), "
            f"got shape {_shape(x)}; flatten extra dimensions into T (e.g. x.flatten(1, -2))."
        )
    return x


def as_layer_pair(
    kernel: str, a: Any, b: Any, a_name: str = "a", b_name: str = "b"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``a`` and output grads ``b`` of one layer as ``[N, T, d_in]``, ``[N, T, d_out]``."""
    a = as_sequence(kernel, a_name, a, "d_in")
    b = as_sequence(kernel, b_name, b, "d_out")
    check_pair(kernel, a, b, a_name, b_name)
    return a, b


def check_matrix(kernel: str, name: str, x: Any, dims: str, fix: str) -> torch.Tensor:
    """``x`` must be a floating-point matrix; ``dims`` names its axes (e.g. "[Q, K]")."""
    x = check_tensor(kernel, name, x)
    if x.dim() != 2:
        raise KernelInputError(
            f"{kernel}: `{name}` must be a matrix {dims}, got shape {list(x.shape)}; {fix}."
        )
    return x


def check_pair(kernel: str, a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    """Activations ``a`` [N, T, d_in] and output grads ``b`` [N, T, d_out] must agree on N and T."""
    if a.shape[:2] != b.shape[:2]:
        raise KernelInputError(
            f"{kernel}: `{a_name}` {_shape(a)} and `{b_name}` {_shape(b)} must share the leading "
            f"[N, T] dimensions: got [{a.shape[0]}, {a.shape[1]}] vs [{b.shape[0]}, {b.shape[1]}]; "
            f"pass the activations and output gradients of the same layer and batch."
        )
    check_same_kind(kernel, (a, b), (a_name, b_name))


def check_same_kind(kernel: str, tensors: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """All tensors must share one dtype and one device."""
    first, first_name = tensors[0], names[0]
    for x, name in zip(tensors[1:], names[1:], strict=True):
        if x.dtype != first.dtype:
            raise KernelInputError(
                f"{kernel}: `{name}` has dtype {x.dtype} but `{first_name}` has {first.dtype}; "
                f"cast both to one dtype."
            )
        if x.device != first.device:
            raise KernelInputError(
                f"{kernel}: `{name}` is on {x.device} but `{first_name}` is on {first.device}; "
                f"move both to one device."
            )


def check_last_dim(kernel: str, name: str, x: torch.Tensor, expected: int, why: str) -> None:
    """``x.shape[-1]`` must equal ``expected``."""
    if x.shape[-1] != expected:
        raise KernelInputError(
            f"{kernel}: `{name}` {_shape(x)} must have last dimension {expected} ({why}), "
            f"got {x.shape[-1]}."
        )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Output dtype of the reductions: fp32 for fp16/bf16 inputs, the input dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot_block(n: int, largest: int) -> int:
    """A block size for a ``tl.dot`` operand dimension: a power of two in [16, largest].

    ``tl.dot`` needs every operand dimension >= 16; smaller extents are masked within the block.
    """
    return max(16, min(largest, next_power_of_2(n)))


def launch_dtype(kernel: str, x: torch.Tensor) -> torch.dtype:
    """Check that a Triton launcher can read ``x``; return the dtype of its result."""
    check_triton_dtype(kernel, x)
    return accumulation_dtype(x.dtype)


def check_triton_dtype(kernel: str, x: torch.Tensor) -> None:
    """The Triton launchers read fp32/fp16/bf16 only."""
    if x.dtype not in TRITON_DTYPES:
        raise KernelInputError(
            f"{kernel}: the Triton launcher reads float32/float16/bfloat16, got {x.dtype}; "
            f"call the public function (it runs the reference for float64) or cast the inputs."
        )


def empty_output(
    *shape: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Uninitialized buffer (fp32 unless told) for a kernel to fill; every entry gets written.

    Launchers allocate through this one function so that tests can swap in a NaN-filled buffer
    (``monkeypatch.setattr(module, "empty_output", ...)``) and catch entries a kernel never writes.
    """
    return torch.empty(*shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for operands read in ``dtype``.

    fp32 operands: "ieee" (exact fp32 products; TF32 would cost ~1e-3 relative error on norms).
    fp16/bf16 operands: Triton's default "tf32", which only affects fp32 operands, so these keep
    the tensor-core path with fp32 accumulation.
    """
    return "ieee" if dtype == torch.float32 else "tf32"
