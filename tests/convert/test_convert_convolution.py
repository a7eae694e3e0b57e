"""Conv1D/Conv2D ⇄ nn.Conv1d/Conv2d: the padding/stride/dilation/groups/bias grid, both ways;
DepthwiseConv1D/2D ⇄ Conv1d/2d(groups=C, out=C*M); SeparableConv1D/2D ⇄ bnkit's SeparableConv1d/2d
(and a depthwise conv + 1x1 conv written as two modules); grouped convs with 1 < groups < C.
"""

from __future__ import annotations

import pytest
import torch
from layer_checks import check_keras, check_torch, random_array
from torch import nn

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras
from bnkit.convert.torch_modules import SeparableConv1d, SeparableConv2d
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


def _types(model) -> set[str]:
    return {type(layer).__name__ for layer in model.layers}


def _torch_types(module) -> set[str]:
    return {type(m).__name__ for m in module.modules()}


# rank, size, kernel, stride, dilation, padding, depth multiplier, channels, bias, activation
KERAS_DEPTHWISE_GRID = [
    (2, 9, 3, 1, 1, "same", 1, 3, True, None),
    (2, 10, 3, 2, 1, "same", 1, 5, False, "relu"),  # stride 2 on an even size: Keras pads (0, 1)
    (2, 9, 3, 2, 1, "same", 2, 3, True, None),  # pads (1, 1)
    (2, 11, 5, 3, 1, "same", 3, 2, True, "relu6"),
    (2, 9, 2, 1, 1, "same", 1, 4, True, None),  # an even kernel at stride 1: PyTorch's 'same'
    (2, 9, 3, 1, 2, "same", 2, 3, False, None),  # dilated
    (2, 11, 3, 2, 2, "valid", 1, 3, True, None),  # stride and dilation together (Keras allows both here)
    (2, 9, (3, 5), (1, 2), 1, "same", 2, 3, True, None),
    (1, 9, 3, 2, 1, "same", 2, 3, True, None),
    (1, 10, 4, 1, 1, "valid", 1, 5, False, "relu"),
]


@pytest.mark.parametrize(("rank", "size", "k", "s", "d", "padding", "mult", "c", "bias", "act"), KERAS_DEPTHWISE_GRID)
def test_keras_depthwise_conv(rank, size, k, s, d, padding, mult, c, bias, act):
    keras.utils.set_random_seed(0)
    shape = (size,) * rank + (c,)
    cls = L.DepthwiseConv1D if rank == 1 else L.DepthwiseConv2D
    inputs = keras.Input(shape)
    layer = cls(k, strides=s, dilation_rate=d, padding=padding, depth_multiplier=mult, use_bias=bias, activation=act)
    model = keras.Model(inputs, layer(inputs))
    if bias:
        layer.bias.assign(random_array((c * mult,), 5))
    torch_model = check_keras(model, random_array((2, *shape)))
    conv = next(m for m in torch_model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)))
    assert (conv.groups, conv.in_channels, conv.out_channels) == (c, c, c * mult)
    back = torch_to_keras(torch_model, (c, *(size,) * rank))
    assert cls.__name__ in _types(back)  # and back: the same layer type


# channels, multiplier, kernel, stride, padding, dilation, bias
TORCH_DEPTHWISE_GRID = [
    (3, 1, 3, 1, 1, 1, True),
    (5, 1, 3, 2, 1, 1, False),  # MobileNet's strided depthwise conv
    (3, 2, 3, 1, 0, 1, True),
    (4, 3, 5, 2, 2, 1, True),
    (3, 2, 3, 1, "same", 2, False),
    (3, 1, 3, 2, 2, 2, True),  # stride and dilation: a DepthwiseConv2D takes both
    (2, 2, 4, 1, 1, 1, True),  # padding Keras' 'same' does not make: zero padding in front
]


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize(("c", "mult", "k", "s", "p", "d", "bias"), TORCH_DEPTHWISE_GRID)
def test_torch_depthwise_conv(rank, c, mult, k, s, p, d, bias):
    torch.manual_seed(0)
    cls = nn.Conv1d if rank == 1 else nn.Conv2d
    module = nn.Sequential(cls(c, c * mult, k, stride=s, padding=p, dilation=d, groups=c, bias=bias), nn.ReLU())
    model = check_torch(module, (c,) + (11,) * rank)
    assert ("DepthwiseConv1D" if rank == 1 else "DepthwiseConv2D") in _types(model)
    weights = model.get_layer(next(la.name for la in model.layers if "Depthwise" in type(la).__name__)).weights
    assert tuple(weights[0].shape) == (*(k,) * rank, c, mult)


