"""NumPy float64 reference for batch normalization: the specification in code.

Every function takes arrays of any rank and the index of the channel axis (``axis=1`` for
PyTorch's NCHW, ``axis=-1`` for Keras' NHWC). Statistics are per channel ``c`` over every
other axis; ``n`` is the number of values per channel (``x.size // C``).

Training forward::

    mean = sum(x) / n
    var  = sum((x - mean)^2) / n                    (biased; two passes, no E[x^2] - E[x]^2)
    xhat = (x - mean) / sqrt(var + eps)
    y    = gamma * xhat + beta

Inference forward: the same with ``running_mean`` and ``running_var`` in place of the batch's.

Running-statistics update, with ``w`` the weight of the new batch statistic
(:meth:`bnkit.Convention.new_weight`: ``m`` in PyTorch, ``1 - m`` in Keras, ``1 / count``
for PyTorch's ``momentum=None``)::

    running_mean = (1 - w) * running_mean + w * mean
    running_var  = (1 - w) * running_var  + w * var * (n / (n - 1) if unbiased else 1)

Training backward, with ``g = dL/dy``::

    dbeta  = sum(g)
    dgamma = sum(g * xhat)
    dx     = gamma / sqrt(var + eps) * (g - dbeta / n - xhat * dgamma / n)

Inference backward: ``dx = g * gamma / sqrt(running_var + eps)``; dgamma, dbeta as above with
``xhat`` from the running statistics.

Batch renormalization (Ioffe 2017, as Keras 3 computes it). The layer keeps, besides the running
mean and variance, a running standard deviation and the *renorm* mean and standard deviation that
steer training. With ``s = sqrt(var + eps)`` the batch's standard deviation (biased variance)::

    sr   = max(renorm_stddev, sqrt(eps))            (no division by 0 early in training)
    r    = clip(s / sr, rmin, rmax)                 (r = max(r, rmin), then min(r, rmax))
    d    = clip((mean - renorm_mean) / sr, -dmax, dmax)
    y    = gamma * (r * xhat + d) + beta            (xhat from the batch's statistics)

with ``r`` and ``d`` constants in the gradient (a bound left out does not clip)::

    dbeta  = sum(g)
    dgamma = r * sum(g * xhat) + d * sum(g)
    dx     = r * gamma / s * (g - sum(g) / n - xhat * sum(g * xhat) / n)

Updates after the batch, with ``w`` and ``wr`` the new-value weights of ``momentum`` and
``renorm_momentum`` in the convention (Keras: ``1 - m``; PyTorch: ``m``, ``1 / count`` for None)::

    renorm_mean    = (1 - wr) * renorm_mean    + wr * mean
    renorm_stddev  = (1 - wr) * renorm_stddev  + wr * s
    running_mean   = (1 - w)  * running_mean   + w * mean
    running_stddev = (1 - w)  * running_stddev + w * sqrt(v + eps)
    running_var    = max(running_stddev^2 - eps, 0)

where ``v`` is the convention's running-variance estimator of the batch (Keras: biased, so
``sqrt(v + eps) = s``; PyTorch: unbiased). Inference is plain batch norm with ``running_mean`` and
``running_var``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bnkit.conventions import Convention, biased_to_unbiased, get_convention

__all__ = [
    "BatchStats",
    "RunningStats",
    "Gradients",
    "batch_stats",
    "forward_train",
    "forward_eval",
    "update_running",
    "backward_train",
    "backward_eval",
    "RenormState",
    "renorm_correction",
    "forward_renorm_train",
    "update_renorm",
    "backward_renorm_train",
]


class BatchStats(NamedTuple):
    mean: np.ndarray
    var: np.ndarray  # biased
    n: int


class RunningStats(NamedTuple):
    mean: np.ndarray
    var: np.ndarray
    num_batches_tracked: int


class Gradients(NamedTuple):
    dx: np.ndarray
    dgamma: np.ndarray
    dbeta: np.ndarray


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _reduce_axes(x: np.ndarray, axis: int) -> tuple[int, ...]:
    axis = axis % x.ndim
    return tuple(i for i in range(x.ndim) if i != axis)


def _per_channel(v, x: np.ndarray, axis: int) -> np.ndarray:
    """Reshape a (C,) vector so that it broadcasts along ``axis`` of ``x``."""
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return _f64(v).reshape(shape)


def _affine(x: np.ndarray, axis: int, gamma, beta) -> tuple[np.ndarray, np.ndarray]:
    channels = x.shape[axis % x.ndim]
    gamma = np.ones(channels) if gamma is None else _f64(gamma)
    beta = np.zeros(channels) if beta is None else _f64(beta)
    return gamma, beta


def batch_stats(x, axis: int = 1, *, fast_variance: bool = False) -> BatchStats:
    """Per-channel mean and *biased* variance of a batch, two-pass in float64.

    ``fast_variance=True`` reproduces Flax's ``use_fast_variance=True`` (:data:`bnkit.FLAX`) instead:
    ``var = max(E[x^2] - E[x]^2, 0)`` in one pass, in the input's dtype promoted to at least float32
    as Flax computes it (its rounding included), returned in float64. Only on request: the two-pass
    variance is the accurate one.
    """
    if fast_variance:
        x = np.asarray(x)
        dtype = np.promote_types(x.dtype if x.dtype.kind == "f" else np.float32, np.float32)
        xs = x.astype(dtype)
        axes = _reduce_axes(xs, axis)
        mean = xs.mean(axis=axes)
        var = np.maximum(np.square(xs).mean(axis=axes) - np.square(mean), 0)
        return BatchStats(_f64(mean), _f64(var), x.size // x.shape[axis % x.ndim])
    x = _f64(x)
    axes = _reduce_axes(x, axis)
    mean = x.mean(axis=axes)
    var = np.square(x - _per_channel(mean, x, axis)).mean(axis=axes)
    return BatchStats(mean, var, x.size // x.shape[axis % x.ndim])


def forward_train(x, gamma=None, beta=None, eps: float = 1e-5, axis: int = 1, *, fast_variance: bool = False):
    """Training forward pass: ``(y, BatchStats)``. ``gamma``/``beta`` of None mean 1 and 0.

    ``fast_variance=True``: the batch statistics of :func:`batch_stats` with it (Flax's default).
    """
    stats = batch_stats(x, axis, fast_variance=fast_variance)
    x = _f64(x)
    gamma, beta = _affine(x, axis, gamma, beta)
    y = _normalize(x, stats.mean, stats.var, gamma, beta, eps, axis)
    return y, stats


def forward_eval(x, running_mean, running_var, gamma=None, beta=None, eps: float = 1e-5, axis: int = 1):
    """Inference forward pass with the running statistics."""
    x = _f64(x)
    gamma, beta = _affine(x, axis, gamma, beta)
    return _normalize(x, _f64(running_mean), _f64(running_var), gamma, beta, eps, axis)


def _normalize(x, mean, var, gamma, beta, eps, axis):
    xhat = (x - _per_channel(mean, x, axis)) / np.sqrt(_per_channel(var, x, axis) + eps)
    return _per_channel(gamma, x, axis) * xhat + _per_channel(beta, x, axis)


def update_running(
    running: RunningStats,
    stats: BatchStats,
    momentum: float | None,
    convention: str | Convention = "torch",
) -> RunningStats:
    """Running statistics after one training batch, in ``convention``'s meaning of momentum.

    ``momentum=None`` is PyTorch's cumulative average (weight ``1 / num_batches_tracked``,
    the count including this batch).
    """
    conv = get_convention(convention)
    count = running.num_batches_tracked + 1
    old, new = conv.weights(momentum, count)
    var = biased_to_unbiased(stats.var, stats.n) if conv.unbiased_running_var else stats.var
    mean = old * _f64(running.mean) + new * stats.mean
    var = old * _f64(running.var) + new * var
    return RunningStats(mean, var, count)


def backward_train(dy, x, gamma=None, eps: float = 1e-5, axis: int = 1) -> Gradients:
    """Gradients of the training forward pass (batch statistics depend on ``x``)."""
    x, dy = _f64(x), _f64(dy)
    gamma, _ = _affine(x, axis, gamma, None)
    stats = batch_stats(x, axis)
    axes = _reduce_axes(x, axis)
    invstd = 1.0 / np.sqrt(stats.var + eps)
    xhat = (x - _per_channel(stats.mean, x, axis)) * _per_channel(invstd, x, axis)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    n = stats.n
    dx = _per_channel(gamma * invstd, x, axis) * (
        dy - _per_channel(dbeta / n, x, axis) - xhat * _per_channel(dgamma / n, x, axis)
    )
    return Gradients(dx, dgamma, dbeta)


def backward_eval(
    dy, x, running_mean, running_var, gamma=None, eps: float = 1e-5, axis: int = 1
) -> Gradients:
    """Gradients of the inference forward pass (statistics are constants)."""
    x, dy = _f64(x), _f64(dy)
    gamma, _ = _affine(x, axis, gamma, None)
    axes = _reduce_axes(x, axis)
    invstd = 1.0 / np.sqrt(_f64(running_var) + eps)
    xhat = (x - _per_channel(running_mean, x, axis)) * _per_channel(invstd, x, axis)
    dx = dy * _per_channel(gamma * invstd, x, axis)
    return Gradients(dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes))


# --- batch renormalization ---------------------------------------------------------------------


class RenormState(NamedTuple):
    """Every statistic a renorm layer keeps: running (inference) and renorm (training) ones."""

    running_mean: np.ndarray
    running_var: np.ndarray
    running_stddev: np.ndarray
    renorm_mean: np.ndarray
    renorm_stddev: np.ndarray
    num_batches_tracked: int = 0

    @classmethod
    def initial(cls, channels: int) -> RenormState:
        """The frameworks' initial state: means 0, variance and standard deviations 1."""
        zeros, ones = np.zeros(channels), np.ones(channels)
        return cls(zeros, ones, ones, zeros, ones, 0)


