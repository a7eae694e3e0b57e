"""Layers that are the identity in inference, both ways: ``Dropout`` ⇄ ``nn.Dropout``, ``F.dropout``;
``SpatialDropout1D/2D/3D`` ⇄ ``nn.Dropout1d/2d/3d``, ``F.dropout1d/2d/3d``.

In training both frameworks draw their own random masks, so "exact" means the same distribution:
``Dropout`` zeroes each value with probability ``rate`` (``p``), spatial dropout each whole channel
of each sample (the same mask at every position), and both scale what they keep by
``1 / (1 - rate)``. Plain dropout is element-wise: a pending Flatten order and a permuted layout
pass through it; spatial dropout reads the channel axis, so it is not.
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


# ---- spatial dropout: whole channels ----------------------------------------------------------

_KERAS_SPATIAL = {3: L.SpatialDropout1D, 4: L.SpatialDropout2D, 5: L.SpatialDropout3D}
_TORCH_SPATIAL = {3: nn.Dropout1d, 4: nn.Dropout2d, 5: nn.Dropout3d}
# the input ranks on which PyTorch drops whole channels of each sample: Dropout2d also takes (N, C, L)
# and (N, C, D, H, W); on an input without a batch dimension, Dropout1d and Dropout3d drop whole samples
_CHANNEL_WISE_RANKS = {nn.Dropout1d: (3,), nn.Dropout2d: (3, 4, 5), nn.Dropout3d: (5,)}
_FUNCTIONS = {F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d, F.dropout3d: nn.Dropout3d}


@from_keras(*_KERAS_SPATIAL.values())
def spatial_dropout_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    return TorchValue(b.add_module(layer.name, _TORCH_SPATIAL[x.rank](float(layer.rate)), x.node), x.rank)


@from_torch(*_CHANNEL_WISE_RANKS, *_FUNCTIONS)
def spatial_dropout_to_keras(b: TorchToKeras, node, target) -> KerasValue:
    x = b.input(node)
    if isinstance(target, nn.Module):
        cls, rate = next(c for c in type(target).__mro__ if c in _CHANNEL_WISE_RANKS), target.p
    else:
        cls, rate = _FUNCTIONS[target], b.arg(node, 1, "p", 0.5)
    if x.rank not in _CHANNEL_WISE_RANKS[cls]:
        raise b.unsupported(
            node, f"{cls.__name__} of a rank-{x.rank} input does not drop whole channels of each sample"
        )
    return x.like(_KERAS_SPATIAL[x.rank](rate, name=b.name(node))(x.tensor))
