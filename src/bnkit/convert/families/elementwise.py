"""Operations on several tensors, both ways: ``Add`` ⇄ ``a + b``/``torch.add``,
``Concatenate(axis)`` ⇄ ``torch.cat(tensors, dim)`` (the axis mapped between the layouts).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
from torch import fx

from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import KerasValue, TorchValue
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers


@from_keras(L.Add)
def add_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    out = inputs[0].node
    for value in inputs[1:]:
        out = b.graph.call_function(operator.add, (out, value.node))
    return TorchValue(out, inputs[0].rank)


@from_torch(operator.add, torch.add)
def add_to_keras(b: TorchToKeras, node, fn) -> KerasValue:
    x, y = b.arg(node, 0, "input"), b.arg(node, 1, "other")
    if b.arg(node, 2, "alpha", 1) != 1 or not (isinstance(x, fx.Node) and isinstance(y, fx.Node)):
        raise b.unsupported(node, "only the sum of two tensors converts (no scalars, no alpha)")
    vx, vy = b.value(x, node), b.value(y, node)
    if vx.shape != vy.shape:
        raise b.unsupported(node, f"broadcasting add of shapes {vx.shape} and {vy.shape}")
    return KerasValue(L.Add(name=b.name(node))([vx.tensor, vy.tensor]), vx.shape)


@from_keras(L.Concatenate)
def concatenate_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    out = b.graph.call_function(torch.cat, ([v.node for v in inputs],), {"dim": inputs[0].torch_dim(layer.axis)})
    return TorchValue(out, inputs[0].rank)


@from_torch(torch.cat)
def cat_to_keras(b: TorchToKeras, node, fn) -> KerasValue:
    values = [b.value(t, node) for t in b.arg(node, 0, "tensors")]
    axis = values[0].keras_axis(b.arg(node, 1, "dim", 0))
    return KerasValue(L.Concatenate(axis=axis, name=b.name(node))([v.tensor for v in values]), b.out_shape(node))