def _clip(value: np.ndarray, low, high) -> np.ndarray:
    if low is not None:
        value = np.maximum(value, float(low))
    if high is not None:
        value = np.minimum(value, float(high))
    return value


def renorm_correction(stats: BatchStats, renorm_mean, renorm_stddev, eps: float, clipping=None):
    """``(r, d)`` of a batch: its standard deviation and mean relative to the renorm statistics, clipped.

    ``clipping`` maps the optional keys ``"rmin"``, ``"rmax"``, ``"dmax"`` to bounds (Keras'
    ``renorm_clipping``); a missing or None bound does not clip.
    """
    clipping = clipping or {}
    stddev = np.sqrt(stats.var + eps)
    floor = np.sqrt(float(eps)) if eps >= 0 else np.nan
    renorm_stddev = np.maximum(_f64(renorm_stddev), floor)
    r = _clip(stddev / renorm_stddev, clipping.get("rmin"), clipping.get("rmax"))
    d = (stats.mean - _f64(renorm_mean)) / renorm_stddev
    dmax = clipping.get("dmax")
    d = _clip(d, None if dmax is None else -float(dmax), dmax)
    return r, d


def forward_renorm_train(
    x, renorm_mean, renorm_stddev, gamma=None, beta=None, eps: float = 1e-3, axis: int = 1, clipping=None
):
    """Renorm training forward pass: ``(y, BatchStats, r, d)``."""
    x = _f64(x)
    gamma, beta = _affine(x, axis, gamma, beta)
    stats = batch_stats(x, axis)
    r, d = renorm_correction(stats, renorm_mean, renorm_stddev, eps, clipping)
    y = _normalize(x, stats.mean, stats.var, gamma * r, gamma * d + beta, eps, axis)
    return y, stats, r, d


