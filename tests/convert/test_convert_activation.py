"""Activations both ways: Keras activation names and layers, torch modules and functions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_checks import check_keras, check_saves, check_torch, random_array, to_numpy
from torch import nn

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras
from bnkit.convert.keras_layers import gelu_tanh
from bnkit.keras import keras

L = keras.layers


KERAS_ACTIVATIONS = (
    "relu sigmoid tanh softmax gelu elu leaky_relu silu swish linear relu6 hard_swish "
    "selu softplus softsign hard_sigmoid hard_silu mish hard_tanh log_sigmoid celu log_softmax"
).split() + [gelu_tanh]


@pytest.mark.parametrize("activation", KERAS_ACTIVATIONS, ids=lambda a: getattr(a, "__name__", a))
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
    for module in (nn.Softplus(beta=2), nn.CELU(alpha=0.5), nn.Hardtanh(0, 5)):  # other constants than Keras'
        with pytest.raises(UnsupportedLayerError, match=type(module).__name__):
            torch_to_keras(nn.Sequential(nn.Linear(5, 4), module), (5,))


# The same function under the same name: Keras 3's formulas against PyTorch's, on a grid that has
# the break points of the piecewise ones (hard_sigmoid and hard_silu bend at -3 and 3).
_GRID = np.concatenate([np.linspace(-8, 8, 4001), [-3, 3, -3 - 1e-6, 3 + 1e-6, 0, -0.0]]).astype("float32")
_SAME_FUNCTION = [
    ("hard_sigmoid", F.hardsigmoid, lambda x: np.clip(x + 3, 0, 6) / 6),
    ("hard_silu", F.hardswish, lambda x: x * np.clip(x + 3, 0, 6) / 6),
    ("hard_swish", F.hardswish, lambda x: x * np.clip(x + 3, 0, 6) / 6),
    ("silu", F.silu, lambda x: x / (1 + np.exp(-x))),
    ("swish", F.silu, lambda x: x / (1 + np.exp(-x))),
    ("relu6", F.relu6, lambda x: np.clip(x, 0, 6)),
    ("sigmoid", torch.sigmoid, lambda x: 1 / (1 + np.exp(-x))),
    ("gelu", F.gelu, None),
    (gelu_tanh, lambda x: F.gelu(x, approximate="tanh"),
     lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))),
]  # fmt: skip


@pytest.mark.parametrize(("keras_name", "torch_fn", "formula"), _SAME_FUNCTION, ids=lambda v: getattr(v, "__name__", v))
def test_keras_and_pytorch_compute_the_same_function_under_the_same_name(keras_name, torch_fn, formula):
    keras_fn = keras.activations.get(keras_name)
    got_keras = to_numpy(keras_fn(keras.ops.convert_to_tensor(_GRID)))
    got_torch = torch_fn(torch.from_numpy(_GRID)).numpy()
    np.testing.assert_array_equal(got_keras, got_torch)  # on Keras' torch backend: PyTorch's own kernels
    if formula is not None:  # and the formula both document, in float64
        np.testing.assert_allclose(got_torch, formula(_GRID.astype("float64")), rtol=1e-6, atol=1e-6)


def test_keras_2_hard_sigmoid_is_not_what_keras_3_computes():
    """Keras 2's hard_sigmoid was 0.2 x + 0.5: at x = 2 it gives 0.9, Keras 3 (and PyTorch) 5/6."""
    value = float(to_numpy(keras.activations.hard_sigmoid(keras.ops.convert_to_tensor(np.float32(2.0)))))
    assert value == pytest.approx(5 / 6) and F.hardsigmoid(torch.tensor(2.0)).item() == pytest.approx(5 / 6)


class _Call(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.conv, self.fn = nn.Conv2d(3, 5, 1), fn

    def forward(self, x):
        return self.fn(self.conv(x))


_TORCH_CALLS = {
    "ReLU(inplace)": nn.ReLU(inplace=True),
    "ReLU6(inplace)": nn.ReLU6(inplace=True),
    "Hardswish(inplace)": nn.Hardswish(inplace=True),
    "Hardsigmoid(inplace)": nn.Hardsigmoid(inplace=True),
    "SiLU(inplace)": nn.SiLU(inplace=True),
    "GELU(tanh)": nn.GELU(approximate="tanh"),
    "Hardtanh(0, 6)": nn.Hardtanh(0.0, 6.0),
    "F.relu(inplace)": lambda x: F.relu(x, inplace=True),
    "F.hardswish(inplace)": lambda x: F.hardswish(x, inplace=True),
    "F.hardsigmoid(inplace)": lambda x: F.hardsigmoid(x, True),
    "F.silu(inplace)": lambda x: F.silu(x, inplace=True),
    "F.relu6": F.relu6,
    "F.hardtanh(0, 6)": lambda x: F.hardtanh(x, 0.0, 6.0),
    "F.gelu(tanh)": lambda x: F.gelu(x, approximate="tanh"),
    "F.gelu": F.gelu,
    "F.relu_": F.relu_,
    "torch.relu_": torch.relu_,
    "torch.sigmoid_": torch.sigmoid_,
    "F.elu_": F.elu_,
    "F.leaky_relu_": lambda x: F.leaky_relu_(x, 0.3),
    "x.relu_()": lambda x: x.relu_(),
    "x.sigmoid()": lambda x: x.sigmoid(),
    "x.sigmoid_()": lambda x: x.sigmoid_(),
    "x.tanh_()": lambda x: x.tanh_(),
    "x.clamp(min=0)": lambda x: x.clamp(min=0),
    "x.clamp(0, 6)": lambda x: x.clamp(0, 6),
    "x.clamp(-1, 2)": lambda x: x.clamp(-1.0, 2.0),
    "torch.clamp_max": lambda x: torch.clamp_max(x, 0.5),
    "x.softmax(1)": lambda x: x.softmax(1),
    "F.log_softmax": lambda x: F.log_softmax(x, dim=1),
}


@pytest.mark.parametrize("name", list(_TORCH_CALLS))
def test_torch_activations_as_modules_functions_methods_and_in_place(name):
    check_torch(_Call(_TORCH_CALLS[name]), (3, 5, 7))


def test_an_in_place_activation_overwrites_its_input_for_what_follows():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 3, 1), nn.Hardswish(inplace=True)

        def forward(self, x):
            y = self.conv(x)
            z = self.act(y)  # y is hardswish(y) from here on
            return y + z

    check_torch(Residual(), (3, 4, 5))


def test_gelu_tanh_saves_and_loads_both_ways(tmp_path):
    model = check_torch(nn.Sequential(nn.Linear(5, 4), nn.GELU(approximate="tanh")), (5,))
    (activation,) = [layer for layer in model.layers if isinstance(layer, L.Activation)]
    assert activation.activation is gelu_tanh
    loaded = check_saves(model, random_array((3, 5)), tmp_path)
    back = keras_to_torch(loaded)
    assert [m.approximate for m in back.modules() if isinstance(m, nn.GELU)] == ["tanh"]


def test_clamp_to_tensor_bounds_is_refused():
    with pytest.raises(UnsupportedLayerError, match="tensor bounds"):
        torch_to_keras(_Call(lambda x: x.clamp(min=x.mean((2, 3), keepdim=True))), (3, 4, 4))
