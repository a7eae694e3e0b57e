"""Pooling, both ways: ``MaxPooling``/``AveragePooling`` 1D/2D ⇄ ``nn.MaxPool``/``nn.AvgPool`` 1d/2d
(and ``F.max_pool*d``/``F.avg_pool*d``); global pooling ⇄ ``nn.Adaptive*Pool*d(1)``,
``F.adaptive_avg_pool*d(x, 1)``, ``x.mean((2, 3))``, ``torch.amax``.

Keras ``same`` pooling pads the odd element after; PyTorch pads symmetrically. Where they differ:
a stride that pads one element after is PyTorch's ``ceil_mode`` (the last window overhangs,
exact for max pooling and 2-wide averages: Keras' torch backend averages a replicated edge
value where its TensorFlow backend averages real values only, and only 2-wide windows agree);
max pooling of values ``>= 0`` (after a ReLU) may be padded with explicit zeros, which never win.
Keras averages over real values only (``count_include_pad=False``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bnkit.convert._common import same_padding
from bnkit.convert.families.padding import zero_pad_torch, zero_padding_keras
from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import KerasValue, TorchValue
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers

_KERAS_MAX_POOLS = (L.MaxPooling1D, L.MaxPooling2D)
_KERAS_GLOBAL_MAX_POOLS = (L.GlobalMaxPooling1D, L.GlobalMaxPooling2D)
_TORCH_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d)


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


# ---- Keras -> PyTorch ---------------------------------------------------------------------


@from_keras(*_KERAS_MAX_POOLS, L.AveragePooling1D, L.AveragePooling2D)
def pool_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    b.check_channels_last(layer)
    (x,) = inputs
    spatial_rank = x.rank - 2
    in_shape = node.input_tensors[0].shape
    ks, strides = tuple(layer.pool_size), tuple(layer.strides)
    padding = [0] * spatial_rank
    is_max = isinstance(layer, _KERAS_MAX_POOLS)
    source = x.node
    ceil_mode = False
    if layer.padding == "same":
        pads = [same_padding(in_shape[1 + i], ks[i], strides[i], 1) for i in range(spatial_rank)]
        known = None not in pads  # None: a strided axis of unknown size
        overhang = [
            known and (before, after) == (0, 1) and s > 1 and (is_max or k == 2)
            for (before, after), s, k in zip(pads if known else [(0, 0)] * spatial_rank, strides, ks, strict=True)
        ]
        if known and all(before == after or o for (before, after), o in zip(pads, overhang, strict=True)):
            # padded one element after, with a stride: PyTorch's ceil_mode pools the same windows
            # (from 0, every stride) and lets the last one overhang, ignoring what lies outside
            ceil_mode = any(before != after for before, after in pads)
            pads = [(before, before) for before, _ in pads]
        elif is_max and known and any(bf != af for bf, af in pads) and b.input_non_negative(node):
            # zeros never win a max over values >= 0 (after a ReLU): pad explicitly, pool 'valid'
            source = zero_pad_torch(b, f"{layer.name}_pad", source, pads)
            pads = [(0, 0)] * spatial_rank
        for i, pad in enumerate(pads):
            if pad is None:
                raise b.unsupported(layer, f"padding='same' with strides on axis {i + 1}, whose size is not known")
            if pad[0] != pad[1] or pad[0] > ks[i] // 2:
                raise b.unsupported(
                    layer,
                    f"padding='same' pads axis {i + 1} by {pad} (before, after); PyTorch pooling pads "
                    "symmetrically: use padding='valid' or an input size that pads evenly"
                    + (" (or max-pool the output of a ReLU)" if is_max else ""),
                )
            padding[i] = pad[0]
    cls = {
        (True, 1): nn.MaxPool1d,
        (True, 2): nn.MaxPool2d,
        (False, 1): nn.AvgPool1d,
        (False, 2): nn.AvgPool2d,
    }[(is_max, spatial_rank)]
    kwargs = {} if is_max else {"count_include_pad": False}  # Keras averages over real values only
    pool = cls(ks, stride=strides, padding=tuple(padding), ceil_mode=ceil_mode, **kwargs)
    return TorchValue(b.add_module(layer.name, pool, source), x.rank)


@from_keras(L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, *_KERAS_GLOBAL_MAX_POOLS)
def global_pool_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    b.check_channels_last(layer)
    (x,) = inputs
    dims = tuple(range(2, x.rank))
    fn = torch.amax if isinstance(layer, _KERAS_GLOBAL_MAX_POOLS) else torch.mean
    keepdims = bool(layer.keepdims)
    out = b.graph.call_function(fn, (x.node,), {"dim": dims, "keepdim": keepdims})
    return TorchValue(out, x.rank if keepdims else 2)


# ---- PyTorch -> Keras ---------------------------------------------------------------------


def pool_keras(b: TorchToKeras, node, m, x: KerasValue, name: str) -> KerasValue:
    """The Keras pooling of the PyTorch pooling module ``m`` (or its functional call at ``node``)."""
    n = x.rank - 2
    ks = _tuple(m.kernel_size, n)
    strides = _tuple(m.stride if m.stride is not None else m.kernel_size, n)
    pads = _tuple(m.padding, n)
    is_max = isinstance(m, _TORCH_MAX_POOLS)
    if is_max and (set(_tuple(m.dilation, n)) != {1} or m.return_indices):
        raise b.unsupported(node, "dilation and return_indices have no Keras equivalent")
    if not is_max and getattr(m, "divisor_override", None) is not None:
        raise b.unsupported(node, "divisor_override has no Keras equivalent")
    cls = {(True, 1): L.MaxPooling1D, (True, 2): L.MaxPooling2D, (False, 1): L.AveragePooling1D}.get(
        (is_max, n), L.AveragePooling2D
    )
    if m.ceil_mode:
        return b.apply(node, cls(ks, strides=strides, padding=_ceil_mode_same(b, node, m, x), name=name), x)
    padding = "valid"
    source = x
    if any(pads):
        keras_same = [same_padding(x.shape[1 + i], ks[i], strides[i], 1) for i in range(n)]
        counts_zeros = not is_max and m.count_include_pad  # Keras' 'same' averages real values only
        if not counts_zeros and all(p == (q, q) for p, q in zip(keras_same, pads, strict=True)):
            padding = "same"
        elif counts_zeros or (is_max and b.non_negative(node.args[0])):
            # counted zeros (average), or zeros that never win a max over values >= 0 (after a ReLU)
            flat = tuple(p for q in reversed(pads) for p in (q, q))
            source = zero_padding_keras(b, node, x, b.unique_name(f"{name}_pad"), flat)
        else:
            raise b.unsupported(node, f"padding={pads} is not what Keras 'same' pads here ({keras_same})")
    return b.apply(node, cls(ks, strides=strides, padding=padding, name=name), source)


def _ceil_mode_same(b: TorchToKeras, node, m, x: KerasValue) -> str:
    """``"same"`` when a ``ceil_mode=True`` pooling pools Keras' 'same' windows: on every axis
    the padding is Keras' (symmetric), or (max pooling) none where Keras pads one element
    after (the last window overhangs), and the output has Keras' size ``ceil(n / stride)``."""
    n = x.rank - 2
    ks, pads = _tuple(m.kernel_size, n), _tuple(m.padding, n)
    strides = _tuple(m.stride if m.stride is not None else m.kernel_size, n)
    out = b.out_shape(node)[1:]
    is_max = isinstance(m, _TORCH_MAX_POOLS)
    for i in range(n):
        size = x.shape[1 + i]
        before, after = same_padding(size, ks[i], strides[i], 1)
        overhang = (is_max or ks[i] == 2) and pads[i] == 0 and (before, after) == (0, 1)
        fits = (before, after) == (pads[i], pads[i]) or overhang
        counts_zeros = pads[i] and not is_max and m.count_include_pad
        if not fits or counts_zeros or out[i] != math.ceil(size / strides[i]):
            raise b.unsupported(node, "ceil_mode=True pools windows that Keras' 'same' padding does not")
    return "same"


