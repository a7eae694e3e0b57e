"""Pooling, both ways: ``MaxPooling``/``AveragePooling`` 1D/2D/3D ⇄ ``nn.MaxPool``/``nn.AvgPool`` 1d/2d/3d
(and ``F.max_pool*d``/``F.avg_pool*d``, ``ceil_mode`` included); global pooling ⇄
``nn.Adaptive*Pool*d(1)``, ``F.adaptive_*_pool*d(x, 1)``, ``x.mean((2, 3))``, ``torch.amax``;
adaptive pooling ⇄ ``AdaptiveAveragePooling``/``AdaptiveMaxPooling`` 1D/2D/3D (Keras computes
PyTorch's windows: from ``floor(i·n/out)`` to ``ceil((i+1)·n/out)``). The 3-D layers (video networks) follow
the same rules with one more axis.

A pooling is its windows. PyTorch's start at ``-padding + i·stride``; with ``ceil_mode`` the last
one may reach past the right padding (what lies outside is ignored). Keras' ``valid`` windows
start at 0; ``same`` ones at ``-before`` with ``(before, after)`` Keras' padding (the odd element
after), ``ceil(n / stride)`` of them. Where the windows agree the values do, with two caveats:

* averages: Keras averages over real values only (PyTorch's ``count_include_pad=False``). Where
  ``same`` pads asymmetrically on some axis, Keras' torch backend pads every axis by replicating
  edge values (its TensorFlow backend ignores the padding), so only 2-wide windows padded by one
  element after agree with PyTorch (both give the edge value); other such averages are refused;
* max pooling of values ``>= 0`` (after a ReLU) may be padded with explicit zeros, which never
  win: that converts any windows whose last one still holds a real value.
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

_KERAS_MAX_POOLS = (L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D)
_KERAS_GLOBAL_MAX_POOLS = (L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D)
_KERAS_ADAPTIVE_MAX_POOLS = (L.AdaptiveMaxPooling1D, L.AdaptiveMaxPooling2D, L.AdaptiveMaxPooling3D)
_TORCH_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_TORCH_ADAPTIVE_MAX_POOLS = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _keras_averages_real_values(pads, ks) -> bool:
    """Whether Keras' ``same`` average pooling with ``pads`` (before, after) per axis averages the
    real values only on its torch backend, as PyTorch (``count_include_pad=False``) and TensorFlow do."""
    if all(before == after for before, after in pads):
        return True  # padding passed to avg_pool(count_include_pad=False)
    # padded by replicating the edges on every axis: exact where a window holds one value and its copy
    return all(pad == (0, 0) or (pad == (0, 1) and k == 2) for pad, k in zip(pads, ks, strict=True))


# ---- Keras -> PyTorch ---------------------------------------------------------------------


@from_keras(*_KERAS_MAX_POOLS, L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D)
def pool_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    spatial_rank = x.rank - 2
    in_shape = node.input_tensors[0].shape
    ks, strides = tuple(layer.pool_size), tuple(layer.strides)
    padding = [0] * spatial_rank
    is_max = layer.pool_mode == "max"  # any rank
    source = x.node
    ceil_mode = False
    if layer.padding == "same":
        pads = [same_padding(in_shape[1 + i], ks[i], strides[i], 1) for i in range(spatial_rank)]
        for i, pad in enumerate(pads):
            if pad is None:
                raise b.unsupported(layer, f"padding='same' with strides on axis {i + 1}, whose size is not known")
        # PyTorch's ceil_mode pools the same windows when Keras pads one element more after than
        # before on a strided axis: the last window overhangs the right padding, which it ignores
        overhangs = all(af == bf or (af == bf + 1 and s > 1) for (bf, af), s in zip(pads, strides, strict=True))
        if all(bf == af for bf, af in pads) or (overhangs and (is_max or _keras_averages_real_values(pads, ks))):
            ceil_mode = any(bf != af for bf, af in pads)
            padding = [bf for bf, _ in pads]
        elif is_max and b.input_non_negative(node):
            # zeros never win a max over values >= 0 (after a ReLU): pad explicitly, pool 'valid'
            source = zero_pad_torch(b, f"{layer.name}_pad", source, pads)
        else:
            i, pad = next((i, p) for i, p in enumerate(pads) if p[0] != p[1])
            if is_max:
                reason = "PyTorch pooling pads symmetrically (or max-pool the output of a ReLU)"
            else:
                reason = "Keras' torch backend then averages replicated edge values (TensorFlow's the real values only)"
            raise b.unsupported(
                layer,
                f"padding='same' pads axis {i + 1} by {pad} (before, after); {reason}: "
                "use padding='valid' or an input size that pads evenly",
            )
    cls = {
        (True, 1): nn.MaxPool1d,
        (True, 2): nn.MaxPool2d,
        (False, 1): nn.AvgPool1d,
        (False, 2): nn.AvgPool2d,
        (True, 3): nn.MaxPool3d,
        (False, 3): nn.AvgPool3d,
    }[(is_max, spatial_rank)]
    kwargs = {} if is_max else {"count_include_pad": False}  # Keras averages over real values only
    pool = cls(ks, stride=strides, padding=tuple(padding), ceil_mode=ceil_mode, **kwargs)
    return TorchValue(b.add_module(layer.name, pool, source), x.rank)


@from_keras(L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D, *_KERAS_GLOBAL_MAX_POOLS)
def global_pool_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    dims = tuple(range(2, x.rank))
    fn = torch.amax if isinstance(layer, _KERAS_GLOBAL_MAX_POOLS) else torch.mean
    keepdims = bool(layer.keepdims)
    out = b.graph.call_function(fn, (x.node,), {"dim": dims, "keepdim": keepdims})
    return TorchValue(out, x.rank if keepdims else 2)


@from_keras(
    L.AdaptiveAveragePooling1D, L.AdaptiveAveragePooling2D, L.AdaptiveAveragePooling3D, *_KERAS_ADAPTIVE_MAX_POOLS
)
def adaptive_pool_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    is_max = isinstance(layer, _KERAS_ADAPTIVE_MAX_POOLS)
    cls = {
        (True, 3): nn.AdaptiveMaxPool1d,
        (True, 4): nn.AdaptiveMaxPool2d,
        (True, 5): nn.AdaptiveMaxPool3d,
        (False, 3): nn.AdaptiveAvgPool1d,
        (False, 4): nn.AdaptiveAvgPool2d,
        (False, 5): nn.AdaptiveAvgPool3d,
    }[(is_max, x.rank)]
    size = tuple(layer.output_size)
    return TorchValue(b.add_module(layer.name, cls(size[0] if x.rank == 3 else size), x.node), x.rank)


# ---- PyTorch -> Keras ---------------------------------------------------------------------


def _keras_pool_class(is_max: bool, n: int):
    return {
        (True, 1): L.MaxPooling1D,
        (True, 2): L.MaxPooling2D,
        (True, 3): L.MaxPooling3D,
        (False, 1): L.AveragePooling1D,
        (False, 2): L.AveragePooling2D,
        (False, 3): L.AveragePooling3D,
    }[(is_max, n)]


def pool_keras(b: TorchToKeras, node, m, x: KerasValue, name: str) -> KerasValue:
    """The Keras pooling of the PyTorch pooling module ``m`` (or its functional call at ``node``)."""
    n = x.rank - 2
    ks = _tuple(m.kernel_size, n)
    strides = _tuple(m.stride if m.stride is not None else m.kernel_size, n)
    pads = _tuple(m.padding, n)
    is_max = isinstance(m, nn.modules.pooling._MaxPoolNd)
    if is_max and (set(_tuple(m.dilation, n)) != {1} or m.return_indices):
        raise b.unsupported(node, "dilation and return_indices have no Keras equivalent")
    if not is_max and getattr(m, "divisor_override", None) is not None:
        raise b.unsupported(node, "divisor_override has no Keras equivalent")
    cls = _keras_pool_class(is_max, n)
    sizes, outs = x.shape[1:], b.out_shape(node)[1:]
    # how far the last window reaches past the right end of the input (< 0: values left unpooled)
    afters = [(o - 1) * s + k - size - p for o, s, k, size, p in zip(outs, strides, ks, sizes, pads, strict=True)]
    if not any(pads) and all(a <= 0 for a in afters):  # Keras' 'valid' windows (ceil_mode adds none here)
        return b.apply(node, cls(ks, strides=strides, padding="valid", name=name), x)
    keras_same = [same_padding(size, k, s, 1) for size, k, s in zip(sizes, ks, strides, strict=True)]
    same_windows = all(
        p == before and o == math.ceil(size / s)
        for p, (before, _), o, size, s in zip(pads, keras_same, outs, sizes, strides, strict=True)
    )
    counts_zeros = not is_max and m.count_include_pad and any(pads)  # Keras' 'same' averages real values only
    if same_windows and not counts_zeros and (is_max or _keras_averages_real_values(keras_same, ks)):
        return b.apply(node, cls(ks, strides=strides, padding="same", name=name), x)
    valid_after_padding = all(
        (size + 2 * p - k) // s + 1 == o for size, p, k, s, o in zip(sizes, pads, ks, strides, outs, strict=True)
    )
    if counts_zeros and all(a <= p for a, p in zip(afters, pads, strict=True)) and valid_after_padding:
        # the padded zeros count in PyTorch's average, and no window reaches past them: pad explicitly
        flat = tuple(p for q in reversed(pads) for p in (q, q))
        source = zero_padding_keras(b, node, x, b.unique_name(f"{name}_pad"), flat)
        return b.apply(node, cls(ks, strides=strides, padding="valid", name=name), source)
    if is_max and b.non_negative(node.args[0]):
        # zeros never win a max over values >= 0 (after a ReLU): pad explicitly as far as the windows reach
        flat = tuple(v for p, a in zip(reversed(pads), reversed(afters), strict=True) for v in (p, max(a, 0)))
        source = zero_padding_keras(b, node, x, b.unique_name(f"{name}_pad"), flat)
        return b.apply(node, cls(ks, strides=strides, padding="valid", name=name), source)
    if m.ceil_mode:
        windows = ", ".join(
            f"{o} from {-p} every {s} over {size}" for o, p, s, size in zip(outs, pads, strides, sizes, strict=True)
        )
        raise b.unsupported(
            node,
            f"ceil_mode=True pools windows ({windows}) that Keras' 'valid' and 'same' (padding {keras_same}) "
            "do not; explicit zero padding would be exact only on values >= 0 (after a ReLU)",
        )
    raise b.unsupported(node, f"padding={pads} is not what Keras 'same' pads here ({keras_same})")


@from_torch(*_TORCH_MAX_POOLS, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def pool_module_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    return pool_keras(b, node, m, b.input(node), b.name(node))


_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
_POOL_FUNCTIONS = {
    F.max_pool1d: (nn.MaxPool1d, _MAX_POOL_ARGS),
    F.max_pool2d: (nn.MaxPool2d, _MAX_POOL_ARGS),
    F.avg_pool1d: (nn.AvgPool1d, _AVG_POOL_ARGS),
    F.avg_pool2d: (nn.AvgPool2d, (*_AVG_POOL_ARGS, "divisor_override")),
    F.max_pool3d: (nn.MaxPool3d, _MAX_POOL_ARGS),
    F.avg_pool3d: (nn.AvgPool3d, (*_AVG_POOL_ARGS, "divisor_override")),
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
    if n not in (1, 2, 3):
        raise b.unsupported(node, f"global pooling of a rank-{x.rank} input")
    cls = {
        (False, 1): L.GlobalAveragePooling1D,
        (False, 2): L.GlobalAveragePooling2D,
        (False, 3): L.GlobalAveragePooling3D,
        (True, 1): L.GlobalMaxPooling1D,
        (True, 2): L.GlobalMaxPooling2D,
        (True, 3): L.GlobalMaxPooling3D,
    }[(is_max, n)]
    out = cls(keepdims=keepdims, name=b.name(node))(x.tensor)
    shape = (x.shape[0], *([1] * n)) if keepdims else (x.shape[0],)
    return KerasValue(out, shape)


def adaptive_pool_keras(b: TorchToKeras, node, x: KerasValue, output_size, is_max: bool) -> KerasValue:
    """PyTorch's adaptive pooling of ``x`` to ``output_size`` (``None`` entries: the input's size)
    in Keras: global pooling (output 1), the identity (output = input), a pooling with kernel =
    stride = input / output (where that divides), else Keras' own adaptive pooling."""
    n = x.rank - 2
    if n not in (1, 2, 3):
        raise b.unsupported(node, f"adaptive pooling of a rank-{x.rank} input")
    sizes = x.shape[1:]
    outs = tuple(size if o is None else int(o) for o, size in zip(_tuple(output_size, n), sizes, strict=True))
    name = b.name(node)
    if all(o == 1 for o in outs):
        return global_pool_keras(b, node, x, is_max, keepdims=True)
    if outs == tuple(sizes):
        return KerasValue(L.Identity(name=name)(x.tensor), x.shape)
    if all(size % o == 0 for size, o in zip(sizes, outs, strict=True)):
        ks = tuple(size // o for size, o in zip(sizes, outs, strict=True))
        return b.apply(node, _keras_pool_class(is_max, n)(ks, strides=ks, padding="valid", name=name), x)
    cls = {
        (False, 1): L.AdaptiveAveragePooling1D,
        (False, 2): L.AdaptiveAveragePooling2D,
        (False, 3): L.AdaptiveAveragePooling3D,
        (True, 1): L.AdaptiveMaxPooling1D,
        (True, 2): L.AdaptiveMaxPooling2D,
        (True, 3): L.AdaptiveMaxPooling3D,
    }[(is_max, n)]
    return b.apply(node, cls(outs[0] if n == 1 else outs, name=name), x)


@from_torch(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, *_TORCH_ADAPTIVE_MAX_POOLS)
def adaptive_pool_module_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    if getattr(m, "return_indices", False):
        raise b.unsupported(node, "return_indices=True has no Keras equivalent")
    return adaptive_pool_keras(b, node, b.input(node), m.output_size, isinstance(m, _TORCH_ADAPTIVE_MAX_POOLS))


_ADAPTIVE_MAX_FUNCTIONS = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)


@from_torch(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, *_ADAPTIVE_MAX_FUNCTIONS)
def adaptive_pool_function_to_keras(b: TorchToKeras, node, fn) -> KerasValue:
    if fn in _ADAPTIVE_MAX_FUNCTIONS and b.arg(node, 2, "return_indices", False):
        raise b.unsupported(node, "return_indices=True has no Keras equivalent")
    output_size = b.arg(node, 1, "output_size")
    return adaptive_pool_keras(b, node, b.input(node), output_size, fn in _ADAPTIVE_MAX_FUNCTIONS)


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
