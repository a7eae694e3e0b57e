"""Activations both ways: Keras activation names and layers, torch modules and functions.
"""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from layer_checks import check_keras, check_torch, random_array
from torch import nn

from bnkit.convert import UnsupportedLayerError, torch_to_keras
from bnkit.keras import keras

L = keras.layers


KERAS_ACTIVATIONS = (
    "relu sigmoid tanh softmax gelu elu leaky_relu silu swish linear "
    "selu softplus softsign hard_sigmoid hard_silu mish hard_tanh log_sigmoid celu log_softmax"
).split()


@pytest.mark.parametrize("activation", KERAS_ACTIVATIONS)
def test_keras_activations(activation):
    inputs = keras.Input((4, 4, 3))
    x = L.Conv2D(3, 1, activation=activation)(inputs)
    model = keras.Model(inputs, L.Dense(4)(L.Flatten()(L.Activation(activation)(x))))
    check_keras(model, random_array((2, 4, 4, 3)))


def test_torch_activation_modules_and_functions():
    modules = [nn.SELU(), nn.Softplus(), nn.Softsign(), nn.Hardsigmoid(), nn.Hardswish(), nn.Mish()]
    modules += [nn.Hardtanh(), nn.LogSigmoid(), nn.CELU(), nn.LogSoftmax(dim=1)]
    functions = [F.selu, F.softplus, F.softsign, F.hardsigmoid, F.hardswish, F.mish, F.hardtanh, F.logsigmoid]

    class Functional(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fc, self.fn = nn.Linear(5, 4), fn

        def forward(self, x):
            return self.fn(self.fc(x))

    for net in [nn.Sequential(nn.Linear(5, 4), m) for m in modules] + [Functional(fn) for fn in functions]:
        check_torch(net, (5,))
    for module in (nn.Softplus(beta=2), nn.CELU(alpha=0.5), nn.Hardtanh(0, 6)):  # other constants than Keras'
        with pytest.raises(UnsupportedLayerError, match=type(module).__name__):
            torch_to_keras(nn.Sequential(nn.Linear(5, 4), module), (5,))
