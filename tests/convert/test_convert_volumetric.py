"""3-D layers both ways against real Keras and real torch.nn, each converted model also converted back:
``Conv3D`` ⇄ ``nn.Conv3d`` (padding, strides, dilation, groups, depthwise), 3-D max/average pooling,
global and adaptive 3-D pooling, ``BatchNormalization`` ⇄ ``BatchNorm3d`` in training; refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_checks import check_keras, check_torch, random_array
from real_networks import TRAINING_TOL, Network, check_network, randomize_normalization
from torch import nn

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras
from bnkit.keras import keras

L = keras.layers
SHAPE = (5, 6, 7)  # odd and even sizes: Keras 'same' with a stride pads some axes evenly, some not

# kernel, stride, dilation, padding, groups, bias
KERAS_CONV3D_GRID = [
    (3, 1, 1, "same", 1, True),
    (3, 2, 1, "same", 1, False),  # pads (1, 1), (0, 1), (1, 1): an explicit ZeroPad3d
    (2, 1, 1, "same", 1, True),  # odd total at stride 1: PyTorch's padding="same"
    (3, 1, 2, "same", 2, True),
    (3, 2, 1, "valid", 1, True),
    ((1, 3, 3), (1, 2, 2), 1, "same", 1, True),
    ((3, 1, 1), 1, 1, "same", 4, False),  # groups = channels: Keras' only depthwise 3-D conv
]


@pytest.mark.parametrize(("k", "s", "d", "padding", "groups", "bias"), KERAS_CONV3D_GRID)
def test_keras_conv3d_grid(k, s, d, padding, groups, bias):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((*SHAPE, 4))
    conv = L.Conv3D(8, k, strides=s, dilation_rate=d, padding=padding, groups=groups, use_bias=bias, name="conv")
    model = keras.Model(inputs, conv(inputs))
    if bias:
        conv.bias.assign(random_array((8,), 5))
    torch_model = check_keras(model, random_array((2, *SHAPE, 4)))
    assert isinstance(torch_model.conv, nn.Conv3d) and torch_model.conv.groups == groups


# kernel, stride, padding, dilation, groups, bias
TORCH_CONV3D_GRID = [
    (3, 1, 1, 1, 1, True),
    (3, 2, 1, 1, 1, False),
    (3, 1, "same", 2, 2, True),
    (4, 1, "same", 1, 1, True),
    ((3, 7, 7), (1, 2, 2), (1, 3, 3), 1, 1, False),  # r3d_18's stem
    ((1, 3, 3), (1, 2, 2), (0, 1, 1), 1, 1, True),  # r2plus1d_18's spatial half: 'same' on odd, pads on even
    ((3, 1, 1), (2, 1, 1), (1, 0, 0), 1, 1, True),  # and its temporal half
    (3, 2, 0, 1, 4, True),
    (3, 1, 2, 1, 1, True),  # more padding than 'same': ZeroPadding3D + 'valid'
    (3, 1, 1, 1, 4, True),  # depthwise (groups = in = 4, out = 8): Conv3D(groups=4)
]


@pytest.mark.parametrize(("k", "s", "p", "d", "groups", "bias"), TORCH_CONV3D_GRID)
def test_torch_conv3d_grid(k, s, p, d, groups, bias):
    torch.manual_seed(0)
    module = nn.Conv3d(4, 8, k, stride=s, padding=p, dilation=d, groups=groups, bias=bias)
    model = check_torch(module, (4, *SHAPE))
    conv = next(layer for layer in model.layers if isinstance(layer, L.Conv3D))
    assert conv.groups == groups


# pool, strides, padding, input
KERAS_POOL3D_GRID = [
    (2, None, "valid", SHAPE),
    (3, 1, "same", SHAPE),
    (2, 2, "same", SHAPE),  # (0, 1) on odd axes: ceil_mode
    (3, 2, "same", (5, 7, 9)),  # (1, 1) everywhere
    ((1, 3, 3), (1, 2, 2), "valid", SHAPE),
]


@pytest.mark.parametrize("cls", [L.MaxPooling3D, L.AveragePooling3D])
@pytest.mark.parametrize(("pool", "strides", "padding", "shape"), KERAS_POOL3D_GRID)
def test_keras_pool3d_grid(cls, pool, strides, padding, shape):
    inputs = keras.Input((*shape, 3))
    model = keras.Model(inputs, cls(pool, strides=strides, padding=padding)(inputs))
    check_keras(model, random_array((2, *shape, 3)))


def test_keras_max_pool3d_same_after_relu_pads_explicitly():
    inputs = keras.Input((*SHAPE, 3))
    x = L.ReLU()(inputs)
    model = keras.Model(inputs, L.MaxPooling3D(4, strides=1, padding="same")(x))  # pads (1, 2)
    torch_model = check_keras(model, random_array((2, *SHAPE, 3)))
    assert any(isinstance(m, nn.ZeroPad3d) for m in torch_model.modules())


@pytest.mark.parametrize(
    "module",
    [
        nn.MaxPool3d(2),
        nn.MaxPool3d(3, 2, 1),
        nn.MaxPool3d(3, 1, 1),
        nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),  # s3d's, after a ReLU below: explicit zero padding
        nn.MaxPool3d(2, ceil_mode=True),
        nn.AvgPool3d(2),
        nn.AvgPool3d(3, 1, 1),  # count_include_pad=True: ZeroPadding3D + 'valid'
        nn.AvgPool3d(3, 1, 1, count_include_pad=False),  # Keras 'same'
        nn.AvgPool3d(2, ceil_mode=True),
        nn.AvgPool3d((2, 3, 3), 1),  # s3d's head (kernel (2, 7, 7)), smaller
        nn.AdaptiveAvgPool3d(1),
        nn.AdaptiveMaxPool3d(1),
        nn.AdaptiveAvgPool3d((1, 3, 3)),  # does not divide 6 x 7 evenly: Keras' AdaptiveAveragePooling3D
        nn.AdaptiveMaxPool3d((5, 3, 7)),
    ],
    ids=repr,
)
def test_torch_pool3d_grid(module):
    check_torch(nn.Sequential(nn.ReLU(), module), (3, *SHAPE))


class _Functional(nn.Module):
    def forward(self, x):
        a = F.max_pool3d(x, 2)
        b = F.avg_pool3d(x, 2, ceil_mode=False)
        c = F.adaptive_avg_pool3d(x, 1) + F.adaptive_max_pool3d(x, (1, 1, 1))
        return a + b + c + x.mean((2, 3, 4), keepdim=True) + torch.amax(x, dim=(2, 3, 4), keepdim=True)


def test_torch_functional_3d_pooling_and_reductions():
    model = check_torch(_Functional(), (3, 4, 6, 6))
    types = {type(layer).__name__ for layer in model.layers}
    assert {"MaxPooling3D", "AveragePooling3D", "GlobalAveragePooling3D", "GlobalMaxPooling3D"} <= types


def test_keras_global_and_adaptive_pool3d():
    inputs = keras.Input((*SHAPE, 3))
    x = L.Add()([L.AdaptiveAveragePooling3D((2, 3, 3))(inputs), L.AdaptiveMaxPooling3D((2, 3, 3))(inputs)])
    flat = L.Flatten()(x)
    pooled = L.Concatenate()([L.GlobalAveragePooling3D()(inputs), L.GlobalMaxPooling3D()(inputs), flat])
    check_keras(keras.Model(inputs, pooled), random_array((2, *SHAPE, 3)))
    kept = L.GlobalAveragePooling3D(keepdims=True)(inputs)
    check_keras(keras.Model(inputs, kept), random_array((2, *SHAPE, 3)))


def _torch_bn3d_net() -> Network:
    def build():
        torch.manual_seed(0)
        module = nn.Sequential(
            nn.Conv3d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm3d(8),
            nn.ReLU(),
            nn.Conv3d(8, 8, 3, stride=2, padding=1),
            nn.BatchNorm3d(8, momentum=0.3, eps=1e-3),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )
        randomize_normalization(module)
        return module.eval()

    return Network("bn3d_torch", "torch", build, (3, *SHAPE))


def _keras_bn3d_net() -> Network:
    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((*SHAPE, 3))
        x = L.Conv3D(8, 3, padding="same")(inputs)
        x = L.BatchNormalization(momentum=0.9)(x)
        x = L.Conv3D(8, 3, strides=2, padding="same", activation="relu")(x)
        x = L.BatchNormalization(axis=-1, epsilon=1e-5)(x)
        model = keras.Model(inputs, L.Dense(4)(L.GlobalAveragePooling3D()(x)))
        randomize_normalization(model)
        return model

    return Network("bn3d_keras", "keras", build, (*SHAPE, 3))


@pytest.mark.parametrize("net", [_torch_bn3d_net(), _keras_bn3d_net()], ids=lambda n: n.name)
@pytest.mark.parametrize("semantics", ["source", "target"])
def test_batch_norm_3d_trains_the_same_both_ways(net, semantics):
    report = check_network(net, semantics=semantics, round_trip=True)
    assert report.batch_norms == 2
    assert report.inference_error < 1e-5 and report.round_trip_error < 1e-5
    if semantics == "source":  # "target" trains by the other framework's rules: only inference is the same
        assert report.training_error < TRAINING_TOL and report.statistics_error < TRAINING_TOL


def test_volumetric_refusals_name_the_layer():
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(Conv3d\): stride=\(2, 2, 2\) with dilation=\(2, 2, 2\)"):
        torch_to_keras(nn.Sequential(nn.Conv3d(3, 4, 3, stride=2, dilation=2)), (3, *SHAPE))
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(Conv3d\): padding_mode='reflect'"):
        torch_to_keras(nn.Sequential(nn.Conv3d(3, 4, 3, padding=1, padding_mode="reflect")), (3, *SHAPE))
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(MaxPool3d\): dilation"):
        torch_to_keras(nn.Sequential(nn.MaxPool3d(2, dilation=2)), (3, *SHAPE))
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(AvgPool3d\): divisor_override"):
        torch_to_keras(nn.Sequential(nn.AvgPool3d(2, divisor_override=3)), (3, *SHAPE))
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(MaxPool3d\): padding=\(1, 1, 1\) is not what Keras"):
        torch_to_keras(nn.Sequential(nn.MaxPool3d(3, 2, 1)), (3, 6, 6, 6))  # Keras pads (0, 1); input may be < 0
    inputs = keras.Input((*SHAPE, 3))
    with pytest.raises(UnsupportedLayerError, match=r"'avg' \(AveragePooling3D\): padding='same' pads axis 2 by"):
        keras_to_torch(keras.Model(inputs, L.AveragePooling3D(3, strides=2, padding="same", name="avg")(inputs)))
