"""How far two correct implementations of a layer may differ: tolerances that scale with magnitude
and with the reductions behind each value.

Two frameworks computing the same network in float32 sum in different orders, so their outputs
differ by rounding: not a divergence. A fixed absolute tolerance cannot tell that apart from a
real difference — activations of 10 after a 3×3×256 convolution differ by more than 1e-5 — and
neither can a formula alone: how rounding errors grow depends on the network and the data
(a batch norm that subtracts a mean close to the values magnifies them; a convolution over
correlated inputs shrinks them relative to its output). So compare *measures* it.

One extra run of one of the models (:func:`measure_rounding`) adds, at every traced layer's
output, simulated rounding noise — uniform, with standard deviation ``ε · sqrt(n) · (|y| + rms(y))``
per value, ``ε`` the dtype's machine epsilon, ``n`` the terms the layer sums per output (the
fan-in ``C_in·k_h·k_w`` of a convolution, a pooling window, the operands of a sum; 1 for an
activation; none for flatten, padding and concatenation, which move values without computing);
that is a few times what reordering a sum of ``n`` terms does. The largest change this noise
makes to each layer's output, ``R``, is how far rounding alone can move it, propagated through
the real network on the real input.

A pair of outputs ``a, b`` diverges where ``|a − b| > atol + SAFETY · R + rtol · max(|a|, |b|)``.
``R`` is at least the layer's own rounding (``ε · sqrt(n)`` times the magnitude of the terms it
sums), so a value the noise happened to leave alone is not held to zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bnkit.diagnose.kinds import kind_of
from bnkit.diagnose.trace import Entry, Trace, as_tensor, to_numpy

__all__ = ["SAFETY", "Rounding", "local_terms", "own_rounding", "rounding_noise", "measure_rounding", "diff"]

#: Multiple of the measured rounding a pair of outputs may differ by: the noise is one sample of
#: what rounding may do, and the largest of many roughly normal deviations varies between samples.
SAFETY = 2.0

_EXACT = ("flatten", "pad", "concat")  # values are moved, not computed


def _bn_gain(entry: Entry, framework: str) -> tuple[float, int]:
    """(gain, reduction length) of a batch norm: inference uses the running variance, training the
    batch's (measured from the input the layer received)."""
    w = entry.weights
    eps = float(w["eps"]) if "eps" in w else 0.0
    gamma = np.abs(w["gamma"]).astype(np.float64) if "gamma" in w else 1.0
    uses_batch = entry.bn.uses_batch_stats if entry.bn is not None else False
    n = 1
    if uses_batch and entry.input_raw:
        x = _float(entry.input_raw[0])
        axis = int(w.get("axis", -1)) % x.ndim if framework == "keras" else min(1, x.ndim - 1)
        others = tuple(k for k in range(x.ndim) if k != axis)
        var = x.var(dim=others, unbiased=False).double().numpy() if others else np.zeros(tuple(x.shape))
        n = int(np.prod([x.shape[k] for k in others])) if others else 1
    elif "var" in w:
        var = w["var"].astype(np.float64)
    else:
        return 1.0, 1
    with np.errstate(divide="ignore", invalid="ignore"):
        gains = gamma / np.sqrt(var + eps)
    gains = gains[np.isfinite(gains)] if np.ndim(gains) else np.asarray([gains])
    return (float(np.max(gains)) if gains.size else 1.0), n


def _ln_gain(entry: Entry) -> tuple[float, int]:
    """(gain, reduction length) of a layer norm: ``max |gamma| / min std`` over the samples, the
    normalized axes found from gamma's shape (the trailing axes, or the channel axis of an NCHW
    layer norm such as torchvision's LayerNorm2d); without gamma, every axis but the batch."""
    w = entry.weights
    gamma = w.get("gamma")
    eps = float(w["eps"]) if "eps" in w else 0.0
    largest = float(np.abs(gamma).max()) if gamma is not None and gamma.size else 1.0
    if not entry.input_raw:
        return largest, int(gamma.size) if gamma is not None else 1
    x = _float(entry.input_raw[0])
    shape = tuple(x.shape)
    if gamma is not None and shape[len(shape) - gamma.ndim :] == gamma.shape:
        axes = tuple(range(len(shape) - gamma.ndim, len(shape)))
    elif gamma is not None and gamma.ndim == 1 and len(shape) > 1 and shape[1] == gamma.size:
        axes = (1,)
    else:
        axes = tuple(range(1, len(shape)))
    if not axes or x.numel() == 0:
        return largest, 1
    var = x.var(dim=axes, unbiased=False).double()
    smallest = float(var.min()) if var.numel() else 0.0
    gain = largest / math.sqrt(smallest + eps) if smallest + eps > 0 else largest
    n = int(np.prod([shape[a] for a in axes]))
    return (gain if math.isfinite(gain) else largest), n


