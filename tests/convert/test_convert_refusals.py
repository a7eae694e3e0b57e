"""What stays unsupported is refused with UnsupportedLayerError (a ValueError) naming the layer;
bad arguments are ValueErrors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras
from bnkit.keras import keras

L = keras.layers


class _Power(nn.Module):
    def forward(self, x):
        return x**2


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x @ self.gain  # a constant in a matrix product: refused, naming this module


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: torch_to_keras(nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4)), (4,)), r"'1' \(LSTM\)"),
        (lambda: torch_to_keras(_Power(), (4,)), r"\*\* operator"),
        (lambda: torch_to_keras(nn.Sequential(nn.Linear(4, 4), _Scale()), (4,)), r"'1' \(_Scale\)"),
        (lambda: torch_to_keras(nn.Sequential(nn.GroupNorm(2, 4)), (4, 3)), r"'0' \(GroupNorm\)"),
        (
            lambda: torch_to_keras(nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False)), (4,)),
            "track_running_stats=False",
        ),
        (
            lambda: torch_to_keras(nn.Sequential(nn.BatchNorm1d(4, momentum=None)), (4,), semantics="target"),
            "momentum=None",
        ),
        (lambda: torch_to_keras(nn.Conv2d(3, 3, 3, stride=2, dilation=2), (3, 9, 9)), "dilation"),
        (lambda: torch_to_keras(nn.MaxPool2d(3, 3, ceil_mode=True), (3, 10, 10)), r"'0' \(MaxPool2d\): ceil_mode"),
    ],
)
def test_torch_unsupported_errors(build, match):
    with pytest.raises(UnsupportedLayerError, match=match) as info:
        build()
    assert isinstance(info.value, ValueError)


def _keras_model(layer, shape):
    inputs = keras.Input(shape)
    return keras.Model(inputs, layer(inputs))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: _keras_model(L.LSTM(3, recurrent_dropout=0.1, name="rnn"), (5, 2)), r"'rnn' \(LSTM\).*recurrent_drop"),
        (lambda: _keras_model(L.MaxPooling2D(2, strides=1, padding="same", name="mp"), (5, 5, 2)), "'mp'"),
        (lambda: _keras_model(L.LayerNormalization(axis=1, name="ln"), (5, 2)), r"'ln'.*only the last axes"),
        (lambda: _keras_model(L.Dense(3, activation="exponential", name="hs"), (4,)), "exponential"),
    ],
)
def test_keras_unsupported_errors(build, match):
    with pytest.raises(UnsupportedLayerError, match=match):
        keras_to_torch(build())


def test_bad_arguments():
    with pytest.raises(ValueError, match="'both'"):
        keras_to_torch(_keras_model(L.Dense(2), (3,)), semantics="both")
    with pytest.raises(ValueError, match="input_shape"):
        torch_to_keras(nn.Linear(3, 2), 3)
    with pytest.raises(ValueError, match="1 inputs, got 2"):
        torch_to_keras(nn.Linear(3, 2), [(3,), (3,)])
