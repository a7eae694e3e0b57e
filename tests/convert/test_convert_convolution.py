"""Conv1D/Conv2D ⇄ nn.Conv1d/Conv2d: the padding/stride/dilation/groups/bias grid, both ways.
"""

from __future__ import annotations

import pytest
import torch
from layer_checks import check_keras, check_torch, random_array
from torch import nn

from bnkit.keras import keras

L = keras.layers


KERAS_CONV_GRID = [
    (3, 1, 1, "same", 1, True),
    (3, 2, 1, "same", 1, False),
    (4, 2, 1, "same", 2, True),
    (2, 1, 1, "same", 1, True),
    (3, 1, 2, "same", 4, True),
    (3, 1, 2, "valid", 1, False),
    (5, 3, 1, "same", 1, True),
    (3, 2, 1, "valid", 2, True),
]


@pytest.mark.parametrize(("rank", "size"), [(1, 9), (2, 9), (2, 10)])
@pytest.mark.parametrize(("k", "s", "d", "padding", "groups", "bias"), KERAS_CONV_GRID)
def test_keras_conv_grid(rank, size, k, s, d, padding, groups, bias):
    keras.utils.set_random_seed(0)
    shape = (size,) * rank + (4,)
    cls = L.Conv1D if rank == 1 else L.Conv2D
    inputs = keras.Input(shape)
    conv = cls(8, k, strides=s, dilation_rate=d, padding=padding, groups=groups, use_bias=bias, name="conv")
    outputs = conv(inputs)
    model = keras.Model(inputs, outputs)
    if bias:
        conv.bias.assign(random_array((8,), 5))
    check_keras(model, random_array((2, *shape)))


# kernel, stride, padding, dilation, groups, bias
TORCH_CONV_GRID = [
    (3, 1, 1, 1, 1, True),
    (3, 2, 1, 1, 1, False),
    (3, 1, "same", 2, 2, True),
    (4, 1, "same", 1, 1, True),
    (3, 2, 0, 1, 4, True),
    (5, 2, 2, 1, 1, True),
    (3, 1, 2, 1, 1, True),
    (3, 1, 0, 3, 1, False),
]


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize(("k", "s", "p", "d", "groups", "bias"), TORCH_CONV_GRID)
def test_torch_conv_grid(rank, k, s, p, d, groups, bias):
    torch.manual_seed(0)
    cls = nn.Conv1d if rank == 1 else nn.Conv2d
    module = cls(4, 8, k, stride=s, padding=p, dilation=d, groups=groups, bias=bias)
    check_torch(module, (4,) + (9,) * rank)
