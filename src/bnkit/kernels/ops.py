"""Launchers for the Triton batch-norm kernels and the autograd.Function around them.

:func:`batch_norm_triton` is the functional entry point: it takes tensors directly and runs
wherever Triton can launch, i.e. on CUDA tensors, or on CPU tensors when the process runs
Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is imported), which is
how the test suite checks the kernels without a GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from bnkit.kernels import triton_bn as K

__all__ = ["batch_norm_triton", "SUPPORTED_DTYPES", "ACTIVATIONS"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = (None, "relu")

# Tile sizes (elements). Module-level so that tests can shrink them to exercise, on tiny
# tensors, the multi-tile, multi-split and ragged-edge paths that large tensors take.
_TILE = 4096  # per elementwise program: 16 KiB of float32 in flight
_REDUCE_TILE = 2048  # per reduction tile (one mean/M2 summary, then a Chan merge)
_RUN_CAP = 1024  # longest contiguous run a tile covers
_FINALIZE_TILE = 4096  # partials per finalize step
# explicit, as Triton 3.9 asks (its default changes in 3.10): fused multiply-adds, one rounding
_OPTIONS = {"enable_fp_fusion": True}


@dataclass(frozen=True)
class _Layout:
    """How a ``(N, C, *)`` tensor is walked: NCHW ``(N, C, S)`` or rows ``(M, C)``."""

    channels_last: bool  # True: rows layout, channel = column
    N: int
    C: int
    S: int

    @property
    def rows(self) -> int:  # R of the elementwise kernels
        return self.N * self.S if self.channels_last else self.N * self.C

    @property
    def row_length(self) -> int:  # L of the elementwise kernels
        return self.C if self.channels_last else self.S


def _layout_of(x: torch.Tensor) -> tuple[torch.Tensor, _Layout]:
    """The layout to walk ``x`` in, copying it to a dense one when it has neither."""
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // max(N * C, 1)
    if x.is_contiguous():
        # an NCHW run of one value per channel is better read as rows of C channels
        return x, _Layout(channels_last=S == 1, N=N, C=C, S=S)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x, _Layout(True, N, C, S)
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x, _Layout(True, N, C, S)
    x = x.contiguous()
    return x, _Layout(S == 1, N, C, S)


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of ``x`` (copied if they differ, e.g. an expanded gradient)."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def _pow2_at_most(value: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(int(value), 1)), cap)


def _run_block(length: int, cap: int | None = None) -> int:
    """A power-of-two block for runs of ``length`` values, wasting at most ~10% of lanes."""
    cap = min(cap or _RUN_CAP, _RUN_CAP)
    floor = min(32, cap)
    if length <= cap:
        return max(_pow2_at_most(length, cap), 1)
    best, best_use = cap, 0.0
    block = cap
    while block >= floor:
        use = length / (triton.cdiv(length, block) * block)
        if use >= 0.9:
            return block
        if use > best_use:
            best, best_use = block, use
        block //= 2
    return best


@functools.cache
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter runs programs one by one: few, larger ones


def _elementwise_blocks(layout: _Layout) -> tuple[int, int]:
    block_l = _run_block(layout.row_length, cap=128 if layout.channels_last else 1024)
    block_r = max(1, min(_TILE // block_l, _pow2_at_most(layout.rows, 1 << 30)))
    return block_r, block_l


def _elementwise_grid(layout: _Layout, block_r: int, block_l: int) -> tuple[int, int]:
    return triton.cdiv(layout.rows, block_r), triton.cdiv(layout.row_length, block_l)


def _reduction_plan(layout: _Layout, device: torch.device) -> tuple[tuple[int, int], int, dict]:
    """(grid, items per split, block sizes) of the per-channel reduction kernels."""
    target = _target_programs(device)
    if layout.channels_last:
        block_c = _pow2_at_most(layout.C, min(64, _RUN_CAP))
        M = layout.N * layout.S
        block_m = max(1, min(_REDUCE_TILE // block_c, _pow2_at_most(M, 1 << 30)))
        col_blocks = triton.cdiv(layout.C, block_c)
        splits = max(1, min(triton.cdiv(target, col_blocks), triton.cdiv(M, block_m)))
        per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
        splits = triton.cdiv(M, per_split)
        return (col_blocks, splits), per_split, {"BLOCK_M": block_m, "BLOCK_C": block_c}
    block_s = _run_block(layout.S)
    block_n = max(1, min(_REDUCE_TILE // block_s, _pow2_at_most(layout.N, 1 << 30)))
    splits = max(1, min(triton.cdiv(target, layout.C), triton.cdiv(layout.N, block_n)))
    per_split = triton.cdiv(triton.cdiv(layout.N, splits), block_n) * block_n
    splits = triton.cdiv(layout.N, per_split)
    return (layout.C, splits), per_split, {"BLOCK_N": block_n, "BLOCK_S": block_s}


def _finalize_blocks(P: int, C: int) -> dict:
    block_c = _pow2_at_most(C, min(128, _RUN_CAP))
    block_p = max(1, min(_pow2_at_most(P, 64), _FINALIZE_TILE // block_c))
    return {"BLOCK_P": block_p, "BLOCK_C": block_c}


def _batch_stats(x, layout, running_mean, running_var, eps, old_weight, new_weight, var_factor):
    """Launch the statistics passes: float32 (mean, invstd) per channel; update running."""
    grid, per_split, blocks = _reduction_plan(layout, x.device)
    P = grid[1]
    C = layout.C
    parts = torch.empty((3, P, C), device=x.device, dtype=torch.float32)
    part_mean, part_m2, part_count = parts[0], parts[1], parts[2]
    if layout.channels_last:
        K._stats_rows_kernel[grid](
            x,
            part_mean,
            part_m2,
            part_count,
            layout.N * layout.S,
            C,
            per_split,
            **blocks,
            num_warps=8,
            **_OPTIONS,
        )
    else:
        K._stats_nchw_kernel[grid](
            x,
            part_mean,
            part_m2,
            part_count,
            layout.N,
            C,
            layout.S,
            per_split,
            **blocks,
            num_warps=8,
            **_OPTIONS,
        )
    mean = torch.empty(C, device=x.device, dtype=torch.float32)
    invstd = torch.empty_like(mean)
    update = running_mean is not None
    fin = _finalize_blocks(P, C)
    K._finalize_stats_kernel[(triton.cdiv(C, fin["BLOCK_C"]),)](
        part_mean, part_m2, part_count, mean, invstd,
        running_mean if update else mean, running_var if update else invstd,
        P, C, float(eps), float(old_weight), float(new_weight), float(var_factor),
        UPDATE_RUNNING=update, **fin, num_warps=4, **_OPTIONS,
    )  # fmt: skip
    return mean, invstd


def _normalize(x, layout, residual, mean, stat, stat_is_var, weight, bias, eps, relu):
    y = torch.empty_like(x)
    block_r, block_l = _elementwise_blocks(layout)
    K._normalize_kernel[_elementwise_grid(layout, block_r, block_l)](
        x, y, residual if residual is not None else x, mean, stat,
        weight if weight is not None else mean, bias if bias is not None else mean,
        layout.rows, layout.row_length, layout.C, float(eps),
        CHANNEL_IS_COL=layout.channels_last, STAT_IS_VAR=stat_is_var,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, RELU=relu,
        BLOCK_R=block_r, BLOCK_L=block_l, num_warps=4, **_OPTIONS,
    )  # fmt: skip
    return y


def _grad_sums(x, dy, y, layout, mean, invstd, weight, bias, relu, mask_from_output):
    """float32 (dbeta, dgamma) = (sum(g), sum(g * xhat)) per channel."""
    grid, per_split, blocks = _reduction_plan(layout, x.device)
    P = grid[1]
    C = layout.C
    parts = torch.empty((2, P, C), device=x.device, dtype=torch.float32)
    flags = {
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "RELU": relu,
        "MASK_FROM_OUTPUT": mask_from_output,
    }
    args = (
        x, dy, y if y is not None else x, mean, invstd,
        weight if weight is not None else mean, bias if bias is not None else mean,
        parts[0], parts[1],
    )  # fmt: skip
    if layout.channels_last:
        K._grad_sums_rows_kernel[grid](
            *args, layout.N * layout.S, C, per_split, **flags, **blocks, num_warps=8, **_OPTIONS
        )
    else:
        K._grad_sums_nchw_kernel[grid](
            *args, layout.N, C, layout.S, per_split, **flags, **blocks, num_warps=8, **_OPTIONS
        )
    dbeta = torch.empty(C, device=x.device, dtype=torch.float32)
    dgamma = torch.empty_like(dbeta)
    fin = _finalize_blocks(P, C)
    K._finalize_grad_kernel[(triton.cdiv(C, fin["BLOCK_C"]),)](
        parts[0], parts[1], dbeta, dgamma, P, C, **fin, num_warps=4, **_OPTIONS
    )
    return dbeta, dgamma


class _TritonBatchNorm(torch.autograd.Function):
    """``y = act(batch_norm(x) [+ residual])`` with Triton kernels forward and backward."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, residual, running_mean, running_var,
        use_batch_stats, old_weight, new_weight, var_factor, eps, activation,
    ):  # fmt: skip
        x, layout = _layout_of(x)
        if residual is not None:
            residual = _like(residual, x)
        relu = activation == "relu"
        if use_batch_stats:
            mean, invstd = _batch_stats(
                x, layout, running_mean, running_var, eps, old_weight, new_weight, var_factor
            )
            y = _normalize(x, layout, residual, mean, invstd, False, weight, bias, eps, relu)
        else:
            y = _normalize(x, layout, residual, running_mean, running_var, True, weight, bias, eps, relu)
            # saved as they are (no work in the forward pass): the backward pass derives
            # invstd from them, and autograd refuses if they were modified in between
            mean, invstd = running_mean, running_var
        mask_from_output = relu and residual is not None
        ctx.eps = eps
        ctx.layout = layout
        ctx.use_batch_stats = use_batch_stats
        ctx.relu = relu
        ctx.mask_from_output = mask_from_output
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x, weight, bias, mean, invstd, y if mask_from_output else None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, weight, bias, mean, invstd, y = ctx.saved_tensors
        if not ctx.use_batch_stats:  # saved: the running mean and variance
            mean, invstd = mean.float(), invstd.float().add(ctx.eps).sqrt().reciprocal()
        layout = ctx.layout
        dy = _like(grad_output, x)
        need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
        if need_dres and not ctx.relu and not (need_dx or need_dw or need_db):
            return (None, None, None, dy) + (None,) * 8
        dbeta = dgamma = None
        if ctx.use_batch_stats and need_dx or need_dw or need_db:
            dbeta, dgamma = _grad_sums(
                x, dy, y, layout, mean, invstd, weight, bias, ctx.relu, ctx.mask_from_output
            )
        dx = torch.empty_like(x) if need_dx else None
        dres = torch.empty_like(x) if (need_dres and ctx.relu) else None
        if dx is not None or dres is not None:
            block_r, block_l = _elementwise_blocks(layout)
            n = layout.N * layout.S
            K._grad_input_kernel[_elementwise_grid(layout, block_r, block_l)](
                x, dy, y if y is not None else x,
                dx if dx is not None else x, dres if dres is not None else x,
                mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean,
                dbeta if dbeta is not None else mean, dgamma if dgamma is not None else mean,
                layout.rows, layout.row_length, layout.C, 1.0 / n,
                CHANNEL_IS_COL=layout.channels_last, TRAINING=ctx.use_batch_stats,
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                RELU=ctx.relu, MASK_FROM_OUTPUT=ctx.mask_from_output,
                WRITE_DX=dx is not None, WRITE_DRESIDUAL=dres is not None,
                BLOCK_R=block_r, BLOCK_L=block_l, num_warps=4, **_OPTIONS,
            )  # fmt: skip
        if need_dres and dres is None:
            dres = dy  # no activation: d residual is the incoming gradient itself
        dweight = dgamma.to(weight.dtype) if need_dw else None
        dbias = dbeta.to(bias.dtype) if need_db else None
        return (dx, dweight, dbias, dres) + (None,) * 8


