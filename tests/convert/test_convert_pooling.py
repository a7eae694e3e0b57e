"""Pooling both ways: Keras 'same' padding, ceil_mode, zero padding before max pooling of a ReLU,
global pooling, F.max_pool2d and friends.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_checks import check_keras, check_torch, random_array
from torch import nn

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras
from bnkit.keras import keras

L = keras.layers


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("cls", [L.MaxPooling2D, L.AveragePooling2D, L.MaxPooling1D, L.AveragePooling1D])
def test_keras_pooling(cls, padding):
    rank = 1 if cls.__name__.endswith("1D") else 2
    shape = (7,) * rank + (3,)
    inputs = keras.Input(shape)
    model = keras.Model(inputs, cls(3, strides=1, padding=padding)(inputs))
    check_keras(model, random_array((2, *shape)))


@pytest.mark.parametrize(
    ("cls", "pool", "stride", "shape"),
    [
        (L.MaxPooling2D, 2, 2, (7, 7, 3)),  # Keras pads one after: PyTorch ceil_mode lets the window overhang
        (L.MaxPooling1D, 3, 2, (8, 3)),
        (L.AveragePooling2D, 2, 2, (9, 9, 3)),  # a 2-wide overhanging window averages one real value
    ],
)
def test_keras_same_pooling_padded_after_becomes_ceil_mode(cls, pool, stride, shape):
    inputs = keras.Input(shape)
    model = keras.Model(inputs, cls(pool, strides=stride, padding="same")(inputs))
    torch_model = check_keras(model, random_array((2, *shape)))
    assert next(m for m in torch_model.modules() if "Pool" in type(m).__name__).ceil_mode
    check_torch(nn.Sequential(nn.MaxPool2d(2, ceil_mode=True)), (3, 9, 9))
    # 3-wide: Keras' torch backend averages a replicated edge value, TensorFlow the real values only
    inputs = keras.Input((8, 3))
    with pytest.raises(UnsupportedLayerError, match="average_pool"):
        keras_to_torch(
            keras.Model(inputs, L.AveragePooling1D(3, strides=2, padding="same", name="average_pool")(inputs))
        )


def test_torch_pooling_and_global_pooling():
    module = nn.Sequential(
        nn.MaxPool2d(3, stride=1, padding=1),
        nn.AvgPool2d(2),
        nn.AvgPool2d(3, stride=1, padding=1),  # count_include_pad=True: zero padding then 'valid'
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
    )
    check_torch(module, (3, 8, 8))


def test_max_pooling_of_relu_outputs_pads_with_zeros_where_keras_same_cannot():
    """ResNet's stem MaxPool2d(3, 2, 1) on an even size pads 1 on both sides, Keras' 'same' (0, 1):
    after a ReLU, zeros never win the max, so explicit zero padding and 'valid' pooling are exact."""
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    model = check_torch(stem, (3, 16, 16))
    assert any(isinstance(layer, L.ZeroPadding2D) for layer in model.layers)
    with pytest.raises(UnsupportedLayerError, match="MaxPool2d"):  # a negative input would lose to a zero
        torch_to_keras(nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, 1)), (3, 16, 16))
    inputs = keras.Input((9, 9, 3))  # Keras 'same' pads (0, 1) here; PyTorch pooling pads symmetrically
    x = L.MaxPooling2D(2, padding="same")(L.Conv2D(4, 3, padding="same", activation="relu")(inputs))
    check_keras(keras.Model(inputs, x), random_array((2, 9, 9, 3)))


class _LeNet(nn.Module):
    """PyTorch's tutorial network: pooling written as F.max_pool2d calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv1(x))), (2, 2))
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def test_pooling_functions():
    check_torch(_LeNet(), (1, 32, 32))
