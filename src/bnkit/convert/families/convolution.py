"""Convolutions, both ways: ``Conv1D``/``Conv2D``/``Conv3D`` (``groups`` too) ⇄ ``nn.Conv1d``/``2d``/``3d``;
``DepthwiseConv1D``/``DepthwiseConv2D`` ⇄ ``nn.Conv1d``/``nn.Conv2d`` with ``groups=in_channels`` (Keras has no
``DepthwiseConv3D``: a depthwise ``Conv3d(C, C·M, k, groups=C)`` is ``Conv3D(groups=C)``, the same sums);
``SeparableConv1D``/``SeparableConv2D`` ⇄ :class:`bnkit.convert.torch_modules.SeparableConv2d` (a
depthwise conv then a pointwise one, as Keras computes it).

Kernels are transposed (Keras ``(*k, in/groups, out)`` ⇄ PyTorch ``(out, in/groups, *k)``). A
depthwise kernel ``(*k, C, M)`` (``M = depth_multiplier``) is PyTorch's ``(C·M, 1, *k)``: output
channel ``c·M + m`` of both filters input channel ``c`` with multiplier ``m``.
Padding, exactly: Keras ``same`` pads ``max((ceil(n/s) - 1)·s + (k-1)·d + 1 - n, 0)`` per axis
with the odd element after; symmetric totals become integer padding, stride 1 with an odd
total PyTorch's own ``padding="same"`` (which pads the same way), anything else an explicit
zero padding in front of a ``valid`` convolution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from bnkit.convert._common import same_padding
from bnkit.convert.families.activation import has_non_negative_activation, with_activation
from bnkit.convert.families.padding import zero_pad_torch, zero_padding_keras
from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.torch_modules import SeparableConv1d, SeparableConv2d
from bnkit.convert.values import KerasValue, TorchValue, keras_array, torch_array, torch_module_holding
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers

_KERAS_DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
_TORCH_CONV = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}  # by the input's rank
_KERAS_CONV = {1: L.Conv1D, 2: L.Conv2D, 3: L.Conv3D}  # by the number of spatial axes
_KERAS_SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _torch_kernel(kernel: np.ndarray) -> np.ndarray:
    """Keras' ``(*k, in, out)`` kernel as PyTorch's ``(out, in, *k)``."""
    n = kernel.ndim - 2
    return np.transpose(kernel, (n + 1, n, *range(n)))


def _keras_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch's ``(out, in, *k)`` weight as Keras' ``(*k, in, out)`` kernel."""
    return np.transpose(weight, (*range(2, weight.ndim), 1, 0))


# ---- Keras -> PyTorch ---------------------------------------------------------------------


def _torch_padding(b: KerasToTorch, layer, node, x: TorchValue):
    """The ``padding=`` of the PyTorch conv computing ``layer``'s windows, and the explicit
    ``(before, after)`` zero padding per spatial axis to put in front of it (``None``: none)."""
    spatial_rank = x.rank - 2
    in_shape = node.input_tensors[0].shape
    ks, strides, dilations = layer.kernel_size, layer.strides, layer.dilation_rate
    if layer.padding == "valid":
        return 0, None
    if layer.padding == "causal":
        return 0, [((ks[0] - 1) * dilations[0], 0)]
    pads = [same_padding(in_shape[1 + i], ks[i], strides[i], dilations[i]) for i in range(spatial_rank)]
    if any(p is None for p in pads):
        raise b.unsupported(layer, "padding='same' with strides > 1 needs the input's spatial size")
    if all(before == after for before, after in pads):
        return tuple(before for before, _ in pads), None
    if all(s == 1 for s in strides):
        return "same", None  # PyTorch's 'same' also pads the odd element after
    return 0, pads  # Keras pads the odd element after (right/bottom); PyTorch's padding is symmetric


def _padded(b: KerasToTorch, layer, x: TorchValue, explicit):
    return x.node if explicit is None else zero_pad_torch(b, f"{layer.name}_pad", x.node, explicit)


def _bias(layer) -> dict[str, np.ndarray]:
    return {"bias": keras_array(layer.bias)} if layer.use_bias else {}


