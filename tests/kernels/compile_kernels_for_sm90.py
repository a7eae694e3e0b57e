"""Compile bnkit's Triton kernels ahead of time for an H100 (sm_90), no GPU needed.

Run as a script in a process *without* TRITON_INTERPRET (the interpreter replaces the
kernels with Python stand-ins): Triton's own front end, its LLVM passes and the bundled
``ptxas`` must accept every variant that :mod:`bnkit.kernels.ops` launches (bfloat16 and
float32 I/O, both layouts, ReLU and residual flags, the finalize kernels). Prints one line per
kernel and ``compiled N kernels``; any failure raises.
"""

from __future__ import annotations

import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bnkit.kernels import triton_bn as K

TARGET = GPUTarget("cuda", 90, 32)
INTS = {"N", "C", "S", "M", "R", "L", "P", "n_per_split", "rows_per_split"}
FLOATS = {"eps", "old_weight", "new_weight", "var_factor", "inv_n"}
IO_POINTERS = {"x_ptr", "y_ptr", "residual_ptr", "dy_ptr", "dx_ptr", "dresidual_ptr"}


def compile_variant(kernel, io: str, num_warps: int, **constexprs) -> None:
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INTS:
            signature[name] = "i32"
        elif name in FLOATS:
            signature[name] = "fp32"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (io if name in IO_POINTERS else "fp32")
        else:
            raise KeyError(f"{kernel.__name__}: no type for argument {name!r}")
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs),
        target=TARGET,
        options={"num_warps": num_warps, "enable_fp_fusion": True},
    )
    assert compiled.asm["cubin"], kernel.__name__
    print(f"{kernel.__name__} {io} {sorted(k for k, v in constexprs.items() if v is True)}", flush=True)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled", file=sys.stderr)
        return 2
    count = 0
    for io in ("bf16", "fp32"):
        compile_variant(K._stats_nchw_kernel, io, 8, BLOCK_N=8, BLOCK_S=256)
        compile_variant(K._stats_rows_kernel, io, 8, BLOCK_M=32, BLOCK_C=64)
        count += 2
    affine = {"HAS_WEIGHT": True, "HAS_BIAS": True}
    for cl, (relu, residual) in ((False, (True, True)), (True, (True, False)), (True, (False, False))):
        blocks = {"BLOCK_R": 64, "BLOCK_L": 64} if cl else {"BLOCK_R": 16, "BLOCK_L": 256}
        compile_variant(
            K._normalize_kernel, "bf16", 4, CHANNEL_IS_COL=cl, STAT_IS_VAR=False,
            HAS_RESIDUAL=residual, RELU=relu, **affine, **blocks,
        )  # fmt: skip
        compile_variant(
            K._grad_input_kernel, "bf16", 4, CHANNEL_IS_COL=cl, TRAINING=True, RELU=relu,
            MASK_FROM_OUTPUT=relu and residual, WRITE_DX=True, WRITE_DRESIDUAL=relu and residual,
            **affine, **blocks,
        )  # fmt: skip
        count += 2
    compile_variant(
        K._normalize_kernel, "fp16", 4, CHANNEL_IS_COL=False, STAT_IS_VAR=True, HAS_WEIGHT=False,
        HAS_BIAS=False, HAS_RESIDUAL=False, RELU=False, BLOCK_R=64, BLOCK_L=64,
    )  # fmt: skip
    flags = {"RELU": True, "MASK_FROM_OUTPUT": False, **affine}
    compile_variant(K._grad_sums_nchw_kernel, "bf16", 8, BLOCK_N=8, BLOCK_S=256, **flags)
    compile_variant(K._grad_sums_rows_kernel, "bf16", 8, BLOCK_M=32, BLOCK_C=64, **flags)
    compile_variant(K._finalize_stats_kernel, "fp32", 4, UPDATE_RUNNING=True, BLOCK_P=64, BLOCK_C=64)
    compile_variant(K._finalize_grad_kernel, "fp32", 4, BLOCK_P=64, BLOCK_C=64)
    count += 5
    print(f"compiled {count} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
