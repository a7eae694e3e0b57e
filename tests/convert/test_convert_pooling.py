"""Pooling both ways: Keras 'same' padding, ceil_mode, zero padding before max pooling of a ReLU,
global pooling, adaptive pooling, F.max_pool2d and friends; grids of kernel, stride, padding and
ceil_mode in both directions that convert exactly or are refused naming the layer.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_checks import check_keras, check_torch, random_array, to_numpy
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


def _torch_to_keras_exact_or_refused(module, shape):
    """Convert ``module`` (a Sequential) to Keras: the outputs agree, or the refusal names the pooling."""
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    try:
        model = torch_to_keras(module, shape)
    except UnsupportedLayerError as e:
        assert e.layer_name == str(len(module) - 1) and e.layer_type == type(module[-1]).__name__, e
        return False
    with torch.no_grad():
        expected = module(x).numpy()
    got = to_numpy(model(x.numpy().transpose(0, 2, 1)))
    np.testing.assert_allclose(got.transpose(0, 2, 1), expected, rtol=1e-6, atol=1e-6)
    return True


@pytest.mark.slow
def test_torch_pooling_grid_converts_exactly_or_is_refused_by_name():
    """Kernels 2-4, strides 2-3 (stride 1 adds no ceil_mode window), every padding PyTorch takes, and
    ceil_mode, on odd and even sizes (1-D: 2-D applies the same rules per axis)."""
    refused = {}
    for size, k, s, ceil in itertools.product((7, 8), (2, 3, 4), (2, 3), (False, True)):
        for p in range(k // 2 + 1):
            for kind in ("max", "max after relu", "avg") + (("avg counting pads",) if p else ()):
                if kind.startswith("max"):
                    pool = nn.MaxPool1d(k, s, p, ceil_mode=ceil)
                else:
                    pool = nn.AvgPool1d(k, s, p, ceil_mode=ceil, count_include_pad=kind == "avg counting pads")
                layers = [nn.Conv1d(3, 3, 1), *([nn.ReLU()] if kind == "max after relu" else []), pool]
                if not _torch_to_keras_exact_or_refused(nn.Sequential(*layers).eval(), (3, size)):
                    refused.setdefault(kind, []).append((size, k, s, p, ceil))
    assert "max after relu" not in refused  # zeros never win: every window holds a real value
    # what stays refused: windows Keras' 'same' does not pool (max of values that may be negative), or
    # averages whose divisor Keras cannot reproduce
    assert (8, 3, 2, 1, False) in refused["max"]  # ResNet's stem on an even size: PyTorch pads (1, 1), Keras (0, 1)
    assert (7, 3, 3, 0, True) in refused["max"]  # windows from 0, 3, 6: the last one holds one value
    assert (8, 3, 2, 0, True) not in refused.get("max", [])  # SqueezeNet's MaxPool2d(3, 2, ceil_mode=True)


@pytest.mark.parametrize(
    ("pool", "size", "relu"),
    [
        (nn.MaxPool2d(3, 2, ceil_mode=True), 48, False),  # SqueezeNet at 96x96: one more window, Keras' 'same'
        (nn.MaxPool2d(3, 2, ceil_mode=True), 47, False),  # no window more: 'valid'
        (nn.MaxPool2d((2, 3), (2, 2), ceil_mode=True), (9, 10), False),
        (nn.MaxPool2d(3, 3, ceil_mode=True), 10, True),  # one-value last window after a ReLU: zero padding
        (nn.AvgPool2d(2, 2, ceil_mode=True), 9, False),  # a 2-wide average of one value and the padding
        (nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), 9, False),
    ],
)
def test_torch_ceil_mode_pooling_2d(pool, size, relu):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 1), *([nn.ReLU()] if relu else []), pool]
    check_torch(nn.Sequential(*layers), (3, *size) if isinstance(size, tuple) else (3, size, size))


def test_torch_ceil_mode_refusal_names_the_module_and_the_windows():
    with pytest.raises(UnsupportedLayerError, match=r"'features.1' \(MaxPool2d\): ceil_mode=True pools windows"):
        torch_to_keras(
            nn.Sequential(OrderedDict(features=nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d(3, 3, ceil_mode=True)))),
            (3, 10, 10),
        )
    with pytest.raises(UnsupportedLayerError, match=r"avg_pool2d\(\) in the forward"):
        torch_to_keras(_AvgCeil(), (3, 10, 10))


class _AvgCeil(nn.Module):
    def forward(self, x):
        return F.avg_pool2d(x, 3, 3, ceil_mode=True)


@pytest.mark.slow
def test_keras_pooling_grid_converts_exactly_or_is_refused_by_name():
    refused = []
    for size, k, s, padding, relu in itertools.product((7, 8), (2, 3, 4), (1, 2, 3), ("valid", "same"), (0, 1)):
        for cls in (L.MaxPooling1D, L.AveragePooling1D):
            inputs = keras.Input((size, 3))
            x = L.Conv1D(3, 1, activation="relu" if relu else None)(inputs)
            model = keras.Model(inputs, cls(k, strides=s, padding=padding, name="pool")(x))
            try:
                torch_model = keras_to_torch(model)
            except UnsupportedLayerError as e:
                assert e.layer_name == "pool", e
                refused.append((cls.__name__, size, k, s, padding, relu))
                continue
            x = random_array((2, size, 3))
            got = torch_model(torch.from_numpy(x.transpose(0, 2, 1).copy())).detach().numpy().transpose(0, 2, 1)
            np.testing.assert_allclose(got, to_numpy(model(x)), rtol=1e-6, atol=1e-6)
    assert all(name == "AveragePooling1D" or not after_relu for name, *_, after_relu in refused)  # max of a ReLU
    assert ("AveragePooling1D", 8, 3, 2, "same", 0) in refused  # 3-wide, padded (0, 1): replicated edge values
    assert ("MaxPooling1D", 8, 3, 2, "same", 0) not in refused  # ceil_mode
    assert all(padding == "same" for *_, padding, _ in refused), refused


@pytest.mark.parametrize(
    ("size", "output", "expected"),
    [
        ((7, 7), 1, "GlobalAveragePooling2D"),
        ((7, 7), 7, "Identity"),  # torchvision's VGG at 224x224
        ((7, 5), (None, 5), "Identity"),
        ((12, 12), 4, "AveragePooling2D"),  # divisible: a pooling with kernel = stride = 3
        ((12, 10), (3, 5), "AveragePooling2D"),
        ((7, 7), 3, "AdaptiveAveragePooling2D"),  # overlapping windows of different sizes: Keras' adaptive pooling
        ((5, 6), (2, 4), "AdaptiveAveragePooling2D"),
        ((3, 3), 5, "AdaptiveAveragePooling2D"),  # more outputs than inputs
    ],
)
@pytest.mark.parametrize("is_max", [False, True])
def test_torch_adaptive_pooling(size, output, expected, is_max):
    torch.manual_seed(0)
    pool = nn.AdaptiveMaxPool2d(output) if is_max else nn.AdaptiveAvgPool2d(output)
    model = check_torch(nn.Sequential(nn.Conv2d(3, 4, 1), pool), (3, *size))
    if is_max:
        expected = expected.replace("Average", "Max")
    assert expected in {type(layer).__name__ for layer in model.layers}


class _AdaptiveCalls(nn.Module):
    def forward(self, x):
        return F.adaptive_avg_pool1d(x, 3) + F.adaptive_max_pool1d(x, 3)


def test_torch_adaptive_pooling_functions_1d_and_refusal():
    check_torch(nn.Sequential(nn.AdaptiveAvgPool1d(4), nn.AdaptiveMaxPool1d(2)), (3, 11))
    check_torch(_AdaptiveCalls(), (3, 9))  # divisible: pooling with kernel = stride = 3
    check_torch(_AdaptiveCalls(), (3, 10))  # not divisible: Keras' adaptive pooling
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(AdaptiveMaxPool2d\): return_indices"):
        torch_to_keras(nn.Sequential(nn.AdaptiveMaxPool2d(3, return_indices=True)), (3, 7, 7))


@pytest.mark.parametrize(
    ("cls", "size", "output"),
    [
        (L.AdaptiveAveragePooling2D, (7, 9), (3, 4)),
        (L.AdaptiveMaxPooling2D, (7, 9), 2),
        (L.AdaptiveAveragePooling1D, (10,), 4),
        (L.AdaptiveMaxPooling1D, (10,), 3),
    ],
)
def test_keras_adaptive_pooling(cls, size, output):
    inputs = keras.Input((*size, 3))
    model = keras.Model(inputs, cls(output, name="adaptive")(inputs))
    torch_model = check_keras(model, random_array((2, *size, 3)))
    assert "Adaptive" in type(torch_model.adaptive).__name__
