"""Convolutions, both ways: ``Conv1D``/``Conv2D`` ⇄ ``nn.Conv1d``/``nn.Conv2d``.

Kernels are transposed (Keras ``(*k, in/groups, out)`` ⇄ PyTorch ``(out, in/groups, *k)``).
Padding, exactly: Keras ``same`` pads ``max((ceil(n/s) - 1)·s + (k-1)·d + 1 - n, 0)`` per axis
with the odd element after; symmetric totals become integer padding, stride 1 with an odd
total PyTorch's own ``padding="same"`` (which pads the same way), anything else an explicit
zero padding in front of a ``valid`` convolution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from bnkit.convert._common import same_padding
from bnkit.convert.families.activation import has_non_negative_activation, with_activation
from bnkit.convert.families.padding import zero_pad_torch, zero_padding_keras
from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import KerasValue, TorchValue, keras_array, torch_array
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


@from_keras(L.Conv1D, L.Conv2D, non_negative=has_non_negative_activation)
def conv_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    b.check_channels_last(layer)
    (x,) = inputs
    spatial_rank = x.rank - 2
    in_shape = node.input_tensors[0].shape
    kernel = keras_array(layer.kernel)
    ks, strides, dilations = layer.kernel_size, layer.strides, layer.dilation_rate
    if layer.padding == "valid":
        pads = [(0, 0)] * spatial_rank
    elif layer.padding == "causal":
        pads = [((ks[0] - 1) * dilations[0], 0)]
    else:
        pads = [same_padding(in_shape[1 + i], ks[i], strides[i], dilations[i]) for i in range(spatial_rank)]
        if any(p is None for p in pads):
            raise b.unsupported(layer, "padding='same' with strides > 1 needs the input's spatial size")
    symmetric = all(before == after for before, after in pads)
    odd_stride_one = all(s == 1 for s in strides) and layer.padding == "same" and not symmetric
    padding = "same" if odd_stride_one else tuple(before for before, _ in pads) if symmetric else 0
    conv = (nn.Conv1d if spatial_rank == 1 else nn.Conv2d)(
        kernel.shape[-2] * layer.groups,
        layer.filters,
        tuple(ks),
        stride=tuple(strides),
        padding=padding,
        dilation=tuple(dilations),
        groups=layer.groups,
        bias=layer.use_bias,
    )
    with torch.no_grad():
        order = (spatial_rank + 1, spatial_rank, *range(spatial_rank))  # (*k, in, out) -> (out, in, *k)
        conv.weight.copy_(torch.from_numpy(np.transpose(kernel, order)))
        if layer.use_bias:
            conv.bias.copy_(torch.from_numpy(keras_array(layer.bias)))
    source = x.node
    if padding == 0 and any(before or after for before, after in pads):
        # Keras pads the odd element after (right/bottom); PyTorch's padding is symmetric.
        source = zero_pad_torch(b, f"{layer.name}_pad", source, pads)
    out = TorchValue(b.add_module(layer.name, conv, source), x.rank)
    return with_activation(b, layer, out)


@from_torch(nn.Conv1d, nn.Conv2d)
def conv_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    x = b.input(node)
    name = b.name(node)
    n = x.rank - 2
    if m.padding_mode != "zeros":
        raise b.unsupported(node, f"padding_mode={m.padding_mode!r}; only 'zeros' converts")
    strides, dilations, ks = _tuple(m.stride, n), _tuple(m.dilation, n), _tuple(m.kernel_size, n)
    if max(strides) > 1 and max(dilations) > 1:
        raise b.unsupported(node, f"stride={strides} with dilation={dilations}: Keras refuses the pair")
    if m.padding == "same":
        padding, explicit = "same", None
    elif m.padding == "valid" or set(_tuple(m.padding, n)) == {0}:
        padding, explicit = "valid", None
    else:
        pads = _tuple(m.padding, n)
        keras_same = [same_padding(x.shape[1 + i], ks[i], strides[i], dilations[i]) for i in range(n)]
        if all(s == 1 for s in strides) and all(p == (q, q) for p, q in zip(keras_same, pads, strict=True)):
            padding, explicit = "same", None
        else:
            padding, explicit = "valid", pads
    source = x
    if explicit is not None:
        flat = tuple(p for q in reversed(explicit) for p in (q, q))
        source = zero_padding_keras(b, node, x, b.unique_name(f"{name}_pad"), flat)
    layer = (L.Conv1D if n == 1 else L.Conv2D)(
        m.out_channels,
        ks,
        strides=strides,
        padding=padding,
        dilation_rate=dilations,
        groups=m.groups,
        use_bias=m.bias is not None,
        name=name,
    )
    weights = [np.transpose(torch_array(m.weight), (*range(2, n + 2), 1, 0))]
    if m.bias is not None:
        weights.append(torch_array(m.bias))
    return b.apply(node, layer, source, weights)
