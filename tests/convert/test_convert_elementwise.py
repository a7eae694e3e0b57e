"""Element-wise arithmetic both ways: broadcasting (squeeze-and-excitation), Python numbers,
constant tensors (parameters, buffers, Keras weights and arrays), Keras merges and ops, in-place
forms; and the refusals. Tolerance 1e-5 (layer_checks); most of these agree to the bit.
"""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
from layer_checks import TOL, check_keras, check_saves, check_torch, random_array, to_numpy
from torch import nn

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras
from bnkit.convert.keras_layers import ElementwiseConstant
from bnkit.keras import keras

L = keras.layers


class _SqueezeExcite(nn.Module):
    """torchvision's SqueezeExcitation, with the multiplication written the ways people write it."""

    def __init__(self, channels: int, squeeze: int, how: str) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.how = how

    def forward(self, x):
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 1)))))
        if self.how == "operator":
            return scale * x  # (N, C, 1, 1) * (N, C, H, W)
        if self.how == "function":
            return torch.mul(x, scale)
        if self.how == "method":
            return x.mul(scale)
        return x.clone().mul_(scale)  # in place


@pytest.mark.parametrize("how", ["operator", "function", "method", "in_place"])
def test_squeeze_and_excitation_broadcasts_both_ways(how):
    check_torch(nn.Sequential(nn.Conv2d(3, 7, 3), _SqueezeExcite(7, 3, how)), (3, 9, 6))


class _Numbers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        y = self.conv(x)
        a = (y + 3.0) * (1.0 / 6.0) - 0.5  # Keras MobileNetV3's hard sigmoid, and more
        b = 2.0 - y / 7 + torch.sub(y, 1.5) + y.div(3.0) + torch.add(y, 1)
        c = 1.0 / (y.abs() + 1.0) if False else 1.0 / (torch.sigmoid(y) + 1.0)
        return a * b + c - (-y)


def test_python_numbers_on_either_side_both_ways():
    check_torch(_Numbers(), (3, 4, 5))


class _Constants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)
        self.layer_scale = nn.Parameter(torch.rand(5, 1, 1) + 0.5)  # torchvision ConvNeXt's shape
        self.register_buffer("shift", torch.randn(5, 1, 1))
        self.per_width = nn.Parameter(torch.randn(7))  # broadcasts against the last dim, the width
        self.register_buffer("scalar", torch.tensor(1.75))
        self.full = nn.Parameter(torch.randn(1, 5, 4, 7))

    def forward(self, x):
        y = self.conv(x)
        y = self.layer_scale * y - self.shift
        y = y / self.scalar + self.per_width
        return self.shift / (y * y + 1) + self.full - torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])


def test_parameters_buffers_and_tensor_constants_both_ways():
    model = check_torch(_Constants(), (3, 4, 7))
    constants = {layer.name: layer for layer in model.layers if isinstance(layer, ElementwiseConstant)}
    assert constants["mul"].trainable and constants["mul"].constant_shape == (5,)  # (C, 1, 1) -> NHWC's (C,)
    assert constants["mul"].constant_first and not constants["sub"].constant_first
    assert not constants["sub"].trainable  # a buffer
    assert constants["add"].constant_shape == (7, 1)  # the width, in NHWC: (W, C=1)
    assert constants["add_2"].constant_shape == (4, 7, 5)  # (1, C, H, W) -> (H, W, C)
    assert [layer.constant_first for layer in constants.values()].count(True) == 2  # layer_scale * y, shift / ...
    torch_model = keras_to_torch(model)
    parameters = dict(torch_model.named_parameters())
    assert any(p.shape == (5, 1, 1) for p in parameters.values())  # back to PyTorch's layout, trainable


def test_a_converted_model_with_constants_saves_and_loads(tmp_path):
    model = torch_to_keras(_Constants(), (3, 4, 7))
    loaded = check_saves(model, random_array((2, 4, 7, 3)), tmp_path)
    assert [type(layer).__name__ for layer in loaded.layers].count("ElementwiseConstant") >= 5


def test_keras_merges_broadcast_both_ways():
    inputs = keras.Input((5, 7, 3))
    x = L.Conv2D(4, 1)(inputs)
    se = L.GlobalAveragePooling2D(keepdims=True)(x)  # (N, 1, 1, 4)
    row = L.AveragePooling2D((5, 1))(x)  # (N, 1, 7, 4)
    merged = [
        L.Multiply()([x, se]),
        L.Add()([x, row, se]),
        L.Subtract()([row, x]),
        L.Average()([x, se, row]),
        L.Maximum()([x, row]),
        L.Minimum()([se, x]),
    ]
    model = keras.Model(inputs, L.Concatenate()(merged))
    check_keras(model, random_array((2, 5, 7, 3)))


