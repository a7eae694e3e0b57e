"""Zero padding, both ways: ``ZeroPadding1D/2D`` ⇄ ``nn.ZeroPad1d/2d``, ``nn.ConstantPad1d/2d(…, 0)``,
``F.pad(…, value=0)``; and the explicit padding that convolutions and poolings put in front of
themselves where one framework pads differently from the other (Keras' ``same`` pads the odd
element after; PyTorch's integer padding is symmetric).

PyTorch lists paddings last axis first (``(left, right, top, bottom)``); Keras first axis first
(``((top, bottom), (left, right))``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnkit.convert.registry import from_keras, from_torch
from bnkit.convert.values import KerasValue, TorchValue
from bnkit.keras import keras

if TYPE_CHECKING:
    from bnkit.convert.keras_walker import KerasToTorch
    from bnkit.convert.torch_walker import TorchToKeras

L = keras.layers


# ---- Keras -> PyTorch ---------------------------------------------------------------------


def zero_pad_torch(b: KerasToTorch, name: str, source: fx.Node, pads: list[tuple[int, int]]) -> fx.Node:
    """An ``nn.ZeroPad1d/2d`` module named ``name`` padding each spatial axis by ``(before, after)``."""
    flat = tuple(p for before, after in reversed(pads) for p in (before, after))
    pad_cls = nn.ZeroPad1d if len(pads) == 1 else nn.ZeroPad2d
    return b.add_module(name, pad_cls(flat), source)


@from_keras(L.ZeroPadding1D, L.ZeroPadding2D)
def zero_padding_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    b.check_channels_last(layer)
    (x,) = inputs
    if isinstance(layer, L.ZeroPadding1D):
        left, right = layer.padding
        module = nn.ZeroPad1d((int(left), int(right)))
    else:
        (top, bottom), (left, right) = layer.padding
        module = nn.ZeroPad2d((int(left), int(right), int(top), int(bottom)))
    return TorchValue(b.add_module(layer.name, module, x.node), x.rank)


# ---- PyTorch -> Keras ---------------------------------------------------------------------


def zero_padding_keras(b: TorchToKeras, node, x: KerasValue, name: str, flat: tuple[int, ...]) -> KerasValue:
    """A Keras ``ZeroPadding1D/2D`` named ``name`` applying PyTorch's padding ``flat`` (last axis first)."""
    n = x.rank - 2
    if n == 1 and len(flat) == 2:
        layer = L.ZeroPadding1D((flat[0], flat[1]), name=name)
        shape = (x.shape[0], x.shape[1] + flat[0] + flat[1])
    elif n == 2 and len(flat) == 4:
        left, right, top, bottom = flat
        layer = L.ZeroPadding2D(((top, bottom), (left, right)), name=name)
        shape = (x.shape[0], x.shape[1] + top + bottom, x.shape[2] + left + right)
    else:
        raise b.unsupported(node, f"zero padding {flat} of a rank-{x.rank} input")
    return KerasValue(layer(x.tensor), shape)


@from_torch(nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)
def pad_module_to_keras(b: TorchToKeras, node, m) -> KerasValue:
    if m.value != 0:
        raise b.unsupported(node, f"padding value {m.value!r}; only zero padding converts")
    return zero_padding_keras(b, node, b.input(node), b.name(node), tuple(m.padding))


@from_torch(F.pad, torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default)
def pad_function_to_keras(b: TorchToKeras, node, fn) -> KerasValue:
    x = b.input(node)
    if fn is torch.ops.aten.constant_pad_nd.default:
        mode, value = "constant", b.arg(node, 2, "value", 0)
    else:
        mode, value = b.arg(node, 2, "mode", "constant"), b.arg(node, 3, "value", 0.0)
    if mode != "constant" or (value or 0) != 0:
        raise b.unsupported(node, f"padding mode {mode!r} with value {value!r}; only zeros convert")
    return zero_padding_keras(b, node, x, b.name(node), tuple(b.arg(node, 1, "pad")))