@pytest.mark.parametrize(
    ("rank", "size", "k", "s", "d", "padding", "mult", "c", "filters", "bias", "act"),
    [
        (2, 9, 3, 1, 1, "same", 1, 3, 4, True, "relu"),
        (2, 10, 3, 2, 1, "same", 2, 3, 5, False, None),  # Xception's strided separable conv: pads (0, 1)
        (2, 11, 5, 2, 1, "valid", 3, 2, 7, True, None),
        (2, 9, 3, 1, 2, "same", 1, 5, 3, True, None),
        (1, 9, 3, 2, 1, "same", 2, 3, 4, True, "relu"),
        (1, 10, 2, 1, 1, "same", 1, 4, 3, False, None),
    ],
)
def test_keras_separable_conv(rank, size, k, s, d, padding, mult, c, filters, bias, act):
    keras.utils.set_random_seed(0)
    shape = (size,) * rank + (c,)
    cls = L.SeparableConv1D if rank == 1 else L.SeparableConv2D
    inputs = keras.Input(shape)
    layer = cls(filters, k, strides=s, dilation_rate=d, padding=padding, depth_multiplier=mult, use_bias=bias,
                activation=act, name="sep")  # fmt: skip
    model = keras.Model(inputs, layer(inputs))
    if bias:
        layer.bias.assign(random_array((filters,), 5))
    torch_model = check_keras(model, random_array((2, *shape)))
    separable = torch_model.sep
    assert isinstance(separable, SeparableConv1d if rank == 1 else SeparableConv2d)
    assert separable.depthwise.groups == c and separable.depthwise.out_channels == c * mult
    back = torch_to_keras(torch_model, (c, *(size,) * rank))
    assert cls.__name__ in _types(back)  # Keras -> PyTorch -> Keras gives the same layer type back


@pytest.mark.parametrize("rank", [1, 2])
def test_torch_separable_conv_module_and_its_plain_spelling(rank):
    torch.manual_seed(0)
    cls = SeparableConv1d if rank == 1 else SeparableConv2d
    module = nn.Sequential(cls(3, 5, 3, stride=2, padding=1, depth_multiplier=2), nn.ReLU())
    model = check_torch(module, (3,) + (9,) * rank)
    assert ("SeparableConv1D" if rank == 1 else "SeparableConv2D") in _types(model)
    back = keras_to_torch(model)
    assert cls.__name__ in _torch_types(back)
    # what timm and hand-written models do: a depthwise conv then a 1x1 conv, as two modules
    conv = nn.Conv1d if rank == 1 else nn.Conv2d
    plain = nn.Sequential(conv(4, 4, 3, padding=1, groups=4, bias=False), conv(4, 6, 1))
    assert {"DepthwiseConv1D", "DepthwiseConv2D"} & _types(check_torch(plain, (4,) + (7,) * rank))


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize(("c", "out", "groups"), [(6, 9, 3), (4, 6, 2), (8, 4, 2), (6, 6, 3)])
def test_grouped_convs_between_one_and_the_channel_count(rank, c, out, groups):
    """1 < groups < in_channels is Keras' Conv2D(groups=...), both ways."""
    torch.manual_seed(0)
    cls = nn.Conv1d if rank == 1 else nn.Conv2d
    model = check_torch(nn.Sequential(cls(c, out, 3, stride=2, padding=1, groups=groups)), (c,) + (9,) * rank)
    conv = next(la for la in model.layers if type(la).__name__.startswith("Conv"))
    assert conv.groups == groups
    keras.utils.set_random_seed(0)
    shape = (9,) * rank + (c,)
    inputs = keras.Input(shape)
    keras_cls = L.Conv1D if rank == 1 else L.Conv2D
    model = keras.Model(inputs, keras_cls(out, 3, strides=2, padding="same", groups=groups)(inputs))
    torch_model = check_keras(model, random_array((2, *shape)))
    assert next(m for m in torch_model.modules() if isinstance(m, cls)).groups == groups


def test_convolution_refusals_name_the_layer():
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(Conv2d\): padding_mode='reflect'"):
        torch_to_keras(nn.Sequential(nn.Conv2d(3, 6, 3, groups=3, padding=1, padding_mode="reflect")), (3, 8, 8))
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(SeparableConv2d\): padding_mode='circular'"):
        module = SeparableConv2d(3, 4, 3, padding=1)
        module.depthwise.padding_mode = "circular"
        torch_to_keras(nn.Sequential(module), (3, 8, 8))
    inputs = keras.Input((None, None, 3))  # 'same' with a stride pads by the size: unknown here
    layer = L.SeparableConv2D(4, 3, strides=2, padding="same", name="sep")
    with pytest.raises(UnsupportedLayerError, match=r"'sep' \(SeparableConv2D\): padding='same' with strides"):
        keras_to_torch(keras.Model(inputs, layer(inputs)))