def test_keras_ops_with_numbers_arrays_and_weights_both_ways(tmp_path):
    inputs = keras.Input((5, 7, 3))
    x = L.Conv2D(4, 1)(inputs)
    y = L.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)  # keras.applications MobileNetV3's hard_sigmoid
    z = (2.0 - y) / (x * x + 1.0) - np.arange(4, dtype="float32") + (-x)
    model = keras.Model(inputs, keras.ops.maximum(z, y) + keras.ops.minimum(0.25, x))
    torch_model = check_keras(model, random_array((2, 5, 7, 3)))
    assert any(node.op == "get_attr" for node in torch_model.graph.nodes)  # the array became a buffer
    check_saves(torch_to_keras(torch_model, (3, 5, 7)), random_array((2, 5, 7, 3)), tmp_path)


def test_keras_applications_layer_scale_is_a_per_channel_parameter():
    from keras.src.applications.convnext import LayerScale

    inputs = keras.Input((5, 7, 3))
    scale = LayerScale(1e-6, 4, name="scale")
    model = keras.Model(inputs, scale(L.Conv2D(4, 1)(inputs)))
    scale.gamma.assign(random_array((4,)) + 2)
    torch_model = check_keras(model, random_array((2, 5, 7, 3)))
    (parameter,) = [p for name, p in torch_model.named_parameters() if "scale" in name]
    assert parameter.shape == (4, 1, 1) and parameter.requires_grad


def test_keras_applications_custom_scale_layer_is_a_scaled_residual_sum():
    """Inception-ResNet's ``x + r * scale``; back to Keras as arithmetic on a number."""
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    inputs = keras.Input((5, 7, 3))
    residual = L.Conv2D(3, 3, padding="same")(inputs)
    model = keras.Model(inputs, CustomScaleLayer(0.17, name="scaled_sum")([inputs, residual]))
    x = random_array((2, 5, 7, 3))
    torch_model = check_keras(model, x)
    assert not any("scaled_sum" in name for name, _ in torch_model.named_parameters())  # a number, no weight
    back = torch_to_keras(torch_model, (3, 5, 7))
    np.testing.assert_array_equal(to_numpy(back(x)), to_numpy(model(x)))  # the same float32 operations


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # NumPy on Keras building the model
def test_a_custom_scale_layer_without_a_number_as_scale_is_refused():
    from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    inputs = keras.Input((4, 3))
    model = keras.Model(inputs, CustomScaleLayer(np.ones(3, "float32"), name="odd")([inputs, inputs]))
    with pytest.raises(UnsupportedLayerError, match=r"'odd' \(CustomScaleLayer\).*a number as scale"):
        keras_to_torch(model)


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv(x)
        z = self.relu(y)  # overwrites y: the y read below is relu(y)
        y.add_(1.0)  # and this overwrites it again
        w = torch.relu_(z * 2).sigmoid_()
        return y * z + w


def test_in_place_operations_are_read_as_overwrites():
    check_torch(_InPlace(), (3, 4, 5))


def test_an_in_place_op_on_a_view_read_afterwards_is_refused():
    class ViewOverwrite(nn.Module):
        def forward(self, x):
            a, b = x.chunk(2, dim=1)
            a.mul_(2.0)  # also changes x
            return torch.cat([x, b], 1)

    with pytest.raises(UnsupportedLayerError, match="overwrites a view of"):
        torch_to_keras(ViewOverwrite(), (4, 3, 3))


@pytest.mark.parametrize(
    ("forward", "match"),
    [
        (lambda x: torch.add(x, x, alpha=2), "alpha=2"),
        (lambda x: torch.div(x, 2.0, rounding_mode="floor"), "rounding_mode='floor'"),
        (lambda x: x + x[:, 0], "different ranks"),  # (N, 2, 2, 2) + (N, 2, 2)
        (lambda x: x * x.size(0), "batch size"),
        (lambda x: operator.pow(x, 2), r"\*\* operator"),
    ],
)
def test_arithmetic_that_does_not_convert_is_refused(forward, match):
    class Op(nn.Module):
        def forward(self, x):
            return forward(x)

    with pytest.raises(UnsupportedLayerError, match=match):
        torch_to_keras(Op(), (2, 2, 2))


def test_torch_arithmetic_keeps_the_bits():
    """Not within a tolerance: the same IEEE operations in the same order."""
    module = _Numbers().eval()
    x = torch.randn(2, 3, 4, 5)
    model = torch_to_keras(module, (3, 4, 5))
    with torch.no_grad():
        expected = module(x).numpy()
    got = np.moveaxis(to_numpy(model(np.moveaxis(x.numpy(), 1, -1))), -1, 1)
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)
    with torch.no_grad():
        np.testing.assert_array_equal(keras_to_torch(model)(x).numpy(), expected)
