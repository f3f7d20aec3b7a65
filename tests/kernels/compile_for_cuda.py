"""Compile every Triton kernel for sm_90 without a GPU: Triton's front end, LLVM and ptxas.

The interpreter runs kernels as Python, so on CPU it cannot catch what only the compiler rejects
(e.g. a global a kernel may not read). Run with TRITON_INTERPRET unset, in a process of its own:
Triton cannot compile in a process that imported it in interpreter mode. Exit status: the number
of kernels that failed, or SKIP_STATUS when there is no ptxas to assemble with.
"""

from __future__ import annotations

import importlib
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SKIP_STATUS = 77
TARGET = GPUTarget("cuda", 90, 32)
# kernel -> (module, block sizes): the launchers' defaults.
KERNELS = {
    "_ghost_sqnorm_kernel": ("ghost_sqnorm", {"BLOCK_T": 64, "BLOCK_D": 32}),
    "_direct_sqnorm_kernel": ("ghost_sqnorm", {"BLOCK_T": 32, "BLOCK_O": 64, "BLOCK_I": 64}),
    "_kron_project_kernel": (
        "kron_project",
        {"BLOCK_T": 32, "BLOCK_D": 32, "BLOCK_KO": 64, "BLOCK_KI": 64},
    ),
    "_pairwise_grad_dot_kernel": (
        "pairwise_grad_dot",
        {"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_D": 32},
    ),
    "_score_tile_kernel": ("score_topk", {"BLOCK_Q": 64, "BLOCK_N": 64, "BLOCK_K": 32}),
}


def argument_type(name: str, constexprs: dict) -> str:
    """fp32 pointers, int64 strides, int32 sizes (the kernels cast offsets to int64 themselves)."""
    if name in constexprs:
        return "constexpr"
    if name.endswith("_ptr"):
        return "*fp32"
    return "i64" if name.startswith("stride") else "i32"


def main() -> int:
    failed = 0
    for kernel_name, (module_name, blocks) in KERNELS.items():
        module = importlib.import_module(f"influx.kernels.{module_name}")
        jitted = getattr(module, kernel_name).jitted()
        constexprs = {**blocks, "DOT_PRECISION": "ieee"}
        signature = {name: argument_type(name, constexprs) for name in jitted.arg_names}
        try:
            compiled = triton.compile(ASTSource(jitted, signature, constexprs), target=TARGET)
        except Exception as error:  # report every kernel, not just the first failure
            if "ptxas" in str(error).lower() and "not found" in str(error).lower():
                print(f"no ptxas: {error}")
                return SKIP_STATUS
            print(f"FAIL {kernel_name}: {type(error).__name__}: {error}")
            failed += 1
            continue
        print(f"ok {kernel_name}: {len(compiled.asm['cubin'])} bytes of cubin")
    return failed


if __name__ == "__main__":
    sys.exit(main())
