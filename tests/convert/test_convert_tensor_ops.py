"""Flatten order, permutes, Concatenate, Add, Dropout and padding layers in small graphs, both ways.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from layer_checks import TOL, check_torch, random_array, to_numpy
from torch import nn

from bnkit.convert import keras_to_torch
from bnkit.keras import keras

L = keras.layers


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        y = F.leaky_relu(y, 0.1) + F.elu(y)
        flat = y.view(y.size(0), -1)
        return torch.cat([flat, y.mean(dim=(2, 3))], dim=1)  # a Flatten that feeds no Linear


def test_torch_functional_calls_and_flatten_not_followed_by_linear():
    model = check_torch(_Functional(), (3, 5, 6))
    assert any(isinstance(layer, L.Permute) for layer in model.layers)  # the data were permuted


def test_keras_activation_layers_dropout_concat_and_flatten_to_output():
    inputs = keras.Input((6, 3))
    a = L.LeakyReLU(negative_slope=0.2)(L.Conv1D(4, 3, padding="causal")(inputs))
    b = L.ELU(alpha=0.5)(L.Conv1D(2, 1)(inputs))
    x = L.Concatenate(axis=-1)([a, b])
    x = L.ReLU(max_value=6.0)(L.Dropout(0.5)(x))
    x = L.Softmax(axis=1)(x)
    x = L.Concatenate(axis=1)([x, L.ZeroPadding1D((1, 2))(x)])
    y = L.Identity()(x)
    model = keras.Model(inputs, [L.Flatten()(y), L.GlobalAveragePooling1D()(y)])
    torch_model = keras_to_torch(model).eval()
    x_np = random_array((2, 6, 3))
    expected = [to_numpy(t) for t in model(x_np)]
    got = torch_model(torch.from_numpy(np.moveaxis(x_np, -1, 1).copy()))
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(to_numpy(g), e, rtol=TOL, atol=TOL)
