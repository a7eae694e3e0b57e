"""Layer normalization both ways: Keras LayerNormalization over the last axes, nn.LayerNorm on
channels-last and channels-first tensors, F.layer_norm, torchvision's LayerNorm2d; the refusals.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_checks import check_keras, check_torch, random_array, to_numpy
from torch import nn

from bnkit.convert import UnsupportedLayerError, keras_to_torch
from bnkit.keras import keras

L = keras.layers


def _randomize(layer):
    for i, w in enumerate(layer.weights):
        w.assign(random_array(w.shape, seed=i + 5) * 0.5 + (1.0 if "gamma" in w.path else 0.0))


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize(("shape", "axis"), [((3, 7, 5), -1), ((3, 7, 5), [2, 3]), ((3, 7, 5), [1, 2, 3]), ((5,), -1),
                                             ((7, 5), -1)])  # fmt: skip
def test_keras_layer_normalization_over_the_last_axes_both_ways(shape, axis, center, scale):
    inputs = keras.Input(shape)
    norm = L.LayerNormalization(axis=axis, epsilon=1e-4, center=center, scale=scale, name="ln")
    model = keras.Model(inputs, norm(inputs * 3.0 + 1.0))
    _randomize(norm)
    torch_model = check_keras(model, random_array((2, *shape)))
    (converted,) = [m for m in torch_model.modules() if isinstance(m, nn.LayerNorm)]
    assert converted.eps == pytest.approx(1e-4)
    assert (converted.weight is not None and converted.weight.requires_grad) == scale
    assert (converted.bias is not None) == center


def test_keras_layer_normalization_of_the_channels_after_a_conv_and_after_a_permute():
    inputs = keras.Input((5, 7, 3))
    x = L.Conv2D(6, 3, padding="same")(inputs)
    a = L.LayerNormalization(epsilon=1e-6, name="channels")(x)  # ConvNeXt's: over the channels of NHWC
    b = L.LayerNormalization(name="after_permute")(L.Permute((3, 1, 2))(x))  # over the width
    model = keras.Model(inputs, [L.Conv2D(2, 1)(a), L.Flatten()(b)])
    for layer in (model.get_layer("channels"), model.get_layer("after_permute")):
        _randomize(layer)
    torch_model = keras_to_torch(model)
    x_np = random_array((2, 5, 7, 3))
    got = torch_model(torch.from_numpy(np.moveaxis(x_np, -1, 1).copy()))
    expected = [to_numpy(t) for t in model(x_np)]
    np.testing.assert_allclose(np.moveaxis(to_numpy(got[0]), 1, -1), expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(got[1]), expected[1], rtol=1e-5, atol=1e-5)


class _Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)
        self.last_two = nn.LayerNorm((4, 7), eps=1e-3)  # (H, W) of an NCHW tensor
        self.width = nn.LayerNorm(7, elementwise_affine=False)
        self.no_bias = nn.LayerNorm(5, bias=False)
        self.weight = nn.Parameter(torch.rand(5) + 0.5)
        self.register_buffer("bias", torch.randn(5))
        for norm in (self.last_two, self.no_bias):
            with torch.no_grad():
                norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        y = self.conv(x)
        a = self.last_two(y)
        b = self.width(y)
        c = self.no_bias(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        d = F.layer_norm(y.permute(0, 2, 3, 1), (5,), self.weight, self.bias, 1e-5)
        return a + b + c + d.permute(0, 3, 1, 2)


def test_torch_layer_norms_over_any_trailing_dims_both_ways():
    check_torch(_Norms(), (3, 4, 7))


def test_torchvision_layer_norm_2d_both_ways(torchvision):
    from torchvision.models.convnext import LayerNorm2d

    norm = LayerNorm2d(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    model = check_torch(nn.Sequential(nn.Conv2d(3, 6, 3), norm, nn.Conv2d(6, 2, 1)), (3, 7, 5))
    (keras_norm,) = [layer for layer in model.layers if isinstance(layer, L.LayerNormalization)]
    assert keras_norm.axis == [-1] and keras_norm.epsilon == pytest.approx(1e-6)
    assert not any(isinstance(layer, L.Permute) for layer in model.layers)  # over NHWC's channels directly


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (L.LayerNormalization(axis=1), "only the last axes"),
        (L.LayerNormalization(axis=[1, 3]), "only the last axes"),
    ],
)
def test_keras_layer_normalization_not_over_the_last_axes_is_refused(layer, match):
    inputs = keras.Input((4, 5, 3))
    with pytest.raises(UnsupportedLayerError, match=match):
        keras_to_torch(keras.Model(inputs, layer(inputs)))


def test_rms_scaling_is_refused():
    inputs = keras.Input((4, 3))
    with pytest.warns(UserWarning, match="rms_scaling"):
        layer = L.LayerNormalization(rms_scaling=True, name="rms")
    with pytest.raises(UnsupportedLayerError, match=r"'rms'.*rms_scaling"):
        keras_to_torch(keras.Model(inputs, layer(inputs)))
