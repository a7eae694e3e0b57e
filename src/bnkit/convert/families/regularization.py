"""Layers that are the identity in inference, both ways: ``Dropout`` ⇄ ``nn.Dropout``, ``F.dropout``.

They are element-wise: a pending Flatten order and a permuted layout pass through them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import nn

from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import KerasValue, TorchValue
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers


@from_keras(L.Dropout, elementwise=True)
def dropout_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    if layer.noise_shape is not None:
        if tuple(layer.noise_shape[1:]) == (1,) * (x.rank - 1):  # one draw per sample: stochastic depth
            from bnkit.convert.families.stochastic_depth import per_sample_dropout_to_torch

            return per_sample_dropout_to_torch(b, layer, x)
        raise b.unsupported(layer, "noise_shape is not supported")
    return x.like(b.add_module(layer.name, nn.Dropout(float(layer.rate)), x.node))


@from_torch(nn.Dropout, F.dropout, elementwise=True)
def dropout_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    rate = target.p if isinstance(target, nn.Module) else b.arg(node, 1, "p", 0.5)
    return x.like(L.Dropout(rate, name=b.name(node))(x.tensor))
