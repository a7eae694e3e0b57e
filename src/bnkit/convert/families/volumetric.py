"""3-D (volumetric, video) layers, both ways: ``Conv3D`` (``groups`` too) ⇄ ``nn.Conv3d``;
``MaxPooling3D``/``AveragePooling3D`` ⇄ ``nn.MaxPool3d``/``nn.AvgPool3d`` (and ``F.max_pool3d``,
``F.avg_pool3d``); ``GlobalAveragePooling3D``/``GlobalMaxPooling3D`` ⇄ ``nn.AdaptiveAvgPool3d(1)``,
``nn.AdaptiveMaxPool3d(1)``, ``x.mean((2, 3, 4))``; ``AdaptiveAveragePooling3D``/``AdaptiveMaxPooling3D``
⇄ ``nn.AdaptiveAvgPool3d``/``nn.AdaptiveMaxPool3d`` (any output size). ``BatchNormalization`` on
rank-5 tensors is ``nn.BatchNorm3d`` (:mod:`~bnkit.convert.families.normalization`, chosen by rank).

The arithmetic is the 1-D/2-D layers' with one more axis, and is theirs
(:mod:`~bnkit.convert.families.convolution`, :mod:`~bnkit.convert.families.pooling`):

* kernels: Keras ``(kd, kh, kw, in/groups, out)`` ⇄ PyTorch ``(out, in/groups, kd, kh, kw)``;
* padding: Keras ``same`` pads ``max((ceil(n/s) - 1)·s + (k-1)·d + 1 - n, 0)`` per axis, the odd
  element after: symmetric totals are integer padding, stride 1 with an odd total PyTorch's
  ``padding="same"``, anything else an explicit ``ZeroPad3d``/``ZeroPadding3D`` before a ``valid`` conv;
* Keras has no ``DepthwiseConv3D``: a PyTorch ``Conv3d(C, C·M, k, groups=C)`` is a ``Conv3D(groups=C)``,
  which computes the same sums (kernel ``(kd, kh, kw, 1, C·M)``), and converts back to the same ``Conv3d``;
* Keras refuses ``strides > 1`` with ``dilation_rate > 1`` in ``Conv3D``: such a ``Conv3d`` is refused;
* pooling windows as in 2-D: ``ceil_mode``, ``count_include_pad`` and padding convert where the
  windows (and the values averaged) are the same, else are refused naming the argument.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bnkit.convert.families.activation import has_non_negative_activation, with_activation
from bnkit.convert.families.convolution import (
    _bias,
    _conv_settings,
    _keras_kernel,
    _keras_padding,
    _padded,
    _torch_kernel,
    _torch_padding,
)
from bnkit.convert.families.pooling import (
    _AVG_POOL_ARGS,
    _MAX_POOL_ARGS,
    adaptive_pool_keras,
    pool_keras,
    pool_to_torch,
)
from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import KerasValue, TorchValue, keras_array, torch_array, torch_module_holding
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers


# ---- Keras -> PyTorch ---------------------------------------------------------------------


@from_keras(L.Conv3D, non_negative=has_non_negative_activation)
def conv3d_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """``Conv3D(filters, k, groups=g)`` → ``nn.Conv3d(in, filters, k, groups=g)``, its padding as in 2-D."""
    (x,) = inputs
    kernel = keras_array(layer.kernel)  # (kd, kh, kw, in/groups, out)
    padding, explicit = _torch_padding(b, layer, node, x)
    conv = torch_module_holding(
        lambda: nn.Conv3d(
            kernel.shape[-2] * layer.groups,
            layer.filters,
            tuple(layer.kernel_size),
            stride=tuple(layer.strides),
            padding=padding,
            dilation=tuple(layer.dilation_rate),
            groups=layer.groups,
            bias=layer.use_bias,
        ),
        {"weight": _torch_kernel(kernel)} | _bias(layer),
    )
    out = TorchValue(b.add_module(layer.name, conv, _padded(b, layer, x, explicit)), x.rank)
    return with_activation(b, layer, out)


@from_keras(L.MaxPooling3D, L.AveragePooling3D)
def pool3d_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """``MaxPooling3D``/``AveragePooling3D`` → ``nn.MaxPool3d``/``nn.AvgPool3d(count_include_pad=False)``,
    ``same`` padding as the 2-D layers convert it (``ceil_mode`` where Keras pads one more after)."""
    return pool_to_torch(b, layer, node, inputs)


@from_keras(L.GlobalAveragePooling3D, L.GlobalMaxPooling3D)
def global_pool3d_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """``GlobalAveragePooling3D`` → ``torch.mean(x, dim=(2, 3, 4))``; ``GlobalMaxPooling3D`` → ``torch.amax``."""
    (x,) = inputs
    fn = torch.amax if isinstance(layer, L.GlobalMaxPooling3D) else torch.mean
    keepdims = bool(layer.keepdims)
    out = b.graph.call_function(fn, (x.node,), {"dim": (2, 3, 4), "keepdim": keepdims})
    return TorchValue(out, x.rank if keepdims else 2)


@from_keras(L.AdaptiveAveragePooling3D, L.AdaptiveMaxPooling3D)
def adaptive_pool3d_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """Keras' adaptive pooling takes PyTorch's windows (``floor(i·n/out)`` to ``ceil((i+1)·n/out)``)."""
    (x,) = inputs
    cls = nn.AdaptiveMaxPool3d if isinstance(layer, L.AdaptiveMaxPooling3D) else nn.AdaptiveAvgPool3d
    return TorchValue(b.add_module(layer.name, cls(tuple(layer.output_size)), x.node), x.rank)


# ---- PyTorch -> Keras ---------------------------------------------------------------------


@from_torch(nn.Conv3d)
def conv3d_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    """``Conv3d`` → ``Conv3D`` (``groups`` kept: a depthwise ``Conv3d(C, C·M, k, groups=C)`` too,
    Keras having no ``DepthwiseConv3D``)."""
    x = b.input(node)
    name = b.name(node)
    settings = _conv_settings(m, 3)
    if max(settings["strides"]) > 1 and max(settings["dilation_rate"]) > 1:
        raise b.unsupported(
            node, f"stride={settings['strides']} with dilation={settings['dilation_rate']}: Keras refuses the pair"
        )
    padding, source = _keras_padding(b, node, m, x, name)
    layer = L.Conv3D(
        m.out_channels, padding=padding, groups=m.groups, use_bias=m.bias is not None, name=name, **settings
    )
    bias = [torch_array(m.bias)] if m.bias is not None else []
    return b.apply(node, layer, source, [_keras_kernel(torch_array(m.weight)), *bias])


@from_torch(nn.MaxPool3d, nn.AvgPool3d)
def pool3d_module_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    """``MaxPool3d``/``AvgPool3d`` → ``MaxPooling3D``/``AveragePooling3D`` where the windows agree
    (``valid``, ``same``, explicit zero padding for ``count_include_pad`` or a ReLU's output)."""
    return pool_keras(b, node, m, b.input(node), b.name(node))


_POOL3D_FUNCTIONS = {
    F.max_pool3d: (nn.MaxPool3d, _MAX_POOL_ARGS),
    F.avg_pool3d: (nn.AvgPool3d, (*_AVG_POOL_ARGS, "divisor_override")),
}


@from_torch(*_POOL3D_FUNCTIONS)
def pool3d_function_to_keras(b: TorchToKeras, node, fn) -> KerasValue:
    """``F.max_pool3d(x, 2)``, ``F.avg_pool3d(...)``: as the module they stand for."""
    cls, names = _POOL3D_FUNCTIONS[fn]
    given = {key: b.arg(node, i + 1, key) for i, key in enumerate(names) if b.arg(node, i + 1, key) is not None}
    return pool_keras(b, node, cls(**given), b.input(node), b.name(node))


@from_torch(nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)
def adaptive_pool3d_module_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    """``AdaptiveAvgPool3d(1)`` → ``GlobalAveragePooling3D(keepdims=True)``; other sizes as in 2-D."""
    if getattr(m, "return_indices", False):
        raise b.unsupported(node, "return_indices=True has no Keras equivalent")
    return adaptive_pool_keras(b, node, b.input(node), m.output_size, isinstance(m, nn.AdaptiveMaxPool3d))


@from_torch(F.adaptive_avg_pool3d, F.adaptive_max_pool3d)
def adaptive_pool3d_function_to_keras(b: TorchToKeras, node, fn) -> KerasValue:
    is_max = fn is F.adaptive_max_pool3d
    if is_max and b.arg(node, 2, "return_indices", False):
        raise b.unsupported(node, "return_indices=True has no Keras equivalent")
    return adaptive_pool_keras(b, node, b.input(node), b.arg(node, 1, "output_size"), is_max)