def local_terms(entry: Entry, framework: str, scale_in: float) -> tuple[float, int, float]:
    """(gain on an error of the input, terms summed per output value, magnitude of those terms)."""
    key = ("terms", framework, scale_in)
    if key not in entry.cache:
        entry.cache[key] = _local_terms(entry, framework, scale_in)
    return entry.cache[key]


def _local_terms(entry: Entry, framework: str, scale_in: float) -> tuple[float, int, float]:
    kind = kind_of(entry.kind)
    scale_out = entry.scale
    if entry.kind in ("conv", "dense") and "weight" in entry.weights:
        gain, n = 1.0, 0
        for key in ("depthwise", "weight"):
            if key in entry.weights:
                rows = entry.weights[key].reshape(entry.weights[key].shape[0], -1).astype(np.float64)
                gain *= float(np.sqrt((rows**2).sum(axis=1)).max()) if rows.size else 1.0
                n += rows.shape[1]
        return gain, max(n, 1), max(scale_out, gain * scale_in)
    if entry.kind == "bn":
        gain, n = _bn_gain(entry, framework)
        mean = float(np.abs(entry.weights["mean"]).max()) if entry.weights.get("mean") is not None else 0.0
        return gain, n, max(scale_out, gain * max(scale_in, mean))
    if entry.kind == "ln":
        gain, n = _ln_gain(entry)
        return gain, n, max(scale_out, gain * scale_in)
    if kind.reduction == "window":
        size_out = int(np.prod(entry.canonical.shape[1:])) or 1
        size_in = int(np.prod(entry.input_shapes[0][1:])) if entry.input_shapes else size_out
        return 1.0, max(size_in // size_out, 1), max(scale_out, scale_in)
    if kind.reduction == "inputs":
        return 1.0, max(len(entry.inputs), 1), max(scale_out, scale_in)
    if entry.kind in _EXACT:
        return 1.0, 0, 0.0
    if entry.kind == "act":
        return 1.0, 1, scale_out
    # a kind without a rule: element-wise, as large as what it received or made
    return 1.0, 1, max(scale_out, scale_in)


def own_rounding(entry: Entry, framework: str, eps: float) -> float:
    """``ε · sqrt(n) · m``: the rounding of the layer's own sums."""
    _, n, terms = local_terms(entry, framework, max(entry.input_scales or [0.0]))
    return eps * math.sqrt(n) * terms


def rounding_noise(framework: str, eps: float, seed: int = 0):
    """The ``perturb`` function of a tracer that adds simulated rounding noise (module docstring).

    It takes and returns the framework's tensors (torch tensors: PyTorch, and Keras on its torch
    backend; NumPy arrays otherwise). The noise of each layer is a window, at a random offset, of
    one sequence of uniform numbers drawn once: drawing a new number for every value of every
    layer would cost more than the model's own run, and windows at different offsets of white
    noise are uncorrelated."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    spread = 1 << 16  # offsets
    pool: list = [torch.empty(0)]

    def window(numel: int):
        if pool[0].numel() < numel + spread:  # uniform with standard deviation 1: rounding errors are about uniform
            size = max(numel + spread, 2 * pool[0].numel())
            pool[0] = torch.rand(size, generator=generator).sub_(0.5).mul_(2 * math.sqrt(3.0))
        offset = int(torch.randint(spread, (1,), generator=generator))
        return pool[0][offset : offset + numel]

    def perturb(entry: Entry, kind: str, output):
        if kind in _EXACT:
            return None
        tensor = output if isinstance(output, torch.Tensor) else torch.from_numpy(np.array(to_numpy(output)))
        if tensor.numel() == 0 or not tensor.is_floating_point():
            return None
        n = 1 if kind == "act" else local_terms(entry, framework, max(entry.input_scales or [0.0]))[1]
        with torch.no_grad():
            y = tensor.detach().float()
            rms = float(torch.linalg.vector_norm(y)) / math.sqrt(y.numel())
            if not math.isfinite(rms):  # NaN/Inf stay what they are; the rest gets noise of its size
                finite = y[y.isfinite()]
                rms = float(torch.linalg.vector_norm(finite)) / math.sqrt(max(finite.numel(), 1))
            amplitude = y.abs().add_(rms).mul_(eps * math.sqrt(max(n, 1)))
            noisy = amplitude.mul_(window(y.numel()).view(y.shape)).add_(y).to(tensor.dtype)
        return noisy if isinstance(output, torch.Tensor) else noisy.numpy()

    return perturb


@dataclass
class Rounding:
    """How far simulated rounding moved each traced layer's output, the final output and (after a
    training step) each batch norm's running mean and variance."""

    layers: list[float]
    output: float
    running_stats: list[tuple[float, float]]


