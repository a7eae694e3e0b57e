"""Fully connected layers, both ways: ``Dense`` ⇄ ``nn.Linear``, on ``(N, features)`` or over the last
axis of a higher-rank tensor (ConvNeXt's pointwise layers on a channels-last tensor).

Kernels are transposed (``(in, out)`` ⇄ ``(out, in)``). After a Flatten whose order was left
pending (see :mod:`bnkit.convert.families.tensor_ops`), the kernel rows are reordered from one
framework's flattening order to the other's instead of permuting the data. On a higher-rank
tensor both act on the last axis: where the layout puts another one last in the other
framework, the tensor is permuted first (identically in both frameworks, as after
``x.permute(0, 2, 3, 1)``), and the result keeps that layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from bnkit.convert._common import keras_to_torch_flat_order, torch_to_keras_flat_order
from bnkit.convert.families.activation import has_non_negative_activation, with_activation
from bnkit.convert.layouts import identity
from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import (
    KerasValue,
    TorchValue,
    call_with_weights,
    keras_array,
    torch_array,
    torch_module_holding,
)
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers


@from_keras(L.Dense, non_negative=has_non_negative_activation, permuted_input=True)
def dense_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    if x.torch_dim(-1) != x.rank - 1:  # Keras' last axis must be PyTorch's last dim
        x = b.to_layout(x, identity(x.rank))
    kernel = keras_array(layer.kernel)
    if x.pending_flat is not None:
        kernel = keras_to_torch_flat_order(kernel, x.pending_flat)
    arrays = {"weight": kernel.T} | ({"bias": keras_array(layer.bias)} if layer.use_bias else {})
    linear = torch_module_holding(lambda: nn.Linear(kernel.shape[0], kernel.shape[1], bias=layer.use_bias), arrays)
    out = TorchValue(b.add_module(layer.name, linear, x.node), x.rank, x.layout)
    return with_activation(b, layer, out)


@from_torch(nn.Linear, permuted_input=True)
def linear_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    x = b.input(node)
    name = b.name(node)
    if x.keras_axis(x.rank - 1) != x.rank - 1:  # PyTorch's last dim must be Keras' last axis
        x = b.to_layout(x, identity(x.rank), name)
    kernel = torch_array(m.weight).T
    if x.pending_flat is not None:
        kernel = torch_to_keras_flat_order(kernel, x.pending_flat)
    layer = L.Dense(m.out_features, use_bias=m.bias is not None, name=name)
    weights = [kernel] + ([torch_array(m.bias)] if m.bias is not None else [])
    return KerasValue(call_with_weights(layer, x.tensor, weights), b.out_shape(node), layout=x.layout)