def update_renorm(
    state: RenormState,
    stats: BatchStats,
    momentum: float | None,
    renorm_momentum: float | None,
    eps: float,
    convention: str | Convention = "keras",
) -> RenormState:
    """Every statistic of a renorm layer after one training batch, momenta in ``convention``'s meaning."""
    conv = get_convention(convention)
    count = state.num_batches_tracked + 1
    old, new = conv.weights(momentum, count)
    renorm_old, renorm_new = conv.weights(renorm_momentum, count)
    stddev = np.sqrt(stats.var + eps)
    var = biased_to_unbiased(stats.var, stats.n) if conv.unbiased_running_var else stats.var
    running_stddev = old * _f64(state.running_stddev) + new * np.sqrt(var + eps)
    return RenormState(
        running_mean=old * _f64(state.running_mean) + new * stats.mean,
        running_var=np.maximum(np.square(running_stddev) - eps, 0.0),
        running_stddev=running_stddev,
        renorm_mean=renorm_old * _f64(state.renorm_mean) + renorm_new * stats.mean,
        renorm_stddev=renorm_old * _f64(state.renorm_stddev) + renorm_new * stddev,
        num_batches_tracked=count,
    )


def backward_renorm_train(
    dy, x, renorm_mean, renorm_stddev, gamma=None, eps: float = 1e-3, axis: int = 1, clipping=None
) -> Gradients:
    """Gradients of the renorm training forward pass, ``r`` and ``d`` held constant."""
    x, dy = _f64(x), _f64(dy)
    gamma, _ = _affine(x, axis, gamma, None)
    stats = batch_stats(x, axis)
    r, d = renorm_correction(stats, renorm_mean, renorm_stddev, eps, clipping)
    plain = backward_train(dy, x, gamma * r, eps, axis)  # batch norm with the scale r * gamma
    axes = _reduce_axes(x, axis)
    invstd = 1.0 / np.sqrt(stats.var + eps)
    xhat = (x - _per_channel(stats.mean, x, axis)) * _per_channel(invstd, x, axis)
    dgamma = r * (dy * xhat).sum(axis=axes) + d * dy.sum(axis=axes)
    return Gradients(plain.dx, dgamma, plain.dbeta)
