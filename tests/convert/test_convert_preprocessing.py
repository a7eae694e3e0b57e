"""Keras Rescaling and Normalization → PyTorch arithmetic (and back as arithmetic): the same
operations in the same order, so the results agree to the bit; epsilon and invert included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_checks import check_keras, check_saves, random_array, to_numpy

from bnkit.convert import UnsupportedLayerError, keras_to_torch, torch_to_keras
from bnkit.keras import keras

L = keras.layers


def _pixels(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


def _exact(layer, x_nhwc):
    """``layer`` then a conv converts both ways (within 1e-5, check_keras); ``layer`` alone gives
    the same bits in PyTorch (the conv sums in another order in each framework)."""
    inputs = keras.Input(x_nhwc.shape[1:])
    pre = layer(inputs)
    check_keras(keras.Model(inputs, L.Conv2D(2, 3)(pre)), x_nhwc)
    model = keras.Model(inputs, pre)
    torch_model = keras_to_torch(model)
    with torch.no_grad():
        got = torch_model(torch.from_numpy(np.moveaxis(x_nhwc, -1, 1).copy())).numpy()
    np.testing.assert_array_equal(np.moveaxis(got, 1, -1), to_numpy(model(x_nhwc)))
    return torch_model


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale": 1.0 / 255.0},  # EfficientNet's
        {"scale": 1.0 / 127.5, "offset": -1.0},  # MobileNetV3's
        {"scale": [0.5, 2.0, 1.0 / 3.0], "offset": [0.1, 0.0, -7.0]},  # per channel
        {"scale": 1.0, "offset": 0.25},
    ],
)
def test_rescaling_both_ways(kwargs):
    _exact(L.Rescaling(**kwargs), _pixels((2, 5, 7, 3)))


_VARIANCES = np.linspace(1, 9, 21).reshape(7, 3)


@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"mean": [0.485 * 255, 0.456 * 255, 0.406 * 255], "variance": [(0.229 * 255) ** 2, 58.0**2, 0.0]},
        {"axis": None, "mean": 120.0, "variance": 3600.0},
        {"axis": (2, 3), "mean": np.linspace(0, 200, 21).reshape(7, 3), "variance": _VARIANCES},  # per (W, C)
    ],
)
def test_normalization_with_given_statistics_both_ways(kwargs, invert):
    """A variance of 0 divides by Keras' epsilon (1e-7), as Keras does."""
    _exact(L.Normalization(**kwargs, invert=invert), _pixels((2, 5, 7, 3)))


def test_an_adapted_normalization_and_its_saved_conversion(tmp_path):
    norm = L.Normalization(name="norm")
    norm.adapt(_pixels((16, 5, 7, 3), seed=3))  # EfficientNet's: statistics as weights
    torch_model = _exact(lambda x: L.Rescaling(1 / 255)(norm(x)), _pixels((2, 5, 7, 3)))
    buffers = dict(torch_model.named_buffers())
    assert {"norm_mean", "norm_std"} <= set(buffers) and buffers["norm_mean"].shape == (3, 1, 1)
    check_saves(torch_to_keras(torch_model, (3, 5, 7)), _pixels((2, 5, 7, 3)), tmp_path)


def test_a_normalization_without_statistics_is_refused():
    inputs = keras.Input((4,))
    norm = L.Normalization(name="unset")
    model = keras.Model(inputs, norm(inputs))
    norm.mean = None  # as before build() or adapt()
    with pytest.raises(UnsupportedLayerError, match=r"'unset'.*no mean and variance"):
        keras_to_torch(model)


def test_the_epsilon_is_the_one_keras_had_when_converting():
    inputs = keras.Input((3,))
    norm = L.Normalization(mean=[0.0, 1.0, 2.0], variance=[0.0, 0.0, 1e-20], name="zero_variance")
    model = keras.Model(inputs, norm(inputs))
    torch_model = keras_to_torch(model)
    x = random_array((4, 3))
    np.testing.assert_array_equal(to_numpy(torch_model(torch.from_numpy(x))), to_numpy(model(x)))
    assert float(dict(torch_model.named_buffers())["zero_variance_std"].max()) == np.float32(1e-7)