@from_keras(L.Conv1D, L.Conv2D, L.Conv3D, non_negative=has_non_negative_activation)
def conv_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    kernel = keras_array(layer.kernel)
    padding, explicit = _torch_padding(b, layer, node, x)
    conv = torch_module_holding(
        lambda: _TORCH_CONV[x.rank](
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


@from_keras(*_KERAS_DEPTHWISE, non_negative=has_non_negative_activation)
def depthwise_conv_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """``DepthwiseConv2D(k, depth_multiplier=M)`` on C channels: ``nn.Conv2d(C, C*M, k, groups=C)``."""
    (x,) = inputs
    kernel = keras_array(layer.kernel)  # (*k, C, M)
    channels, multiplier = kernel.shape[-2:]
    padding, explicit = _torch_padding(b, layer, node, x)
    conv = torch_module_holding(
        lambda: (nn.Conv1d if x.rank == 3 else nn.Conv2d)(
            channels,
            channels * multiplier,
            tuple(layer.kernel_size),
            stride=tuple(layer.strides),
            padding=padding,
            dilation=tuple(layer.dilation_rate),
            groups=channels,
            bias=layer.use_bias,
        ),
        {"weight": _torch_kernel(kernel.reshape(*kernel.shape[:-2], 1, channels * multiplier))} | _bias(layer),
    )
    out = TorchValue(b.add_module(layer.name, conv, _padded(b, layer, x, explicit)), x.rank)
    return with_activation(b, layer, out)


@from_keras(*_KERAS_SEPARABLE, non_negative=has_non_negative_activation)
def separable_conv_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """``SeparableConv2D``: a :class:`SeparableConv2d` (depthwise ``Conv2d`` then pointwise 1×1)."""
    (x,) = inputs
    depthwise = keras_array(layer.depthwise_kernel)  # (*k, C, M)
    channels, multiplier = depthwise.shape[-2:]
    padding, explicit = _torch_padding(b, layer, node, x)
    arrays = {
        "depthwise.weight": _torch_kernel(depthwise.reshape(*depthwise.shape[:-2], 1, channels * multiplier)),
        "pointwise.weight": _torch_kernel(keras_array(layer.pointwise_kernel)),
    } | {f"pointwise.{k}": v for k, v in _bias(layer).items()}
    conv = torch_module_holding(
        lambda: (SeparableConv1d if x.rank == 3 else SeparableConv2d)(
            channels,
            layer.filters,
            tuple(layer.kernel_size),
            stride=tuple(layer.strides),
            padding=padding,
            dilation=tuple(layer.dilation_rate),
            depth_multiplier=int(multiplier),
            bias=layer.use_bias,
        ),
        arrays,
    )
    out = TorchValue(b.add_module(layer.name, conv, _padded(b, layer, x, explicit)), x.rank)
    return with_activation(b, layer, out)


# ---- PyTorch -> Keras ---------------------------------------------------------------------


def _keras_padding(b: TorchToKeras, node, m, x: KerasValue, name: str) -> tuple[str, KerasValue]:
    """Keras' ``padding=`` for the PyTorch conv ``m``, and its input (zero padded in front where
    Keras' 'same' does not pad as ``m`` does)."""
    n = x.rank - 2
    if m.padding_mode != "zeros":
        raise b.unsupported(node, f"padding_mode={m.padding_mode!r}; only 'zeros' converts")
    strides, dilations, ks = _tuple(m.stride, n), _tuple(m.dilation, n), _tuple(m.kernel_size, n)
    if m.padding == "same":
        return "same", x
    if m.padding == "valid" or set(_tuple(m.padding, n)) == {0}:
        return "valid", x
    pads = _tuple(m.padding, n)
    keras_same = [same_padding(x.shape[1 + i], ks[i], strides[i], dilations[i]) for i in range(n)]
    if all(s == 1 for s in strides) and all(p == (q, q) for p, q in zip(keras_same, pads, strict=True)):
        return "same", x
    flat = tuple(p for q in reversed(pads) for p in (q, q))
    return "valid", zero_padding_keras(b, node, x, b.unique_name(f"{name}_pad"), flat)


def _conv_settings(m, n: int) -> dict:
    return dict(
        kernel_size=_tuple(m.kernel_size, n), strides=_tuple(m.stride, n), dilation_rate=_tuple(m.dilation, n)
    )


def _is_depthwise(m) -> bool:
    return m.groups > 1 and m.groups == m.in_channels


@from_torch(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    """``Conv2d`` → ``Conv2D`` (``groups`` kept); with ``groups=in_channels > 1`` → ``DepthwiseConv2D``
    (``depth_multiplier = out_channels / in_channels``); a depthwise ``Conv3d`` → ``Conv3D(groups=C)``."""
    x = b.input(node)
    name = b.name(node)
    n = x.rank - 2
    settings = _conv_settings(m, n)
    weight = torch_array(m.weight)
    bias = [torch_array(m.bias)] if m.bias is not None else []
    if _is_depthwise(m) and n < 3:
        padding, source = _keras_padding(b, node, m, x, name)
        multiplier = m.out_channels // m.in_channels
        layer = (L.DepthwiseConv1D if n == 1 else L.DepthwiseConv2D)(
            depth_multiplier=multiplier, padding=padding, use_bias=m.bias is not None, name=name, **settings
        )
        kernel = _keras_kernel(weight).reshape(*settings["kernel_size"], m.in_channels, multiplier)
        return b.apply(node, layer, source, [kernel, *bias])
    if max(settings["strides"]) > 1 and max(settings["dilation_rate"]) > 1:
        raise b.unsupported(
            node, f"stride={settings['strides']} with dilation={settings['dilation_rate']}: Keras refuses the pair"
        )
    padding, source = _keras_padding(b, node, m, x, name)
    layer = _KERAS_CONV[n](
        m.out_channels, padding=padding, groups=m.groups, use_bias=m.bias is not None, name=name, **settings
    )
    return b.apply(node, layer, source, [_keras_kernel(weight), *bias])


@from_torch(SeparableConv1d, SeparableConv2d)
def separable_conv_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    x = b.input(node)
    name = b.name(node)
    n = x.rank - 2
    depthwise, pointwise = m.depthwise, m.pointwise
    padding, source = _keras_padding(b, node, depthwise, x, name)
    multiplier = depthwise.out_channels // depthwise.in_channels
    layer = (L.SeparableConv1D if n == 1 else L.SeparableConv2D)(
        pointwise.out_channels,
        depth_multiplier=multiplier,
        padding=padding,
        use_bias=pointwise.bias is not None,
        name=name,
        **_conv_settings(depthwise, n),
    )
    k = _tuple(depthwise.kernel_size, n)
    weights = [
        _keras_kernel(torch_array(depthwise.weight)).reshape(*k, depthwise.in_channels, multiplier),
        _keras_kernel(torch_array(pointwise.weight)),
    ] + ([torch_array(pointwise.bias)] if pointwise.bias is not None else [])
    return b.apply(node, layer, source, weights)
