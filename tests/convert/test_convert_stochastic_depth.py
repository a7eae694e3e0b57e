"""Stochastic depth and dropout both ways: the identity in inference; in training a random drop of
whole samples (or of the whole batch) with the same probability in both frameworks, each drawing
its own masks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_checks import check_keras, check_saves, check_torch, random_array, to_numpy
from torch import nn

from bnkit.convert import keras_to_torch, torch_to_keras
from bnkit.convert.keras_layers import StochasticDepth as KerasStochasticDepth
from bnkit.convert.torch_modules import StochasticDepth
from bnkit.keras import keras

L = keras.layers


def _dropped_and_kept(out: np.ndarray, x: np.ndarray, keep: float) -> tuple[int, int]:
    """How many samples are all zeros and how many are x / keep; fails on anything else."""
    dropped = kept = 0
    for o, i in zip(out, x, strict=True):
        if not o.any():
            dropped += 1
        else:
            np.testing.assert_allclose(o, i / keep, rtol=1e-6)
            kept += 1
    return dropped, kept


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_torchvision_stochastic_depth_both_ways(torchvision, mode):
    from torchvision.ops import StochasticDepth as TorchvisionStochasticDepth

    module = nn.Sequential(nn.Conv2d(3, 4, 1), TorchvisionStochasticDepth(0.25, mode))
    model = check_torch(module, (3, 5, 7))  # inference: the identity
    (layer,) = [la for la in model.layers if isinstance(la, KerasStochasticDepth)]
    assert (layer.rate, layer.mode) == (0.25, mode)
    x = np.ones((256, 3, 3, 2), dtype="float32")
    inputs = keras.Input((3, 3, 2))
    out = to_numpy(keras.Model(inputs, KerasStochasticDepth(0.25, mode)(inputs))(x, training=True))
    dropped, kept = _dropped_and_kept(out, x, 0.75)
    if mode == "row":
        assert 30 < dropped < 100 and dropped + kept == 256  # 64 expected: a random drop per sample
    else:
        assert dropped in (0, 256)  # all or nothing


def test_keras_applications_stochastic_depth_to_torch_and_its_training_drop():
    from keras.src.applications.convnext import StochasticDepth as ApplicationsStochasticDepth

    inputs = keras.Input((5, 7, 3))
    model = keras.Model(inputs, ApplicationsStochasticDepth(0.5, name="sd")(L.Conv2D(4, 1)(inputs)))
    torch_model = check_keras(model, random_array((2, 5, 7, 3)))
    assert isinstance(torch_model.sd, StochasticDepth) and (torch_model.sd.p, torch_model.sd.mode) == (0.5, "row")
    torch_model.train()
    x = torch.ones(256, 4, 3, 3)
    with torch.no_grad():
        dropped, _ = _dropped_and_kept(torch_model.sd(x).numpy(), x.numpy(), 0.5)
    assert 90 < dropped < 166  # 128 expected


def test_a_dropout_that_keeps_only_the_batch_in_its_noise_shape_is_stochastic_depth():
    """EfficientNet's ``Dropout(rate, noise_shape=(None, 1, 1, 1))``."""
    inputs = keras.Input((5, 7, 3))
    model = keras.Model(inputs, L.Dropout(0.2, noise_shape=(None, 1, 1, 1), name="drop")(L.Conv2D(4, 1)(inputs)))
    torch_model = check_keras(model, random_array((2, 5, 7, 3)))
    assert isinstance(torch_model.drop, StochasticDepth) and torch_model.drop.p == pytest.approx(0.2)


def test_stochastic_depth_saves_and_loads(tmp_path):
    model = torch_to_keras(nn.Sequential(nn.Conv2d(3, 4, 1), StochasticDepth(0.1, "batch")), (3, 5, 7))
    loaded = check_saves(model, random_array((2, 5, 7, 3)), tmp_path)
    (layer,) = [la for la in loaded.layers if isinstance(la, KerasStochasticDepth)]
    assert (layer.rate, layer.mode) == (0.1, "batch")
    assert isinstance(keras_to_torch(loaded).get_submodule(layer.name), StochasticDepth)


def test_dropout_is_the_identity_in_inference_and_a_random_drop_in_training():
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.5, inplace=True))
    model = check_torch(module, (3, 5, 7))
    (layer,) = [la for la in model.layers if isinstance(la, L.Dropout)]
    assert layer.rate == 0.5
    out = to_numpy(layer(np.ones((64, 8), dtype="float32"), training=True))
    assert set(np.unique(out)) == {0.0, 2.0}  # elements dropped, the rest scaled by 1 / (1 - p)


@pytest.mark.parametrize(("rate", "mode"), [(-0.1, "row"), (1.5, "row"), (0.1, "sample")])
def test_bad_stochastic_depth_settings_are_refused_in_both_frameworks(rate, mode):
    with pytest.raises(ValueError, match="rate|mode"):
        KerasStochasticDepth(rate, mode)
    with pytest.raises(ValueError, match="probability|mode"):
        StochasticDepth(rate, mode)
