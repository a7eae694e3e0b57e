"""Dropout layers both ways: SpatialDropout1D/2D/3D ⇄ nn.Dropout1d/2d/3d and F.dropout1d/2d/3d.

Inference: the identity, so the outputs agree exactly. Training: each framework draws its own
masks, so what must agree is the distribution: whole channels of each sample zeroed (the same
mask at every position), the others scaled by 1 / (1 - rate), about a fraction `rate` of them
dropped (checked on 4 x 64 channels with rate 0.5: 256 draws, 128 ± 8 expected; the bounds
[0.3, 0.7] are 5 standard deviations wide).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_checks import check_keras, check_torch, random_array, to_numpy
from torch import nn

from bnkit.convert import UnsupportedLayerError, torch_to_keras
from bnkit.keras import keras

L = keras.layers

SPATIAL = [(L.SpatialDropout1D, nn.Dropout1d, (9,)), (L.SpatialDropout2D, nn.Dropout2d, (5, 6)),
           (L.SpatialDropout3D, nn.Dropout3d, (3, 4, 5))]  # fmt: skip


def _check_channel_dropout(y: np.ndarray, channel_axis: int, rate: float) -> None:
    """``y``: a training forward of ones. Whole channels of each sample are zero, the rest 1/(1-rate)."""
    y = np.moveaxis(y, channel_axis, 1).reshape(y.shape[0], y.shape[channel_axis], -1)
    assert np.all(y == y[:, :, :1]), "the mask differs along a channel"
    kept = y[:, :, 0]
    np.testing.assert_allclose(kept[kept != 0], 1 / (1 - rate), rtol=1e-6)
    assert 0.3 < np.mean(kept == 0) < 0.7, np.mean(kept == 0)


@pytest.mark.parametrize(("keras_cls", "torch_cls", "spatial"), SPATIAL)
def test_keras_spatial_dropout(keras_cls, torch_cls, spatial):
    inputs = keras.Input((*spatial, 64))
    model = keras.Model(inputs, keras_cls(0.5, name="drop")(inputs))
    torch_model = check_keras(model, random_array((2, *spatial, 64)))  # inference: the identity, both ways
    assert type(torch_model.drop) is torch_cls and torch_model.drop.p == 0.5
    back = torch_to_keras(torch_model, (64, *spatial))
    assert any(type(layer) is keras_cls for layer in back.layers)
    _check_channel_dropout(torch_model.train()(torch.ones(4, 64, *spatial)).numpy(), 1, 0.5)


class _Functional(nn.Module):
    def forward(self, x):
        return F.dropout2d(x, 0.5, self.training)


@pytest.mark.parametrize(("keras_cls", "torch_cls", "spatial"), SPATIAL)
def test_torch_spatial_dropout(keras_cls, torch_cls, spatial):
    module = nn.Sequential(torch_cls(0.5))
    model = check_torch(module, (64, *spatial))
    assert any(type(layer) is keras_cls and layer.rate == 0.5 for layer in model.layers)
    y = to_numpy(model(np.ones((4, *spatial, 64), "float32"), training=True))
    _check_channel_dropout(y, -1, 0.5)


@pytest.mark.filterwarnings("ignore:dropout2d. Received a 3D input:UserWarning")  # PyTorch's own, expected
def test_dropout2d_takes_the_ranks_it_drops_channels_of_and_functions_convert():
    model = check_torch(nn.Sequential(nn.Dropout2d(0.25)), (6, 7))  # (N, C, L): PyTorch drops channels (1-D)
    assert any(isinstance(layer, L.SpatialDropout1D) for layer in model.layers)
    model = check_torch(_Functional(), (64, 5, 5))
    _check_channel_dropout(to_numpy(model(np.ones((4, 5, 5, 64), "float32"), training=True)), -1, 0.5)


def test_spatial_dropout_refusals_name_the_module():
    # on (N, C, H, W), Dropout3d reads (C, D, H, W) without a batch: it drops whole samples
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(Dropout3d\): Dropout3d of a rank-4 input"):
        torch_to_keras(nn.Sequential(nn.Dropout3d(0.5)), (3, 4, 5))
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(Dropout1d\)"):
        torch_to_keras(nn.Sequential(nn.Linear(4, 4), nn.Dropout1d(0.5)), (4,))
