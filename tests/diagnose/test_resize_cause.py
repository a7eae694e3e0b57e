"""The ``resize`` cause on a real pair: a PyTorch model upsampling with bilinear align_corners=True and
a hand-built Keras model with UpSampling2D(bilinear) and the same weights. compare names the resize
layer and both settings; with align_corners=False on the PyTorch side the two agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit
from bnkit.keras import keras

L = keras.layers


class Upsampler(nn.Module):
    def __init__(self, align_corners: bool, functional: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align_corners)
        self.head = nn.Conv2d(4, 2, 1)
        self.align_corners, self.functional = align_corners, functional

    def forward(self, x):
        x = torch.relu(self.conv(x))
        if self.functional:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=self.align_corners)
        else:
            x = self.up(x)
        return self.head(x)


def _pair(align_corners: bool, functional: bool = False):
    torch.manual_seed(0)
    module = Upsampler(align_corners, functional).eval()
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = L.UpSampling2D(2, interpolation="bilinear", name="up")(x)
    model = keras.Model(inputs, L.Conv2D(2, 1, name="head")(x))
    for name in ("conv", "head"):
        conv = getattr(module, name)
        kernel = conv.weight.detach().numpy().transpose(2, 3, 1, 0)
        model.get_layer(name).set_weights([kernel, conv.bias.detach().numpy()])
    return module, model


@pytest.mark.parametrize("functional", [False, True])
def test_align_corners_true_against_keras_upsampling_is_named(functional):
    module, model = _pair(align_corners=True, functional=functional)
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype("float32")
    report = bnkit.compare(module, model, x)
    assert not report.agree
    codes = [c.code for c in report.causes]
    assert "resize" in codes, codes
    cause = next(c for c in report.causes if c.code == "resize")
    assert "bilinear align_corners=True in the PyTorch model" in cause.explanation
    assert "Keras UpSampling2D bilinear (align_corners=False)" in cause.explanation
    assert "weights" not in codes and "unexplained" not in codes, codes


def test_same_interpolation_agrees():
    module, model = _pair(align_corners=False)
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype("float32")
    report = bnkit.compare(module, model, x)
    assert report.agree, (report.causes, report.first_divergence)