@from_torch(*_TORCH_MAX_POOLS, nn.AvgPool1d, nn.AvgPool2d)
def pool_module_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    return pool_keras(b, node, m, b.input(node), b.name(node))


_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
_POOL_FUNCTIONS = {
    F.max_pool1d: (nn.MaxPool1d, _MAX_POOL_ARGS),
    F.max_pool2d: (nn.MaxPool2d, _MAX_POOL_ARGS),
    F.avg_pool1d: (nn.AvgPool1d, _AVG_POOL_ARGS),
    F.avg_pool2d: (nn.AvgPool2d, (*_AVG_POOL_ARGS, "divisor_override")),
}


@from_torch(*_POOL_FUNCTIONS)
def pool_function_to_keras(b: TorchToKeras, node, fn) -> KerasValue:
    """``F.max_pool2d(x, 2)`` and friends, as the module they stand for."""
    cls, names = _POOL_FUNCTIONS[fn]
    given = {key: b.arg(node, i + 1, key) for i, key in enumerate(names) if b.arg(node, i + 1, key) is not None}
    return pool_keras(b, node, cls(**given), b.input(node), b.name(node))


def global_pool_keras(b: TorchToKeras, node, x: KerasValue, is_max: bool, keepdims: bool) -> KerasValue:
    """Keras global average/max pooling over the spatial axes of ``x``."""
    n = x.rank - 2
    if n not in (1, 2):
        raise b.unsupported(node, f"global pooling of a rank-{x.rank} input")
    cls = {
        (False, 1): L.GlobalAveragePooling1D,
        (False, 2): L.GlobalAveragePooling2D,
        (True, 1): L.GlobalMaxPooling1D,
        (True, 2): L.GlobalMaxPooling2D,
    }[(is_max, n)]
    out = cls(keepdims=keepdims, name=b.name(node))(x.tensor)
    shape = (x.shape[0], *([1] * n)) if keepdims else (x.shape[0],)
    return KerasValue(out, shape)