def measure_rounding(run, clean: Trace) -> Rounding | None:
    """Run the model once more with :func:`rounding_noise` (``run(perturb) -> Trace``) and return
    the largest change it made to every traced layer's output; None when the noisy run traced
    other layers (a model whose graph depends on its values)."""
    noisy = run(rounding_noise(clean.framework, clean.dtype_eps))
    if len(noisy.entries) != len(clean.entries) or any(
        a.kind != b.kind or a.canonical.shape != b.canonical.shape
        for a, b in zip(noisy.entries, clean.entries, strict=True)
    ):
        return None
    pairs = list(zip(clean.entries, noisy.entries, strict=True))
    stats = []
    for a, b in pairs:
        if a.bn is None or b.bn is None or a.bn.running_mean_after is None or b.bn.running_mean_after is None:
            stats.append((0.0, 0.0))
        else:
            stats.append(
                (
                    _largest_change(a.bn.running_mean_after, b.bn.running_mean_after),
                    _largest_change(a.bn.running_var_after, b.bn.running_var_after),
                )
            )
    return Rounding(
        [_largest_change(a.canonical, b.canonical) for a, b in pairs],
        _largest_change(clean.output, noisy.output),
        stats,
    )


def _largest_change(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape or a.size == 0:
        return 0.0
    d = (_float(a) - _float(b)).abs()
    largest = float(d.max())
    if math.isfinite(largest):
        return largest
    d = d[d.isfinite()]
    return float(d.max()) if d.numel() else 0.0


def _float(x: np.ndarray):
    """``x`` as a torch tensor of float32 at least (a view where it already is)."""
    import torch

    t = as_tensor(np.asarray(x))
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def diff(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> tuple[float, float, float, bool]:
    """(max abs diff, max rel diff, tolerance ratio, diverges) of two arrays.

    The ratio is the largest ``|a - b| / (atol + rtol * max(|a|, |b|))``: over 1, they diverge.
    NaN/Inf at the same place on both sides count as equal here (compare reports them apart);
    arrays of different shapes that hold different numbers of values diverge (ratio ``inf``).
    Computed in float32 (float64 for float64 arrays): the difference of two nearby float32 values is
    exact, and the ratio needs a few digits only.
    """
    if a.shape != b.shape:
        squeeze_a = tuple(s for s in a.shape if s != 1)
        squeeze_b = tuple(s for s in b.shape if s != 1)
        if squeeze_a != squeeze_b:
            return math.inf, math.inf, math.inf, True
        a, b = a.reshape(squeeze_a), b.reshape(squeeze_b)
    if a.size == 0:
        return 0.0, 0.0, 0.0, False
    import torch

    ta, tb = _float(a), _float(b)
    if ta.dtype != tb.dtype:
        ta, tb = ta.double(), tb.double()
    ta, tb = ta.contiguous(), tb.contiguous()  # a Keras output seen in PyTorch's layout is a strided view
    with torch.no_grad():
        d = ta.sub(tb).abs_()
        scale = torch.maximum(ta.abs(), tb.abs())
        largest = float(d.max())
        if not math.isfinite(largest):  # NaN/Inf: equal where both sides hold the same one
            both = ta.isfinite() & tb.isfinite()
            same = ~both & ((ta == tb) | (ta.isnan() & tb.isnan()))
            d = torch.where(same, 0.0, torch.where(both, d, math.inf))
            scale = torch.where(scale.isfinite(), scale, 0.0)
            largest = float(d.max())
        # where both are 0 the difference is 0: the floor on the scale only avoids 0 / 0
        rel = float(d.div(scale.clamp_min(torch.finfo(scale.dtype).tiny)).max())
        if atol > 0:
            max_ratio = float(d.div_(scale.mul_(rtol).add_(atol)).max())
        else:
            ratio = torch.where(d == 0, 0.0, d / (scale * rtol + atol))
            max_ratio = float(torch.nan_to_num(ratio, nan=math.inf).max())
        return largest, rel, max_ratio, max_ratio > 1.0
