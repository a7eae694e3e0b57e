"""Transposed convolutions both ways (``Conv1D/2D/3DTranspose`` ⇄ ``nn.ConvTranspose1d/2d/3d``): grids
against real Keras and real torch.nn, each converted model also converted back; refusals."""

from __future__ import annotations

import pytest
import torch
from layer_checks import check_keras, check_torch, random_array
from torch import nn

from bnkit.convert import UnsupportedLayerError, torch_to_keras
from bnkit.convert.families.transposed_convolution import keras_crops
from bnkit.keras import keras

L = keras.layers
KERAS_CLASSES = {1: L.Conv1DTranspose, 2: L.Conv2DTranspose, 3: L.Conv3DTranspose}
TORCH_CLASSES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}

# kernel, stride, dilation, padding, output_padding, bias
KERAS_GRID = [
    (3, 2, 1, "same", None, True),  # Keras takes one more off the right: a crop after the PyTorch conv
    (4, 2, 1, "same", None, True),  # DCGAN's upsampling: ConvTranspose2d(4, 2, padding=1)
    (2, 2, 1, "valid", None, False),
    (3, 1, 1, "same", None, True),
    (1, 3, 1, "valid", None, True),  # stride > kernel: Keras appends max(k, s) - k zeros (then the bias)
    (3, 2, 1, "valid", 1, True),
    (3, 2, 1, "same", 1, False),
    (5, 3, 1, "same", 2, True),
    (3, 1, 2, "same", None, True),
    (4, 1, 2, "valid", None, True),
]


@pytest.mark.parametrize(("rank", "size"), [(1, 7), (2, 6), (3, 4)])
@pytest.mark.parametrize(("k", "s", "d", "padding", "output_padding", "bias"), KERAS_GRID)
def test_keras_conv_transpose_grid(rank, size, k, s, d, padding, output_padding, bias):
    keras.utils.set_random_seed(0)
    shape = (size,) * rank + (3,)
    inputs = keras.Input(shape)
    layer = KERAS_CLASSES[rank](
        5, k, strides=s, dilation_rate=d, padding=padding, output_padding=output_padding, use_bias=bias, name="up"
    )
    model = keras.Model(inputs, layer(inputs))
    if bias:
        layer.bias.assign(random_array((5,), 5))
    torch_model = check_keras(model, random_array((2, *shape)))
    assert isinstance(torch_model.up, TORCH_CLASSES[rank])


# kernel, stride, padding, output_padding, dilation
TORCH_GRID = [
    (3, 2, 1, 1, 1),  # the usual 2x upsampling: Keras 'valid' + Cropping (Keras' 'same' crops the other side)
    (4, 2, 1, 0, 1),  # Keras 'same'
    (2, 2, 0, 0, 1),  # Keras 'valid'
    (3, 1, 1, 0, 1),
    (3, 2, 0, 1, 1),
    (3, 2, 2, 0, 1),
    (5, 3, 2, 2, 1),
    (3, 1, 0, 0, 2),
    (3, 1, 2, 0, 2),
    (1, 3, 0, 2, 1),
]


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize(("k", "s", "p", "op", "d"), TORCH_GRID)
def test_torch_conv_transpose_grid(rank, k, s, p, op, d):
    torch.manual_seed(0)
    module = TORCH_CLASSES[rank](3, 5, k, stride=s, padding=p, output_padding=op, dilation=d, bias=(k + s) % 2 == 1)
    check_torch(nn.Sequential(module, nn.ReLU()), (3,) + (5,) * rank)


def test_windows_the_same_as_keras_takes():
    """keras_crops against the output sizes Keras' own layers compute (odd and even kernels, every padding)."""
    for k in (1, 2, 3, 4, 5):
        for s in (1, 2, 3):
            for padding in ("valid", "same"):
                for op in (None, *range(s)):
                    layer = L.Conv1DTranspose(1, k, strides=s, padding=padding, output_padding=op)
                    left, right = keras_crops(k, s, 1, padding, op)
                    assert layer.compute_output_shape((1, 6, 1))[1] == 5 * s + k - left - right


def test_transposed_convolution_refusals():
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(ConvTranspose2d\): groups=2"):
        torch_to_keras(nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2)), (4, 6, 6))
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(ConvTranspose1d\): stride=\(2,\) with dilation=\(2,\)"):
        torch_to_keras(nn.Sequential(nn.ConvTranspose1d(4, 4, 3, stride=2, dilation=2)), (4, 6))
    with pytest.raises(UnsupportedLayerError, match=r"output_padding=\(2, 2\) with padding=\(0, 0\)"):
        torch_to_keras(nn.Sequential(nn.ConvTranspose2d(4, 4, 3, dilation=3, output_padding=2)), (4, 6, 6))

    class WithOutputSize(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)

        def forward(self, x):
            return self.up(x, output_size=(12, 12))

    with pytest.raises(UnsupportedLayerError, match=r"'up' \(ConvTranspose2d\): output_size= passed in the call"):
        torch_to_keras(WithOutputSize(), (4, 6, 6))