_ADAPTIVE_MAX_POOLS = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


@from_torch(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, *_ADAPTIVE_MAX_POOLS)
def adaptive_pool_module_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    x = b.input(node)
    if set(_tuple(m.output_size, x.rank - 2)) != {1}:
        raise b.unsupported(node, f"output_size={m.output_size!r}; only 1 (global pooling) converts")
    return global_pool_keras(b, node, x, isinstance(m, _ADAPTIVE_MAX_POOLS), keepdims=True)


@from_torch(F.adaptive_avg_pool2d, F.adaptive_avg_pool1d)
def adaptive_pool_function_to_keras(b: TorchToKeras, node, fn) -> KerasValue:
    x = b.input(node)
    if set(_tuple(b.arg(node, 1, "output_size"), x.rank - 2)) != {1}:
        raise b.unsupported(node, "only output_size=1 (global pooling) converts")
    return global_pool_keras(b, node, x, False, keepdims=True)


_MAX_REDUCTIONS = (torch.amax, torch.ops.aten.amax.default)


@from_torch(torch.mean, torch.ops.aten.mean.dim, *_MAX_REDUCTIONS, methods=("mean",))
def spatial_reduction_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    """``x.mean((2, 3))``, ``torch.mean(x, (2, 3), keepdim=True)``, ``torch.amax``: global pooling."""
    x = b.input(node)
    dims = b.arg(node, 1, "dim")
    dims = tuple(sorted(d % x.rank for d in _tuple(dims, 1))) if dims is not None else None
    if dims != tuple(range(2, x.rank)):
        what = "a mean" if target in ("mean", torch.mean, torch.ops.aten.mean.dim) else "a reduction"
        raise b.unsupported(node, f"{what} over dims {dims}; only the spatial dims convert")
    keepdim = bool(b.arg(node, 2, "keepdim", False))
    return global_pool_keras(b, node, x, target in _MAX_REDUCTIONS, keepdims=keepdim)
