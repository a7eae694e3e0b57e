"""Zero padding and cropping both ways: ZeroPadding1D/2D/3D ⇄ nn.ZeroPad*d / ConstantPad*d(0) /
F.pad; Cropping1D/2D/3D ⇄ negative padding (F.pad, ZeroPad with negative values);
a PyTorch padding that pads some sides and crops others; every form of the Keras arguments.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_checks import check_keras, check_torch, random_array
from torch import nn

from bnkit.convert import UnsupportedLayerError, torch_to_keras
from bnkit.keras import keras

L = keras.layers


def _types(model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


@pytest.mark.parametrize(
    ("cls", "argument", "shape"),
    [
        (L.ZeroPadding1D, 2, (7, 3)),
        (L.ZeroPadding1D, (0, 3), (7, 3)),
        (L.ZeroPadding2D, 1, (5, 6, 3)),
        (L.ZeroPadding2D, (2, 1), (5, 6, 3)),  # symmetric: (height, width)
        (L.ZeroPadding2D, ((0, 1), (2, 3)), (5, 6, 3)),  # ((top, bottom), (left, right))
        (L.ZeroPadding3D, ((1, 0), (0, 2), (3, 1)), (3, 4, 5, 2)),
        (L.Cropping1D, 2, (9, 3)),
        (L.Cropping1D, (0, 3), (9, 3)),
        (L.Cropping2D, 1, (7, 8, 3)),
        (L.Cropping2D, (2, 1), (7, 8, 3)),
        (L.Cropping2D, ((0, 1), (2, 3)), (7, 8, 3)),
        (L.Cropping3D, ((1, 0), (0, 2), (3, 1)), (4, 5, 6, 2)),
    ],
)
def test_keras_padding_and_cropping(cls, argument, shape):
    inputs = keras.Input(shape)
    x = cls(argument, name="layer")(inputs)
    rank = len(shape) - 1
    if rank < 3:  # a conv after it, so that the layout of the result matters
        x = (L.Conv1D if rank == 1 else L.Conv2D)(4, 1)(x)
    model = keras.Model(inputs, x)
    torch_model = check_keras(model, random_array((2, *shape)))
    back = torch_to_keras(torch_model, (shape[-1], *shape[:-1]))
    assert cls.__name__ in _types(back)  # Keras -> PyTorch -> Keras gives the same layer back


class _Pads(nn.Module):
    """Paddings as PyTorch code writes them: F.pad with fewer entries than dims, crops (and narrow())."""

    def forward(self, x):
        x = F.pad(x, (1, 2))  # the last dim only
        x = F.pad(x, (-1, 0, 2, -3))  # crop left, pad top, crop bottom
        x = torch.narrow(x, 2, 1, 4)
        return x.narrow(-1, -5, 3)


@pytest.mark.parametrize(
    ("module", "shape", "expected"),
    [
        (nn.ZeroPad2d((1, 2, 0, 3)), (3, 5, 6), ["ZeroPadding2D"]),
        (nn.ConstantPad1d((2, 0), 0.0), (3, 7), ["ZeroPadding1D"]),
        (nn.ZeroPad2d(-1), (3, 7, 8), ["Cropping2D"]),
        (nn.ZeroPad2d((-1, 2, 0, -3)), (3, 7, 8), ["ZeroPadding2D", "Cropping2D"]),
        (nn.ZeroPad3d((1, -1, 0, 2, -1, 0)), (2, 4, 5, 6), ["ZeroPadding3D", "Cropping3D"]),
        (nn.ConstantPad3d((-1, -1, 0, 0, 0, 1), 0.0), (2, 4, 5, 6), ["ZeroPadding3D", "Cropping3D"]),
        (_Pads(), (3, 9, 8), ["ZeroPadding2D", "Cropping2D"]),
    ],
)
def test_torch_padding_and_cropping(module, shape, expected):
    model = check_torch(nn.Sequential(module), shape)
    types = [t for t in _types(model) if t != "InputLayer"]
    assert all(t in types for t in expected), types


def test_a_crop_of_a_u_net_skip_connection():
    """The classic use: crop the encoder's features to the decoder's size, then concatenate."""

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down, self.up = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 5)

        def forward(self, x):
            a, b = self.down(x), self.up(x)  # 7x7 and 5x5
            return torch.cat([F.pad(a, (-1, -1, -1, -1)), b], 1)

    check_torch(Skip(), (3, 9, 9))


def test_padding_refusals_name_the_module():
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(ConstantPad2d\): padding value 1.5"):
        torch_to_keras(nn.Sequential(nn.ConstantPad2d(1, 1.5)), (3, 4, 4))
    with pytest.raises(UnsupportedLayerError, match=r"only its spatial dims"):  # pads the channels
        torch_to_keras(nn.Sequential(nn.ZeroPad2d(1), _PadChannels()), (3, 4, 4))
    with pytest.raises(UnsupportedLayerError, match=r"'0' \(ReflectionPad2d\)"):
        torch_to_keras(nn.Sequential(nn.ReflectionPad2d(1)), (3, 4, 4))


class _PadChannels(nn.Module):
    def forward(self, x):
        return F.pad(x, (0, 0, 0, 0, 1, 1))