def batch_norm_triton(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    use_batch_stats: bool,
    old_weight: float = 0.0,
    new_weight: float = 0.0,
    var_factor: float = 1.0,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    r"""``act(gamma * (x - mean) / sqrt(var + eps) + beta [+ residual])`` with Triton kernels.

    With ``use_batch_stats`` the batch's mean and biased variance normalise ``x``, and when
    ``running_mean``/``running_var`` are given they are updated in place::

        running_mean = old_weight * running_mean + new_weight * mean
        running_var  = old_weight * running_var  + new_weight * var * var_factor

    (``var_factor = n / (n - 1)`` gives PyTorch's unbiased running variance, 1 Keras'.)
    Without it, the running statistics normalise ``x`` and nothing is updated.
    ``activation`` is None or ``"relu"``. Gradients flow to ``x``, ``weight``, ``bias`` and
    ``residual``.
    """
    if x.dim() < 2:
        raise ValueError(f"batch_norm_triton expects an (N, C, *) input, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"batch_norm_triton supports float32, float16 and bfloat16 inputs, got {x.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"residual must have the input's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
        )
    if residual is not None and (residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(
            f"residual must have the input's dtype and device ({x.dtype}, {x.device}), "
            f"got ({residual.dtype}, {residual.device})"
        )
    if use_batch_stats and x.numel() == 0:
        # no statistics to compute; bnkit.torch's layers leave an empty batch to PyTorch's kernel
        raise ValueError(f"batch_norm_triton needs a non-empty input for batch statistics, got shape {tuple(x.shape)}")
    if not use_batch_stats and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are required when use_batch_stats=False")
    C = x.shape[1]
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is not None and (t.shape != (C,) or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous vector of {C} values, got shape {tuple(t.shape)}")
    return _TritonBatchNorm.apply(
        x, weight, bias, residual, running_mean, running_var,
        use_batch_stats, old_weight, new_weight, var_factor, eps, activation,
    )  # fmt: skip
