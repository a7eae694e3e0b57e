"""Zero padding and cropping, both ways: ``ZeroPadding1D/2D/3D`` ⇄ ``nn.ZeroPad1d/2d/3d``,
``nn.ConstantPad1d/2d/3d(…, 0)``, ``F.pad(…, value=0)``; ``Cropping1D/2D/3D`` ⇄ negative padding
(``F.pad(x, (-left, -right, -top, -bottom))``, the inverse of a zero padding, for any input size;
``x.narrow()`` and slicing are :mod:`~bnkit.convert.families.tensor_ops`'); and the explicit padding
that convolutions and poolings put in front of themselves where one framework pads differently from the other
(Keras' ``same`` pads the odd element after; PyTorch's integer padding is symmetric).

PyTorch lists paddings last axis first (``(left, right, top, bottom)``); Keras first axis first
(``((top, bottom), (left, right))``). A PyTorch padding that pads some sides and crops others
becomes a Keras ``ZeroPadding`` then a ``Cropping``.
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

_ZERO_PADS = {1: nn.ZeroPad1d, 2: nn.ZeroPad2d, 3: nn.ZeroPad3d}
_KERAS_ZERO_PADDINGS = {1: L.ZeroPadding1D, 2: L.ZeroPadding2D, 3: L.ZeroPadding3D}
_KERAS_CROPPINGS = {1: L.Cropping1D, 2: L.Cropping2D, 3: L.Cropping3D}


def _torch_order(pairs) -> tuple[int, ...]:
    """``(before, after)`` per spatial axis, first axis first, as PyTorch's flat padding (last axis first)."""
    return tuple(int(p) for before, after in reversed(pairs) for p in (before, after))


# ---- Keras -> PyTorch ---------------------------------------------------------------------


def zero_pad_torch(b: KerasToTorch, name: str, source: fx.Node, pads: list[tuple[int, int]]) -> fx.Node:
    """An ``nn.ZeroPad1d/2d/3d`` module named ``name`` padding each spatial axis by ``(before, after)``."""
    return b.add_module(name, _ZERO_PADS[len(pads)](_torch_order(pads)), source)


def _pairs(layer, attribute: str, rank: int) -> list[tuple[int, int]]:
    """Keras' padding or cropping as ``(before, after)`` per spatial axis (1-D layers keep a flat pair)."""
    value = getattr(layer, attribute)
    return [tuple(value)] if rank == 1 else [tuple(pair) for pair in value]


@from_keras(*_KERAS_ZERO_PADDINGS.values())
def zero_padding_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    (x,) = inputs
    return TorchValue(zero_pad_torch(b, layer.name, x.node, _pairs(layer, "padding", x.rank - 2)), x.rank)


@from_keras(*_KERAS_CROPPINGS.values())
def cropping_to_torch(b: KerasToTorch, layer, node, inputs) -> TorchValue:
    """``Cropping2D(((top, bottom), (left, right)))``: ``F.pad(x, (-left, -right, -top, -bottom))``."""
    (x,) = inputs
    crops = _pairs(layer, "cropping", x.rank - 2)
    out = b.graph.call_function(F.pad, (x.node, tuple(-c for c in _torch_order(crops))), name=layer.name)
    return TorchValue(out, x.rank)


# ---- PyTorch -> Keras ---------------------------------------------------------------------


def zero_padding_keras(b: TorchToKeras, node, x: KerasValue, name: str, flat: tuple[int, ...]) -> KerasValue:
    """PyTorch's padding ``flat`` (last axis first; negative values crop) of ``x`` as a Keras
    ``ZeroPadding1D/2D/3D`` named ``name`` and/or a ``Cropping1D/2D/3D``."""
    n = x.rank - 2
    flat = tuple(int(v) for v in flat)
    if len(flat) % 2 or len(flat) // 2 > n or n not in _ZERO_PADS:
        raise b.unsupported(node, f"padding {flat} of a rank-{x.rank} input (only its spatial dims convert)")
    flat += (0,) * (2 * n - len(flat))  # PyTorch's padding may leave the first spatial dims out
    pairs = [(flat[2 * i], flat[2 * i + 1]) for i in reversed(range(n))]  # first axis first
    shape = (x.shape[0], *(size + before + after for size, (before, after) in zip(x.shape[1:], pairs, strict=True)))
    if any(size <= 0 for size in shape[1:]):
        raise b.unsupported(node, f"padding {flat} crops the {x.shape[1:]} input to nothing")
    tensor = x.tensor
    pads = [(max(before, 0), max(after, 0)) for before, after in pairs]
    crops = [(max(-before, 0), max(-after, 0)) for before, after in pairs]
    if any(any(p) for p in pads):
        tensor = _KERAS_ZERO_PADDINGS[n](pads[0] if n == 1 else tuple(pads), name=name)(tensor)
        name = b.unique_name(f"{name}_crop")
    if any(any(c) for c in crops):
        tensor = _KERAS_CROPPINGS[n](crops[0] if n == 1 else tuple(crops), name=name)(tensor)
    return KerasValue(tensor, shape)


@from_torch(*_ZERO_PADS.values(), nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
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
    pad = tuple(b.arg(node, 1, "pad"))
    if mode != "constant" or ((value or 0) != 0 and any(p > 0 for p in pad)):
        raise b.unsupported(node, f"padding mode {mode!r} with value {value!r}; only zeros convert")
    return zero_padding_keras(b, node, x, b.name(node), pad)
