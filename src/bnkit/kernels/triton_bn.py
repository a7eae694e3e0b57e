r"""Triton kernels for batch normalization over ``(N, C, *)`` tensors.

Two storage layouts are handled, both addressed from the tensor's base pointer:

* **NCHW** (contiguous): the input is ``(N, C, S)`` with ``S`` the product of the spatial
  sizes; channel ``c`` of sample ``n`` is the contiguous run ``[(n*C + c)*S, +S)``.
* **rows** (``channels_last``, and any ``(N, C)`` input): the input is ``(M, C)`` with
  ``M = N*S`` rows of ``C`` contiguous channels.

Training forward (input read twice)::

    pass 1  per (channel block, split): every lane of the tile keeps a Welford (mean, M2,
            count) in float32 over the values it visits; the lanes are merged with Chan
            et al.'s pairwise update -> partials
    pass 2  per channel: Chan-merge the partials -> mean, biased var, invstd; update the
            running statistics: run = old*run + new*batch (var scaled by var_factor)
    pass 3  y = act((x - mean) * invstd * gamma + beta [+ residual])

Backward (input and grad read twice), with ``g = dy * relu_mask``::

    pass 1  per channel: sum(g), sum(g * xhat) -> partials; summed per channel (dbeta, dgamma)
    pass 2  dx = gamma * invstd * (g - dbeta/n - xhat * dgamma/n)  (training)
            dx = gamma * invstd * g                                 (inference)

Inference forward is pass 3 alone with the running statistics. Inputs and outputs keep the
input's dtype (float32, float16, bfloat16); all arithmetic is float32. The per-channel
statistics are never formed as ``E[x^2] - E[x]^2``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _chan_merge(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
    """Merge two (mean, M2, count) summaries (Chan, Golub and LeVeque's pairwise update)."""
    count = count_a + count_b
    frac_b = tl.where(count > 0, count_b / tl.maximum(count, 1.0), 0.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * frac_b
    m2 = m2_a + m2_b + delta * delta * count_a * frac_b
    return mean, m2, count


# --------------------------------------------------------------------------- statistics


@triton.jit
def _welford_update(mean, m2, count, x, mask):
    """Add one value per lane (where ``mask``) to per-lane running (mean, M2, count)."""
    count += tl.where(mask, 1.0, 0.0)
    delta = x - mean
    mean += tl.where(mask, delta / tl.maximum(count, 1.0), 0.0)
    m2 += tl.where(mask, delta * (x - mean), 0.0)
    return mean, m2, count


@triton.jit
def _stats_nchw_kernel(
    x_ptr, part_mean_ptr, part_m2_ptr, part_count_ptr,
    N, C, S, n_per_split,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Partial (mean, M2, count) of channel ``program_id(0)`` over a range of samples.

    Each lane of the [BLOCK_N, BLOCK_S] tile keeps its own Welford summary while the tile
    walks the range (no cross-lane work in the loop); the lanes are Chan-merged at the end.
    """
    c = tl.program_id(0)
    split = tl.program_id(1)
    n_lo = split * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    offs_n = tl.arange(0, BLOCK_N)[:, None]
    offs_s = tl.arange(0, BLOCK_S)[None, :]
    mean = tl.zeros([BLOCK_N, BLOCK_S], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_N, BLOCK_S], dtype=tl.float32)
    count = tl.zeros([BLOCK_N, BLOCK_S], dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n = n0 + offs_n
        base = (n.to(tl.int64) * C + c) * S
        for s0 in range(0, S, BLOCK_S):
            s = s0 + offs_s
            mask = (n < n_hi) & (s < S)
            x = tl.load(x_ptr + base + s, mask=mask, other=0.0).to(tl.float32)
            mean, m2, count = _welford_update(mean, m2, count, x, mask)
    mean, m2, count = tl.reduce((mean, m2, count), 1, _chan_merge)
    mean, m2, count = tl.reduce((mean, m2, count), 0, _chan_merge)
    out = split * C + c
    tl.store(part_mean_ptr + out, mean)
    tl.store(part_m2_ptr + out, m2)
    tl.store(part_count_ptr + out, count)


@triton.jit
def _stats_rows_kernel(
    x_ptr, part_mean_ptr, part_m2_ptr, part_count_ptr,
    M, C, rows_per_split,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Partial (mean, M2, count) of a block of channels over a range of rows (per-lane
    Welford summaries, Chan-merged across the tile's rows at the end)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    split = tl.program_id(1)
    m_lo = split * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, M)
    mean = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    count = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask = (rows < m_hi)[:, None] & col_mask[None, :]
        ptrs = x_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        mean, m2, count = _welford_update(mean, m2, count, x, mask)
    mean, m2, count = tl.reduce((mean, m2, count), 0, _chan_merge)
    out = split * C + cols
    tl.store(part_mean_ptr + out, mean, mask=col_mask)
    tl.store(part_m2_ptr + out, m2, mask=col_mask)
    tl.store(part_count_ptr + out, count, mask=col_mask)


@triton.jit
def _finalize_stats_kernel(
    part_mean_ptr, part_m2_ptr, part_count_ptr, mean_ptr, invstd_ptr,
    running_mean_ptr, running_var_ptr,
    P, C, eps, old_weight, new_weight, var_factor,
    UPDATE_RUNNING: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Merge the P partials of each channel; write mean and invstd; update running stats."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & col_mask[None, :]
        idx = p[:, None] * C + cols[None, :]
        part_count = tl.load(part_count_ptr + idx, mask=mask, other=0.0)
        part_mean = tl.load(part_mean_ptr + idx, mask=mask, other=0.0)
        part_m2 = tl.load(part_m2_ptr + idx, mask=mask, other=0.0)
        # a block of partials: its mean, then its M2 about that mean (exact pairwise formula)
        block_count = tl.sum(part_count, 0)
        block_mean = tl.sum(part_count * part_mean, 0) / tl.maximum(block_count, 1.0)
        dev = part_mean - block_mean[None, :]
        block_m2 = tl.sum(part_m2 + part_count * dev * dev, 0)
        mean, m2, count = _chan_merge(mean, m2, count, block_mean, block_m2, block_count)
    var = m2 / tl.maximum(count, 1.0)
    invstd = 1.0 / tl.sqrt_rn(var + eps)
    tl.store(mean_ptr + cols, mean, mask=col_mask)
    tl.store(invstd_ptr + cols, invstd, mask=col_mask)
    if UPDATE_RUNNING:
        run_mean = tl.load(running_mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        run_var = tl.load(running_var_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        run_mean = old_weight * run_mean + new_weight * mean
        run_var = old_weight * run_var + new_weight * (var * var_factor)
        tl.store(running_mean_ptr + cols, run_mean.to(running_mean_ptr.dtype.element_ty), mask=col_mask)
        tl.store(running_var_ptr + cols, run_var.to(running_var_ptr.dtype.element_ty), mask=col_mask)


# --------------------------------------------------------------------------- elementwise


@triton.jit
def _channel_params(
    channels, channel_mask, mean_ptr, stat_ptr, weight_ptr, bias_ptr, eps,
    STAT_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Per-channel (mean, invstd, scale = gamma*invstd, shift = beta) in float32."""
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
    stat = tl.load(stat_ptr + channels, mask=channel_mask, other=1.0).to(tl.float32)
    if STAT_IS_VAR:
        invstd = 1.0 / tl.sqrt_rn(stat + eps)
    else:
        invstd = stat
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
    shift = mean * 0.0  # zeros of mean's shape, a scalar or a vector
    if HAS_BIAS:
        shift = tl.load(bias_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
    return mean, invstd, scale, shift


@triton.jit
def _normalize_kernel(
    x_ptr, y_ptr, residual_ptr, mean_ptr, stat_ptr, weight_ptr, bias_ptr,
    R, L, C, eps,
    CHANNEL_IS_COL: tl.constexpr, STAT_IS_VAR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """``y = act((x - mean) * invstd * gamma + beta [+ residual])`` on an (R, L) tile.

    NCHW: R = N*C rows of length L = S, channel = row % C. Rows layout: R = M, L = C,
    channel = column. ``stat`` is invstd (training) or the running variance (inference).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    row_mask = rows < R
    col_mask = cols < L
    if CHANNEL_IS_COL:
        mean, invstd, scale, shift = _channel_params(
            cols, col_mask, mean_ptr, stat_ptr, weight_ptr, bias_ptr, eps, STAT_IS_VAR, HAS_WEIGHT, HAS_BIAS
        )
        mean = mean[None, :]
        scale = scale[None, :]
        shift = shift[None, :]
    else:
        mean, invstd, scale, shift = _channel_params(
            rows % C,
            row_mask,
            mean_ptr,
            stat_ptr,
            weight_ptr,
            bias_ptr,
            eps,
            STAT_IS_VAR,
            HAS_WEIGHT,
            HAS_BIAS,
        )
        mean = mean[:, None]
        scale = scale[:, None]
        shift = shift[:, None]
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean) * scale + shift
    if HAS_RESIDUAL:
        y = y + tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- backward


@triton.jit
def _masked_grad(
    x, dy, y_ptr, offs, mask, mean, scale, shift,
    RELU: tl.constexpr, MASK_FROM_OUTPUT: tl.constexpr,
):  # fmt: skip
    """``dy`` through the ReLU: the mask is read from the saved output (residual case)
    or recomputed from ``x`` with the forward pass's own expression."""
    if RELU:
        if MASK_FROM_OUTPUT:
            out = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            out = (x - mean) * scale + shift
        dy = tl.where(out > 0.0, dy, 0.0)
    return dy


@triton.jit
def _grad_sums_nchw_kernel(
    x_ptr, dy_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
    part_g_ptr, part_gx_ptr,
    N, C, S, n_per_split,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, MASK_FROM_OUTPUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Partial sum(g) and sum(g * xhat) of one channel over a range of samples."""
    c = tl.program_id(0)
    split = tl.program_id(1)
    mean, invstd, scale, shift = _channel_params(
        c, c < C, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, 0.0, False, HAS_WEIGHT, HAS_BIAS
    )
    n_lo = split * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    offs_n = tl.arange(0, BLOCK_N)[:, None]
    offs_s = tl.arange(0, BLOCK_S)[None, :]
    acc_g = tl.zeros([BLOCK_N, BLOCK_S], dtype=tl.float32)
    acc_gx = tl.zeros([BLOCK_N, BLOCK_S], dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n = n0 + offs_n
        base = (n.to(tl.int64) * C + c) * S
        for s0 in range(0, S, BLOCK_S):
            s = s0 + offs_s
            mask = (n < n_hi) & (s < S)
            offs = base + s
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = _masked_grad(x, dy, y_ptr, offs, mask, mean, scale, shift, RELU, MASK_FROM_OUTPUT)
            acc_g += g
            acc_gx += g * ((x - mean) * invstd)
    out = split * C + c
    tl.store(part_g_ptr + out, tl.sum(tl.sum(acc_g, 1), 0))
    tl.store(part_gx_ptr + out, tl.sum(tl.sum(acc_gx, 1), 0))


@triton.jit
def _grad_sums_rows_kernel(
    x_ptr, dy_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
    part_g_ptr, part_gx_ptr,
    M, C, rows_per_split,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, MASK_FROM_OUTPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Partial sum(g) and sum(g * xhat) of a block of channels over a range of rows."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    split = tl.program_id(1)
    mean, invstd, scale, shift = _channel_params(
        cols, col_mask, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, 0.0, False, HAS_WEIGHT, HAS_BIAS
    )
    mean = mean[None, :]
    invstd = invstd[None, :]
    scale = scale[None, :]
    shift = shift[None, :]
    m_lo = split * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, M)
    acc_g = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_gx = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask = (rows < m_hi)[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = _masked_grad(x, dy, y_ptr, offs, mask, mean, scale, shift, RELU, MASK_FROM_OUTPUT)
        acc_g += g
        acc_gx += g * ((x - mean) * invstd)
    out = split * C + cols
    tl.store(part_g_ptr + out, tl.sum(acc_g, 0), mask=col_mask)
    tl.store(part_gx_ptr + out, tl.sum(acc_gx, 0), mask=col_mask)


@triton.jit
def _finalize_grad_kernel(
    part_g_ptr, part_gx_ptr, dbeta_ptr, dgamma_ptr, P, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dbeta = sum(g), dgamma = sum(g * xhat) per channel, from the P partials."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    acc_g = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_gx = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & col_mask[None, :]
        idx = p[:, None] * C + cols[None, :]
        acc_g += tl.load(part_g_ptr + idx, mask=mask, other=0.0)
        acc_gx += tl.load(part_gx_ptr + idx, mask=mask, other=0.0)
    tl.store(dbeta_ptr + cols, tl.sum(acc_g, 0), mask=col_mask)
    tl.store(dgamma_ptr + cols, tl.sum(acc_gx, 0), mask=col_mask)


@triton.jit
def _grad_input_kernel(
    x_ptr, dy_ptr, y_ptr, dx_ptr, dresidual_ptr,
    mean_ptr, invstd_ptr, weight_ptr, bias_ptr, dbeta_ptr, dgamma_ptr,
    R, L, C, inv_n,
    CHANNEL_IS_COL: tl.constexpr, TRAINING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, MASK_FROM_OUTPUT: tl.constexpr,
    WRITE_DX: tl.constexpr, WRITE_DRESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """dx (and d residual = g) on an (R, L) tile, laid out as in :func:`_normalize_kernel`."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    row_mask = rows < R
    col_mask = cols < L
    if CHANNEL_IS_COL:
        channels = cols
        channel_mask = col_mask
    else:
        channels = rows % C
        channel_mask = row_mask
    mean, invstd, scale, shift = _channel_params(
        channels, channel_mask, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, 0.0, False, HAS_WEIGHT, HAS_BIAS
    )
    mean_dbeta = tl.zeros_like(mean)
    mean_dgamma = tl.zeros_like(mean)
    if TRAINING:
        mean_dbeta = tl.load(dbeta_ptr + channels, mask=channel_mask, other=0.0) * inv_n
        mean_dgamma = tl.load(dgamma_ptr + channels, mask=channel_mask, other=0.0) * inv_n
    if CHANNEL_IS_COL:
        mean = mean[None, :]
        invstd = invstd[None, :]
        scale = scale[None, :]
        shift = shift[None, :]
        mean_dbeta = mean_dbeta[None, :]
        mean_dgamma = mean_dgamma[None, :]
    else:
        mean = mean[:, None]
        invstd = invstd[:, None]
        scale = scale[:, None]
        shift = shift[:, None]
        mean_dbeta = mean_dbeta[:, None]
        mean_dgamma = mean_dgamma[:, None]
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = _masked_grad(x, dy, y_ptr, offs, mask, mean, scale, shift, RELU, MASK_FROM_OUTPUT)
    if WRITE_DRESIDUAL:
        tl.store(dresidual_ptr + offs, g.to(dresidual_ptr.dtype.element_ty), mask=mask)
    if WRITE_DX:
        if TRAINING:
            xhat = (x - mean) * invstd
            dx = scale * (g - mean_dbeta - xhat * mean_dgamma)
        else:
            dx = scale * g
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
